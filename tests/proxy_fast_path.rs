//! The HTTP/1.1 fast path against a scripted upstream that answers with exact bytes: every
//! response framing, keep-alive and pipelining on the client side, upstream connection reuse
//! and upstreams closing pooled connections, handover to the general path in the middle of a
//! connection, broken upstreams. Most checks run through two proxies, fast path on and off, and
//! compare what clients get (the general path is the reference).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::proxy::ProxyProc;

/// What the scripted upstream answers on each path (after reading the request).
fn script(path: &str, head: &str, body: &[u8]) -> Vec<Vec<u8>> {
    let b = |s: &str| s.as_bytes().to_vec();
    match path {
        "/len" => vec![b(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kind: len\r\n\r\nhello",
        )],
        // Delivered in pieces, split inside the chunk-size lines and data.
        "/chunked" => vec![
            b("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n5\r"),
            b("\nhel"),
            b("lo\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n"),
            b("\r\n"),
        ],
        "/close" => vec![
            b("HTTP/1.1 200 OK\r\nX-Kind: close\r\n\r\nuntil "),
            b("close"),
        ],
        "/http10" => vec![b("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")],
        "/early" => vec![
            b("HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"),
            b("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"),
        ],
        "/nocontent" => vec![b("HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n")],
        "/notmodified" => vec![b("HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n")],
        "/big" => {
            let mut v = vec![b("HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")];
            v.extend((0..64).map(|i| vec![b'a' + (i % 26) as u8; 16384]));
            v
        }
        "/hop" => vec![b(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\nok",
        )],
        "/badchunk" => vec![b(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )],
        "/badhead" => vec![b("HTTP/1.1 2000 Huh\r\n\r\n")],
        "/silent" => vec![],
        "/hang" => {
            std::thread::sleep(Duration::from_secs(3));
            vec![b("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")]
        }
        "/echo" => {
            let mut v =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            v.extend_from_slice(body);
            vec![v]
        }
        "/head" => {
            // The request head as the upstream saw it, one header per line, names lowercased.
            let mut lines: Vec<String> = head
                .lines()
                .skip(1)
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once(':').unwrap();
                    format!("{}:{}", k.to_ascii_lowercase(), v)
                })
                .collect();
            lines.sort();
            let text = lines.join("\n");
            vec![
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
                .into_bytes(),
            ]
        }
        _ => vec![b("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")],
    }
}

/// A raw upstream on loopback: reads requests (head + `Content-Length` body), answers with
/// [`script`], adds `X-Conn: <n>` (its connection number) to answers of `/len`, closes after
/// `/close`, `/http10`, `/badchunk`, `/badhead`, `/silent`, and 50 ms after `/once`.
struct Scripted {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Scripted {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                std::thread::spawn(move || serve_upstream(stream, n));
            }
        });
        Self { port, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve_upstream(mut s: TcpStream, conn: usize) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_until(&mut s, &mut buf, b"\r\n\r\n") else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < head_end + 4 + len {
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let mut body = buf[head_end + 4..head_end + 4 + len].to_vec();
        buf.drain(..head_end + 4 + len);
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            // Enough for the tests' uploads: the chunks up to the last one, no trailers.
            let Some(end) = read_until(&mut s, &mut buf, b"0\r\n\r\n") else {
                return;
            };
            let mut rest = &buf[..end];
            while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                let size =
                    usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap(), 16).unwrap();
                body.extend_from_slice(&rest[i + 2..i + 2 + size]);
                rest = &rest[i + 4 + size..];
            }
            buf.drain(..end + 5);
        }
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let is_head = head.starts_with("HEAD ");
        let mut pieces = script(&path, &head, &body);
        if path == "/len" || path == "/once" {
            let first = String::from_utf8(pieces.remove(0).clone()).unwrap_or_default();
            let first = if path == "/once" {
                "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce".to_string()
            } else {
                first
            };
            let first = first.replacen("\r\n", &format!("\r\nX-Conn: {conn}\r\n"), 1);
            let first = if is_head {
                first.replace("hello", "")
            } else {
                first
            };
            pieces.insert(0, first.into_bytes());
        }
        for p in &pieces {
            if s.write_all(p).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match path.as_str() {
            "/close" | "/http10" | "/badchunk" | "/badhead" | "/silent" => return,
            "/once" => {
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            _ => {}
        }
    }
}

fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(needle.len()).position(|w| w == needle) {
            return Some(i);
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A client connection that reads one response at a time (keep-alive, pipelining).
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// Lowercased names, sorted; `date` and `x-conn` left out (they differ by nature).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.body[..self.body.len().min(64)];
        write!(
            f,
            "{} {:?} body {} bytes {:?}",
            self.status,
            self.headers,
            self.body.len(),
            String::from_utf8_lossy(shown)
        )
    }
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).unwrap();
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Whether the server closed the connection (nothing more arrives).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill()
    }

    /// Reads one response (interim 1xx ones included as their own answers).
    fn answer(&mut self, to_head: bool) -> Option<Answer> {
        let (head_len, status, mut headers) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (n, r.code.unwrap(), headers);
            }
            if !self.fill() {
                return None;
            }
        };
        self.buf.drain(..head_len);
        let get = |h: &[(String, String)], k: &str| {
            h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        } else if get(&headers, "transfer-encoding").is_some() {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !self.fill() {
                        return None;
                    }
                };
                let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).ok()?;
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers up to the empty line.
                    loop {
                        if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            let empty = i == 0;
                            self.buf.drain(..i + 2);
                            if empty {
                                break;
                            }
                        } else if !self.fill() {
                            return None;
                        }
                    }
                    break;
                }
                while self.buf.len() < size + 2 {
                    if !self.fill() {
                        return None;
                    }
                }
                body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        } else if let Some(len) = get(&headers, "content-length") {
            let len: usize = len.parse().ok()?;
            while self.buf.len() < len {
                if !self.fill() {
                    return None;
                }
            }
            body = self.buf.drain(..len).collect();
        } else {
            while self.fill() {}
            body = std::mem::take(&mut self.buf);
        }
        headers.retain(|(k, _)| k != "date" && k != "x-conn");
        if status == 304 {
            // The general path's server drops a 304's Content-Length, the fast path passes it
            // on; both are allowed (RFC 9110 §8.6).
            headers.retain(|(k, _)| k != "content-length");
        }
        headers.sort();
        Some(Answer {
            status,
            headers,
            body,
        })
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n")
}

struct Pair {
    _dir: tempfile::TempDir,
    up: Scripted,
    fast: ProxyProc,
    general: ProxyProc,
}

fn start() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start();
    let yaml = format!(
        "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}
http_domain: {{base_domains: [tunnox.net]}}
log: {{level: debug}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {}, custom_headers: {{X-Env: dev}}}}",
        up.port
    );
    let timeouts = "timeouts: {upstream_response: 1s, request_header: 2s}";
    let fast = ProxyProc::start(dir.path(), "fast", &yaml, timeouts);
    let general = ProxyProc::start(
        dir.path(),
        "general",
        &yaml,
        &format!("fast_path: false, {timeouts}"),
    );
    Pair {
        _dir: dir,
        up,
        fast: fast.ready(),
        general: general.ready(),
    }
}

/// Sends `requests` (raw, one after another on one connection) to both proxies; returns what
/// each answered, checking they agree.
fn both(p: &Pair, requests: &[(&str, bool)]) -> Vec<Answer> {
    let mut all = Vec::new();
    for port in [p.fast.port, p.general.port] {
        let mut c = Client::connect(port);
        let mut answers = Vec::new();
        for (raw, to_head) in requests {
            c.send(raw.as_bytes());
            let a = c
                .answer(*to_head)
                .unwrap_or_else(|| panic!("no answer to {raw:?} on {port}"));
            answers.push(a);
        }
        all.push(answers);
    }
    assert_eq!(
        all[0], all[1],
        "fast path (left) and general path (right) differ"
    );
    all.remove(0)
}

#[test]
fn relays_every_framing_like_the_general_path_on_one_connection() {
    let p = start();
    let head_req = "HEAD /len HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n";
    let answers = both(
        &p,
        &[
            (&get("/len"), false),
            (&get("/chunked"), false),
            (head_req, true),
            (&get("/nocontent"), false),
            (&get("/notmodified"), false),
            (&get("/early"), false),
            (&get("/hop"), false),
            (&get("/big"), false),
            (&get("/http10"), false),
            (&get("/len"), false),
        ],
    );
    let by = |i: usize| &answers[i];
    assert_eq!((by(0).status, &by(0).body[..]), (200, &b"hello"[..]));
    assert_eq!(by(1).body, b"hello world");
    assert_eq!(by(1).header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        (by(2).status, by(2).header("content-length")),
        (200, Some("5"))
    );
    assert_eq!(by(3).status, 204);
    assert_eq!(by(4).status, 304);
    assert_eq!(
        (by(5).status, &by(5).body[..]),
        (200, &b"final"[..]),
        "interim 103 dropped"
    );
    let hop = by(6);
    for gone in ["x-hop", "keep-alive", "connection", "proxy-authenticate"] {
        assert_eq!(hop.header(gone), None, "{gone} passed on: {hop:?}");
    }
    assert_eq!(by(7).body.len(), 1 << 20);
    assert!(
        by(7)
            .body
            .chunks(16384)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == b'a' + (i % 26) as u8))
    );
    assert_eq!(by(8).body, b"ok", "an HTTP/1.0 upstream that closes");
    assert_eq!(
        by(9).body,
        b"hello",
        "the client connection outlives upstream connections"
    );

    // A response that ends when the upstream closes ends the client connection too.
    for port in [p.fast.port, p.general.port] {
        let mut c = Client::connect(port);
        c.send(get("/close").as_bytes());
        let a = c.answer(false).unwrap();
        assert_eq!(
            (a.status, &a.body[..]),
            (200, &b"until close"[..]),
            "{port}"
        );
    }
}

#[test]
fn rewrites_request_heads_like_the_general_path() {
    let p = start();
    let req = "GET /head HTTP/1.1\r\nHost: App.Tunnox.net:8080\r\nConnection: keep-alive, x-secret\r\n\
               X-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers, gzip\r\nProxy-Authorization: x\r\n\
               X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
               X-Env: client\r\nAccept: */*\r\n\r\n";
    let answers = both(&p, &[(req, false)]);
    let seen = String::from_utf8(answers[0].body.clone()).unwrap();
    assert_eq!(
        seen,
        "accept: */*\nhost: App.Tunnox.net:8080\nte: trailers\ntunnox-hops: 1\nx-env: dev\n\
         x-forwarded-for: 192.0.2.1, 127.0.0.1\nx-forwarded-host: App.Tunnox.net:8080\nx-forwarded-proto: http"
    );
}

/// The request policy is one for both paths: hop counting, loops, unknown hosts and malformed
/// input give the same statuses, headers and bodies (request ids included
/// when the client sends one), and the upstream sees the same hop count.
#[test]
fn both_paths_apply_one_request_policy() {
    let p = start();
    let req = |host: &str, extra: &str| {
        format!("GET /head HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: rq-7\r\n{extra}\r\n")
    };
    let answers = both(
        &p,
        &[
            (&req("app.tunnox.net", "Tunnox-Hops: 1\r\n"), false),
            (&req("app.tunnox.net", "Tunnox-Hops: 2\r\n"), false),
            (&req("app.tunnox.net", "Tunnox-Hops: 3\r\n"), false),
            (&req("nope.tunnox.net", ""), false),
            (&req("app.tunnox.net", "Tunnox-Hops: 1, 9\r\n"), false),
        ],
    );
    let seen = String::from_utf8_lossy(&answers[0].body).into_owned();
    assert!(seen.contains("\ntunnox-hops: 2\n"), "{seen}");
    assert!(
        seen.lines().any(|l| l == "x-request-id: rq-7"),
        "the client's request id reaches the upstream: {seen}"
    );
    let seen = String::from_utf8_lossy(&answers[1].body).into_owned();
    assert!(seen.contains("\ntunnox-hops: 3\n"), "{seen}");
    // (index, status, body)
    let own = [
        (
            2,
            508,
            "508 Loop Detected: request loop: too many hops through this proxy fleet\nrequest id: rq-7\n",
        ),
        (
            3,
            404,
            "404 Not Found: no mapping for this host\nrequest id: rq-7\n",
        ),
        (
            4,
            400,
            "400 Bad Request: malformed tunnox-hops header\nrequest id: rq-7\n",
        ),
    ];
    for (i, status, body) in own {
        let a = &answers[i];
        assert_eq!(
            (a.status, String::from_utf8_lossy(&a.body).as_ref()),
            (status, body),
            "{a:?}"
        );
        assert_eq!(a.header("x-request-id"), Some("rq-7"), "{a:?}");
        assert_eq!(a.header("x-tunnox-error"), Some("1"), "{a:?}");
    }
    // Without a (well-formed) id, each path makes one.
    for port in [p.fast.port, p.general.port] {
        let mut c = Client::connect(port);
        c.send(b"GET / HTTP/1.1\r\nHost: nope.tunnox.net\r\nX-Request-Id: bad id\r\n\r\n");
        let a = c.answer(false).unwrap();
        let id = a.header("x-request-id").expect("an id").to_string();
        assert!(
            id.len() == 20 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        let body = String::from_utf8_lossy(&a.body).into_owned();
        assert!(body.ends_with(&format!("request id: {id}\n")), "{body}");
    }
    for proxy in [&p.fast, &p.general] {
        let m = proxy.admin_get("/metrics").unwrap().body;
        let line = "tunnox_proxy_errors_total{reason=\"loop_detected\"} 1";
        assert!(m.contains(line), "{line} on {}:\n{m}", proxy.port);
    }
}

#[test]
fn pipelined_and_split_requests_are_answered_in_order() {
    let p = start();
    let mut c = Client::connect(p.fast.port);
    let post =
        "POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nContent-Length: 10\r\n\r\n0123456789";
    c.send(format!("{}{}{post}", get("/len"), get("/chunked")).as_bytes());
    assert_eq!(c.answer(false).unwrap().body, b"hello");
    assert_eq!(c.answer(false).unwrap().body, b"hello world");
    assert_eq!(c.answer(false).unwrap().body, b"0123456789");

    // A head and a body arriving in pieces.
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.tun");
    std::thread::sleep(Duration::from_millis(30));
    c.send(b"nox.net\r\nContent-Length: 6\r\n\r\nab");
    std::thread::sleep(Duration::from_millis(30));
    c.send(b"cdef");
    assert_eq!(c.answer(false).unwrap().body, b"abcdef");
}

#[test]
fn reuses_upstream_connections_and_replaces_ones_the_upstream_closed() {
    let p = start();
    let mut c = Client::connect(p.fast.port);
    for _ in 0..5 {
        c.send(get("/len").as_bytes());
        assert_eq!(c.answer(false).unwrap().status, 200);
    }
    assert_eq!(
        p.up.connections(),
        1,
        "five sequential requests over one upstream connection"
    );

    // The upstream closes its idle connection 50 ms after answering; the next requests (a GET
    // and a POST, which must not be repeated blindly) get a fresh connection.
    c.send(get("/once").as_bytes());
    assert_eq!(c.answer(false).unwrap().body, b"once");
    std::thread::sleep(Duration::from_millis(200));
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(c.answer(false).unwrap().body, b"hi");
    c.send(get("/len").as_bytes());
    assert_eq!(c.answer(false).unwrap().status, 200);
}

#[test]
fn hands_over_to_the_general_path_in_the_middle_of_a_connection() {
    let p = start();
    let mut c = Client::connect(p.fast.port);
    c.send(get("/len").as_bytes());
    assert_eq!(c.answer(false).unwrap().body, b"hello");
    // A chunked upload is the general path's; it answers this and what follows.
    c.send(b"POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(c.answer(false).unwrap().body, b"abc");
    c.send(get("/chunked").as_bytes());
    assert_eq!(c.answer(false).unwrap().body, b"hello world");
    // So are HTTP/1.0 and a body above the fast path's limit.
    let big = vec![b'x'; 100_000];
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let mut c = Client::connect(p.fast.port);
    c.send(&req);
    assert_eq!(c.answer(false).unwrap().body.len(), big.len());
    let mut c = Client::connect(p.fast.port);
    c.send(b"GET /len HTTP/1.0\r\nHost: app.tunnox.net\r\n\r\n");
    assert_eq!(c.answer(false).unwrap().body, b"hello");
    let metrics = p.fast.admin_get("/metrics").unwrap().body;
    for reason in ["transfer_encoding", "large_body", "version"] {
        let line = format!("tunnox_proxy_handovers_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

#[test]
fn broken_upstreams_and_clients_leave_the_proxy_healthy() {
    let p = start();
    // Both paths: a malformed status line and silence are the proxy's own 502s.
    for path in ["/badhead", "/silent"] {
        for port in [p.fast.port, p.general.port] {
            let mut c = Client::connect(port);
            c.send(get(path).as_bytes());
            let a = c.answer(false).unwrap();
            assert_eq!(
                (a.status, a.header("x-tunnox-error")),
                (502, Some("1")),
                "{path} on {port}"
            );
        }
    }
    // A body that breaks off in the middle: the client connection is closed after what came.
    let mut c = Client::connect(p.fast.port);
    c.send(get("/badchunk").as_bytes());
    assert!(
        c.answer(false).is_none(),
        "a broken body is not passed off as complete"
    );

    // Clients that go away mid-response, mid-request, or send garbage on a kept-alive connection.
    for raw in [
        format!("{}GET / HTTP/1.1\r\nHost: app", get("/big")),
        format!("{}\x00\x01garbage\r\n\r\n", get("/len")),
        "POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nContent-Length: 100\r\n\r\nshort"
            .to_string(),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", p.fast.port)).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut first = [0u8; 16];
        let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
        let _ = s.read(&mut first);
    }
    let mut c = Client::connect(p.fast.port);
    c.send(get("/len").as_bytes());
    assert_eq!(c.answer(false).unwrap().body, b"hello");
    assert_eq!(p.fast.status("nope.tunnox.net"), 404);
}

#[test]
fn closes_kept_alive_connections_when_asked_and_after_errors_it_cannot_frame() {
    let p = start();
    let mut c = Client::connect(p.fast.port);
    c.send(b"GET /len HTTP/1.1\r\nHost: app.tunnox.net\r\nConnection: close\r\n\r\n");
    let a = c.answer(false).unwrap();
    assert_eq!(a.header("connection"), Some("close"));
    assert!(c.closed());
    // An unknown host is answered on the fast path and the connection stays usable.
    let mut c = Client::connect(p.fast.port);
    c.send(b"GET / HTTP/1.1\r\nHost: nope.tunnox.net\r\n\r\n");
    assert_eq!(c.answer(false).unwrap().status, 404);
    c.send(b"HEAD / HTTP/1.1\r\nHost: nope.tunnox.net\r\n\r\n");
    let a = c.answer(true).unwrap();
    assert_eq!((a.status, a.body.len()), (404, 0));
    c.send(get("/len").as_bytes());
    assert_eq!(c.answer(false).unwrap().body, b"hello");
}

#[test]
fn a_stopping_proxy_still_answers_requests_already_begun_on_both_paths() {
    let mut p = start();
    // Two connections each with half a request: one the fast path takes, one it hands over.
    let mut fast = Client::connect(p.fast.port);
    fast.send(b"GET /len HTTP/1.1\r\nHost: app.tun");
    let mut general = Client::connect(p.fast.port);
    general.send(b"POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nTransfer-Encoding: chunked\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let pid = p.fast.role.pid().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(200));
    fast.send(b"nox.net\r\n\r\n");
    general.send(b"\r\n2\r\nok\r\n0\r\n\r\n");
    let a = fast
        .answer(false)
        .expect("the fast path answers the request it was reading");
    assert_eq!(
        (a.status, &a.body[..], a.header("connection")),
        (200, &b"hello"[..], Some("close"))
    );
    let a = general
        .answer(false)
        .expect("the general path answers the request handed to it");
    assert_eq!(
        (a.status, &a.body[..], a.header("connection")),
        (200, &b"ok"[..], Some("close"))
    );
    assert_eq!(p.fast.role.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_client_that_leaves_is_not_waited_for_on_either_path() {
    let p = start();
    for proxy in [&p.fast, &p.general] {
        let mut c = Client::connect(proxy.port);
        c.send(get("/hang").as_bytes());
        std::thread::sleep(Duration::from_millis(300));
        let in_flight = || {
            let m = proxy.admin_get("/metrics").unwrap().body;
            m.lines().any(|l| l == "tunnox_proxy_active_requests 1")
        };
        assert!(in_flight(), "the request is in flight on {}", proxy.port);
        drop(c);
        // Well before the upstream answers (3 s) or times out (`upstream_response: 1s`).
        support::process::eventually("request dropped", Duration::from_millis(400), || {
            !in_flight()
        });
    }
}

#[test]
fn http2_reaches_the_general_path_with_the_fast_path_on_and_off() {
    let p = start();
    for port in [p.fast.port, p.general.port] {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "--http2-prior-knowledge",
                "-H",
                "Host: app.tunnox.net",
            ])
            .arg(format!("http://127.0.0.1:{port}/len"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello", "on {port}");
    }
}
