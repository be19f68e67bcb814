//! Redis Sentinel failover under load, with real processes on loopback: 1 master, 1 replica,
//! 3 sentinels; two `tunnox proxy` processes in Redis mode (through the sentinels) under wrk;
//! a claimer writing through the same `RedisStore` the controller uses. The master is killed:
//! the proxies serve every cached host without one failed request, claims resume on the new
//! master, no acknowledged mapping is lost, and new mappings reach the proxies.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::SentinelGroup;
use support::claimer::{ClaimLog, claim};
use support::http::Upstream;
use support::process::eventually;
use support::proxy::ProxyProc;
use tunnox::domain::MappingSpec;
use tunnox::store::{MappingStore, RedisOptions, RedisStore, SentinelOptions};

const HOSTS: usize = 200;

fn options(group: &SentinelGroup) -> RedisOptions {
    let mut o = RedisOptions::new("");
    o.sentinel = Some(SentinelOptions {
        master_name: group.master_name().to_string(),
        addrs: group.addrs(),
        password: None,
        tls: false,
    });
    o.pool_size = 2;
    o.wait_replicas = 1;
    o.wait_timeout = Duration::from_millis(500);
    o
}

/// A proxy's configuration: the sentinels, not an address.
fn proxy_yaml(group: &SentinelGroup) -> String {
    let addrs: Vec<String> = group.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "storage: {{type: redis, redis: {{sentinel: {{master_name: {}, addrs: [{}]}}}}}}
http_domain: {{base_domains: [tunnox.net], sync: {{check_interval: 1s}}}}
egress: {{allow: [\"127.0.0.0/8\"]}}
log: {{level: info}}",
        group.master_name(),
        addrs.join(", ")
    )
}

/// wrk over every seeded host, round-robin, for `secs` seconds.
fn wrk(dir: &Path, port: u16, secs: u64) -> std::thread::JoinHandle<Output> {
    let script = dir.join("hosts.lua");
    std::fs::write(
        &script,
        format!(
            "local n = {HOSTS}\nlocal k = 0\nrequest = function()\n  k = k % n + 1\n  \
             return wrk.format(\"GET\", \"/\", {{ [\"Host\"] = \"h\" .. (k - 1) .. \".tunnox.net\" }})\nend\n"
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    std::thread::spawn(move || {
        Command::new("wrk")
            .args(["-t1", "-c8", &format!("-d{secs}s"), "-s"])
            .arg(&script)
            .arg(url)
            .output()
            .expect("wrk (e2e/install-deps.sh installs it)")
    })
}

/// (requests, failed: non-2xx/3xx plus socket errors) from wrk's report.
fn wrk_counts(report: &str) -> (u64, u64) {
    let requests = report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let non_2xx: u64 = report
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let socket: u64 = report
        .lines()
        .find(|l| l.contains("Socket errors:"))
        .map(|l| {
            l.split(',')
                .filter_map(|part| part.split_whitespace().last())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    (requests, non_2xx + socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_master_under_load_fails_no_request_and_loses_no_mapping() {
    let mut group = SentinelGroup::start();
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let store: Arc<dyn MappingStore> =
        Arc::new(RedisStore::connect(options(&group)).await.unwrap());
    for i in 0..HOSTS {
        store
            .create(MappingSpec::new(
                &format!("h{i}"),
                "tunnox.net",
                "127.0.0.1",
                up.port,
            ))
            .await
            .unwrap();
    }
    let yaml = proxy_yaml(&group);
    let proxies: Vec<ProxyProc> = tokio::task::block_in_place(|| {
        ["pa", "pb"]
            .iter()
            .map(|name| ProxyProc::start(dir.path(), name, &yaml, "worker_threads: 1").ready())
            .collect()
    });
    for p in &proxies {
        for i in [0, HOSTS / 2, HOSTS - 1] {
            assert_eq!(p.status(&format!("h{i}.tunnox.net")), 200, "{}", p.log());
        }
    }

    // Load on both proxies, claims through the store, then the master dies.
    let loads: Vec<_> = proxies
        .iter()
        .map(|p| wrk(dir.path(), p.port, 16))
        .collect();
    let log = Arc::new(Mutex::new(ClaimLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let claimer = tokio::spawn(claim(
        store.clone(),
        "c".into(),
        up.port,
        log.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = log.lock().unwrap().acks.clone();
    assert!(!before.is_empty(), "claims before the kill");

    let old = group.kill_master();
    let t_kill = Instant::now();
    let promoted = tokio::task::block_in_place(|| {
        let promoted = group.wait_failover(old, Duration::from_secs(30));
        // As a Redis pod behind Sentinel restarts: as a replica of the current master.
        group.restart_as_replica(old);
        (
            promoted,
            promoted + group.wait_replica_synced(old, Duration::from_secs(30)),
        )
    });
    let (promoted, synced) = promoted;
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.lock().unwrap().acked_after(t_kill) < 20 {
        assert!(
            Instant::now() < deadline,
            "claims did not resume on the new master"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = log
        .lock()
        .unwrap()
        .first_started_after(t_kill)
        .cloned()
        .unwrap();
    let failover = first.done - t_kill;

    // A mapping created on the new master reaches both proxies (their change feeds moved).
    store
        .create(MappingSpec::new(
            "after",
            "tunnox.net",
            "127.0.0.1",
            up.port,
        ))
        .await
        .unwrap();
    tokio::task::block_in_place(|| {
        eventually(
            "new mapping served by both proxies",
            Duration::from_secs(10),
            || proxies.iter().all(|p| p.status("after.tunnox.net") == 200),
        )
    });

    let reports: Vec<String> = tokio::task::block_in_place(|| {
        loads
            .into_iter()
            .map(|l| String::from_utf8_lossy(&l.join().unwrap().stdout).into_owned())
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    claimer.await.unwrap();

    let log = std::mem::take(&mut *log.lock().unwrap());
    let present: std::collections::BTreeSet<String> = RedisStore::connect(options(&group))
        .await
        .unwrap()
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.full_domain.to_string())
        .collect();
    let lost_before: Vec<&str> = before
        .iter()
        .map(|a| a.domain.as_str())
        .filter(|d| !present.contains(*d))
        .collect();
    let lost_any = log
        .acks
        .iter()
        .filter(|a| !present.contains(&a.domain))
        .count();
    let mut total = (0, 0);
    for r in &reports {
        let (req, failed) = wrk_counts(r);
        total = (total.0 + req, total.1 + failed);
    }
    eprintln!(
        "sentinel failover under load: promoted in {promoted:?}, old node back as an in-sync replica {synced:?} after the kill; first claim acknowledged on the new master {failover:?} after the kill; \
         claims acknowledged before the kill {}, after {}; lost {}; proxies: {} requests, {} failed",
        before.len(),
        log.acked_after(t_kill),
        lost_any,
        total.0,
        total.1,
    );
    for (p, r) in proxies.iter().zip(&reports) {
        let (req, failed) = wrk_counts(r);
        assert!(req > 1000, "wrk ran against {}: {r}", p.port);
        assert_eq!(failed, 0, "failed requests through proxy {}:\n{r}", p.port);
        assert!(
            p.log().contains("the sentinels name another Redis master"),
            "the proxy followed the failover:\n{}",
            p.log()
        );
    }
    assert!(lost_before.is_empty(), "lost: {lost_before:?}");
    assert_eq!(lost_any, 0, "an acknowledged claim was lost");
    assert!(failover < Duration::from_secs(20), "{failover:?}");
    assert!(present.contains("h0.tunnox.net") && present.contains("after.tunnox.net"));
}
