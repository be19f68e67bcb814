//! The cluster's source of intent: `HTTPDomainMapping` resources. A create declares a resource
//! in the API's namespace and waits for the controller's verdict on it, so `kubectl get hdm`
//! shows every API mapping and the controller stays the only writer of the store; a delete
//! deletes the resource (its finalizer releases the domain). Reads come from the store and from
//! the controller's cache of resources, which every replica keeps.

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

pub struct ClusterIntent {
    pub client: kube::Client,
    /// Where the API's resources are created (`api.namespace`).
    pub namespace: String,
    pub cluster_id: String,
    /// The controller's cache of every `HTTPDomainMapping`.
    pub cache: Store<HTTPDomainMapping>,
    pub store: Arc<dyn MappingStore>,
    /// How long a call waits for the controller (`api.wait`).
    pub wait: Duration,
    /// A user's creations are counted and made one at a time (in this replica; the controller's
    /// `quota.per_owner` is the bound across replicas).
    pub quota_lock: tokio::sync::Mutex<()>,
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
    Active(String),
    /// Another mapping holds the domain: `claimedBy`.
    Taken(String),
    /// Refused: the `Accepted` condition's reason and message.
    Refused {
        reason: String,
        message: String,
    },
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
            Some(id) => Verdict::Active(id.clone()),
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

/// The error a refusal by the controller answers with.
fn refused(domain: &str, reason: &str, message: &str) -> ApiError {
    match reason {
        "QuotaExceeded" => {
            ApiError::new(StatusCode::CONFLICT, "quota_exceeded", message.to_string())
        }
        "Expired" => ApiError::refused("expires_at", message.to_string()),
        "InvalidTarget" | "EgressDenied" => ApiError::refused("target_host", message.to_string()),
        "TunnelGroupEmpty" | "TunnelGroupTooLarge" | "TunnelSetInOtherNamespace" => {
            ApiError::refused("target_client_id", message.to_string())
        }
        _ => ApiError::refused("subdomain", format!("{domain}: {reason}: {message}")),
    }
}

fn kube_unavailable(e: &kube::Error) -> ApiError {
    tracing::warn!(error = %e, "API request failed at the Kubernetes API");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the Kubernetes API cannot be reached; try again",
    )
}

/// `namespace/name` of the resource a record of this cluster names as its source.
pub fn resource_named(source: &str, cluster: &str) -> Option<(String, String)> {
    let rest = source.strip_prefix("k8s:")?.strip_prefix(cluster)?;
    let (ns, name) = rest.strip_prefix('/')?.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| (ns.to_string(), name.to_string()))
}

impl ClusterIntent {
    fn api(&self, namespace: &str) -> kube::Api<HTTPDomainMapping> {
        kube::Api::namespaced(self.client.clone(), namespace)
    }

    fn cached(&self, namespace: &str, name: &str) -> Option<Arc<HTTPDomainMapping>> {
        self.cache.get(&ObjectRef::new(name).within(namespace))
    }

    /// The resources the API created for `user` (from the API server, not the cache: one
    /// created a moment ago counts).
    async fn count_of(&self, user: &str) -> Result<usize, ApiError> {
        let lp = ListParams::default().labels(&format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY},{OWNER_LABEL}={}",
            owner_label(user)
        ));
        let list = self
            .api(&self.namespace)
            .list_metadata(&lp)
            .await
            .map_err(|e| kube_unavailable(&e))?;
        Ok(list
            .items
            .iter()
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .count())
    }

    /// Deletes the resource `name` if it is still the one with `uid` (failures only logged:
    /// the caller answers with the reason it deletes for).
    async fn withdraw(&self, name: &str, uid: &str) {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = self.api(&self.namespace).delete(name, &dp).await {
            tracing::warn!(error = %e, resource = %name, "could not withdraw a refused API mapping");
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

#[async_trait]
impl Intent for ClusterIntent {
    async fn create(&self, spec: MappingSpec, quota: Quota) -> Result<Created, ApiError> {
        let domain = spec.validate().map_err(StoreError::Invalid)?;
        let name = domain.as_str().to_string();
        let _counted = match (&spec.owner_user_id, quota.per_owner) {
            (Some(user), limit) if limit > 0 => {
                let guard = self.quota_lock.lock().await;
                let count = self.count_of(user).await?;
                if count >= limit {
                    return Err(StoreError::QuotaExceeded {
                        scope: QuotaScope::Owner(user.clone()),
                        count: count as u64,
                        limit,
                    }
                    .into());
                }
                Some(guard)
            }
            _ => None,
        };
        let resource = resource_of(&spec, &name, &self.namespace);
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let created = match self.api(&self.namespace).create(&pp, &resource).await {
            Ok(c) => c,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "domain_taken",
                    format!(
                        "{domain} is taken: resource {}/{name} exists",
                        self.namespace
                    ),
                )
                .at("subdomain"));
            }
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                return Err(ApiError::refused("body", s.message));
            }
            Err(e) => return Err(kube_unavailable(&e)),
        };
        drop(_counted);
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let at = format!("{}/{name}", self.namespace);
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let now = self.cached(&self.namespace, &name);
            match verdict(now.as_deref(), &uid) {
                Verdict::Active(id) => {
                    let id = MappingId::parse(&id).map_err(|e| {
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    })?;
                    if let Some(m) = self.store.get(&id).await? {
                        return Ok(Created::Served(m));
                    }
                }
                Verdict::Taken(holder) => {
                    self.withdraw(&name, &uid).await;
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "domain_taken",
                        format!("{domain} is taken by {holder}"),
                    )
                    .at("subdomain"));
                }
                Verdict::Refused { reason, message } => {
                    self.withdraw(&name, &uid).await;
                    return Err(refused(&name, &reason, &message));
                }
                Verdict::Waiting(why) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Created::Pending {
                            message: if why.is_empty() {
                                format!(
                                    "{at} is not Active after {:?}; the controller has not decided on it yet",
                                    self.wait
                                )
                            } else {
                                format!("{at} is not Active after {:?}: {why}", self.wait)
                            },
                            resource: at,
                        });
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn declared_here(&self, m: &Mapping) -> bool {
        let Some((ns, name)) = m
            .source
            .as_deref()
            .and_then(|s| resource_named(s, &self.cluster_id))
        else {
            return false;
        };
        ns == self.namespace
            && self.cached(&ns, &name).is_some_and(|r| {
                r.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(MANAGED_BY_LABEL))
                    .is_some_and(|v| v == MANAGED_BY)
            })
    }

    async fn delete(&self, m: &Mapping, force: bool) -> Result<Deleted, ApiError> {
        let resource = m
            .source
            .as_deref()
            .and_then(|s| resource_named(s, &self.cluster_id))
            .and_then(|(ns, name)| {
                let r = self.cached(&ns, &name)?;
                let declares = r.status.as_ref().and_then(|s| s.mapping_id.as_deref())
                    == Some(m.mapping_id.as_str());
                declares.then(|| (ns, name, r.metadata.uid.clone().unwrap_or_default()))
            });
        let Some((ns, name, uid)) = resource else {
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
            self.store.delete(&m.mapping_id, Some(m.version)).await?;
            return Ok(Deleted::Gone);
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api(&ns).delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(kube_unavailable(&e)),
        }
        Ok(if self.released(&m.mapping_id).await? {
            Deleted::Gone
        } else {
            Deleted::InProgress {
                resource: format!("{ns}/{name}"),
            }
        })
    }

    async fn phases(&self) -> Result<Vec<(ApiPhase, u64)>, ApiError> {
        if tokio::time::timeout(Duration::from_millis(1), self.cache.wait_until_ready())
            .await
            .is_err()
        {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the controller is still reading every HTTPDomainMapping; try again",
            ));
        }
        let mut counts = [0u64; 5];
        for r in self.cache.state() {
            let phase = r.status.as_ref().map(|s| s.phase).unwrap_or_default();
            counts[match phase {
                Phase::Pending => 0,
                Phase::Active => 1,
                Phase::Conflict => 2,
                Phase::Rejected => 3,
                Phase::Expired => 4,
            }] += 1;
        }
        Ok(ApiPhase::ALL.into_iter().zip(counts).collect())
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
            Verdict::Active("hdm_x".into())
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
        assert_eq!(refused("d", &reason, "m").body.code, "quota_exceeded");
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
