//! Redis-only behaviour: lost pub/sub connections, a flushed server, authentication, TLS, and
//! the key layout of `docs/redis-schema.md`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use tunnox::domain::MappingSpec;
use tunnox::store::{
    Follower, MappingStore, RedisOptions, RedisStore, RedisTls, StoreError, SyncUpdate,
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
            SyncUpdate::Reset(all) => {
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
        // Cut the feed, then change things while it is down.
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
    store.delete(&m.mapping_id, None).await.unwrap();
    let keys = server.cli(&["--scan", "--pattern", "tunnox:*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["tunnox:http_domain:changes", "tunnox:http_domain:version"],
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
