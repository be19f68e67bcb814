//! What the fast path sends a request on: a TCP connection to its target, or a raw stream through
//! a tunnel client's session (`tunnel::FastStream`). Both are pooled between requests.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::domain::Declarer;
use crate::proxy::ProxyError;
use crate::proxy::tunnel::FastStream;

pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(FastStream),
}

/// Where a request goes.
#[derive(Clone, Copy)]
pub enum Dest<'a> {
    /// A TCP connection to `target`, checked by `who`'s egress rules.
    Direct { target: &'a str, who: Declarer },
    /// Through `client`'s session to `target` on the agent's side.
    Tunnel { client: &'a str, target: &'a str },
}

impl Dest<'_> {
    pub fn target(&self) -> &str {
        match self {
            Dest::Direct { target, .. } | Dest::Tunnel { target, .. } => target,
        }
    }

    /// The error for an exchange that broke after the connection or stream was had.
    pub fn broken(&self, reason: String) -> ProxyError {
        match *self {
            Dest::Direct { target, .. } => ProxyError::Upstream {
                upstream: target.to_string(),
                reason,
            },
            Dest::Tunnel { client, .. } => ProxyError::TunnelStream {
                client: client.to_string(),
                reason,
            },
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
