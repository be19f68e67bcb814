//! Real HTTP on loopback for proxy tests: a small upstream server (echo, slow, WebSocket-style
//! upgrade) and a raw HTTP/1.1 client that can also send what well-behaved clients never would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream on `127.0.0.1:port`, running on its own thread until dropped.
pub struct Upstream {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Paths: `/slow?ms=N`, `/echo` (request body back), `/headers` (request headers, one per
    /// line), `/ws` (101, then echoes bytes), anything else: `hello from <name>`.
    pub fn start(name: &str) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let (stream, _) = tokio::select! {
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                        _ = &mut rx => break,
                    };
                    let name = name.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| serve(name.clone(), req));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Self {
            port,
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|n| match n {}).boxed()
}

async fn serve(name: String, mut req: Request<Incoming>) -> Result<Response<Body>, hyper::Error> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let mut resp = match path.as_str() {
        "/slow" => {
            let ms: u64 = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(format!("slow {ms}\n")))
        }
        "/echo" => {
            let body = req.into_body().collect().await?.to_bytes();
            Response::new(full(body))
        }
        "/headers" => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            Response::new(full(out))
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            r.headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            r
        }
        _ => Response::new(full(format!("hello from {name}\n"))),
    };
    let h = resp.headers_mut();
    h.insert("x-upstream", name.parse().unwrap());
    // A hop-by-hop header the proxy must not pass on.
    h.insert("connection", "x-hop".parse().unwrap());
    h.insert("x-hop", "1".parse().unwrap());
    Ok(resp)
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `raw` bytes on a new connection and reads one response until the server closes or
/// the response is complete. `None` if the connection failed or closed without a response.
pub fn raw(port: u16, raw: &[u8], timeout: Duration) -> Option<Reply> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(raw).ok()?;
    read_reply(&mut s)
}

/// GET `path` with `Host: host`, `Connection: close`.
pub fn get(port: u16, host: &str, path: &str) -> Option<Reply> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    raw(port, req.as_bytes(), Duration::from_secs(10))
}

/// The status of a GET, 0 when there was no response.
pub fn status(port: u16, host: &str) -> u16 {
    get(port, host, "/").map(|r| r.status).unwrap_or(0)
}

pub fn read_reply(s: &mut TcpStream) -> Option<Reply> {
    read_reply_from(s)
}

/// One reply from any stream (plain or TLS).
pub fn read_reply_from(s: &mut impl Read) -> Option<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    loop {
        let complete = match len {
            Some(n) => body.len() >= n,
            None if chunked => find(&body, b"0\r\n\r\n").is_some(),
            None => status == 101 || status == 204 || status == 304,
        };
        if complete {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    if chunked {
        body = dechunk(&body);
    }
    Some(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(b, b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = i + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// A client on one TLS connection (HTTP/1.1 keep-alive) to 127.0.0.1:`port`, trusting `ca`.
pub struct TlsConnection(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl TlsConnection {
    pub fn open(port: u16, host: &str, ca: &std::path::Path) -> std::io::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&std::fs::read(ca)?) {
            roots
                .add(c.map_err(std::io::Error::other)?)
                .map_err(std::io::Error::other)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(std::io::Error::other)?;
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .map_err(std::io::Error::other)?;
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        // The handshake now, so a certificate refused is an error of `open`.
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(Self(stream))
    }

    /// Writes `request` whole and reads one reply.
    pub fn exchange(&mut self, request: &[u8]) -> Option<Reply> {
        self.0.write_all(request).ok()?;
        self.0.flush().ok()?;
        read_reply_from(&mut self.0)
    }

    /// The first certificate the server presented (DER).
    pub fn peer_leaf(&self) -> Vec<u8> {
        self.0
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// GET / on this connection: the status.
    pub fn get(&mut self, host: &str) -> std::io::Result<u16> {
        write!(self.0, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.0.read_exact(&mut b)?;
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body)?;
        text.get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a status line: {text}")))
    }
}

/// HTTPS requests to `host` until stopped, each turn one on a kept connection and one on a new
/// one (a full handshake): for a certificate replaced under load.
pub struct TlsLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    worker: std::thread::JoinHandle<(u32, Vec<String>, usize)>,
}

impl TlsLoad {
    pub fn start(port: u16, host: &str, ca: &std::path::Path) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, host, ca) = (stop.clone(), host.to_string(), ca.to_path_buf());
        let worker = std::thread::spawn(move || {
            let (mut done, mut failed) = (0u32, Vec::new());
            let mut kept = TlsConnection::open(port, &host, &ca).unwrap();
            let mut leaves = std::collections::HashSet::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match kept.get(&host) {
                    Ok(200) => done += 1,
                    other => failed.push(format!("kept: {other:?}")),
                }
                match TlsConnection::open(port, &host, &ca)
                    .and_then(|mut c| c.get(&host).map(|code| (code, c.peer_leaf())))
                {
                    Ok((200, leaf)) => {
                        done += 1;
                        leaves.insert(leaf);
                    }
                    other => failed.push(format!("new: {:?}", other.map(|(c, _)| c))),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (done, failed, leaves.len())
        });
        Self { stop, worker }
    }

    /// Stops; (requests answered 200, failures, distinct certificates seen on new connections).
    pub fn stop(self) -> (u32, Vec<String>, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.worker.join().unwrap()
    }
}
