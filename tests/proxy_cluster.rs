//! Several `tunnox proxy` processes sharing a real redis-server: the cache (TC-2.x), cluster
//! sharing (TC-3.x), lost pub/sub connections and a Redis outage.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use support::RedisServer;
use support::http::Upstream;
use support::process::eventually;
use support::proxy::ProxyProc;
use tunnox::domain::MappingSpec;
use tunnox::store::{MappingStore, RedisOptions, RedisStore};

fn cluster_yaml(redis: &RedisServer, ttl: &str) -> String {
    format!(
        "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net], sync: {{check_interval: 1s}}, cache: {{local: {{ttl: {ttl}, negative_ttl: 1s}}}}}}
egress: {{allow: [\"127.0.0.0/8\"]}}
log: {{level: debug}}",
        redis.addr()
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn store(redis: &RedisServer) -> Arc<dyn MappingStore> {
    Arc::new(
        RedisStore::connect(RedisOptions::new(&redis.addr()))
            .await
            .unwrap(),
    )
}

/// Redis, an upstream, a temp dir for proxies, a runtime and a store client.
struct Cluster {
    redis: RedisServer,
    dir: tempfile::TempDir,
    up: Upstream,
    rt: tokio::runtime::Runtime,
    store: Arc<dyn MappingStore>,
}

impl Cluster {
    fn start() -> Self {
        let redis = RedisServer::start();
        let rt = runtime();
        let store = rt.block_on(store(&redis));
        Self {
            redis,
            dir: tempfile::tempdir().unwrap(),
            up: Upstream::start("one"),
            rt,
            store,
        }
    }

    /// A ready proxy named `name` with the cache TTL `ttl`.
    fn proxy(&self, name: &str, ttl: &str) -> ProxyProc {
        ProxyProc::start(self.dir.path(), name, &cluster_yaml(&self.redis, ttl), "").ready()
    }

    fn create(&self, sub: &str) -> tunnox::domain::Mapping {
        let spec = MappingSpec::new(sub, "tunnox.net", "127.0.0.1", self.up.port);
        self.rt.block_on(self.store.create(spec)).unwrap()
    }
}

fn all_serve(proxies: &[&ProxyProc], host: &str, want: u16) -> bool {
    proxies.iter().all(|p| p.status(host) == want)
}

/// Counts the commands Redis receives that read `needle`, while `f` runs.
fn redis_reads(redis: &RedisServer, needle: &str, f: impl FnOnce()) -> usize {
    let mut monitor = Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "monitor"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(monitor.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap(); // "OK": the monitor is attached
    f();
    std::thread::sleep(Duration::from_millis(200));
    let _ = monitor.kill();
    let _ = monitor.wait();
    // Commands a script runs are listed too (`[0 lua]`): count what clients sent.
    let lines: Vec<String> = out
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains(needle) && !l.contains(" lua]"))
        .collect();
    lines.len()
}

#[test]
fn cache_reads_redis_once_per_ttl_and_deletes_reach_every_node() {
    let cl = Cluster::start();
    let (redis, rt) = (&cl.redis, &cl.rt);
    let a = cl.proxy("a", "2s");
    let b = cl.proxy("b", "2s");
    let c = cl.proxy("c", "2s");
    let all = [&a, &b, &c];

    let m = cl.create("app");
    eventually(
        "TC-3.1 created → served by all",
        Duration::from_secs(2),
        || all_serve(&all, "app.tunnox.net", 200),
    );

    // The first lookup on a fresh Redis sends the script's body after a NOSCRIPT reply (two
    // commands for one read): have the script cached before counting.
    assert_eq!(a.status("warm-the-script.tunnox.net"), 404);
    // TC-2.3 then TC-2.1: after TTL+1 s the entry is read again, once; nine more are cached.
    std::thread::sleep(Duration::from_secs(3));
    let reads = redis_reads(redis, "index:domain:app.tunnox.net", || {
        for _ in 0..10 {
            assert_eq!(a.status("app.tunnox.net"), 200);
        }
    });
    assert_eq!(
        reads, 1,
        "ten lookups after the TTL must read Redis exactly once"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&a.admin_get("/status").unwrap().body).unwrap();
    assert_eq!(stats["cache"]["type"], "redis");

    // TC-2.2 / TC-3.2: deleted through another connection → 404 everywhere.
    let other = rt.block_on(store(redis));
    rt.block_on(other.delete(&m.mapping_id, None)).unwrap();
    eventually(
        "TC-3.2 deleted → 404 on every node",
        Duration::from_secs(2),
        || all_serve(&all, "app.tunnox.net", 404),
    );

    // A negative entry is replaced as soon as the host is created.
    assert_eq!(a.status("later.tunnox.net"), 404);
    cl.create("later");
    eventually(
        "negative entry invalidated by creation",
        Duration::from_millis(900),
        || a.status("later.tunnox.net") == 200,
    );
}

#[test]
fn new_nodes_and_concurrent_writers_see_everything() {
    let cl = Cluster::start();
    let (redis, rt, up) = (&cl.redis, &cl.rt, &cl.up);
    let a = cl.proxy("a", "60s");

    // TC-3.4: ten writers, each with its own connection, create different mappings at once.
    rt.block_on(async {
        let mut writers = Vec::new();
        for i in 0..10 {
            let s = store(redis).await;
            let port = up.port;
            writers.push(tokio::spawn(async move {
                s.create(MappingSpec::new(
                    &format!("w{i}"),
                    "tunnox.net",
                    "127.0.0.1",
                    port,
                ))
                .await
            }));
        }
        for w in writers {
            w.await.unwrap().unwrap();
        }
    });
    // TC-3.3: a node started afterwards serves every existing mapping.
    let late = cl.proxy("late", "60s");
    for i in 0..10 {
        let host = format!("w{i}.tunnox.net");
        eventually("TC-3.4 all served", Duration::from_secs(2), || {
            all_serve(&[&a, &late], &host, 200)
        });
    }
    let nodes = redis.cli(&["smembers", "tunnox:nodes"]);
    assert!(
        nodes.contains('a') && nodes.contains("late"),
        "registry: {nodes}"
    );
    let state = redis.cli(&["hget", "tunnox:node:late", "state"]);
    assert_eq!(state, "active");
}

#[test]
fn converges_after_lost_pubsub_connections_and_a_redis_outage() {
    let mut cl = Cluster::start();
    let a = cl.proxy("a", "2s");
    let b = cl.proxy("b", "2s");
    let Cluster {
        redis,
        up,
        rt,
        store: s,
        ..
    } = &mut cl;
    let all = [&a, &b];

    // Changes made while the proxies' subscriptions are being killed.
    for round in 0..5 {
        for i in 0..4 {
            rt.block_on(s.create(MappingSpec::new(
                &format!("k{round}x{i}"),
                "tunnox.net",
                "127.0.0.1",
                up.port,
            )))
            .unwrap();
        }
        // Both proxies have subscribed (again) before their connections are killed.
        eventually("subscribers back", Duration::from_secs(5), || {
            redis
                .cli(&["pubsub", "numsub", "tunnox:http_domain:events"])
                .ends_with('2')
        });
        let killed = redis.cli(&["client", "kill", "type", "pubsub"]);
        assert_ne!(killed, "0", "round {round}: no subscriber to kill");
    }
    for round in 0..5 {
        for i in 0..4 {
            let host = format!("k{round}x{i}.tunnox.net");
            eventually(
                "every node converges without a restart",
                Duration::from_secs(5),
                || all_serve(&all, &host, 200),
            );
        }
    }

    // Redis stops: cached hosts keep being served, also once their TTL has passed.
    redis.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        all_serve(&all, "k0x0.tunnox.net", 200),
        "cached host while Redis is down"
    );
    assert_eq!(
        a.status("never-seen.tunnox.net"),
        503,
        "uncached host while Redis is down"
    );
    let metrics = a.admin_get("/metrics").unwrap().body;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(
        value("tunnox_proxy_sync_staleness_seconds") >= 1.0,
        "{metrics}"
    );
    assert!(
        value("tunnox_proxy_cache_stale_served_total") >= 1.0,
        "{metrics}"
    );

    // Redis is back: changes made now reach every node.
    redis.restart();
    let s = rt.block_on(store(redis));
    rt.block_on(s.create(MappingSpec::new(
        "after",
        "tunnox.net",
        "127.0.0.1",
        up.port,
    )))
    .unwrap();
    eventually(
        "converges after Redis returns",
        Duration::from_secs(10),
        || all_serve(&all, "after.tunnox.net", 200),
    );
    assert!(all_serve(&all, "k4x3.tunnox.net", 200));
}
