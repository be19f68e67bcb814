//! The cluster's source of intent: `HTTPDomainMapping` resources. A create declares a resource
//! in the API's namespace and waits for the controller's verdict on it, so `kubectl get hdm`
//! shows every API mapping and the controller stays the only writer of the store; a delete
//! deletes the resource (its finalizer releases the domain). Reads come from the store and from
//! the controller's cache of resources, which every replica keeps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use sha2::Digest;

use super::model::Phase as ApiPhase;
use super::{ApiError, Created, Deleted, Intent};
use crate::crd::{
    HTTPDomainMapping, HTTPDomainMappingSpec, Owner, Phase, Target, TargetScheme, TunnelTarget,
};
use crate::domain::{Mapping, MappingId, MappingSpec, Scheme};
use crate::store::{MappingStore, Quota, QuotaScope, StoreError};

/// The label every resource the API creates carries (its value: [`MANAGED_BY`]).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "tunnox-api";
/// The label naming the owner of an API resource, by [`owner_label`] (quota counts use it).
pub const OWNER_LABEL: &str = "tunnox.net/api-owner";
const FIELD_MANAGER: &str = "tunnox-api";
/// How often a waiting call looks at the cache again.
const POLL: Duration = Duration::from_millis(50);

/// What a create's settling task needs (cheap clones, so it can outlive the request).
#[derive(Clone)]
struct Parts {
    client: kube::Client,
    namespace: String,
    cache: Store<HTTPDomainMapping>,
    store: Arc<dyn MappingStore>,
    wait: Duration,
}

pub struct ClusterIntent {
    parts: Parts,
    cluster_id: String,
    /// A user's creations are counted and made one at a time (in this replica; the controller's
    /// `quota.per_owner` is the bound across replicas), users independently of each other.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A user id as a label value: ids are any visible ASCII, label values are not, so the id is
/// hashed (SHA-256, 40 hex digits).
pub fn owner_label(user: &str) -> String {
    let digest = sha2::Sha256::digest(user.as_bytes());
    digest[..20].iter().map(|b| format!("{b:02x}")).collect()
}

/// The resource declaring `spec`: named after its domain (a valid resource name, and one
/// resource per domain in the namespace), labelled as the API's.
pub fn resource_of(spec: &MappingSpec, name: &str, namespace: &str) -> HTTPDomainMapping {
    let target = match &spec.target_client_id {
        Some(client) => Target {
            service: None,
            address: None,
            tunnel: Some(TunnelTarget {
                client_id: Some(client.clone()),
                group: None,
                balance: None,
                host: spec.target_host.clone(),
                port: i32::from(spec.target_port),
            }),
            protocol: None,
            tls: None,
        },
        None => Target::address(&spec.target_host, i32::from(spec.target_port)),
    };
    let mut r = HTTPDomainMapping::new(
        name,
        HTTPDomainMappingSpec {
            scheme: match spec.target_scheme {
                Scheme::Http => TargetScheme::Http,
                Scheme::Https => TargetScheme::Https,
            },
            owner: spec
                .owner_user_id
                .as_ref()
                .map(|u| Owner { user_id: u.clone() }),
            custom_headers: spec.custom_headers.clone(),
            expires_at: spec
                .expires_at
                .and_then(|t| jiff::Timestamp::from_millisecond(t.timestamp_millis()).ok())
                .map(Time),
            description: spec.description.clone(),
            ..HTTPDomainMappingSpec::new(&spec.subdomain, spec.base_domain.as_str(), target)
        },
    );
    r.metadata.namespace = Some(namespace.to_string());
    let mut labels =
        std::collections::BTreeMap::from([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())]);
    if let Some(u) = &spec.owner_user_id {
        labels.insert(OWNER_LABEL.to_string(), owner_label(u));
    }
    r.metadata.labels = Some(labels);
    r
}

/// What the controller made of a resource the API created, as far as a caller is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet (or waiting for a dependency): the message says why, when it does.
    Waiting(String),
    /// In the store; `ready`: every healthy proxy of its set applied it (`proxies`: `N/M`).
    Active {
        id: String,
        ready: bool,
        proxies: String,
    },
    /// Another mapping holds the domain: `claimedBy`.
    Taken(String),
    /// Refused: the `Accepted` condition's reason and message.
    Refused { reason: String, message: String },
}

/// The verdict on `r` (the one created with `uid`), from its status; a status of an older
/// generation (or of another object under the same name) is no verdict yet.
pub fn verdict(r: Option<&HTTPDomainMapping>, uid: &str) -> Verdict {
    let Some(r) = r.filter(|r| r.metadata.uid.as_deref() == Some(uid)) else {
        return Verdict::Waiting(String::new());
    };
    let Some(s) = r.status.as_ref() else {
        return Verdict::Waiting(String::new());
    };
    if s.observed_generation < r.metadata.generation {
        return Verdict::Waiting(String::new());
    }
    let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted");
    let (reason, message) = accepted
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default();
    match s.phase {
        Phase::Active => match &s.mapping_id {
            Some(id) => Verdict::Active {
                id: id.clone(),
                ready: s.conditions.iter().any(|c| {
                    c.type_ == "Ready"
                        && c.status == "True"
                        && c.observed_generation >= r.metadata.generation
                }),
                proxies: s.proxies.clone().unwrap_or_default(),
            },
            None => Verdict::Waiting(message),
        },
        Phase::Conflict => Verdict::Taken(s.claimed_by.clone().unwrap_or_default()),
        Phase::Rejected => Verdict::Refused { reason, message },
        Phase::Expired => Verdict::Refused {
            reason: "Expired".into(),
            message: "expires_at has passed".into(),
        },
        Phase::Pending => Verdict::Waiting(message),
    }
}

/// The error a refusal by the controller answers with. Only messages about the caller's own
/// input are passed on; others (a namespace's count, the API's namespace) stay in the resource's
/// status and the log.
fn refused(domain: &str, reason: &str, message: &str) -> ApiError {
    match reason {
        "QuotaExceeded" => ApiError::new(
            StatusCode::CONFLICT,
            "quota_exceeded",
            format!("{domain}: a mapping quota is reached"),
        ),
        "Expired" => ApiError::refused("expires_at", message.to_string()),
        "InvalidTarget" | "EgressDenied" => ApiError::refused("target_host", message.to_string()),
        "InvalidDomain" | "BaseDomainNotAllowed" => {
            ApiError::refused("subdomain", message.to_string())
        }
        "TunnelGroupEmpty" | "TunnelGroupTooLarge" | "TunnelSetInOtherNamespace" => {
            ApiError::refused("target_client_id", message.to_string())
        }
        _ => ApiError::refused(
            "body",
            format!("{domain}: refused by the controller ({reason})"),
        ),
    }
}

/// A failed call to the Kubernetes API: a refusal of the resource is the request's fault (422,
/// a fixed message); anything else is ours (503). The detail goes to the log only.
fn kube_error(e: &kube::Error, what: &str) -> ApiError {
    tracing::warn!(error = %e, what, "API request failed at the Kubernetes API");
    match e {
        kube::Error::Api(s) if matches!(s.code, 400 | 403 | 404 | 422) => ApiError::refused(
            "body",
            format!("the Kubernetes API refused to {what} (the controller's log has the reason)"),
        ),
        _ => unavailable("the Kubernetes API cannot be reached; try again"),
    }
}

fn unavailable(message: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        message.to_string(),
    )
}

/// The Kubernetes API's answer to `f`, or a 503 once `limit` has passed.
async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, ApiError> {
    tokio::time::timeout(limit, f).await.map_err(|_| {
        tracing::warn!(what, ?limit, "the Kubernetes API did not answer in time");
        unavailable("the Kubernetes API did not answer in time; try again")
    })
}

/// [`within`], its errors mapped by [`kube_error`].
async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiError> {
    within(limit, what, f)
        .await?
        .map_err(|e| kube_error(&e, what))
}

/// A resource's phase as the API spells it.
fn api_phase(p: Phase) -> ApiPhase {
    match p {
        Phase::Pending => ApiPhase::Pending,
        Phase::Active => ApiPhase::Active,
        Phase::Conflict => ApiPhase::Conflict,
        Phase::Rejected => ApiPhase::Rejected,
        Phase::Expired => ApiPhase::Expired,
    }
}

/// `namespace/name` of the resource a record of this cluster names as its source.
pub fn resource_named(source: &str, cluster: &str) -> Option<(String, String)> {
    let rest = source.strip_prefix("k8s:")?.strip_prefix(cluster)?;
    let (ns, name) = rest.strip_prefix('/')?.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| (ns.to_string(), name.to_string()))
}

impl Parts {
    fn api(&self, namespace: &str) -> kube::Api<HTTPDomainMapping> {
        kube::Api::namespaced(self.client.clone(), namespace)
    }

    fn cached(&self, namespace: &str, name: &str) -> Option<Arc<HTTPDomainMapping>> {
        self.cache.get(&ObjectRef::new(name).within(namespace))
    }

    /// Deletes the API's resource `name` if it is still the one with `uid` (a few attempts:
    /// a refused resource left behind would wait for its domain and take it later).
    async fn withdraw(&self, name: &str, uid: &str) {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        for attempt in 0..5u32 {
            match tokio::time::timeout(self.wait, self.api(&self.namespace).delete(name, &dp)).await
            {
                Ok(Ok(_)) => {
                    tracing::info!(resource = %format!("{}/{name}", self.namespace), "withdrew a refused API mapping");
                    return;
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, resource = %name, attempt, "could not withdraw a refused API mapping")
                }
                Err(_) => {
                    tracing::warn!(resource = %name, attempt, "withdrawing a refused API mapping timed out")
                }
            }
            tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(attempt)).await;
        }
        tracing::error!(resource = %format!("{}/{name}", self.namespace), "a refused API mapping could not be withdrawn: delete it");
    }

    /// Waits for the controller's verdict on the resource just created (`uid`). Runs as a task
    /// of its own: a caller that hangs up does not stop a refused resource's withdrawal.
    /// `may_wait`: a tunnel target, which may legitimately wait for its TunnelSet (answered
    /// 202); any other create that has no verdict within the wait is withdrawn.
    /// `ready`: an `Active` resource is answered once `Ready` too (else 202 at the deadline).
    async fn settle(
        self,
        name: String,
        uid: String,
        may_wait: bool,
        ready: bool,
    ) -> Result<Created, ApiError> {
        let at = format!("{}/{name}", self.namespace);
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut seen = false;
        loop {
            let now = self.cached(&self.namespace, &name);
            let mine = now
                .as_deref()
                .is_some_and(|r| r.metadata.uid.as_deref() == Some(uid.as_str()));
            if seen && !mine {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("{name} was deleted while it was being created"),
                ));
            }
            seen |= mine;
            let late = tokio::time::Instant::now() >= deadline;
            match verdict(now.as_deref(), &uid) {
                Verdict::Active {
                    id,
                    ready: served,
                    proxies,
                } => {
                    if (served || !ready)
                        && let Ok(id) = MappingId::parse(&id)
                        && let Some(m) = self.store.get(&id).await?
                    {
                        return Ok(Created::Served(Box::new(m)));
                    }
                    // Active stays (it is served, or about to be): only the answer is 202.
                    if late {
                        let why = if served || !ready {
                            "its record is not readable yet".to_string()
                        } else {
                            format!("not yet Ready (proxies {proxies})")
                        };
                        return Ok(Created::Pending {
                            message: format!("{at} is Active after {:?}, {why}", self.wait),
                            resource: at,
                        });
                    }
                }
                Verdict::Taken(holder) => {
                    self.withdraw(&name, &uid).await;
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "domain_taken",
                        format!("{name} is taken by {holder}"),
                    )
                    .at("subdomain"));
                }
                Verdict::Refused { reason, message } => {
                    self.withdraw(&name, &uid).await;
                    return Err(refused(&name, &reason, &message));
                }
                Verdict::Waiting(why) if late => {
                    if may_wait {
                        return Ok(Created::Pending {
                            message: if why.is_empty() {
                                format!("{at} is not Active after {:?}", self.wait)
                            } else {
                                format!("{at} is not Active after {:?}: {why}", self.wait)
                            },
                            resource: at,
                        });
                    }
                    self.withdraw(&name, &uid).await;
                    return Err(unavailable(&format!(
                        "the controller did not decide on {name} within {:?}; nothing was kept: try again",
                        self.wait
                    )));
                }
                Verdict::Waiting(_) => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for `id`'s record to leave the store; true when it did within the wait.
    async fn released(&self, id: &MappingId) -> Result<bool, ApiError> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            if self.store.get(id).await?.is_none() {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl ClusterIntent {
    pub fn new(
        client: kube::Client,
        namespace: String,
        cluster_id: String,
        cache: Store<HTTPDomainMapping>,
        store: Arc<dyn MappingStore>,
        wait: Duration,
    ) -> Self {
        Self {
            parts: Parts {
                client,
                namespace,
                cache,
                store,
                wait,
            },
            cluster_id,
            locks: Default::default(),
        }
    }

    /// Every call answers 503 until this replica's cache holds every resource: a decision on an
    /// incomplete cache could delete a live mapping's record or refuse an owner its own.
    async fn ready(&self) -> Result<(), ApiError> {
        match tokio::time::timeout(Duration::ZERO, self.parts.cache.wait_until_ready()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(unavailable(
                "the controller is still reading every HTTPDomainMapping; try again",
            )),
        }
    }

    fn lock_of(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(user.to_string()).or_default().clone()
    }

    /// The resources the API created for `user` (from the API server, not the cache: one
    /// created a moment ago counts).
    async fn count_of(&self, user: &str) -> Result<usize, ApiError> {
        let lp = ListParams::default().labels(&format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{OWNER_LABEL}={}",
            owner_label(user)
        ));
        let api = self.parts.api(&self.parts.namespace);
        let list = bounded(
            self.parts.wait,
            "list the user's mappings",
            api.list_metadata(&lp),
        )
        .await?;
        Ok(list
            .items
            .iter()
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .count())
    }

    /// The resource of this cluster that declares `m` (by its `source`), as cached.
    fn declaring(&self, m: &Mapping) -> Option<(String, String, Arc<HTTPDomainMapping>)> {
        let (ns, name) = resource_named(m.source.as_deref()?, &self.cluster_id)?;
        let r = self.parts.cached(&ns, &name)?;
        Some((ns, name, r))
    }
}

#[async_trait]
impl Intent for ClusterIntent {
    async fn create(
        &self,
        spec: MappingSpec,
        quota: Quota,
        ready: bool,
    ) -> Result<Created, ApiError> {
        self.ready().await?;
        let domain = spec.validate().map_err(StoreError::Invalid)?;
        let name = domain.as_str().to_string();
        let p = &self.parts;
        let lock = match (&spec.owner_user_id, quota.per_owner) {
            (Some(user), limit) if limit > 0 => Some((self.lock_of(user), user.clone(), limit)),
            _ => None,
        };
        let _counted = match &lock {
            Some((lock, user, limit)) => {
                let guard = tokio::time::timeout(p.wait, lock.lock())
                    .await
                    .map_err(|_| {
                        unavailable("too many creations for this user at once; try again")
                    })?;
                let count = self.count_of(user).await?;
                if count >= *limit {
                    return Err(StoreError::QuotaExceeded {
                        scope: QuotaScope::Owner(user.clone()),
                        count: count as u64,
                        limit: *limit,
                    }
                    .into());
                }
                Some(guard)
            }
            None => None,
        };
        let resource = resource_of(&spec, &name, &p.namespace);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let api = p.api(&p.namespace);
        let what = "create the mapping's resource";
        let created = match within(p.wait, what, api.create(&pp, &resource)).await? {
            Ok(c) => c,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "domain_taken",
                    format!("{domain} is taken: a mapping of that name exists"),
                )
                .at("subdomain"));
            }
            Err(e) => return Err(kube_error(&e, what)),
        };
        drop(_counted);
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let may_wait = spec.target_client_id.is_some();
        tokio::spawn(p.clone().settle(name, uid, may_wait, ready))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "settling an API create panicked");
                Err(unavailable("internal error; try again"))
            })
    }

    async fn declared_here(&self, m: &Mapping) -> Result<bool, ApiError> {
        self.ready().await?;
        Ok(self.declaring(m).is_some_and(|(ns, _, r)| {
            ns == self.parts.namespace
                && r.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(MANAGED_BY_LABEL))
                    .is_some_and(|v| v == MANAGED_BY)
        }))
    }

    async fn delete(&self, m: &Mapping, force: bool) -> Result<Deleted, ApiError> {
        self.ready().await?;
        let p = &self.parts;
        // The resource goes unless it declares another record (this one is then a stale
        // leftover of it, removed by itself); a resource whose status has no id yet goes too.
        let resource = self.declaring(m).filter(|(_, _, r)| {
            r.status
                .as_ref()
                .and_then(|s| s.mapping_id.as_deref())
                .is_none_or(|id| id == m.mapping_id.as_str())
        });
        let Some((ns, name, r)) = resource else {
            // No resource of this cluster declares it (another cluster's, the configuration's,
            // an orphan): only force removes the record itself.
            if !force {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "mapping {} is declared by no resource here; delete it with force=true",
                        m.mapping_id
                    ),
                ));
            }
            p.store.delete(&m.mapping_id, Some(m.version)).await?;
            return Ok(Deleted::Gone);
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: r.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let what = "delete the mapping's resource";
        match within(p.wait, what, p.api(&ns).delete(&name, &dp)).await? {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(kube_error(&e, what)),
        }
        Ok(if p.released(&m.mapping_id).await? {
            Deleted::Gone
        } else {
            Deleted::InProgress {
                resource: format!("{ns}/{name}"),
            }
        })
    }

    async fn phases(&self) -> Result<Vec<(ApiPhase, u64)>, ApiError> {
        self.ready().await?;
        let mut counts: Vec<(ApiPhase, u64)> = ApiPhase::ALL.iter().map(|p| (*p, 0)).collect();
        for r in self.parts.cache.state() {
            let phase = api_phase(r.status.as_ref().map(|s| s.phase).unwrap_or_default());
            if let Some(c) = counts.iter_mut().find(|(p, _)| *p == phase) {
                c.1 += 1;
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::HTTPDomainMappingStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn spec() -> MappingSpec {
        let mut s = MappingSpec::new("app", "tunnox.net", "127.0.0.1", 3000);
        s.owner_user_id = Some("u 1".into());
        s
    }

    #[test]
    fn a_spec_becomes_a_labelled_resource() {
        let mut s = spec();
        s.owner_user_id = Some("user@example".into());
        let r = resource_of(&s, "app.tunnox.net", "api");
        assert_eq!(r.metadata.name.as_deref(), Some("app.tunnox.net"));
        assert_eq!(r.metadata.namespace.as_deref(), Some("api"));
        let labels = r.metadata.labels.unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels[OWNER_LABEL].len(), 40);
        assert_ne!(owner_label("a"), owner_label("b"));
        let a = r.spec.target.address.unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 3000));
        assert!(r.spec.target.tunnel.is_none() && r.spec.target.service.is_none());
        assert_eq!(r.spec.owner.unwrap().user_id, "user@example");
        s.target_client_id = Some("laptop".into());
        let t = resource_of(&s, "x", "api").spec.target;
        assert!(t.address.is_none());
        assert_eq!(t.tunnel.unwrap().client_id.as_deref(), Some("laptop"));
    }

    #[test]
    fn sources_name_resources_of_this_cluster_only() {
        assert_eq!(
            resource_named("k8s:c1/api/app.tunnox.net", "c1"),
            Some(("api".into(), "app.tunnox.net".into()))
        );
        for other in [
            "k8s:c2/api/app",
            "k8s:c1x/api/app",
            "k8s:api/app",
            "config",
            "api",
            "k8s:c1/api/",
            "k8s:c1//app",
            "k8s:c1/a/b/c",
        ] {
            assert_eq!(resource_named(other, "c1"), None, "{other}");
        }
    }

    fn with_status(phase: Phase, generation: i64, observed: i64) -> HTTPDomainMapping {
        let mut r = resource_of(&spec(), "app.tunnox.net", "api");
        r.metadata.uid = Some("u1".into());
        r.metadata.generation = Some(generation);
        r.status = Some(HTTPDomainMappingStatus {
            phase,
            observed_generation: Some(observed),
            mapping_id: Some("hdm_x".into()),
            claimed_by: Some("team/other".into()),
            conditions: vec![Condition {
                type_: "Accepted".into(),
                status: "False".into(),
                reason: "QuotaExceeded".into(),
                message: "owner u 1 already has 3".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: Some(observed),
            }],
            ..Default::default()
        });
        r
    }

    #[test]
    fn verdicts_follow_the_status_of_this_generation_of_this_object() {
        let active = with_status(Phase::Active, 1, 1);
        assert_eq!(
            verdict(Some(&active), "u1"),
            Verdict::Active {
                id: "hdm_x".into(),
                ready: false,
                proxies: String::new()
            }
        );
        assert!(matches!(verdict(Some(&active), "u2"), Verdict::Waiting(_)));
        assert!(matches!(verdict(None, "u1"), Verdict::Waiting(_)));
        let stale = with_status(Phase::Active, 2, 1);
        assert!(matches!(verdict(Some(&stale), "u1"), Verdict::Waiting(_)));
        assert_eq!(
            verdict(Some(&with_status(Phase::Conflict, 1, 1)), "u1"),
            Verdict::Taken("team/other".into())
        );
        let Verdict::Refused { reason, .. } =
            verdict(Some(&with_status(Phase::Rejected, 1, 1)), "u1")
        else {
            panic!("refused")
        };
        assert_eq!(reason, "QuotaExceeded");
        let q = refused("d", &reason, "namespace tunnox-api already has 9 mappings");
        assert_eq!(q.body.code, "quota_exceeded");
        assert!(!q.body.message.contains("tunnox-api"), "{q:?}");
        let other = refused("d", "TunnelSetInOtherNamespace", "own: tunnox-api");
        assert_eq!(other.body.field.as_deref(), Some("target_client_id"));
        let unknown = refused("d", "SomethingElse", "secret detail");
        assert!(!unknown.body.message.contains("secret"), "{unknown:?}");
        assert_eq!(
            refused("d", "InvalidTarget", "m").body.field.as_deref(),
            Some("target_host")
        );
        assert!(matches!(
            verdict(Some(&with_status(Phase::Pending, 1, 1)), "u1"),
            Verdict::Waiting(m) if m.contains("already has")
        ));
    }
}
