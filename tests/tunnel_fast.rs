//! HTTP to a tunnel client on the proxy's HTTP/1.1 fast path (docs/tunnels.md "HTTP on the fast
//! path"): the real `tunnox proxy` (single-node, TLS 1.3 tunnel listener), the real
//! `tunnox agent` and a real HTTP upstream on loopback. Plain keep-alive requests ride raw
//! streams parked on the agent's session between requests; everything else still takes the
//! general path.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::http::{Reply, Upstream, read_reply};
use support::process::{Role, eventually, free_port, metric};
use support::proxy::ProxyProc;
use support::tunnel::{AgentSpec, Pki, agent, secret_file};

struct Node {
    dir: tempfile::TempDir,
    pki: Pki,
    token: std::path::PathBuf,
    proxy: ProxyProc,
    tunnel: u16,
    upstream: Upstream,
    /// A second service of the same agent (mapping `other`).
    other: Upstream,
}

impl Node {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "fast");
        let token = secret_file(dir.path(), "agent-token", "agent-secret-0123456789");
        let node_token = secret_file(dir.path(), "node-token", "node-secret-0123456789");
        let upstream = Upstream::start("laptop-service");
        let other = Upstream::start("other-service");
        let (up, op) = (upstream.port, other.port);
        let tunnel = free_port();
        let yaml = format!(
            "storage: {{type: memory}}
http_domain: {{base_domains: [tunnox.net]}}
tunnel_clients:
  - {{client_id: laptop, token: agent-secret-0123456789}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_client_id: laptop, target_host: 127.0.0.1, target_port: {up}, custom_headers: {{X-Env: dev}}}}
  - {{subdomain: other, base_domain: tunnox.net, target_client_id: laptop, target_host: 127.0.0.1, target_port: {op}}}"
        );
        let proxy = ProxyProc::start(
            dir.path(),
            "p",
            &yaml,
            &pki.tunnel_yaml(tunnel, &node_token),
        )
        .ready();
        Self {
            dir,
            pki,
            token,
            proxy,
            tunnel,
            upstream,
            other,
        }
    }

    fn agent(&self) -> Role {
        let a = agent(
            self.dir.path(),
            "agent",
            &AgentSpec {
                client_id: "laptop",
                token_file: &self.token,
                ca: &self.pki.ca,
                servers: &[self.tunnel],
                allow: &[
                    format!("127.0.0.1:{}", self.upstream.port),
                    format!("127.0.0.1:{}", self.other.port),
                ],
                extra: &[],
            },
        );
        self.up(a)
    }

    /// The agent with `agent.max_streams` from a configuration file.
    fn agent_with_max_streams(&self, max: u32) -> Role {
        let file = self.dir.path().join("agent.yaml");
        std::fs::write(
            &file,
            format!(
                "agent:\n  server: 127.0.0.1:{}\n  client_id: laptop\n  token_file: {}\n  \
                 ca_file: {}\n  allow: [127.0.0.1:{}, 127.0.0.1:{}]\n  max_streams: {max}\n",
                self.tunnel,
                self.token.display(),
                self.pki.ca.display(),
                self.upstream.port,
                self.other.port,
            ),
        )
        .unwrap();
        let cfg = file.display().to_string();
        let a = Role::start(
            &["--config", &cfg, "agent"],
            &[],
            &self.dir.path().join("agent.log"),
        );
        self.up(a)
    }

    fn up(&self, a: Role) -> Role {
        eventually(
            "the agent's service answers through the proxy",
            Duration::from_secs(15),
            || self.proxy.status("app.tunnox.net") == 200,
        );
        a
    }

    fn metric(&self, sample: &str) -> u64 {
        metric(self.proxy.admin, sample)
    }
}

/// One keep-alive connection to the proxy.
struct Conn(TcpStream);

impl Conn {
    fn open(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self(s)
    }

    fn send(&mut self, method: &str, path: &str, body: &str) -> Reply {
        self.send_to("app.tunnox.net", method, path, body)
    }

    fn send_to(&mut self, host: &str, method: &str, path: &str, body: &str) -> Reply {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.write_all(req.as_bytes()).unwrap();
        read_reply(&mut self.0).expect("a response")
    }
}

#[test]
fn plain_requests_ride_parked_streams_and_a_leaving_agent_takes_them_down() {
    let node = Node::start();
    let mut agent = node.agent();
    let opened = |n: &Node| n.metric("tunnox_tunnel_fast_streams_total{how=\"opened\"}");
    let reused = |n: &Node| n.metric("tunnox_tunnel_fast_streams_total{how=\"reused\"}");
    let elsewhere =
        |n: &Node| n.metric("tunnox_proxy_handovers_total{reason=\"tunnel_elsewhere\"}");
    let (opened_before, reused_before) = (opened(&node), reused(&node));
    let elsewhere_before = elsewhere(&node);

    // Twenty requests on one keep-alive connection: one raw stream (opened now, or parked by
    // the check above), parked after each response and taken again for the next request.
    let mut c = Conn::open(node.proxy.port);
    for i in 0..20 {
        let r = match i % 3 {
            0 => c.send("GET", "/headers", ""),
            1 => c.send("POST", "/echo", &format!("body {i}")),
            _ => c.send("GET", "/", ""),
        };
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.header("x-upstream"), Some("laptop-service"));
        assert_eq!(
            r.header("x-hop"),
            None,
            "hop-by-hop headers are not passed on"
        );
        match i % 3 {
            0 => {
                // What the service was sent: the direct path's headers, nothing of the tunnel.
                let h = r.body.to_ascii_lowercase();
                assert!(h.contains("host: app.tunnox.net"), "{h}");
                assert!(h.contains("x-forwarded-for: 127.0.0.1"), "{h}");
                assert!(h.contains("x-forwarded-proto: http"), "{h}");
                assert!(h.contains("x-env: dev"), "{h}");
                assert!(h.contains("tunnox-hops: 1"), "{h}");
                assert!(!h.contains("tunnox-target"), "{h}");
            }
            1 => assert_eq!(r.body, format!("body {i}")),
            _ => assert_eq!(r.body, "hello from laptop-service\n"),
        }
    }
    let handovers = || {
        let m = node.proxy.admin_get("/metrics").unwrap().body;
        m.lines()
            .filter(|l| l.contains("handovers") || l.contains("fast_streams"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let opened_now = opened(&node) - opened_before;
    assert!(opened_now <= 1, "one stream at most: {}", handovers());
    assert_eq!(
        reused(&node) - reused_before,
        20 - opened_now,
        "reused for every other request: {}",
        handovers()
    );
    assert_eq!(
        elsewhere(&node),
        elsewhere_before,
        "none handed to the general path"
    );

    // Two connections at once: two streams; both parked afterwards and reused.
    let mut d = Conn::open(node.proxy.port);
    let opened_mid = opened(&node);
    let slow = std::thread::spawn({
        let port = node.proxy.port;
        move || {
            let mut e = Conn::open(port);
            e.send("GET", "/slow?ms=300", "").status
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.send("GET", "/", "").status, 200);
    assert_eq!(slow.join().unwrap(), 200);
    assert_eq!(
        opened(&node) - opened_mid,
        1,
        "the second stream, for the slow one"
    );

    // SIGTERM: the agent says Leaving; the proxy closes the parked streams at once, so the
    // agent's GOAWAY finishes at once. Kept open, they would hold the session until the proxy
    // declares it dead (two missed heartbeats: 2 s here, 10 s by default) or the agent's grace
    // period (30 s) ends.
    let started = Instant::now();
    let code = agent.terminate(Duration::from_secs(20));
    let took = started.elapsed();
    println!("agent with parked streams stopped in {took:?}");
    assert_eq!(code, Some(0), "{}", agent.log());
    assert!(
        took < Duration::from_secs(1),
        "parked streams held the agent's session open for {took:?}"
    );

    // Offline now: the general path's own answer (the fast path opened nothing).
    let r = c.send("GET", "/", "");
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("offline"), "{}", r.body);
}

/// Parked streams never keep a stream from opening: the agent's own limit (`agent.max_streams`,
/// told at authentication) bounds the session, a quarter of it may be parked, and a parked
/// stream gives way to a new one.
#[test]
fn parked_streams_give_way_within_the_agents_stream_limit() {
    let node = Node::start();
    let _agent = node.agent_with_max_streams(8);
    // Eight slow requests at once to `app`: eight streams, all of the agent's.
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let port = node.proxy.port;
            std::thread::spawn(move || Conn::open(port).send("GET", "/slow?ms=300", "").status)
        })
        .collect();
    for t in slow {
        assert_eq!(t.join().unwrap(), 200);
    }
    // Now another service of the agent: its stream opens at once (kept open, the eight idle
    // streams would hold every place the agent has and it would wait for the response timeout).
    for i in 0..3 {
        let started = Instant::now();
        let mut c = Conn::open(node.proxy.port);
        let r = c.send_to("other.tunnox.net", "GET", "/", "");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-upstream"), Some("other-service"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} to another target waited {:?}",
            started.elapsed()
        );
    }
}
