//! Anti-entropy: compare every mapping in the cluster with Redis and repair the difference.
//! A flushed or replaced Redis is rebuilt without anyone touching the cluster: the store's epoch
//! is watched every second, and a pass against an epoch without the "rebuilt" marker runs at
//! once and again until it finds nothing missing; then the marker is written, which is what
//! stale proxies wait for (docs/redis-schema.md "Epoch").

use std::collections::HashSet;
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::decide;
use super::reconcile::Ctx;
use crate::crd::Phase;

/// What one pass found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Programmed mappings whose record was missing or changed: re-reconciled.
    pub missing: usize,
    /// Records whose resource is gone: deleted.
    pub orphans: usize,
}

/// One pass. The cache must be synced (the caller waits for it).
pub async fn pass(ctx: &Arc<Ctx>) -> Result<Repairs, crate::store::StoreError> {
    // Read first: a record restored meanwhile is above it, never a reason to expect less.
    let at = ctx.store.position().await?;
    let store_at = at.version;
    let records = ctx.store.list_all().await?;
    let objects = ctx.cache.state();
    let mut repairs = Repairs::default();

    let mut by_source = std::collections::HashMap::new();
    for r in &records {
        if let Some(s) = &r.source {
            by_source.insert(s.clone(), r);
        }
    }
    let mut wanted: HashSet<String> = HashSet::new();
    let mut phases: std::collections::HashMap<&'static str, i64> = std::collections::HashMap::new();
    let mut restorable = Vec::new();
    let mut wakes = Vec::new();
    let cluster = &ctx.policy.cluster_id;
    for obj in &objects {
        let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
        let source = decide::source_of(cluster, &ns, &name);
        let legacy = decide::legacy_source_of(&ns, &name);
        wanted.insert(source.clone());
        wanted.insert(legacy.clone());
        let phase = obj
            .status
            .as_ref()
            .map(|s| s.phase)
            .unwrap_or(Phase::Pending);
        *phases.entry(phase_label(phase)).or_default() += 1;
        let id = obj.status.as_ref().and_then(|s| s.mapping_id.as_deref());
        let record = by_source.get(&source).or_else(|| by_source.get(&legacy));
        let intact = record.is_some_and(|r| Some(r.mapping_id.as_str()) == id);
        let restorable_at = restorable_version(obj, store_at).filter(|_| record.is_none());
        if phase == Phase::Active
            && let Some(v) = restorable_at
        {
            restorable.push((v, ObjectRef::from_obj(&**obj)));
        }
        // Missing until written (no marker before that), but one handed in to the restorer
        // waits for its turn: waking it again changes nothing.
        if phase == Phase::Active && !intact {
            repairs.missing += 1;
            if !restorable_at.is_some_and(|v| ctx.restorer.is_handed_in(v)) {
                wakes.push(ObjectRef::from_obj(&**obj));
            }
        }
    }
    // What can come back as its status names it is expected before anything is woken.
    ctx.restorer.expect(at.epoch.as_deref(), restorable);
    for w in wakes {
        let _ = ctx.wake.send(w);
    }
    // Only this cluster's records are deleted (decide::orphan); legacy ones after two passes.
    let suspected =
        std::mem::take(&mut *ctx.legacy_orphans.lock().unwrap_or_else(|e| e.into_inner()));
    let mut suspects = HashSet::new();
    for r in &records {
        let Some(source) = r.source.as_deref() else {
            continue;
        };
        if wanted.contains(source) {
            continue;
        }
        let verdict = decide::orphan(source, cluster, suspected.contains(&r.mapping_id));
        if verdict == decide::Orphan::Suspect {
            suspects.insert(r.mapping_id.clone());
        }
        if verdict == decide::Orphan::Delete {
            match ctx.store.delete(&r.mapping_id, Some(r.version)).await {
                Ok(_) => repairs.orphans += 1,
                Err(
                    crate::store::StoreError::NotFound { .. }
                    | crate::store::StoreError::VersionConflict { .. },
                ) => {}
                Err(e) => return Err(e),
            }
        }
    }
    *ctx.legacy_orphans.lock().unwrap_or_else(|e| e.into_inner()) = suspects;
    for phase in ["Pending", "Active", "Conflict", "Rejected", "Expired"] {
        ctx.metrics
            .mappings
            .with_label_values(&[phase])
            .set(*phases.get(phase).unwrap_or(&0));
    }
    ctx.metrics
        .resync_repairs
        .with_label_values(&["missing"])
        .inc_by(repairs.missing as u64);
    ctx.metrics
        .resync_repairs
        .with_label_values(&["orphan"])
        .inc_by(repairs.orphans as u64);
    Ok(repairs)
}

/// The version a programmed resource's lost record can be restored at: the one its status
/// names, with the id, when the store has not reached it (see `super::restore`).
fn restorable_version(obj: &crate::crd::HTTPDomainMapping, store_at: u64) -> Option<u64> {
    let status = obj.status.as_ref()?;
    crate::domain::MappingId::parse(status.mapping_id.as_deref()?).ok()?;
    let v = u64::try_from(status.version?).ok()?;
    (v > store_at
        && v <= crate::store::MAX_RESTORE_VERSION
        && obj.metadata.deletion_timestamp.is_none())
    .then_some(v)
}

fn phase_label(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Active => "Active",
        Phase::Conflict => "Conflict",
        Phase::Rejected => "Rejected",
        Phase::Expired => "Expired",
    }
}

/// How often the store's epoch and marker are looked at (two small reads).
const EPOCH_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// While the store is being rebuilt, passes repeat at most once per this many times the last
/// pass's duration (at least [`EPOCH_CHECK`] apart): a pass lists every record and every
/// mapping, and one a second took most of the controller while it programmed 100 000 mappings
/// into an empty Redis (35 mappings/s at 50 000, docs/benchmarks.md).
const REBUILD_PACE: u32 = 4;

/// True when the store's epoch has no marker of ours: flushed, emptied, failed over, or never
/// marked.
async fn needs_rebuild(ctx: &Ctx) -> Result<bool, crate::store::StoreError> {
    let at = ctx.store.position().await?;
    let Some(epoch) = at.epoch else {
        return Ok(true);
    };
    // An unreadable marker is rewritten by the next pass, never a reason to stop marking.
    Ok(ctx
        .store
        .rebuilt()
        .await
        .ok()
        .flatten()
        .is_none_or(|m| m.epoch != epoch))
}

/// A pass, then the marker "rebuilt at this epoch" if it found nothing missing. The epoch is
/// made to exist first (a flushed store with nothing to rebuild still gets one), and the
/// position is read before the pass lists, so the marker never claims more than was listed.
pub async fn pass_and_mark(ctx: &Arc<Ctx>, me: &str) -> Result<Repairs, crate::store::StoreError> {
    let epoch = ctx.store.ensure_epoch().await?;
    let at = ctx.store.position().await?;
    let repairs = pass(ctx).await?;
    if repairs.missing == 0 && at.epoch.as_deref() == Some(epoch.as_str()) {
        let before = ctx.store.rebuilt().await.ok().flatten();
        // A marker for this very position says it all already: an idle store sees no writes.
        if before
            .as_ref()
            .is_some_and(|m| m.epoch == epoch && m.version == at.version)
        {
            return Ok(repairs);
        }
        if ctx.store.mark_rebuilt(&epoch, at.version, me).await?
            && before.is_none_or(|m| m.epoch != epoch)
        {
            tracing::info!(%epoch, version = at.version, "store rebuilt: marker written");
        }
    }
    Ok(repairs)
}

/// Runs a pass now and then every `ctx.resync_interval`, and at once (then every second until
/// it is marked rebuilt) when the store's epoch changes.
pub async fn run(ctx: Arc<Ctx>, me: String) {
    // Never compare against a cache that did not sync: everything would look orphaned.
    // kube-runtime's readiness (one oneshot behind a mutex) wakes only the task that polled it
    // last, and the controller's own runner polls it too: a single await here could wait
    // forever (it did: resync never ran). Look again every 50 ms instead (a restore after a
    // lost store waits for this first pass).
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_millis(50),
            ctx.cache.wait_until_ready(),
        )
        .await
        {
            Ok(Ok(())) => break,
            Ok(Err(_)) => {
                tracing::warn!("mapping cache never became ready; resync stopped");
                return;
            }
            Err(_) => continue,
        }
    }
    tracing::info!(interval = ?ctx.resync_interval, "resync running");
    let mut tick = tokio::time::interval(ctx.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut epoch_tick = tokio::time::interval(EPOCH_CHECK);
    epoch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_rebuild_pass = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = epoch_tick.tick() => {
                if tokio::time::Instant::now() < next_rebuild_pass {
                    continue;
                }
                match needs_rebuild(&ctx).await {
                    Ok(true) => tracing::debug!("store epoch not marked rebuilt: resync now"),
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the store epoch");
                        continue;
                    }
                }
            }
        }
        let started = tokio::time::Instant::now();
        let result = pass_and_mark(&ctx, &me).await;
        next_rebuild_pass = tokio::time::Instant::now() + started.elapsed() * REBUILD_PACE;
        match result {
            Ok(r) if r != Repairs::default() => {
                tracing::info!(missing = r.missing, orphans = r.orphans, "resync repaired")
            }
            Ok(_) => tracing::debug!("resync: cluster and Redis agree"),
            Err(e) => tracing::warn!(error = %e, "resync failed; will retry"),
        }
    }
}
