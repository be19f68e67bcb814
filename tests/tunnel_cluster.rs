//! Tunnels across a fleet (issue #15 acceptance): three real `tunnox proxy` processes on one
//! redis-server with TLS tunnel listeners, one real `tunnox agent` beside a local upstream.
//! Requests reach the agent through any proxy (node-to-node forwarding); a rolling restart of
//! all three under load fails no request (make-before-break); a SIGKILLed holder loses the
//! client only for the reconnect backoff, and its stale session record routes nothing.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::RedisServer;
use support::balancer::Balancer;
use support::http::{Upstream, raw};
use support::process::{Role, eventually, free_port};
use support::proxy::ProxyProc;
use support::tunnel::{AgentSpec, Pki, agent, secret_file};
use tunnox::domain::MappingSpec;
use tunnox::store::{
    MappingStore as _, RedisOptions, RedisStore, SessionRecord, SessionState, TunnelRegistry,
};
use tunnox::tunnel::credential::{ClientCredential, TokenHash};

const HOST: &str = "app.tunnox.net";
/// The text of an HTTPS fleet's store key file.
const STORE_KEY_TEXT: &str = "cluster-test-store-key-0123456789abcdef0123";
const CLIENT: &str = "laptop";

struct Node {
    /// The node id of the running generation (a restarted proxy is a new pod: a new name).
    name: String,
    index: usize,
    generation: u32,
    http: u16,
    admin: u16,
    tunnel: u16,
    /// The HTTPS listener's port (used with `Fleet::start_https`).
    https: u16,
    proc: Option<ProxyProc>,
}

struct Fleet {
    redis: RedisServer,
    dir: tempfile::TempDir,
    up: Upstream,
    rt: tokio::runtime::Runtime,
    store: RedisStore,
    pki: Pki,
    node_token: PathBuf,
    agent_token: PathBuf,
    nodes: Vec<Node>,
    /// The store key file every node opens sealed certificates with (HTTPS fleets only).
    store_key: Option<PathBuf>,
    /// Each node's proxy set, by index (none: the default set).
    sets: Vec<&'static str>,
}

impl Fleet {
    /// Redis, an upstream, a credential for `laptop`, a mapping to it, and `n` ready proxies.
    fn start(n: usize) -> Self {
        Self::start_with(n, false)
    }

    /// A fleet whose nodes also listen for HTTPS, sharing a store key.
    fn start_https(n: usize) -> Self {
        Self::start_with(n, true)
    }

    fn start_with(n: usize, https: bool) -> Self {
        Self::start_placed(n, https, &[], None, false)
    }

    /// A fleet whose node `i` runs in set `sets[i]`, the mapping placed on `placement`, and
    /// the client too when `agent_placed` (as its TunnelSet's placement would).
    fn start_placed(
        n: usize,
        https: bool,
        sets: &[&'static str],
        placement: Option<&str>,
        agent_placed: bool,
    ) -> Self {
        let redis = RedisServer::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt
            .block_on(RedisStore::connect(RedisOptions::new(&redis.addr())))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "fleet");
        let node_token = secret_file(dir.path(), "node-token", "node-secret-0123456789");
        let agent_token = secret_file(dir.path(), "agent-token", "agent-secret-0123456789");
        let up = Upstream::start("behind-the-tunnel");
        rt.block_on(
            store.put_credential(&ClientCredential {
                client_id: CLIENT.into(),
                token_sha256: TokenHash::of("agent-secret-0123456789"),
                placement: placement
                    .filter(|_| agent_placed)
                    .map(|p| tunnox::domain::SetName::parse(p).unwrap()),
                source: Some("test".into()),
            }),
        )
        .unwrap();
        let mut spec = MappingSpec::new("app", "tunnox.net", "127.0.0.1", up.port);
        spec.target_client_id = Some(CLIENT.into());
        spec.placement = placement.map(|p| tunnox::domain::SetName::parse(p).unwrap());
        rt.block_on(store.create(spec)).unwrap();
        let mut fleet = Self {
            redis,
            dir,
            up,
            rt,
            store,
            pki,
            node_token,
            agent_token,
            nodes: Vec::new(),
            store_key: None,
            sets: sets.to_vec(),
        };
        if https {
            fleet.store_key = Some(secret_file(fleet.dir.path(), "store-key", STORE_KEY_TEXT));
        }
        for i in 0..n {
            let node = Node {
                name: String::new(),
                index: i,
                generation: 0,
                http: free_port(),
                admin: free_port(),
                tunnel: free_port(),
                https: free_port(),
                proc: None,
            };
            fleet.nodes.push(node);
            fleet.boot(i);
        }
        fleet
    }

    fn yaml(&self) -> String {
        let key = self
            .store_key
            .as_ref()
            .map(|k| format!(", tls_store_key_file: \"{}\"", k.display()))
            .unwrap_or_default();
        format!(
            "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net], sync: {{check_interval: 1s}}{key}}}
egress: {{allow: [\"127.0.0.0/8\"]}}
log: {{level: debug}}",
            self.redis.addr()
        )
    }

    /// Starts node `i` (again) on its ports and waits until it is ready.
    fn boot(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.name = match n.generation {
            0 => format!("p{}", n.index),
            g => format!("p{}-{g}", n.index),
        };
        n.generation += 1;
        let n = &self.nodes[i];
        // Each node's remote ports on its own loopback address (one machine, one port number).
        let tunnel = self.pki.tunnel_yaml(n.tunnel, &self.node_token).replacen(
            "heartbeat_interval: 1s}",
            &format!(
                "heartbeat_interval: 1s, remote_bind: 127.0.0.{}}}",
                n.index + 1
            ),
            1,
        );
        let https = match &self.store_key {
            Some(_) => format!(", tls_listen: \"127.0.0.1:{}\"", n.https),
            None => String::new(),
        };
        let set = match self.sets.get(i) {
            Some(set) => format!(", set: \"{set}\""),
            None => String::new(),
        };
        let extra = format!(
            "registry: {{heartbeat_interval: 500ms, ttl: 3s}}, drain: {{propagation_delay: 1s, grace_period: 10s}}, {tunnel}{https}{set}"
        );
        let p = ProxyProc::start_on(
            self.dir.path(),
            &n.name,
            &self.yaml(),
            &extra,
            n.http,
            n.admin,
        )
        .ready();
        self.nodes[i].proc = Some(p);
    }

    fn agent(&self, servers: &[usize], extra: &[&str]) -> Role {
        let ports: Vec<u16> = servers.iter().map(|i| self.nodes[*i].tunnel).collect();
        agent(
            self.dir.path(),
            "agent",
            &AgentSpec {
                client_id: CLIENT,
                token_file: &self.agent_token,
                ca: &self.pki.ca,
                servers: &ports,
                allow: &[format!("127.0.0.1:{}", self.up.port)],
                extra,
            },
        )
    }

    fn sessions(&self) -> Vec<SessionRecord> {
        self.rt.block_on(self.store.sessions(CLIENT)).unwrap()
    }

    /// The node holding the client's active session, if exactly one does.
    fn holder(&self) -> Option<String> {
        let active: Vec<SessionRecord> = self
            .sessions()
            .into_iter()
            .filter(|s| s.state == SessionState::Active)
            .collect();
        match active.as_slice() {
            [one] => Some(one.node_id.clone()),
            _ => None,
        }
    }

    fn index_of(&self, node: &str) -> usize {
        self.nodes.iter().position(|n| n.name == node).unwrap()
    }

    fn status_via(&self, i: usize) -> u16 {
        support::http::status(self.nodes[i].http, HOST)
    }

    fn log(&self, i: usize) -> String {
        self.nodes[i]
            .proc
            .as_ref()
            .map(ProxyProc::log)
            .unwrap_or_default()
    }
}

fn agent_log(f: &Fleet) -> String {
    std::fs::read_to_string(f.dir.path().join("agent.log")).unwrap_or_default()
}

/// Warnings, errors and failed requests from every process's log (every generation), for a
/// failure message.
fn trouble(f: &Fleet) -> String {
    let mut out = String::new();
    let mut logs: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for path in logs {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("request failed"))
        {
            out.push_str(&format!(
                "{}: {line}\n",
                path.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    out
}

#[test]
fn every_proxy_serves_a_client_connected_to_one() {
    let f = Fleet::start(3);
    let _agent = f.agent(&[0], &[]);
    eventually("agent session on p0", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p0")
    });
    for i in 0..3 {
        eventually(&format!("served via p{i}"), Duration::from_secs(10), || {
            f.status_via(i) == 200
        });
        let r = support::http::get(f.nodes[i].http, HOST, "/").unwrap();
        assert_eq!(r.status, 200, "via p{i}: {r:?}\n{}", f.log(i));
        assert_eq!(r.body, "hello from behind-the-tunnel\n");
    }
    // 5 MB up and back down through p2, which forwards to p0, which holds the session.
    let body: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "-H", &format!("Host: {HOST}")])
        .args(["--data-binary", "@-", "-o", "-"])
        .arg(format!("http://127.0.0.1:{}/echo", f.nodes[2].http))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&body)?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.stdout == body,
        "5 MB echoed through p2 → p0 → agent: got {} bytes",
        out.stdout.len()
    );
    // Only proxies may claim to be one: a forged node header is refused.
    let forged = raw(
        f.nodes[1].http,
        format!(
            "GET / HTTP/1.1\r\nHost: {HOST}\r\ntunnox-node: guess\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(forged.status, 403, "{forged:?}");
}

/// A mapping placed on `novel.sh` whose agent is connected to a `novel.sz` node (agents do not
/// choose their set yet): `novel.sz` forwards the request to `novel.sh`, which relays it to the
/// session back on `novel.sz` — served, not bounced between the sets until the hop limit.
#[test]
fn a_placed_tunnel_mapping_reaches_an_agent_on_another_set() {
    let f = Fleet::start_placed(2, false, &["novel.sh", "novel.sz"], Some("novel.sh"), false);
    let _agent = f.agent(&[1], &[]);
    eventually("agent session on p1", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p1")
    });
    for i in [1, 0, 1] {
        eventually(&format!("served via p{i}"), Duration::from_secs(10), || {
            f.status_via(i) == 200
        });
        let r = support::http::get(f.nodes[i].http, HOST, "/headers").unwrap();
        assert_eq!(r.status, 200, "via p{i}: {r:?}\n{}", trouble(&f));
    }
    // Entered at p1 (novel.sz): p1 → p0 (the serving set) → p1 (the session) → agent.
    let r = support::http::get(f.nodes[1].http, HOST, "/headers").unwrap();
    assert!(r.body.contains("tunnox-hops: 3"), "{}", r.body);
}

/// Issue #18's sequence for an agent placed on `novel.sh` (sets `novel.sh`, `novel.sz`,
/// `novel.*`, `ams.sh`, one proxy each), given only the addresses of the wrong sets: refused
/// there with the address of its home set, it connects home; home killed → the DR set; the DR
/// set killed too → any proxy of its business; home back → it moves home, make-before-break.
/// Never to `ams.sh`; HTTP through every `novel` proxy reaches it whenever home or DR serves.
#[test]
fn a_placed_agent_and_its_remote_port_go_home_fall_back_to_dr_and_move_back() {
    use std::io::{Read, Write};
    use tunnox::store::{PortClaim, PortRegistry as _, PortRequest};
    let sets = ["novel.sh", "novel.sz", "novel.*", "ams.sh"];
    let mut f = Fleet::start_placed(4, false, &sets, Some("novel.sh"), true);
    // A TCP remote port of the client's TunnelSet, placed on novel.sh as the controller claims
    // it: in the business's port space.
    let echo = support::echo::tcp();
    let port = free_port();
    let home = tunnox::domain::SetName::parse("novel.sh").unwrap();
    let claim = PortClaim {
        holder: "k8s:test/ns/ts".into(),
        set: Some(home.clone()),
        client_id: CLIENT.into(),
        name: "ssh".into(),
        target: format!("127.0.0.1:{echo}"),
        udp: false,
        max_connections: None,
        max_bytes_per_second: None,
        health_check: None,
        group: None,
        balance: None,
        members: Vec::new(),
        udp_idle_ms: None,
    };
    let held =
        f.rt.block_on(f.store.claim_ports(
            &home,
            "k8s:test/ns/ts",
            &[PortRequest { port, claim }],
            (1, 65535),
        ))
        .unwrap();
    assert_eq!(held, [tunnox::store::PortOutcome::Held(port)]);
    let allow = format!("127.0.0.1:{echo}");
    let _agent = f.agent(&[1, 3], &["--allow", &allow]);
    // Node i listens on 127.0.0.(i+1).
    let echoes = |i: usize| -> bool {
        let ip = format!("127.0.0.{}", i + 1);
        let Ok(mut c) = std::net::TcpStream::connect((ip.as_str(), port)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
        let mut buf = [0u8; 4];
        c.write_all(b"ping").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"ping"
    };
    let listens = |i: usize| {
        std::net::TcpStream::connect((format!("127.0.0.{}", i + 1).as_str(), port)).is_ok()
    };
    let port_on = |i: usize, others: &[usize]| {
        let took = eventually(
            &format!("remote port served by p{i} only"),
            Duration::from_secs(15),
            || echoes(i) && others.iter().all(|&o| !listens(o)),
        );
        println!("remote port on p{i} after {took:?}");
    };
    let on = |f: &Fleet, want: &str, within: u64| {
        let took = eventually(
            &format!("agent on {want}"),
            Duration::from_secs(within),
            || f.holder().is_some_and(|h| h.starts_with(want)),
        );
        println!("agent on {want} after {took:?}");
    };
    let served = |f: &Fleet, via: &[usize]| {
        for &i in via {
            eventually(&format!("served via p{i}"), Duration::from_secs(10), || {
                f.status_via(i) == 200
            });
        }
    };
    on(&f, "p0", 15);
    served(&f, &[0, 1, 2]);
    assert_eq!(f.status_via(3), 421, "another business");
    port_on(0, &[1, 2, 3]);

    // novel.sh down: the DR set takes the agent, the mapping and the remote port over.
    f.nodes[0].proc.take().unwrap().role.kill();
    on(&f, "p2", 20);
    served(&f, &[1, 2]);
    port_on(2, &[1, 3]);

    // No set of the placement left: novel.sz never listens on it.
    f.nodes[2].proc.take().unwrap().role.kill();
    on(&f, "p1", 20);
    eventually("nobody listens", Duration::from_secs(5), || !listens(1));

    f.boot(2);
    f.boot(0);
    // Home is back: the proxy holding the agent sends it home; the agent opens its new session
    // before it leaves the old one. The DR set closes the port again.
    on(&f, "p0", 20);
    served(&f, &[0, 1, 2]);
    port_on(0, &[1, 2, 3]);
    let log = agent_log(&f);
    assert!(log.contains("moved to a new session"), "{log}");
    assert!(
        log.contains("other_set"),
        "refused by proxies of other sets: {log}"
    );
    assert!(
        !f.log(3).contains("tunnel session opened"),
        "never on ams.sh"
    );
}

#[test]
fn headers_websockets_and_two_hundred_concurrent_requests_share_one_session() {
    let f = Fleet::start(2);
    let _agent = f.agent(&[0], &[]);
    eventually("agent session on p0", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p0")
    });
    eventually("served via p1", Duration::from_secs(10), || {
        f.status_via(1) == 200
    });
    // What the service behind the agent is told, through p1 → p0 → agent.
    let seen = support::http::get(f.nodes[1].http, HOST, "/headers").unwrap();
    assert_eq!(seen.status, 200, "{seen:?}");
    for want in [
        "host: app.tunnox.net",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-host: app.tunnox.net",
        "x-forwarded-proto: http",
    ] {
        assert!(seen.body.contains(want), "{want:?} not in:\n{}", seen.body);
    }
    for gone in ["tunnox-target", "tunnox-node", "tunnox-control"] {
        assert!(
            !seen.body.contains(gone),
            "{gone} reached the service:\n{}",
            seen.body
        );
    }
    assert_eq!(seen.header("x-upstream"), Some("behind-the-tunnel"));
    assert_eq!(seen.header("x-hop"), None, "hop-by-hop header passed on");

    // WebSocket-style upgrade on both proxies: 101, then bytes echoed both ways.
    for node in &f.nodes {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", node.http)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut b).unwrap(),
                1,
                "closed during the head: {head:?}"
            );
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "via {}: {head}",
            node.name
        );
        for msg in ["ping through the tunnel", "and a second frame"] {
            s.write_all(msg.as_bytes()).unwrap();
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, msg.as_bytes(), "via {}", node.name);
        }
    }

    // 200 requests at once, each held 300 ms by the service: all answered, over the one session.
    let port = f.nodes[0].http;
    let started = Instant::now();
    let workers: Vec<_> = (0..200)
        .map(|_| {
            std::thread::spawn(move || {
                support::http::get(port, HOST, "/slow?ms=300").map(|r| r.status)
            })
        })
        .collect();
    let statuses: Vec<Option<u16>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let took = started.elapsed();
    let ok = statuses.iter().filter(|s| **s == Some(200)).count();
    assert_eq!(ok, 200, "{statuses:?}");
    eprintln!("200 concurrent 300 ms requests through one session in {took:?}");
    // Concurrent, not queued one by one (200 × 300 ms would be a minute).
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(f.sessions().len(), 1, "{:?}", f.sessions());
}

#[test]
fn rolling_restart_of_every_proxy_under_load_fails_no_request() {
    let mut f = Fleet::start(3);
    let _agent = f.agent(&[0, 1, 2], &[]);
    eventually("agent session", Duration::from_secs(15), || {
        f.holder().is_some()
    });
    let http: Vec<u16> = f.nodes.iter().map(|n| n.http).collect();
    let lb_port = free_port();
    let lb = Balancer::start(f.dir.path(), lb_port, &http);
    eventually(
        "served through the balancer",
        Duration::from_secs(10),
        || support::http::status(lb_port, HOST) == 200,
    );

    let load = std::thread::spawn(move || {
        Command::new("wrk")
            .args(["-t1", "-c16", "-d25s", "-H", &format!("Host: {HOST}")])
            .arg(format!("http://127.0.0.1:{lb_port}/"))
            .output()
            .expect("wrk (e2e/install-deps.sh installs it)")
    });
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));

    let mut moves = Vec::new();
    // Drain the holder first, then the others, as a rollout meets them.
    let first = f.index_of(&f.holder().unwrap());
    let order = [first, (first + 1) % 3, (first + 2) % 3];
    for i in order {
        let admin = f.nodes[i].admin;
        let held_here = f.holder().as_deref() == Some(f.nodes[i].name.as_str());
        let t0 = Instant::now();
        let drain = std::thread::spawn(move || {
            raw(
                admin,
                b"POST /drain?wait=1s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                Duration::from_secs(10),
            )
        });
        if held_here {
            // Make-before-break: the client's active session moves to another node.
            let name = f.nodes[i].name.clone();
            eventually("agent moved", Duration::from_secs(5), || {
                f.holder().is_some_and(|h| h != name)
            });
            moves.push(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
        let others: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| http[j]).collect();
        lb.set_backends(&others);
        assert_eq!(drain.join().unwrap().unwrap().status, 200);
        let mut p = f.nodes[i].proc.take().unwrap();
        assert_eq!(
            p.role.terminate(Duration::from_secs(30)),
            Some(0),
            "{}",
            p.log()
        );
        f.boot(i);
        lb.set_backends(&http);
    }
    let rollout = started.elapsed();
    let out = load.join().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let (retried, failed, logged) = lb.retries_and_failures();
    moves.sort();
    let pct = |q: f64| moves[((moves.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "{report}\nbalancer log: {logged} requests; rollout {rollout:?}; agent move time over {} move(s): p50 {:?}, p99 {:?}",
        moves.len(),
        pct(0.5),
        pct(0.99)
    );
    assert!(!moves.is_empty(), "the agent never had to move");
    assert!(
        retried.is_empty(),
        "{} requests failed on one proxy and were retried on another, e.g. {:?}",
        retried.len(),
        &retried[..retried.len().min(5)]
    );
    if !failed.is_empty() {
        // Every process's full log, for the post-mortem (the temp dir goes with the test).
        let keep = std::env::temp_dir().join(format!("tunnox-rollout-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(f.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        eprintln!("logs kept in {}", keep.display());
    }
    assert!(
        failed.is_empty(),
        "{} requests failed, e.g. {:?}\nagent:\n{}\ntrouble:\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        agent_log(&f),
        trouble(&f)
    );
    assert!(
        !report.contains("Non-2xx") && !report.contains("Socket errors"),
        "{report}"
    );
    let requests: u64 = report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        requests > 1000,
        "too little load to prove anything: {report}"
    );
    assert!(
        pct(0.99) < Duration::from_millis(2000),
        "agent moves took {moves:?} (seed 003's goal: under 2 s)"
    );
}

#[test]
fn a_killed_holder_loses_the_client_only_for_the_backoff() {
    let mut f = Fleet::start(3);
    // The agent knows only p0; it learns the others from AuthOk's peers.
    let _agent = f.agent(&[0], &[]);
    eventually("agent session on p0", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p0")
    });
    eventually("p1 serves", Duration::from_secs(10), || {
        f.status_via(1) == 200
    });
    let dead = f.rt.block_on(f.store.sessions(CLIENT)).unwrap();
    f.nodes[0].proc.take().unwrap().role.kill();
    let killed = Instant::now();
    let back = eventually(
        "served again after the kill",
        Duration::from_secs(10),
        || f.status_via(1) == 200 && f.status_via(2) == 200,
    );
    eprintln!("client reachable again {back:?} after SIGKILL of its proxy");
    // Reconnect at 100 ms, ×1.5, capped at 5 s: the first attempts land within a few seconds.
    assert!(killed.elapsed() < Duration::from_secs(8));
    // The dead node's record was replaced, not left to route.
    let now = f.sessions();
    assert!(
        now.iter().all(|s| s.node_id != "p0"),
        "stale session of the killed node still listed: {now:?} (before: {dead:?})"
    );
    for i in 1..3 {
        for _ in 0..50 {
            assert_eq!(f.status_via(i), 200, "via p{i}:\n{}", f.log(i));
        }
    }
}

/// A record can name a live node that no longer holds the session (the agent moved a moment
/// ago and the record was read before it changed). That node answers "not held here" and the
/// forwarding node tries the client's other sessions: the request is served, not a 502.
#[test]
fn a_record_naming_a_node_without_the_session_is_tried_elsewhere() {
    let f = Fleet::start(3);
    let _agent = f.agent(&[1], &[]);
    eventually("agent session on p1", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p1")
    });
    // A stale record for p0, which sorts before the agent's own (p2 reads p0's first).
    let now = chrono::Utc::now();
    let stale = SessionRecord {
        session_id: "moved-away".into(),
        node_id: "p0".into(),
        node_address: format!("127.0.0.1:{}", f.nodes[0].http),
        instance: "!moved".into(),
        slot: 0,
        since: now,
        last_seen: now,
        expires_at: now + chrono::Duration::seconds(60),
        state: SessionState::Active,
        config: None,
        unhealthy: Vec::new(),
    };
    f.rt.block_on(f.store.put_session(CLIENT, &stale, Duration::from_secs(60)))
        .unwrap();
    for _ in 0..20 {
        let r = support::http::get(f.nodes[2].http, HOST, "/").unwrap();
        assert_eq!(r.status, 200, "via p2: {r:?}\n{}", trouble(&f));
        assert!(r.header("tunnox-not-held").is_none(), "{r:?}");
    }
    // p0 was asked and said so (the path under test ran), and p1 served.
    let metrics = support::http::get(f.nodes[2].admin, "localhost", "/metrics").unwrap();
    let not_held = metrics
        .body
        .lines()
        .find(|l| l.starts_with("tunnox_tunnel_forwarded_to_peer_total{outcome=\"not_held\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(not_held, Some(20), "{}", metrics.body);
    // Asked directly with the node token, p0 says it holds nothing and sent nothing on.
    let direct = raw(
        f.nodes[0].http,
        format!(
            "GET / HTTP/1.1\r\nHost: {HOST}\r\ntunnox-node: node-secret-0123456789\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(direct.status, 503, "{direct:?}");
    assert_eq!(direct.header("tunnox-not-held"), Some("1"), "{direct:?}");
}

/// Cluster remote ports (the table the controller writes, here written directly): a connection
/// to the remote port of a proxy that holds no session of the client is carried through the
/// node that does; a node-to-node CONNECT needs the node token and a tunnel of the table.
#[test]
fn a_remote_port_on_any_proxy_reaches_the_agent_through_the_holder() {
    use std::io::{Read, Write};
    use tunnox::store::{PortClaim, PortRegistry as _, PortRequest};
    let f = Fleet::start(2);
    let echo_port = support::echo::tcp();
    let uecho_port = support::echo::udp();
    let (tcp_port, udp_port) = (free_port(), free_port());
    let claim = |name: &str, target: u16, udp: bool| PortClaim {
        holder: "k8s:test/ns/ts".into(),
        set: None,
        client_id: CLIENT.into(),
        name: name.into(),
        target: format!("127.0.0.1:{target}"),
        udp,
        max_connections: None,
        max_bytes_per_second: None,
        health_check: None,
        group: None,
        balance: None,
        members: Vec::new(),
        udp_idle_ms: udp.then_some(5000),
    };
    let set = tunnox::domain::SetName::parse("default.default").unwrap();
    f.rt.block_on(f.store.claim_ports(
        &set,
        "k8s:test/ns/ts",
        &[
            PortRequest {
                port: tcp_port,
                claim: claim("echo", echo_port, false),
            },
            PortRequest {
                port: udp_port,
                claim: claim("dns", uecho_port, true),
            },
        ],
        (1, 65535),
    ))
    .unwrap();
    let allow_tcp = format!("127.0.0.1:{echo_port}");
    let allow_udp = format!("127.0.0.1:{uecho_port}");
    let _agent = f.agent(&[1], &["--allow", &allow_tcp, "--allow", &allow_udp]);
    eventually("agent session on p1", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p1")
    });
    // p0 (127.0.0.1) holds no session: its remote port goes through p1.
    let round_trip = |ip: &str| -> Option<Vec<u8>> {
        let mut c = std::net::TcpStream::connect((ip, tcp_port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        c.write_all(b"via the holder").ok()?;
        let mut buf = [0u8; 14];
        c.read_exact(&mut buf).ok()?;
        Some(buf.to_vec())
    };
    eventually(
        "served through p0's remote port",
        Duration::from_secs(10),
        || round_trip("127.0.0.1").as_deref() == Some(&b"via the holder"[..]),
    );
    assert_eq!(
        round_trip("127.0.0.2").as_deref(),
        Some(&b"via the holder"[..])
    );
    let metrics = support::http::get(f.nodes[0].admin, "localhost", "/metrics")
        .unwrap()
        .body;
    assert!(
        metrics.contains("tunnox_tunnel_forwarded_to_peer_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = None;
    for _ in 0..10 {
        udp.send_to(b"datagram", ("127.0.0.1", udp_port)).unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = udp.recv(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"datagram"[..]), "{}", trouble(&f));

    // Node-to-node CONNECT: without the token, or for a target no tunnel names, refused.
    let connect = |token: &str, target: &str| {
        raw(
            f.nodes[1].http,
            format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\ntunnox-node: {token}\r\ntunnox-client: {CLIENT}\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
        .map(|r| r.status)
    };
    assert_eq!(connect("wrong", &allow_tcp), Some(403));
    assert_eq!(connect("node-secret-0123456789", "127.0.0.1:22"), Some(403));
}

/// A rolling restart of every proxy under TCP load through a remote port: every connection
/// opened while it happens is carried (a client stops using a node 200 ms after its drain
/// starts, as a Service's endpoints would); long-lived connections through a restarted node
/// are counted (they end with their session after the grace period, at most).
#[test]
fn rolling_restart_under_tcp_load_fails_no_new_connection() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tunnox::store::{PortClaim, PortRegistry as _, PortRequest};
    let mut f = Fleet::start(3);
    let echo_port = support::echo::tcp();
    let port = free_port();
    let set = tunnox::domain::SetName::parse("default.default").unwrap();
    f.rt.block_on(f.store.claim_ports(
        &set,
        "k8s:test/ns/ts",
        &[PortRequest {
            port,
            claim: PortClaim {
                holder: "k8s:test/ns/ts".into(),
                set: None,
                client_id: CLIENT.into(),
                name: "echo".into(),
                target: format!("127.0.0.1:{echo_port}"),
                udp: false,
                max_connections: None,
                max_bytes_per_second: None,
                health_check: None,
                group: None,
                balance: None,
                members: Vec::new(),
                udp_idle_ms: None,
            },
        }],
        (1, 65535),
    ))
    .unwrap();
    let allow = format!("127.0.0.1:{echo_port}");
    let _agent = f.agent(&[0, 1, 2], &["--allow", &allow]);
    eventually("agent session", Duration::from_secs(15), || {
        f.holder().is_some()
    });
    let ip = |i: usize| format!("127.0.0.{}", i + 1);
    let round_trip = |addr: &str| -> Result<(), String> {
        let mut c = std::net::TcpStream::connect((addr, port)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).map_err(|e| e.to_string())?;
        (&buf == b"ping")
            .then_some(())
            .ok_or_else(|| "wrong echo".into())
    };
    for i in 0..3 {
        eventually(
            "every node serves the port",
            Duration::from_secs(10),
            || round_trip(&ip(i)).is_ok(),
        );
    }
    // Long-lived connections, one per node, pinged until they break.
    let cut = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let long: Vec<_> = (0..3)
        .map(|i| {
            let mut c = std::net::TcpStream::connect((ip(i).as_str(), port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (cut, stop) = (cut.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    if c.write_all(b"x").is_err() || c.read_exact(&mut buf).is_err() {
                        cut.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    // Short connections, round robin over the nodes in service, two at a time.
    let in_service = Arc::new(Mutex::new(vec![0usize, 1, 2]));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..2)
        .map(|w| {
            let (in_service, failures, done, stop) = (
                in_service.clone(),
                failures.clone(),
                done.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let nodes = in_service.lock().unwrap().clone();
                    let i = nodes[n % nodes.len()];
                    n += 1;
                    let addr = format!("127.0.0.{}", i + 1);
                    let r = (|| -> Result<(), String> {
                        let mut c = std::net::TcpStream::connect((addr.as_str(), port))
                            .map_err(|e| e.to_string())?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))
                            .map_err(|e| e.to_string())?;
                        c.write_all(b"ping").map_err(|e| e.to_string())?;
                        let mut buf = [0u8; 4];
                        c.read_exact(&mut buf).map_err(|e| e.to_string())?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("p{i}: {e}")),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    for i in 0..3 {
        let admin = f.nodes[i].admin;
        let drain = std::thread::spawn(move || {
            raw(
                admin,
                b"POST /drain?wait=1s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                Duration::from_secs(10),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        in_service.lock().unwrap().retain(|j| *j != i);
        assert_eq!(drain.join().unwrap().unwrap().status, 200);
        let mut p = f.nodes[i].proc.take().unwrap();
        assert_eq!(
            p.role.terminate(Duration::from_secs(30)),
            Some(0),
            "{}",
            p.log()
        );
        f.boot(i);
        eventually(
            "restarted node serves the port",
            Duration::from_secs(10),
            || round_trip(&ip(i)).is_ok(),
        );
        in_service.lock().unwrap().push(i);
    }
    let rollout = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in load.into_iter().chain(long) {
        let _ = t.join();
    }
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "TCP rollout {rollout:?}: {} short connections carried, {} failed; {} of 3 long-lived connections cut",
        done.load(Ordering::Relaxed),
        failures.len(),
        cut.load(Ordering::Relaxed)
    );
    assert!(
        done.load(Ordering::Relaxed) > 100,
        "too little load to mean anything"
    );
    assert!(
        failures.is_empty(),
        "{} connections failed, e.g. {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        trouble(&f)
    );
}

/// A connection through a remote port whose stream rides the session of a node that drains
/// and stops: the agent moves to another node, and the connection goes on on the retired
/// session until it ends by itself (here 4 s later), within the grace period; the node's exit
/// waits for it.
#[test]
fn a_connection_on_a_draining_holder_lives_on_within_the_grace_period() {
    use std::io::{Read, Write};
    use tunnox::store::{PortClaim, PortRegistry as _, PortRequest};
    let mut f = Fleet::start(2);
    let echo_port = support::echo::tcp();
    let port = free_port();
    let set = tunnox::domain::SetName::parse("default.default").unwrap();
    let claim = PortClaim {
        holder: "k8s:test/ns/ts".into(),
        set: None,
        client_id: CLIENT.into(),
        name: "echo".into(),
        target: format!("127.0.0.1:{echo_port}"),
        udp: false,
        max_connections: None,
        max_bytes_per_second: None,
        health_check: None,
        group: None,
        balance: None,
        members: Vec::new(),
        udp_idle_ms: None,
    };
    f.rt.block_on(f.store.claim_ports(
        &set,
        "k8s:test/ns/ts",
        &[PortRequest { port, claim }],
        (1, 65535),
    ))
    .unwrap();
    let allow = format!("127.0.0.1:{echo_port}");
    let _agent = f.agent(&[0, 1], &["--allow", &allow]);
    eventually("agent session", Duration::from_secs(15), || {
        f.holder().is_some()
    });
    let holder = f.index_of(&f.holder().unwrap());
    // Through the other node: its stream rides the holder's session.
    let entry = format!("127.0.0.{}", (1 - holder) + 1);
    let mut c = None;
    eventually("the port serves", Duration::from_secs(10), || {
        c = std::net::TcpStream::connect((entry.as_str(), port)).ok();
        c.is_some()
    });
    let mut c = c.unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    c.write_all(b"x").unwrap();
    c.read_exact(&mut buf).unwrap();
    let admin = f.nodes[holder].admin;
    let drained = Instant::now();
    let drain = std::thread::spawn(move || {
        raw(
            admin,
            b"POST /drain?wait=1s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
    });
    let pinger = std::thread::spawn(move || {
        let mut pings = 0;
        while drained.elapsed() < Duration::from_secs(4) {
            if c.write_all(b"x").is_err() || c.read_exact(&mut buf).is_err() {
                return (pings, false);
            }
            pings += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        (pings, true)
    });
    assert_eq!(drain.join().unwrap().unwrap().status, 200);
    let mut p = f.nodes[holder].proc.take().unwrap();
    assert_eq!(
        p.role.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        p.log()
    );
    let (pings, whole) = pinger.join().unwrap();
    eprintln!(
        "{pings} pings through the retired session; the node's exit took {:?} from the drain",
        drained.elapsed()
    );
    assert!(whole, "cut after {pings} pings\n{}", trouble(&f));
    assert!(drained.elapsed() >= Duration::from_secs(4));
}

/// A load-balancing group in a cluster (the group record the controller writes, here claimed
/// directly for two TunnelSets): two clients' agents on different proxies, one group port on
/// every proxy; connections through either proxy alternate between the members (one of them
/// always through the other node), and a stopped member leaves the rotation.
#[test]
fn a_group_port_on_any_proxy_alternates_between_agents_on_different_nodes() {
    use std::io::Read;
    use tunnox::store::{PortClaim, PortRegistry as _, PortRequest, TunnelRegistry as _};
    let f = Fleet::start(2);
    let lettered = |letter: u8| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    use std::io::Write;
                    let _ = s.write_all(&[letter]);
                });
            }
        });
        port
    };
    let (a_port, b_port) = (lettered(b'A'), lettered(b'B'));
    let desk_token = secret_file(f.dir.path(), "desk-token", "desk-secret-0123456789");
    f.rt.block_on(f.store.put_credential(&ClientCredential {
        client_id: "desk".into(),
        token_sha256: TokenHash::of("desk-secret-0123456789"),
        placement: None,
        source: Some("test".into()),
    }))
    .unwrap();
    let port = free_port();
    let set = tunnox::domain::SetName::parse("default.default").unwrap();
    for (holder, client, target) in [
        ("k8s:test/ns/a", CLIENT, a_port),
        ("k8s:test/ns/b", "desk", b_port),
    ] {
        let claim = PortClaim {
            holder: holder.into(),
            set: None,
            client_id: client.into(),
            name: "web".into(),
            target: format!("127.0.0.1:{target}"),
            udp: false,
            max_connections: None,
            max_bytes_per_second: None,
            health_check: None,
            group: Some("ns/web".into()),
            balance: Some(tunnox::domain::Balance::RoundRobin),
            members: Vec::new(),
            udp_idle_ms: None,
        };
        f.rt.block_on(f.store.claim_ports(
            &set,
            holder,
            &[PortRequest { port, claim }],
            (1, 65535),
        ))
        .unwrap();
    }
    let allow_a = format!("127.0.0.1:{a_port}");
    let _a = f.agent(&[0], &["--allow", &allow_a]);
    let mut b = agent(
        f.dir.path(),
        "agent-desk",
        &AgentSpec {
            client_id: "desk",
            token_file: &desk_token,
            ca: &f.pki.ca,
            servers: &[f.nodes[1].tunnel],
            allow: &[format!("127.0.0.1:{b_port}")],
            extra: &[],
        },
    );
    let letter = |ip: &str| -> char {
        let Ok(mut c) = std::net::TcpStream::connect((ip, port)) else {
            return '-';
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let mut l = [0u8; 1];
        match c.read_exact(&mut l) {
            Ok(()) => l[0] as char,
            Err(_) => '-',
        }
    };
    let letters = |ip: &str, n: usize| -> String { (0..n).map(|_| letter(ip)).collect() };
    eventually("both members online", Duration::from_secs(15), || {
        let desk = f.rt.block_on(f.store.sessions("desk")).unwrap_or_default();
        !f.sessions().is_empty() && !desk.is_empty() && {
            let s = letters("127.0.0.1", 4);
            s.contains('A') && s.contains('B')
        }
    });
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let seq = letters(ip, 8);
        println!("through {ip}: {seq}");
        assert!(
            seq.as_bytes().windows(2).all(|w| w[0] != w[1]) && !seq.contains('-'),
            "round robin through {ip}: {seq}\n{}",
            trouble(&f)
        );
    }
    assert_eq!(b.terminate(Duration::from_secs(10)), Some(0));
    for ip in ["127.0.0.1", "127.0.0.2"] {
        assert_eq!(
            letters(ip, 4),
            "AAAA",
            "a stopped member leaves the rotation"
        );
    }
}

/// An HTTP mapping to a group (`target_group`, as the controller writes it for
/// `spec.target.tunnel.group`) with one member's agent on each node: requests through either
/// node alternate between the members, the remote one's forwarded to its node naming the
/// member chosen. Each agent counts what it forwarded. Then the node holding one member dies
/// (SIGKILL: its session records outlive it until they expire): every request through the other
/// node still succeeds, the dead member's share going to the live one.
#[test]
fn an_http_group_mapping_reaches_members_on_another_node() {
    use tunnox::domain::{Balance, TargetGroup};
    let mut f = Fleet::start(2);
    let desk_token = secret_file(f.dir.path(), "desk-token", "desk-secret-0123456789");
    f.rt.block_on(f.store.put_credential(&ClientCredential {
        client_id: "desk".into(),
        token_sha256: TokenHash::of("desk-secret-0123456789"),
        placement: None,
        source: Some("test".into()),
    }))
    .unwrap();
    let mut spec = MappingSpec::new("grp", "tunnox.net", "127.0.0.1", f.up.port);
    spec.target_group = Some(TargetGroup {
        name: "ns/site".into(),
        clients: vec!["desk".into(), CLIENT.into()],
        balance: Balance::RoundRobin,
    });
    f.rt.block_on(f.store.create(spec)).unwrap();
    let admins = [free_port(), free_port()];
    let laptop_admin = format!("127.0.0.1:{}", admins[0]);
    let _laptop = f.agent(&[1], &["--admin-listen", &laptop_admin]);
    let desk_admin = format!("127.0.0.1:{}", admins[1]);
    let _desk = agent(
        f.dir.path(),
        "agent-desk",
        &AgentSpec {
            client_id: "desk",
            token_file: &desk_token,
            ca: &f.pki.ca,
            servers: &[f.nodes[0].tunnel],
            allow: &[format!("127.0.0.1:{}", f.up.port)],
            extra: &["--admin-listen", &desk_admin],
        },
    );
    let forwarded =
        |admin: u16| support::process::metric(admin, "tunnox_agent_streams_total{outcome=\"ok\"}");
    let status = |f: &Fleet, i: usize| support::http::status(f.nodes[i].http, "grp.tunnox.net");
    eventually("both members online", Duration::from_secs(15), || {
        let desk = f.rt.block_on(f.store.sessions("desk")).unwrap_or_default();
        !f.sessions().is_empty() && !desk.is_empty() && status(&f, 0) == 200
    });
    let to_peer = |f: &Fleet| {
        support::process::metric(
            f.nodes[0].admin,
            "tunnox_tunnel_forwarded_to_peer_total{outcome=\"ok\"}",
        )
    };
    for via in [0, 1] {
        let peer_before = to_peer(&f);
        let before = admins.map(forwarded);
        for _ in 0..10 {
            assert_eq!(status(&f, via), 200, "through node {via}\n{}", trouble(&f));
        }
        // An agent counts a stream when it ends, just after the client has its answer.
        let split = || {
            let after = admins.map(forwarded);
            (after[0] - before[0], after[1] - before[1])
        };
        let _ = support::process::settles(Duration::from_secs(2), || split().0 + split().1 >= 10);
        let split = split();
        println!("through node {via}: laptop {} desk {}", split.0, split.1);
        assert_eq!(split, (5, 5), "round robin through node {via}");
        if via == 0 {
            assert_eq!(
                to_peer(&f) - peer_before,
                5,
                "node 0 forwarded laptop's share to node 1"
            );
        }
    }

    // Node 1 dies with laptop's session: its record stays until it expires, yet no request
    // through node 0 fails (laptop's turn goes to desk once laptop cannot take it; laptop's
    // agent may meanwhile have connected again, to node 0, and take its turns there).
    f.nodes[1].proc.as_mut().unwrap().role.kill();
    let before = admins.map(forwarded);
    let served = || admins.map(forwarded)[0] - before[0] + admins.map(forwarded)[1] - before[1];
    let statuses: Vec<u16> = (0..10).map(|_| status(&f, 0)).collect();
    println!("node 1 killed: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request served by the live member: {statuses:?}\n{}",
        trouble(&f)
    );
    let _ = support::process::settles(Duration::from_secs(2), || served() >= 10);
    assert_eq!(served(), 10, "each request served once, by an agent");
}

/// HTTPS through a tunnel whose session is on another node: node 0 terminates TLS with the
/// certificate the controller would seal into the record, and forwards over the fleet's plain
/// HTTP to node 1, which holds the agent's session. Node 1 must neither redirect the request
/// again (the mapping has `redirect_http`: a 308 loop) nor tell the upstream it came over HTTP.
#[test]
fn https_to_a_tunnel_held_by_another_node_is_not_redirected_again() {
    use tunnox::domain::{CertSource, MappingTls};
    let f = Fleet::start_https(2);
    let (cert, key) = f
        .pki
        .issue(f.dir.path(), "sec", "sec.tunnox.net", "DNS:sec.tunnox.net");
    let store_key = tunnox::cert::StoreKey::from_secret(STORE_KEY_TEXT).unwrap();
    let mut spec = MappingSpec::new("sec", "tunnox.net", "127.0.0.1", f.up.port);
    spec.target_client_id = Some(CLIENT.into());
    spec.enable_https = true;
    spec.tls = Some(MappingTls {
        redirect_http: true,
        cert: CertSource::Sealed {
            chain_pem: std::fs::read_to_string(&cert).unwrap(),
            key_sealed: store_key
                .seal("sec.tunnox.net", &std::fs::read(&key).unwrap())
                .unwrap(),
        },
    });
    f.rt.block_on(f.store.create(spec)).unwrap();
    let _agent = f.agent(&[1], &[]);
    eventually("agent session on p1", Duration::from_secs(15), || {
        f.holder().as_deref() == Some("p1")
    });
    let https = |i: usize| -> (String, String) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "--cacert",
                f.pki.ca.to_str().unwrap(),
            ])
            .args([
                "--resolve",
                &format!("sec.tunnox.net:{}:127.0.0.1", f.nodes[i].https),
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!(
                "https://sec.tunnox.net:{}/headers",
                f.nodes[i].https
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    eventually(
        "served over HTTPS through p1",
        Duration::from_secs(10),
        || https(1).0 == "200",
    );
    // Through p0: TLS ends there, the session is on p1.
    let (code, body) = https(0);
    assert_eq!(
        code,
        "200",
        "not redirected again by the holder: {body}\n{}",
        trouble(&f)
    );
    assert!(
        body.contains("x-forwarded-proto: https"),
        "the upstream is told the client used HTTPS: {body}"
    );
    // Plain HTTP is still redirected, by whichever node takes it.
    let plain = support::http::get(f.nodes[0].http, "sec.tunnox.net", "/").unwrap();
    assert_eq!(plain.status, 308);
}
