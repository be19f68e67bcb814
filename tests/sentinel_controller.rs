//! The real controller behind Redis Sentinel: a Kubernetes API server (etcd + kube-apiserver on
//! loopback), `tunnox controller` with `storage.redis.sentinel` and `wait_replicas: 1`, and
//! 1 master, 1 replica, 3 sentinels. Mappings are applied continuously while the master is
//! killed: the controller keeps claiming on the new master, and every mapping that was Active
//! before the kill still has its record afterwards.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::controlplane::ok;
use support::process::{Role, eventually, free_port, http_get};
use support::{ControlPlane, SentinelGroup};
use tunnox::store::{MappingStore, RedisOptions, RedisStore, SentinelOptions};

const NS: &str = "sent";

fn hdm(i: usize) -> String {
    format!(
        "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: m{i}, namespace: {NS}}}\n\
         spec: {{subdomain: m{i}, baseDomain: tunnox.net, target: {{service: {{name: web, port: 80}}}}}}\n"
    )
}

/// name → (phase, mapping id) of every mapping in the namespace.
fn statuses(cp: &ControlPlane) -> BTreeMap<String, (String, String)> {
    let out = cp.kubectl_ok(&[
        "get",
        "hdm",
        "-n",
        NS,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.mappingId}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_string(),
                (
                    f.next().unwrap_or("").to_string(),
                    f.next().unwrap_or("").to_string(),
                ),
            ))
        })
        .collect()
}

fn active(s: &BTreeMap<String, (String, String)>) -> usize {
    s.values().filter(|(p, _)| p == "Active").count()
}

#[test]
fn the_controller_keeps_claiming_through_a_sentinel_failover() {
    let cp = ControlPlane::start();
    cp.install_crds();
    cp.kubectl_ok(&["create", "namespace", NS]);
    let mut group = SentinelGroup::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let addrs: Vec<String> = group.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    let config = dir.path().join("controller.yaml");
    std::fs::write(
        &config,
        format!(
            "storage: {{type: redis, redis: {{sentinel: {{master_name: {}, addrs: [{}]}}, wait_replicas: 1, wait_timeout: 500ms}}}}
http_domain: {{base_domains: [tunnox.net]}}
controller: {{admin_listen: \"127.0.0.1:{admin}\", resync_interval: 3s, conflict_retry: 2s, lease_duration: 4s, renew_interval: 1s}}
log: {{level: info}}
",
            group.master_name(),
            addrs.join(", ")
        ),
    )
    .unwrap();
    let controller = Role::start(
        &["--config", config.to_str().unwrap(), "controller"],
        &[
            ("KUBECONFIG", cp.kubeconfig().to_string()),
            ("POD_NAME", "ctl-0".to_string()),
            ("POD_NAMESPACE", NS.to_string()),
        ],
        &dir.path().join("controller.log"),
    );
    eventually("controller ready", Duration::from_secs(60), || {
        http_get(admin, "/readyz").trim() == "ok"
    });

    let docs: Vec<String> = (0..40).map(hdm).collect();
    ok(cp.apply(&docs.join("---\n")), "apply 40 mappings");
    eventually("40 mappings Active", Duration::from_secs(60), || {
        active(&statuses(&cp)) == 40
    });

    // Mappings keep arriving, one after another, through the failover.
    let applied = Arc::new(AtomicUsize::new(40));
    let stop = Arc::new(AtomicBool::new(false));
    let applier = {
        let (applied, stop) = (applied.clone(), stop.clone());
        let kubeconfig = cp.kubeconfig().to_string();
        let kubectl = cp.var("KUBECTL").to_string();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let i = applied.load(Ordering::Relaxed);
                let mut child = std::process::Command::new(&kubectl)
                    .env("KUBECONFIG", &kubeconfig)
                    .args(["apply", "-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(hdm(i).as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "apply m{i}");
                applied.store(i + 1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = statuses(&cp);
    let active_before: BTreeMap<String, String> = before
        .iter()
        .filter(|(_, (p, _))| p == "Active")
        .map(|(n, (_, id))| (n.clone(), id.clone()))
        .collect();

    let old = group.kill_master();
    let t_kill = Instant::now();
    let first_after = applied.load(Ordering::Relaxed);
    let promoted = group.wait_failover(old, Duration::from_secs(30));
    group.restart_as_replica(old);
    // The first mapping applied after the kill that the controller claims (Active is written
    // only after the store acknowledged the claim on the new master).
    eventually(
        "a mapping applied after the kill Active",
        Duration::from_secs(60),
        || {
            statuses(&cp).iter().any(|(n, (p, _))| {
                p == "Active" && n[1..].parse::<usize>().is_ok_and(|i| i >= first_after)
            })
        },
    );
    // Within one status poll (a kubectl call) of the claim.
    let failover = t_kill.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    applier.join().unwrap();
    let total = applied.load(Ordering::Relaxed);
    let converged = eventually("every mapping Active", Duration::from_secs(90), || {
        active(&statuses(&cp)) == total
    });

    // Every record, read from the new master through the sentinels.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let records = rt.block_on(async {
        let mut o = RedisOptions::new("");
        o.sentinel = Some(SentinelOptions {
            master_name: group.master_name().to_string(),
            addrs: group.addrs(),
            password: None,
            tls: false,
        });
        let store = RedisStore::connect(o).await.unwrap();
        store.list_all().await.unwrap()
    });
    let ids: BTreeSet<String> = records.iter().map(|m| m.mapping_id.to_string()).collect();
    let lost: Vec<&String> = active_before
        .iter()
        .filter(|(_, id)| !ids.contains(*id))
        .map(|(n, _)| n)
        .collect();
    eprintln!(
        "controller through a sentinel failover: promoted in {promoted:?}; the first mapping applied after the kill was Active {:?} after it; \
         {} Active before the kill, {} lost; {total} mappings, all Active {converged:?} after the applier stopped; {} records",
        failover,
        active_before.len(),
        lost.len(),
        records.len(),
    );
    assert!(
        lost.is_empty(),
        "Active before the kill, record gone: {lost:?}"
    );
    assert_eq!(records.len(), total, "one record per mapping");
    drop(controller);
}
