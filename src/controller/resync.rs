//! Anti-entropy: compare every mapping in the cluster with Redis and repair the difference.
//! A flushed or replaced Redis is rebuilt without anyone touching the cluster.

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
        let intact = match by_source.get(&source).or_else(|| by_source.get(&legacy)) {
            Some(r) => Some(r.mapping_id.as_str()) == id,
            None => false,
        };
        if phase == Phase::Active && !intact {
            repairs.missing += 1;
            let _ = ctx.wake.send(ObjectRef::from_obj(&**obj));
        }
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

fn phase_label(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Active => "Active",
        Phase::Conflict => "Conflict",
        Phase::Rejected => "Rejected",
        Phase::Expired => "Expired",
    }
}

/// Runs a pass now and then every `ctx.resync_interval`.
pub async fn run(ctx: Arc<Ctx>) {
    // Never compare against a cache that did not sync: everything would look orphaned.
    if ctx.cache.wait_until_ready().await.is_err() {
        tracing::warn!("mapping cache never became ready; resync stopped");
        return;
    }
    let mut tick = tokio::time::interval(ctx.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pass(&ctx).await {
            Ok(r) if r != Repairs::default() => {
                tracing::info!(missing = r.missing, orphans = r.orphans, "resync repaired")
            }
            Ok(_) => tracing::debug!("resync: cluster and Redis agree"),
            Err(e) => tracing::warn!(error = %e, "resync failed; will retry"),
        }
    }
}
