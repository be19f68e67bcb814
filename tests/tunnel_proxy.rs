//! The real `tunnox proxy` with a TLS tunnel listener, a minimal in-test agent
//! (`support::tunnel_agent`) and a loopback upstream behind it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnox::tunnel::handshake::HandshakeError;
use tunnox::tunnel::msg::AuthErrorCode;

use support::process::free_port;
use support::proxy::ProxyProc;
use support::tunnel_agent::{self as agent, Certs};

struct Setup {
    _dir: tempfile::TempDir,
    certs: Certs,
    proxy: ProxyProc,
    tunnel: SocketAddr,
    upstream: SocketAddr,
}

async fn single_node() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let certs = agent::make_certs(dir.path());
    let upstream = agent::upstream().await;
    let tport = free_port();
    let up = upstream.port();
    let yaml = format!(
        "storage: {{type: memory}}
http_domain: {{base_domains: [tunnox.net]}}
egress: {{allow: [\"127.0.0.0/8\"]}}
tunnel_clients:
  - {{client_id: laptop, token: s3cret}}
  - {{client_id: other, token: other-token}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_client_id: laptop, target_host: 127.0.0.1, target_port: {up}, custom_headers: {{X-Env: dev}}}}
  - {{subdomain: off, base_domain: tunnox.net, target_client_id: other, target_host: 127.0.0.1, target_port: {up}}}
  - {{subdomain: denied, base_domain: tunnox.net, target_client_id: laptop, target_host: 127.0.0.1, target_port: 1}}"
    );
    let extra = format!(
        "tunnel: {{listen: \"127.0.0.1:{tport}\", cert_file: {}, key_file: {}, heartbeat_interval: 1s, handshake_timeout: 2s, max_sessions_per_client: 2}}",
        certs.cert.display(),
        certs.key.display()
    );
    let proxy =
        tokio::task::block_in_place(|| ProxyProc::start(dir.path(), "p1", &yaml, &extra).ready());
    Setup {
        _dir: dir,
        certs,
        proxy,
        tunnel: SocketAddr::from(([127, 0, 0, 1], tport)),
        upstream,
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(HttpConnector::new())
}

async fn send(
    c: &Client<HttpConnector, Full<Bytes>>,
    port: u16,
    host: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Bytes) {
    let req = Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .header("tunnox-target", "127.0.0.1:22")
        .header("x-forwarded-for", "192.0.2.9")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("answered in time")
        .expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// The proxy's log without colour codes.
fn plain_log(p: &ProxyProc) -> String {
    let raw = p.log();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn metric(p: &ProxyProc, name: &str) -> String {
    let m = p.admin_get("/metrics").map(|r| r.body).unwrap_or_default();
    m.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `p` holds `n` tunnel sessions (registered after the agent's `AuthOk`).
async fn sessions_held(p: &ProxyProc, n: usize) {
    let want = format!("tunnox_tunnel_sessions {n}");
    for _ in 0..100 {
        if tokio::task::block_in_place(|| metric(p, "tunnox_tunnel_sessions ")) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{want}: {}", metric(p, "tunnox_tunnel_sessions "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_bodies_websockets_and_refusals_through_one_session() {
    let mut s = single_node().await;
    let port = s.proxy.port;
    let c = client();

    // Offline client: the proxy's own 502 saying so.
    let (st, _, body) = send(&c, port, "off.tunnox.net", "/echo", vec![]).await;
    assert_eq!(st, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("offline"), "{text}");

    let allow = vec![s.upstream.to_string()];
    let a = agent::connect(
        s.tunnel,
        &s.certs.ca,
        "laptop",
        "s3cret",
        "i1",
        allow.clone(),
    )
    .await
    .expect("agent admitted");
    assert!(!a.ok.session_id.is_empty());
    assert_eq!(a.ok.heartbeat_interval_ms, 1000);
    sessions_held(&s.proxy, 1).await;

    // 5 MB up, echoed back intact; headers as on the direct path, tunnel headers not leaked.
    let up: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
    let started = std::time::Instant::now();
    let (st, h, body) = send(&c, port, "app.tunnox.net", "/echo", up.clone()).await;
    eprintln!("5 MB up and echoed back: {:?}", started.elapsed());
    assert_eq!(st, 200);
    assert_eq!(body.len(), up.len());
    assert!(body == up, "5 MB echoed intact");
    assert_eq!(h["x-got-host"], "app.tunnox.net");
    assert_eq!(h["x-got-xff"], "192.0.2.9, 127.0.0.1");
    assert_eq!(h["x-got-hops"], "1");
    assert_eq!(h["x-got-env"], "dev");
    assert_eq!(
        h["x-got-tunnox"], "",
        "no tunnox-* header reaches the service"
    );

    // 5 MB down.
    let n = 5 * 1024 * 1024;
    let (st, _, body) = send(&c, port, "app.tunnox.net", &format!("/big?n={n}"), vec![]).await;
    assert_eq!(st, 200);
    assert_eq!(body.len(), n);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    // 200 concurrent requests share the one session.
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let msg = format!("request {i}").into_bytes();
            let (st, _, body) = send(&c, port, "app.tunnox.net", "/echo", msg.clone()).await;
            (st, body == msg)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, true));
    }
    eprintln!(
        "200 concurrent requests through one session: {:?}",
        started.elapsed()
    );
    assert!(
        metric(&s.proxy, "tunnox_tunnel_sessions ").ends_with(" 1"),
        "{}",
        metric(&s.proxy, "tunnox_tunnel_sessions")
    );

    // WebSocket through extended CONNECT: 101 with the service's headers, then bytes echo.
    let mut ws = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: app.tunnox.net\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-accept: for-abc"), "{head}");
    for round in 0..3 {
        let m = format!("frame {round}");
        ws.write_all(m.as_bytes()).await.unwrap();
        let mut back = vec![0u8; m.len()];
        tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, m.as_bytes());
    }
    drop(ws);

    // A target outside the agent's allow-list: its tunnox-error becomes the proxy's 502.
    let (st, _, _) = send(&c, port, "denied.tunnox.net", "/echo", vec![]).await;
    assert_eq!(st, 502);
    let log = plain_log(&s.proxy);
    assert!(
        log.contains("not_allowed") && log.contains("laptop"),
        "{log}"
    );

    // Refusals: wrong token, another client's token, unknown client — one answer.
    for (id, token) in [
        ("laptop", "wrong"),
        ("laptop", "other-token"),
        ("ghost", "s3cret"),
    ] {
        let e = agent::connect(s.tunnel, &s.certs.ca, id, token, "x", allow.clone())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(&e, HandshakeError::Refused(r) if r.code == AuthErrorCode::BadCredentials),
            "{id}/{token}: {e}"
        );
    }
    // Plain TCP (an HTTP request) and garbage on the TLS listener: closed, logged.
    // (A record that claims more than arrives is closed at proxy.tunnel.handshake_timeout.)
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x99, 3, 3, 0, 2, 1, 2][..],
        &[0x16, 3, 1, 0, 9, 0xff, 0xff, 0, 0, 1, 2][..],
    ] {
        let mut t = tokio::net::TcpStream::connect(s.tunnel).await.unwrap();
        t.write_all(junk).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert!(
            n == 0 || buf[0] == 0x15,
            "no tunnel for a non-TLS peer: {:?}",
            &buf[..n]
        );
    }
    // TLS, then garbage instead of an Auth frame.
    {
        let tls = tunnox::tunnel::tls::client_config(Some(&s.certs.ca)).unwrap();
        let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(s.tunnel).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut io = conn.connect(name, tcp).await.unwrap();
        io.write_all(b"TNOX\x01\xff\xff\xff\xffgarbage")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut buf)).await;
    }
    let log = plain_log(&s.proxy);
    for want in [
        "tunnel session refused: bad credentials",
        "client_id=ghost",
        "TLS handshake failed",
        "no valid Auth frame",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    assert!(
        !log.contains("s3cret") && !log.contains("other-token"),
        "tokens never logged"
    );
    // Still healthy, and the session still serves.
    assert_eq!(s.proxy.admin_get("/readyz").unwrap().status, 200);
    let (st, _, body) = send(&c, port, "app.tunnox.net", "/echo", b"after".to_vec()).await;
    assert_eq!((st, &body[..]), (200, &b"after"[..]));
    assert!(a.is_running());

    // An authenticated agent sending garbage on its control stream loses its session; the
    // other session keeps serving.
    let g = agent::connect(
        s.tunnel,
        &s.certs.ca,
        "laptop",
        "s3cret",
        "g1",
        allow.clone(),
    )
    .await
    .expect("admitted");
    sessions_held(&s.proxy, 2).await;
    // A third of this client's sessions is over max_sessions_per_client: told why.
    let e = agent::connect(
        s.tunnel,
        &s.certs.ca,
        "laptop",
        "s3cret",
        "third",
        allow.clone(),
    )
    .await
    .err()
    .expect("over the per-client limit");
    assert!(
        matches!(&e, HandshakeError::Refused(r) if r.code == AuthErrorCode::TooManySessions),
        "{e}"
    );
    g.control
        .send(Bytes::from_static(b"NOT A FRAME AT ALL"))
        .await
        .unwrap();
    sessions_held(&s.proxy, 1).await;
    assert!(plain_log(&s.proxy).contains("bad control frame"));
    for _ in 0..5 {
        let (st, _, body) = send(&c, port, "app.tunnox.net", "/echo", b"still".to_vec()).await;
        assert_eq!((st, &body[..]), (200, &b"still"[..]));
    }
    drop(g);

    // A reconnect of the same agent session replaces it at once.
    let b = agent::connect(
        s.tunnel,
        &s.certs.ca,
        "laptop",
        "s3cret",
        "i1",
        allow.clone(),
    )
    .await
    .expect("reconnect admitted");
    assert_ne!(b.ok.session_id, a.ok.session_id);
    let (st, _, _) = send(&c, port, "app.tunnox.net", "/echo", b"x".to_vec()).await;
    assert_eq!(st, 200);
    let mut replaced = String::new();
    for _ in 0..100 {
        replaced = tokio::task::block_in_place(|| {
            metric(
                &s.proxy,
                "tunnox_tunnel_session_events_total{outcome=\"replaced\"",
            )
        });
        if replaced.ends_with(" 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replaced.ends_with(" 1"), "{replaced}");
    sessions_held(&s.proxy, 1).await;

    // The agent goes silent: two heartbeat intervals later its session is dead and the client
    // offline.
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (st, _, body) = send(&c, port, "app.tunnox.net", "/echo", vec![]).await;
    assert_eq!(st, 502, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("offline"));

    // SIGTERM: the agent is told it is a shutdown (no other node to go to); the proxy waits for
    // its session, and exits as soon as the agent has gone.
    let c1 = agent::connect(
        s.tunnel,
        &s.certs.ca,
        "laptop",
        "s3cret",
        "i3",
        allow.clone(),
    )
    .await
    .expect("admitted");
    sessions_held(&s.proxy, 1).await;
    let pid = s.proxy.role.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut shutdown = None;
    for _ in 0..50 {
        if let Some(x) = c1.seen.lock().unwrap().shutdowns.first().cloned() {
            shutdown = Some(x);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shutdown = shutdown.expect("ServerShutdown on SIGTERM");
    assert_eq!(shutdown.reason, "shutdown");
    assert_eq!(shutdown.reconnect_to, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.proxy.role.is_running(), "waits for the session");
    drop(c1);
    let started = std::time::Instant::now();
    let code = tokio::task::block_in_place(|| s.proxy.role.terminate(Duration::from_secs(15)));
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// Two proxies on one Redis, each with a tunnel listener and the fleet's node token.
struct TwoNodes {
    _redis: support::RedisServer,
    dir: tempfile::TempDir,
    certs: Certs,
    a: ProxyProc,
    b: ProxyProc,
    ta: SocketAddr,
    tb: SocketAddr,
    upstream: SocketAddr,
    store: tunnox::store::RedisStore,
}

async fn two_nodes() -> TwoNodes {
    use tunnox::store::{MappingStore, RedisOptions, RedisStore, TunnelRegistry};
    use tunnox::tunnel::credential::{ClientCredential, TokenHash};
    let redis = tokio::task::block_in_place(support::RedisServer::start);
    let dir = tempfile::tempdir().unwrap();
    let certs = agent::make_certs(dir.path());
    let upstream = agent::upstream().await;
    let store = RedisStore::connect(RedisOptions::new(&redis.addr()))
        .await
        .unwrap();
    // What the controller writes: the token's hash, and a mapping with a tunnel target.
    store
        .put_credential(&ClientCredential {
            client_id: "laptop".into(),
            token_sha256: TokenHash::of("s3cret"),
            placement: None,
            source: Some("k8s:team-a/laptop".into()),
        })
        .await
        .unwrap();
    let mut spec =
        tunnox::domain::MappingSpec::new("app", "tunnox.net", "127.0.0.1", upstream.port());
    spec.target_client_id = Some("laptop".into());
    store.create(spec).await.unwrap();
    std::fs::write(dir.path().join("node-token"), "fleet-secret\n").unwrap();
    let yaml = format!(
        "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net]}}
egress: {{allow: [\"127.0.0.0/8\"]}}",
        redis.addr()
    );
    let start = |name: &str, tport: u16| {
        let extra = format!(
            "drain: {{grace_period: 5s}}, tunnel: {{listen: \"127.0.0.1:{tport}\", cert_file: {}, key_file: {}, heartbeat_interval: 1s, node_token_file: {}}}",
            certs.cert.display(),
            certs.key.display(),
            dir.path().join("node-token").display(),
        );
        tokio::task::block_in_place(|| ProxyProc::start(dir.path(), name, &yaml, &extra).ready())
    };
    let (pa, pb) = (free_port(), free_port());
    let a = start("a", pa);
    let b = start("b", pb);
    TwoNodes {
        _redis: redis,
        dir,
        certs,
        a,
        b,
        ta: SocketAddr::from(([127, 0, 0, 1], pa)),
        tb: SocketAddr::from(([127, 0, 0, 1], pb)),
        upstream,
        store,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_node_serves_through_the_holder_and_a_drain_moves_the_agent() {
    let n = two_nodes().await;
    let c = client();
    let allow = vec![n.upstream.to_string()];
    let a1 = agent::connect(n.ta, &n.certs.ca, "laptop", "s3cret", "i1", allow.clone())
        .await
        .expect("admitted by a");
    assert_eq!(
        a1.ok.peers,
        vec![n.tb.to_string()],
        "AuthOk names the other node"
    );
    sessions_held(&n.a, 1).await;

    // Served on a (the holder) and on b (forwarded to a with the node token).
    for p in [&n.a, &n.b] {
        let (st, h, body) = send(&c, p.port, "app.tunnox.net", "/echo", b"hello".to_vec()).await;
        assert_eq!((st, &body[..]), (200, &b"hello"[..]), "via {}", p.port);
        assert_eq!(
            h["x-got-tunnox"], "",
            "the node token never reaches the service"
        );
    }
    assert!(
        metric(
            &n.b,
            "tunnox_tunnel_forwarded_to_peer_total{outcome=\"ok\"}"
        )
        .ends_with(" 1"),
        "{}",
        metric(&n.b, "tunnox_tunnel_forwarded_to_peer_total")
    );
    // A forged node token: 403, logged.
    let forged = Request::get(format!("http://127.0.0.1:{}/echo", n.a.port))
        .header("host", "app.tunnox.net")
        .header("tunnox-node", "guess")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.request(forged).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert!(plain_log(&n.a).contains("wrong tunnox-node token"));

    // Drain a: its agent is told to move to b, moves (make-before-break), and leaves a.
    let drain = Request::post(format!("http://127.0.0.1:{}/drain?wait=1s", n.a.admin))
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(drain))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut shutdown = None;
    for _ in 0..50 {
        if let Some(s) = a1.seen.lock().unwrap().shutdowns.first().cloned() {
            shutdown = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shutdown = shutdown.expect("ServerShutdown received");
    assert_eq!(shutdown.reason, "rolling_update");
    assert_eq!(shutdown.reconnect_to, Some(n.tb.to_string()));
    assert_eq!(shutdown.grace_period, 5);
    // A new session to the draining node is refused.
    let e = agent::connect(n.ta, &n.certs.ca, "laptop", "s3cret", "i2", allow.clone())
        .await
        .err()
        .expect("refused while draining");
    assert!(
        matches!(&e, HandshakeError::Refused(r) if r.code == AuthErrorCode::Draining),
        "{e}"
    );
    let a2 = agent::connect(n.tb, &n.certs.ca, "laptop", "s3cret", "i1", allow.clone())
        .await
        .expect("admitted by b");
    sessions_held(&n.b, 1).await;
    a1.leave();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Requests keep working on both nodes: b serves locally, a sends them to b.
    for p in [&n.b, &n.a] {
        let (st, _, body) = send(&c, p.port, "app.tunnox.net", "/echo", b"moved".to_vec()).await;
        assert_eq!((st, &body[..]), (200, &b"moved"[..]), "via {}", p.port);
    }
    assert!(
        metric(
            &n.a,
            "tunnox_tunnel_forwarded_to_peer_total{outcome=\"ok\"}"
        )
        .ends_with(" 1"),
        "a forwards to b once its own session is leaving: {}",
        metric(&n.a, "tunnox_tunnel_forwarded_to_peer_total")
    );
    // The old session, on the draining node, never writes itself back over its replacement:
    // sampled across several heartbeats, the store names only b's session for this agent slot.
    {
        use tunnox::store::TunnelRegistry;
        for _ in 0..25 {
            let recs = n.store.sessions("laptop").await.unwrap();
            let nodes: Vec<(&str, &str)> = recs
                .iter()
                .map(|r| (r.node_id.as_str(), r.session_id.as_str()))
                .collect();
            assert_eq!(nodes, vec![("b", a2.ok.session_id.as_str())]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (st, _, _) = send(&c, n.a.port, "app.tunnox.net", "/echo", b"x".to_vec()).await;
    assert_eq!(st, 200);
    drop(a1);
    assert!(a2.is_running());
    let _ = &n.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_holder_leaves_a_stale_record_that_routes_nothing() {
    let mut n = two_nodes().await;
    let c = client();
    let allow = vec![n.upstream.to_string()];
    let a1 = agent::connect(n.ta, &n.certs.ca, "laptop", "s3cret", "i1", allow.clone())
        .await
        .expect("admitted by a");
    sessions_held(&n.a, 1).await;
    // b finds a through the session's record, written just after the session enters a's
    // table: wait for the record too.
    {
        use tunnox::store::TunnelRegistry;
        for _ in 0..100 {
            if !n.store.sessions("laptop").await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (st, _, _) = send(&c, n.b.port, "app.tunnox.net", "/echo", b"x".to_vec()).await;
    assert_eq!(st, 200, "b forwards to a");
    // SIGKILL: a's session record stays in Redis until its TTL.
    n.a.role.kill();
    drop(a1);
    {
        use tunnox::store::TunnelRegistry;
        assert_eq!(
            n.store.sessions("laptop").await.unwrap().len(),
            1,
            "stale record still there"
        );
    }
    // A bodiless request: the unreachable holder is skipped, the client is offline.
    let started = std::time::Instant::now();
    let (st, _, body) = send(&c, n.b.port, "app.tunnox.net", "/echo", vec![]).await;
    assert_eq!(st, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("offline"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The agent is back on b: served.
    let _a2 = agent::connect(n.tb, &n.certs.ca, "laptop", "s3cret", "i1", allow.clone())
        .await
        .expect("admitted by b");
    sessions_held(&n.b, 1).await;
    let (st, _, body) = send(&c, n.b.port, "app.tunnox.net", "/echo", b"back".to_vec()).await;
    assert_eq!((st, &body[..]), (200, &b"back"[..]));
}
