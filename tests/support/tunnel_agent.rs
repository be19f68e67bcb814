//! A minimal agent for proxy tests, built from `tunnox::tunnel`: TLS to the tunnel listener,
//! `agent_hello`, then an HTTP/2 server over the same stream that forwards each stream to the
//! loopback target named by `tunnox-target` (when allowed), answers extended CONNECT with the
//! target's `101` headers, and keeps the control stream alive with heartbeats. Also a throwaway
//! CA and certificate (openssl), and a loopback upstream for the tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tunnox::tunnel::frame::Decoder;
use tunnox::tunnel::handshake::{self, HandshakeError};
use tunnox::tunnel::msg::{self, Auth, AuthOk, Heartbeat, Kind, Leaving, Message, ServerShutdown};

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

/// `ca.pem`, `cert.pem`, `key.pem` for `localhost` / 127.0.0.1 in `dir`.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_certs(dir: &Path) -> Certs {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=tunnox test CA",
    ]);
    run(&a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
    Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    }
}

/// What the agent saw on its control stream.
#[derive(Default)]
pub struct Seen {
    pub shutdowns: Vec<ServerShutdown>,
    pub heartbeats: usize,
}

pub struct Agent {
    pub ok: AuthOk,
    pub seen: Arc<Mutex<Seen>>,
    /// Frames to send on the control stream (e.g. `Leaving`).
    pub control: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    pub fn leave(&self) {
        let _ = self.control.try_send(
            Leaving {
                reason: "test".into(),
            }
            .to_frame()
            .to_bytes(),
        );
    }

    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Dials the proxy's tunnel listener and serves until dropped. `allow`: targets it forwards to.
pub async fn connect(
    tunnel: SocketAddr,
    ca: &Path,
    client_id: &str,
    token: &str,
    instance: &str,
    allow: Vec<String>,
) -> Result<Agent, HandshakeError> {
    let tls = tunnox::tunnel::tls::client_config(Some(ca)).expect("client tls");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(tunnel).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut io = connector.connect(name, tcp).await?;
    let auth = Auth {
        client_id: client_id.into(),
        token: token.into(),
        instance: instance.into(),
        slot: 0,
        version: "test".into(),
        unreachable: Vec::new(),
        max_streams: None,
    };
    let ok = handshake::agent_hello(&mut io, &auth, Duration::from_secs(5)).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ctl_tx, ctl_rx) = mpsc::channel::<Bytes>(16);
    let ctl_rx = Arc::new(tokio::sync::Mutex::new(Some(ctl_rx)));
    let allow = Arc::new(allow);
    let heartbeat = Duration::from_millis(ok.heartbeat_interval_ms.max(100));
    let service = {
        let seen = seen.clone();
        let ctl_tx = ctl_tx.clone();
        service_fn(move |req: Request<Incoming>| {
            let seen = seen.clone();
            let ctl_rx = ctl_rx.clone();
            let ctl_tx = ctl_tx.clone();
            let allow = allow.clone();
            async move {
                let resp = if req.headers().contains_key(tunnox::tunnel::CONTROL_HEADER) {
                    control(req, seen, ctl_rx, ctl_tx, heartbeat).await
                } else {
                    forward(req, &allow).await
                };
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let task = tokio::spawn(async move {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.enable_connect_protocol().adaptive_window(true);
        let _ = b.serve_connection(TokioIo::new(io), service).await;
    });
    Ok(Agent {
        ok,
        seen,
        control: ctl_tx,
        task,
    })
}

async fn control(
    req: Request<Incoming>,
    seen: Arc<Mutex<Seen>>,
    rx: Arc<tokio::sync::Mutex<Option<mpsc::Receiver<Bytes>>>>,
    tx: mpsc::Sender<Bytes>,
    heartbeat: Duration,
) -> Response<Body> {
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut d = Decoder::default();
        while let Some(Ok(f)) = body.frame().await {
            let Ok(data) = f.into_data() else { continue };
            d.push(&data);
            while let Ok(Some(frame)) = d.next_frame() {
                let mut s = seen.lock().unwrap();
                match Kind::from_u8(frame.kind) {
                    Some(Kind::Heartbeat) => s.heartbeats += 1,
                    Some(Kind::ServerShutdown) => s
                        .shutdowns
                        .push(msg::decode::<ServerShutdown>(&frame).unwrap()),
                    _ => {}
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let hb = Heartbeat {
                timestamp: 0,
                status: "ok".into(),
            };
            if tx.send(hb.to_frame().to_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(heartbeat).await;
        }
    });
    let rx = rx.lock().await.take().expect("one control stream");
    let out = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok(hyper::body::Frame::data(b)), rx))
    });
    Response::new(StreamBody::new(out).boxed())
}

fn agent_error(label: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::BAD_GATEWAY)
        .header(tunnox::tunnel::ERROR_HEADER, label)
        .body(full(label))
        .unwrap()
}

async fn forward(mut req: Request<Incoming>, allow: &[String]) -> Response<Body> {
    let Some(target) = req
        .headers_mut()
        .remove(tunnox::tunnel::TARGET_HEADER)
        .and_then(|v| v.to_str().ok().map(str::to_string))
    else {
        return agent_error("bad_target");
    };
    if !allow.contains(&target) {
        return agent_error("not_allowed");
    }
    let Ok(tcp) = TcpStream::connect(&target).await else {
        return agent_error("connect");
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or("/".into());
    if req.method() == http::Method::CONNECT {
        // Extended CONNECT: an HTTP/1.1 upgrade to the target; its 101 headers back as 200.
        let proto = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let mut up = Request::get(path).header("host", host);
        for (k, v) in req.headers() {
            up = up.header(k, v);
        }
        let up = up
            .header("connection", "upgrade")
            .header("upgrade", proto)
            .body(full(""))
            .unwrap();
        let mut resp = send.send_request(up).await.unwrap();
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return agent_error("connect");
        }
        let mut out = Response::builder().status(200);
        for (k, v) in resp.headers() {
            if k != "connection" && k != "upgrade" {
                out = out.header(k, v);
            }
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let downstream = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let (Ok(a), Ok(b)) = (upstream.await, downstream.await) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
        });
        return out.body(full("")).unwrap();
    }
    let (mut parts, body) = req.into_parts();
    parts.uri = path.parse().unwrap();
    parts.version = http::Version::HTTP_11;
    if !parts.headers.contains_key("host") {
        parts.headers.insert("host", host.parse().unwrap());
    }
    let out = Request::from_parts(parts, body.map_err(Into::into).boxed());
    match send.send_request(out).await {
        Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
        Err(_) => agent_error("connect"),
    }
}

/// A loopback upstream: `/echo` streams the request body back (and reports what it was sent
/// in `x-got-*` headers), `/big?n=` answers n bytes, an `Upgrade` is accepted (101) and echoed.
pub async fn upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let h = req.headers().clone();
                    let got = |k: &str| {
                        h.get_all(k)
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .collect::<Vec<_>>()
                            .join("|")
                    };
                    if h.contains_key("upgrade") {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(u) = on.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(u));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let resp = Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .header(
                                "sec-websocket-accept",
                                format!("for-{}", got("sec-websocket-key")),
                            )
                            .body(full(""))
                            .unwrap();
                        return Ok::<_, Infallible>(resp);
                    }
                    let mut b = Response::builder()
                        .header("x-got-host", got("host"))
                        .header("x-got-xff", got("x-forwarded-for"))
                        .header("x-got-hops", got("tunnox-hops"))
                        .header(
                            "x-got-tunnox",
                            format!(
                                "{}{}{}",
                                got("tunnox-target"),
                                got("tunnox-node"),
                                got("tunnox-control")
                            ),
                        )
                        .header("x-got-env", got("x-env"));
                    if req.uri().path() == "/big" {
                        let n: usize = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("n="))
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        b = b.header("content-length", n);
                        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                        return Ok(b.body(full(data)).unwrap());
                    }
                    let body: Body = req.into_body().map_err(Into::into).boxed();
                    Ok(b.body(body).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}
