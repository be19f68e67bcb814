//! The HTTPDomainMapping reconciler: fetch → decide → apply to the store → write status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::certificate::CertState;
use super::decide::{self, Hold, Outcome, Plan, Policy, Verdict};
use super::metrics::Metrics;
use crate::acme::schedule::Need;
use crate::crd::{HTTPDomainMapping, Phase, TunnelSet};
use crate::domain::{CertSource, Mapping, MappingId, MappingTls};
use crate::store::{MappingStore, Quota, StoreError, TunnelRegistry};
use k8s_openapi::api::core::v1::Secret;

pub const FINALIZER: &str = "tunnox.net/release-domain";
pub const FIELD_MANAGER: &str = "tunnox-controller";

pub struct Ctx {
    pub client: kube::Client,
    pub store: Arc<dyn MappingStore>,
    /// Credentials of tunnel clients: a tunnel target is served once its client has one.
    pub registry: Arc<dyn TunnelRegistry>,
    pub cache: Store<HTTPDomainMapping>,
    /// The mappings waiting in `Conflict`, by domain (kept from the cache's watch events).
    pub waiters: Arc<super::waiters::Waiters>,
    /// TunnelSets, for the members of a group target.
    pub tunnelsets: Store<TunnelSet>,
    /// Seals the keys of certificates from Secrets for the store (`http_domain.tls_store_key_file`).
    pub store_key: Option<crate::cert::StoreKey>,
    /// Orders certificates for `spec.tls.mode: acme` (`controller.acme`; `None`: not configured).
    pub issuer: Option<Arc<super::issuer::Issuer>>,
    /// How often a mapping with `spec.tls` reads its Secret again.
    pub tls_recheck: Duration,
    pub policy: Policy,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Reconciles these next (waiters of a released domain, resync repairs).
    pub wake: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
    pub resync_interval: Duration,
    pub conflict_retry: Duration,
    /// The proxy sets with a healthy node (for `status.servingSet`).
    pub fleet: Arc<super::fleet::Fleet>,
    /// Which proxies applied which version: `Ready` means served.
    pub served: Arc<super::served::Served>,
    /// Records lost with the store, written again as their status names them.
    pub restorer: Arc<super::restore::Restorer>,
    /// Records in the legacy source form that resync found orphaned on its last pass.
    pub legacy_orphans: std::sync::Mutex<std::collections::HashSet<MappingId>>,
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

/// The store record this resource owns, if any: by the id in its status, else by its domain
/// (adoption when the status was lost), and only if the record names this resource as source —
/// in this cluster's form, or in the legacy form without a cluster (taken over on the next
/// write, compare-and-set, so of two clusters only one can).
async fn find_own(ctx: &Ctx, obj: &HTTPDomainMapping) -> Result<Option<Mapping>, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let source = decide::source_of(&ctx.policy.cluster_id, &ns, &name);
    let legacy = decide::legacy_source_of(&ns, &name);
    let mine = |m: &Mapping| {
        m.source
            .as_deref()
            .is_some_and(|s| s == source || s == legacy)
    };
    if let Some(id) = obj
        .status
        .as_ref()
        .and_then(|s| s.mapping_id.as_deref())
        .and_then(|id| MappingId::parse(id).ok())
        && let Some(m) = ctx.store.get(&id).await?
        && mine(&m)
    {
        return Ok(Some(m));
    }
    if let Some(full) = decide::full_domain(obj)
        && let Some(m) = ctx.store.get_by_domain(&full).await?
        && mine(&m)
    {
        return Ok(Some(m));
    }
    Ok(None)
}

/// True when `m` is a record in the legacy source form: another cluster may take it over at
/// any time, so it is only ever written with compare-and-set.
fn is_legacy(m: &Mapping) -> bool {
    m.source.as_deref().is_some_and(decide::is_legacy_source)
}

/// The most TunnelSets listing one group whose credentials one reconcile reads: more than a
/// group may have, few enough that a tenant listing a group everywhere cannot make each
/// reconcile of its mapping cost thousands of store reads.
const MAX_GROUP_CANDIDATES: usize = 4 * crate::domain::MAX_GROUP_MEMBERS;

/// The accepted TunnelSets a tunnel target reaches: the named client's, or the members of a
/// group (the TunnelSets of the mapping's namespace listing it in `spec.groups`). Accepted means
/// the client's credential is in the store, written by that very TunnelSet of this cluster (the
/// credential, not the TunnelSet's status, is what proxies admit by, and it is written before
/// the mappings are woken). Whether a named client's TunnelSet is in the mapping's namespace is
/// decided by [`decide::evaluate`] from its `holder`.
async fn tunnel_members(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
) -> Result<Vec<decide::TunnelClient>, Error> {
    let Some(t) = obj.spec.target.tunnel.as_ref() else {
        return Ok(Vec::new());
    };
    let ns = obj.namespace().unwrap_or_default();
    // (client id, the TunnelSet that must hold its credential; `None`: whichever does).
    let candidates: Vec<(String, Option<String>)> = match (&t.client_id, &t.group) {
        (Some(c), _) => vec![(c.clone(), None)],
        (None, Some(g)) => {
            let mut listing: Vec<(String, Option<String>)> = ctx
                .tunnelsets
                .state()
                .iter()
                .filter(|ts| {
                    ts.namespace().as_deref() == Some(ns.as_str())
                        && ts.metadata.deletion_timestamp.is_none()
                        && ts.spec.groups.contains(g)
                })
                .map(|ts| {
                    (
                        ts.spec.client_id.clone(),
                        Some(format!("{ns}/{}", ts.name_any())),
                    )
                })
                .collect();
            listing.sort();
            if listing.len() > MAX_GROUP_CANDIDATES {
                tracing::warn!(mapping = %ObjectRef::from_obj(obj), group = %g, listing = listing.len(), "more TunnelSets list the group than are read; the first {MAX_GROUP_CANDIDATES} by client id are considered");
                listing.truncate(MAX_GROUP_CANDIDATES);
            }
            listing
        }
        (None, None) => return Ok(Vec::new()),
    };
    let prefix = format!("k8s:{}/", ctx.policy.cluster_id);
    let mut members: Vec<decide::TunnelClient> = Vec::new();
    for (client_id, lister) in candidates {
        let Some(cred) = ctx.registry.credential(&client_id).await? else {
            continue;
        };
        let Some(holder) = cred.source.as_deref().and_then(|s| s.strip_prefix(&prefix)) else {
            continue;
        };
        // A group member is the TunnelSet that lists the group, not another one holding the
        // same client id.
        if lister.as_deref().is_some_and(|l| l != holder)
            || members.iter().any(|m| m.client_id == client_id)
        {
            continue;
        }
        members.push(decide::TunnelClient {
            client_id,
            placement: cred.placement.clone(),
            holder: holder.to_string(),
        });
    }
    Ok(members)
}

/// Decides the certificate of a mapping with `spec.tls` into `plan` (its record's `tls`, the
/// state for status). A key sealed into the current record for the same certificate is kept,
/// so an unchanged Secret writes nothing (sealing draws a new nonce each time). With
/// `mode: acme`, says whether a certificate should be ordered (once the domain is claimed).
async fn certificate(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    tls: &crate::crd::MappingTls,
    plan: &mut Plan,
    own: Option<&Mapping>,
) -> Result<Option<Need>, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let now = Utc::now();
    let (mut record, state, need) = match (&tls.mode, &ctx.issuer) {
        (crate::crd::TlsMode::Acme, Some(issuer)) => {
            acme_certificate(ctx, issuer, obj, &plan.full_domain, tls.redirect_http, now).await?
        }
        _ => {
            let secret = match (&tls.mode, &tls.secret_name) {
                (crate::crd::TlsMode::Secret, Some(name)) if ctx.store_key.is_some() => {
                    Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                        .get_opt(name)
                        .await?
                }
                _ => None,
            };
            let (record, state) = super::certificate::decide(
                tls,
                &ns,
                secret.as_ref(),
                &plan.full_domain,
                ctx.store_key.as_ref(),
                now,
            );
            (record, state, None)
        }
    };
    if let (Some(key), Some(new), Some(old)) = (
        ctx.store_key.as_ref(),
        record.as_mut(),
        own.and_then(|m| m.tls.as_ref()),
    ) && let (
        CertSource::Sealed {
            chain_pem,
            key_sealed,
        },
        CertSource::Sealed {
            chain_pem: old_chain,
            key_sealed: old_sealed,
        },
    ) = (&mut new.cert, &old.cert)
        && chain_pem == old_chain
    {
        let domain = plan.full_domain.as_str();
        let same = key.open(domain, key_sealed).ok() == key.open(domain, old_sealed).ok();
        if same {
            *key_sealed = old_sealed.clone();
        }
    }
    plan.spec.enable_https = true;
    plan.spec.tls = record;
    plan.certificate = Some(state);
    Ok(need)
}

/// `mode: acme`: the certificate issued for `full` (its Secret in the issuer's namespace) and
/// whether to order one.
async fn acme_certificate(
    ctx: &Ctx,
    issuer: &super::issuer::Issuer,
    obj: &HTTPDomainMapping,
    full: &crate::domain::Hostname,
    redirect_http: bool,
    now: chrono::DateTime<Utc>,
) -> Result<(Option<MappingTls>, CertState, Option<Need>), Error> {
    if ctx.store_key.is_none() {
        // Nothing ordered that could not be served.
        return Ok((
            None,
            CertState::NotReady {
                reason: "StoreKeyMissing",
                message: super::certificate::STORE_KEY_MISSING.into(),
            },
            None,
        ));
    }
    let domain = full.as_str();
    let secret = issuer.issued(domain).await?;
    let (record, state) = match &secret {
        Some(s) => super::certificate::from_secret(
            s,
            &format!(
                "Secret {}/{}",
                issuer.namespace(),
                super::issuer::secret_name(domain)
            ),
            full,
            ctx.store_key.as_ref(),
            redirect_http,
            now,
        ),
        None => (
            None,
            CertState::NotReady {
                reason: "Issuing",
                message: format!("no certificate has been issued for {domain} yet"),
            },
        ),
    };
    let asked = obj
        .annotations()
        .get(crate::acme::schedule::RENEW_ANNOTATION)
        .map(String::as_str);
    let need = super::issuer::assess(
        secret.as_ref(),
        Some(&state),
        asked,
        issuer.min_reorder_interval(),
        now,
    );
    Ok((record, state, need))
}

/// With `mode: acme` and a domain claimed: orders its certificate when `need`s be, and shows
/// the order's progress while no certificate is served.
fn order_certificate(ctx: &Ctx, obj: &HTTPDomainMapping, need: Need, outcome: &mut Outcome) {
    let (Some(issuer), Outcome::Active { plan, .. }) = (&ctx.issuer, outcome) else {
        return;
    };
    let asked = obj
        .annotations()
        .get(crate::acme::schedule::RENEW_ANNOTATION)
        .cloned();
    let source = plan.spec.source.clone().unwrap_or_default();
    let progress = issuer.start(plan.full_domain.as_str(), need, asked, source, obj);
    if need != Need::Issue {
        // The issued certificate is served meanwhile; a failing renewal shows with it.
        if let (
            super::issuer::Progress::Failed { message, retry_in },
            Some(CertState::Ready { note, .. }),
        ) = (progress, plan.certificate.as_mut())
        {
            *note = Some(format!(
                "renewal failing: {message}; next attempt in {}",
                humantime::format_duration(Duration::from_secs(retry_in.as_secs().max(1)))
            ));
        }
        return;
    }
    plan.certificate = Some(match progress {
        super::issuer::Progress::Running => CertState::NotReady {
            reason: "Issuing",
            message: format!(
                "ordering a certificate for {} (HTTP-01, answered by the proxies)",
                plan.full_domain
            ),
        },
        super::issuer::Progress::Failed { message, retry_in } => CertState::NotReady {
            reason: "IssuanceFailed",
            message: format!(
                "{message}; next attempt in {}",
                humantime::format_duration(Duration::from_secs(retry_in.as_secs().max(1)))
            ),
        },
    });
}

/// `spec.target.tls.caSecretName`: the CA bundle (`ca.crt` of that Secret in the mapping's
/// namespace) the proxies verify the target with, into the record. When it cannot be read, a
/// serving mapping keeps its last good bundle (and says so); `Some`: why a new one waits
/// instead (read again at the next retry).
async fn target_ca(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    plan: &mut Plan,
    own: Option<&Mapping>,
) -> Result<Option<Hold>, Error> {
    let hold = read_target_ca(ctx, obj, plan).await?;
    let last_good = own
        .filter(|m| m.full_domain == plan.full_domain)
        .and_then(|m| m.upstream.ca_pem.clone());
    match (hold, last_good) {
        (None, _) => Ok(None),
        (Some(Hold::Pending { message, .. }), Some(pem)) => {
            plan.spec.upstream.ca_pem = Some(pem);
            let kept = format!("{message}; the last good CA bundle is kept");
            plan.note = Some(match plan.note.take() {
                Some(n) => format!("{n}; {kept}"),
                None => kept,
            });
            Ok(None)
        }
        (hold, _) => Ok(hold),
    }
}

async fn read_target_ca(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    plan: &mut Plan,
) -> Result<Option<Hold>, Error> {
    let Some(name) = obj
        .spec
        .target
        .tls
        .as_ref()
        .and_then(|t| t.ca_secret_name.as_ref())
    else {
        return Ok(None);
    };
    let ns = obj.namespace().unwrap_or_default();
    let pending = |reason, message| Some(Hold::Pending { reason, message });
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .get_opt(name)
        .await?;
    let Some(secret) = secret else {
        return Ok(pending(
            "TargetCANotFound",
            format!("Secret {ns}/{name} (spec.target.tls.caSecretName) does not exist"),
        ));
    };
    let Some(pem) = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    else {
        return Ok(pending(
            "TargetCAInvalid",
            format!("Secret {ns}/{name} has no key ca.crt"),
        ));
    };
    plan.spec.upstream.ca_pem = Some(pem);
    if let Err(e) = plan.spec.validate() {
        return Ok(pending(
            "TargetCAInvalid",
            format!("Secret {ns}/{name} ca.crt: {e}"),
        ));
    }
    Ok(None)
}

async fn release(ctx: &Ctx, obj: &HTTPDomainMapping, m: &Mapping) -> Result<(), Error> {
    let expected = is_legacy(m).then_some(m.version);
    match ctx.store.delete(&m.mapping_id, expected).await {
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        // A legacy record rewritten meanwhile belongs to whoever rewrote it.
        Err(StoreError::VersionConflict { .. }) if expected.is_some() => return Ok(()),
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

/// Reconcile every other mapping waiting for `domain` (in `Conflict`), so the oldest takes it
/// over. From the waiters' index, not a scan of the cache: a scan per release made deleting many
/// mappings at once quadratic. A mapping not yet in `Conflict` is still queued for its own first
/// reconcile, which claims the domain freed here.
fn wake_waiters(ctx: &Ctx, me: &HTTPDomainMapping, domain: &crate::domain::Hostname) {
    let me = ObjectRef::from_obj(me);
    for other in ctx.waiters.candidates(domain) {
        if other != me {
            let _ = ctx.wake.send(other);
        }
    }
}

/// Events being recorded in the background at most; more are dropped (and logged) while the
/// API server is that slow.
static EVENTS_IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);
/// How long one Event may take to record.
const EVENT_WITHIN: Duration = Duration::from_secs(10);

/// Records an Event in the background: an Event is best effort, and waiting for its API write
/// would delay the status write that follows (and `Ready` with it). Bounded in number and time.
async fn publish(ctx: &Ctx, obj: &HTTPDomainMapping, type_: EventType, reason: &str, note: String) {
    let Ok(permit) = EVENTS_IN_FLIGHT.try_acquire() else {
        tracing::debug!(mapping = %ObjectRef::from_obj(obj), reason, "too many Events in flight; this one is dropped");
        return;
    };
    let (recorder, about, reason) = (
        ctx.recorder.clone(),
        obj.object_ref(&()),
        reason.to_string(),
    );
    tokio::spawn(async move {
        let _permit = permit;
        let recorded = super::publish_event(&recorder, &about, "Reconcile", type_, &reason, note);
        if tokio::time::timeout(EVENT_WITHIN, recorded).await.is_err() {
            tracing::debug!(reason, "recording an Event timed out");
        }
    });
}

async fn apply(
    obj: &HTTPDomainMapping,
    ctx: &Ctx,
    api: &Api<HTTPDomainMapping>,
) -> Result<Action, Error> {
    // A group's members come from the TunnelSet cache: read only once it holds the whole list,
    // or a restart would see an empty group and give up its domain.
    let group = obj
        .spec
        .target
        .tunnel
        .as_ref()
        .is_some_and(|t| t.group.is_some());
    if group && !super::tunnelset::cache_ready(&ctx.tunnelsets).await {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let own = find_own(ctx, obj).await?;
    let members = tunnel_members(ctx, obj).await?;
    let mut verdict = decide::evaluate(obj, &ctx.policy, &members, Utc::now());
    if let Verdict::Program(plan) = &mut verdict
        && let Some(hold) = target_ca(ctx, obj, plan, own.as_ref()).await?
    {
        verdict = Verdict::Hold(hold);
    }
    let mut order = None;
    if let (Verdict::Program(plan), Some(tls)) = (&mut verdict, &obj.spec.tls) {
        order = certificate(ctx, obj, tls, plan, own.as_ref()).await?;
    }
    // A record lost with the store comes back as the status names it: nothing to write here.
    // Anything else: nothing of it is restored any more; a write in flight is waited for.
    let handed_in = match (&own, &verdict) {
        (None, Verdict::Program(plan)) => hand_in_restore(ctx, obj, plan),
        _ => super::restore::HandIn::Refused,
    };
    match handed_in {
        super::restore::HandIn::Taken => {
            ctx.metrics.outcomes.with_label_values(&["restoring"]).inc();
            return Ok(Action::requeue(RESTORE_RECHECK));
        }
        // The first pass wakes every mapping whose record is missing: no timer needed (a short
        // one would make every such mapping a hot loop until then).
        super::restore::HandIn::NotYet => return Ok(Action::requeue(RESTORE_RECHECK)),
        super::restore::HandIn::Refused => {
            if ctx.restorer.forget(&ObjectRef::from_obj(obj)) {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
        }
    }
    let mut outcome = match verdict {
        Verdict::Program(plan) => program(ctx, obj, *plan, own).await?,
        Verdict::Hold(hold) => {
            if let Some(m) = &own {
                release(ctx, obj, m).await?;
            }
            Outcome::Held(hold)
        }
    };
    if let Some(need) = order {
        order_certificate(ctx, obj, need, &mut outcome);
    }
    ctx.metrics
        .outcomes
        .with_label_values(&[outcome.label()])
        .inc();
    if let Outcome::Held(Hold::Rejected { reason, .. }) = &outcome {
        ctx.metrics.rejections.with_label_values(&[reason]).inc();
    }
    let served = served(ctx, obj, &outcome).await;
    write_status(ctx, obj, api, &outcome, served.as_ref()).await?;
    Ok(next_action(ctx, obj, &outcome))
}

/// When a mapping handed to the restorer is looked at again if nothing wakes it sooner (the
/// restorer wakes it once its record is written, refused or given up).
const RESTORE_RECHECK: Duration = Duration::from_secs(30);

/// Hands the record of a mapping that was serving, and whose record the store lost, to the
/// restorer when its status names an id and a version the restorer expects and the plan
/// keeps its domain. Refused: program it as usual.
fn hand_in_restore(ctx: &Ctx, obj: &HTTPDomainMapping, plan: &Plan) -> super::restore::HandIn {
    use super::restore::HandIn;
    let Some(status) = obj.status.as_ref().filter(|s| s.phase == Phase::Active) else {
        return HandIn::Refused;
    };
    let (Some(id), Some(version)) = (
        status
            .mapping_id
            .as_deref()
            .and_then(|id| MappingId::parse(id).ok()),
        status.version.and_then(|v| u64::try_from(v).ok()),
    ) else {
        return HandIn::Refused;
    };
    if status.full_domain.as_deref() != Some(plan.full_domain.as_str()) {
        return HandIn::Refused;
    }
    ctx.restorer.hand_in(
        version,
        super::restore::Pending {
            resource: ObjectRef::from_obj(obj),
            uid: obj.metadata.uid.clone(),
            id,
            spec: plan.spec.clone(),
        },
    )
}

/// How long a reconcile that just programmed a version waits for the proxies to apply it
/// before it writes status (usually milliseconds: they announce it at once), so that one status
/// write says `Ready`. A proxy lagging for [`super::served::LAGGING_AFTER`] is not waited for.
const SETTLE_WITHIN: Duration = Duration::from_millis(500);

/// For a programmed mapping: the tally of its version, once the proxies applied it or
/// [`SETTLE_WITHIN`] passed; while not served, the mapping is woken when it is.
async fn served(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    outcome: &Outcome,
) -> Option<super::served::Tally> {
    let me = ObjectRef::from_obj(obj);
    let Outcome::Active { version, plan, .. } = outcome else {
        ctx.served.forget(&me);
        return None;
    };
    let placement = plan.spec.placement.as_ref();
    let started = Instant::now();
    let tally = ctx.served.settle(placement, *version, SETTLE_WITHIN).await;
    ctx.metrics
        .served_wait_seconds
        .observe(started.elapsed().as_secs_f64());
    if tally.as_ref().is_some_and(super::served::Tally::complete) {
        ctx.served.forget(&me);
    } else {
        ctx.served.wait_for(me, placement.cloned(), *version);
    }
    tally
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
            // Quotas limit new claims: a serving mapping is never refused by a later count.
            match ctx
                .store
                .update(&m.mapping_id, plan.spec.clone(), m.version)
                .await
            {
                Ok(updated) => {
                    return Ok(Outcome::Active {
                        mapping_id: updated.mapping_id.to_string(),
                        version: updated.version,
                        plan,
                    });
                }
                // Another cluster took the legacy record over first: it is theirs now; claim
                // below, which reports the conflict naming them.
                Err(StoreError::VersionConflict { .. } | StoreError::NotFound { .. })
                    if is_legacy(&m) => {}
                Err(e) => return Err(e.into()),
            }
        } else {
            // The domain changed: give up the old one first.
            release(ctx, obj, &m).await?;
        }
    }
    // Mappings that wanted this domain earlier go first (oldest claim wins), unless this one was
    // already serving it (e.g. its record was lost with a flushed Redis): a serving domain does
    // not move. Cheap checks first: waiters are few, and only their domains are computed.
    let was_serving = obj
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Phase::Active);
    // Candidates from the index of waiters, each checked against the cache as it is now.
    let older = (!was_serving)
        .then(|| {
            ctx.waiters
                .candidates(&plan.full_domain)
                .iter()
                .filter_map(|r| ctx.cache.get(r))
                .find(|other| {
                    other
                        .status
                        .as_ref()
                        .is_some_and(|s| s.phase == Phase::Conflict)
                        && other.metadata.deletion_timestamp.is_none()
                        && other.metadata.uid != obj.metadata.uid
                        && decide::waits_behind(obj, other)
                        && decide::full_domain(other).as_ref() == Some(&plan.full_domain)
                })
        })
        .flatten();
    if let Some(older) = older {
        // Make sure the older one tries now rather than at its next retry.
        let _ = ctx.wake.send(ObjectRef::from_obj(&*older));
        let holder = match ctx.store.get_by_domain(&plan.full_domain).await? {
            Some(h) => decide::holder_display(
                h.source.as_deref(),
                h.mapping_id.as_str(),
                &ctx.policy.cluster_id,
            ),
            None => format!(
                "{}/{} (older, waiting)",
                older.namespace().unwrap_or_default(),
                older.name_any()
            ),
        };
        ctx.metrics.conflicts.inc();
        return Ok(Outcome::Conflict { plan, holder });
    }
    // Quotas limit new claims: a mapping that was serving (its record lost with a flushed
    // Redis) gets its slot back even if waiters were quicker to count.
    let quota = if was_serving {
        Quota::UNLIMITED
    } else {
        ctx.policy.quota()
    };
    match ctx.store.create_within(plan.spec.clone(), quota).await {
        Ok(m) => {
            // A record restored (lost with a flushed Redis) is no news to the user, and an
            // Event per mapping would double the API writes of a cold start.
            if !was_serving {
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    "Claimed",
                    format!("claimed {}", plan.full_domain),
                )
                .await;
            }
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
                holder: decide::holder_display(
                    holder_source.as_deref(),
                    holder.as_str(),
                    &ctx.policy.cluster_id,
                ),
                plan,
            })
        }
        Err(StoreError::QuotaExceeded {
            scope,
            count,
            limit,
        }) => Ok(Outcome::Held(Hold::Rejected {
            reason: "QuotaExceeded",
            message: decide::quota_message(
                &scope,
                count,
                limit,
                &obj.namespace().unwrap_or_default(),
            ),
        })),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(
    ctx: &Ctx,
    obj: &HTTPDomainMapping,
    api: &Api<HTTPDomainMapping>,
    outcome: &Outcome,
    served: Option<&super::served::Tally>,
) -> Result<(), Error> {
    let previous = obj.status.as_ref();
    let now = Utc::now();
    let mut status = decide::status(outcome, obj.metadata.generation, previous, now);
    let placement = match outcome {
        Outcome::Active { plan, .. } | Outcome::Conflict { plan, .. } => {
            plan.spec.placement.as_ref()
        }
        Outcome::Held(_) => None,
    };
    let healthy = ctx.fleet.get();
    decide::add_serving(&mut status, placement, healthy.as_deref(), previous, now);
    decide::add_served(&mut status, served, previous, now);
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
    let started = Instant::now();
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics
        .status_write_seconds
        .observe(started.elapsed().as_secs_f64());
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
        // A Secret replaced (a renewal) reaches the proxies within `tls_recheck`.
        Outcome::Active { .. } if obj.spec.tls.is_some() => {
            Some(ctx.resync_interval.min(ctx.tls_recheck))
        }
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
    ctx.served.forget(&ObjectRef::from_obj(obj));
    // A restore of its record in flight lands first, then is released below.
    if ctx.restorer.forget(&ObjectRef::from_obj(obj)) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if let Some(m) = find_own(ctx, obj).await? {
        release(ctx, obj, &m).await?;
    }
    Ok(Action::await_change())
}
