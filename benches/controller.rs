//! Controller benchmarks on a real API server and Redis (each its own process; the controller
//! and three proxies too): apply → record readable in Redis, apply → `Ready` (every proxy
//! applied it), a cold start over 10 000 mappings, and a restart over them with nothing changed.
//! Prints a Markdown section (`make bench` collects it into docs/benchmarks.md).

mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use support::process::{Role, free_port};
use support::{ControlPlane, RedisServer};
use tunnox::crd::{HTTPDomainMapping, HTTPDomainMappingSpec, Target};
use tunnox::store::{MappingStore, RedisOptions, RedisStore, SubscriptionEvent};

const APPLIES: usize = 200;
/// The management API's admin token on the restarted controller, and its listing's page size.
const API_TOKEN: &str = "bench-admin-token-0123456789";
const API_PAGE: usize = 500;
/// New mappings of the first programming (`TUNNOX_BENCH_COLD=<n>` for another count; the
/// waits grow with it).
const COLD: usize = 10_000;

fn cold_count() -> usize {
    std::env::var("TUNNOX_BENCH_COLD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(COLD)
}

fn mapping(ns: &str, name: &str, sub: &str) -> HTTPDomainMapping {
    let mut h = HTTPDomainMapping::new(
        name,
        HTTPDomainMappingSpec::new(sub, "tunnox.net", Target::address("127.0.0.1", 3000)),
    );
    h.metadata.namespace = Some(ns.into());
    h
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Starts a controller; returns it with its admin port.
fn start_controller(
    cp: &ControlPlane,
    config: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
) -> (Role, u16) {
    start_controller_with(cp, config, dir, name, &[])
}

/// [`start_controller`] with more environment (the management API).
fn start_controller_with(
    cp: &ControlPlane,
    config: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    extra: &[(&'static str, String)],
) -> (Role, u16) {
    let admin = free_port();
    let mut env = vec![
        ("KUBECONFIG", cp.kubeconfig().to_string()),
        ("POD_NAME", name.to_string()),
        ("POD_NAMESPACE", "default".to_string()),
        (
            "TUNNOX__CONTROLLER__ADMIN_LISTEN",
            format!("127.0.0.1:{admin}"),
        ),
    ];
    env.extend(extra.iter().cloned());
    let role = Role::start(
        &["--config", config.to_str().unwrap(), "controller"],
        &env,
        &dir.join(format!("{name}.log")),
    );
    (role, admin)
}

/// Starts a proxy of set `default.default` on loopback and waits until it is ready.
fn start_proxy(config: &std::path::Path, dir: &std::path::Path, name: &str) -> Role {
    let admin = free_port();
    let env = vec![
        ("TUNNOX__PROXY__NODE_ID", name.to_string()),
        (
            "TUNNOX__PROXY__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("TUNNOX__PROXY__ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
        ("TUNNOX__PROXY__WORKER_THREADS", "1".to_string()),
    ];
    let role = Role::start(
        &["--config", config.to_str().unwrap(), "proxy"],
        &env,
        &dir.join(format!("{name}.log")),
    );
    support::process::eventually("proxy ready", Duration::from_secs(30), || {
        support::http::get(admin, "localhost", "/readyz").is_some_and(|r| r.status == 200)
    });
    role
}

/// The sum of a controller's `tunnox_controller_reconciles_total`.
fn reconciles(admin: u16) -> usize {
    support::process::http_get(admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with("tunnox_controller_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Redis' count of writes since its last save (every write command moves it).
fn redis_writes(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "persistence"])
        .lines()
        .find_map(|l| l.strip_prefix("rdb_changes_since_last_save:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("rdb_changes_since_last_save")
}

fn is_ready(h: Option<&HTTPDomainMapping>) -> bool {
    h.and_then(|h| h.status.as_ref()).is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cp = ControlPlane::start();
    cp.install_crds();
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("storage: {{type: redis, redis: {{addr: '{}'}}}}\nhttp_domain: {{base_domains: [tunnox.net]}}\negress: {{allow: ['127.0.0.0/8']}}\nlog: {{level: warn}}\n", redis.addr()),
    )
    .unwrap();
    let (mut controller, first_admin) = start_controller(&cp, &config, dir.path(), "bench-1");
    let mut proxies: Vec<Role> = (0..3)
        .map(|i| start_proxy(&config, dir.path(), &format!("bench-proxy-{i}")))
        .collect();

    rt.block_on(async {
        let kubeconfig = Kubeconfig::read_from(cp.kubeconfig()).unwrap();
        let client = Client::try_from(Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap()).unwrap();
        let api: Api<HTTPDomainMapping> = Api::namespaced(client.clone(), "default");
        let store: Arc<dyn MappingStore> = Arc::new(RedisStore::connect(RedisOptions::new(&redis.addr())).await.unwrap());
        let mut sub = store.subscribe().await.unwrap();
        let mut wait_for = async |domain: String| loop {
            match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
                Ok(Some(SubscriptionEvent::Change(e))) if e.full_domain.as_str() == domain => return,
                Ok(Some(_)) => {}
                _ => panic!("no event for {domain}"),
            }
        };
        // Warm-up: the controller has to win its lease and sync its cache first.
        api.create(&PostParams::default(), &mapping("default", "warm", "warm")).await.unwrap();
        wait_for("warm.tunnox.net".into()).await;

        let mut samples = Vec::with_capacity(APPLIES);
        for i in 0..APPLIES {
            let t = Instant::now();
            api.create(&PostParams::default(), &mapping("default", &format!("lat{i}"), &format!("lat{i}"))).await.unwrap();
            wait_for(format!("lat{i}.tunnox.net")).await;
            samples.push(t.elapsed());
        }
        samples.sort();

        // apply → Ready: the controller saw all three proxies apply the version.
        // One watch, opened before the first create (as `kubectl wait` has one open by then),
        // so no sample pays for setting a watch up.
        let mut events = Box::pin(kube::runtime::watcher(api.clone(), Default::default()));
        let mut ready = Vec::with_capacity(APPLIES);
        for i in 0..APPLIES {
            let name = format!("rdy{i}");
            let t = Instant::now();
            api.create(&PostParams::default(), &mapping("default", &name, &name)).await.unwrap();
            loop {
                let event = tokio::time::timeout(Duration::from_secs(30), events.next())
                    .await
                    .expect("Ready within 30 s")
                    .expect("the watch goes on")
                    .unwrap();
                let seen = match &event {
                    kube::runtime::watcher::Event::Apply(h) | kube::runtime::watcher::Event::InitApply(h) => Some(h),
                    _ => None,
                };
                if seen.is_some_and(|h| h.metadata.name.as_deref() == Some(name.as_str()) && is_ready(Some(h))) {
                    break;
                }
            }
            ready.push(t.elapsed());
        }
        drop(events);
        ready.sort();
        // Where the time goes: the controller's own account of its waits for the proxies.
        let waited = support::process::http_get(first_admin, "/metrics")
            .lines()
            .filter(|l| {
                (l.starts_with("tunnox_controller_served_wait_seconds_")
                    || l.starts_with("tunnox_controller_status_write_seconds_")
                    || l.starts_with("tunnox_controller_reconcile_duration_seconds_"))
                    && !l.contains("bucket")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        for p in &mut proxies {
            p.terminate(Duration::from_secs(30));
        }

        // Cold start: 10 000 mappings exist, Redis is empty, the controller starts.
        assert_eq!(controller.terminate(Duration::from_secs(10)), Some(0));
        let cold_n = cold_count();
        let patience = Duration::from_secs(600 * (cold_n / COLD).max(1) as u64);
        let created = Instant::now();
        futures::stream::iter(0..cold_n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &mapping("default", &format!("cold{i}"), &format!("cold{i}"))).await.unwrap();
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let create_time = created.elapsed();
        assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
        let expected = cold_n + 2 * APPLIES + 1;
        let start = Instant::now();
        let (mut second, _) = start_controller(&cp, &config, dir.path(), "bench-2");
        loop {
            let n: usize = redis.cli(&["ZCARD", "tunnox:http_domain:index:all"]).parse().unwrap_or(0);
            if n >= expected {
                break;
            }
            assert!(start.elapsed() < patience, "cold start stuck at {n}/{expected}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cold = start.elapsed();
        let per_100k = cold.as_secs_f64() * 100_000.0 / expected as f64;
        let versions = async || {
            let list = api.list(&Default::default()).await.unwrap();
            list.items
                .into_iter()
                .map(|h| (h.metadata.name.unwrap_or_default(), h.metadata.resource_version.unwrap_or_default()))
                .collect::<Vec<_>>()
        };
        let moved = |before: &[(String, String)], after: &[(String, String)]| {
            before.iter().zip(after).filter(|(b, a)| b != a).count()
        };

        // The store lost under programmed mappings: each record comes back with the id and
        // version its status names, without a status write.
        tokio::time::sleep(Duration::from_secs(3)).await; // the last status writes land
        assert_eq!(second.terminate(Duration::from_secs(30)), Some(0));
        let rv_programmed = versions().await;
        assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
        let restoring = Instant::now();
        let (mut second, _) = start_controller(&cp, &config, dir.path(), "bench-restore");
        loop {
            let n: usize = redis.cli(&["ZCARD", "tunnox:http_domain:index:all"]).parse().unwrap_or(0);
            if n >= expected {
                break;
            }
            assert!(restoring.elapsed() < patience, "restore stuck at {n}/{expected}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restore = restoring.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let restore_writes = moved(&rv_programmed, &versions().await);
        let restore_per_100k = restore.as_secs_f64() * 100_000.0 / expected as f64;

        // Restart with nothing changed: every mapping reconciled, nothing written.
        assert_eq!(second.terminate(Duration::from_secs(30)), Some(0));
        let (rv_before, writes_before) = (versions().await, redis_writes(&redis));
        let restarted = Instant::now();
        // This one serves the management API too: its listing is measured after the restart.
        let api_port = free_port();
        let (mut third, admin) = start_controller_with(
            &cp,
            &config,
            dir.path(),
            "bench-3",
            &[
                ("TUNNOX__API__LISTEN", format!("127.0.0.1:{api_port}")),
                ("TUNNOX__API__TOKENS", format!("[{{token: {API_TOKEN}, role: admin}}]")),
            ],
        );
        // TUNNOX_BENCH_PERF=<file>: a CPU profile of this controller's restart (perf record).
        let mut perf = std::env::var("TUNNOX_BENCH_PERF").ok().map(|out| {
            std::process::Command::new("perf")
                .args(["record", "-F", "999", "-g", "-o", &out, "-p", &third.pid().to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf")
        });
        while reconciles(admin) < expected {
            assert!(restarted.elapsed() < patience, "restart stuck at {}/{expected}", reconciles(admin));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restart = restarted.elapsed();
        if let Some(p) = perf.as_mut() {
            let _ = std::process::Command::new("kill").args(["-INT", &p.id().to_string()]).status();
            let _ = p.wait();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rv_after, writes_after) = (versions().await, redis_writes(&redis));
        let status_writes = moved(&rv_before, &rv_after);
        let redis_written = writes_after - writes_before;
        // The management API of this controller: every mapping listed from Redis, page by page.
        let listed = harness::list_all(api_port, &third.pid().to_string(), API_TOKEN, API_PAGE);
        third.terminate(Duration::from_secs(30));

        println!("## Controller (issue: controller)\n");
        println!("`kube-apiserver` v1.34.4 + etcd 3.6.4 (both built by `e2e/build-controlplane.sh`), `redis-server` and `tunnox controller` each in its own process on this machine.");
        println!("Latency is measured from sending the create request (what `kubectl apply` sends) to the change event,");
        println!("which Redis publishes in the same script that writes the record.\n");
        println!("| measurement | n | p50 | p99 | max |");
        println!("|---|---|---|---|---|");
        println!(
            "| create → record readable in Redis | {APPLIES} | {} | {} | {} |",
            ms(pct(&samples, 0.5)),
            ms(pct(&samples, 0.99)),
            ms(*samples.last().unwrap())
        );
        println!(
            "| create → `Ready` (all 3 proxies applied it; watched) | {APPLIES} | {} | {} | {} |",
            ms(pct(&ready, 0.5)),
            ms(pct(&ready, 0.99)),
            ms(*ready.last().unwrap())
        );
        println!();
        println!(
            "`Ready` is set once every healthy proxy announced the version (docs/controller.md \"Ready means served\"); \
             3 `tunnox proxy` processes (`worker_threads: 1`) follow the same Redis. Goal p99 < 50 ms: **{}**.\n",
            if pct(&ready, 0.99) < Duration::from_millis(50) { "met" } else { "not met" }
        );
        println!("The controller's own account of that run (waits for the proxies, status writes, reconciles): {waited}.\n");
        println!(
            "First programming: {cold_n} new mappings created in the API server while no controller ran (in {:.1} s, 16 at a time), \
             Redis empty, controller started: all {expected} records in Redis after **{:.1} s** ({:.0} mappings/s; \
             extrapolated to 100 000: {:.0} s). Each new mapping needs its one status write (`Pending` → `Active`, the id and \
             version) through the API server to etcd, and here the API server, etcd, Redis and the controller share 2 cores; \
             creating the objects themselves ran at {:.0}/s.\n",
            create_time.as_secs_f64(),
            cold.as_secs_f64(),
            expected as f64 / cold.as_secs_f64(),
            per_100k,
            cold_n as f64 / create_time.as_secs_f64()
        );
        println!(
            "Restore: the controller stopped, Redis flushed (`FLUSHALL`) under the {expected} programmed mappings, a controller \
             started: all {expected} records back **{:.1} s** after the start, with the id and version each status names; \
             {restore_writes} mappings written (resourceVersion moved). Linear extrapolation to 100 000: {:.0} s \
             (goal < 60 s for the cold start of a lost store: **{}**).\n",
            restore.as_secs_f64(),
            restore_per_100k,
            if restore_per_100k < 60.0 && restore_writes == 0 { "met" } else { "not met" }
        );
        println!(
            "Restart with nothing changed: the controller stopped and started again over the same {expected} mappings: \
             every one reconciled **{:.1} s** after the start (the stopped leader released its lease); {status_writes} mappings written \
             (resourceVersion moved), {redis_written} Redis writes (its `rdb_changes_since_last_save`). \
             Linear extrapolation to 100 000: {:.0} s (goal < 15 s, 0 writes: **{}**).\n",
            restart.as_secs_f64(),
            restart.as_secs_f64() * 100_000.0 / expected as f64,
            if restart.as_secs_f64() * 100_000.0 / (expected as f64) < 15.0 && status_writes == 0 && redis_written == 0 { "met" } else { "not met" }
        );
        let goal = pct(&samples, 0.99) < Duration::from_millis(50);
        println!("Goal p99 < 50 ms for create → Redis: **{}**.\n", if goal { "met" } else { "not met" });
        let mut pages = listed.pages.clone();
        pages.sort();
        let api_p99 = pct(&pages, 0.99);
        let growth = listed.rss_max.saturating_sub(listed.rss_before);
        println!("### Listing through the management API (cluster)\n");
        println!(
            "The restarted controller serves `api.listen` with an admin token: `GET /api/v1/mappings?limit={API_PAGE}` following \
             `next_cursor` to the last page (the records read from Redis), one kept-alive connection, each page timed to the last \
             byte of its JSON; the controller's RSS read after every page.\n"
        );
        println!("| mappings listed | pages | page p50 | page p99 | page max | RSS before | RSS growth (most, after any page) |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | **{}** | {} | {} | **{}** |\n",
            listed.items,
            pages.len(),
            ms(pct(&pages, 0.5)),
            ms(api_p99),
            ms(*pages.last().expect("a page")),
            harness::mib(listed.rss_before),
            harness::mib(growth)
        );
        println!(
            "Goals (issue: management API): every mapping listed: **{}**; each page under 50 ms at p99: **{}**; RSS growth under 20 MB: **{}**.\n",
            if listed.items == expected { "met" } else { "not met" },
            if api_p99 < Duration::from_millis(50) { "met" } else { "not met" },
            if growth < 20_000_000 { "met" } else { "not met" }
        );
    });
}
