//! The real `tunnox agent` binary against a minimal in-test proxy side built from
//! `tunnox::tunnel` (real TLS 1.3 with throwaway certificates, the real handshake, hyper's HTTP/2
//! client) and real local upstreams on loopback.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::fake_proxy::{FakeProxy, ProxyOptions, Upstream, count_kind, full, server_tls};
use support::process::{Role, free_port};
use support::tunnel::Pki;
use tunnox::tunnel::msg::{Kind, Message, ServerShutdown};
use tunnox::tunnel::{ERROR_HEADER, TARGET_HEADER};

const TOKEN: &str = "good-token";

struct Setup {
    dir: tempfile::TempDir,
    certs: Pki,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = Pki::new(dir.path(), "a");
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        Self { dir, certs }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn proxy_opts(&self) -> ProxyOptions {
        ProxyOptions {
            tls: Some(server_tls(&self.certs)),
            token: TOKEN.into(),
            heartbeat_ms: 500,
            peers: vec![],
            silent: false,
            draining: false,
        }
    }

    /// Starts the agent; `extra` are more flags.
    fn agent(&self, servers: &str, allow: &[&str], extra: &[&str], log: &str) -> Role {
        let token = self.path("token");
        let ca = self.certs.ca.display().to_string();
        let mut args = vec![
            "agent",
            "--server",
            servers,
            "--client-id",
            "laptop",
            "--token-file",
            &token,
            "--ca-file",
            &ca,
        ];
        for a in allow {
            args.extend(["--allow", a]);
        }
        args.extend(extra);
        Role::start(&args, &[], &self.dir.path().join(log))
    }
}

fn request(
    method: &str,
    target: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> http::Request<support::fake_proxy::Body> {
    http::Request::builder()
        .method(method)
        .uri(format!("https://app.example.com{path}"))
        .header(TARGET_HEADER, target)
        .body(full(body))
        .unwrap()
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn forwards_five_megabytes_both_ways_and_refuses_unlisted_targets() {
    let s = Setup::new();
    let proxy = FakeProxy::start(s.proxy_opts()).await;
    let up = Upstream::start().await;
    let other = Upstream::start().await;
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let agent = s.agent(
        &proxy.addr,
        &[&up.addr],
        &["--admin-listen", &admin_addr],
        "agent.log",
    );
    let (mut send, _control) = proxy.session(1, Duration::from_secs(10)).await;

    // 5 MB up, the same 5 MB back (the upstream echoes), streamed through the session.
    let payload: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let resp = send
        .send_request(request("POST", &up.addr, "/echo?x=1", payload.clone()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-seen-host"], "app.example.com");
    assert!(resp.headers().get(ERROR_HEADER).is_none());
    let back = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "body changed on the way");

    // Not in the allow-list: 502 not_allowed, and the other service never sees a connection.
    for target in [
        other.addr.clone(),
        other.addr.replace("127.0.0.1", "localhost"),
    ] {
        let resp = send
            .send_request(request("GET", &target, "/", ""))
            .await
            .unwrap();
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()[&ERROR_HEADER], "not_allowed");
    }
    assert_eq!(other.connections.load(Ordering::SeqCst), 0);
    for target in ["", "nonsense", "127.0.0.1:0"] {
        let resp = send
            .send_request(request("GET", target, "/", ""))
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "{target:?}");
        assert_eq!(resp.headers()[&ERROR_HEADER], "bad_target", "{target:?}");
    }
    // Listed but nothing listens there: 502 connect.
    let closed = format!("127.0.0.1:{}", free_port());
    drop(agent);
    let agent = s.agent(
        &proxy.addr,
        &[&up.addr, &closed],
        &["--admin-listen", &admin_addr],
        "agent2.log",
    );
    let (mut send, _control) = proxy.session(2, Duration::from_secs(10)).await;
    let resp = send
        .send_request(request("GET", &closed, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()[&ERROR_HEADER], "connect");

    let log = agent.log();
    assert!(log.contains("session up"), "{log}");
    let metrics = support::process::http_get(admin, "/metrics");
    assert!(metrics.contains("tunnox_agent_sessions 1"), "{metrics}");
    assert!(
        metrics.contains("tunnox_agent_streams_total{outcome=\"connect\"} 1"),
        "{metrics}"
    );
    assert_eq!(support::process::http_get(admin, "/healthz"), "ok\n");
    let log1 = std::fs::read_to_string(s.dir.path().join("agent.log")).unwrap();
    assert!(
        log1.contains("refused a forwarded stream") && log1.contains(&other.addr),
        "the refusal names the target: {log1}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_extended_connect() {
    let s = Setup::new();
    let proxy = FakeProxy::start(s.proxy_opts()).await;
    let ws = Upstream::websocket_echo().await;
    let _agent = s.agent(&proxy.addr, &[&ws.addr], &[], "agent.log");
    let (mut send, _control) = proxy.session(1, Duration::from_secs(10)).await;
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri("https://app.example.com/chat")
        .header(TARGET_HEADER, ws.addr.as_str())
        .header("sec-websocket-version", "13")
        .body(support::fake_proxy::full(""))
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["sec-websocket-accept"], "test-accept");
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for msg in [&b"hello"[..], &b"second message"[..]] {
        io.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
    assert_eq!(ws.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_token_is_one_line_and_retries_at_the_cap() {
    let s = Setup::new();
    let mut opts = s.proxy_opts();
    opts.token = "another-token".into();
    let proxy = FakeProxy::start(opts).await;
    let up = Upstream::start().await;
    let agent = s.agent(&proxy.addr, &[&up.addr], &[], "agent.log");
    tokio::time::sleep(Duration::from_millis(11_500)).await;
    let auths: Vec<Instant> = proxy
        .seen
        .lock()
        .unwrap()
        .auths
        .iter()
        .map(|a| a.0)
        .collect();
    assert!(
        (2..=4).contains(&auths.len()),
        "{} attempts in 11.5 s",
        auths.len()
    );
    for w in auths.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(3700) && gap <= Duration::from_millis(5300),
            "{gap:?}"
        );
    }
    let log = agent.log();
    assert_eq!(
        lines_with(&log, "refused the session of client \"laptop\""),
        1,
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the token is never logged");
    assert_eq!(lines_with(&log, "bad_credentials"), 1, "{log}");
    assert!(log.contains(&proxy.addr));
    assert_eq!(proxy.session_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_and_unreachable_server_are_one_clear_line_each() {
    let s = Setup::new();
    let other_ca = Pki::new(s.dir.path(), "b");
    let mut opts = s.proxy_opts();
    opts.tls = Some(server_tls(&other_ca));
    let proxy = FakeProxy::start(opts).await;
    let up = Upstream::start().await;
    let agent = s.agent(&proxy.addr, &[&up.addr], &[], "agent.log");
    let closed = format!("127.0.0.1:{}", free_port());
    let agent2 = s.agent(&closed, &[&up.addr], &[], "agent2.log");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = agent.log();
    assert_eq!(lines_with(&log, "bad certificate from server"), 1, "{log}");
    assert!(
        log.contains("UnknownIssuer") && log.contains(&proxy.addr),
        "{log}"
    );
    assert_eq!(
        proxy.seen.lock().unwrap().auths.len(),
        0,
        "no token sent to an untrusted server"
    );
    let log2 = agent2.log();
    assert_eq!(
        lines_with(&log2, &format!("server {closed} unreachable")),
        1,
        "{log2}"
    );
    assert!(log2.to_lowercase().contains("connection refused"), "{log2}");

    // Not the protocol: a TLS server that answers Auth with an HTTP response.
    let cfg = server_tls(&s.certs);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acc = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acc.accept(tcp).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let agent3 = s.agent(&addr, &[&up.addr], &[], "agent3.log");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log3 = agent3.log();
    assert_eq!(
        lines_with(&log3, "does not speak the tunnox tunnel protocol"),
        1,
        "{log3}"
    );
    assert!(log3.contains("bad frame magic"), "{log3}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_shutdown_moves_make_before_break_and_in_flight_requests_finish() {
    let s = Setup::new();
    let p1 = FakeProxy::start(s.proxy_opts()).await;
    let p2 = FakeProxy::start(s.proxy_opts()).await;
    let up = Upstream::start().await;
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let agent = s.agent(
        &p1.addr,
        &[&up.addr],
        &["--admin-listen", &admin_addr],
        "agent.log",
    );
    let (mut send1, control1) = p1.session(1, Duration::from_secs(10)).await;

    // A slow request in flight on the old session.
    let up_addr = up.addr.clone();
    let slow = tokio::spawn(async move {
        let resp = send1
            .send_request(request("POST", &up_addr, "/slow", "still here"))
            .await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let shutdown = ServerShutdown {
        reason: "rolling_update".into(),
        reconnect_to: Some(p2.addr.clone()),
        grace_period: 10,
    };
    control1.send(shutdown.to_frame()).await.unwrap();
    let (mut send2, _control2) = p2.session(1, Duration::from_secs(5)).await;
    let moved = started.elapsed();
    // Leaving arrives on the old session once the new one is up.
    support::process::eventually("Leaving on the old session", Duration::from_secs(5), || {
        count_kind(&p1.seen, Kind::Leaving) == 1
    });
    assert_eq!(p1.seen.lock().unwrap().leaving, vec!["moved".to_string()]);
    let (status, body) = slow
        .await
        .unwrap()
        .expect("in-flight request on the old session");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"still here");
    // The new session serves.
    let resp = send2
        .send_request(request("GET", &up.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let log = agent.log();
    assert!(log.contains("moved to a new session"), "{log}");
    let metrics = support::process::http_get(admin, "/metrics");
    assert!(
        metrics.contains("tunnox_agent_move_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tunnox_agent_reconnects_total{reason=\"server_shutdown\"} 1"),
        "{metrics}"
    );
    println!("agent move time (ServerShutdown sent → new session seen by the proxy): {moved:?}");
    assert!(moved < Duration::from_millis(300), "{moved:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_sends_leaving_lets_streams_finish_and_exits_zero() {
    let s = Setup::new();
    let proxy = FakeProxy::start(s.proxy_opts()).await;
    let up = Upstream::start().await;
    let mut agent = s.agent(&proxy.addr, &[&up.addr], &[], "agent.log");
    let (mut send, _control) = proxy.session(1, Duration::from_secs(10)).await;
    let resp = send
        .send_request(request("GET", &up.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The agent heartbeats every interval (500 ms here).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(count_kind(&proxy.seen, Kind::Heartbeat) >= 2);
    let up_addr = up.addr.clone();
    let mut send2 = send.clone();
    let slow = tokio::spawn(async move {
        let resp = send2
            .send_request(request("POST", &up_addr, "/slow", "in flight"))
            .await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = agent.terminate(Duration::from_secs(10));
        (code, agent.log())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{log}");
    let (status, body) = slow.await.unwrap().expect("in-flight request finishes");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"in flight");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(count_kind(&proxy.seen, Kind::Leaving), 1);
    assert_eq!(
        proxy.seen.lock().unwrap().leaving,
        vec!["agent stopping".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_control_stream_ends_the_session_and_the_agent_comes_back() {
    let s = Setup::new();
    let proxy = FakeProxy::start(s.proxy_opts()).await;
    let up = Upstream::start().await;
    let agent = s.agent(&proxy.addr, &[&up.addr], &[], "agent.log");
    let (_send, control) = proxy.session(1, Duration::from_secs(10)).await;
    // A ServerShutdown whose body is not JSON; then (new session) a frame over the size limit.
    control
        .send(tunnox::tunnel::frame::Frame::new(
            Kind::ServerShutdown as u8,
            &b"{not json"[..],
        ))
        .await
        .unwrap();
    let (mut send, control) = proxy.session(2, Duration::from_secs(5)).await;
    let resp = send
        .send_request(request("GET", &up.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let huge = tunnox::tunnel::frame::Frame::new(Kind::Heartbeat as u8, vec![b'x'; 70_000]);
    control.send(huge).await.unwrap();
    proxy.session(3, Duration::from_secs(5)).await;
    let log = agent.log();
    assert!(
        log.contains("protocol_error") && log.contains("ServerShutdown frame"),
        "{log}"
    );
    assert!(log.contains("larger than the 65536-byte limit"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_requests_share_one_session() {
    let s = Setup::new();
    let proxy = FakeProxy::start(s.proxy_opts()).await;
    let up = Upstream::start().await;
    let _agent = s.agent(&proxy.addr, &[&up.addr], &[], "agent.log");
    let (send, _control) = proxy.session(1, Duration::from_secs(10)).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut send = send.clone();
        let target = up.addr.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let body = format!("request {i}");
            let resp = send
                .send_request(request("POST", &target, "/", body.clone()))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got, body.as_bytes());
            t.elapsed()
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap());
    }
    times.sort();
    println!(
        "200 concurrent requests on one session: {:?} in all, p50 {:?}, p99 {:?} (debug build)",
        started.elapsed(),
        times[99],
        times[197]
    );
    assert_eq!(proxy.session_count(), 1);
}

#[test]
fn invalid_configuration_names_the_field_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t\n").unwrap();
    std::fs::write(dir.path().join("empty"), "").unwrap();
    let token = dir.path().join("token").display().to_string();
    let empty = dir.path().join("empty").display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--client-id",
                "c",
                "--token-file",
                &token,
                "--allow",
                "localhost:1",
            ],
            "agent.server: is empty",
        ),
        (
            &[
                "--server",
                "proxy",
                "--client-id",
                "c",
                "--token-file",
                &token,
                "--allow",
                "localhost:1",
            ],
            "agent.server: \"proxy\" is not host:port",
        ),
        (
            &[
                "--server",
                "p:1",
                "--token-file",
                &token,
                "--allow",
                "localhost:1",
            ],
            "agent.client_id: is empty",
        ),
        (
            &[
                "--server",
                "p:1",
                "--client-id",
                "c",
                "--token-file",
                &empty,
                "--allow",
                "localhost:1",
            ],
            "agent.token_file:",
        ),
        (
            &[
                "--server",
                "p:1",
                "--client-id",
                "c",
                "--token-file",
                &token,
            ],
            "agent.allow: is empty",
        ),
        (
            &[
                "--server",
                "p:1",
                "--client-id",
                "c",
                "--token-file",
                &token,
                "--allow",
                "3000",
            ],
            "agent.allow: \"3000\" is not host:port",
        ),
        (
            &[
                "--server",
                "p:1",
                "--client-id",
                "c",
                "--token-file",
                &token,
                "--allow",
                "a:1",
                "--sessions",
                "17",
            ],
            "agent.sessions: 17",
        ),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnox"))
            .arg("agent")
            .args(*args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_session_is_declared_dead_and_replaced() {
    let s = Setup::new();
    let mut opts = s.proxy_opts();
    opts.silent = true;
    let proxy = FakeProxy::start(opts).await;
    let up = Upstream::start().await;
    let agent = s.agent(&proxy.addr, &[&up.addr], &[], "agent.log");
    proxy.session(1, Duration::from_secs(10)).await;
    let started = Instant::now();
    // Two 500 ms intervals without a heartbeat, then a new session (backoff's first delay).
    proxy.session(2, Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "declared dead too early: {took:?}"
    );
    assert!(took < Duration::from_millis(2500), "{took:?}");
    let log = agent.log();
    assert!(
        log.contains("session lost") && log.contains("heartbeat_timeout"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_spread_over_the_proxies_the_first_one_names() {
    let s = Setup::new();
    let p2 = FakeProxy::start(s.proxy_opts()).await;
    let mut opts = s.proxy_opts();
    opts.peers = vec![p2.addr.clone(), "not an address".into()];
    let p1 = FakeProxy::start(opts).await;
    let up = Upstream::start().await;
    let _agent = s.agent(&p1.addr, &[&up.addr], &["--sessions", "2"], "agent.log");
    let (mut a, _) = p1.session(1, Duration::from_secs(10)).await;
    let (mut b, _) = p2.session(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((p1.session_count(), p2.session_count()), (1, 1));
    for send in [&mut a, &mut b] {
        let resp = send
            .send_request(request("GET", &up.addr, "/", ""))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn config_file_with_flags_over_it_timeouts_and_plain_connect() {
    let s = Setup::new();
    let proxy = FakeProxy::start(s.proxy_opts()).await;
    let up = Upstream::start().await;
    let file = s.dir.path().join("agent.yaml");
    std::fs::write(
        &file,
        format!(
            "agent:\n  server: 127.0.0.1:1, 127.0.0.1:2\n  client_id: laptop\n  token_file: {}\n  \
             ca_file: {}\n  allow: [{}]\n  response_timeout: 500ms\n",
            s.path("token"),
            s.certs.ca.display(),
            up.addr
        ),
    )
    .unwrap();
    let cfg = file.display().to_string();
    // The file's servers are wrong; --server wins.
    let agent = Role::start(
        &["--config", &cfg, "agent", "--server", &proxy.addr],
        &[],
        &s.dir.path().join("agent.log"),
    );
    let (mut send, _) = proxy.session(1, Duration::from_secs(10)).await;
    let resp = send
        .send_request(request("GET", &up.addr, "/slow", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()[&ERROR_HEADER], "timeout");

    // Plain CONNECT: a raw byte stream to the allowed target (an HTTP/1.1 exchange inside).
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(up.addr.as_str())
        .header(TARGET_HEADER, up.addr.as_str())
        .body(full(""))
        .unwrap();
    let mut resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(
        b"POST / HTTP/1.1\r\nhost: raw\r\ncontent-length: 4\r\nconnection: close\r\n\r\nping",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("ping"),
        "{text}"
    );
    assert!(text.contains("x-seen-host: raw"), "{text}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_reconnect_target_is_skipped_for_a_known_peer() {
    let s = Setup::new();
    let mut opts = s.proxy_opts();
    opts.draining = true;
    let draining = FakeProxy::start(opts).await;
    let p3 = FakeProxy::start(s.proxy_opts()).await;
    let mut opts = s.proxy_opts();
    opts.peers = vec![p3.addr.clone()];
    let p1 = FakeProxy::start(opts).await;
    let up = Upstream::start().await;
    let agent = s.agent(&p1.addr, &[&up.addr], &[], "agent.log");
    let (_send, control) = p1.session(1, Duration::from_secs(10)).await;
    let shutdown = ServerShutdown {
        reason: "rolling_update".into(),
        reconnect_to: Some(draining.addr.clone()),
        grace_period: 5,
    };
    control.send(shutdown.to_frame()).await.unwrap();
    let (mut send, _) = p3.session(1, Duration::from_secs(5)).await;
    assert_eq!(
        draining.seen.lock().unwrap().auths.len(),
        1,
        "tried first, once"
    );
    assert_eq!(draining.session_count(), 0);
    support::process::eventually("Leaving on p1", Duration::from_secs(5), || {
        count_kind(&p1.seen, Kind::Leaving) == 1
    });
    let resp = send
        .send_request(request("GET", &up.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        p1.session_count(),
        1,
        "no new session on the draining proxy"
    );
    let log = agent.log();
    assert!(log.contains("(draining)"), "{log}");
}
