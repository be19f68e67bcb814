//! Forwarded streams: one HTTP/2 stream from the proxy → the local service its `tunnox-target`
//! names, when the allow-list holds it. Plain requests go out as HTTP/1.1 on a keep-alive pool;
//! extended CONNECT (`:protocol`, e.g. WebSocket) becomes an HTTP/1.1 upgrade joined to the
//! stream; a plain CONNECT is a raw TCP connection. Responses the agent makes itself carry
//! `tunnox-error`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::IntCounter;

use super::allow::{AllowList, Refusal};
use super::metrics::AgentMetrics;
use crate::tunnel::udp::{self, Datagrams, TRANSPORT_HEADER};
use crate::tunnel::{CONTROL_HEADER, ERROR_HEADER, TARGET_HEADER};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the agent sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// What became of a forwarded stream (`tunnox_agent_streams_total{outcome}`, `tunnox-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The local service answered (any status).
    Ok,
    /// An upgrade or CONNECT became a byte pipe.
    Upgraded,
    Refused(Refusal),
    /// The local service could not be reached.
    Connect,
    /// It did not answer in time.
    Timeout,
    /// It broke the exchange after connecting.
    Upstream,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Upgraded => "upgraded",
            Self::Refused(r) => r.label(),
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Upstream => "upstream",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Hop-by-hop headers (`crate::hop`) and the tunnel's own.
fn strip(headers: &mut HeaderMap) {
    crate::hop::strip(headers);
    for h in [
        &TARGET_HEADER,
        &CONTROL_HEADER,
        &ERROR_HEADER,
        &TRANSPORT_HEADER,
    ] {
        headers.remove(h);
    }
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A response the agent made: `status`, `tunnox-error: label`, a one-line body.
pub fn agent_error(outcome: Outcome) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("tunnox agent: {}\n", outcome.label())))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = outcome.status();
    r.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(outcome.label()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub struct Forwarder {
    allow: AllowList,
    client: Client<HttpConnector, Body>,
    connect_timeout: Duration,
    response_timeout: Duration,
    metrics: AgentMetrics,
}

fn counted<B>(body: B, counter: IntCounter) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_frame(move |f| {
        if let Some(d) = f.data_ref() {
            counter.inc_by(d.len() as u64);
        }
        f
    })
    .map_err(Into::into)
    .boxed()
}

/// Which of a failed request's causes to report: a connect that timed out, a connect refused,
/// or a break after connecting.
fn classify(e: &hyper_util::client::legacy::Error) -> Outcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut timed_out = false;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        timed_out |= s.to_string().contains("timed out");
        source = s.source();
    }
    match (e.is_connect(), timed_out) {
        (true, true) => Outcome::Timeout,
        (true, false) => Outcome::Connect,
        _ => Outcome::Upstream,
    }
}

/// `Host` as the proxy set it: the header, else the request's authority.
fn host_of(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

impl Forwarder {
    pub fn new(
        allow: AllowList,
        connect_timeout: Duration,
        response_timeout: Duration,
        metrics: AgentMetrics,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(http);
        Self {
            allow,
            client,
            connect_timeout,
            response_timeout,
            metrics,
        }
    }

    /// Serves one forwarded stream; never fails (errors become agent-made responses).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let target = req
            .headers()
            .get(TARGET_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (outcome, resp) = match self.allow.check(target.as_deref()) {
            Err(r) => {
                tracing::warn!(
                    target = target.as_deref().unwrap_or("<none>"),
                    error = r.label(),
                    "refused a forwarded stream: target not in agent.allow"
                );
                (Outcome::Refused(r), agent_error(Outcome::Refused(r)))
            }
            Ok(dial) => {
                let dial = dial.to_string();
                if req.method() == Method::CONNECT && is_udp(&req) {
                    self.udp(req, dial).await
                } else if req.method() == Method::CONNECT {
                    self.connect(req, dial).await
                } else {
                    self.http(req, dial).await
                }
            }
        };
        self.metrics
            .streams
            .with_label_values(&[outcome.label()])
            .inc();
        resp
    }

    async fn http(&self, req: Request<Incoming>, dial: String) -> (Outcome, Response<Body>) {
        let (mut parts, body) = req.into_parts();
        let host = host_of(&parts);
        strip(&mut parts.headers);
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match format!("http://{dial}{pq}").parse() {
            Ok(u) => u,
            Err(_) => {
                return (
                    Outcome::Refused(Refusal::BadTarget),
                    agent_error(Outcome::Refused(Refusal::BadTarget)),
                );
            }
        };
        parts.version = Version::HTTP_11;
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
        let body = counted(body, self.metrics.bytes.with_label_values(&["in"]));
        let sent = self.client.request(Request::from_parts(parts, body));
        let outcome = match tokio::time::timeout(self.response_timeout, sent).await {
            Err(_) => Outcome::Timeout,
            Ok(Err(e)) => {
                let o = classify(&e);
                tracing::warn!(target = %dial, error = %e, outcome = o.label(), "local service failed");
                o
            }
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip(&mut parts.headers);
                parts.version = Version::HTTP_2;
                let body = counted(body, self.metrics.bytes.with_label_values(&["out"]));
                return (Outcome::Ok, Response::from_parts(parts, body));
            }
        };
        if outcome == Outcome::Timeout {
            tracing::warn!(target = %dial, "local service did not answer in time");
        }
        (outcome, agent_error(outcome))
    }

    async fn dial(&self, dial: &str) -> Result<tokio::net::TcpStream, Outcome> {
        match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(dial)).await
        {
            Err(_) => {
                tracing::warn!(target = %dial, "local service: connect timed out");
                Err(Outcome::Timeout)
            }
            Ok(Err(e)) => {
                tracing::warn!(target = %dial, error = %e, "local service: cannot connect");
                Err(Outcome::Connect)
            }
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }

    /// CONNECT: with `:protocol` an HTTP/1.1 upgrade, without a raw TCP stream.
    async fn connect(&self, mut req: Request<Incoming>, dial: String) -> (Outcome, Response<Body>) {
        let protocol = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .map(|p| p.as_str().to_string());
        let h2_side = hyper::upgrade::on(&mut req);
        let tcp = match self.dial(&dial).await {
            Ok(s) => s,
            Err(o) => return (o, agent_error(o)),
        };
        let Some(protocol) = protocol else {
            let bytes = self.metrics.bytes.clone();
            tokio::spawn(async move {
                match h2_side.await {
                    Ok(up) => join(TokioIo::new(up), tcp, &bytes).await,
                    Err(e) => tracing::debug!(error = %e, "CONNECT stream ended before it opened"),
                }
            });
            return (Outcome::Upgraded, Response::new(empty()));
        };
        let (parts, _) = req.into_parts();
        let host = host_of(&parts);
        let mut headers = parts.headers;
        strip(&mut headers);
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let mut local = Request::new(empty());
        *local.uri_mut() = match pq.parse() {
            Ok(u) => u,
            Err(_) => {
                return (
                    Outcome::Refused(Refusal::BadTarget),
                    agent_error(Outcome::Refused(Refusal::BadTarget)),
                );
            }
        };
        *local.headers_mut() = headers;
        let h = local.headers_mut();
        if let Some(host) = host {
            h.insert(header::HOST, host);
        }
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        match HeaderValue::from_str(&protocol) {
            Ok(v) => {
                h.insert(header::UPGRADE, v);
            }
            Err(_) => {
                return (
                    Outcome::Refused(Refusal::BadTarget),
                    agent_error(Outcome::Refused(Refusal::BadTarget)),
                );
            }
        }
        if protocol.eq_ignore_ascii_case("websocket") && !h.contains_key(header::SEC_WEBSOCKET_KEY)
        {
            // RFC 8441 streams carry no key; the local HTTP/1.1 service needs one.
            let key: [u8; 16] = rand::random();
            if let Ok(v) = HeaderValue::from_str(&base64(&key)) {
                h.insert(header::SEC_WEBSOCKET_KEY, v);
            }
            h.entry(header::SEC_WEBSOCKET_VERSION)
                .or_insert(HeaderValue::from_static("13"));
        }
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(target = %dial, error = %e, "local service: handshake failed");
                    return (Outcome::Upstream, agent_error(Outcome::Upstream));
                }
            };
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut resp = match tokio::time::timeout(self.response_timeout, sender.send_request(local))
            .await
        {
            Err(_) => return (Outcome::Timeout, agent_error(Outcome::Timeout)),
            Ok(Err(e)) => {
                tracing::warn!(target = %dial, error = %e, "local service: upgrade request failed");
                return (Outcome::Upstream, agent_error(Outcome::Upstream));
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused the upgrade: its answer goes back as it is.
            let (mut parts, body) = resp.into_parts();
            strip(&mut parts.headers);
            parts.version = Version::HTTP_2;
            let body = counted(body, self.metrics.bytes.with_label_values(&["out"]));
            return (Outcome::Ok, Response::from_parts(parts, body));
        }
        let local_side = hyper::upgrade::on(&mut resp);
        let mut headers = resp.headers().clone();
        strip(&mut headers);
        let bytes = self.metrics.bytes.clone();
        tokio::spawn(async move {
            let _keep = sender;
            match tokio::try_join!(h2_side, local_side) {
                Ok((a, b)) => join(TokioIo::new(a), TokioIo::new(b), &bytes).await,
                Err(e) => tracing::debug!(error = %e, "upgrade ended before it opened"),
            }
        });
        let mut ok = Response::new(empty());
        *ok.headers_mut() = headers;
        (Outcome::Upgraded, ok)
    }
}

/// A plain CONNECT asking for a UDP flow (`tunnox-transport: udp`).
fn is_udp(req: &Request<Incoming>) -> bool {
    req.extensions().get::<hyper::ext::Protocol>().is_none()
        && req
            .headers()
            .get(TRANSPORT_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"udp"))
}

/// The local end of a UDP flow: a socket connected to the target.
struct LocalUdp {
    socket: tokio::net::UdpSocket,
    buf: Vec<u8>,
}

impl Datagrams for LocalUdp {
    async fn recv(&mut self) -> Option<Bytes> {
        loop {
            match self.socket.recv(&mut self.buf).await {
                Ok(n) => return Some(Bytes::copy_from_slice(&self.buf[..n])),
                // An ICMP "port unreachable" for an earlier datagram: the flow goes on.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(_) => return None,
            }
        }
    }

    async fn send(&mut self, datagram: Bytes) {
        let _ = self.socket.send(&datagram).await;
    }
}

/// How long the agent keeps a UDP flow with no datagram: the proxy ends flows at the tunnel's
/// own idle time; this only bounds a flow whose proxy side vanished without closing it.
const UDP_IDLE_CAP: Duration = Duration::from_secs(24 * 3600);

impl Forwarder {
    /// A UDP flow: a socket connected to the target, datagrams framed on the stream.
    async fn udp(&self, mut req: Request<Incoming>, dial: String) -> (Outcome, Response<Body>) {
        let h2_side = hyper::upgrade::on(&mut req);
        let addr = match tokio::net::lookup_host(&dial).await.map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            _ => {
                tracing::warn!(target = %dial, "local UDP service: cannot resolve");
                return (Outcome::Connect, agent_error(Outcome::Connect));
            }
        };
        let any: std::net::SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = match tokio::net::UdpSocket::bind(any).await {
            Ok(s) if s.connect(addr).await.is_ok() => s,
            _ => {
                tracing::warn!(target = %dial, "local UDP service: cannot open a socket to it");
                return (Outcome::Connect, agent_error(Outcome::Connect));
            }
        };
        let bytes = self.metrics.bytes.clone();
        tokio::spawn(async move {
            let up = match h2_side.await {
                Ok(up) => up,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP stream ended before it opened");
                    return;
                }
            };
            let mut local = LocalUdp {
                socket,
                buf: vec![0u8; udp::MAX_DATAGRAM],
            };
            let (end, carried) = udp::pump(TokioIo::new(up), &mut local, UDP_IDLE_CAP).await;
            bytes.with_label_values(&["in"]).inc_by(carried.from_tunnel);
            bytes.with_label_values(&["out"]).inc_by(carried.to_tunnel);
            tracing::debug!(target = %dial, ?end, "UDP flow ended");
        });
        (Outcome::Upgraded, Response::new(empty()))
    }
}

/// Copies both ways until both sides are done; counts the bytes.
async fn join<A, B>(mut tunnel: A, mut local: B, bytes: &prometheus::IntCounterVec)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match crate::tunnel::pipe(&mut tunnel, &mut local).await {
        Ok((to_local, to_tunnel)) => {
            bytes.with_label_values(&["in"]).inc_by(to_local);
            bytes.with_label_values(&["out"]).inc_by(to_tunnel);
        }
        Err(e) => tracing::debug!(error = %e, "byte pipe ended"),
    }
}

/// Standard base64 with padding (a WebSocket key is 16 random bytes).
fn base64(input: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (raw, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), want);
        }
    }

    #[test]
    fn agent_errors_carry_their_label() {
        for (o, status) in [
            (Outcome::Refused(Refusal::NotAllowed), 502),
            (Outcome::Refused(Refusal::BadTarget), 502),
            (Outcome::Connect, 502),
            (Outcome::Timeout, 504),
        ] {
            let r = agent_error(o);
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers()[&ERROR_HEADER], o.label());
        }
    }
}
