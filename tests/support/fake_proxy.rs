//! The proxy's side of a tunnel session, minimal, for agent tests (tests/tunnel_agent.rs): a TLS
//! 1.3 listener (or plain TCP) on loopback that authenticates with `tunnox::tunnel::handshake`,
//! then drives the agent's HTTP/2 server as the client (control stream first, then requests);
//! and local upstreams that count their connections. Certificates: `super::tunnel::Pki`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

use super::tunnel::Pki;

use tunnox::tunnel::frame::{Decoder, Frame};
use tunnox::tunnel::handshake;
use tunnox::tunnel::msg::{self, AuthErrorCode, AuthOk, Kind, Message};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed()
}

/// What one in-test proxy saw.
#[derive(Default)]
pub struct Seen {
    /// Every Auth received: when, and whether it was accepted.
    pub auths: Vec<(Instant, bool)>,
    /// Control frame kinds received from agents, in order.
    pub control: Vec<u8>,
    /// Leaving reasons received.
    pub leaving: Vec<String>,
}

/// One authenticated session on the in-test proxy.
pub struct ProxySession {
    pub send: SendRequest<Body>,
    /// Frames to the agent on the control stream.
    pub control: mpsc::Sender<Frame>,
}

pub struct FakeProxy {
    pub addr: String,
    pub seen: Arc<Mutex<Seen>>,
    sessions: Arc<Mutex<Vec<ProxySession>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct ProxyOptions {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub token: String,
    pub heartbeat_ms: u64,
    pub peers: Vec<String>,
    /// Sends no heartbeats (the agent must declare the session dead).
    pub silent: bool,
    /// Refuses every session with `AuthError draining`.
    pub draining: bool,
}

impl FakeProxy {
    pub async fn start(opts: ProxyOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let opts = Arc::new(opts);
        let (s2, ss2) = (seen.clone(), sessions.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                n += 1;
                let (seen, sessions, opts) = (s2.clone(), ss2.clone(), opts.clone());
                tokio::spawn(async move {
                    match &opts.tls {
                        Some(cfg) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                serve(tls, n, seen, sessions, opts).await;
                            }
                        }
                        None => serve(tcp, n, seen, sessions, opts).await,
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            sessions,
            task,
        }
    }

    /// Waits for the `n`th session (1-based) and returns its request sender and control sender.
    pub async fn session(
        &self,
        n: usize,
        within: Duration,
    ) -> (SendRequest<Body>, mpsc::Sender<Frame>) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.sessions.lock().unwrap().get(n - 1) {
                return (s.send.clone(), s.control.clone());
            }
            assert!(
                Instant::now() < deadline,
                "no session {n} on {} within {within:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }
}

async fn serve<S>(
    mut io: S,
    n: u64,
    seen: Arc<Mutex<Seen>>,
    sessions: Arc<Mutex<Vec<ProxySession>>>,
    opts: Arc<ProxyOptions>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(auth) = handshake::read_auth(&mut io, Duration::from_secs(5)).await else {
        return;
    };
    let good = auth.token == opts.token && !opts.draining;
    seen.lock().unwrap().auths.push((Instant::now(), good));
    if opts.draining {
        let _ = handshake::refuse(
            &mut io,
            AuthErrorCode::Draining,
            "this proxy is draining",
            None,
        )
        .await;
        return;
    }
    if !good {
        let _ = handshake::refuse(
            &mut io,
            AuthErrorCode::BadCredentials,
            "unknown client or wrong token",
            None,
        )
        .await;
        return;
    }
    let ok = AuthOk {
        session_id: format!("s{n}"),
        node_id: "test-node".into(),
        heartbeat_interval_ms: opts.heartbeat_ms,
        max_streams: 100,
        peers: opts.peers.clone(),
    };
    if handshake::accept(&mut io, &ok).await.is_err() {
        return;
    }
    let Ok((mut send, conn)) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .adaptive_window(true)
        .handshake::<_, Body>(TokioIo::new(io))
        .await
    else {
        return;
    };
    tokio::spawn(conn);
    // The control stream: our frames out on the request body, the agent's in on the response.
    let (tx, rx) = mpsc::channel::<Frame>(16);
    let out = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| {
            (
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                    f.to_bytes(),
                )),
                rx,
            )
        })
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://agent{}", tunnox::tunnel::CONTROL_PATH))
        .header(tunnox::tunnel::CONTROL_HEADER, "1")
        .body(StreamBody::new(out).boxed())
        .unwrap();
    let Ok(resp) = send.send_request(req).await else {
        return;
    };
    // Proxy heartbeats.
    let hb = tx.clone();
    let silent = opts.silent;
    let interval = Duration::from_millis(opts.heartbeat_ms);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if silent {
                continue;
            }
            let f = msg::Heartbeat {
                timestamp: 0,
                status: "ok".into(),
            }
            .to_frame();
            if hb.send(f).await.is_err() {
                return;
            }
        }
    });
    sessions
        .lock()
        .unwrap()
        .push(ProxySession { send, control: tx });
    let mut body = resp.into_body();
    let mut dec = Decoder::default();
    while let Some(Ok(f)) = body.frame().await {
        let Ok(data) = f.into_data() else { continue };
        dec.push(&data);
        while let Ok(Some(frame)) = dec.next_frame() {
            let mut s = seen.lock().unwrap();
            s.control.push(frame.kind);
            if frame.kind == Kind::Leaving as u8
                && let Ok(l) = msg::decode::<msg::Leaving>(&frame)
            {
                s.leaving.push(l.reason);
            }
        }
    }
}

pub fn server_tls(certs: &Pki) -> Arc<rustls::ServerConfig> {
    Arc::new(tunnox::tunnel::tls::server_config(&certs.cert, &certs.key).unwrap())
}

/// A local HTTP/1.1 upstream: echoes the request body; `/slow` answers after a delay; counts
/// connections; answers with `x-seen-host` (the Host it received).
pub struct Upstream {
    pub addr: String,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let host = req.headers().get("host").cloned();
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_millis(1500)).await;
                            }
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut r = http::Response::new(http_body_util::Full::new(body));
                            if let Some(h) = host {
                                r.headers_mut().insert("x-seen-host", h);
                            }
                            Ok::<_, hyper::Error>(r)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    /// A WebSocket-like upstream: answers an `Upgrade: websocket` request with 101 and a fixed
    /// `Sec-WebSocket-Accept`, then echoes bytes. Refuses (400) a request without a key.
    pub async fn websocket_echo() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                        if tcp.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if !(text.contains("upgrade: websocket") && text.contains("sec-websocket-key:"))
                    {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: test-accept\r\n\r\n")
                        .await;
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }
}

/// Control frames of `kind` seen by `proxy`.
pub fn count_kind(seen: &Arc<Mutex<Seen>>, kind: Kind) -> usize {
    seen.lock()
        .unwrap()
        .control
        .iter()
        .filter(|k| **k == kind as u8)
        .count()
}
