//! `tunnox proxy` in single-node mode (no Redis) against real upstreams on loopback: routing,
//! the error statuses, forwarding details, limits, and statistics.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::http::{Upstream, get, raw};
use support::process::{eventually, free_port};
use support::proxy::ProxyProc;

fn single_node(dir: &std::path::Path, upstream: u16, extra_yaml: &str) -> String {
    let closed = free_port();
    format!(
        "storage: {{type: memory, hybrid: {{json: {{file_path: {data}, save_interval: 0}}}}}}
http_domain: {{base_domains: [tunnox.net]}}
log: {{level: debug}}
{extra_yaml}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {upstream}, custom_headers: {{X-Env: dev}}}}
  - {{subdomain: down, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {closed}}}
  - {{subdomain: v6, base_domain: tunnox.net, target_host: '::1', target_port: {closed}}}",
        data = dir.join("data.json").display(),
    )
}

/// A temp dir, an upstream `one`, and a ready single-node proxy with `proxy_extra` settings.
fn start(proxy_extra: &str) -> (tempfile::TempDir, Upstream, ProxyProc) {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let p = ProxyProc::start(
        dir.path(),
        "p1",
        &single_node(dir.path(), up.port, ""),
        proxy_extra,
    )
    .ready();
    (dir, up, p)
}

#[test]
fn routes_by_host_and_maps_errors_to_statuses() {
    let (_dir, _up, p) = start(
        "timeouts: {upstream_response: 500ms, request_header: 1s}, limits: {max_header_bytes: 16384}",
    );

    let ok = get(p.port, "App.Tunnox.NET.:8080", "/").unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body, "hello from one\n");
    assert_eq!(ok.header("x-upstream"), Some("one"));
    assert_eq!(
        ok.header("x-hop"),
        None,
        "hop-by-hop header named in Connection is removed"
    );

    // (Host header, expected status)
    let cases = [
        ("nope.tunnox.net", 404),
        ("bad_host", 400),
        ("a..b", 400),
        ("app.tunnox.net:99999", 400),
        ("[::1]:80", 400),
        ("down.tunnox.net", 502),
        ("v6.tunnox.net", 502),
    ];
    for (host, want) in cases {
        let r = get(p.port, host, "/").unwrap();
        assert_eq!(r.status, want, "Host {host:?}: {r:?}");
        assert_eq!(r.header("x-tunnox-error"), Some("1"), "{host}");
    }
    let no_host = raw(
        p.port,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(no_host.status, 400);
    let slow = get(p.port, "app.tunnox.net", "/slow?ms=2000").unwrap();
    assert_eq!(slow.status, 504, "{slow:?}");

    // HTTP/2 with prior knowledge (no Host header, :authority only).
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-H",
            "Host: app.tunnox.net",
        ])
        .arg(format!("http://127.0.0.1:{}/", p.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from one\n");

    // Still healthy after all of that.
    assert_eq!(p.status("app.tunnox.net"), 200);
    assert_eq!(p.admin_get("/healthz").unwrap().status, 200);
}

#[test]
fn forwards_headers_bodies_and_upgrades() {
    let (_dir, _up, p) = start("");

    let req = "GET /headers HTTP/1.1\r\nHost: app.tunnox.net\r\nX-Forwarded-For: 192.0.2.7\r\nX-Env: client\r\nKeep-Alive: timeout=5\r\nConnection: close\r\n\r\n";
    let r = raw(p.port, req.as_bytes(), Duration::from_secs(5)).unwrap();
    let seen = r.body.to_ascii_lowercase();
    for want in [
        "host: app.tunnox.net\n",
        "x-forwarded-for: 192.0.2.7, 127.0.0.1\n",
        "x-forwarded-proto: http\n",
        "x-forwarded-host: app.tunnox.net\n",
        "x-env: dev\n",
    ] {
        assert!(
            seen.contains(want),
            "upstream should see {want:?} in:\n{seen}"
        );
    }
    assert!(
        !seen.contains("keep-alive"),
        "hop-by-hop header forwarded:\n{seen}"
    );

    // A 1 MiB upload streams through and comes back.
    let body = "x".repeat(1 << 20);
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: app.tunnox.net\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = raw(p.port, req.as_bytes(), Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());

    // WebSocket-style upgrade: 101, then bytes both ways.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app.tunnox.net\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
    let head = support::http::read_reply(&mut s).unwrap();
    assert_eq!(head.status, 101, "{head:?}");
    assert_eq!(head.header("upgrade"), Some("websocket"));
    s.write_all(b"ping over the tunnel").unwrap();
    let mut got = [0u8; 20];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping over the tunnel");
}

#[test]
fn refuses_oversized_and_slow_headers_and_stays_healthy() {
    let (_dir, _up, p) =
        start("timeouts: {request_header: 1s}, limits: {max_header_bytes: 16384, max_headers: 20}");

    let big = format!(
        "GET / HTTP/1.1\r\nHost: app.tunnox.net\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let r = raw(p.port, big.as_bytes(), Duration::from_secs(5));
    assert_eq!(
        r.as_ref().map(|r| r.status),
        Some(431),
        "oversized head: {r:?}"
    );

    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(
        p.port,
        format!("GET / HTTP/1.1\r\nHost: app.tunnox.net\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(
        r.as_ref().map(|r| r.status),
        Some(431),
        "too many headers: {r:?}"
    );

    // A client that never finishes its headers is disconnected after request_header.
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: app.tun").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(
        buf.is_empty() || text.starts_with("HTTP/1.1 408"),
        "slow client got {text:?}"
    );

    assert_eq!(p.status("app.tunnox.net"), 200);
}

#[test]
fn file_mappings_persist_statistics_and_drain_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let yaml = single_node(dir.path(), up.port, "");
    let mut p = ProxyProc::start(dir.path(), "p1", &yaml, "stats_flush_interval: 200ms").ready();
    for _ in 0..5 {
        assert_eq!(p.status("app.tunnox.net"), 200);
    }
    let stats = p.admin_get("/status").unwrap();
    let json: serde_json::Value = serde_json::from_str(&stats.body).unwrap();
    assert_eq!(json["cache"]["type"], "memory");
    assert!(json["cache"]["total_hits"].as_u64().unwrap() >= 4, "{json}");
    assert!(json["cache"]["hit_rate"].as_f64().unwrap() > 0.5, "{json}");

    let data = dir.path().join("data.json");
    eventually("access counts persisted", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&data).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["mappings"].as_array().is_some_and(|ms| {
            ms.iter().any(|m| {
                m["full_domain"] == "app.tunnox.net"
                    && m["access_count"] == 5
                    && m["bytes_out"].as_u64() > Some(0)
            })
        })
    });

    let post = |path: &str| {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        support::http::raw(p.admin, req.as_bytes(), Duration::from_secs(10)).unwrap()
    };
    let drained = post("/drain?wait=100ms");
    assert_eq!(drained.status, 200);
    assert_eq!(
        p.admin_get("/readyz").unwrap().status,
        503,
        "not ready once draining"
    );
    let r = get(p.port, "app.tunnox.net", "/").unwrap();
    assert_eq!(r.status, 200, "still serving while draining");
    assert_eq!(post("/drain?wait=forever").status, 400);
    assert_eq!(
        p.role.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        p.log()
    );

    // Restart from the same file: the mappings are back, none duplicated.
    let p2 = ProxyProc::start(dir.path(), "p2", &yaml, "").ready();
    assert_eq!(p2.status("app.tunnox.net"), 200);
    let text = std::fs::read_to_string(&data).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["mappings"].as_array().unwrap().len(), 3, "{text}");
}

#[test]
fn bad_configuration_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "proxy: {worker_threads: many}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnox"))
        .args(["proxy", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxy.worker_threads"), "{err}");
}

#[test]
fn garbage_requests_get_an_answer_or_a_close_and_the_proxy_stays_up() {
    use rand::{Rng, SeedableRng};
    let (_dir, _up, p) = start("timeouts: {request_header: 1s}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7u64);
    let pieces: [&[u8]; 12] = [
        b"GET / HTTP/1.1\r\n",
        b"Host: app.tunnox.net\r\n",
        b"Host: \xff\xfe\r\n",
        b"Host: a..b:99\r\n",
        b"Content-Length: 5\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"\r\n",
        b"zz\r\n",
        b"\x00\x01\x02",
        b"GET /%%%% HTTP/9.9\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    for round in 0..150 {
        let mut req = Vec::new();
        for _ in 0..rng.random_range(1..8) {
            req.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
        }
        if rng.random_bool(0.3) {
            let junk: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            req.extend_from_slice(&junk);
        }
        req.extend_from_slice(b"\r\n\r\n");
        let started = std::time::Instant::now();
        if let Some(r) = raw(p.port, &req, Duration::from_secs(5)) {
            assert!(
                matches!(
                    r.status,
                    200 | 400 | 404 | 405 | 408 | 413 | 414 | 431 | 501 | 505
                ),
                "round {round}: {:?} → {r:?}",
                String::from_utf8_lossy(&req)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "round {round} hung: {:?}",
            String::from_utf8_lossy(&req)
        );
    }
    assert_eq!(p.status("app.tunnox.net"), 200);
    assert!(!p.log().contains("panicked"), "{}", p.log());
}
