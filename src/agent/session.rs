//! One session: dial a proxy (TCP, TLS 1.3 or plain with `insecure`), authenticate, then serve
//! HTTP/2 on the stream — the proxy's first stream is the control stream (heartbeats both ways,
//! `ServerShutdown` in, `Leaving` out), every other one a forwarded request. A [`Session`] is
//! handed to the slot supervisor only once it is up (AuthOk + control stream open).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::forward::{Body, BoxError, Forwarder, empty};
use super::metrics::AgentMetrics;
use crate::config::agent::split_host_port;
use crate::tunnel::config::ConfigPush;
use crate::tunnel::frame::{Decoder, Frame};
use crate::tunnel::handshake::{self, HandshakeError};
use crate::tunnel::msg::{
    self, Auth, AuthErrorCode, AuthOk, Heartbeat, Kind, Leaving, ServerShutdown,
};
use crate::tunnel::{CONTROL_HEADER, CONTROL_PATH, HEARTBEAT_MISSES, TARGET_HEADER};

/// Most header bytes one forwarded stream may carry (the proxy's own request-head limit is 64 KiB).
const MAX_HEADER_LIST: u32 = 128 * 1024;

/// The byte stream a session runs on (TLS or plain TCP; a QUIC stream could be another).
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// Everything sessions share, fixed at start.
pub struct Dialer {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub server_name: Option<String>,
    pub client_id: String,
    pub token: String,
    pub instance: String,
    pub connect_timeout: Duration,
    pub max_streams: u32,
    pub forwarder: Arc<Forwarder>,
    /// The configuration proxies push (answered on the control stream).
    pub pushed: Arc<super::pushed::Pushed>,
    pub metrics: AgentMetrics,
}

/// Why a session could not be opened. Each is one log line naming the address and the cause.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("server {addr} unreachable: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("server {addr} unreachable: no connection within {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("bad certificate from server {addr}: {reason}")]
    Certificate { addr: String, reason: String },
    #[error("TLS with server {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("server {addr} refused the session of client {client_id:?}: {message} ({})", code.label())]
    Refused {
        addr: String,
        client_id: String,
        code: AuthErrorCode,
        message: String,
        /// Where the proxy says to dial instead (`other_set`).
        reconnect_to: Option<String>,
    },
    #[error("server {addr} does not speak the tunnox tunnel protocol: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("server {addr}: {what} within {after:?}")]
    Timeout {
        addr: String,
        what: &'static str,
        after: Duration,
    },
    #[error("server name {name:?} for {addr} is not a DNS name or IP address")]
    ServerName { addr: String, name: String },
}

impl DialError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } | Self::ConnectTimeout { .. } => "unreachable",
            Self::Certificate { .. } => "certificate",
            Self::Tls { .. } => "tls",
            Self::Refused { code, .. } => code.label(),
            Self::Protocol { .. } => "protocol",
            Self::Timeout { .. } => "timeout",
            Self::ServerName { .. } => "server_name",
        }
    }
}

/// What ends a live session, as its supervisor learns it.
#[derive(Debug)]
pub enum Event {
    Shutdown(ServerShutdown),
    Dead(Dead),
}

#[derive(Debug, Clone)]
pub enum Dead {
    /// Nothing heard on the control stream for two heartbeat intervals.
    Silent,
    /// The connection or the control stream ended.
    Closed(String),
    /// The proxy sent something that is not the protocol.
    Protocol(String),
}

impl Dead {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Silent => "heartbeat_timeout",
            Self::Closed(_) => "connection_lost",
            Self::Protocol(_) => "protocol_error",
        }
    }
}

impl std::fmt::Display for Dead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent => f.write_str("no heartbeat for two intervals"),
            Self::Closed(why) => write!(f, "connection closed: {why}"),
            Self::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

/// A session that is up.
pub struct Session {
    pub addr: String,
    pub ok: AuthOk,
    pub since: Instant,
    pub events: mpsc::Receiver<Event>,
    control: Option<mpsc::Sender<Frame>>,
    heartbeat: tokio::task::JoinHandle<()>,
    shutdown: Option<oneshot::Sender<Duration>>,
    conn: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Retires the session: `Leaving` on the control stream, then GOAWAY — streams in flight
    /// finish within `grace`, then the connection closes.
    pub async fn retire(mut self, reason: &str, grace: Duration) {
        self.heartbeat.abort();
        if let Some(tx) = self.control.take() {
            let leaving = Leaving {
                reason: reason.to_string(),
            };
            let _ = tx.send(msg::Message::to_frame(&leaving)).await;
            // Dropping the last sender ends the control response after `Leaving`.
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(grace);
        }
        let bound = grace + Duration::from_secs(1);
        if tokio::time::timeout(bound, &mut self.conn).await.is_err() {
            self.conn.abort();
        }
    }

    /// Drops a dead session at once.
    pub fn abort(self) {
        self.heartbeat.abort();
        self.conn.abort();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn heartbeat_interval(ms: u64) -> Duration {
    // A hostile or broken proxy could ask for 0 (a busy loop) or a day (no liveness).
    Duration::from_millis(ms.clamp(100, 60_000))
}

/// What the control-stream handler needs, taken by the first control stream only.
struct ControlSetup {
    outgoing: mpsc::Receiver<Frame>,
    /// Frames back to the proxy (a `ConfigAck`). Weak: the control response ends when the
    /// session's own sender is dropped (after `Leaving`), which this must not prevent.
    reply: mpsc::WeakSender<Frame>,
    pushed: Arc<super::pushed::Pushed>,
    events: mpsc::Sender<Event>,
    opened: oneshot::Sender<()>,
    interval: Duration,
}

impl Dialer {
    async fn transport(&self, addr: &str) -> Result<Box<dyn Transport>, DialError> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Err(_) => {
                    return Err(DialError::ConnectTimeout {
                        addr: addr.into(),
                        after: self.connect_timeout,
                    });
                }
                Ok(Err(source)) => {
                    return Err(DialError::Unreachable {
                        addr: addr.into(),
                        source,
                    });
                }
                Ok(Ok(s)) => s,
            };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let host = self
            .server_name
            .clone()
            .or_else(|| split_host_port(addr).map(|(h, _)| h.to_string()))
            .unwrap_or_default();
        let name = ServerName::try_from(host.clone()).map_err(|_| DialError::ServerName {
            addr: addr.into(),
            name: host,
        })?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        match tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp)).await {
            Err(_) => Err(DialError::Timeout {
                addr: addr.into(),
                what: "no TLS handshake",
                after: self.connect_timeout,
            }),
            Ok(Err(e)) => {
                let rustls_err = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                Err(match rustls_err {
                    Some(rustls::Error::InvalidCertificate(c)) => DialError::Certificate {
                        addr: addr.into(),
                        reason: format!("{c:?}"),
                    },
                    Some(other) => DialError::Tls {
                        addr: addr.into(),
                        reason: other.to_string(),
                    },
                    None => DialError::Tls {
                        addr: addr.into(),
                        reason: e.to_string(),
                    },
                })
            }
            Ok(Ok(s)) => Ok(Box::new(s)),
        }
    }

    /// Dials `addr` as slot `slot` and returns once the session is up.
    /// Opens a session on `addr`. `unreachable`: addresses proxies sent it to this round that
    /// it could not reach.
    pub async fn open(
        &self,
        addr: &str,
        slot: u32,
        unreachable: &[String],
    ) -> Result<Session, DialError> {
        let mut io = self.transport(addr).await?;
        let auth = Auth {
            client_id: self.client_id.clone(),
            token: self.token.clone(),
            instance: self.instance.clone(),
            slot,
            version: env!("CARGO_PKG_VERSION").to_string(),
            unreachable: unreachable.to_vec(),
            max_streams: Some(self.max_streams),
        };
        let ok = handshake::agent_hello(&mut io, &auth, self.connect_timeout)
            .await
            .map_err(|e| match e {
                HandshakeError::Refused(r) => DialError::Refused {
                    addr: addr.into(),
                    client_id: self.client_id.clone(),
                    code: r.code,
                    message: r.message,
                    reconnect_to: r.reconnect_to,
                },
                HandshakeError::Timeout(after) => DialError::Timeout {
                    addr: addr.into(),
                    what: "no answer to authentication",
                    after,
                },
                HandshakeError::Io(e) => DialError::Unreachable {
                    addr: addr.into(),
                    source: e,
                },
                other => DialError::Protocol {
                    addr: addr.into(),
                    reason: other.to_string(),
                },
            })?;
        let interval = heartbeat_interval(ok.heartbeat_interval_ms);
        let (out_tx, out_rx) = mpsc::channel::<Frame>(16);
        let (ev_tx, ev_rx) = mpsc::channel::<Event>(4);
        let (opened_tx, opened_rx) = oneshot::channel();
        let setup = Arc::new(Mutex::new(Some(ControlSetup {
            outgoing: out_rx,
            reply: out_tx.downgrade(),
            pushed: self.pushed.clone(),
            events: ev_tx.clone(),
            opened: opened_tx,
            interval,
        })));
        let forwarder = self.forwarder.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let setup = setup.clone();
            let forwarder = forwarder.clone();
            async move {
                let resp = if is_control(&req) {
                    let taken = setup.lock().map(|mut s| s.take()).unwrap_or(None);
                    match taken {
                        Some(s) => control(req, s),
                        None => {
                            let mut r = Response::new(empty());
                            *r.status_mut() = StatusCode::CONFLICT;
                            r
                        }
                    }
                } else {
                    forwarder.handle(req).await
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(crate::tunnel::H2_STREAM_WINDOW)
            .initial_connection_window_size(crate::tunnel::H2_CONNECTION_WINDOW)
            .max_frame_size(crate::tunnel::H2_MAX_FRAME)
            .enable_connect_protocol()
            .max_concurrent_streams(self.max_streams)
            // hyper's default is 16 MiB of headers per stream: far more than a request needs.
            .max_header_list_size(MAX_HEADER_LIST)
            .timer(hyper_util::rt::TokioTimer::new());
        let (stop_tx, stop_rx) = oneshot::channel::<Duration>();
        let conn_events = ev_tx.clone();
        let conn = tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut stop_rx = stop_rx;
            tokio::select! {
                r = conn.as_mut() => {
                    let why = match r {
                        Ok(()) => Dead::Closed("the server ended the connection".into()),
                        Err(e) if is_protocol(&e) => Dead::Protocol(e.to_string()),
                        Err(e) => Dead::Closed(e.to_string()),
                    };
                    let _ = conn_events.send(Event::Dead(why)).await;
                }
                grace = &mut stop_rx => {
                    let grace = grace.unwrap_or(Duration::ZERO);
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(grace, conn).await;
                }
            }
        });
        // Up means the proxy opened the control stream; it must, within two intervals.
        let wait = interval * HEARTBEAT_MISSES;
        let reason = match tokio::time::timeout(wait, opened_rx).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some("the connection ended before the control stream opened".to_string()),
            Err(_) => Some(format!("no control stream within {wait:?} of AuthOk")),
        };
        if let Some(reason) = reason {
            conn.abort();
            return Err(DialError::Protocol {
                addr: addr.into(),
                reason,
            });
        }
        tokio::spawn(super::health::report(
            out_tx.downgrade(),
            self.pushed.health(),
        ));
        let hb_tx = out_tx.clone();
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let hb = Heartbeat {
                    timestamp: chrono::Utc::now().timestamp(),
                    status: "ok".into(),
                };
                if hb_tx.send(msg::Message::to_frame(&hb)).await.is_err() {
                    return;
                }
            }
        });
        drop(ev_tx);
        Ok(Session {
            addr: addr.to_string(),
            ok,
            since: Instant::now(),
            events: ev_rx,
            control: Some(out_tx),
            heartbeat,
            shutdown: Some(stop_tx),
            conn,
        })
    }
}

fn is_protocol(e: &hyper::Error) -> bool {
    e.is_parse() || e.to_string().contains("PROTOCOL_ERROR") || e.to_string().contains("preface")
}

fn is_control(req: &Request<Incoming>) -> bool {
    req.method() == Method::POST
        && req.uri().path() == CONTROL_PATH
        && req.headers().contains_key(CONTROL_HEADER)
        && !req.headers().contains_key(TARGET_HEADER)
}

/// Serves the control stream: frames in from the request body, frames out on the response.
fn control(req: Request<Incoming>, setup: ControlSetup) -> Response<Body> {
    let ControlSetup {
        outgoing,
        reply,
        pushed,
        events,
        opened,
        interval,
    } = setup;
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let out = futures::stream::unfold((outgoing, Some(done_tx)), |(mut rx, mut done)| async move {
        match rx.recv().await {
            Some(f) => Some((
                Ok::<_, BoxError>(hyper::body::Frame::data(f.to_bytes())),
                (rx, done),
            )),
            None => {
                // Our side is finished (`Leaving` sent): the reader may stop.
                if let Some(d) = done.take() {
                    let _ = d.send(());
                }
                None
            }
        }
    });
    let body: Body = BodyExt::boxed(StreamBody::new(out));
    let control = Control {
        events,
        reply,
        pushed,
        interval,
    };
    tokio::spawn(read_control(req.into_body(), control, done_rx));
    let _ = opened.send(());
    Response::new(body)
}

/// What the control stream's reader answers with.
struct Control {
    events: mpsc::Sender<Event>,
    reply: mpsc::WeakSender<Frame>,
    pushed: Arc<super::pushed::Pushed>,
    interval: Duration,
}

async fn read_control(mut body: Incoming, control: Control, mut done: oneshot::Receiver<()>) {
    let Control {
        events,
        reply,
        pushed,
        interval,
    } = control;
    let mut decoder = Decoder::default();
    let silence = interval * HEARTBEAT_MISSES;
    // Only whole frames count as heard: a trickle of partial bytes does not keep a session alive.
    let mut deadline = tokio::time::Instant::now() + silence;
    let dead = loop {
        let next = tokio::select! {
            _ = &mut done => return,
            n = tokio::time::timeout_at(deadline, body.frame()) => n,
        };
        let bytes: Bytes = match next {
            Err(_) => break Dead::Silent,
            Ok(None) => break Dead::Closed("the control stream ended".into()),
            Ok(Some(Err(e))) => break Dead::Closed(format!("control stream: {e}")),
            Ok(Some(Ok(f))) => match f.into_data() {
                Ok(b) => b,
                Err(_) => continue,
            },
        };
        decoder.push(&bytes);
        let mut bad = None;
        loop {
            let frame = match decoder.next_frame() {
                Ok(None) => break,
                Err(e) => {
                    bad = Some(Dead::Protocol(e.to_string()));
                    break;
                }
                Ok(Some(frame)) => frame,
            };
            deadline = tokio::time::Instant::now() + silence;
            match Kind::from_u8(frame.kind) {
                Some(Kind::ServerShutdown) => match msg::decode::<ServerShutdown>(&frame) {
                    Ok(s) => {
                        let _ = events.send(Event::Shutdown(s)).await;
                    }
                    Err(e) => {
                        bad = Some(Dead::Protocol(e.to_string()));
                        break;
                    }
                },
                Some(Kind::Heartbeat) => {}
                Some(Kind::ConfigPush) => {
                    let applied = msg::decode::<ConfigPush>(&frame)
                        .map_err(|e| e.to_string())
                        .and_then(|push| pushed.apply(&push));
                    match applied {
                        // Dropped when the session is retiring: the next session is pushed anew.
                        Ok(ack) => {
                            if let Some(tx) = reply.upgrade() {
                                // Waits for room (a full queue would lose the answer and the
                                // proxy would not push the same hash again), but not forever.
                                let frame = msg::Message::to_frame(&ack);
                                let _ =
                                    tokio::time::timeout(Duration::from_secs(2), tx.send(frame))
                                        .await;
                            }
                        }
                        Err(e) => {
                            bad = Some(Dead::Protocol(e));
                            break;
                        }
                    }
                }
                // Newer types: heard, ignored.
                other => {
                    tracing::debug!(kind = frame.kind, known = ?other.map(Kind::name), "control frame ignored")
                }
            }
        }
        if let Some(d) = bad {
            break d;
        }
    };
    let _ = events.send(Event::Dead(dead)).await;
}
