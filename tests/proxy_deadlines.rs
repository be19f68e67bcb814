//! Deadlines after the request head, with real sockets on both HTTP paths: a client that reads
//! one byte a second, an upstream that stops in the middle of a body, a client that stops in the
//! middle of an upload, an idle WebSocket, an idle HTTP/2 connection. Each is closed at its
//! deadline — not before, not much after — and counted in `tunnox_proxy_timeouts_total{kind}`.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::proxy::ProxyProc;

const IDLE: Duration = Duration::from_secs(1);

/// When the upstream saw its side end, per path.
type Ended = Arc<Mutex<Vec<(String, Instant)>>>;

/// A raw upstream: `/big` (200 MB, written as fast as the proxy takes it), `/stall` (10 of 1000
/// bytes, then silence), `/ws` (101, then echo), `/sink` (reads the upload, answers at its end).
fn upstream(ended: Ended) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let ended = ended.clone();
            std::thread::spawn(move || serve(s, ended));
        }
    });
    port
}

fn serve(mut s: TcpStream, ended: Ended) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let done = |what: &str| {
        ended
            .lock()
            .unwrap()
            .push((what.to_string(), Instant::now()))
    };
    match path.as_str() {
        "/big" => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 200000000\r\n\r\n");
            let data = vec![b'x'; 65536];
            while s.write_all(&data).is_ok() {}
            done("/big");
        }
        "/stall" => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789");
            // Silent, but open, until the proxy gives up.
            let _ = s.read(&mut chunk);
            done("/stall");
        }
        "/ws" => {
            let _ = s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            );
            loop {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            done("/ws");
        }
        "/sink" => {
            while let Ok(n) = s.read(&mut chunk) {
                if n == 0 {
                    break;
                }
            }
            done("/sink");
        }
        _ => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    }
}

struct Pair {
    _dir: tempfile::TempDir,
    ended: Ended,
    proxies: Vec<(&'static str, ProxyProc)>,
}

fn start() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ended = Ended::default();
    let port = upstream(ended.clone());
    let yaml = format!(
        "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}
http_domain: {{base_domains: [tunnox.net]}}
log: {{level: debug}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {port}}}"
    );
    let timeouts = "timeouts: {client_write_idle: 1s, upstream_read_idle: 1s, request_body_idle: 1s, websocket_idle: 1s, http2_idle: 1s}";
    let proxies = vec![
        (
            "fast",
            ProxyProc::start(dir.path(), "fast", &yaml, timeouts).ready(),
        ),
        (
            "general",
            ProxyProc::start(
                dir.path(),
                "general",
                &yaml,
                &format!("fast_path: false, {timeouts}"),
            )
            .ready(),
        ),
    ];
    Pair {
        _dir: dir,
        ended,
        proxies,
    }
}

fn timeouts(p: &ProxyProc, kind: &str) -> u64 {
    let m = p.admin_get("/metrics").map(|r| r.body).unwrap_or_default();
    let prefix = format!("tunnox_proxy_timeouts_total{{kind=\"{kind}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits (up to 10 s) for the metric to count one, returning when it did.
fn counted(p: &ProxyProc, kind: &str, before: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if timeouts(p, kind) > before {
            return Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{kind} timeout never counted");
}

fn in_window(what: &str, took: Duration, from: Duration, to: Duration) {
    assert!(
        took >= from && took <= to,
        "{what}: after {took:?}, want {from:?}..{to:?}"
    );
}

fn upstream_ended(ended: &Ended, path: &str, after: Instant) -> Option<Instant> {
    ended
        .lock()
        .unwrap()
        .iter()
        .find(|(p, at)| p == path && *at > after)
        .map(|(_, at)| *at)
}

#[test]
fn a_client_reading_one_byte_a_second_is_cut_off_at_client_write_idle() {
    let pair = start();
    for (name, p) in &pair.proxies {
        let before = timeouts(p, "client_write");
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        // A small window, so the proxy's writes stall soon.
        socket2::SockRef::from(&c)
            .set_recv_buffer_size(4096)
            .unwrap();
        let sent = Instant::now();
        c.write_all(b"GET /big HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n")
            .unwrap();
        let reader = std::thread::spawn(move || {
            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut byte = [0u8; 1];
            let mut got = 0usize;
            // One byte a second, for up to 8 s.
            for _ in 0..8 {
                match c.read(&mut byte) {
                    Ok(1) => got += 1,
                    _ => break,
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            got
        });
        let at = counted(p, "client_write", before);
        // The stall begins once the socket buffers are full, a moment after the request.
        in_window(
            &format!("{name}: slow reader cut"),
            at - sent,
            IDLE,
            IDLE + Duration::from_millis(2500),
        );
        let up = upstream_ended(&pair.ended, "/big", sent);
        let up = up.or_else(|| {
            std::thread::sleep(Duration::from_millis(500));
            upstream_ended(&pair.ended, "/big", sent)
        });
        assert!(
            up.is_some(),
            "{name}: the upstream connection is closed too"
        );
        assert!(reader.join().unwrap() >= 1);
        assert_eq!(p.status("app.tunnox.net"), 200, "{name} still serves");
    }
}

#[test]
fn an_upstream_that_stops_mid_body_is_cut_off_at_upstream_read_idle() {
    let pair = start();
    for (name, p) in &pair.proxies {
        let before = timeouts(p, "upstream_read");
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /stall HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut first = None;
        loop {
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&chunk[..n]);
                    if first.is_none() && got.ends_with(b"0123456789") {
                        first = Some(Instant::now());
                    }
                }
            }
        }
        let first = first.unwrap_or_else(|| panic!("{name}: {:?}", String::from_utf8_lossy(&got)));
        in_window(
            &format!("{name}: stalled body closed"),
            first.elapsed(),
            IDLE - Duration::from_millis(100),
            IDLE + Duration::from_millis(1500),
        );
        assert!(
            got.ends_with(b"0123456789"),
            "{name}: not passed off as complete"
        );
        counted(p, "upstream_read", before);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            upstream_ended(&pair.ended, "/stall", first).is_some(),
            "{name}: the upstream connection is closed"
        );
    }
}

#[test]
fn a_client_that_stops_mid_upload_is_cut_off_at_request_body_idle() {
    let pair = start();
    for (name, p) in &pair.proxies {
        let before = timeouts(p, "request_body");
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Above the fast path's buffered-body limit: streamed by the general path.
        c.write_all(
            b"POST /sink HTTP/1.1\r\nHost: app.tunnox.net\r\nContent-Length: 1000000\r\n\r\n",
        )
        .unwrap();
        c.write_all(&[b'u'; 100_000]).unwrap();
        let stalled = Instant::now();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        in_window(
            &format!("{name}: stalled upload closed"),
            stalled.elapsed(),
            IDLE - Duration::from_millis(100),
            IDLE + Duration::from_millis(1500),
        );
        counted(p, "request_body", before);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            upstream_ended(&pair.ended, "/sink", stalled).is_some(),
            "{name}: the upstream connection is closed"
        );
    }
}

#[test]
fn an_idle_websocket_is_closed_at_websocket_idle() {
    let pair = start();
    for (name, p) in &pair.proxies {
        let before = timeouts(p, "websocket_idle");
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /ws HTTP/1.1\r\nHost: app.tunnox.net\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        let head = support::http::read_reply(&mut c).unwrap();
        assert_eq!(head.status, 101, "{name}");
        // Traffic within the deadline keeps it open.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(600));
            c.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping", "{name}");
        }
        let last = Instant::now();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        in_window(
            &format!("{name}: idle WebSocket closed"),
            last.elapsed(),
            IDLE - Duration::from_millis(100),
            IDLE + Duration::from_millis(1500),
        );
        counted(p, "websocket_idle", before);
        std::thread::sleep(Duration::from_millis(200));
        assert!(upstream_ended(&pair.ended, "/ws", last).is_some(), "{name}");
    }
}

#[test]
fn an_idle_http2_connection_is_closed_at_http2_idle() {
    let pair = start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, p) in &pair.proxies {
        let before = timeouts(p, "http2_idle");
        let (answered, closed) = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
                .await
                .unwrap();
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
            let conn = tokio::spawn(conn);
            let req = http::Request::get("http://app.tunnox.net/")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            use http_body_util::BodyExt;
            resp.into_body().collect().await.unwrap();
            let answered = Instant::now();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
            (answered, Instant::now())
        });
        in_window(
            &format!("{name}: idle HTTP/2 connection closed"),
            closed - answered,
            IDLE - Duration::from_millis(100),
            IDLE + Duration::from_millis(1500),
        );
        counted(p, "http2_idle", before);
    }
}

#[test]
fn an_idle_keep_alive_connection_is_closed_at_request_header() {
    let dir = tempfile::tempdir().unwrap();
    let port = upstream(Ended::default());
    let yaml = format!(
        "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}
http_domain: {{base_domains: [tunnox.net]}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {port}}}"
    );
    for (name, extra) in [
        ("fast", "timeouts: {request_header: 1s}"),
        (
            "general",
            "fast_path: false, timeouts: {request_header: 1s}",
        ),
    ] {
        let p = ProxyProc::start(dir.path(), name, &yaml, extra).ready();
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Requests within the idle time keep it open.
        for _ in 0..3 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n")
                .unwrap();
            assert_eq!(support::http::read_reply(&mut c).unwrap().status, 200);
            std::thread::sleep(Duration::from_millis(600));
        }
        let answered = Instant::now() - Duration::from_millis(600);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        in_window(
            &format!("{name}: idle keep-alive closed"),
            answered.elapsed(),
            IDLE - Duration::from_millis(100),
            IDLE + Duration::from_millis(1500),
        );
        let text = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{name}: {text:?}"
        );
    }
}
