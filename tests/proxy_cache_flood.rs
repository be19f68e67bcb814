//! The cache under a flood of unknown hosts (issue #14, deliverable 4), with a table larger than
//! the cache: 100 000 requests with random Host headers cost Redis at most one lookup per
//! distinct host within the negative TTL, hosts outside the base domains cost none, real routes
//! stay cached, and concurrent misses for one host share one lookup (single-flight).
//!
//! Lookups are counted with `INFO commandstats`: the proxy's `get_by_domain`/`lookup` is one
//! `EVALSHA` of `lookup.lua`; the other scripts a proxy runs (access statistics, registry
//! pruning) are kept out of the window by the configuration below.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::RedisServer;
use support::http::{Upstream, read_reply};
use support::proxy::ProxyProc;
use tunnox::domain::MappingSpec;
use tunnox::store::{MappingStore, RedisOptions, RedisStore};

/// Mappings in the store; the cache holds at most `MAX_SIZE` routes.
const TABLE: usize = 300;
const MAX_SIZE: usize = 100;
/// Real hosts requested during the flood (they fit the cache).
const REAL: usize = 50;
const UNKNOWN: u64 = 5_000;
const REQUESTS: usize = 100_000;
const CLIENTS: usize = 8;

/// Successful `EVALSHA` calls (a script's first call fails with NOSCRIPT and is sent again).
fn evalsha_calls(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split(&format!("{name}=")).nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field("calls") - field("failed_calls")
}

fn metric(p: &ProxyProc, name: &str) -> f64 {
    let body = p.admin_get("/metrics").map(|r| r.body).unwrap_or_default();
    body.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

/// Keep-alive GETs with the given hosts on one connection; returns the statuses.
fn get_all(port: u16, hosts: &[String]) -> Vec<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    hosts
        .iter()
        .map(|h| {
            s.write_all(format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes())
                .unwrap();
            read_reply(&mut s).expect("a response").status
        })
        .collect()
}

#[test]
fn random_hosts_cost_one_lookup_each_and_never_evict_routes() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let up = Upstream::start("one");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn MappingStore> = Arc::new(
        rt.block_on(RedisStore::connect(RedisOptions::new(&redis.addr())))
            .unwrap(),
    );
    for i in 0..TABLE {
        let spec = MappingSpec::new(&format!("r{i}"), "tunnox.net", "127.0.0.1", up.port);
        rt.block_on(store.create(spec)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net], cache: {{local: {{max_size: {MAX_SIZE}, ttl: 10m, negative_ttl: 10m, negative_max_size: 20000}}}}}}
egress: {{allow: [\"127.0.0.0/8\"]}}
log: {{level: info}}",
        redis.addr()
    );
    // The negative space is sized well above the 5 000 unknown hosts: the cache is sharded and
    // a shard evicts when it is full, so a space filled to half its size may drop a few.
    // No statistics flush in the window (it is an EVALSHA too).
    let p = ProxyProc::start(dir.path(), "p", &yaml, "stats_flush_interval: 1h").ready();

    // The real hosts: among those the warm-up loaded (the first MAX_SIZE in id order), so they
    // are cached before the flood: asking for them reaches Redis zero times.
    let real: Vec<String> = rt
        .block_on(store.list_all())
        .unwrap()
        .iter()
        .take(REAL)
        .map(|m| m.full_domain.to_string())
        .collect();
    let before = evalsha_calls(&redis);
    assert!(get_all(p.port, &real).iter().all(|s| *s == 200));
    assert_eq!(
        evalsha_calls(&redis) - before,
        0,
        "warm-up cached the real hosts"
    );

    // The flood: random unknown hosts under the base domain, one in ten outside it, one in ten
    // a real host.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut plan: Vec<Vec<String>> = vec![Vec::new(); CLIENTS];
    let mut distinct = std::collections::HashSet::new();
    for n in 0..REQUESTS {
        let r = next();
        let host = match r % 10 {
            0 => format!("x{}.other.example", r % 100_000),
            1 => real[(r as usize / 10) % REAL].clone(),
            _ => {
                let h = format!("u{}.tunnox.net", (r / 10) % UNKNOWN);
                distinct.insert(h.clone());
                h
            }
        };
        plan[n % CLIENTS].push(host);
    }
    // Load the lookup script into Redis before counting.
    assert_eq!(p.status("warm-the-script.tunnox.net"), 404);
    let before = evalsha_calls(&redis);
    let started = Instant::now();
    let clients: Vec<_> = plan
        .into_iter()
        .map(|hosts| {
            let port = p.port;
            std::thread::spawn(move || get_all(port, &hosts))
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for c in clients {
        for s in c.join().unwrap() {
            *statuses.entry(s).or_default() += 1;
        }
    }
    let took = started.elapsed();
    let lookups = evalsha_calls(&redis) - before;
    eprintln!(
        "{REQUESTS} requests in {took:?}: {statuses:?}; {} distinct unknown hosts under the base domain; Redis lookups: {lookups}",
        distinct.len()
    );
    assert_eq!(statuses.values().sum::<usize>(), REQUESTS);
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200, 404],
        "only routes and unknown hosts"
    );
    assert!(
        lookups <= distinct.len() as u64,
        "at most one lookup per distinct host within the negative TTL: {lookups} > {}",
        distinct.len()
    );
    assert!(
        metric(&p, "tunnox_proxy_cache_outside_base_domains_total") >= (REQUESTS / 20) as f64,
        "hosts outside the base domains were answered without a lookup"
    );

    // Real routes stayed cached through the flood: asking for each again reaches Redis zero times.
    let before = evalsha_calls(&redis);
    assert!(get_all(p.port, &real).iter().all(|s| *s == 200));
    assert_eq!(
        evalsha_calls(&redis) - before,
        0,
        "a real route was evicted by unknown hosts"
    );

    // Single-flight: Redis is made to stall (DEBUG SLEEP) while 32 requests for one new host
    // arrive; they all wait for one lookup.
    let before = evalsha_calls(&redis);
    let coalesced = metric(&p, "tunnox_proxy_cache_coalesced_total");
    let sleeper = {
        let port = redis.port().to_string();
        std::thread::spawn(move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port, "DEBUG", "SLEEP", "1"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let burst: Vec<_> = (0..32)
        .map(|_| {
            let port = p.port;
            std::thread::spawn(move || get_all(port, &["burst.tunnox.net".to_string()]))
        })
        .collect();
    for b in burst {
        assert_eq!(b.join().unwrap(), vec![404]);
    }
    sleeper.join().unwrap();
    let burst_lookups = evalsha_calls(&redis) - before;
    let waited = metric(&p, "tunnox_proxy_cache_coalesced_total") - coalesced;
    eprintln!("burst of 32 misses for one host: {burst_lookups} lookup(s), {waited} waited");
    assert_eq!(
        burst_lookups, 1,
        "concurrent misses for one host share one lookup"
    );
    assert!(
        waited >= 16.0,
        "most of the burst waited for the first lookup: {waited}"
    );
}
