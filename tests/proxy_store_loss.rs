//! The last good state survives the store (issue #14, deliverable 3): three `tunnox proxy`
//! processes on one real redis-server serve 1 000 hosts under wrk load while Redis is flushed,
//! and separately restarted from an empty data directory. No request may fail: the proxies keep
//! their table (stale, `tunnox_proxy_sync_stale` 1) until the store is rebuilt and marked, then
//! follow it again (stale 0).
//!
//! The test plays the controller's part with the store calls the controller makes
//! (`controller::resync::pass_and_mark`): `ensure_epoch`, re-create every mapping (what the
//! woken reconciles do), `position`, `mark_rebuilt`. The controller's own rebuild is covered by
//! the e2e scenario `controller_rebuilds_flushed_redis`.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::RedisServer;
use support::http::Upstream;
use support::process::eventually;
use support::proxy::ProxyProc;
use tunnox::domain::MappingSpec;
use tunnox::store::{MappingStore, RedisOptions, RedisStore};

const HOSTS: usize = 1000;
/// Long enough to cover break → stale → hold → rebuild → fresh with load throughout.
const LOAD: Duration = Duration::from_secs(30);

fn yaml(redis: &RedisServer) -> String {
    yaml_with(redis, "")
}

/// With extra `http_domain.sync` fields (`, rebuild_wait: 3s`).
fn yaml_with(redis: &RedisServer, sync_extra: &str) -> String {
    format!(
        "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net], sync: {{check_interval: 1s{sync_extra}}}}}
egress: {{allow: [\"127.0.0.0/8\"]}}
log: {{level: info}}",
        redis.addr()
    )
}

fn host(i: usize) -> String {
    format!("s{i}.tunnox.net")
}

struct Fleet {
    redis: RedisServer,
    _dir: tempfile::TempDir,
    up: Upstream,
    rt: tokio::runtime::Runtime,
    /// The "controller's" store client, kept across the breaks as a controller keeps its own.
    store: Arc<dyn MappingStore>,
    proxies: Vec<ProxyProc>,
    script: std::path::PathBuf,
}

impl Fleet {
    fn start() -> Self {
        let redis = RedisServer::start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store: Arc<dyn MappingStore> = Arc::new(
            rt.block_on(RedisStore::connect(RedisOptions::new(&redis.addr())))
                .unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("hosts.lua");
        // Each wrk thread walks the 1 000 hosts in turn.
        std::fs::write(
            &script,
            format!(
                "local n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(\"GET\", \"/\", {{Host = \"s\" .. (n % {HOSTS}) .. \".tunnox.net\"}})\nend\n"
            ),
        )
        .unwrap();
        let mut fleet = Self {
            redis,
            _dir: dir,
            up: Upstream::start("one"),
            rt,
            store,
            proxies: Vec::new(),
            script,
        };
        fleet.rebuild();
        let yaml = yaml(&fleet.redis);
        for name in ["a", "b", "c"] {
            fleet
                .proxies
                .push(ProxyProc::start(fleet._dir.path(), name, &yaml, "").ready());
        }
        for p in &fleet.proxies {
            for i in [0, HOSTS / 2, HOSTS - 1] {
                assert_eq!(p.status(&host(i)), 200, "{}", p.log());
            }
            assert_eq!(metric(p, "tunnox_proxy_sync_stale"), 0.0);
        }
        fleet
    }

    /// What the controller does after the store lost its data: make sure an epoch exists,
    /// re-create every mapping it owns, then mark the epoch rebuilt at the version listed.
    fn rebuild(&self) -> Duration {
        let started = Instant::now();
        let store = self.store.clone();
        let port = self.up.port;
        self.rt.block_on(async move {
            // The first command after a Redis restart may meet the old, broken connection; the
            // controller retries its pass a second later, the test a little sooner.
            let mut tries = 0;
            let epoch = loop {
                match store.ensure_epoch().await {
                    Ok(e) => break e,
                    Err(e) if e.is_transient() && tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("ensure_epoch: {e}"),
                }
            };
            let mut tasks = tokio::task::JoinSet::new();
            for chunk in (0..HOSTS).collect::<Vec<_>>().chunks(100) {
                let (store, chunk) = (store.clone(), chunk.to_vec());
                tasks.spawn(async move {
                    for i in chunk {
                        let spec =
                            MappingSpec::new(&format!("s{i}"), "tunnox.net", "127.0.0.1", port);
                        store.create(spec).await.unwrap();
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
            let at = store.position().await.unwrap();
            assert_eq!(at.epoch.as_deref(), Some(epoch.as_str()));
            assert!(
                store
                    .mark_rebuilt(&epoch, at.version, "test-controller")
                    .await
                    .unwrap()
            );
        });
        started.elapsed()
    }

    /// Runs `break_store` under load and checks that no request failed.
    fn survives(&mut self, what: &str, break_store: impl FnOnce(&mut RedisServer)) {
        let loads: Vec<_> = self
            .proxies
            .iter()
            .map(|p| {
                let (port, script) = (p.port, self.script.clone());
                std::thread::spawn(move || {
                    Command::new("wrk")
                        .args(["-t1", "-c4", &format!("-d{}s", LOAD.as_secs())])
                        .arg("-s")
                        .arg(&script)
                        .arg(format!("http://127.0.0.1:{port}/"))
                        .output()
                        .expect("wrk (e2e/install-deps.sh installs it)")
                })
            })
            .collect();
        let load_started = Instant::now();
        std::thread::sleep(Duration::from_secs(2));

        break_store(&mut self.redis);
        let broken = Instant::now();
        let took = eventually(
            &format!("{what}: every proxy reports stale"),
            Duration::from_secs(15),
            || {
                self.proxies
                    .iter()
                    .all(|p| metric(p, "tunnox_proxy_sync_stale") == 1.0)
            },
        );
        let stats: serde_json::Value =
            serde_json::from_str(&self.proxies[0].admin_get("/status").unwrap().body).unwrap();
        assert_eq!(stats["sync"]["stale"], true, "{stats}");
        assert_eq!(stats["sync"]["stale_reason"], "epoch_changed", "{stats}");
        for p in &self.proxies {
            assert_eq!(
                p.admin_get("/readyz").unwrap().status,
                200,
                "stale is still ready"
            );
        }

        // Without the marker nothing switches, and traffic keeps flowing meanwhile.
        let served_before: Vec<f64> = self.proxies.iter().map(ok_requests).collect();
        std::thread::sleep(Duration::from_secs(2));
        for (p, before) in self.proxies.iter().zip(&served_before) {
            assert_eq!(
                metric(p, "tunnox_proxy_sync_stale"),
                1.0,
                "switched without a marker"
            );
            assert!(ok_requests(p) > before + 100.0, "no load while stale");
        }

        let rebuilt_in = self.rebuild();
        let fresh = eventually(
            &format!("{what}: every proxy fresh after the rebuild"),
            Duration::from_secs(8),
            || {
                self.proxies
                    .iter()
                    .all(|p| metric(p, "tunnox_proxy_sync_stale") == 0.0)
            },
        );
        let window = broken.elapsed();
        assert!(
            load_started.elapsed() + Duration::from_secs(1) < LOAD,
            "the load ended before the proxies were fresh again: the window was not covered"
        );

        let mut total = 0u64;
        for (p, load) in self.proxies.iter().zip(loads) {
            let out = load.join().unwrap();
            let report = String::from_utf8_lossy(&out.stdout).into_owned();
            eprintln!("{what}: proxy on {}:\n{report}", p.port);
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
                !report.contains("Non-2xx"),
                "{what}: requests failed while the store was rebuilt:\n{report}\n{}",
                p.log()
            );
            assert!(!report.contains("Socket errors"), "{what}: {report}");
            total += requests;
        }
        eprintln!(
            "{what}: {total} requests, 0 non-2xx; stale within {took:?}, rebuilt in {rebuilt_in:?}, fresh {fresh:?} later ({window:?} after the break)"
        );
        // The store is whole again and is what the proxies follow.
        for p in &self.proxies {
            assert_eq!(p.status(&host(7)), 200);
            assert_eq!(p.status("never-created.tunnox.net"), 404);
        }
    }
}

fn metric(p: &ProxyProc, name: &str) -> f64 {
    let body = p.admin_get("/metrics").map(|r| r.body).unwrap_or_default();
    body.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

fn ok_requests(p: &ProxyProc) -> f64 {
    metric(p, "tunnox_proxy_requests_total{class=\"2xx\"}")
}

#[test]
fn flush_and_empty_restart_under_load_fail_no_request() {
    let mut fleet = Fleet::start();
    fleet.survives("FLUSHALL", |redis| {
        assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    });
    fleet.survives("restart from an empty data directory", |redis| {
        redis.restart_empty();
        assert_eq!(
            redis.cli(&["GET", "tunnox:http_domain:version"]),
            "",
            "restarted empty"
        );
    });
}

/// A proxy starting against a store the controller has not rebuilt (a marker for another
/// epoch) serves what the store holds, ready, reporting `not_rebuilt` until the marker; a
/// proxy whose controller never comes takes the store after `rebuild_wait`.
#[test]
fn cold_start_reports_not_rebuilt_and_rebuild_wait_bounds_staleness() {
    let redis = RedisServer::start();
    let up = Upstream::start("one");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn MappingStore> = Arc::new(
        rt.block_on(RedisStore::connect(RedisOptions::new(&redis.addr())))
            .unwrap(),
    );
    let spec = |sub: &str| MappingSpec::new(sub, "tunnox.net", "127.0.0.1", up.port);
    rt.block_on(store.create(spec("kept"))).unwrap();
    let e1 = rt.block_on(store.ensure_epoch()).unwrap();
    assert!(rt.block_on(store.mark_rebuilt(&e1, 1, "ctl")).unwrap());
    // The history breaks but the marker survives (as after a failover that lost writes).
    redis.cli(&["SET", "tunnox:http_domain:epoch", "e2"]);
    let dir = tempfile::tempdir().unwrap();
    let cold = ProxyProc::start(dir.path(), "cold", &yaml(&redis), "").ready();
    assert_eq!(
        cold.status("kept.tunnox.net"),
        200,
        "serves what the store holds"
    );
    let stats = |p: &ProxyProc| -> serde_json::Value {
        serde_json::from_str(&p.admin_get("/status").unwrap().body).unwrap()
    };
    assert_eq!(stats(&cold)["sync"]["stale_reason"], "not_rebuilt");
    assert_eq!(metric(&cold, "tunnox_proxy_sync_stale"), 1.0);
    assert!(rt.block_on(store.mark_rebuilt("e2", 1, "ctl")).unwrap());
    eventually(
        "fresh once the marker comes",
        Duration::from_secs(5),
        || metric(&cold, "tunnox_proxy_sync_stale") == 0.0,
    );
    assert_eq!(stats(&cold)["sync"]["stale"], false);

    // A controller that never comes: stale for `rebuild_wait`, then the store as it is.
    let short = yaml_with(&redis, ", rebuild_wait: 3s");
    let waiting = ProxyProc::start(dir.path(), "waiting", &short, "").ready();
    assert_eq!(waiting.status("kept.tunnox.net"), 200);
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    eventually("stale after the flush", Duration::from_secs(5), || {
        metric(&waiting, "tunnox_proxy_sync_stale") == 1.0
    });
    assert_eq!(waiting.status("kept.tunnox.net"), 200, "kept while stale");
    let gave_up = eventually(
        "the store taken after rebuild_wait",
        Duration::from_secs(8),
        || metric(&waiting, "tunnox_proxy_sync_stale") == 0.0,
    );
    assert!(gave_up >= Duration::from_secs(1), "waited: {gave_up:?}");
    assert_eq!(waiting.status("kept.tunnox.net"), 404, "the store as it is");
    assert!(waiting.log().contains("rebuild_wait"), "{}", waiting.log());
}
