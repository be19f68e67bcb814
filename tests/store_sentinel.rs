//! Redis Sentinel (real processes: 1 master, 1 replica, 3 sentinels on loopback): the store
//! finds the master through the sentinels, keeps claiming through a failover (a killed
//! master, and a master demoted while still up), loses no acknowledged claim with
//! `wait_replicas`, and its change feed follows the new master.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::claimer::{ClaimLog, claim};
use support::{SentinelGroup, SentinelSetup};
use tunnox::domain::MappingSpec;
use tunnox::store::{
    Follower, MappingStore, RedisOptions, RedisStore, SentinelOptions, StoreError, SyncUpdate,
};

fn options(group: &SentinelGroup) -> RedisOptions {
    let mut o = RedisOptions::new("");
    o.sentinel = Some(SentinelOptions {
        master_name: group.master_name().to_string(),
        addrs: group.addrs(),
        password: group.setup.sentinel_password.clone(),
        tls: false,
    });
    o.pool_size = 2;
    o.wait_replicas = 1;
    o.wait_timeout = Duration::from_millis(500);
    o
}

async fn connect(group: &SentinelGroup) -> Arc<dyn MappingStore> {
    Arc::new(RedisStore::connect(options(group)).await.unwrap())
}

/// Follows the store as a proxy does, until the task is aborted; the table it holds is
/// shared. (`next` runs to completion: a cancelled call may have consumed an event.)
fn follow(
    store: Arc<dyn MappingStore>,
    table: Arc<Mutex<HashMap<String, u16>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut follower, all) = Follower::start(store, Duration::from_secs(1))
            .await
            .unwrap();
        apply(&table, vec![SyncUpdate::Reset(all)]);
        loop {
            match follower.next().await {
                Ok(u) => apply(&table, u),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
}

fn apply(table: &Mutex<HashMap<String, u16>>, updates: Vec<SyncUpdate>) {
    let mut t = table.lock().unwrap();
    for u in updates {
        match u {
            // A new history replaces the table here: a failover that lost mappings must show.
            SyncUpdate::Reset(all) | SyncUpdate::Rebase { mappings: all, .. } => {
                *t = all
                    .into_iter()
                    .map(|m| (m.full_domain.to_string(), m.target_port))
                    .collect();
            }
            SyncUpdate::Upsert(m) => {
                t.insert(m.full_domain.to_string(), m.target_port);
            }
            SyncUpdate::Remove { full_domain, .. } => {
                t.remove(full_domain.as_str());
            }
        }
    }
}

async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Domains in the store now.
async fn truth(store: &Arc<dyn MappingStore>) -> BTreeSet<String> {
    store
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.full_domain.to_string())
        .collect()
}

/// Runs the claimer and a follower, triggers a failover with `fail`, and checks that claims
/// resume, none acknowledged is lost, and the follower sees every one. Returns the log.
async fn claims_survive(group: &mut SentinelGroup, fail: impl FnOnce(&mut SentinelGroup) -> u16) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("tunnox=info")
        .with_test_writer()
        .try_init();
    let store = connect(group).await;
    let table = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let follower = follow(connect(group).await, table.clone());
    let log = Arc::new(Mutex::new(ClaimLog::default()));
    let claimer = tokio::spawn(claim(
        store.clone(),
        "c".into(),
        8080,
        log.clone(),
        stop.clone(),
    ));
    wait_until(
        "100 claims before the failover",
        Duration::from_secs(30),
        || log.lock().unwrap().acks.len() >= 100,
    )
    .await;

    let failovers_before = group.failovers();
    let old = fail(group);
    // Taken once the failure happened (the kill has returned): claims acknowledged until
    // here were made on the old master.
    let t_fail = Instant::now();
    let before = log.lock().unwrap().acks.len();
    let promoted = tokio::task::block_in_place(|| {
        let promoted = group.wait_failover(old, Duration::from_secs(30));
        // With one replica, the promoted master has none left until the old node is back:
        // waited writes are refused meanwhile (not acknowledged, not lost).
        if group
            .servers
            .iter()
            .any(|s| s.port() == old && !s.is_running())
        {
            group.restart_as_replica(old);
        }
        promoted
    });
    wait_until(
        "100 claims after the failover",
        Duration::from_secs(30),
        || log.lock().unwrap().acked_after(t_fail) >= 100,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    claimer.await.unwrap();

    let log = std::mem::take(&mut *log.lock().unwrap());
    let first = log
        .first_started_after(t_fail)
        .expect("a claim after the failover");
    let failover = first.done - t_fail;
    let failed_attempts = log.errors.iter().filter(|(t, _)| *t >= t_fail).count();
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    for (_, k) in &log.errors {
        *kinds.entry(k).or_default() += 1;
    }
    // A loaded machine may see the sentinels fail over a second time (judging the promoted
    // master down for a second); each failover they decide gets the same bound.
    let failovers = group.failovers().saturating_sub(failovers_before).max(1);
    eprintln!(
        "failover: sentinels promoted port {} in {promoted:?}; first claim acknowledged on the new master {failover:?} after the failure; \
         {before} claims acknowledged before, {} after; {failed_attempts} attempts failed meanwhile ({kinds:?}); {} failover(s)",
        group.master_port(),
        log.acks.len() - before,
        failovers,
    );
    assert!(
        failover < Duration::from_secs(20) * failovers as u32,
        "{failover:?} for {failovers} failover(s)"
    );

    // 0 lost: every acknowledged claim is in the store, read fresh from the new master.
    let fresh = connect(group).await;
    let now = truth(&fresh).await;
    let lost: Vec<&str> = log
        .acks
        .iter()
        .map(|a| a.domain.as_str())
        .filter(|d| !now.contains(*d))
        .collect();
    if !lost.is_empty() {
        for a in log
            .acks
            .iter()
            .filter(|a| lost.contains(&a.domain.as_str()))
        {
            eprintln!(
                "lost {a:?} t_fail+{:?}..{:?}",
                a.started.saturating_duration_since(t_fail),
                a.done.saturating_duration_since(t_fail)
            );
        }
        for (t, k) in &log.errors {
            eprintln!(
                "error at t_fail+{:?}: {k}",
                t.saturating_duration_since(t_fail)
            );
        }
        for srv in &group.servers {
            eprintln!(
                "{}: role {:?} version {:?} claim {:?}",
                srv.port(),
                srv.cli(&["role"]).lines().next(),
                srv.cli(&["get", "tunnox:http_domain:version"]),
                srv.cli(&[
                    "get",
                    &format!("tunnox:http_domain:index:domain:{}", lost[0])
                ])
            );
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged claims lost: {lost:?}",
        lost.len()
    );
    assert_eq!(now.len(), log.acks.len(), "exactly the acknowledged claims");

    // The follower (change feed + catch-up) converges on the new master's table.
    let acked: BTreeSet<String> = log.acks.iter().map(|a| a.domain.clone()).collect();
    drop(log);
    wait_until("follower has every claim", Duration::from_secs(15), || {
        let t = table.lock().unwrap();
        acked.iter().all(|d| t.contains_key(d))
    })
    .await;
    follower.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_continue_through_a_killed_master_and_none_is_lost() {
    let mut group = SentinelGroup::start();
    claims_survive(&mut group, SentinelGroup::kill_master).await;
    one_master(&group).await;
}

/// Exactly one data node is a master, the one the sentinels name (a loaded machine may see a
/// second failover, back to the restarted node: that is fine, the store follows either way).
/// A demoted master that stayed up is told to replicate only after the sentinels have seen it
/// report the wrong role for a while (Redis waits 4 publish periods, 8 s), so this waits for it.
async fn one_master(group: &SentinelGroup) {
    let masters = || -> Vec<u16> {
        group
            .servers
            .iter()
            .filter(|s| s.cli(&["role"]).starts_with("master"))
            .map(|s| s.port())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while masters() != [group.master_port()] && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(masters(), [group.master_port()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_while_up_sends_writes_to_the_new_one() {
    let mut group = SentinelGroup::start();
    // A graceful failover: the old master stays reachable and becomes a replica, so writes
    // that still reach it get READONLY (or their connection is killed by the sentinels).
    claims_survive(&mut group, |g| {
        let old = g.master_port();
        let name = g.master_name().to_string();
        assert_eq!(g.sentinel_cli(0, &["sentinel", "failover", &name]), "OK");
        old
    })
    .await;
    one_master(&group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replica_a_waited_write_is_not_acknowledged() {
    let mut group = SentinelGroup::start();
    let store = connect(&group).await;
    store
        .create(MappingSpec::new("ok", "tunnox.net", "127.0.0.1", 1))
        .await
        .unwrap();
    group.servers[1].kill();
    let err = store
        .create(MappingSpec::new("unsafe", "tunnox.net", "127.0.0.1", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Unreplicated {
                acked: 0,
                wanted: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_transient(), "the controller retries it");
    assert!(
        err.to_string().contains("storage.redis.wait_replicas"),
        "{err}"
    );
    // Without waiting, the same write is acknowledged (and could be lost in a failover).
    let mut o = options(&group);
    o.wait_replicas = 0;
    let unsafe_store = RedisStore::connect(o).await.unwrap();
    unsafe_store
        .create(MappingSpec::new("fast", "tunnox.net", "127.0.0.1", 1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_misconfiguration_is_a_clear_error() {
    let group = SentinelGroup::start_with(SentinelSetup {
        sentinel_password: Some("s3cret".into()),
        ..SentinelSetup::default()
    });
    let attempt = |edit: &dyn Fn(&mut SentinelOptions)| {
        let mut o = options(&group);
        edit(o.sentinel.as_mut().unwrap());
        async move {
            match tokio::time::timeout(Duration::from_secs(15), RedisStore::connect(o)).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => panic!("connect hung"),
            }
        }
    };
    attempt(&|_| {}).await.expect("right name and password");
    let e = attempt(&|s| s.master_name = "nope".into())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("\"nope\""), "{e}");
    let e = attempt(&|s| s.password = Some("wrong".into()))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    let e = attempt(&|s| s.password = None).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("auth"), "{e}");
    let nobody = support::process::free_port();
    let e = attempt(&move |s| s.addrs = vec![format!("127.0.0.1:{nobody}")])
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&nobody.to_string()), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_that_never_answers_does_not_hold_the_lookup() {
    let group = SentinelGroup::start();
    // Accepts connections, never answers: what a hung sentinel looks like.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let _held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let mut o = options(&group);
    let s = o.sentinel.as_mut().unwrap();
    s.addrs.insert(0, silent_addr);
    o.connect_timeout = Duration::from_millis(300);
    o.response_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let store = tokio::time::timeout(Duration::from_secs(10), RedisStore::connect(o))
        .await
        .expect("connect hung behind a silent sentinel")
        .unwrap();
    store
        .create(MappingSpec::new("a", "tunnox.net", "127.0.0.1", 1))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
