//! One request on the fast path: route it, send it upstream over a pooled connection, relay
//! the response as it arrives.

use std::io;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::StatusCode;
use http::uri::Scheme;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use tokio::time::timeout;

use super::chunked::ChunkedScanner;
use super::head::{self, Framing, RequestHead};
use super::upstream::{Dest, Upstream};
use super::{ClientStream, FastPath, MAX_FAST_HEADERS, READ_CHUNK};
use crate::domain::Declarer;
use crate::proxy::ProxyError;
use crate::proxy::deadline::Kind;
use crate::proxy::error::{OWN_HEADERS, RequestId, X_REQUEST_ID};
use crate::proxy::policy::{self, Admitted, Ctx, Via};
use crate::proxy::server::Conn;

/// What the connection does after a request.
pub enum Next {
    KeepAlive,
    Close,
    /// The general path answers this request (nothing of it was sent anywhere); why, as the
    /// handovers metric's label.
    Handover(&'static str),
}

/// Buffers a connection reuses for each of its requests.
#[derive(Default)]
pub struct Buffers {
    /// What is written next: a head for the upstream, or a head (and body start) for the client.
    out: Vec<u8>,
    /// What the upstream sent.
    upstream: BytesMut,
}

pub struct Exchange<'a, 'b> {
    pub fast: &'a FastPath,
    pub ctx: &'a Ctx,
    pub conn: &'a Conn,
    pub peer_ip: &'a str,
    pub req: &'a httparse::Request<'a, 'b>,
    pub head: &'a RequestHead<'b>,
    pub body: &'a [u8],
}

/// Counts the request as in flight while it lives.
struct InFlight<'a>(&'a Ctx);

impl<'a> InFlight<'a> {
    fn new(ctx: &'a Ctx) -> Self {
        ctx.metrics.active_requests.inc();
        Self(ctx)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.metrics.active_requests.dec();
    }
}

/// An upstream connection with a request sent on it and its response head read.
struct Answered {
    upstream: Upstream,
    head_len: usize,
}

/// Why a request got no response head.
enum Failed {
    /// The proxy answers with this error.
    Refuse(ProxyError),
    /// The general path takes the request (why, as the handovers metric's label). Nothing of it
    /// was sent, or it was sent on a reused stream that broke before any answer and is safe to
    /// repeat (idempotent), as a retry would be.
    Handover(&'static str),
}

impl From<ProxyError> for Failed {
    fn from(e: ProxyError) -> Self {
        Failed::Refuse(e)
    }
}

/// Why relaying a response stopped early: the client cannot be answered any more.
struct Broken;

impl Exchange<'_, '_> {
    pub async fn run<C: ClientStream>(
        self,
        client: &mut C,
        io: &mut Buffers,
        stop: &watch::Receiver<bool>,
    ) -> Next {
        let started = Instant::now();
        let _in_flight = InFlight::new(self.ctx);
        let admitted = match self.admit().await {
            // Another set's node serves it: the general path's node-to-node client.
            Ok(a) if a.to_set.is_some() => return Next::Handover("other_set"),
            // A group's member is chosen by the general path.
            Ok(a) if matches!(a.tunnel, Some(Via::Group(_))) => {
                return Next::Handover("tunnel_group");
            }
            // Answered by the general path, with its `Location`.
            Ok(a) if !self.conn.secure && a.route.redirects_http() => {
                return Next::Handover("redirect_https");
            }
            // HTTP/2 or a mapping's own TLS trust: the general path's clients.
            Ok(a) if a.route.upstream().is_some() => return Next::Handover("upstream_protocol"),
            Ok(a) if a.scheme == Scheme::HTTP => a,
            // TLS to the upstream: the general path's client.
            Ok(_) => return Next::Handover("https_target"),
            Err(e) => return self.refuse(client, io, e, started, stop).await,
        };
        let mut admitted = admitted;
        if let Err(e) = self.ctx.hold_places(&mut admitted) {
            return self.refuse(client, io, e, started, stop).await;
        }
        let Admitted {
            route,
            authority,
            who,
            hops,
            tunnel,
            // Held until the response is relayed.
            permit: _permit,
            ..
        } = admitted;
        let target = authority.as_str();
        let dest = match &tunnel {
            Some(Via::Client(client)) => Dest::Tunnel { client, target },
            _ => Dest::Direct { target, who },
        };

        io.out.clear();
        head::write_request_head(
            &mut io.out,
            self.req,
            self.head,
            self.peer_ip,
            if self.conn.secure { "https" } else { "http" },
            hops,
            route.headers(),
        );
        io.out.extend_from_slice(self.body);
        let sent_at = Instant::now();
        // One limit for the final response head, retries and interim responses included.
        let deadline = tokio::time::Instant::now() + self.fast.settings.response_timeout;
        // A client that goes away while the upstream thinks is not waited for (the upstream
        // connection is closed, as the general path does).
        let answered = tokio::select! {
            biased;
            answered = self.send(dest, io, deadline) => answered,
            () = gone(client.tcp(), C::ALERT_IS_GOODBYE) => {
                tracing::debug!(peer = self.peer_ip, target, "client left before the answer");
                return Next::Close;
            }
        };
        self.ctx
            .metrics
            .upstream_seconds
            .observe(sent_at.elapsed().as_secs_f64());
        let Answered { upstream, head_len } = match answered {
            Ok(a) => a,
            Err(Failed::Refuse(e)) => return self.refuse(client, io, e, started, stop).await,
            Err(Failed::Handover(why)) => return Next::Handover(why),
        };
        let close = self.head.close || self.ctx.drain.is_draining() || *stop.borrow();
        let relayed = self
            .relay(client, upstream, head_len, io, close, (dest, deadline))
            .await;
        let (status, bytes_out, keep_alive) = match relayed {
            Ok(r) => r,
            Err(e) => return self.refuse(client, io, e, started, stop).await,
        };
        self.ctx.access.record(
            &route.mapping_id(),
            1,
            self.body.len() as u64,
            bytes_out.unwrap_or(0),
        );
        if let Dest::Tunnel { .. } = dest {
            // As the general path counts a tunnel stream's bodies: out to the agent, in back.
            let m = &self.ctx.tunnels.metrics;
            m.bytes_out.inc_by(self.body.len() as u64);
            m.bytes_in.inc_by(bytes_out.unwrap_or(0));
        }
        self.finish(status, started);
        match (bytes_out, keep_alive) {
            (Some(_), true) => Next::KeepAlive,
            _ => Next::Close,
        }
    }

    async fn admit(&self) -> Result<Admitted, ProxyError> {
        let host = policy::requested_host(self.head.host)?;
        policy::same_name(self.conn.sni.as_ref(), &host)?;
        self.ctx.admit(&host, self.head.hops, false).await
    }

    /// Sends `io.out` to `dest` and reads the response head into `io.upstream`. A pooled
    /// connection (or parked stream) the other side closed meanwhile is replaced once when the
    /// request is safe to repeat (nothing came back, the method is idempotent).
    async fn send(
        &self,
        dest: Dest<'_>,
        io: &mut Buffers,
        deadline: tokio::time::Instant,
    ) -> Result<Answered, Failed> {
        let mut pooled = self.pooled(dest);
        loop {
            let reused = pooled.is_some();
            let mut upstream = match pooled.take() {
                Some(s) => s,
                None => self.open(dest).await?,
            };
            io.upstream.clear();
            let exchanged = tokio::time::timeout_at(
                deadline,
                exchange_head(&mut upstream, &io.out, &mut io.upstream),
            )
            .await;
            match exchanged {
                Err(_) => {
                    return Err(ProxyError::UpstreamTimeout(dest.target().to_string()).into());
                }
                Ok(Ok(Some(head_len))) => return Ok(Answered { upstream, head_len }),
                Ok(Ok(None)) | Ok(Err(_))
                    if reused && io.upstream.is_empty() && self.idempotent() =>
                {
                    tracing::debug!(
                        target = dest.target(),
                        "pooled upstream connection was closed; retrying"
                    );
                }
                Ok(Ok(None)) => {
                    return Err(dest
                        .broken("closed the connection without a response".into())
                        .into());
                }
                Ok(Err(e)) => return Err(dest.broken(e.to_string()).into()),
            }
        }
    }

    /// An idle connection (or parked stream) to `dest`, if one is kept.
    fn pooled(&self, dest: Dest<'_>) -> Option<Upstream> {
        match dest {
            Dest::Direct { target, who } => self.fast.pool(who).take(target).map(Upstream::Tcp),
            Dest::Tunnel { client, target } => self
                .ctx
                .tunnels
                .take_parked(client, target, self.fast.settings.pool_idle_timeout)
                .map(Upstream::Tunnel),
        }
    }

    /// A new connection (or stream) to `dest`. A tunnel client without a session here that
    /// takes a stream now goes to the general path, which knows where else to look.
    async fn open(&self, dest: Dest<'_>) -> Result<Upstream, Failed> {
        use crate::proxy::tunnel::NoStream;
        match dest {
            Dest::Direct { target, who } => Ok(Upstream::Tcp(self.connect(target, who).await?)),
            Dest::Tunnel { client, target } => {
                // Boxed: opening a stream is rare (parked ones are reused), and its state would
                // otherwise grow every connection's task, idle ones included.
                match Box::pin(self.ctx.tunnels.open_fast(client, target)).await {
                    Ok(s) => Ok(Upstream::Tunnel(s)),
                    Err(NoStream::Elsewhere) => Err(Failed::Handover("tunnel_elsewhere")),
                    Err(NoStream::Failed(e)) => Err(Failed::Refuse(e)),
                }
            }
        }
    }

    /// Keeps `upstream` for the next request to `dest`.
    fn keep(&self, dest: Dest<'_>, upstream: Upstream, suspect: bool) {
        let max = self.fast.settings.pool_max_idle;
        match (dest, upstream) {
            (Dest::Direct { target, who }, Upstream::Tcp(s)) => {
                self.fast.pool(who).put(target, s, suspect);
            }
            // Bytes an agent's service wrongly sent after a bodiless response may still be on
            // their way through the session, where no peek sees them: not reused.
            (Dest::Tunnel { target, .. }, Upstream::Tunnel(s)) if !suspect => s.park(target, max),
            // Dropped: the connection or stream closes.
            _ => {}
        }
    }

    fn idempotent(&self) -> bool {
        matches!(
            self.req.method,
            Some("GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
        )
    }

    /// A new upstream connection, checked by the egress policy (`connect.rs`).
    async fn connect(&self, target: &str, who: Declarer) -> Result<TcpStream, ProxyError> {
        use crate::proxy::connect::{self, ConnectError};
        let (host, port) = match target.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().unwrap_or(80)),
            None => (target, 80),
        };
        let timeout = self.fast.settings.connect_timeout;
        connect::connect(&self.ctx.egress, host, port, who, timeout)
            .await
            .map_err(|e| match e {
                ConnectError::Refused(refusal) => ProxyError::EgressRefused {
                    host: target.to_string(),
                    refusal,
                },
                e => ProxyError::UpstreamConnect {
                    upstream: target.to_string(),
                    reason: e.to_string(),
                },
            })
    }

    /// Relays the response whose head is in `io.upstream`: its head (rewritten), then its body
    /// as it arrives. Returns the status, the body bytes sent (`None` when the client could not
    /// be answered to the end), and whether the client connection stays open.
    async fn relay<C: ClientStream>(
        &self,
        client: &mut C,
        mut upstream: Upstream,
        mut head_len: usize,
        io: &mut Buffers,
        close: bool,
        (dest, deadline): (Dest<'_>, tokio::time::Instant),
    ) -> Result<(StatusCode, Option<u64>, bool), ProxyError> {
        let fail = |reason: &str| dest.broken(reason.to_string());
        // Interim (1xx) responses are dropped, as the general path's client does; the final
        // one follows.
        let (status, framing, upstream_closes, client_closes) = loop {
            let head = {
                let mut headers = [httparse::EMPTY_HEADER; MAX_FAST_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                resp.parse(&io.upstream[..head_len])
                    .map_err(|_| fail("malformed response head"))?;
                let rh = head::classify_response(&resp, self.head.is_head).map_err(fail)?;
                if rh.status == 101 {
                    return Err(fail("switched protocols without being asked to"));
                }
                let interim = (100..200).contains(&rh.status);
                let client_closes = close || rh.framing == Framing::UntilClose;
                if !interim {
                    io.out.clear();
                    date::with(|date| {
                        head::write_response_head(&mut io.out, &resp, &rh, client_closes, date);
                    });
                }
                (!interim).then_some((rh.status, rh.framing, rh.upstream_closes, client_closes))
            };
            io.upstream.advance(head_len);
            if let Some((code, framing, upstream_closes, client_closes)) = head {
                let status = StatusCode::from_u16(code).map_err(|_| fail("bad status"))?;
                break (status, framing, upstream_closes, client_closes);
            }
            let next =
                tokio::time::timeout_at(deadline, read_head(&mut upstream, &mut io.upstream));
            head_len = match next.await {
                Ok(Ok(Some(n))) => n,
                Err(_) => return Err(ProxyError::UpstreamTimeout(dest.target().to_string())),
                Ok(_) => return Err(fail("no final response after an interim one")),
            };
        };
        let idle = Idle {
            client_write: self.fast.settings.client_write_idle,
            upstream_read: self.fast.settings.upstream_read_idle,
            metrics: &self.ctx.metrics,
        };
        let body = relay_body(client, &mut upstream, io, framing, &idle).await;
        let (sent, upstream_done) = match body {
            Ok(sent) => (Some(sent), true),
            Err(Broken) => (None, false),
        };
        if upstream_done && !upstream_closes && io.upstream.is_empty() {
            // After a bodiless response, bytes an upstream wrongly sent as a body may still be
            // on their way: the pool looks before reusing the connection.
            let suspect = framing == Framing::None;
            self.keep(dest, upstream, suspect);
        }
        Ok((status, sent, !client_closes))
    }

    /// Answers with the proxy's own error response.
    async fn refuse<C: ClientStream>(
        &self,
        client: &mut C,
        io: &mut Buffers,
        e: ProxyError,
        started: Instant,
        stop: &watch::Receiver<bool>,
    ) -> Next {
        let ctx = self.ctx;
        let given = self
            .req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(X_REQUEST_ID.as_str()))
            .map(|h| h.value);
        let id = RequestId::from_header(given);
        ctx.refused(&e, &id, &self.peer_ip);
        let close = self.head.close || ctx.drain.is_draining() || *stop.borrow();
        let status = e.status();
        let body = e.body(&id);
        io.out.clear();
        let own = OwnResponse {
            status,
            body: &body,
            id: &id,
            retry_after: e.retry_after(),
        };
        write_own_response(&mut io.out, &own, !self.head.is_head, close);
        let written = match client.write_all(&io.out).await {
            // Over TLS the record may still sit in the session's buffer: send it now.
            Ok(()) => client.flush().await,
            e => e,
        };
        self.finish(status, started);
        if written.is_err() || close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    fn finish(&self, status: StatusCode, started: Instant) {
        self.ctx.metrics.count_status(status);
        self.ctx
            .metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Resolves when the client closes its side (or the connection breaks); a client that sends
/// more (a pipelined request) is still there. `alert_is_goodbye`: over TLS, a client closing
/// cleanly sends an alert record (close_notify) before its FIN.
async fn gone(client: &TcpStream, alert_is_goodbye: bool) {
    /// The content type of a TLS alert record.
    const ALERT: u8 = 0x15;
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) if alert_is_goodbye && byte[0] == ALERT => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Writes `out` to the upstream, then reads until a response head is complete; `None` when the
/// upstream closed first.
async fn exchange_head(
    upstream: &mut Upstream,
    out: &[u8],
    buf: &mut BytesMut,
) -> io::Result<Option<usize>> {
    upstream.write_all(out).await?;
    // A no-op on TCP; a tunnel stream's frames are sent by its session.
    upstream.flush().await?;
    read_head(upstream, buf).await
}

/// The most an upstream's response head may take.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

async fn read_head(upstream: &mut Upstream, buf: &mut BytesMut) -> io::Result<Option<usize>> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_FAST_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(n)) => return Ok(Some(n)),
                Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(io::Error::other("response head too large"));
                }
                Err(e) => return Err(io::Error::other(format!("malformed response head: {e}"))),
            }
        }
        buf.reserve(READ_CHUNK);
        if upstream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::other(
                    "closed in the middle of the response head",
                ))
            };
        }
    }
}

/// Relays a response body framed by `framing`; `io.out` holds the client's head, sent with the
/// body's first bytes. Returns the body bytes relayed.
async fn relay_body<C: ClientStream>(
    client: &mut C,
    upstream: &mut Upstream,
    io: &mut Buffers,
    framing: Framing,
    idle: &Idle<'_>,
) -> Result<u64, Broken> {
    let mut sent = 0u64;
    match framing {
        Framing::None => send(client, &io.out, idle).await?,
        Framing::Length(len) => {
            let mut left = len;
            loop {
                let n = left.min(io.upstream.len() as u64) as usize;
                io.out.extend_from_slice(&io.upstream[..n]);
                io.upstream.advance(n);
                left -= n as u64;
                sent += n as u64;
                send(client, &io.out, idle).await?;
                io.out.clear();
                if left == 0 {
                    break;
                }
                fill(upstream, &mut io.upstream, idle).await?;
            }
        }
        Framing::Chunked => {
            let mut scanner = ChunkedScanner::default();
            loop {
                let n = scanner.advance(&io.upstream).map_err(|_| Broken)?;
                io.out.extend_from_slice(&io.upstream[..n]);
                io.upstream.advance(n);
                send(client, &io.out, idle).await?;
                io.out.clear();
                if scanner.is_done() {
                    break;
                }
                fill(upstream, &mut io.upstream, idle).await?;
            }
            sent = scanner.data_bytes;
        }
        Framing::UntilClose => loop {
            let n = io.upstream.len();
            io.out.extend_from_slice(&io.upstream);
            io.upstream.clear();
            sent += n as u64;
            send(client, &io.out, idle).await?;
            io.out.clear();
            io.upstream.reserve(READ_CHUNK);
            match timeout(idle.upstream_read, upstream.read_buf(&mut io.upstream)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(Broken),
                Err(_) => return Err(idle.expired(Kind::UpstreamRead)),
            }
        },
    }
    Ok(sent)
}

/// The deadlines while a response body is relayed (docs/proxy.md "Deadlines").
struct Idle<'a> {
    client_write: std::time::Duration,
    upstream_read: std::time::Duration,
    metrics: &'a crate::proxy::metrics::ProxyMetrics,
}

impl Idle<'_> {
    fn expired(&self, kind: Kind) -> Broken {
        self.metrics
            .timeouts
            .with_label_values(&[kind.label()])
            .inc();
        Broken
    }
}

/// Writes to the client; one that takes nothing for `client_write_idle` is given up on. The
/// timer is only armed when the write has to wait.
async fn send<C: ClientStream>(client: &mut C, out: &[u8], idle: &Idle<'_>) -> Result<(), Broken> {
    // Flushed too: over TLS a written record may still sit in the session's buffer, and nothing
    // else sends it before the next request (a no-op over TCP).
    let write = async {
        client.write_all(out).await?;
        client.flush().await
    };
    match timeout(idle.client_write, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Broken),
        Err(_) => Err(idle.expired(Kind::ClientWrite)),
    }
}

/// Reads more of a body; the upstream closing early, or sending nothing for
/// `upstream_read_idle`, breaks the response.
async fn fill(upstream: &mut Upstream, buf: &mut BytesMut, idle: &Idle<'_>) -> Result<(), Broken> {
    buf.reserve(READ_CHUNK);
    match timeout(idle.upstream_read, upstream.read_buf(buf)).await {
        Ok(Ok(0) | Err(_)) => Err(Broken),
        Ok(Ok(_)) => Ok(()),
        Err(_) => Err(idle.expired(Kind::UpstreamRead)),
    }
}

/// The `Date` header value, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            f(c.1.as_bytes())
        })
    }
}

/// A response the proxy produces itself, with the general path's headers.
struct OwnResponse<'a> {
    status: StatusCode,
    body: &'a str,
    id: &'a RequestId,
    retry_after: Option<u32>,
}

fn write_own_response(out: &mut Vec<u8>, r: &OwnResponse<'_>, with_body: bool, close: bool) {
    use std::io::Write;
    let OwnResponse {
        status,
        body,
        id,
        retry_after,
    } = *r;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in OWN_HEADERS {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    let _ = write!(out, "{X_REQUEST_ID}: {id}\r\n");
    if let Some(secs) = retry_after {
        let _ = write!(out, "retry-after: {secs}\r\n");
    }
    head::push_length(out, body.len() as u64);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
}
