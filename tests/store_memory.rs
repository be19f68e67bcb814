//! Memory-store behaviour beyond the conformance suite: when the JSON file is written, what a
//! crash keeps, and that a bad file is never silently replaced.

use std::sync::Arc;
use std::time::Duration;

use tunnox::domain::MappingSpec;
use tunnox::store::{
    Follower, MappingStore, MemoryStore, PersistOptions, SubscriptionEvent, SyncUpdate,
};

fn spec(sub: &str, port: u16) -> MappingSpec {
    MappingSpec::new(sub, "tunnox.net", "127.0.0.1", port)
}

fn persist(dir: &tempfile::TempDir, every: Duration) -> PersistOptions {
    PersistOptions {
        path: dir.path().join("tunnox-data.json"),
        auto_save: true,
        save_interval: every,
    }
}

#[tokio::test]
async fn save_interval_zero_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let live = MemoryStore::open(Some(persist(&dir, Duration::ZERO)), 100, 100, "n").unwrap();
    let m = live.create(spec("crash", 1)).await.unwrap();
    // A second process reading the file while the first is still running (or was killed).
    let other = MemoryStore::open(Some(persist(&dir, Duration::ZERO)), 100, 100, "n").unwrap();
    assert_eq!(other.get(&m.mapping_id).await.unwrap(), Some(m));
    std::mem::forget(live); // never runs its drop-time save: as if killed
}

#[tokio::test]
async fn epoch_is_the_files_and_new_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let a = MemoryStore::open(Some(persist(&dir, Duration::ZERO)), 100, 100, "n").unwrap();
    a.create(spec("e", 1)).await.unwrap();
    let epoch = a.position().await.unwrap().epoch.unwrap();
    drop(a);
    let b = MemoryStore::open(Some(persist(&dir, Duration::ZERO)), 100, 100, "n").unwrap();
    assert_eq!(
        b.position().await.unwrap().epoch.unwrap(),
        epoch,
        "the file's history continues"
    );
    assert_ne!(MemoryStore::new().ensure_epoch().await.unwrap(), epoch);
    // The marker is checked against the epoch as on Redis.
    assert!(!b.mark_rebuilt("other", 1, "x").await.unwrap());
    assert!(b.mark_rebuilt(&epoch, 1, "x").await.unwrap());
    assert_eq!(b.rebuilt().await.unwrap().unwrap().epoch, epoch);
}

#[tokio::test]
async fn background_save_writes_within_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let live = MemoryStore::open(
        Some(persist(&dir, Duration::from_millis(100))),
        100,
        100,
        "n",
    )
    .unwrap();
    let m = live.create(spec("bg", 1)).await.unwrap();
    let path = dir.path().join("tunnox-data.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "file not written in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = MemoryStore::open(Some(persist(&dir, Duration::ZERO)), 100, 100, "n").unwrap();
    assert_eq!(other.get(&m.mapping_id).await.unwrap(), Some(m));
    assert_eq!(other.current_version().await.unwrap(), 1);
    std::mem::forget(live);
}

#[tokio::test]
async fn corrupt_file_refuses_to_start_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tunnox-data.json");
    std::fs::write(&path, "{ not json").unwrap();
    let err = MemoryStore::open(Some(persist(&dir, Duration::ZERO)), 100, 100, "n")
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(text.contains("tunnox-data.json"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{ not json",
        "never silently emptied"
    );
}

#[tokio::test]
async fn without_persistence_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::open(None, 100, 100, "n").unwrap();
    store.create(spec("ephemeral", 1)).await.unwrap();
    drop(store);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_told_it_lagged_and_catches_up() {
    let store = MemoryStore::open(None, 100_000, 4, "n").unwrap();
    let shared: Arc<dyn MappingStore> = Arc::new(store.clone());
    let mut raw = shared.subscribe().await.unwrap();
    let (mut follower, initial) = Follower::start(shared.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(initial.is_empty());
    for i in 0..50u16 {
        shared
            .create(spec(&format!("lag{i}"), i + 1))
            .await
            .unwrap();
    }
    // The raw feed overflowed its 4 slots: it says so instead of blocking the writer.
    let mut saw_lag = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), raw.next()).await {
        saw_lag |= ev == SubscriptionEvent::Lagged;
    }
    assert!(saw_lag);
    let mut replica = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while follower.applied() < 50 {
        let updates = tokio::time::timeout_at(deadline, follower.next())
            .await
            .expect("follower stuck")
            .unwrap();
        for u in updates {
            match u {
                SyncUpdate::Upsert(m) => {
                    replica.insert(m.full_domain);
                }
                SyncUpdate::Reset(all) | SyncUpdate::Rebase { mappings: all, .. } => {
                    replica = all.into_iter().map(|m| m.full_domain).collect()
                }
                SyncUpdate::Remove { full_domain, .. } => {
                    replica.remove(&full_domain);
                }
            }
        }
    }
    assert_eq!(replica.len(), 50);
}

#[tokio::test]
async fn inconsistent_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = persist(&dir, Duration::ZERO);
    let store = MemoryStore::open(Some(p.clone()), 100, 100, "n").unwrap();
    store.create(spec("dup", 1)).await.unwrap();
    drop(store);
    // Hand-edit the file so one mapping appears twice.
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p.path).unwrap()).unwrap();
    let first = doc["mappings"][0].clone();
    doc["mappings"].as_array_mut().unwrap().push(first);
    std::fs::write(&p.path, doc.to_string()).unwrap();
    let err = MemoryStore::open(Some(p), 100, 100, "n")
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        err.contains("tunnox-data.json") && err.contains("appears twice"),
        "{err}"
    );
}
