//! One conformance suite, run against both stores: Redis (a real `redis-server` with AOF,
//! crashed with SIGKILL to "restart") and memory (restarted from its JSON file).

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tunnox::domain::{Hostname, MappingId, MappingSpec, SetName};
use tunnox::store::{
    AccessDelta, AccessStats, ChangeOp, Changes, Follower, ListFilter, MappingStore, MemoryStore,
    NodeRecord, NodeRegistry, NodeState, PageRequest, PersistOptions, Quota, QuotaScope,
    RedisOptions, RedisStore, SessionRecord, SessionState, StoreError, SubscriptionEvent,
    SyncUpdate, TunnelRegistry,
};
use tunnox::tunnel::credential::{ClientCredential, TokenHash};

#[allow(async_fn_in_trait)]
pub trait Fixture: Send + Sized {
    async fn new_with(changes_max_len: u64) -> Self;
    async fn new() -> Self {
        Self::new_with(100_000).await
    }
    fn store(&self) -> Arc<dyn MappingStore>;
    /// The same store seen as the node registry.
    fn registry(&self) -> Arc<dyn NodeRegistry>;
    /// The same store seen as the tunnel registry.
    fn tunnels(&self) -> Arc<dyn TunnelRegistry>;
    /// A second, independent handle (separate connections for Redis).
    async fn another(&self) -> Arc<dyn MappingStore>;
    /// Restarts the backing state: Redis crashes and restarts; memory reloads from its file.
    async fn restart(&mut self);
}

pub struct RedisFx {
    server: support::RedisServer,
    store: RedisStore,
    opts: RedisOptions,
}

impl RedisFx {
    pub fn server(&self) -> &support::RedisServer {
        &self.server
    }
}

impl Fixture for RedisFx {
    async fn new_with(changes_max_len: u64) -> Self {
        let server = support::RedisServer::start();
        let mut opts = RedisOptions::new(&server.addr());
        opts.changes_max_len = changes_max_len;
        opts.pool_size = 2;
        opts.node_id = "node-a".into();
        let store = RedisStore::connect(opts.clone()).await.unwrap();
        Self {
            server,
            store,
            opts,
        }
    }
    fn store(&self) -> Arc<dyn MappingStore> {
        Arc::new(self.store.clone())
    }
    fn registry(&self) -> Arc<dyn NodeRegistry> {
        Arc::new(self.store.clone())
    }
    fn tunnels(&self) -> Arc<dyn TunnelRegistry> {
        Arc::new(self.store.clone())
    }
    async fn another(&self) -> Arc<dyn MappingStore> {
        let mut opts = self.opts.clone();
        opts.pool_size = 1;
        Arc::new(RedisStore::connect(opts).await.unwrap())
    }
    async fn restart(&mut self) {
        self.server.crash_and_restart();
        self.store = RedisStore::connect(self.opts.clone()).await.unwrap();
    }
}

pub struct MemoryFx {
    _dir: tempfile::TempDir,
    persist: PersistOptions,
    store: MemoryStore,
    max_len: usize,
}

impl Fixture for MemoryFx {
    async fn new_with(changes_max_len: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let persist = PersistOptions {
            path: dir.path().join("data/tunnox-data.json"),
            auto_save: true,
            save_interval: Duration::from_secs(30),
        };
        let max_len = changes_max_len as usize;
        let store = MemoryStore::open(Some(persist.clone()), max_len, 1000, "node-a").unwrap();
        Self {
            _dir: dir,
            persist,
            store,
            max_len,
        }
    }
    fn store(&self) -> Arc<dyn MappingStore> {
        Arc::new(self.store.clone())
    }
    fn registry(&self) -> Arc<dyn NodeRegistry> {
        Arc::new(self.store.clone())
    }
    fn tunnels(&self) -> Arc<dyn TunnelRegistry> {
        Arc::new(self.store.clone())
    }
    async fn another(&self) -> Arc<dyn MappingStore> {
        self.store()
    }
    async fn restart(&mut self) {
        self.store.flush().await.unwrap();
        self.store =
            MemoryStore::open(Some(self.persist.clone()), self.max_len, 1000, "node-a").unwrap();
    }
}

fn spec(sub: &str, port: u16) -> MappingSpec {
    MappingSpec::new(sub, "tunnox.net", "127.0.0.1", port)
}

fn host(s: &str) -> Hostname {
    Hostname::parse(s).unwrap()
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        set: SetName::parse("web.eu-west").unwrap(),
        address: format!("{id}.pods:8080"),
        admin_address: format!("{id}.pods:9090"),
        tunnel_address: format!("{id}.pods:7000"),
        state: NodeState::Active,
        applied_version: 0,
        epoch: String::new(),
        // Sub-second precision: the record must read back exactly as written.
        heartbeat_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
            .unwrap()
            .with_timezone(&Utc),
    }
}

fn ids(nodes: &[NodeRecord]) -> Vec<&str> {
    nodes.iter().map(|n| n.node_id.as_str()).collect()
}

fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

fn delta(id: &MappingId, count: u64, bytes_in: u64, bytes_out: u64, last_ms: i64) -> AccessDelta {
    AccessDelta {
        mapping_id: id.clone(),
        count,
        bytes_in,
        bytes_out,
        last_access_at: at_ms(last_ms),
    }
}

/// The acceptance cases, generic over the fixture.
mod cases {
    use super::*;

    pub async fn tc_1_1_create_survives_restart<F: Fixture>(mut fx: F) {
        let created = fx.store().create(spec("test", 3000)).await.unwrap();
        assert_eq!(created.full_domain.as_str(), "test.tunnox.net");
        assert_eq!(created.creator_node_id, "node-a");
        fx.restart().await;
        let s = fx.store();
        assert_eq!(
            s.get(&created.mapping_id).await.unwrap(),
            Some(created.clone())
        );
        assert_eq!(
            s.get_by_domain(&host("test.tunnox.net")).await.unwrap(),
            Some(created)
        );
    }

    /// A lost record written again with the id and version its resource names: only ahead of
    /// the store (the log stays in order) and with a free id; refusals write nothing.
    pub async fn restore_keeps_id_and_version_in_log_order<F: Fixture>(mut fx: F) {
        let s = fx.store();
        s.create(spec("r1", 1)).await.unwrap();
        let (mut follower, _) = Follower::start(s.clone(), Duration::from_millis(200))
            .await
            .unwrap();
        let id = MappingId::generate();
        let restored = s
            .restore_within(spec("r2", 2), Quota::UNLIMITED, id.clone(), 10)
            .await
            .unwrap();
        assert_eq!((&restored.mapping_id, restored.version), (&id, 10));
        assert_eq!(s.current_version().await.unwrap(), 10);
        let behind = s
            .restore_within(spec("r3", 3), Quota::UNLIMITED, MappingId::generate(), 7)
            .await;
        assert!(
            matches!(
                behind,
                Err(StoreError::VersionConflict {
                    expected: 7,
                    actual: 10,
                    ..
                })
            ),
            "{behind:?}"
        );
        let same_id = s
            .restore_within(spec("r4", 4), Quota::UNLIMITED, id.clone(), 20)
            .await;
        assert!(
            matches!(
                same_id,
                Err(StoreError::VersionConflict {
                    expected: 20,
                    actual: 10,
                    ..
                })
            ),
            "{same_id:?}"
        );
        let taken = s
            .restore_within(spec("r1", 5), Quota::UNLIMITED, MappingId::generate(), 30)
            .await;
        assert!(
            matches!(taken, Err(StoreError::DomainTaken { .. })),
            "{taken:?}"
        );
        for refused in ["r3.tunnox.net", "r4.tunnox.net"] {
            assert!(s.is_available(&host(refused)).await.unwrap(), "{refused}");
        }
        assert_eq!(
            s.current_version().await.unwrap(),
            10,
            "refusals write nothing"
        );
        assert_eq!(s.create(spec("r5", 5)).await.unwrap().version, 11);
        match s.changes_since(1, 10).await.unwrap() {
            Changes::Events { events, .. } => assert_eq!(
                events.iter().map(|e| e.version).collect::<Vec<_>>(),
                [10, 11]
            ),
            other => panic!("{other:?}"),
        }
        // A follower at 1 takes 10 (which follows 1) and 11 as they come: no reload.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let updates = tokio::time::timeout(Duration::from_secs(5), follower.next())
                .await
                .expect("the follower hears both changes")
                .unwrap();
            for u in updates {
                match u {
                    SyncUpdate::Upsert(m) => seen.push(m.version),
                    other => panic!("a reload instead of the next change: {other:?}"),
                }
            }
        }
        assert_eq!(seen, [10, 11]);
        // Nothing absurd: the cap keeps versions exact in Lua and printable as integers.
        let huge = s
            .restore_within(
                spec("r6", 6),
                Quota::UNLIMITED,
                MappingId::generate(),
                tunnox::store::MAX_RESTORE_VERSION + 1,
            )
            .await;
        assert!(
            matches!(huge, Err(StoreError::VersionConflict { .. })),
            "{huge:?}"
        );
        // A history the controller marked rebuilt is complete: a record missing from it was
        // lost with writes, which only a new epoch tells the readers.
        let epoch = s.ensure_epoch().await.unwrap();
        assert!(s.mark_rebuilt(&epoch, 11, "test").await.unwrap());
        let marked = s
            .restore_within(spec("r7", 7), Quota::UNLIMITED, MappingId::generate(), 50)
            .await;
        assert!(
            matches!(marked, Err(StoreError::VersionConflict { .. })),
            "{marked:?}"
        );
        assert_eq!(
            s.current_version().await.unwrap(),
            11,
            "refusals write nothing"
        );
        fx.restart().await;
        assert_eq!(fx.store().get(&id).await.unwrap(), Some(restored));
    }

    /// Versions past 10^14 (where Lua prints numbers with an exponent) stay exact integers in
    /// the log: the store stays writable.
    pub async fn restore_at_a_large_version_keeps_the_store_writable<F: Fixture>(fx: F) {
        let s = fx.store();
        let big = 100_000_000_000_000;
        let r = s
            .restore_within(spec("big", 1), Quota::UNLIMITED, MappingId::generate(), big)
            .await
            .unwrap();
        assert_eq!(r.version, big);
        let next = s.create(spec("next", 1)).await.unwrap();
        assert_eq!(next.version, big + 1);
        match s.changes_since(big, 10).await.unwrap() {
            Changes::Events { events, .. } => assert_eq!(events[0].version, big + 1),
            other => panic!("{other:?}"),
        }
    }

    /// One epoch per continuous history: kept across writes and restarts (AOF / the file),
    /// carried by events, lookups and the change log; the marker only at the current epoch.
    pub async fn epoch_is_one_per_history<F: Fixture>(mut fx: F) {
        let s = fx.store();
        let mut sub = s.subscribe().await.unwrap();
        let m = s.create(spec("ep", 1)).await.unwrap();
        let epoch = s.ensure_epoch().await.unwrap();
        assert_eq!(s.ensure_epoch().await.unwrap(), epoch);
        s.create(spec("ep2", 1)).await.unwrap();
        let at = s.position().await.unwrap();
        assert_eq!((at.epoch.as_deref(), at.version), (Some(epoch.as_str()), 2));
        match tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
        {
            Some(SubscriptionEvent::Change(e)) => {
                assert_eq!(e.epoch.as_deref(), Some(epoch.as_str()))
            }
            other => panic!("{other:?}"),
        }
        match s.changes_since(0, 10).await.unwrap() {
            Changes::Events {
                events, epoch: e, ..
            } => {
                assert_eq!(e.as_deref(), Some(epoch.as_str()));
                assert!(
                    events
                        .iter()
                        .all(|ev| ev.epoch.as_deref() == Some(epoch.as_str()))
                );
            }
            other => panic!("{other:?}"),
        }
        let found = s.lookup(&m.full_domain).await.unwrap();
        assert_eq!(found.mapping.as_ref(), Some(&m));
        assert_eq!(found.position, at);
        let absent = s.lookup(&host("nope.tunnox.net")).await.unwrap();
        assert_eq!((absent.mapping, absent.position), (None, at.clone()));
        // A reader that saw less than the store has is not "backwards".
        let seen = tunnox::store::Position {
            epoch: at.epoch.clone(),
            version: 1,
        };
        assert_eq!(s.note_backwards(&seen).await.unwrap(), Some(epoch.clone()));
        assert!(!s.mark_rebuilt("not-the-epoch", 2, "ctl").await.unwrap());
        assert!(s.mark_rebuilt(&epoch, 2, "ctl").await.unwrap());
        fx.restart().await;
        let s = fx.store();
        assert_eq!(
            s.position().await.unwrap(),
            at,
            "a restart with data continues"
        );
    }

    pub async fn tc_1_2_hundred_creates_survive_restart<F: Fixture>(mut fx: F) {
        let mut created = Vec::new();
        for i in 0..100 {
            created.push(
                fx.store()
                    .create(spec(&format!("app{i}"), 1000 + i))
                    .await
                    .unwrap(),
            );
        }
        fx.restart().await;
        let all = fx.store().list_all().await.unwrap();
        assert_eq!(
            all, created,
            "every mapping, in creation order, byte for byte"
        );
        for m in &created {
            assert_eq!(
                fx.store()
                    .get_by_domain(&m.full_domain)
                    .await
                    .unwrap()
                    .as_ref(),
                Some(m)
            );
        }
        assert_eq!(fx.store().current_version().await.unwrap(), 100);
    }

    pub async fn tc_1_3_update_survives_restart<F: Fixture>(mut fx: F) {
        let s = fx.store();
        let m = s.create(spec("upd", 3000)).await.unwrap();
        let updated = s
            .update(&m.mapping_id, spec("upd", 4000), m.version)
            .await
            .unwrap();
        assert!(updated.version > m.version);
        assert_eq!(updated.created_at, m.created_at);
        drop(s);
        fx.restart().await;
        let got = fx
            .store()
            .get_by_domain(&host("upd.tunnox.net"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.target_port, 4000);
        assert_eq!(got, updated);
    }

    pub async fn tc_1_4_delete_survives_restart<F: Fixture>(mut fx: F) {
        let s = fx.store();
        let keep = s.create(spec("keep", 1)).await.unwrap();
        let m = s.create(spec("gone", 3000)).await.unwrap();
        let deleted = s.delete(&m.mapping_id, None).await.unwrap();
        assert_eq!(deleted.mapping_id, m.mapping_id);
        drop(s);
        fx.restart().await;
        let s = fx.store();
        assert_eq!(s.get(&m.mapping_id).await.unwrap(), None);
        assert_eq!(
            s.get_by_domain(&host("gone.tunnox.net")).await.unwrap(),
            None
        );
        assert!(s.is_available(&host("gone.tunnox.net")).await.unwrap());
        assert_eq!(s.list_all().await.unwrap(), vec![keep]);
    }

    pub async fn tc_4_1_second_create_names_holder<F: Fixture>(fx: F) {
        let s = fx.store();
        let mut first = spec("app", 1);
        first.source = Some("k8s:team-a/web".into());
        let holder = s.create(first).await.unwrap();
        assert!(!s.is_available(&host("app.tunnox.net")).await.unwrap());
        let err = s.create(spec("APP", 2)).await.unwrap_err();
        match &err {
            StoreError::DomainTaken {
                domain,
                holder: h,
                holder_source,
            } => {
                assert_eq!(domain.as_str(), "app.tunnox.net");
                assert_eq!(h, &holder.mapping_id);
                assert_eq!(holder_source.as_deref(), Some("k8s:team-a/web"));
            }
            other => panic!("expected DomainTaken, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(holder.mapping_id.as_str()) && text.contains("k8s:team-a/web"),
            "{text}"
        );
        assert_eq!(
            s.list_all().await.unwrap().len(),
            1,
            "the loser left nothing behind"
        );
    }

    pub async fn tc_4_2_concurrent_creators<F: Fixture>(fx: F) {
        let mut handles = Vec::new();
        for _ in 0..10 {
            handles.push(fx.another().await);
        }
        for round in 0..100 {
            let domain = format!("race{round}");
            let tasks: Vec<_> = handles
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let s = s.clone();
                    let d = domain.clone();
                    tokio::spawn(async move { s.create(spec(&d, 1000 + i as u16)).await })
                })
                .collect();
            let mut wins = Vec::new();
            let mut conflicts = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(m) => wins.push(m),
                    Err(StoreError::DomainTaken { holder, .. }) => {
                        conflicts += 1;
                        let _ = holder;
                    }
                    Err(e) => panic!("round {round}: unexpected error {e}"),
                }
            }
            assert_eq!((wins.len(), conflicts), (1, 9), "round {round}");
            let got = fx
                .store()
                .get_by_domain(&host(&format!("{domain}.tunnox.net")))
                .await
                .unwrap();
            assert_eq!(
                got.as_ref(),
                Some(&wins[0]),
                "round {round}: the claim belongs to the winner"
            );
        }
        assert_eq!(fx.store().list_all().await.unwrap().len(), 100);
    }

    fn sourced(sub: &str, source: &str, owner: Option<&str>) -> MappingSpec {
        let mut s = spec(sub, 1);
        s.source = Some(source.into());
        s.owner_user_id = owner.map(str::to_string);
        s
    }

    fn refused_by(r: Result<tunnox::domain::Mapping, StoreError>) -> (QuotaScope, u64, usize) {
        match r {
            Err(StoreError::QuotaExceeded {
                scope,
                count,
                limit,
            }) => (scope, count, limit),
            other => panic!("expected QuotaExceeded, got {other:?}"),
        }
    }

    pub async fn quotas_per_group_and_owner<F: Fixture>(mut fx: F) {
        let s = fx.store();
        let ns = Quota {
            per_group: 3,
            per_owner: 0,
        };
        let mut team_a = Vec::new();
        for i in 0..3 {
            team_a.push(
                s.create_within(
                    sourced(&format!("a{i}"), &format!("k8s:c1/team-a/m{i}"), None),
                    ns,
                )
                .await
                .unwrap(),
            );
        }
        let version = s.current_version().await.unwrap();
        let refused = s
            .create_within(sourced("a3", "k8s:c1/team-a/m3", None), ns)
            .await;
        let text = refused.as_ref().unwrap_err().to_string();
        assert_eq!(
            refused_by(refused),
            (QuotaScope::Group("k8s:c1/team-a".into()), 3, 3)
        );
        assert!(
            text.contains("k8s:c1/team-a") && text.contains("limit 3"),
            "{text}"
        );
        assert_eq!(
            s.current_version().await.unwrap(),
            version,
            "nothing written"
        );
        assert!(s.is_available(&host("a3.tunnox.net")).await.unwrap());
        // Another namespace, and the same namespace of another cluster, count apart.
        s.create_within(sourced("b0", "k8s:c1/team-b/m0", None), ns)
            .await
            .unwrap();
        s.create_within(sourced("c0", "k8s:c2/team-a/m0", None), ns)
            .await
            .unwrap();
        // A taken domain is a conflict, whatever the counts.
        assert!(matches!(
            s.create_within(sourced("a0", "k8s:c1/team-a/other", None), ns)
                .await,
            Err(StoreError::DomainTaken { .. })
        ));
        // Creating without a quota is not counted against, but counts.
        s.create(sourced("free", "k8s:c1/team-a/free", None))
            .await
            .unwrap();
        s.delete(&team_a[0].mapping_id, None).await.unwrap();
        assert_eq!(
            refused_by(
                s.create_within(sourced("a3", "k8s:c1/team-a/m3", None), ns)
                    .await
            )
            .1,
            3,
            "the unlimited one took the freed slot"
        );
        s.delete(&team_a[1].mapping_id, None).await.unwrap();
        let a3 = s
            .create_within(sourced("a3", "k8s:c1/team-a/m3", None), ns)
            .await
            .unwrap();
        // An update into the group (a source rewritten) counts from then on.
        let legacy = s
            .create(sourced("legacy", "k8s:team-a/legacy", None))
            .await
            .unwrap();
        s.delete(&a3.mapping_id, None).await.unwrap();
        s.update(
            &legacy.mapping_id,
            sourced("legacy", "k8s:c1/team-a/legacy", None),
            legacy.version,
        )
        .await
        .unwrap();
        assert_eq!(
            refused_by(
                s.create_within(sourced("a4", "k8s:c1/team-a/m4", None), ns)
                    .await
            )
            .0,
            QuotaScope::Group("k8s:c1/team-a".into())
        );

        // Per owner, across groups; sources without a group are counted by owner only.
        let own = Quota {
            per_group: 0,
            per_owner: 2,
        };
        s.create_within(sourced("o1", "k8s:c1/x/o1", Some("alice")), own)
            .await
            .unwrap();
        s.create_within(sourced("o2", "api", Some("alice")), own)
            .await
            .unwrap();
        assert_eq!(
            refused_by(
                s.create_within(sourced("o3", "k8s:c1/y/o3", Some("alice")), own)
                    .await
            ),
            (QuotaScope::Owner("alice".into()), 2, 2)
        );
        s.create_within(sourced("o4", "k8s:c1/y/o4", Some("bob")), own)
            .await
            .unwrap();

        // The counts survive a restart.
        fx.restart().await;
        let s = fx.store();
        assert!(matches!(
            s.create_within(sourced("a5", "k8s:c1/team-a/m5", None), ns)
                .await,
            Err(StoreError::QuotaExceeded { .. })
        ));
        assert!(matches!(
            s.create_within(sourced("o5", "k8s:c1/z/o5", Some("alice")), own)
                .await,
            Err(StoreError::QuotaExceeded { .. })
        ));
    }

    pub async fn quotas_hold_under_concurrent_creators<F: Fixture>(fx: F) {
        let mut handles = Vec::new();
        for _ in 0..10 {
            handles.push(fx.another().await);
        }
        for (round, quota, limit) in [
            (
                "ns",
                Quota {
                    per_group: 7,
                    per_owner: 0,
                },
                7,
            ),
            (
                "own",
                Quota {
                    per_group: 0,
                    per_owner: 4,
                },
                4,
            ),
        ] {
            let mut tasks = Vec::new();
            for i in 0..50 {
                let s = handles[i % handles.len()].clone();
                let spec = sourced(
                    &format!("{round}{i}"),
                    &format!("k8s:c1/{round}/m{i}"),
                    Some(round),
                );
                tasks.push(tokio::spawn(
                    async move { s.create_within(spec, quota).await },
                ));
            }
            let (mut ok, mut refused) = (0, 0);
            for t in tasks {
                match t.await.unwrap() {
                    Ok(_) => ok += 1,
                    Err(StoreError::QuotaExceeded {
                        count, limit: l, ..
                    }) => {
                        assert_eq!((count, l), (limit as u64, limit));
                        refused += 1;
                    }
                    Err(e) => panic!("{round}: unexpected {e}"),
                }
            }
            assert_eq!((ok, refused), (limit, 50 - limit), "{round}");
            let held = fx
                .store()
                .list(&ListFilter::User(round.into()), PageRequest::first(100))
                .await
                .unwrap();
            assert_eq!(
                held.items.len(),
                limit,
                "{round}: exactly the quota is stored"
            );
        }
    }

    pub async fn tc_4_3_delete_then_recreate<F: Fixture>(fx: F) {
        let s = fx.store();
        let m = s.create(spec("again", 1)).await.unwrap();
        s.delete(&m.mapping_id, Some(m.version)).await.unwrap();
        let again = s.create(spec("again", 2)).await.unwrap();
        assert_ne!(again.mapping_id, m.mapping_id);
        assert_eq!(
            s.get_by_domain(&host("again.tunnox.net"))
                .await
                .unwrap()
                .unwrap()
                .target_port,
            2
        );
    }

    pub async fn stale_update_is_rejected<F: Fixture>(fx: F) {
        let s = fx.store();
        let m = s.create(spec("cas", 1)).await.unwrap();
        let v2 = s
            .update(&m.mapping_id, spec("cas", 2), m.version)
            .await
            .unwrap();
        let err = s
            .update(&m.mapping_id, spec("cas", 3), m.version)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::VersionConflict { expected, actual, .. } if expected == m.version && actual == v2.version),
            "{err:?}"
        );
        let err = s.delete(&m.mapping_id, Some(m.version)).await.unwrap_err();
        assert!(matches!(err, StoreError::VersionConflict { .. }), "{err:?}");
        assert_eq!(s.get(&m.mapping_id).await.unwrap().unwrap().target_port, 2);
        let missing = tunnox::domain::MappingId::generate();
        assert!(matches!(
            s.update(&missing, spec("x", 1), 1).await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            s.delete(&missing, None).await,
            Err(StoreError::NotFound { .. })
        ));
    }

    pub async fn concurrent_updates_never_lose_one<F: Fixture>(fx: F) {
        let s = fx.store();
        let m = s.create(spec("counter", 1)).await.unwrap();
        let writers = 8;
        let per_writer = 10;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let s = fx.another().await;
            let id = m.mapping_id.clone();
            tasks.push(tokio::spawn(async move {
                let mut conflicts = 0u32;
                for i in 0..per_writer {
                    loop {
                        let cur = s.get(&id).await.unwrap().unwrap();
                        let mut next = cur.spec();
                        next.custom_headers
                            .insert(format!("x-w{w}-{i}"), "1".into());
                        match s.update(&id, next, cur.version).await {
                            Ok(_) => break,
                            Err(StoreError::VersionConflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            }));
        }
        let mut conflicts = 0;
        for t in tasks {
            conflicts += t.await.unwrap();
        }
        let end = s.get(&m.mapping_id).await.unwrap().unwrap();
        assert_eq!(
            end.custom_headers.len(),
            writers * per_writer,
            "every write survived ({conflicts} retries)"
        );
    }

    pub async fn changes_and_events<F: Fixture>(fx: F) {
        let s = fx.store();
        let mut sub = s.subscribe().await.unwrap();
        let m = s.create(spec("ev", 1)).await.unwrap();
        let u = s
            .update(&m.mapping_id, spec("ev2", 2), m.version)
            .await
            .unwrap();
        s.delete(&m.mapping_id, None).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .unwrap()
                .unwrap()
            {
                SubscriptionEvent::Change(e) => seen.push(e),
                other => panic!("unexpected {other:?}"),
            }
        }
        let ops: Vec<_> = seen.iter().map(|e| (e.op, e.version)).collect();
        assert_eq!(
            ops,
            vec![
                (ChangeOp::Created, 1),
                (ChangeOp::Updated, 2),
                (ChangeOp::Deleted, 3)
            ]
        );
        assert_eq!(seen[1].full_domain.as_str(), "ev2.tunnox.net");
        assert_eq!(
            seen[1].previous_domain.as_ref().map(|d| d.as_str()),
            Some("ev.tunnox.net")
        );
        assert_eq!(u.version, 2);
        match s.changes_since(0, 100).await.unwrap() {
            Changes::Events {
                events, current, ..
            } => {
                assert_eq!(current, 3);
                assert_eq!(events, seen, "the log and the feed agree");
            }
            other => panic!("{other:?}"),
        }
        match s.changes_since(1, 1).await.unwrap() {
            Changes::Events { events, .. } => assert_eq!(
                events.iter().map(|e| e.version).collect::<Vec<_>>(),
                vec![2]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.changes_since(3, 10).await.unwrap(),
            Changes::Events {
                events: vec![],
                current: 3,
                epoch: s.position().await.unwrap().epoch,
            }
        );
        // The old domain was released by the move, the new one by the delete.
        assert!(s.is_available(&host("ev.tunnox.net")).await.unwrap());
        assert!(s.is_available(&host("ev2.tunnox.net")).await.unwrap());
    }

    pub async fn update_moves_claim_and_respects_others<F: Fixture>(fx: F) {
        let s = fx.store();
        let a = s.create(spec("a", 1)).await.unwrap();
        let b = s.create(spec("b", 2)).await.unwrap();
        let err = s
            .update(&a.mapping_id, spec("b", 1), a.version)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::DomainTaken { holder, .. } if *holder == b.mapping_id),
            "{err:?}"
        );
        let moved = s
            .update(&a.mapping_id, spec("c", 1), a.version)
            .await
            .unwrap();
        assert_eq!(moved.full_domain.as_str(), "c.tunnox.net");
        assert!(s.is_available(&host("a.tunnox.net")).await.unwrap());
        assert_eq!(
            s.get_by_domain(&host("c.tunnox.net")).await.unwrap(),
            Some(moved)
        );
        assert_eq!(
            s.get_by_domain(&host("b.tunnox.net")).await.unwrap(),
            Some(b)
        );
        let err = s.create(spec("bad_name", 1)).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }

    pub async fn list_pages_and_filters<F: Fixture>(fx: F) {
        let s = fx.store();
        let mut all = Vec::new();
        for i in 0..25u16 {
            let mut sp = spec(&format!("l{i}"), 100 + i);
            if i % 5 == 0 {
                sp.target_client_id = Some("client-1".into());
            }
            if i % 8 == 0 {
                sp.owner_user_id = Some("user-1".into());
            }
            all.push(s.create(sp).await.unwrap());
        }
        let mut pages = Vec::new();
        let mut req = PageRequest::first(10);
        loop {
            let page = s.list(&ListFilter::All, req.clone()).await.unwrap();
            pages.push(page.items.len());
            match page.next {
                Some(next) => req.after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, vec![10, 10, 5]);
        assert_eq!(s.list_all().await.unwrap(), all);
        // A warm-up's read: every page in order (Redis reads several ahead), then the end.
        for limit in [1, 7, 10, 25, 100] {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let reading = s.read_all(limit, tx);
            let taking = async {
                let (mut got, mut sizes) = (Vec::new(), Vec::new());
                while let Some(page) = rx.recv().await {
                    sizes.push(page.len());
                    got.extend(page);
                }
                (got, sizes)
            };
            let (read, (got, sizes)) = tokio::join!(reading, taking);
            read.unwrap();
            assert_eq!(got, all, "pages of {limit}");
            assert!(
                sizes.iter().all(|&n| n == limit || n == 25 % limit),
                "{sizes:?}"
            );
        }
        // A reader that goes away ends the read, without an error.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let reading = s.read_all(10, tx);
        let taking = async move { rx.recv().await.map(|p| p.len()) };
        let (read, first) = tokio::join!(reading, taking);
        read.unwrap();
        assert_eq!(first, Some(10));
        let by_client = s
            .list(
                &ListFilter::Client("client-1".into()),
                PageRequest::first(100),
            )
            .await
            .unwrap();
        assert_eq!(
            by_client
                .items
                .iter()
                .map(|m| m.target_port)
                .collect::<Vec<_>>(),
            vec![100, 105, 110, 115, 120]
        );
        let by_user = s
            .list(&ListFilter::User("user-1".into()), PageRequest::first(2))
            .await
            .unwrap();
        assert_eq!(
            by_user
                .items
                .iter()
                .map(|m| m.target_port)
                .collect::<Vec<_>>(),
            vec![100, 108]
        );
        assert!(by_user.next.is_some());
        // Moving a mapping to another client moves it between indexes.
        let m = &all[0];
        let mut sp = m.spec();
        sp.target_client_id = Some("client-2".into());
        s.update(&m.mapping_id, sp, m.version).await.unwrap();
        let c1 = s
            .list(
                &ListFilter::Client("client-1".into()),
                PageRequest::first(100),
            )
            .await
            .unwrap();
        let c2 = s
            .list(
                &ListFilter::Client("client-2".into()),
                PageRequest::first(100),
            )
            .await
            .unwrap();
        assert_eq!((c1.items.len(), c2.items.len()), (4, 1));
        s.delete(&all[5].mapping_id, None).await.unwrap();
        let c1 = s
            .list(
                &ListFilter::Client("client-1".into()),
                PageRequest::first(100),
            )
            .await
            .unwrap();
        assert_eq!(c1.items.len(), 3);
        assert!(
            s.list(&ListFilter::Client("nobody".into()), PageRequest::first(10))
                .await
                .unwrap()
                .items
                .is_empty()
        );
    }

    pub async fn expired_mappings_release_their_domain<F: Fixture>(fx: F) {
        let s = fx.store();
        let mut short = spec("brief", 1);
        short.expires_at = Some(Utc::now() + chrono::Duration::milliseconds(300));
        let m = s.create(short.clone()).await.unwrap();
        let mut other = spec("brief2", 1);
        other.expires_at = short.expires_at;
        let m2 = s.create(other).await.unwrap();
        let lasting = s.create(spec("lasting", 1)).await.unwrap();
        assert!(s.get_by_domain(&m.full_domain).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            s.get_by_domain(&m.full_domain).await.unwrap(),
            None,
            "expired is not served"
        );
        assert!(s.is_available(&m.full_domain).await.unwrap());
        // A new claim takes the expired holder's domain.
        let taker = s.create(spec("brief", 9)).await.unwrap();
        assert_eq!(s.get(&m.mapping_id).await.unwrap(), None);
        assert_eq!(s.get_by_domain(&m.full_domain).await.unwrap(), Some(taker));
        // The reaper releases the rest and reports them.
        let released = s.release_expired(Utc::now()).await.unwrap();
        assert_eq!(
            released
                .iter()
                .map(|r| r.mapping_id.clone())
                .collect::<Vec<_>>(),
            vec![m2.mapping_id.clone()]
        );
        assert!(s.is_available(&m2.full_domain).await.unwrap());
        assert!(s.get(&lasting.mapping_id).await.unwrap().is_some());
        assert!(s.release_expired(Utc::now()).await.unwrap().is_empty());
    }

    pub async fn follower_reloads_when_behind_trimmed_log<F: Fixture>(fx: F) {
        let s = fx.store();
        // The follower starts at version 0, then falls 400 changes behind a log capped at ~10.
        let (mut follower, initial) = Follower::start(s.clone(), Duration::from_secs(3600))
            .await
            .unwrap();
        let mut replica = Replica::new(initial);
        for i in 0..400 {
            s.create(spec(&format!("t{i}"), 1)).await.unwrap();
        }
        assert!(matches!(
            s.changes_since(1, 10).await.unwrap(),
            Changes::Trimmed { current: 400, .. }
        ));
        let updates = follower.catch_up().await.unwrap();
        assert!(
            matches!(updates.as_slice(), [tunnox::store::SyncUpdate::Reset(all)] if all.len() == 400),
            "told to reload fully"
        );
        replica.apply(updates);
        assert_eq!(follower.applied(), 400);
        replica.assert_matches(&s).await;
    }

    pub async fn follower_converges_after_lag<F: Fixture>(fx: F) {
        let s = fx.store();
        let (mut follower, initial) = Follower::start(s.clone(), Duration::from_millis(200))
            .await
            .unwrap();
        let mut replica = Replica::new(initial);
        let writer = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..300u16 {
                    let m = s.create(spec(&format!("f{i}"), i + 1)).await.unwrap();
                    if i % 3 == 0 {
                        s.update(&m.mapping_id, spec(&format!("f{i}"), 9999), m.version)
                            .await
                            .unwrap();
                    }
                    if i % 7 == 0 {
                        s.delete(&m.mapping_id, None).await.unwrap();
                    }
                    ids.push(m.mapping_id);
                }
            })
        };
        writer.await.unwrap();
        let target = s.current_version().await.unwrap();
        replica.follow_until(&mut follower, target).await;
        replica.assert_matches(&s).await;
    }

    pub async fn node_registry_register_change_remove<F: Fixture>(fx: F) {
        let r = fx.registry();
        let ttl = Duration::from_secs(60);
        assert!(r.list_nodes().await.unwrap().is_empty());
        r.register_node(&node("proxy-b"), ttl).await.unwrap();
        r.register_node(&node("proxy-a"), ttl).await.unwrap();
        let listed = r.list_nodes().await.unwrap();
        assert_eq!(
            ids(&listed),
            vec!["proxy-a", "proxy-b"],
            "sorted by node_id"
        );
        assert_eq!(listed[0], node("proxy-a"), "read back exactly as written");
        // A heartbeat replaces the record: state and applied version change in place.
        let mut draining = node("proxy-a");
        draining.state = NodeState::Draining;
        draining.applied_version = 42;
        draining.heartbeat_at = Utc::now();
        r.register_node(&draining, ttl).await.unwrap();
        let listed = r.list_nodes().await.unwrap();
        assert_eq!(listed, vec![draining.clone(), node("proxy-b")]);
        r.remove_node("proxy-b").await.unwrap();
        r.remove_node("never-registered").await.unwrap();
        assert_eq!(r.list_nodes().await.unwrap(), vec![draining]);
        // Registrations are not mappings: no version, no change event.
        assert_eq!(fx.store().current_version().await.unwrap(), 0);
    }

    fn session(id: &str, instance: &str, slot: u32, ttl: Duration) -> SessionRecord {
        let now = Utc::now();
        SessionRecord {
            session_id: id.into(),
            node_id: "proxy-a".into(),
            node_address: "127.0.0.1:8080".into(),
            instance: instance.into(),
            slot,
            since: now,
            last_seen: now,
            expires_at: now + chrono::Duration::from_std(ttl).unwrap(),
            state: SessionState::Active,
            config: None,
            unhealthy: Vec::new(),
        }
    }

    pub async fn tunnel_sessions_replace_coexist_and_expire<F: Fixture>(fx: F) {
        let t = fx.tunnels();
        let long = Duration::from_secs(60);
        let ids = |v: Vec<SessionRecord>| -> Vec<String> {
            let mut ids: Vec<String> = v.into_iter().map(|r| r.session_id).collect();
            ids.sort();
            ids
        };
        assert!(t.sessions("laptop").await.unwrap().is_empty());
        let old = session("s1", "i1", 0, long);
        t.put_session("laptop", &old, long).await.unwrap();
        // The same agent session reconnects: its stale record is replaced at once.
        let new = session("s2", "i1", 0, long);
        t.put_session("laptop", &new, long).await.unwrap();
        // Another replica and the agent's second session coexist.
        t.put_session("laptop", &session("s3", "i2", 0, long), long)
            .await
            .unwrap();
        t.put_session("laptop", &session("s4", "i1", 1, long), long)
            .await
            .unwrap();
        assert_eq!(ids(t.sessions("laptop").await.unwrap()), ["s2", "s3", "s4"]);
        assert_eq!(
            t.sessions("laptop")
                .await
                .unwrap()
                .iter()
                .find(|r| r.session_id == "s2"),
            Some(&new)
        );
        // The old session's heartbeat does not write it back, and its close leaves its
        // replacement.
        assert!(!t.refresh_session("laptop", &old, long).await.unwrap());
        assert!(t.refresh_session("laptop", &new, long).await.unwrap());
        assert!(!t.remove_session("laptop", &old).await.unwrap());
        assert!(t.remove_session("laptop", &new).await.unwrap());
        assert_eq!(ids(t.sessions("laptop").await.unwrap()), ["s3", "s4"]);
        // A record past its expiry is not live, and is pruned by the next write.
        let brief = Duration::from_millis(200);
        t.put_session("laptop", &session("s5", "i3", 0, brief), long)
            .await
            .unwrap();
        assert_eq!(ids(t.sessions("laptop").await.unwrap()), ["s3", "s4", "s5"]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ids(t.sessions("laptop").await.unwrap()), ["s3", "s4"]);
        assert!(t.sessions("other").await.unwrap().is_empty());

        assert_eq!(t.credential("laptop").await.unwrap(), None);
        let cred = ClientCredential {
            client_id: "laptop".into(),
            token_sha256: TokenHash::of("t0ken"),
            placement: Some(SetName::parse("web.eu").unwrap()),
            source: Some("k8s:team-a/laptop".into()),
        };
        t.put_credential(&cred).await.unwrap();
        let got = t.credential("laptop").await.unwrap().unwrap();
        assert_eq!(got, cred);
        assert!(got.token_sha256.verify("t0ken"));
        t.remove_credential("laptop").await.unwrap();
        assert_eq!(t.credential("laptop").await.unwrap(), None);
        // Sessions and credentials are not mappings: no version.
        assert_eq!(fx.store().current_version().await.unwrap(), 0);
    }

    pub async fn node_registry_expires_without_heartbeat<F: Fixture>(fx: F) {
        let r = fx.registry();
        let short = Duration::from_millis(300);
        r.register_node(&node("lasting"), Duration::from_secs(60))
            .await
            .unwrap();
        r.register_node(&node("brief"), short).await.unwrap();
        r.register_node(&node("beating"), short).await.unwrap();
        assert_eq!(
            ids(&r.list_nodes().await.unwrap()),
            vec!["beating", "brief", "lasting"]
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A heartbeat resets the time-to-live.
        r.register_node(&node("beating"), Duration::from_millis(600))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            ids(&r.list_nodes().await.unwrap()),
            vec!["beating", "lasting"],
            "brief expired, beating was renewed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(ids(&r.list_nodes().await.unwrap()), vec!["lasting"]);
        // An expired node comes back with its next heartbeat.
        r.register_node(&node("brief"), short).await.unwrap();
        assert_eq!(
            ids(&r.list_nodes().await.unwrap()),
            vec!["brief", "lasting"]
        );
    }

    pub async fn access_stats_accumulate_without_versions_or_events<F: Fixture>(mut fx: F) {
        let s = fx.store();
        let a = s.create(spec("hits", 1)).await.unwrap();
        let b = s.create(spec("other", 2)).await.unwrap();
        let unknown = MappingId::generate();
        assert_eq!(
            s.access_stats(&a.mapping_id).await.unwrap(),
            AccessStats::default(),
            "zeros before anything was recorded"
        );
        let before = s.current_version().await.unwrap();
        let mut sub = s.subscribe().await.unwrap();

        s.record_access(&[]).await.unwrap();
        s.record_access(&[
            delta(&a.mapping_id, 3, 100, 1000, 5_000),
            delta(&b.mapping_id, 1, 1, 1, 1_000),
        ])
        .await
        .unwrap();
        // A second batch: an older access does not move the last access back, and one id may
        // appear twice in a batch. Sub-millisecond precision is not kept.
        let mut precise = delta(&a.mapping_id, 1, 1, 1, 4_000);
        precise.last_access_at += chrono::Duration::microseconds(999);
        s.record_access(&[
            delta(&a.mapping_id, 2, 20, 200, 2_000),
            precise,
            delta(&unknown, 9, 9, 9, 9_000),
        ])
        .await
        .unwrap();

        let want_a = AccessStats {
            access_count: 6,
            bytes_in: 121,
            bytes_out: 1201,
            last_access_at: Some(at_ms(5_000)),
        };
        assert_eq!(s.access_stats(&a.mapping_id).await.unwrap(), want_a);
        s.record_access(&[delta(&a.mapping_id, 0, 0, 0, 7_000)])
            .await
            .unwrap();
        let want_a = AccessStats {
            last_access_at: Some(at_ms(7_000)),
            ..want_a
        };
        assert_eq!(s.access_stats(&a.mapping_id).await.unwrap(), want_a);
        assert_eq!(
            s.access_stats(&b.mapping_id).await.unwrap(),
            AccessStats {
                access_count: 1,
                bytes_in: 1,
                bytes_out: 1,
                last_access_at: Some(at_ms(1_000)),
            }
        );
        assert_eq!(
            s.access_stats(&unknown).await.unwrap(),
            AccessStats::default(),
            "a delta for an unknown mapping leaves nothing behind"
        );

        // Counting is not a change of the mapping.
        assert_eq!(s.current_version().await.unwrap(), before);
        assert_eq!(
            s.changes_since(before, 10).await.unwrap(),
            Changes::Events {
                events: vec![],
                current: before,
                epoch: s.position().await.unwrap().epoch,
            }
        );
        let got = s.get(&a.mapping_id).await.unwrap().unwrap();
        assert_eq!(got.version, a.version);
        // The next event on the feed is the next real change, not a counter update.
        let c = s.create(spec("next", 3)).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(SubscriptionEvent::Change(e))) => {
                assert_eq!((e.op, &e.mapping_id), (ChangeOp::Created, &c.mapping_id))
            }
            other => panic!("expected the create event, got {other:?}"),
        }
        // A compare-and-set update with the version read before counting still succeeds, and
        // keeps the counters.
        s.update(&a.mapping_id, spec("hits", 4), a.version)
            .await
            .unwrap();
        assert_eq!(s.access_stats(&a.mapping_id).await.unwrap(), want_a);

        drop((s, sub));
        fx.restart().await;
        assert_eq!(
            fx.store().access_stats(&a.mapping_id).await.unwrap(),
            want_a,
            "counters survive a restart"
        );
    }

    pub async fn access_deltas_for_deleted_mappings_are_dropped<F: Fixture>(fx: F) {
        let s = fx.store();
        let gone = s.create(spec("gone", 1)).await.unwrap();
        let live = s.create(spec("live", 2)).await.unwrap();
        s.record_access(&[delta(&gone.mapping_id, 5, 5, 5, 1_000)])
            .await
            .unwrap();
        s.delete(&gone.mapping_id, None).await.unwrap();
        assert_eq!(
            s.access_stats(&gone.mapping_id).await.unwrap(),
            AccessStats::default(),
            "counters go with their mapping"
        );
        // A batch aggregated before the delete arrives after it.
        s.record_access(&[
            delta(&gone.mapping_id, 1, 1, 1, 2_000),
            delta(&live.mapping_id, 1, 1, 1, 2_000),
        ])
        .await
        .unwrap();
        assert_eq!(
            s.access_stats(&gone.mapping_id).await.unwrap(),
            AccessStats::default()
        );
        assert_eq!(
            s.access_stats(&live.mapping_id).await.unwrap().access_count,
            1
        );
        // A new mapping on the same domain starts from zero.
        let again = s.create(spec("gone", 3)).await.unwrap();
        assert_eq!(
            s.access_stats(&again.mapping_id).await.unwrap(),
            AccessStats::default()
        );
        // Released expired mappings take their counters along too.
        let mut brief = spec("brief", 1);
        brief.expires_at = Some(Utc::now() + chrono::Duration::milliseconds(200));
        let brief = s.create(brief).await.unwrap();
        s.record_access(&[delta(&brief.mapping_id, 1, 1, 1, 1_000)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.release_expired(Utc::now()).await.unwrap().len(), 1);
        assert_eq!(
            s.access_stats(&brief.mapping_id).await.unwrap(),
            AccessStats::default()
        );
    }
}

/// A local copy of the routing table kept by a [`Follower`], as the proxy cache will be.
pub struct Replica {
    by_domain: std::collections::HashMap<Hostname, tunnox::domain::Mapping>,
}

impl Replica {
    pub fn new(initial: Vec<tunnox::domain::Mapping>) -> Self {
        Self {
            by_domain: initial
                .into_iter()
                .map(|m| (m.full_domain.clone(), m))
                .collect(),
        }
    }

    pub fn apply(&mut self, updates: Vec<tunnox::store::SyncUpdate>) {
        use tunnox::store::SyncUpdate;
        for u in updates {
            match u {
                SyncUpdate::Reset(all) | SyncUpdate::Rebase { mappings: all, .. } => {
                    *self = Self::new(all)
                }
                SyncUpdate::Upsert(m) => {
                    self.by_domain.insert(m.full_domain.clone(), *m);
                }
                SyncUpdate::Remove {
                    mapping_id,
                    full_domain,
                } => {
                    if self
                        .by_domain
                        .get(&full_domain)
                        .is_some_and(|m| m.mapping_id == mapping_id)
                    {
                        self.by_domain.remove(&full_domain);
                    }
                }
            }
        }
    }

    pub async fn follow_until(&mut self, follower: &mut Follower, version: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while follower.applied() < version {
            let updates = tokio::time::timeout_at(deadline, follower.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("follower stuck at {} of {version}", follower.applied())
                });
            if let Ok(updates) = updates {
                self.apply(updates);
            }
        }
    }

    pub async fn assert_matches(&self, store: &Arc<dyn MappingStore>) {
        let truth: std::collections::HashMap<_, _> = store
            .list_all()
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.full_domain.clone(), m))
            .collect();
        assert_eq!(self.by_domain.len(), truth.len(), "replica size");
        for (d, m) in &truth {
            assert_eq!(self.by_domain.get(d), Some(m), "replica entry for {d}");
        }
    }
}

macro_rules! conformance {
    ($($name:ident $(($max:expr))?),* $(,)?) => {
        mod redis_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let fx = RedisFx::new_with(conformance!(@max $($max)?)).await;
                    cases::$name(fx).await
                }
            )*
        }
        mod memory_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let fx = MemoryFx::new_with(conformance!(@max $($max)?)).await;
                    cases::$name(fx).await
                }
            )*
        }
    };
    (@max) => { 100_000 };
    (@max $max:expr) => { $max };
}

conformance!(
    tc_1_1_create_survives_restart,
    epoch_is_one_per_history,
    restore_keeps_id_and_version_in_log_order,
    restore_at_a_large_version_keeps_the_store_writable,
    tc_1_2_hundred_creates_survive_restart,
    tc_1_3_update_survives_restart,
    tc_1_4_delete_survives_restart,
    tc_4_1_second_create_names_holder,
    tc_4_2_concurrent_creators,
    tc_4_3_delete_then_recreate,
    quotas_per_group_and_owner,
    quotas_hold_under_concurrent_creators,
    stale_update_is_rejected,
    concurrent_updates_never_lose_one,
    changes_and_events,
    update_moves_claim_and_respects_others,
    list_pages_and_filters,
    expired_mappings_release_their_domain,
    follower_reloads_when_behind_trimmed_log(10),
    follower_converges_after_lag,
    node_registry_register_change_remove,
    node_registry_expires_without_heartbeat,
    tunnel_sessions_replace_coexist_and_expire,
    access_stats_accumulate_without_versions_or_events,
    access_deltas_for_deleted_mappings_are_dropped,
);
