//! The client-facing listener: HTTP/1.1 and HTTP/2 (cleartext, prior knowledge), header limits
//! and timeouts, routing by Host, graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::deadline::{self, Guarded, IdleBody, OpenStreams, WriteIdle};
use super::error::{RequestId, X_REQUEST_ID};
use super::forward::{ClientInfo, X_FORWARDED_PROTO};
use super::h1::{Exit, Rewind};
use super::metrics::ProxyMetrics;
use super::policy::{self, Ctx, HOPS, Via};
use super::stats::{Metered, Side};
use super::{ProxyBody, ProxyError};
use crate::domain::Hostname;

#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_timeout: Duration,
    pub grace_period: Duration,
    /// `proxy.limits.max_connections`: more are closed as soon as they are accepted.
    pub max_connections: usize,
}

/// What the request handlers know of the connection a request came on.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// Over TLS (the HTTPS listener).
    pub secure: bool,
    /// The name the client sent in its TLS handshake (SNI), if any.
    pub sni: Option<Hostname>,
}

/// Serves `listener` until `stop`; then stops accepting and gives open connections
/// `grace_period` to finish (HTTP/1 keep-alive answers `Connection: close`, HTTP/2 gets GOAWAY).
/// With `tls`, every connection starts with a TLS handshake (the HTTPS listener).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    s: ServerSettings,
    mut stop: watch::Receiver<bool>,
    tls: Option<Arc<super::tls::Certs>>,
) {
    let handover = Arc::new(Handover::new(&s));
    // Every connection task holds a watcher: shutting down waits for all of them.
    let graceful = GracefulShutdown::new();
    let conn_stop = stop.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(s.max_connections));
    let serve_one = |mut stream: tokio::net::TcpStream, peer: SocketAddr| {
        // Over the cap: closed at once (the kernel's backlog is not left to fill, and the
        // client learns now instead of at its timeout).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ctx.metrics.connections_refused.inc();
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
            return;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let handover = handover.clone();
        let watcher = graceful.watcher();
        let mut stop = conn_stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            ctx.metrics.active_connections.inc();
            // Held until the connection ends: shutting down waits for it.
            let _watcher = watcher;
            match tls {
                Some(certs) => {
                    let accepted =
                        super::tls::accept(&ctx, &certs, stream, peer, s.header_timeout).await;
                    if let Some((io, conn)) = accepted {
                        // ALPN `h2` goes to hyper's HTTP/2 server; HTTP/1.1 starts on the fast
                        // path as over plain TCP.
                        let h2 = io.get_ref().1.alpn_protocol() == Some(b"h2");
                        let fast = ctx.fast.as_ref().filter(|_| !h2);
                        serve_conn(&ctx, &handover, fast, io, conn, h2, &mut stop).await;
                    }
                }
                None => {
                    let conn = Conn {
                        peer,
                        secure: false,
                        sni: None,
                    };
                    match &ctx.fast {
                        Some(fast) => {
                            serve_conn(&ctx, &handover, Some(fast), stream, conn, false, &mut stop)
                                .await;
                        }
                        None => {
                            let read = sniff(&mut stream, s.header_timeout).await;
                            let h2 = read.starts_with(H2_PREFACE_START);
                            let io = Rewind::new(read, stream);
                            general(&ctx, &handover, io, conn, h2, &mut stop).await;
                        }
                    }
                }
            }
            ctx.metrics.active_connections.dec();
            drop(slot);
        });
    };
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = super::stopped(&mut stop) => break,
        };
        serve_one(stream, peer);
    }
    // Connections the kernel completed but nobody accepted yet would be reset when the listener
    // closes: take them too (their requests are answered, with `Connection: close`).
    while let Some(Ok((stream, peer))) = futures::FutureExt::now_or_never(listener.accept()) {
        serve_one(stream, peer);
    }
    drop(listener);
    tracing::info!(grace = ?s.grace_period, "stopped accepting; finishing open requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(s.grace_period) => {
            tracing::warn!(open = ctx.metrics.active_connections.get(), "grace period over; closing the rest");
        }
    }
}

/// How long a closing connection may take to send what is buffered (and close_notify).
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// Serves a connection: on the fast path first when there is one (each phase in its own
/// allocation, made when it starts: the task itself stays small, and a connection on the fast
/// path never holds room for hyper's state — what an idle connection costs bounds the memory at
/// `max_connections`), then on the general path with the bytes the fast path read.
async fn serve_conn<C>(
    ctx: &Arc<Ctx>,
    handover: &Handover,
    fast: Option<&super::h1::FastPath>,
    mut io: C,
    conn: Conn,
    h2: bool,
    stop: &mut watch::Receiver<bool>,
) where
    C: super::h1::ClientStream + 'static,
{
    let read = match fast {
        Some(fast) => match Box::pin(fast.serve(ctx, &mut io, &conn, stop)).await {
            Exit::Closed => {
                // What is still buffered goes out, and a TLS client gets close_notify (so a
                // body that ends at the close is not taken for a cut one).
                let _ =
                    tokio::time::timeout(CLOSE_WITHIN, tokio::io::AsyncWriteExt::shutdown(&mut io))
                        .await;
                return;
            }
            Exit::Handover(read) => read,
        },
        None => Bytes::new(),
    };
    let h2 = h2 || read.starts_with(H2_PREFACE_START);
    general(ctx, handover, Rewind::new(read, io), conn, h2, stop).await;
}

/// Serves a connection on hyper's HTTP/1.1 or HTTP/2 server until it ends.
async fn general<I>(
    ctx: &Arc<Ctx>,
    handover: &Handover,
    io: I,
    conn: Conn,
    h2: bool,
    stop: &mut watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let streams = OpenStreams::default();
    let service = connection_service(ctx.clone(), conn, h2.then(|| streams.clone()));
    let served = Box::pin(handover.serve(ctx, io, h2, service, streams, stop));
    if let Err(e) = served.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The hyper service of one connection. `open`: HTTP/2 only, which needs to know when its
/// streams end (for `http2_idle`).
fn connection_service(
    ctx: Arc<Ctx>,
    conn: Conn,
    open: Option<OpenStreams>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
> + Send
+ 'static {
    let conn = Arc::new(conn);
    service_fn(move |req| {
        let ctx = ctx.clone();
        let conn = conn.clone();
        let guard = open.as_ref().map(OpenStreams::enter);
        async move {
            let resp = handle(&ctx, &conn, req).await;
            let resp = match guard {
                Some(guard) => {
                    let (parts, body) = resp.into_parts();
                    Response::from_parts(parts, Guarded::new(body, guard).boxed())
                }
                None => resp,
            };
            Ok::<_, Infallible>(resp)
        }
    })
}

/// The start of the HTTP/2 connection preface: enough to tell it from an HTTP/1 request line.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2";

/// Reads a new connection's first bytes (within `within`) until they tell HTTP/2 from HTTP/1,
/// for the general path when the fast path is off.
async fn sniff(stream: &mut tokio::net::TcpStream, within: Duration) -> Bytes {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(4096);
    let _ = tokio::time::timeout(within, async {
        while buf.len() < H2_PREFACE_START.len() && H2_PREFACE_START.starts_with(&buf) {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    buf.freeze()
}

/// Serves a connection on the general path, with the bytes already read from it (by the fast
/// path, or by `sniff`). The protocol is known from those bytes, so the connection goes straight
/// to hyper's HTTP/1 or HTTP/2 server: one that is stopping still answers the request that was
/// read (an auto-detecting server drops a connection still detecting when asked to stop).
struct Handover {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Handover {
    fn new(s: &ServerSettings) -> Self {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(s.header_timeout)
            // hyper refuses buffers below 8 KiB.
            .max_buf_size(s.max_header_bytes.max(8192))
            .max_headers(s.max_headers);
        // HTTP/2 has no header-read timeout: a peer that stops answering pings is dropped.
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Some(s.header_timeout))
            .keep_alive_timeout(s.header_timeout)
            .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
        Self { h1, h2 }
    }

    /// Serves until the connection ends; when `stop` turns, the connection is asked to finish
    /// (the request in hand is answered, with `Connection: close` on HTTP/1, GOAWAY on HTTP/2).
    async fn serve<S, I>(
        &self,
        ctx: &Ctx,
        io: I,
        h2: bool,
        service: S,
        streams: OpenStreams,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String>
    where
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<ProxyBody>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let d = &ctx.deadlines;
        let io = TokioIo::new(WriteIdle::new(io, d.client_write_idle, ctx.metrics.clone()));
        if h2 {
            let conn = std::pin::pin!(self.h2.serve_connection(io, service));
            let idle = async {
                streams.idle_for(d.http2_idle).await;
                ctx.metrics
                    .timeouts
                    .with_label_values(&[deadline::Kind::Http2Idle.label()])
                    .inc();
            };
            until_done(conn, stop, idle, |c| c.graceful_shutdown()).await
        } else {
            // HTTP/1 keep-alive idle is the header timeout (hyper starts it when it waits for
            // the next head).
            let conn = std::pin::pin!(self.h1.serve_connection(io, service).with_upgrades());
            until_done(conn, stop, std::future::pending(), |c| {
                c.graceful_shutdown()
            })
            .await
        }
    }
}

/// Drives `conn` to its end, calling `shutdown` on it once `stop` turns or `idle` resolves.
async fn until_done<C, E>(
    mut conn: std::pin::Pin<&mut C>,
    stop: &mut watch::Receiver<bool>,
    idle: impl std::future::Future<Output = ()>,
    shutdown: impl Fn(std::pin::Pin<&mut C>),
) -> Result<(), String>
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut asked = false;
    let mut idle = std::pin::pin!(idle);
    loop {
        tokio::select! {
            // The connection first: its first poll takes the request handed over (already in
            // memory), so a shutdown asked for next finishes that request instead of dropping it.
            biased;
            done = conn.as_mut() => return done.map_err(|e| e.to_string()),
            _ = super::stopped(stop), if !asked => {
                asked = true;
                shutdown(conn.as_mut());
            }
            () = idle.as_mut(), if !asked => {
                asked = true;
                shutdown(conn.as_mut());
            }
        }
    }
}

struct InFlight<'a>(&'a ProxyMetrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.active_requests.dec();
    }
}

async fn handle(ctx: &Ctx, conn: &Conn, req: Request<Incoming>) -> Response<ProxyBody> {
    let peer = conn.peer;
    let started = Instant::now();
    ctx.metrics.active_requests.inc();
    let _in_flight = InFlight(&ctx.metrics);
    let http1 = req.version() < Version::HTTP_2;
    // Kept only in case the proxy answers itself (no copy of the value otherwise).
    let client_id = req.headers().get(X_REQUEST_ID).cloned();
    let mut resp = match route(ctx, conn, req).await {
        Ok(resp) => resp,
        Err(e) => {
            let id = RequestId::from_header(client_id.as_ref().map(HeaderValue::as_bytes));
            ctx.refused(&e, &id, &peer);
            e.into_response(&id)
        }
    };
    if http1 && ctx.drain.is_draining() {
        // Move keep-alive clients to other nodes while this one drains.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    ctx.metrics.count_status(resp.status());
    ctx.metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// The Host the client asked for: `:authority` / absolute-form first, else the Host header.
fn requested_host(req: &Request<Incoming>) -> Result<(Hostname, HeaderValue), ProxyError> {
    let raw = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).map_err(|_| ProxyError::MissingHost)?,
        None => req
            .headers()
            .get(header::HOST)
            .cloned()
            .ok_or(ProxyError::MissingHost)?,
    };
    let host = policy::requested_host(raw.as_bytes())?;
    Ok((host, raw))
}

async fn route(
    ctx: &Ctx,
    conn: &Conn,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let peer = conn.peer;
    if req.method() == http::Method::CONNECT
        && req.headers().contains_key(super::tunnel::NODE_HEADER)
    {
        // Another node carrying a remote-port connection to a session held here.
        return ctx.tunnels.serve_peer_connect(req).await;
    }
    // A CA validating a domain for tunnox: answered on any Host, before routing and
    // redirects. A token the store does not hold is the tenant's own: routed as usual.
    if matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        && let Some(token) = super::acme::challenge_token(req.uri().path())
        && let Some(answer) = ctx.challenges.answer(token).await
    {
        return Ok(answer);
    }
    let (host, raw_host) = requested_host(&req)?;
    policy::same_name(conn.sni.as_ref(), &host)?;
    // Another node of the fleet forwarding a request: for a tunnel session held here, or (with
    // its set named) for a mapping this node's set serves.
    let from_peer = match req.headers().get(super::tunnel::NODE_HEADER) {
        None => false,
        Some(v) if ctx.tunnels.node_token_matches(v.as_bytes()) => true,
        Some(_) => return Err(ProxyError::NodeAuth),
    };
    let from_set = req.headers().contains_key(super::tunnel::FROM_SET_HEADER);
    if from_set && !from_peer {
        return Err(ProxyError::NodeAuth);
    }
    let hops = policy::parse_hops(req.headers().get_all(HOPS).iter().map(|v| v.as_bytes()))?;
    // Any request with a valid node token was already placed by a node of the fleet (sent here
    // for this node's set, or for a session held here): it is never forwarded to a set again.
    let admitted = ctx.admit(&host, hops, from_peer).await?;
    let route = admitted.route.clone();
    // A peer's request came over HTTPS to that peer when it says so (the node token is
    // checked): it is neither redirected again nor told it was plain.
    let secure = conn.secure
        || (from_peer
            && req
                .headers()
                .get(X_FORWARDED_PROTO)
                .is_some_and(|v| v.as_bytes() == b"https"));
    if !secure && !from_peer && route.redirects_http() {
        return Err(ProxyError::RedirectToHttps {
            location: ctx.https_location(&host, req.uri()),
        });
    }
    let (parts, body) = req.into_parts();
    let body: ProxyBody = if hyper::body::Body::is_end_stream(&body) {
        body.map_err(Into::into).boxed()
    } else {
        // Counted as it streams (by the node that serves it); recorded when the upload ends.
        // A client that stops sending it is not waited for beyond `request_body_idle`.
        let idle = IdleBody::new(
            body,
            ctx.deadlines.request_body_idle,
            deadline::Kind::RequestBody,
            ctx.metrics.clone(),
        );
        match admitted.to_set {
            Some(_) => idle.boxed(),
            None => Metered::new(idle, ctx.access.clone(), route.clone(), Side::Request).boxed(),
        }
    };
    let info = ClientInfo {
        peer,
        host: &raw_host,
        hops: admitted.hops,
        proto: if secure { "https" } else { "http" },
    };
    let req = Request::from_parts(parts, body);
    if let Some(set) = &admitted.to_set {
        // Counted by the node that serves it.
        return super::sets::forward(ctx, req, &admitted, set, info).await;
    }
    // A request a peer sent for a session held here is served from local sessions only, and
    // holds its places on that peer already; one another set sent here is this node's to route
    // and count like any other.
    let from_peer = from_peer && !from_set;
    let mut admitted = admitted;
    if !from_peer {
        ctx.hold_places(&mut admitted)?;
    }
    let resp = match &admitted.tunnel {
        None => {
            ctx.forwarder
                .forward(req, &admitted, info, &ctx.metrics.upstream_seconds)
                .await?
        }
        Some(Via::Client(client_id)) => {
            ctx.tunnels
                .forward(
                    req,
                    &admitted,
                    client_id.clone(),
                    info,
                    from_peer,
                    &ctx.metrics,
                    None,
                )
                .await?
        }
        Some(Via::Group(group)) => to_group(ctx, req, &admitted, group, info, from_peer).await?,
    };
    Ok(meter_response(ctx, resp, &route, admitted.permit))
}

/// Sends a request for a group target to the member the group's rule picks; a bodiless request
/// that member could not take (it had no session after all: nothing was sent), or an idempotent
/// bodiless one whose stream failed with the member's session, goes to the next, up to
/// [`MAX_MEMBER_TRIES`](super::tunnel::group::MAX_MEMBER_TRIES) members.
async fn to_group(
    ctx: &Ctx,
    mut req: Request<ProxyBody>,
    admitted: &policy::Admitted,
    group: &super::route::GroupRoute,
    info: ClientInfo<'_>,
    from_peer: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let named = req
        .headers()
        .get(super::tunnel::peer_stream::CLIENT_HEADER)
        .filter(|_| from_peer)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let replay = (!from_peer
        && hyper::body::Body::is_end_stream(req.body())
        && super::forward::upgrade_protocol(req.headers()).is_none())
    .then(|| {
        // What is sent again: the head (extensions stay with the first attempt).
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        head.into_parts().0
    });
    let mut tried: Vec<String> = Vec::new();
    loop {
        let member = ctx
            .tunnels
            .member(group, named.as_deref(), from_peer, &tried)
            .await?;
        let client_id = member.client_id.clone();
        // The member counts the request as in flight until its answer is read (or its
        // upgraded stream closes).
        let hold: super::tunnel::Hold = Some(Box::new(member.carrying));
        let sent = ctx
            .tunnels
            .forward(
                req,
                admitted,
                client_id.clone(),
                info,
                from_peer,
                &ctx.metrics,
                hold,
            )
            .await;
        let next = match &sent {
            // Nothing was sent.
            Err(ProxyError::TunnelNotConnected(_) | ProxyError::NotHeldHere(_)) => true,
            // The member's session died under the request (a member killed before its session
            // is declared dead): an idempotent request goes to the next member.
            Err(ProxyError::TunnelStream { .. }) => {
                replay.as_ref().is_some_and(|p| p.method.is_idempotent())
            }
            _ => false,
        };
        match (sent, &replay) {
            (Err(_), Some(parts))
                if next && tried.len() + 1 < super::tunnel::group::MAX_MEMBER_TRIES =>
            {
                ctx.tunnels.member_failed(&client_id);
                tried.push(client_id);
                req = Request::from_parts(parts.clone(), super::empty_body());
            }
            (sent, _) => return sent,
        }
    }
}

/// The response as the client gets it: its body metered, and `permit` (the request's places
/// under the isolation limits) held until the body is done.
fn meter_response(
    ctx: &Ctx,
    resp: Response<ProxyBody>,
    route: &Arc<super::route::Route>,
    permit: Option<super::limits::Permit>,
) -> Response<ProxyBody> {
    let (parts, body) = resp.into_parts();
    let idle = IdleBody::new(
        body,
        ctx.deadlines.upstream_read_idle,
        deadline::Kind::UpstreamRead,
        ctx.metrics.clone(),
    );
    let metered = Metered::new(idle, ctx.access.clone(), route.clone(), Side::Response).boxed();
    let body = match permit {
        Some(p) => super::tunnel::Holding::new(metered, p).boxed(),
        None => metered,
    };
    Response::from_parts(parts, body)
}
