//! The TunnelSet reconciler (this part: auth and placement): reads the token from the
//! Secret `spec.auth.secretRef` names, writes the client's credential (a token hash, never the
//! token) to the store, removes it when the TunnelSet goes or stops being valid, and wakes the
//! HTTPDomainMappings whose tunnel target names the client. The Secret is read with `get` on
//! every reconcile, which is requeued every `controller.resync_interval`: a Secret created or
//! rotated later is picked up within that time without a watch on Secrets (docs/controller.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::decide::source_of;
use super::metrics::Metrics;
use super::reconcile::{Error, FIELD_MANAGER};
use super::tunnelset_decide::{self as td, Existing, Outcome, Refusal};
use super::tunnelset_ports as tp;
use crate::crd::TunnelStatus;
use crate::crd::{HTTPDomainMapping, TunnelSet};
use crate::domain::SetName;
use crate::store::{PortRegistry, TunnelRegistry};
use crate::tunnel::credential::ClientCredential;

/// Removes the client's credential before the TunnelSet goes.
pub const FINALIZER: &str = "tunnox.net/release-credential";

pub struct TsCtx {
    pub client: kube::Client,
    /// The proxy sets with a healthy node (for `status.servingSet`).
    pub fleet: Arc<super::fleet::Fleet>,
    pub registry: Arc<dyn TunnelRegistry>,
    pub cache: Store<TunnelSet>,
    pub mappings: Store<HTTPDomainMapping>,
    pub wake_mappings: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
    /// Reconciles these next (TunnelSets waiting for a client id that was released).
    pub wake: mpsc::UnboundedSender<ObjectRef<TunnelSet>>,
    pub cluster_id: String,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// How often the Secret is read again.
    pub recheck: Duration,
    /// The remote ports of the sets (Redis only; without it tunnels stay `Pending`).
    pub ports: Option<Arc<dyn PortRegistry>>,
    /// `controller.remote_port_range`.
    pub port_range: (u16, u16),
    /// `controller.tunnel_service` when enabled, and the namespace its Services go in (the
    /// controller's own).
    pub service: Option<(crate::config::TunnelServiceConfig, String)>,
    /// Each TunnelSet's `spec.groups` when last reconciled: a change wakes the group mappings
    /// of its namespace.
    pub groups_seen: std::sync::Mutex<std::collections::HashMap<ObjectRef<TunnelSet>, Vec<String>>>,
}

pub async fn reconcile(obj: Arc<TunnelSet>, ctx: Arc<TsCtx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<TunnelSet> = Api::namespaced(ctx.client.clone(), &ns);
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
    ctx.metrics
        .tunnelset_reconciles
        .with_label_values(&[label])
        .inc();
    tracing::debug!(
        tunnelset_reconcile_seconds = started.elapsed().as_secs_f64(),
        result = label
    );
    action
}

pub fn error_policy(obj: Arc<TunnelSet>, err: &Error, _ctx: Arc<TsCtx>) -> Action {
    tracing::warn!(tunnelset = %ObjectRef::from_obj(&*obj), error = %err, "reconcile failed; retrying");
    match err {
        Error::Store(e) if e.is_transient() => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

fn source(ctx: &TsCtx, obj: &TunnelSet) -> String {
    source_of(
        &ctx.cluster_id,
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
    )
}

/// Removes `client_id`'s credential if this TunnelSet wrote it (another's stays), and wakes
/// the mappings to that client. Read-then-remove: the store has no compare-on-remove for
/// credentials, and only the leader writes them.
async fn release(ctx: &TsCtx, obj: &TunnelSet, client_id: &str) -> Result<(), Error> {
    let mine = source(ctx, obj);
    let held = ctx.registry.credential(client_id).await?;
    if held.is_some_and(|c| c.source.as_deref() == Some(mine.as_str())) {
        ctx.registry.remove_credential(client_id).await?;
        tracing::info!(tunnelset = %ObjectRef::from_obj(obj), client_id, "credential removed");
        wake_mappings(ctx, obj, client_id);
    }
    Ok(())
}

/// Reconcile every mapping whose tunnel target names `client_id`, and every group mapping: the
/// client's credential came or went (a group record of any namespace may list the client id,
/// and who holds it decides whether it still belongs there). Credentials change rarely.
fn wake_mappings(ctx: &TsCtx, obj: &TunnelSet, client_id: &str) {
    wake_targets(ctx, obj, Some(client_id), None);
}

/// Reconcile the mappings that target `client_id`, and the group mappings of a group in
/// `groups` of `obj`'s namespace (`None`: of every group, in every namespace).
fn wake_targets(ctx: &TsCtx, obj: &TunnelSet, client_id: Option<&str>, groups: Option<&[String]>) {
    let ns = obj.namespace();
    for m in ctx.mappings.state() {
        let Some(t) = m.spec.target.tunnel.as_ref() else {
            continue;
        };
        let wants = match (&t.client_id, &t.group) {
            (Some(c), _) => Some(c.as_str()) == client_id,
            (None, Some(g)) => {
                groups.is_none_or(|groups| groups.contains(g) && m.namespace() == ns)
            }
            (None, None) => false,
        };
        if wants {
            let _ = ctx.wake_mappings.send(ObjectRef::from_obj(&*m));
        }
    }
}

/// Wakes the group mappings whose membership `obj`'s `spec.groups` changed since this
/// controller last saw it (all of its groups at its first sight, e.g. after a restart).
fn wake_changed_groups(ctx: &TsCtx, obj: &TunnelSet, now: Option<&[String]>) {
    let key = ObjectRef::from_obj(obj);
    let before = {
        let mut seen = ctx.groups_seen.lock().expect("not poisoned");
        match now {
            Some(groups) => seen.insert(key, groups.to_vec()),
            None => seen.remove(&key),
        }
    };
    let now = now.unwrap_or_default();
    let first_sight = before.is_none();
    let before = before.unwrap_or_default();
    let changed: Vec<String> = before
        .iter()
        .chain(now)
        .filter(|g| first_sight || before.contains(g) != now.contains(g))
        .cloned()
        .collect();
    if !changed.is_empty() {
        wake_targets(ctx, obj, None, Some(&changed));
    }
}

/// Whether the TunnelSet cache holds the whole list: who holds a client id is decided from it,
/// and a partial cache would let a newer TunnelSet overwrite an older one's credential. Polled
/// with a short timeout, not awaited: kube-runtime's readiness wakes only the last task that
/// polled it (see resync.rs).
pub(super) async fn cache_ready(cache: &Store<TunnelSet>) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(50), cache.wait_until_ready()).await,
        Ok(Ok(()))
    )
}

async fn apply(obj: &TunnelSet, ctx: &TsCtx, api: &Api<TunnelSet>) -> Result<Action, Error> {
    if !cache_ready(&ctx.cache).await {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let client_id = obj.spec.client_id.clone();
    // The credential of a former client id goes first.
    if let Some(old) = obj.status.as_ref().and_then(|s| s.client_id.as_deref())
        && old != client_id
    {
        release(ctx, obj, old).await?;
    }
    let outcome = match decide(obj, ctx).await? {
        Ok(outcome) => outcome,
        Err((refusal, set)) => {
            release(ctx, obj, &client_id).await?;
            Outcome::Refused { refusal, set }
        }
    };
    ctx.metrics
        .tunnelset_outcomes
        .with_label_values(&[outcome.label()])
        .inc();
    wake_changed_groups(ctx, obj, Some(&obj.spec.groups));
    let tunnels = ports(ctx, obj, &outcome).await?;
    let endpoint = publish_service(ctx, obj, &outcome, &tunnels).await?;
    let sessions = ctx.registry.sessions(&client_id).await?;
    write_status(ctx, obj, api, &outcome, &sessions, tunnels, endpoint).await?;
    // Picks up a Secret created or rotated later, and refreshes `online`.
    Ok(Action::requeue(ctx.recheck))
}

type Refused = (Refusal, Option<crate::domain::SetName>);

/// The set a TunnelSet's ports were last claimed in (its status), when it is not `now`.
fn former_set(obj: &TunnelSet, now: Option<&SetName>) -> Option<SetName> {
    let old = obj.status.as_ref()?.set.as_deref()?;
    let old = SetName::parse(old).ok()?;
    (Some(&old) != now).then_some(old)
}

/// Claims the remote ports of an accepted TunnelSet in its set (and frees those of a former
/// set); frees them all when it is refused. Each tunnel's status.
async fn ports(
    ctx: &TsCtx,
    obj: &TunnelSet,
    outcome: &Outcome,
) -> Result<Vec<TunnelStatus>, Error> {
    let Some(registry) = &ctx.ports else {
        return Ok(obj
            .spec
            .tunnels
            .iter()
            .map(|t| TunnelStatus {
                name: t.name.clone(),
                state: "Pending".into(),
                message: Some("remote ports need the Redis store".into()),
                ..TunnelStatus::default()
            })
            .collect());
    };
    let holder = source(ctx, obj);
    match outcome {
        Outcome::Accepted { set, .. } => {
            // Another business's port space; within one business the claims below move with it.
            if let Some(old) = former_set(obj, Some(set)).filter(|o| o.business() != set.business())
            {
                registry.release_ports(&old, &holder).await?;
            }
            let (requests, asks) = tp::requests(obj, set, &holder, ctx.port_range);
            let outcomes = registry
                .claim_ports(set, &holder, &requests, ctx.port_range)
                .await?;
            let errors = registry.port_errors(set).await?;
            let traffic = registry.port_traffic(set).await?;
            Ok(tp::statuses(obj, &asks, &outcomes, &errors, &traffic))
        }
        Outcome::Refused { set, .. } => {
            let mut freed = false;
            for s in set.iter().cloned().chain(former_set(obj, set.as_ref())) {
                registry.release_ports(&s, &holder).await?;
                freed = true;
            }
            if freed {
                wake_conflicted(ctx, obj);
            }
            Ok(Vec::new())
        }
    }
}

/// Applies (server-side) the Service publishing the TunnelSet's held ports, or deletes it when
/// none is held. Returns where the ports are reached: the load balancer's address once it has
/// one, else the Service's cluster DNS name.
async fn publish_service(
    ctx: &TsCtx,
    obj: &TunnelSet,
    outcome: &Outcome,
    tunnels: &[TunnelStatus],
) -> Result<Option<String>, Error> {
    let Some((cfg, namespace)) = &ctx.service else {
        return Ok(None);
    };
    let api: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ctx.client.clone(), namespace);
    let name = tp::service_name(&obj.namespace().unwrap_or_default(), &obj.name_any());
    let desired = match outcome {
        Outcome::Accepted { set, .. } => {
            // The pods of the set serving it now: its home set, or the DR set while the home set
            // has no healthy proxy (the fleet follower wakes this reconcile when that changes).
            let serving = tp::service_set(set, ctx.fleet.get().as_deref());
            tp::service(obj, &serving, tunnels, cfg, namespace)
        }
        Outcome::Refused { .. } => None,
    };
    let Some(desired) = desired else {
        delete_service(ctx, obj).await?;
        return Ok(None);
    };
    let svc = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await?;
    let ingress = svc
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .and_then(|i| i.into_iter().next())
        .and_then(|i| i.ip.or(i.hostname));
    Ok(Some(
        ingress.unwrap_or_else(|| format!("{name}.{namespace}.svc")),
    ))
}

/// Deletes the TunnelSet's Service if there is one.
async fn delete_service(ctx: &TsCtx, obj: &TunnelSet) -> Result<(), Error> {
    let Some((_, namespace)) = &ctx.service else {
        return Ok(());
    };
    let api: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ctx.client.clone(), namespace);
    let name = tp::service_name(&obj.namespace().unwrap_or_default(), &obj.name_any());
    match api.delete(&name, &Default::default()).await {
        Ok(_) => {
            tracing::info!(tunnelset = %ObjectRef::from_obj(obj), service = %name, "Service deleted");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reconciles the other TunnelSets that wait for a port (`Conflict`): ports were freed.
fn wake_conflicted(ctx: &TsCtx, obj: &TunnelSet) {
    for other in ctx.cache.state() {
        let waiting = other
            .status
            .as_ref()
            .is_some_and(|s| s.tunnels.iter().any(|t| t.state == "Conflict"));
        if waiting && other.uid() != obj.uid() {
            let _ = ctx.wake.send(ObjectRef::from_obj(&*other));
        }
    }
}

/// Accepts (writing the credential when it changed) or says why not.
async fn decide(obj: &TunnelSet, ctx: &TsCtx) -> Result<Result<Outcome, Refused>, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let client_id = &obj.spec.client_id;
    let set = match td::placement(obj) {
        Ok(s) => s,
        Err(r) => return Ok(Err((r, None))),
    };
    let refuse = |reason: &'static str, message: String| {
        Ok(Err((Refusal { reason, message }, Some(set.clone()))))
    };
    if let Some(holder) = td::holder_of(obj, ctx.cache.state().iter().map(|a| &**a)) {
        return refuse(
            "ClientIdConflict",
            format!(
                "clientId {client_id} is held by TunnelSet {}/{} (created earlier); this one takes over when it is deleted",
                holder.namespace().unwrap_or_default(),
                holder.name_any()
            ),
        );
    }
    let secret_ref = &obj.spec.auth.secret_ref;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets.get_opt(&secret_ref.name).await?;
    let hash = match td::token_hash(secret.as_ref(), &ns, &secret_ref.name, &secret_ref.key) {
        Ok(h) => h,
        Err(r) => return Ok(Err((r, Some(set)))),
    };
    drop(secret);
    let mine = source(ctx, obj);
    let held = ctx.registry.credential(client_id).await?;
    if let Existing::Foreign(holder) = td::existing(held.as_ref(), &mine, &ctx.cluster_id) {
        return refuse(
            "ClientIdConflict",
            format!("clientId {client_id} is held in the store by {holder}"),
        );
    }
    let cred = ClientCredential {
        client_id: client_id.clone(),
        token_sha256: hash,
        placement: Some(set.clone()),
        source: Some(mine),
    };
    if held.as_ref() != Some(&cred) {
        ctx.registry.put_credential(&cred).await?;
        tracing::info!(tunnelset = %ObjectRef::from_obj(obj), client_id = %client_id, set = %set, "credential written");
        wake_mappings(ctx, obj, client_id);
    }
    Ok(Ok(Outcome::Accepted {
        client_id: client_id.clone(),
        set,
    }))
}

async fn write_status(
    ctx: &TsCtx,
    obj: &TunnelSet,
    api: &Api<TunnelSet>,
    outcome: &Outcome,
    sessions: &[crate::store::SessionRecord],
    tunnels: Vec<TunnelStatus>,
    endpoint: Option<String>,
) -> Result<(), Error> {
    let previous = obj.status.as_ref();
    let mut status = td::status(
        outcome,
        obj.metadata.generation,
        previous,
        sessions,
        Utc::now(),
    );
    status.tunnel_count = i32::try_from(obj.spec.tunnels.len()).unwrap_or(i32::MAX);
    // Only an admitted client is served anywhere.
    let placement = match outcome {
        Outcome::Accepted { set, .. } => Some(set.clone()),
        Outcome::Refused { .. } => None,
    };
    let healthy = ctx.fleet.get();
    let generation = status.observed_generation;
    super::decide::serving_into(
        (&mut status.serving_set, &mut status.conditions),
        generation,
        placement.as_ref(),
        healthy.as_deref(),
        previous.map(|p| (p.serving_set.as_deref(), p.conditions.as_slice())),
        Utc::now(),
    );
    let mut tunnels = tunnels;
    td::agent_states(&mut tunnels, sessions, Utc::now());
    status.tunnels = tunnels;
    status.endpoint = endpoint;
    if previous == Some(&status) {
        return Ok(());
    }
    let reason = |s: Option<&crate::crd::TunnelSetStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"))
            .map(|c| c.reason.clone())
    };
    let changed = reason(previous) != reason(Some(&status));
    let patch = json!({
        "apiVersion": TunnelSet::api_version(&()),
        "kind": TunnelSet::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    if changed {
        let (type_, reason, note) = match outcome {
            Outcome::Accepted { client_id, set } => (
                EventType::Normal,
                "Accepted",
                format!("client {client_id} admitted in {set}"),
            ),
            Outcome::Refused { refusal, .. } => {
                (EventType::Warning, refusal.reason, refusal.message.clone())
            }
        };
        publish(&ctx.recorder, obj, type_, reason, note).await;
    }
    Ok(())
}

async fn publish(
    recorder: &Recorder,
    obj: &TunnelSet,
    type_: EventType,
    reason: &str,
    note: String,
) {
    super::publish_event(
        recorder,
        &obj.object_ref(&()),
        "Reconcile",
        type_,
        reason,
        note,
    )
    .await
}

async fn cleanup(obj: &TunnelSet, ctx: &TsCtx) -> Result<Action, Error> {
    let client_id = &obj.spec.client_id;
    release(ctx, obj, client_id).await?;
    if let Some(registry) = &ctx.ports {
        let holder = source(ctx, obj);
        let sets = td::placement(obj)
            .ok()
            .into_iter()
            .chain(former_set(obj, None));
        for set in sets {
            registry.release_ports(&set, &holder).await?;
        }
        wake_conflicted(ctx, obj);
    }
    delete_service(ctx, obj).await?;
    if let Some(old) = obj.status.as_ref().and_then(|s| s.client_id.as_deref())
        && old != client_id
    {
        release(ctx, obj, old).await?;
    }
    wake_changed_groups(ctx, obj, None);
    // A TunnelSet waiting for this client id takes it over now.
    for other in ctx.cache.state() {
        if other.spec.client_id == *client_id && other.uid() != obj.uid() {
            let _ = ctx.wake.send(ObjectRef::from_obj(&*other));
        }
    }
    Ok(Action::await_change())
}
