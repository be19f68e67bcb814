//! The HTTP/1.1 fast path: plain keep-alive requests, over TCP or TLS, (no upgrade, no `Expect`, a body of at most
//! [`head::MAX_BUFFERED_BODY`] bytes by `Content-Length`) to plain-HTTP upstreams are parsed with
//! httparse and relayed in the connection's own task over a pooled upstream connection (or, for a
//! tunnel client, a pooled raw stream through its session: `upstream.rs`), response
//! bodies passed on as they come (with their length or chunks). Everything else — HTTP/2,
//! WebSocket, streamed uploads, `https` targets, heads the fast path does not like — is handed,
//! with the bytes already read, to the general hyper path (`server.rs`), which answers it as if
//! it had read the connection from the start. Why: docs/proxy.md "Fast path".

mod chunked;
mod exchange;
mod head;
mod pool;
mod rewind;
mod upstream;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use self::exchange::Next;
pub use self::rewind::Rewind;
use super::policy::Ctx;
use super::server::Conn;
use crate::domain::Declarer;

/// A client connection the fast path serves: plain TCP, or TLS over TCP.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP connection underneath: watched (never read) for the client leaving while the
    /// upstream thinks.
    fn tcp(&self) -> &TcpStream;
    /// Whether a new connection may wait for the socket to be readable before it gets a buffer.
    /// Not over TLS: the handshake may already have brought the request's plaintext in.
    const WAITS_ON_SOCKET: bool;
    /// Whether an alert record arriving while the upstream thinks means the client left (TLS:
    /// close_notify).
    const ALERT_IS_GOODBYE: bool;
}

impl ClientStream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    const WAITS_ON_SOCKET: bool = true;
    const ALERT_IS_GOODBYE: bool = false;
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    const WAITS_ON_SOCKET: bool = false;
    const ALERT_IS_GOODBYE: bool = true;
}

/// Headers parsed per request on the fast path; a request with more goes to the general path
/// (which applies `proxy.limits.max_headers`).
const MAX_FAST_HEADERS: usize = 128;
const READ_CHUNK: usize = 8 * 1024;
/// How often parked tunnel streams are looked at (`FastPath::sweep_pool`).
const PARKED_SWEEP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct FastSettings {
    pub header_timeout: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
    /// `timeouts.client_write_idle` / `upstream_read_idle` while a response body is relayed.
    pub client_write_idle: Duration,
    pub upstream_read_idle: Duration,
}

pub struct FastPath {
    settings: FastSettings,
    /// Upstream connections by the declarer whose egress rules they were checked for.
    tenant_pool: pool::Pool,
    operator_pool: pool::Pool,
}

/// How a connection left the fast path.
pub enum Exit {
    /// It is done (closed by either side, or timed out).
    Closed,
    /// The general path takes over; these bytes were read and not answered.
    Handover(Bytes),
}

impl FastPath {
    pub fn new(settings: FastSettings) -> Self {
        Self {
            tenant_pool: pool::Pool::new(settings.pool_max_idle, settings.pool_idle_timeout),
            operator_pool: pool::Pool::new(settings.pool_max_idle, settings.pool_idle_timeout),
            settings,
        }
    }

    fn pool(&self, who: Declarer) -> &pool::Pool {
        match who {
            Declarer::Tenant => &self.tenant_pool,
            Declarer::Operator => &self.operator_pool,
        }
    }

    /// Closes idle upstream connections and parked tunnel streams past their time, every
    /// `every`, until `stop`.
    pub async fn sweep_pool(
        &self,
        tunnels: &crate::proxy::tunnel::Tunnels,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(PARKED_SWEEP);
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Parked tunnel streams every second: one its agent closed, or that has
                    // something to say (holding the session's flow-control window), goes soon.
                    tunnels.sweep_parked(self.settings.pool_idle_timeout);
                    if last.elapsed() >= every {
                        last = tokio::time::Instant::now();
                        self.tenant_pool.sweep();
                        self.operator_pool.sweep();
                    }
                }
                _ = super::stopped(&mut stop) => return,
            }
        }
    }

    /// Serves requests from `client` until it closes, or until one needs the general path.
    pub async fn serve<C: ClientStream>(
        &self,
        ctx: &Ctx,
        client: &mut C,
        conn: &Conn,
        stop: &mut watch::Receiver<bool>,
    ) -> Exit {
        let peer_ip = conn.peer.ip().to_string();
        // Allocated when the first bytes arrive: an idle connection holds no buffer.
        let mut buf = BytesMut::new();
        let mut io = exchange::Buffers::default();
        let max_headers = self.settings.max_headers.min(MAX_FAST_HEADERS);
        let mut deadline = Instant::now() + self.settings.header_timeout;
        let mut served_one = false;
        loop {
            let consumed = {
                let mut headers = [httparse::EMPTY_HEADER; MAX_FAST_HEADERS];
                let mut req = httparse::Request::new(&mut headers[..max_headers]);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(head_len))
                        if head_len > self.settings.max_header_bytes =>
                    {
                        // Completed in one read past the limit: the general path answers 431.
                        return handover(ctx, "head", buf);
                    }
                    Ok(httparse::Status::Complete(head_len)) => {
                        let head = match head::classify_request(&req) {
                            Ok(head) => head,
                            Err(why) => return handover(ctx, why.label(), buf),
                        };
                        let len = head_len + head.content_length;
                        if buf.len() >= len {
                            let body = &buf[head_len..len];
                            let exchange = exchange::Exchange {
                                fast: self,
                                ctx,
                                conn,
                                peer_ip: &peer_ip,
                                req: &req,
                                head: &head,
                                body,
                            };
                            match exchange.run(client, &mut io, stop).await {
                                Next::KeepAlive => Some(len),
                                Next::Close => return Exit::Closed,
                                Next::Handover(why) => return handover(ctx, why, buf),
                            }
                        } else {
                            // The rest of the body is on its way: each read of it gets the
                            // header timeout anew (a slow upload that progresses is not cut).
                            deadline = Instant::now() + self.settings.header_timeout;
                            None
                        }
                    }
                    Ok(httparse::Status::Partial) if buf.len() < self.settings.max_header_bytes => {
                        None
                    }
                    // Too large, too many headers, malformed, HTTP/2: the general path says which.
                    _ => return handover(ctx, "head", buf),
                }
            };
            if let Some(n) = consumed {
                served_one = true;
                bytes::Buf::advance(&mut buf, n);
                deadline = Instant::now() + self.settings.header_timeout;
                if !buf.is_empty() {
                    // A pipelined request is already here.
                    continue;
                }
            }
            // A connection's first request is answered even when stopping (it may have been
            // accepted from the backlog after the listener stopped); later ones are not waited for.
            if !read_more(client, &mut buf, deadline, stop, served_one).await {
                return Exit::Closed;
            }
        }
    }
}

fn handover(ctx: &Ctx, reason: &'static str, read: BytesMut) -> Exit {
    ctx.metrics.handovers.with_label_values(&[reason]).inc();
    Exit::Handover(read.freeze())
}

/// Reads more of a request into `buf`: until `deadline`, and, between requests when `idle_stops`,
/// until `stop`. False when nothing more will come (closed, timed out, stopped, failed).
async fn read_more<C: ClientStream>(
    client: &mut C,
    buf: &mut BytesMut,
    deadline: Instant,
    stop: &mut watch::Receiver<bool>,
    idle_stops: bool,
) -> bool {
    let between_requests = idle_stops && buf.is_empty();
    if between_requests && *stop.borrow() {
        return false;
    }
    let read = tokio::time::timeout_at(deadline, async {
        if C::WAITS_ON_SOCKET && buf.capacity() == 0 {
            // A new connection: no buffer until it has something to say.
            client.tcp().readable().await?;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        client.read_buf(buf).await
    });
    let got = if between_requests {
        tokio::select! {
            biased;
            got = read => got,
            _ = super::stopped(stop) => return false,
        }
    } else {
        read.await
    };
    matches!(got, Ok(Ok(n)) if n > 0)
}
