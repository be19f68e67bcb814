//! Raw tunnel streams for the HTTP/1.1 fast path (docs/tunnels.md "HTTP on the fast path"): a
//! plain keep-alive request to a tunnel client is written, as HTTP/1.1 bytes, on a raw stream
//! (a plain CONNECT, as a remote port's connection) that the agent joins to a TCP connection to
//! the target; the response is read from it as from a pooled upstream connection. After the
//! response the stream is parked on its session for the next request to that target, so the
//! agent relays bytes and parses nothing.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Tunnels;
use super::remote::CarryError;
use super::session::{RawStream, Session, StreamSlot};
use crate::proxy::ProxyError;

/// Why no raw stream was opened.
pub enum NoStream {
    /// No session here takes a new stream to the target now (none, all leaving, the agent
    /// reports the target down): nothing was sent, and the general path decides — the node
    /// holding another session, or the error.
    Elsewhere,
    /// The session here could not open it: the proxy's error response.
    Failed(ProxyError),
}

/// One raw stream to a target through an agent's session, counted open on it while it lives.
pub struct FastStream {
    io: RawStream,
    slot: StreamSlot,
}

impl FastStream {
    /// Keeps the stream for the next request to `target` (at most `max` per session).
    pub fn park(self, target: &str, max: usize) {
        Session::park(self.slot, target, self.io, max);
    }
}

impl Tunnels {
    /// A parked stream to `target` on one of this node's sessions of `client_id` that takes new
    /// streams and does not report `target` down.
    pub fn take_parked(
        &self,
        client_id: &str,
        target: &str,
        idle_timeout: Duration,
    ) -> Option<FastStream> {
        let found = self
            .local
            .of(client_id)
            .into_iter()
            .filter(|s| !s.is_leaving() && !s.is_down(target) && s.transport.usable())
            .find_map(|s| s.unpark(target, idle_timeout));
        let (slot, io) = found?;
        self.metrics
            .fast_streams
            .with_label_values(&["reused"])
            .inc();
        Some(FastStream { io, slot })
    }

    /// A new raw stream to `target` on one of this node's sessions of `client_id` that takes
    /// new streams. A session that is leaving is not used: the agent's replacement may be on
    /// another node, which the general path finds.
    pub async fn open_fast(&self, client_id: &str, target: &str) -> Result<FastStream, NoStream> {
        let here = self.local.of(client_id);
        if !here
            .iter()
            .any(|s| !s.is_leaving() && !s.is_down(target) && s.transport.usable())
        {
            return Err(NoStream::Elsewhere);
        }
        drop(here);
        match self.open_stream(client_id, target, false, true).await {
            Ok((up, Some(slot))) => {
                self.metrics
                    .fast_streams
                    .with_label_values(&["opened"])
                    .inc();
                Ok(FastStream {
                    io: Box::new(TokioIo::new(up)),
                    slot,
                })
            }
            Ok((_, None)) | Err(CarryError::Offline(_) | CarryError::Unhealthy { .. }) => {
                Err(NoStream::Elsewhere)
            }
            // The agent answered for its side (not allowed, cannot connect, ...), as it would
            // have on the general path.
            Err(CarryError::Agent { client, label }) => {
                Err(NoStream::Failed(ProxyError::TunnelAgent { client, label }))
            }
            Err(e @ (CarryError::Stream { .. } | CarryError::Full(_))) => {
                Err(NoStream::Failed(ProxyError::TunnelStream {
                    client: client_id.to_string(),
                    reason: e.to_string(),
                }))
            }
        }
    }

    /// Closes parked streams idle past `idle_timeout` or closed by their agent.
    pub fn sweep_parked(&self, idle_timeout: Duration) {
        for s in self.local.all() {
            s.sweep_parked(idle_timeout);
        }
    }
}

impl AsyncRead for FastStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for FastStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
