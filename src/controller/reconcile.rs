//! The HTTPDomainMapping reconciler: fetch → decide → apply to the store → write status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::decide::{self, Hold, Outcome, Plan, Policy, Usage, Verdict};
use super::metrics::Metrics;
use crate::crd::{HTTPDomainMapping, Phase};
use crate::domain::{Mapping, MappingId};
use crate::store::{MappingStore, StoreError};

pub const FINALIZER: &str = "tunnox.net/release-domain";
pub const FIELD_MANAGER: &str = "tunnox-controller";

pub struct Ctx {
    pub client: kube::Client,
    pub store: Arc<dyn MappingStore>,
    pub cache: Store<HTTPDomainMapping>,
    pub policy: Policy,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Reconciles these next (waiters of a released domain, resync repairs).
    pub wake: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
    pub resync_interval: Duration,
    pub conflict_retry: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Store(e) => e.label(),
            Self::Kube(_) => "kubernetes",
            Self::Finalizer(_) => "finalizer",
        }
    }
}

pub async fn reconcile(obj: Arc<HTTPDomainMapping>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<HTTPDomainMapping> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(&o, &ctx, &api).await,
            Finalizer::Cleanup(o) => cleanup(&o, &ctx).await,
        }
    })
    .await;
    let (action, label) = match result {
        Ok(a) => (Ok(a), "ok"),
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => {
            let l = e.label();
            (Err(e), l)
        }
        Err(e) => (Err(Error::Finalizer(e.to_string())), "finalizer"),
    };
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    action
}

/// Errors requeue after a pause, never in a hot loop; transient store errors sooner.
pub fn error_policy(obj: Arc<HTTPDomainMapping>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(mapping = %ObjectRef::from_obj(&*obj), error = %err, "reconcile failed; retrying");
    match err {
        Error::Store(e) if e.is_transient() => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

fn usage(ctx: &Ctx, me: &HTTPDomainMapping) -> Usage {
    let mut u = Usage::default();
    if ctx.policy.per_namespace == 0 && ctx.policy.per_owner == 0 {
        return u; // no quotas: no walk over the cache
    }
    let owner = me.spec.owner.as_ref().map(|o| &o.user_id);
    for other in ctx.cache.state() {
        let active = other
            .status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Active);
        if !active || other.metadata.uid == me.metadata.uid {
            continue;
        }
        if other.metadata.namespace == me.metadata.namespace {
            u.in_namespace += 1;
        }
        if owner.is_some() && other.spec.owner.as_ref().map(|o| &o.user_id) == owner {
            u.by_owner += 1;
        }
    }
    u
}

/// The store record this resource owns, if any: by the id in its status, else by its domain
/// (adoption when the status was lost), and only if the record names this resource as source.
async fn find_own(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    source: &str,
) -> Result<Option<Mapping>, Error> {
    if let Some(id) = obj
        .status
        .as_ref()
        .and_then(|s| s.mapping_id.as_deref())
        .and_then(|id| MappingId::parse(id).ok())
        && let Some(m) = ctx.store.get(&id).await?
        && m.source.as_deref() == Some(source)
    {
        return Ok(Some(m));
    }
    if let Some(full) = decide::full_domain(obj)
        && let Some(m) = ctx.store.get_by_domain(&full).await?
        && m.source.as_deref() == Some(source)
    {
        return Ok(Some(m));
    }
    Ok(None)
}

async fn release(ctx: &Ctx, obj: &HTTPDomainMapping, m: &Mapping) -> Result<(), Error> {
    match ctx.store.delete(&m.mapping_id, None).await {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    wake_waiters(ctx, obj, &m.full_domain);
    publish(
        ctx,
        obj,
        EventType::Normal,
        "Released",
        format!("released {}", m.full_domain),
    )
    .await;
    Ok(())
}

/// Reconcile every other mapping that wants `domain`, so the oldest takes it over.
fn wake_waiters(ctx: &Ctx, me: &HTTPDomainMapping, domain: &crate::domain::Hostname) {
    for other in ctx.cache.state() {
        if other.uid() != me.uid() && decide::full_domain(&other).as_ref() == Some(domain) {
            let _ = ctx.wake.send(ObjectRef::from_obj(&*other));
        }
    }
}

async fn publish(ctx: &Ctx, obj: &HTTPDomainMapping, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

async fn apply(
    obj: &HTTPDomainMapping,
    ctx: &Ctx,
    api: &Api<HTTPDomainMapping>,
) -> Result<Action, Error> {
    let now = Utc::now();
    let ns = obj.namespace().unwrap_or_default();
    let source = decide::source_of(&ns, &obj.name_any());
    let own = find_own(ctx, obj, &source).await?;
    // Quotas limit new claims; a mapping already serving is never rejected by a later count.
    let usage = if own.is_some() {
        Usage::default()
    } else {
        usage(ctx, obj)
    };
    let verdict = decide::evaluate(obj, &ctx.policy, usage, now);
    let outcome = match verdict {
        Verdict::Program(plan) => program(ctx, obj, *plan, own).await?,
        Verdict::Hold(hold) => {
            if let Some(m) = &own {
                release(ctx, obj, m).await?;
            }
            Outcome::Held(hold)
        }
    };
    ctx.metrics
        .outcomes
        .with_label_values(&[outcome.label()])
        .inc();
    write_status(ctx, obj, api, &outcome).await?;
    Ok(next_action(ctx, obj, &outcome))
}

async fn program(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    plan: Plan,
    own: Option<Mapping>,
) -> Result<Outcome, Error> {
    if let Some(m) = own {
        if m.full_domain == plan.full_domain {
            if m.spec() == plan.spec {
                return Ok(Outcome::Active {
                    mapping_id: m.mapping_id.to_string(),
                    version: m.version,
                    plan,
                });
            }
            let updated = ctx
                .store
                .update(&m.mapping_id, plan.spec.clone(), m.version)
                .await?;
            return Ok(Outcome::Active {
                mapping_id: updated.mapping_id.to_string(),
                version: updated.version,
                plan,
            });
        }
        // The domain changed: give up the old one first.
        release(ctx, obj, &m).await?;
    }
    // Mappings that wanted this domain earlier go first (oldest claim wins), unless this one was
    // already serving it (e.g. its record was lost with a flushed Redis): a serving domain does
    // not move. Cheap checks first: waiters are few, and only their domains are computed.
    let was_serving = obj
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Phase::Active);
    let older = ctx
        .cache
        .state()
        .into_iter()
        .filter(|_| !was_serving)
        .find(|other| {
            other
                .status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Conflict)
                && other.metadata.deletion_timestamp.is_none()
                && other.metadata.uid != obj.metadata.uid
                && decide::waits_behind(obj, other)
                && decide::full_domain(other).as_ref() == Some(&plan.full_domain)
        });
    if let Some(older) = older {
        // Make sure the older one tries now rather than at its next retry.
        let _ = ctx.wake.send(ObjectRef::from_obj(&*older));
        let holder = match ctx.store.get_by_domain(&plan.full_domain).await? {
            Some(h) => decide::holder_display(h.source.as_deref(), h.mapping_id.as_str()),
            None => format!(
                "{}/{} (older, waiting)",
                older.namespace().unwrap_or_default(),
                older.name_any()
            ),
        };
        ctx.metrics.conflicts.inc();
        return Ok(Outcome::Conflict { plan, holder });
    }
    match ctx.store.create(plan.spec.clone()).await {
        Ok(m) => {
            publish(
                ctx,
                obj,
                EventType::Normal,
                "Claimed",
                format!("claimed {}", plan.full_domain),
            )
            .await;
            Ok(Outcome::Active {
                mapping_id: m.mapping_id.to_string(),
                version: m.version,
                plan,
            })
        }
        Err(StoreError::DomainTaken {
            holder,
            holder_source,
            ..
        }) => {
            ctx.metrics.conflicts.inc();
            Ok(Outcome::Conflict {
                holder: decide::holder_display(holder_source.as_deref(), holder.as_str()),
                plan,
            })
        }
        Err(e) => Err(e.into()),
    }
}

async fn write_status(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    api: &Api<HTTPDomainMapping>,
    outcome: &Outcome,
) -> Result<(), Error> {
    let previous = obj.status.as_ref();
    let status = decide::status(outcome, obj.metadata.generation, previous, Utc::now());
    // `stats` belong to the proxies: compare and apply without them.
    let unchanged = previous.is_some_and(|p| {
        let mut p = p.clone();
        p.stats = None;
        p == status
    });
    if unchanged {
        return Ok(());
    }
    let phase_changed = previous.map(|p| p.phase) != Some(status.phase);
    let patch = json!({
        "apiVersion": HTTPDomainMapping::api_version(&()),
        "kind": HTTPDomainMapping::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    if phase_changed {
        match outcome {
            Outcome::Conflict { holder, plan } => {
                publish(
                    ctx,
                    obj,
                    EventType::Warning,
                    "Conflict",
                    format!("{} is claimed by {holder}", plan.full_domain),
                )
                .await
            }
            Outcome::Held(Hold::Rejected { reason, message }) => {
                publish(ctx, obj, EventType::Warning, reason, message.clone()).await
            }
            Outcome::Held(Hold::Expired { .. }) => {
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Expired",
                    "spec.expiresAt has passed".into(),
                )
                .await
            }
            _ => {}
        }
    }
    Ok(())
}

fn next_action(ctx: &Ctx, obj: &HTTPDomainMapping, outcome: &Outcome) -> Action {
    let until_expiry = obj.spec.expires_at.as_ref().map(|t| {
        let ms = t.0.as_millisecond() - Utc::now().timestamp_millis();
        Duration::from_millis(ms.max(0) as u64 + 50)
    });
    let base = match outcome {
        Outcome::Active { .. } => Some(ctx.resync_interval),
        Outcome::Conflict { .. } => Some(ctx.conflict_retry),
        Outcome::Held(Hold::Pending { .. }) => Some(Duration::from_secs(30)),
        // Room may free up elsewhere: look again later.
        Outcome::Held(Hold::Rejected {
            reason: "QuotaExceeded",
            ..
        }) => Some(ctx.conflict_retry),
        Outcome::Held(Hold::Rejected { .. } | Hold::Expired { .. }) => None,
    };
    match (base, until_expiry) {
        (Some(b), Some(e)) => Action::requeue(b.min(e)),
        (Some(b), None) => Action::requeue(b),
        (None, _) => Action::await_change(),
    }
}

async fn cleanup(obj: &HTTPDomainMapping, ctx: &Ctx) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let source = decide::source_of(&ns, &obj.name_any());
    if let Some(m) = find_own(ctx, obj, &source).await? {
        release(ctx, obj, &m).await?;
    }
    Ok(Action::await_change())
}
