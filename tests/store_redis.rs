//! Redis-only behaviour: lost pub/sub connections, a flushed server, authentication, TLS, and
//! the key layout of `docs/redis-schema.md` (mappings, access counters, node registry).

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tunnox::domain::{MappingSpec, SetName};
use tunnox::store::{
    AccessDelta, AccessStats, Follower, MappingStore, NodeRecord, NodeRegistry, NodeState, Quota,
    RedisOptions, RedisStore, RedisTls, StoreError, SyncUpdate,
};

fn spec(sub: &str, port: u16) -> MappingSpec {
    MappingSpec::new(sub, "tunnox.net", "127.0.0.1", port)
}

async fn connect(server: &support::RedisServer) -> Arc<dyn MappingStore> {
    Arc::new(
        RedisStore::connect(RedisOptions::new(&server.addr()))
            .await
            .unwrap(),
    )
}

fn apply(table: &mut std::collections::HashMap<String, u16>, updates: Vec<SyncUpdate>) {
    for u in updates {
        match u {
            SyncUpdate::Reset(all) | SyncUpdate::Rebase { mappings: all, .. } => {
                *table = all
                    .into_iter()
                    .map(|m| (m.full_domain.to_string(), m.target_port))
                    .collect();
            }
            SyncUpdate::Upsert(m) => {
                table.insert(m.full_domain.to_string(), m.target_port);
            }
            SyncUpdate::Remove { full_domain, .. } => {
                table.remove(full_domain.as_str());
            }
        }
    }
}

async fn truth(store: &Arc<dyn MappingStore>) -> std::collections::HashMap<String, u16> {
    store
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.full_domain.to_string(), m.target_port))
        .collect()
}

/// Drives the follower until it has applied `version`, failing after a deadline.
async fn follow(
    follower: &mut Follower,
    table: &mut std::collections::HashMap<String, u16>,
    version: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while follower.applied() != version {
        match tokio::time::timeout_at(deadline, follower.next()).await {
            Ok(Ok(u)) => apply(table, u),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => panic!("follower stuck at {} (want {version})", follower.applied()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_recovers_every_change_after_client_kill() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    // A long periodic check, so recovery must come from the reconnect, not the timer.
    let (mut follower, initial) = Follower::start(store.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    let mut table = std::collections::HashMap::new();
    apply(&mut table, vec![SyncUpdate::Reset(initial)]);

    for round in 0..5u16 {
        for i in 0..20u16 {
            store
                .create(spec(&format!("k{round}-{i}"), i + 1))
                .await
                .unwrap();
        }
        // Cut the feed (once it is back from the last round), then change things while it is down.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server
            .cli(&["PUBSUB", "NUMSUB", "tunnox:http_domain:events"])
            .ends_with('1')
        {
            assert!(std::time::Instant::now() < deadline, "feed never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed = server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert_ne!(killed, "0", "a pub/sub client was connected");
        for i in 0..20u16 {
            store
                .create(spec(&format!("gap{round}-{i}"), i + 1))
                .await
                .unwrap();
        }
        let victims = store.list_all().await.unwrap();
        store.delete(&victims[0].mapping_id, None).await.unwrap();
        let v = store.current_version().await.unwrap();
        follow(&mut follower, &mut table, v).await;
        assert_eq!(
            table,
            truth(&store).await,
            "round {round}: replica equals Redis"
        );
        assert!(follower.connected());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_redis_makes_followers_reload() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    for i in 0..10u16 {
        store.create(spec(&format!("pre{i}"), i + 1)).await.unwrap();
    }
    let (mut follower, initial) = Follower::start(store.clone(), Duration::from_millis(200))
        .await
        .unwrap();
    let mut table = std::collections::HashMap::new();
    apply(&mut table, vec![SyncUpdate::Reset(initial)]);
    assert_eq!(table.len(), 10);
    assert_eq!(server.cli(&["FLUSHALL"]), "OK");
    store.create(spec("post", 1)).await.unwrap();
    // Version 1 again, below the follower's 10: it must notice and reload.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while table.len() != 1 {
        let u = tokio::time::timeout_at(deadline, follower.next())
            .await
            .expect("reload after flush")
            .unwrap();
        apply(&mut table, u);
    }
    assert_eq!(table, truth(&store).await);
    assert_eq!(follower.applied(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_store_is_a_new_epoch_even_once_writes_pass_the_old_version() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    for i in 0..10u16 {
        store.create(spec(&format!("pre{i}"), i + 1)).await.unwrap();
    }
    let e1 = store
        .position()
        .await
        .unwrap()
        .epoch
        .expect("created by the first write");
    let (mut follower, _) = Follower::start(store.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(server.cli(&["FLUSHALL"]), "OK");
    assert_eq!(
        store.position().await.unwrap(),
        tunnox::store::Position::default()
    );
    // Writes carry the version past the follower's 10 before it looks: versions are reused,
    // the epoch is not.
    for i in 0..15u16 {
        store.create(spec(&format!("post{i}"), 1)).await.unwrap();
    }
    let now = store.position().await.unwrap();
    assert_eq!(now.version, 15);
    assert_ne!(now.epoch.as_deref(), Some(e1.as_str()));
    let updates = follower.catch_up().await.unwrap();
    match updates.as_slice() {
        [SyncUpdate::Rebase { mappings, cause }] => {
            assert_eq!(*cause, tunnox::store::Break::EpochChanged);
            assert_eq!(mappings.len(), 15);
        }
        other => panic!("expected a rebase, got {other:?}"),
    }
    assert_eq!(follower.position(), now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_going_backwards_replaces_the_epoch() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    let mut made = Vec::new();
    for i in 0..10u16 {
        made.push(store.create(spec(&format!("h{i}"), 1)).await.unwrap());
    }
    let e1 = store.position().await.unwrap().epoch.unwrap();
    let (mut follower, _) = Follower::start(store.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    // A failover to a replica that lost versions 6..10: same epoch, lower version.
    let lose = |from: usize| {
        for m in &made[from..] {
            let id = m.mapping_id.as_str();
            server.cli(&["DEL", &format!("tunnox:http_domain:mapping:{id}")]);
            server.cli(&[
                "DEL",
                &format!("tunnox:http_domain:index:domain:{}", m.full_domain),
            ]);
            server.cli(&["ZREM", "tunnox:http_domain:index:all", id]);
            server.cli(&[
                "XDEL",
                "tunnox:http_domain:changes",
                &format!("0-{}", m.version),
            ]);
        }
        server.cli(&["SET", "tunnox:http_domain:version", &from.to_string()]);
    };
    // The log and the counter as the replica has them: nothing after `to`.
    let rewind = |to: u64| {
        for v in to + 1..=20 {
            server.cli(&["XDEL", "tunnox:http_domain:changes", &format!("0-{v}")]);
        }
        server.cli(&["XSETID", "tunnox:http_domain:changes", &format!("0-{to}")]);
        server.cli(&["SET", "tunnox:http_domain:version", &to.to_string()]);
    };
    lose(5);
    rewind(5);
    // A reader that applied 10 finds 5 at the same epoch: it replaces the epoch for everyone.
    let updates = follower.catch_up().await.unwrap();
    match updates.as_slice() {
        [SyncUpdate::Rebase { mappings, cause }] => {
            assert_eq!(*cause, tunnox::store::Break::WentBackwards);
            assert_eq!(mappings.len(), 5);
        }
        other => panic!("expected a rebase, got {other:?}"),
    }
    let e2 = store.position().await.unwrap().epoch.unwrap();
    assert_ne!(e2, e1, "the reader replaced the epoch");
    assert_eq!(follower.position().epoch.as_deref(), Some(e2.as_str()));

    // A writer that saw version 6 at this epoch finds the store at 3: its next write replaces
    // the epoch too, and the event says so.
    made = vec![store.create(spec("w", 1)).await.unwrap()];
    assert_eq!(made[0].version, 6);
    rewind(3);
    let mut sub = store.subscribe().await.unwrap();
    let m = store.create(spec("w2", 1)).await.unwrap();
    assert_eq!(m.version, 4);
    let e3 = store.position().await.unwrap().epoch.unwrap();
    assert_ne!(e3, e2, "the writer replaced the epoch");
    match sub.next().await {
        Some(tunnox::store::SubscriptionEvent::Change(e)) => {
            assert_eq!((e.version, e.epoch.as_deref()), (4, Some(e3.as_str())))
        }
        other => panic!("{other:?}"),
    }
    // A writer with nothing to compare (a new client) never replaces an epoch.
    let fresh = connect(&server).await;
    fresh.create(spec("w3", 1)).await.unwrap();
    assert_eq!(store.position().await.unwrap().epoch.unwrap(), e3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_marker_is_written_only_at_the_current_epoch() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    assert_eq!(store.rebuilt().await.unwrap(), None);
    let epoch = store.ensure_epoch().await.unwrap();
    assert_eq!(store.ensure_epoch().await.unwrap(), epoch, "created once");
    store.create(spec("m", 1)).await.unwrap();
    assert_eq!(
        store.position().await.unwrap().epoch.as_deref(),
        Some(epoch.as_str())
    );
    assert!(!store.mark_rebuilt("another", 1, "ctl").await.unwrap());
    assert_eq!(store.rebuilt().await.unwrap(), None);
    assert!(store.mark_rebuilt(&epoch, 1, "ctl").await.unwrap());
    let m = store.rebuilt().await.unwrap().unwrap();
    assert_eq!(
        (m.epoch.as_str(), m.version, m.by.as_str()),
        (epoch.as_str(), 1, "ctl")
    );
    assert_eq!(
        server.cli(&["HGET", "tunnox:http_domain:rebuilt", "epoch"]),
        epoch
    );
    // A flush takes the marker with it; a marker for the old epoch is refused.
    assert_eq!(server.cli(&["FLUSHALL"]), "OK");
    assert_eq!(store.rebuilt().await.unwrap(), None);
    assert!(!store.mark_rebuilt(&epoch, 1, "ctl").await.unwrap());
    assert_ne!(store.ensure_epoch().await.unwrap(), epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_version_counter_never_reuses_a_version() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    for i in 0..5u16 {
        store.create(spec(&format!("v{i}"), 1)).await.unwrap();
    }
    assert_eq!(server.cli(&["DEL", "tunnox:http_domain:version"]), "1");
    let m = store.create(spec("after", 1)).await.unwrap();
    assert_eq!(m.version, 6, "continues after the change log, not from 1");
    assert_eq!(store.current_version().await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_layout_matches_the_contract() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    let mut sp = spec("layout", 8080);
    sp.target_client_id = Some("c1".into());
    sp.owner_user_id = Some("u1".into());
    let m = store.create(sp).await.unwrap();
    let id = m.mapping_id.as_str();
    assert_eq!(
        server.cli(&["GET", "tunnox:http_domain:index:domain:layout.tunnox.net"]),
        id
    );
    let record: serde_json::Value =
        serde_json::from_str(&server.cli(&["GET", &format!("tunnox:http_domain:mapping:{id}")]))
            .unwrap();
    assert_eq!(record["full_domain"], "layout.tunnox.net");
    assert_eq!(record["version"], 1);
    assert_eq!(
        server.cli(&["ZRANGE", "tunnox:http_domain:index:client:c1", "0", "-1"]),
        id
    );
    assert_eq!(
        server.cli(&["ZRANGE", "tunnox:http_domain:index:user:u1", "0", "-1"]),
        id
    );
    assert_eq!(
        server.cli(&["ZRANGE", "tunnox:http_domain:index:all", "0", "-1"]),
        id
    );
    assert_eq!(server.cli(&["GET", "tunnox:http_domain:version"]), "1");
    let log = server.cli(&["XRANGE", "tunnox:http_domain:changes", "-", "+"]);
    assert!(
        log.starts_with("0-1") && log.contains("created") && log.contains(id),
        "{log}"
    );
    // The store epoch: created by the first write, 128 random bits in hex, in every log entry.
    let epoch = server.cli(&["GET", "tunnox:http_domain:epoch"]);
    assert!(
        epoch.len() == 32 && epoch.bytes().all(|b| b.is_ascii_hexdigit()),
        "{epoch}"
    );
    assert!(log.contains(&epoch), "{log}");
    store.delete(&m.mapping_id, None).await.unwrap();
    let keys = server.cli(&["--scan", "--pattern", "tunnox:*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "tunnox:http_domain:changes",
            "tunnox:http_domain:epoch",
            "tunnox:http_domain:version"
        ],
        "no orphan record or index"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_db_are_used_and_wrong_password_fails_clearly() {
    let server = support::RedisServer::start_with(&["--requirepass", "s3cret"]);
    let mut opts = RedisOptions::new(&server.url());
    opts.password = Some("s3cret".into());
    opts.db = 3;
    let store = RedisStore::connect(opts.clone()).await.unwrap();
    store.create(spec("authed", 1)).await.unwrap();
    assert_eq!(
        server.cli(&[
            "-n",
            "3",
            "EXISTS",
            "tunnox:http_domain:index:domain:authed.tunnox.net"
        ]),
        "1"
    );
    assert_eq!(
        server.cli(&[
            "-n",
            "0",
            "EXISTS",
            "tunnox:http_domain:index:domain:authed.tunnox.net"
        ]),
        "0"
    );
    opts.password = Some("wrong".into());
    let err = RedisStore::connect(opts)
        .await
        .err()
        .expect("wrong password must fail");
    assert!(matches!(err, StoreError::Redis(_)), "{err:?}");
    assert!(
        err.to_string().to_lowercase().contains("auth") || err.to_string().contains("WRONGPASS"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let (server, ca) = support::RedisServer::start_tls();
    let mut opts = RedisOptions::new(&server.url());
    opts.tls = RedisTls {
        ca_file: Some(ca),
        ..Default::default()
    };
    let store: Arc<dyn MappingStore> = Arc::new(RedisStore::connect(opts.clone()).await.unwrap());
    let m = store.create(spec("tls", 443)).await.unwrap();
    assert_eq!(store.get_by_domain(&m.full_domain).await.unwrap(), Some(m));
    let mut sub = store.subscribe().await.unwrap();
    store.create(spec("tls2", 1)).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap();
    assert!(
        matches!(ev, Some(tunnox::store::SubscriptionEvent::Change(_))),
        "{ev:?}"
    );
    // Without the CA the server's certificate is not trusted.
    opts.tls = RedisTls::default();
    assert!(
        RedisStore::connect(opts).await.is_err(),
        "an untrusted certificate must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_transient_error_not_a_hang() {
    let mut server = support::RedisServer::start();
    let store = connect(&server).await;
    store.create(spec("before", 1)).await.unwrap();
    server.kill();
    let started = std::time::Instant::now();
    let err = store.create(spec("during", 1)).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the timeouts"
    );
    server.restart();
    // The connection manager reconnects by itself; the AOF kept the first mapping.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.create(spec("after", 1)).await {
            Ok(_) => break,
            Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("did not recover: {e}"),
        }
    }
    let domains: Vec<String> = store
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.full_domain.to_string())
        .collect();
    assert_eq!(domains, vec!["before.tunnox.net", "after.tunnox.net"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_without_its_record_does_not_block_the_domain() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    let m = store.create(spec("orphan", 1)).await.unwrap();
    // As if the record were evicted or lost while its claim survived.
    assert_eq!(
        server.cli(&[
            "DEL",
            &format!("tunnox:http_domain:mapping:{}", m.mapping_id)
        ]),
        "1"
    );
    assert!(store.is_available(&m.full_domain).await.unwrap());
    let again = store.create(spec("orphan", 2)).await.unwrap();
    assert_eq!(
        store.get_by_domain(&m.full_domain).await.unwrap(),
        Some(again)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_record_does_not_hold_a_quota_slot() {
    let server = support::RedisServer::start();
    let store = connect(&server).await;
    let quota = Quota {
        per_group: 2,
        per_owner: 0,
    };
    let sourced = |sub: &str| {
        let mut s = spec(sub, 1);
        s.source = Some(format!("k8s:c1/team-a/{sub}"));
        s
    };
    let first = store.create_within(sourced("q1"), quota).await.unwrap();
    store.create_within(sourced("q2"), quota).await.unwrap();
    let group = "tunnox:http_domain:index:group:k8s:c1/team-a";
    assert_eq!(
        server.cli(&["ZCARD", group]),
        "2",
        "the key of the contract"
    );
    assert!(matches!(
        store.create_within(sourced("q3"), quota).await,
        Err(StoreError::QuotaExceeded { .. })
    ));
    // As if the record were evicted: its id stays in the group index until a create finds the
    // index full and checks it.
    server.cli(&[
        "DEL",
        &format!("tunnox:http_domain:mapping:{}", first.mapping_id),
    ]);
    store.create_within(sourced("q3"), quota).await.unwrap();
    assert_eq!(server.cli(&["ZCARD", group]), "2");
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        set: SetName::parse("web.eu-west").unwrap(),
        address: "10.0.0.7:8080".into(),
        admin_address: "10.0.0.7:9090".into(),
        tunnel_address: "10.0.0.7:7000".into(),
        state: NodeState::Draining,
        applied_version: 17,
        epoch: "e7".into(),
        heartbeat_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.5Z")
            .unwrap()
            .with_timezone(&Utc),
    }
}

fn hash(server: &support::RedisServer, key: &str) -> std::collections::HashMap<String, String> {
    let out = server.cli(&["HGETALL", key]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| (kv[0].to_string(), kv[1].to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registry_key_layout_matches_the_contract() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisOptions::new(&server.addr()))
        .await
        .unwrap();
    store
        .register_node(&node("proxy-1"), Duration::from_secs(30))
        .await
        .unwrap();
    let fields = hash(&server, "tunnox:node:proxy-1");
    let want: std::collections::HashMap<String, String> = [
        ("node_id", "proxy-1"),
        ("set", "web.eu-west"),
        ("address", "10.0.0.7:8080"),
        ("admin_address", "10.0.0.7:9090"),
        ("tunnel_address", "10.0.0.7:7000"),
        ("state", "draining"),
        ("applied_version", "17"),
        ("epoch", "e7"),
        ("heartbeat_at", "2026-01-02T03:04:05.500Z"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(fields, want);
    let ttl: i64 = server
        .cli(&["PTTL", "tunnox:node:proxy-1"])
        .parse()
        .unwrap();
    assert!(0 < ttl && ttl <= 30_000, "PTTL {ttl}");
    assert_eq!(server.cli(&["SMEMBERS", "tunnox:nodes"]), "proxy-1");
    // A heartbeat resets the TTL.
    store
        .register_node(&node("proxy-1"), Duration::from_secs(600))
        .await
        .unwrap();
    let ttl: i64 = server
        .cli(&["PTTL", "tunnox:node:proxy-1"])
        .parse()
        .unwrap();
    assert!(30_000 < ttl && ttl <= 600_000, "PTTL {ttl}");

    // An expired registration leaves the index at the next listing.
    store
        .register_node(&node("brief"), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.list_nodes().await.unwrap(), vec![node("proxy-1")]);
    assert_eq!(server.cli(&["SMEMBERS", "tunnox:nodes"]), "proxy-1");

    store.remove_node("proxy-1").await.unwrap();
    assert_eq!(server.cli(&["EXISTS", "tunnox:node:proxy-1"]), "0");
    assert_eq!(server.cli(&["EXISTS", "tunnox:nodes"]), "0");

    // The registry lives under the storage root, not under the mapping prefix.
    let mut opts = RedisOptions::new(&server.addr());
    opts.root_prefix = "{acme}".into();
    opts.prefix = "{acme}:routes".into();
    let custom = RedisStore::connect(opts).await.unwrap();
    custom
        .register_node(&node("proxy-2"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(server.cli(&["SMEMBERS", "{acme}:nodes"]), "proxy-2");
    assert_eq!(server.cli(&["EXISTS", "{acme}:node:proxy-2"]), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_hash_is_apart_from_the_record_and_deleted_with_it() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisOptions::new(&server.addr()))
        .await
        .unwrap();
    let m = store.create(spec("counted", 1)).await.unwrap();
    let record_key = format!("tunnox:http_domain:mapping:{}", m.mapping_id);
    let stats_key = format!("tunnox:http_domain:stats:{}", m.mapping_id);
    let record = server.cli(&["GET", &record_key]);
    let delta = |count, last_ms| AccessDelta {
        mapping_id: m.mapping_id.clone(),
        count,
        bytes_in: 10,
        bytes_out: 20,
        last_access_at: DateTime::from_timestamp_millis(last_ms).unwrap(),
    };
    store
        .record_access(&[delta(2, 1_700_000_000_500)])
        .await
        .unwrap();
    store
        .record_access(&[delta(1, 1_700_000_000_100)])
        .await
        .unwrap();
    let want: std::collections::HashMap<String, String> = [
        ("access_count", "3"),
        ("bytes_in", "20"),
        ("bytes_out", "40"),
        ("last_access_at", "1700000000500"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(hash(&server, &stats_key), want);
    assert_eq!(
        server.cli(&["GET", &record_key]),
        record,
        "the record JSON is not rewritten"
    );
    assert_eq!(server.cli(&["GET", "tunnox:http_domain:version"]), "1");
    assert_eq!(server.cli(&["XLEN", "tunnox:http_domain:changes"]), "1");

    store.delete(&m.mapping_id, None).await.unwrap();
    assert_eq!(server.cli(&["EXISTS", &stats_key]), "0");
    store.record_access(&[delta(1, 1)]).await.unwrap();
    let keys = server.cli(&["--scan", "--pattern", "tunnox:*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "tunnox:http_domain:changes",
            "tunnox:http_domain:epoch",
            "tunnox:http_domain:version"
        ],
        "no stats outlive their mapping"
    );

    // A claim whose record vanished is released with whatever counters were left.
    let orphan = store.create(spec("orphan", 1)).await.unwrap();
    let orphan_stats = format!("tunnox:http_domain:stats:{}", orphan.mapping_id);
    store
        .record_access(&[AccessDelta {
            mapping_id: orphan.mapping_id.clone(),
            ..delta(1, 1)
        }])
        .await
        .unwrap();
    server.cli(&[
        "DEL",
        &format!("tunnox:http_domain:mapping:{}", orphan.mapping_id),
    ]);
    store.create(spec("orphan", 2)).await.unwrap();
    assert_eq!(server.cli(&["EXISTS", &orphan_stats]), "0");
    assert_eq!(
        store.access_stats(&orphan.mapping_id).await.unwrap(),
        AccessStats::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_node_registrations_are_skipped() {
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisOptions::new(&server.addr()))
        .await
        .unwrap();
    store
        .register_node(&node("good"), Duration::from_secs(30))
        .await
        .unwrap();
    // Hand-written garbage: a bad field value, a value of the wrong type, a hash naming
    // another node, and an index entry whose hash is gone.
    let mut bad = vec!["HSET", "tunnox:node:bad-state"];
    let good = hash(&server, "tunnox:node:good");
    let mut pairs: Vec<(String, String)> = good.into_iter().collect();
    for (k, v) in pairs.iter_mut() {
        if k == "state" {
            *v = "sleeping".into();
        }
        if k == "node_id" {
            *v = "bad-state".into();
        }
    }
    for (k, v) in &pairs {
        bad.push(k);
        bad.push(v);
    }
    server.cli(&bad);
    server.cli(&["SET", "tunnox:node:wrong-type", "x"]);
    server.cli(&["HSET", "tunnox:node:impostor", "node_id", "good"]);
    server.cli(&[
        "SADD",
        "tunnox:nodes",
        "bad-state",
        "wrong-type",
        "impostor",
        "ghost",
    ]);
    assert_eq!(store.list_nodes().await.unwrap(), vec![node("good")]);
    // The unreadable ones stay listed in the index (they exist); only the ghost is pruned.
    let index = server.cli(&["SMEMBERS", "tunnox:nodes"]);
    let mut index: Vec<&str> = index.lines().collect();
    index.sort();
    assert_eq!(index, vec!["bad-state", "good", "impostor", "wrong-type"]);
    // A proper registration heals a broken one, whatever its type.
    let mut healed = node("wrong-type");
    healed.state = NodeState::Active;
    store
        .register_node(&healed, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        store.list_nodes().await.unwrap(),
        vec![node("good"), healed]
    );
}

/// Remote ports of a business: explicit and automatic claims, a conflict naming the holder (also
/// from another set of the business), stable automatic ports, freeing what is no longer asked
/// for, release, the version, bind errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_ports_are_claimed_atomically_per_business() {
    use tunnox::store::{PortClaim, PortOutcome, PortRegistry, PortRequest};
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisOptions::new(&server.addr()))
        .await
        .unwrap();
    let set = SetName::parse("default.default").unwrap();
    let other_set = SetName::parse("b.r").unwrap();
    let req = |holder: &str, name: &str, port: u16| PortRequest {
        port,
        claim: PortClaim {
            holder: holder.into(),
            set: None,
            client_id: format!("{holder}-client"),
            name: name.into(),
            target: "127.0.0.1:22".into(),
            udp: false,
            max_connections: None,
            max_bytes_per_second: None,
            health_check: None,
            group: None,
            balance: None,
            members: Vec::new(),
            udp_idle_ms: None,
        },
    };
    let range = (20000, 20002);
    assert_eq!(store.port_version(&set).await.unwrap(), 0);
    let a = store
        .claim_ports(
            &set,
            "a",
            &[req("a", "ssh", 2222), req("a", "db", 0)],
            range,
        )
        .await
        .unwrap();
    assert_eq!(a, vec![PortOutcome::Held(2222), PortOutcome::Held(20000)]);
    let v1 = store.port_version(&set).await.unwrap();
    assert!(v1 > 0);
    // The same claims again change nothing (the version stays).
    let again = store
        .claim_ports(
            &set,
            "a",
            &[req("a", "ssh", 2222), req("a", "db", 0)],
            range,
        )
        .await
        .unwrap();
    assert_eq!(again, a);
    assert_eq!(store.port_version(&set).await.unwrap(), v1);
    // b asks for a's port: a conflict naming a; its automatic port skips a's.
    let b = store
        .claim_ports(&set, "b", &[req("b", "web", 2222), req("b", "x", 0)], range)
        .await
        .unwrap();
    assert_eq!(
        b,
        vec![
            PortOutcome::Conflict {
                port: 2222,
                holder: "a".into()
            },
            PortOutcome::Held(20001)
        ]
    );
    // Another business has its own ports.
    let other = store
        .claim_ports(&other_set, "b", &[req("b", "web", 2222)], range)
        .await
        .unwrap();
    assert_eq!(other, vec![PortOutcome::Held(2222)]);
    // Another set of the same business shares its port space (its DR set can take any over).
    let sz = SetName::parse("default.sz").unwrap();
    let e = store
        .claim_ports(&sz, "e", &[req("e", "web", 2222)], range)
        .await
        .unwrap();
    assert_eq!(
        e,
        vec![PortOutcome::Conflict {
            port: 2222,
            holder: "a".into()
        }]
    );
    assert_eq!(
        store.port_table(&sz).await.unwrap(),
        store.port_table(&set).await.unwrap(),
        "one table"
    );
    // c gets the last automatic port; d finds the range exhausted.
    let c = store
        .claim_ports(&set, "c", &[req("c", "y", 0)], range)
        .await
        .unwrap();
    assert_eq!(c, vec![PortOutcome::Held(20002)]);
    let d = store
        .claim_ports(&set, "d", &[req("d", "z", 0)], range)
        .await
        .unwrap();
    assert_eq!(d, vec![PortOutcome::Exhausted]);
    // a drops its db tunnel: 20000 is freed, and d takes it.
    store
        .claim_ports(&set, "a", &[req("a", "ssh", 2222)], range)
        .await
        .unwrap();
    let d = store
        .claim_ports(&set, "d", &[req("d", "z", 0)], range)
        .await
        .unwrap();
    assert_eq!(d, vec![PortOutcome::Held(20000)]);
    // What a port carried adds up, and is forgotten when its holder lets it go.
    use tunnox::store::PortTraffic;
    let one = PortTraffic {
        connections: 1,
        bytes_in: 10,
        bytes_out: 20,
    };
    store.add_port_traffic(&set, 2222, one).await.unwrap();
    store.add_port_traffic(&set, 2222, one).await.unwrap();
    let traffic = store.port_traffic(&set).await.unwrap();
    assert_eq!(
        traffic.get(&2222),
        Some(&PortTraffic {
            connections: 2,
            bytes_in: 20,
            bytes_out: 40
        })
    );
    // a goes: b takes 2222 over.
    let before = store.port_version(&set).await.unwrap();
    store.release_ports(&set, "a").await.unwrap();
    assert!(store.port_version(&set).await.unwrap() > before);
    assert!(!store.port_traffic(&set).await.unwrap().contains_key(&2222));
    let b = store
        .claim_ports(&set, "b", &[req("b", "web", 2222), req("b", "x", 0)], range)
        .await
        .unwrap();
    assert_eq!(b, vec![PortOutcome::Held(2222), PortOutcome::Held(20001)]);
    let table = store.port_table(&set).await.unwrap();
    let mut held: Vec<(u16, String)> = table
        .ports
        .iter()
        .map(|(p, c)| (*p, c.holder.clone()))
        .collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            (2222, "b".into()),
            (20000, "d".into()),
            (20001, "b".into()),
            (20002, "c".into())
        ]
    );
    assert_eq!(table.version, store.port_version(&set).await.unwrap());
    // Bind errors per node; cleared when the node listens.
    store
        .report_port(&set, 2222, "p1", Some("Address in use"))
        .await
        .unwrap();
    assert_eq!(
        store.port_errors(&set).await.unwrap(),
        vec![(2222, "p1: Address in use".to_string())]
    );
    store.report_port(&set, 2222, "p1", None).await.unwrap();
    assert!(store.port_errors(&set).await.unwrap().is_empty());
}

/// A load-balancing group's port: TunnelSets of one group join it as members (each its own
/// client and target), a tunnel of no group or of another group is a conflict naming the group,
/// a member leaving (no longer asking, or released) leaves the others, and the last one frees
/// the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shares_its_port_among_its_members() {
    use tunnox::store::{PortClaim, PortOutcome, PortRegistry, PortRequest};
    let server = support::RedisServer::start();
    let store = RedisStore::connect(RedisOptions::new(&server.addr()))
        .await
        .unwrap();
    let set = SetName::parse("default.default").unwrap();
    let req = |holder: &str, group: Option<&str>, port: u16| PortRequest {
        port,
        claim: PortClaim {
            holder: holder.into(),
            set: None,
            client_id: format!("{holder}-client"),
            name: "web".into(),
            target: format!("127.0.0.1:{}", 8000 + holder.len()),
            udp: false,
            max_connections: None,
            max_bytes_per_second: None,
            health_check: None,
            group: group.map(Into::into),
            balance: group.map(|_| tunnox::domain::Balance::LeastConnections),
            members: Vec::new(),
            udp_idle_ms: None,
        },
    };
    let range = (20000, 20002);
    let claim = |holder: &'static str, reqs: Vec<PortRequest>| {
        let store = store.clone();
        let set = set.clone();
        async move { store.claim_ports(&set, holder, &reqs, range).await.unwrap() }
    };
    let members = || async {
        let table = store.port_table(&set).await.unwrap();
        table.ports.iter().find(|(p, _)| *p == 3000).map(|(_, c)| {
            let m: Vec<String> = c
                .members
                .iter()
                .map(|m| format!("{}={}", m.client_id, m.target))
                .collect();
            (c.holder.clone(), m)
        })
    };
    assert_eq!(
        claim("a", vec![req("a", Some("ns/g"), 3000)]).await,
        vec![PortOutcome::Held(3000)]
    );
    assert_eq!(
        claim("bb", vec![req("bb", Some("ns/g"), 3000)]).await,
        vec![PortOutcome::Held(3000)]
    );
    assert_eq!(
        members().await,
        Some((
            "group:ns/g".to_string(),
            vec![
                "a-client=127.0.0.1:8001".to_string(),
                "bb-client=127.0.0.1:8002".to_string()
            ]
        ))
    );
    // Not in the group, or in another namespace's group of the same name: a conflict.
    let conflict = PortOutcome::Conflict {
        port: 3000,
        holder: "group:ns/g".into(),
    };
    assert_eq!(
        claim("c", vec![req("c", None, 3000)]).await,
        vec![conflict.clone()]
    );
    assert_eq!(
        claim("c", vec![req("c", Some("other/g"), 3000)]).await,
        vec![conflict]
    );
    // A member's change is its own: bb moves its target, a stays.
    let v = store.port_version(&set).await.unwrap();
    let mut moved = req("bb", Some("ns/g"), 3000);
    moved.claim.target = "127.0.0.1:9999".into();
    assert_eq!(
        claim("bb", vec![moved.clone()]).await,
        vec![PortOutcome::Held(3000)]
    );
    assert!(store.port_version(&set).await.unwrap() > v);
    let v = store.port_version(&set).await.unwrap();
    assert_eq!(
        claim("bb", vec![moved]).await,
        vec![PortOutcome::Held(3000)]
    );
    assert_eq!(
        store.port_version(&set).await.unwrap(),
        v,
        "unchanged: no new version"
    );
    // Every member's reconcile writes the same record: the group's settings are its first
    // member's, whatever order the members are reconciled in.
    for _ in 0..2 {
        claim("a", vec![req("a", Some("ns/g"), 3000)]).await;
        let mut again = req("bb", Some("ns/g"), 3000);
        again.claim.target = "127.0.0.1:9999".into();
        again.claim.max_connections = Some(7);
        claim("bb", vec![again]).await;
    }
    assert_eq!(
        store.port_version(&set).await.unwrap(),
        v,
        "members do not flap the record"
    );
    // A UDP tunnel cannot join a TCP group's port.
    let mut udp = req("c", Some("ns/g"), 3000);
    udp.claim.udp = true;
    assert!(matches!(
        claim("c", vec![udp]).await[..],
        [PortOutcome::Conflict { port: 3000, .. }]
    ));
    // a no longer asks: it leaves, bb keeps the port.
    claim("a", vec![]).await;
    assert_eq!(
        members().await.map(|(_, m)| m),
        Some(vec!["bb-client=127.0.0.1:9999".to_string()])
    );
    // The last member turns its tunnel into one of no group on the same port: it keeps it.
    assert_eq!(
        claim("bb", vec![req("bb", None, 3000)]).await,
        vec![PortOutcome::Held(3000)]
    );
    assert_eq!(members().await.map(|(h, _)| h), Some("bb".to_string()));
    // And back into the group.
    assert_eq!(
        claim("bb", vec![req("bb", Some("ns/g"), 3000)]).await,
        vec![PortOutcome::Held(3000)]
    );
    // The last member released: the port is free for anyone.
    store.release_ports(&set, "bb").await.unwrap();
    assert_eq!(members().await, None);
    assert_eq!(
        claim("c", vec![req("c", None, 3000)]).await,
        vec![PortOutcome::Held(3000)]
    );
}
