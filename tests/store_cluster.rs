//! Redis Cluster (3 masters on loopback, `redis-cli --cluster create`): with the hash-tagged
//! prefix `{tunnox}` every script and multi-key command of the store runs unchanged on the node
//! that serves the `tunnox` slot (docs/redis-schema.md, *Deployments*); without the tag the
//! first mutation is refused.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use support::RedisServer;
use tunnox::domain::{MappingSpec, SetName};
use tunnox::store::{
    AccessDelta, Changes, Follower, MappingStore, NodeRecord, NodeRegistry, NodeState,
    RedisOptions, RedisStore, SyncUpdate,
};

struct Cluster {
    nodes: Vec<RedisServer>,
}

impl Cluster {
    fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes"]))
            .collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(n.addr());
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        support::process::eventually("cluster ok", Duration::from_secs(30), || {
            nodes
                .iter()
                .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
        });
        Self { nodes }
    }

    /// The node serving the slot of `key`.
    fn owner(&self, key: &str) -> &RedisServer {
        let slot: u16 = self.nodes[0]
            .cli(&["cluster", "keyslot", key])
            .parse()
            .unwrap();
        let table = self.nodes[0].cli(&["cluster", "nodes"]);
        let port = table
            .lines()
            .find(|l| {
                l.contains("master")
                    && l.split_whitespace().skip(8).any(|range| {
                        let (a, b) = range.split_once('-').unwrap_or((range, range));
                        (a.parse().unwrap_or(u16::MAX)..=b.parse().unwrap_or(0)).contains(&slot)
                    })
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|a| a.split('@').next())
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no owner of slot {slot} in\n{table}"));
        self.nodes.iter().find(|n| n.port() == port).unwrap()
    }
}

fn options(node: &RedisServer, root: &str) -> RedisOptions {
    let mut o = RedisOptions::new(&node.addr());
    o.root_prefix = root.to_string();
    o.prefix = format!("{root}:http_domain");
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hash_tagged_prefix_runs_every_script_on_one_cluster_slot() {
    let cluster = Cluster::start();
    let owner = cluster.owner("tunnox");
    let store = Arc::new(
        RedisStore::connect(options(owner, "{tunnox}"))
            .await
            .unwrap(),
    );
    let s: Arc<dyn MappingStore> = store.clone();
    let (mut follower, _) = Follower::start(s.clone(), Duration::from_secs(3600))
        .await
        .unwrap();

    let mut spec = MappingSpec::new("a", "tunnox.net", "127.0.0.1", 1);
    spec.target_client_id = Some("laptop".into());
    spec.owner_user_id = Some("alice".into());
    let a = s.create(spec.clone()).await.unwrap();
    let b = s
        .create(MappingSpec::new("b", "tunnox.net", "127.0.0.1", 2))
        .await
        .unwrap();
    let mut moved = spec;
    moved.subdomain = "a2".into();
    moved.owner_user_id = Some("bob".into());
    let a = s.update(&a.mapping_id, moved, a.version).await.unwrap();
    let found = s
        .get_by_domain(&a.full_domain)
        .await
        .unwrap()
        .expect("lookup.lua");
    assert_eq!(found.mapping_id, a.mapping_id);
    assert_eq!(s.list_all().await.unwrap().len(), 2);
    match s.changes_since(0, 100).await.unwrap() {
        Changes::Events {
            events, current, ..
        } => {
            assert_eq!((events.len(), current), (3, 3));
        }
        other => panic!("{other:?}"),
    }
    s.record_access(&[AccessDelta {
        mapping_id: a.mapping_id.clone(),
        count: 3,
        bytes_in: 1,
        bytes_out: 2,
        last_access_at: Utc::now(),
    }])
    .await
    .unwrap();
    assert_eq!(s.access_stats(&a.mapping_id).await.unwrap().access_count, 3);
    s.delete(&b.mapping_id, Some(b.version)).await.unwrap();

    let node = NodeRecord {
        node_id: "p1".into(),
        set: SetName::parse("default.default").unwrap(),
        address: "127.0.0.1:1".into(),
        admin_address: "127.0.0.1:2".into(),
        tunnel_address: String::new(),
        state: NodeState::Active,
        applied_version: 4,
        epoch: String::new(),
        heartbeat_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc),
    };
    store
        .register_node(&node, Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        store.list_nodes().await.unwrap().is_empty(),
        "prune_nodes.lua"
    );

    // Events published from the scripts reach the subscriber.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while follower.applied() < 4 {
        let updates = tokio::time::timeout_at(deadline, follower.next())
            .await
            .expect("follower stuck")
            .unwrap();
        seen += updates
            .iter()
            .filter(|u| !matches!(u, SyncUpdate::Reset(_)))
            .count();
    }
    assert!(seen >= 1);

    // Every key is on the owner's slot; the other nodes hold none.
    let keys = owner.cli(&["--scan", "--pattern", "*"]);
    assert!(
        !keys.is_empty() && keys.lines().all(|k| k.starts_with("{tunnox}:")),
        "{keys}"
    );
    for n in cluster.nodes.iter().filter(|n| n.port() != owner.port()) {
        assert_eq!(n.cli(&["dbsize"]), "0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_hash_tag_a_cluster_refuses_the_first_claim() {
    let cluster = Cluster::start();
    let store = RedisStore::connect(options(&cluster.nodes[0], "tunnox"))
        .await
        .unwrap();
    let err = store
        .create(MappingSpec::new("a", "tunnox.net", "127.0.0.1", 1))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("without the hash tag: {err}");
    assert!(
        err.contains("CrossSlot") && err.contains("same slot"),
        "{err}"
    );
}
