//! The proxy as the last line of the egress policy and of loop detection, with records planted
//! directly in a real redis-server (as a tenant with write access to Redis, or a controller
//! bug, would): targets that are the proxy's own ports, the metadata address, loopback by
//! another spelling, another namespace's Service → 502 without a connection; a mapping whose
//! target leads back into the fleet → 508 after `max_hops`, with a bounded number of connections.
//! Both HTTP paths (fast path on and off), and mappings with their own HTTP/2 client (h2c, h2).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::RedisServer;
use support::http::{Upstream, get};
use support::process::free_port;
use support::proxy::ProxyProc;
use tunnox::domain::{MappingSpec, Protocol};
use tunnox::store::{MappingStore, RedisOptions, RedisStore};

fn cluster_yaml(redis: &RedisServer) -> String {
    format!(
        "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net], sync: {{check_interval: 1s}}}}
egress: {{allow: [\"127.0.0.0/8\"]}}
log: {{level: debug}}",
        redis.addr()
    )
}

/// A listener that counts the connections it accepts (and holds them open).
struct Counting {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Counting {
    fn bind(addr: &str) -> Self {
        let l = TcpListener::bind(addr).unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Self { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A TCP relay that counts connections and sends them to `to` in turn: what a load balancer in
/// front of the fleet is.
fn relay(to: Vec<u16>) -> Counting {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", to[n % to.len()])) else {
                continue;
            };
            let pipe = |mut a: TcpStream, mut b: TcpStream| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = a.read(&mut buf) {
                        if n == 0 || b.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
            pipe(upstream, client);
        }
    });
    Counting { port, accepted }
}

fn metric(p: &ProxyProc, line: &str) -> bool {
    p.admin_get("/metrics")
        .is_some_and(|m| m.body.lines().any(|l| l == line))
}

#[test]
fn planted_records_to_forbidden_targets_get_502_and_no_connection() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async {
        RedisStore::connect(RedisOptions::new(&redis.addr()))
            .await
            .unwrap()
    });
    let v4 = Counting::bind("127.0.0.1:0");
    let v6 = Counting::bind("[::1]:0");
    let plant_with = |sub: &str, host: &str, port: u16, source: Option<&str>, p: Protocol| {
        let mut spec = MappingSpec::new(sub, "tunnox.net", host, port);
        spec.source = source.map(str::to_string);
        if p != Protocol::Http1 {
            spec.upstream = tunnox::domain::Upstream {
                protocol: p,
                ..Default::default()
            };
        }
        rt.block_on(store.create(spec)).unwrap();
    };
    let plant = |sub: &str, host: &str, port: u16, source: Option<&str>| {
        plant_with(sub, host, port, source, Protocol::Http1)
    };
    // The same rules through a mapping's own HTTP/2 client (its own pool and connector).
    plant_with(
        "h2c-v6",
        "::1",
        v6.port,
        Some("k8s:team-a/a"),
        Protocol::H2c,
    );
    plant_with(
        "h2-meta",
        "169.254.169.254",
        443,
        Some("k8s:team-a/b"),
        Protocol::H2,
    );
    plant("ok", "127.0.0.1", up.port, Some("k8s:team-a/ok"));
    plant("meta", "169.254.169.254", 80, Some("k8s:team-a/meta"));
    plant("v6", "::1", v6.port, Some("k8s:team-a/v6"));
    plant("zero", "0.0.0.0", v4.port, Some("k8s:team-a/zero"));
    plant("localhost", "localhost", v4.port, Some("k8s:team-a/lh"));
    plant(
        "other-ns",
        "db.team-b.svc.cluster.local",
        80,
        Some("k8s:team-a/db"),
    );
    // A record claiming to come from the file is still a tenant's when it is in Redis.
    plant("claims-config", "::1", v6.port, Some("config"));

    let yaml = cluster_yaml(&redis);
    let mut proxies = Vec::new();
    for (name, extra) in [("fast", ""), ("general", "fast_path: false")] {
        let (port, admin) = (free_port(), free_port());
        plant(&format!("admin-{name}"), "127.0.0.1", admin, None);
        plant(&format!("self-{name}"), "127.0.0.1", port, None);
        plant(&format!("self-any-{name}"), "0.0.0.0", port, None);
        plant(&format!("self-v6-{name}"), "::ffff:127.0.0.1", port, None);
        plant_with(
            &format!("h2c-admin-{name}"),
            "127.0.0.1",
            admin,
            None,
            Protocol::H2c,
        );
        proxies.push((
            name,
            ProxyProc::start_on(dir.path(), name, &yaml, extra, port, admin).ready(),
        ));
    }
    for (name, p) in &proxies {
        assert_eq!(p.status("ok.tunnox.net"), 200, "{name}: allowed loopback");
        // (host, refusal label)
        let cases = [
            (format!("admin-{name}"), "own_listener"),
            (format!("self-{name}"), "own_listener"),
            (format!("self-any-{name}"), "own_listener"),
            (format!("self-v6-{name}"), "own_listener"),
            ("meta".to_string(), "reserved"),
            ("v6".to_string(), "reserved"),
            ("zero".to_string(), "reserved"),
            ("localhost".to_string(), "reserved"),
            ("claims-config".to_string(), "reserved"),
            ("other-ns".to_string(), "other_namespace"),
            (format!("h2c-admin-{name}"), "own_listener"),
            ("h2c-v6".to_string(), "reserved"),
            ("h2-meta".to_string(), "reserved"),
        ];
        for (sub, _) in &cases {
            let host = format!("{sub}.tunnox.net");
            let started = Instant::now();
            // `/drain` would take the proxy out of rotation if the admin port were reached.
            let r = get(p.port, &host, "/drain").unwrap();
            assert_eq!(r.status, 502, "{name} {host}: {r:?}");
            assert!(started.elapsed() < Duration::from_secs(2), "{name} {host}");
            assert_eq!(
                r.body.lines().next(),
                Some("502 Bad Gateway: the mapping's target is refused by the egress policy"),
                "{name} {host}"
            );
            let id = r.header("x-request-id").unwrap().to_string();
            assert!(
                !r.body.contains("127.0.0.1") && !r.body.contains("169.254"),
                "{r:?}"
            );
            let log = p.log();
            assert!(
                log.lines().any(|l| l.contains(&id)
                    && l.contains("refused by the egress policy")
                    && l.contains(&host)),
                "{name}: the refusal is logged under {id}:\n{log}"
            );
        }
        let mut want = std::collections::BTreeMap::<&str, usize>::new();
        for (_, label) in &cases {
            *want.entry(label).or_default() += 1;
        }
        for (label, n) in want {
            let line = format!("tunnox_proxy_egress_refused_total{{reason=\"{label}\"}} {n}");
            assert!(metric(p, &line), "{name}: {line}");
        }
        assert_eq!(
            p.admin_get("/readyz").unwrap().status,
            200,
            "{name}: the admin port was never reached"
        );
    }
    assert_eq!(
        v4.accepted(),
        0,
        "no connection to the IPv4 loopback listener"
    );
    assert_eq!(
        v6.accepted(),
        0,
        "no connection to the IPv6 loopback listener"
    );
}

#[test]
fn a_mapping_that_leads_back_into_the_fleet_is_a_loop_508() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(async {
        RedisStore::connect(RedisOptions::new(&redis.addr()))
            .await
            .unwrap()
    });
    let yaml = cluster_yaml(&redis);
    // Two proxies of the fleet, one per path, behind a balancer that alternates between them;
    // the mapping's target is the balancer, which neither proxy can tell is the fleet itself.
    let (a, b) = (free_port(), free_port());
    let lb = relay(vec![b, a]);
    rt.block_on(store.create(MappingSpec::new("loop", "tunnox.net", "127.0.0.1", lb.port)))
        .unwrap();
    let fast = ProxyProc::start_on(dir.path(), "fast", &yaml, "", a, free_port()).ready();
    let general = ProxyProc::start_on(
        dir.path(),
        "general",
        &yaml,
        "fast_path: false",
        b,
        free_port(),
    )
    .ready();
    let started = Instant::now();
    // client → fast (0) → lb → general (1) → lb → fast (2) → lb → general (3): 508.
    let r = get(fast.port, "loop.tunnox.net", "/").unwrap();
    assert_eq!(r.status, 508, "{r:?}");
    assert!(r.body.starts_with("508 Loop Detected"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        lb.accepted(),
        3,
        "one connection per allowed hop (max_hops: 3)"
    );
    assert!(metric(
        &general,
        "tunnox_proxy_errors_total{reason=\"loop_detected\"} 1"
    ));
    // Started at the other proxy: a 508 again, over pooled connections where they are idle.
    let r = get(general.port, "loop.tunnox.net", "/").unwrap();
    assert_eq!(r.status, 508, "{r:?}");
    assert!(lb.accepted() <= 6, "{} connections", lb.accepted());
    let loops = |p: &ProxyProc, n: u32| {
        metric(
            p,
            &format!("tunnox_proxy_errors_total{{reason=\"loop_detected\"}} {n}"),
        )
    };
    assert!(
        (loops(&fast, 1) && loops(&general, 1)) || loops(&general, 2),
        "each request ends in one 508"
    );
}
