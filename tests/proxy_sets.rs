//! Proxy sets (issue #18 acceptance, docs/sets.md): real `tunnox proxy` processes on one
//! redis-server, each started with its set name. A mapping placed on `novel.sh` is served
//! through every proxy of business `novel`, always by a node of its serving set (home, then the
//! business's DR set, then nobody: 503), never by `novel.sz` or another business (421), and
//! traffic returns home when the home set is back. Which node served a request is read from the
//! nodes' own metrics: only the node that talks to the upstream observes its answer time.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::RedisServer;
use support::http::Upstream;
use support::process::{eventually, free_port, metric};
use support::proxy::ProxyProc;
use support::tunnel::secret_file;
use tunnox::domain::{MappingSpec, SetName};
use tunnox::store::{MappingStore as _, RedisOptions, RedisStore};

const HOST: &str = "app.tunnox.net";
const SERVED: &str = "tunnox_proxy_upstream_duration_seconds_count";

struct Node {
    name: &'static str,
    set: &'static str,
    http: u16,
    admin: u16,
    proc: Option<ProxyProc>,
}

struct Sets {
    redis: RedisServer,
    dir: tempfile::TempDir,
    node_token: PathBuf,
    nodes: Vec<Node>,
    _up: Upstream,
    _rt: tokio::runtime::Runtime,
}

impl Sets {
    /// Redis, an upstream, a mapping placed on `placement`, and one ready proxy per
    /// `(name, set)`.
    fn start(placement: &str, nodes: &[(&'static str, &'static str)]) -> Self {
        let redis = RedisServer::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt
            .block_on(RedisStore::connect(RedisOptions::new(&redis.addr())))
            .unwrap();
        let up = Upstream::start("novel-app");
        let mut spec = MappingSpec::new("app", "tunnox.net", "127.0.0.1", up.port);
        spec.placement = Some(SetName::parse(placement).unwrap());
        rt.block_on(store.create(spec)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node_token = secret_file(dir.path(), "node-token", "node-secret-0123456789");
        let mut sets = Self {
            redis,
            dir,
            node_token,
            nodes: nodes
                .iter()
                .map(|(name, set)| Node {
                    name,
                    set,
                    http: free_port(),
                    admin: free_port(),
                    proc: None,
                })
                .collect(),
            _up: up,
            _rt: rt,
        };
        for i in 0..sets.nodes.len() {
            sets.boot(i);
        }
        sets
    }

    fn boot(&mut self, i: usize) {
        let n = &self.nodes[i];
        let yaml = format!(
            "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net], sync: {{check_interval: 1s}}}}
egress: {{allow: [\"127.0.0.0/8\"]}}",
            self.redis.addr()
        );
        let extra = format!(
            "set: \"{}\", registry: {{heartbeat_interval: 300ms, ttl: 2s}}, drain: {{propagation_delay: 0s, grace_period: 2s}}, tunnel: {{node_token_file: \"{}\"}}",
            n.set,
            self.node_token.display()
        );
        let p =
            ProxyProc::start_on(self.dir.path(), n.name, &yaml, &extra, n.http, n.admin).ready();
        self.nodes[i].proc = Some(p);
    }

    fn by_name(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap()
    }

    fn stop(&mut self, name: &str) {
        let i = self.by_name(name);
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.role.kill();
        }
    }

    fn served(&self, name: &str) -> u64 {
        metric(self.nodes[self.by_name(name)].admin, SERVED)
    }

    /// GETs the mapping through `via` and says (status, the node that talked to the upstream).
    fn get_via(&self, via: &str) -> (u16, Option<&'static str>) {
        let before: Vec<u64> = self.nodes.iter().map(|n| self.served_at(n)).collect();
        let status = support::http::status(self.nodes[self.by_name(via)].http, HOST);
        let after: Vec<u64> = self.nodes.iter().map(|n| self.served_at(n)).collect();
        let served: Vec<&'static str> = self
            .nodes
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a > b)
            .map(|(n, _)| n.name)
            .collect();
        assert!(served.len() <= 1, "one request served by {served:?}");
        (status, served.first().copied())
    }

    fn served_at(&self, n: &Node) -> u64 {
        if n.proc.is_some() {
            metric(n.admin, SERVED)
        } else {
            0
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|n| {
                let tail: Vec<String> = n
                    .proc
                    .as_ref()?
                    .log()
                    .lines()
                    .rev()
                    .take(15)
                    .map(str::to_string)
                    .collect();
                Some(format!("--- {} ({})\n{}", n.name, n.set, tail.join("\n")))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[test]
fn a_placed_mapping_is_served_by_its_set_then_its_dr_set_then_nobody_and_goes_home() {
    let mut s = Sets::start(
        "novel.sh",
        &[
            ("sh", "novel.sh"),
            ("sz", "novel.sz"),
            ("dr", "novel.*"),
            ("ams", "ams.sh"),
        ],
    );
    // Every proxy of the business serves it, always on a novel.sh node; another business: 421.
    let check = |s: &Sets, vias: &[&str], want: (u16, Option<&str>)| {
        for via in vias {
            for _ in 0..3 {
                let got = s.get_via(via);
                assert_eq!(got, want, "through {via}\n{}", s.logs());
            }
        }
    };
    for via in ["sh", "sz", "dr"] {
        // Once the node has seen novel.sh in the registry (a heartbeat after it started).
        eventually("served at home", Duration::from_secs(10), || {
            s.get_via(via) == (200, Some("sh"))
        });
    }
    check(&s, &["sh", "sz", "dr"], (200, Some("sh")));
    check(&s, &["ams"], (421, None));
    forwarded_requests_keep_what_the_client_sent(&s);

    // Home set gone (killed: it leaves the registry when its record expires): the DR set.
    s.stop("sh");
    let took = eventually("the DR set serves", Duration::from_secs(10), || {
        s.get_via("sz") == (200, Some("dr"))
    });
    println!("novel.sh killed: served by novel.* after {took:?}");
    check(&s, &["sz", "dr"], (200, Some("dr")));
    check(&s, &["ams"], (421, None));

    // The DR set gone too: nobody serves it, and novel.sz never does.
    s.stop("dr");
    eventually("nobody serves it", Duration::from_secs(10), || {
        s.get_via("sz") == (503, None)
    });
    check(&s, &["sz"], (503, None));
    check(&s, &["ams"], (421, None));

    // Both back: traffic returns home, from the DR set too.
    let dr = s.by_name("dr");
    s.boot(dr);
    eventually("the DR set serves again", Duration::from_secs(10), || {
        s.get_via("sz") == (200, Some("dr"))
    });
    let sh = s.by_name("sh");
    s.boot(sh);
    let took = eventually("traffic returns home", Duration::from_secs(10), || {
        s.get_via("sz") == (200, Some("sh"))
    });
    println!("novel.sh back: served at home after {took:?}");
    check(&s, &["sh", "sz", "dr"], (200, Some("sh")));
    let metrics = support::process::http_get(s.nodes[s.by_name("sz")].admin, "/metrics");
    let forwarded: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("tunnox_proxy_set_forwards_total{"))
        .filter(|l| l.contains("set=\"novel.sh\"") && l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(forwarded >= 3, "sz forwarded to novel.sh {forwarded} times");
    assert!(s.served("sh") > 0);
}

/// Through `sz` (forwarded to `sh`): an upload arrives whole with the client's headers, the
/// upstream is told the client's address first, a WebSocket is joined end to end, and a client
/// that forges the forwarding marker is refused on both HTTP paths.
fn forwarded_requests_keep_what_the_client_sent(s: &Sets) {
    use std::io::{Read, Write};
    let sz = s.nodes[s.by_name("sz")].http;
    let body = "x".repeat(20_000);
    let upload = format!(
        "POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\nX-Mine: kept\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = support::http::raw(sz, upload.as_bytes(), Duration::from_secs(5)).unwrap();
    assert_eq!((r.status, r.body.len()), (200, body.len()), "{}", s.logs());
    let r = support::http::get(sz, HOST, "/headers").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("x-forwarded-for: 127.0.0.1, 127.0.0.1\n"),
        "{}",
        r.body
    );
    assert!(r.body.contains("tunnox-hops: 2\n"), "{}", r.body);
    assert!(
        !r.body.contains("tunnox-from-set"),
        "internal headers never reach an upstream: {}",
        r.body
    );
    assert!(!r.body.contains("tunnox-node"), "{}", r.body);

    let mut ws = std::net::TcpStream::connect(("127.0.0.1", sz)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    .unwrap();
    let head = support::http::read_reply(&mut ws).unwrap();
    assert_eq!(head.status, 101);
    ws.write_all(b"ping through two sets").unwrap();
    let mut echoed = [0u8; 21];
    ws.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping through two sets");

    // The marker without the node token, or with a wrong one: 403, on the fast path (which
    // hands such heads over) and on the general path (HTTP/1.0 goes there directly).
    for version in ["1.1", "1.0"] {
        for token in ["", "tunnox-node: guess\r\n"] {
            let forged = format!(
                "GET / HTTP/{version}\r\nHost: {HOST}\r\ntunnox-from-set: novel.sh\r\n{token}Connection: close\r\n\r\n"
            );
            let r = support::http::raw(sz, forged.as_bytes(), Duration::from_secs(5)).unwrap();
            assert_eq!(r.status, 403, "HTTP/{version} {token:?}");
        }
    }
}
