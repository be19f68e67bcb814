//! `spec.tls.mode: acme` in the cluster (`docs/https.md`): the leader orders each domain's
//! certificate from `controller.acme` in the background and keeps it in a Secret of its own
//! namespace (`tunnox-acme-<hash of the domain>`, type `kubernetes.io/tls`), which the
//! reconciler then serves like a tenant's Secret. One order per domain at a time, a few at once
//! overall; a failed domain waits (1 minute, ×1.5, up to `retry_max`; a CA's rate limit waits
//! `retry_max`) before it is tried again; the mappings asking are woken when an order ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource};
use serde_json::json;
use sha2::Digest;
use tokio::sync::{Semaphore, mpsc};

use super::certificate::CertState;
use super::metrics::Metrics;
use super::reconcile::FIELD_MANAGER;
use crate::acme::schedule::{self, Need};
use crate::acme::{AccountStore, AcmeError, Orders, RETRY_FIRST};
use crate::config::AcmeConfig;
use crate::crd::HTTPDomainMapping;
use crate::store::{Backoff, ChallengeStore};

/// On an issued Secret: the domain it is for (checked before it is served).
pub const DOMAIN_ANNOTATION: &str = "tunnox.net/domain";
/// On an issued Secret: when to order its successor (RFC 3339).
pub const RENEW_AT_ANNOTATION: &str = "tunnox.net/renew-at";
/// On an issued Secret: the renewal request it answered ([`schedule::request_id`] of the
/// mapping's [`schedule::RENEW_ANNOTATION`]).
pub const RENEWED_FOR_ANNOTATION: &str = "tunnox.net/renewed-for";
/// On an issued Secret: when it was issued (RFC 3339).
pub const ISSUED_AT_ANNOTATION: &str = "tunnox.net/issued-at";
/// After an order succeeds, a new one for the domain waits this long (or `min_reorder_interval`
/// when shorter): a reconcile that read the Secret before it was written must not order again.
const AFTER_SUCCESS: Duration = Duration::from_secs(120);
/// Past this many domains remembered, finished ones are forgotten.
const MAX_JOBS: usize = 4096;
/// The account Secret's key holding its credentials (JSON, with the account's private key).
const CREDENTIALS_KEY: &str = "credentials.json";
/// Orders in flight at once (each holds a challenge answer and polls the CA).
pub const MAX_CONCURRENT_ORDERS: usize = 4;
/// Mappings woken when one domain's order ends (several may name one domain: one serves it).
const MAX_WAITERS: usize = 16;

/// The Secret a domain's issued certificate is kept in.
pub fn secret_name(domain: &str) -> String {
    let digest = sha2::Sha256::digest(domain.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("tunnox-acme-{hex}")
}

/// Whether the issued Secret `secret` needs a new order, given the certificate `state` read
/// from it (`None`: there is no such Secret) and the mapping's renewal annotation `asked`.
pub fn assess(
    secret: Option<&Secret>,
    state: Option<&CertState>,
    asked: Option<&str>,
    min_interval: Duration,
    now: DateTime<Utc>,
) -> Option<Need> {
    let annotation = |k: &str| {
        secret
            .and_then(|s| s.metadata.annotations.as_ref())
            .and_then(|a| a.get(k))
            .map(String::as_str)
    };
    let (usable, lifetime) = match state {
        Some(CertState::Ready {
            not_before,
            not_after,
            ..
        }) => (true, Some((*not_before, *not_after))),
        _ => (false, None),
    };
    let time = |k: &str| {
        annotation(k)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.to_utc())
    };
    let renew_at = time(RENEW_AT_ANNOTATION)
        .or_else(|| lifetime.map(|(nb, na)| schedule::renew_at(nb, na, None, 0.0)));
    let issued = schedule::Issued {
        usable,
        issued_at: time(ISSUED_AT_ANNOTATION),
        renew_at,
        renewed_for: annotation(RENEWED_FOR_ANNOTATION),
    };
    let min = chrono::TimeDelta::from_std(min_interval).unwrap_or(chrono::TimeDelta::hours(1));
    schedule::need(now, issued, asked, min)
}

/// Where a domain's order stands, for status when no certificate is served yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Running,
    Failed { message: String, retry_in: Duration },
}

#[derive(Default)]
struct Job {
    running: bool,
    done_at: Option<Instant>,
    backoff: Option<Backoff>,
    retry_at: Option<Instant>,
    error: Option<String>,
    waiters: Vec<ObjectRef<HTTPDomainMapping>>,
}

pub struct Issuer {
    cfg: AcmeConfig,
    /// Where the account and the issued Secrets live.
    namespace: String,
    client: kube::Client,
    challenges: Arc<dyn ChallengeStore>,
    account: tokio::sync::Mutex<Option<Orders>>,
    jobs: Mutex<HashMap<String, Job>>,
    slots: Semaphore,
    /// Orders of the last hour (`max_orders_per_hour`).
    budget: Mutex<schedule::Budget>,
    /// Whether a domain is still held by the mapping asking, checked when its order starts.
    mappings: Arc<dyn crate::store::MappingStore>,
    wake: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
    recorder: Recorder,
    metrics: Metrics,
}

/// What an [`Issuer`] works with.
pub struct IssuerParts {
    pub cfg: AcmeConfig,
    /// Where the account and the issued Secrets live.
    pub namespace: String,
    pub client: kube::Client,
    pub challenges: Arc<dyn ChallengeStore>,
    pub mappings: Arc<dyn crate::store::MappingStore>,
    /// Wakes the mappings waiting for an order.
    pub wake: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

impl Issuer {
    pub fn new(p: IssuerParts) -> Self {
        Self {
            budget: Mutex::new(schedule::Budget::new(p.cfg.max_orders_per_hour)),
            cfg: p.cfg,
            namespace: p.namespace,
            client: p.client,
            challenges: p.challenges,
            account: tokio::sync::Mutex::new(None),
            jobs: Mutex::new(HashMap::new()),
            slots: Semaphore::new(MAX_CONCURRENT_ORDERS),

            mappings: p.mappings,
            wake: p.wake,
            recorder: p.recorder,
            metrics: p.metrics,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Secret holding `domain`'s issued certificate, if there is one for it.
    pub async fn issued(&self, domain: &str) -> Result<Option<Secret>, kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret = api.get_opt(&secret_name(domain)).await?;
        // A Secret of that name for another domain (or not ours) is not served.
        Ok(secret.filter(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DOMAIN_ANNOTATION))
                .is_some_and(|d| d == domain)
        }))
    }

    /// Starts an order for `domain` for `mapping` unless one runs, or the last one failed and
    /// its pause has not passed; says where it stands.
    /// The least time between two orders for one domain.
    pub fn min_reorder_interval(&self) -> Duration {
        self.cfg.min_reorder_interval.get()
    }

    /// Starts an order for `domain` for `mapping` (whose store records carry `source`) unless
    /// one runs, one just succeeded, or the last one failed and its pause has not passed; says
    /// where it stands.
    pub fn start(
        self: &Arc<Self>,
        domain: &str,
        need: Need,
        asked: Option<String>,
        source: String,
        mapping: &HTTPDomainMapping,
    ) -> Progress {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= MAX_JOBS {
            let now = Instant::now();
            jobs.retain(|_, j| {
                j.running
                    || j.retry_at.is_some_and(|at| at > now)
                    || j.done_at.is_some_and(|at| now < at + AFTER_SUCCESS)
            });
        }
        let job = jobs.entry(domain.to_string()).or_default();
        let me = ObjectRef::from_obj(mapping);
        if !job.waiters.contains(&me) && job.waiters.len() < MAX_WAITERS {
            job.waiters.push(me);
        }
        let now = Instant::now();
        let settle = AFTER_SUCCESS.min(self.cfg.min_reorder_interval.get());
        if job.running || job.done_at.is_some_and(|at| now < at + settle) {
            return Progress::Running;
        }
        if let Some(at) = job.retry_at
            && now < at
        {
            return Progress::Failed {
                message: job.error.clone().unwrap_or_default(),
                retry_in: at - now,
            };
        }
        job.running = true;
        let reference = mapping.object_ref(&());
        tokio::spawn(
            self.clone()
                .run(domain.to_string(), need, asked, source, reference),
        );
        Progress::Running
    }

    /// Whether `domain` is still held by the mapping whose records carry `source`.
    async fn still_held(&self, domain: &str, source: &str) -> Result<bool, AcmeError> {
        let Ok(host) = crate::domain::Hostname::parse(domain) else {
            return Ok(false);
        };
        Ok(self
            .mappings
            .get_by_domain(&host)
            .await?
            .is_some_and(|m| m.source.as_deref() == Some(source)))
    }

    async fn run(
        self: Arc<Self>,
        domain: String,
        need: Need,
        asked: Option<String>,
        source: String,
        reference: ObjectReference,
    ) {
        let _slot = self.slots.acquire().await;
        // Queued behind other orders: the domain may have moved on meanwhile.
        match self.still_held(&domain, &source).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(domain = %domain, "the domain is no longer held by the mapping that asked; no order");
                let waiters = {
                    let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
                    jobs.remove(&domain).map(|j| j.waiters).unwrap_or_default()
                };
                for w in waiters {
                    let _ = self.wake.send(w);
                }
                return;
            }
            Err(e) => {
                self.finish(&domain, Err(e), Instant::now(), &reference)
                    .await;
                return;
            }
        }
        let spent = self
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spend(Instant::now());
        if let Err(wait) = spent {
            let e = AcmeError::Failed(format!(
                "this controller's ACME budget of {} orders per hour (controller.acme.max_orders_per_hour) is spent",
                self.cfg.max_orders_per_hour
            ));
            self.finish_after(&domain, Err(e), Instant::now(), &reference, Some(wait))
                .await;
            return;
        }
        tracing::info!(domain = %domain, reason = need.as_str(), directory = %self.cfg.directory_url, "ordering a certificate");
        self.publish(
            &reference,
            EventType::Normal,
            "Issuing",
            format!(
                "ordering a certificate for {domain} from {} ({})",
                self.cfg.directory_url,
                need.as_str()
            ),
        )
        .await;
        let started = Instant::now();
        let result = self.order(&domain, asked.as_deref()).await;
        self.finish(&domain, result, started, &reference).await;
    }

    async fn finish(
        &self,
        domain: &str,
        result: Result<(DateTime<Utc>, DateTime<Utc>), AcmeError>,
        started: Instant,
        reference: &ObjectReference,
    ) {
        self.finish_after(domain, result, started, reference, None)
            .await
    }

    /// Records how an order ended (`pause`: wait at least this long before the next),
    /// tells the mappings waiting, and publishes the Event.
    async fn finish_after(
        &self,
        domain: &str,
        result: Result<(DateTime<Utc>, DateTime<Utc>), AcmeError>,
        started: Instant,
        reference: &ObjectReference,
        pause: Option<Duration>,
    ) {
        let domain = domain.to_string();
        let waiters = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let job = jobs.entry(domain.clone()).or_default();
            job.running = false;
            let waiters = std::mem::take(&mut job.waiters);
            match &result {
                Ok(_) => {
                    *job = Job {
                        done_at: Some(Instant::now()),
                        ..Job::default()
                    };
                }
                Err(e) => {
                    let retry_max = self.cfg.retry_max.get();
                    let backoff = job
                        .backoff
                        .get_or_insert_with(|| Backoff::between(RETRY_FIRST, retry_max));
                    let wait = e
                        .retry_in(backoff, retry_max)
                        .max(pause.unwrap_or_default());
                    job.retry_at = Some(Instant::now() + wait);
                    job.error = Some(crate::acme::short(&e.to_string()));
                }
            }
            waiters
        };
        self.metrics.acme.observe(&result, started.elapsed());
        match result {
            Ok((not_after, renew_at)) => {
                tracing::info!(domain = %domain, %not_after, %renew_at, took = ?started.elapsed(), "certificate issued");
                self.publish(
                    reference,
                    EventType::Normal,
                    "Issued",
                    format!("issued a certificate for {domain}, valid until {not_after}, renewed from {renew_at}"),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(domain = %domain, error = %e, "ordering a certificate failed");
                self.publish(
                    reference,
                    EventType::Warning,
                    "IssuanceFailed",
                    format!("ordering a certificate for {domain} failed: {e}"),
                )
                .await;
            }
        }
        for w in waiters {
            let _ = self.wake.send(w);
        }
    }

    /// One order: the account, the certificate, its renewal time, the Secret written.
    async fn order(
        &self,
        domain: &str,
        asked: Option<&str>,
    ) -> Result<(DateTime<Utc>, DateTime<Utc>), AcmeError> {
        let orders = self.orders().await?;
        let issued = orders.certificate(domain).await?;
        let renew_at = issued.renew_at;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let mut annotations = serde_json::Map::new();
        annotations.insert(DOMAIN_ANNOTATION.into(), json!(domain));
        annotations.insert(RENEW_AT_ANNOTATION.into(), json!(renew_at.to_rfc3339()));
        annotations.insert(ISSUED_AT_ANNOTATION.into(), json!(Utc::now().to_rfc3339()));
        if let Some(a) = asked.filter(|a| !a.is_empty()) {
            annotations.insert(
                RENEWED_FOR_ANNOTATION.into(),
                json!(schedule::request_id(a)),
            );
        }
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": secret_name(domain),
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "tunnox", "tunnox.net/acme": "certificate"},
                "annotations": annotations,
            },
            "type": super::certificate::TLS_SECRET_TYPE,
            "data": {"tls.crt": b64(&issued.chain_pem), "tls.key": b64(&issued.key_pem)},
        });
        // A Secret of that name for another domain (a hash collision) is not overwritten.
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Ok(Some(existing)) = api.get_opt(&secret_name(domain)).await
            && existing
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DOMAIN_ANNOTATION))
                .is_some_and(|d| d != domain)
        {
            return Err(AcmeError::Failed(format!(
                "Secret {}/{} holds another domain's certificate",
                self.namespace,
                secret_name(domain)
            )));
        }
        self.apply_secret(&secret_name(domain), &secret)
            .await
            .map_err(|e| {
                AcmeError::Failed(format!(
                    "writing Secret {}/{}: {e}",
                    self.namespace,
                    secret_name(domain)
                ))
            })?;
        Ok((issued.cert.not_after, renew_at))
    }

    async fn apply_secret(
        &self,
        name: &str,
        secret: &serde_json::Value,
    ) -> Result<(), kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(secret),
        )
        .await
        .map(|_| ())
    }

    /// The account, restored from its Secret or created into it on first use (again when the
    /// directory changed).
    async fn orders(&self) -> Result<Orders, AcmeError> {
        let mut account = self.account.lock().await;
        if let Some(o) = account.as_ref() {
            return Ok(o.clone());
        }
        let store = SecretAccount {
            api: Api::namespaced(self.client.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            name: self.cfg.account_secret.clone(),
        };
        let orders = crate::acme::account(
            &self.cfg,
            "controller.acme.ca_file",
            &store,
            self.challenges.clone(),
        )
        .await?;
        *account = Some(orders.clone());
        Ok(orders)
    }

    async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        super::publish_event(
            &self.recorder,
            reference,
            "Certificate",
            type_,
            reason,
            note,
        )
        .await
    }
}

/// The account's credentials in a Secret of the controller's namespace.
struct SecretAccount {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

#[async_trait::async_trait]
impl AccountStore for SecretAccount {
    fn describe(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    async fn load(&self) -> Result<Option<String>, String> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(CREDENTIALS_KEY))
            .and_then(|b| String::from_utf8(b.0).ok()))
    }

    async fn save(&self, credentials: &str) -> Result<(), String> {
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "tunnox", "tunnox.net/acme": "account"},
            },
            "type": "Opaque",
            "data": {CREDENTIALS_KEY: base64::engine::general_purpose::STANDARD.encode(credentials.as_bytes())},
        });
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn secret_names_are_stable_valid_and_distinct() {
        let a = secret_name("a.tunnox.net");
        assert_eq!(a, secret_name("a.tunnox.net"));
        assert_ne!(a, secret_name("b.tunnox.net"));
        assert_eq!(a.len(), "tunnox-acme-".len() + 16);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }

    #[test]
    fn assesses_from_the_secret_and_the_mapping() {
        let now = Utc::now();
        let ready = |nb: DateTime<Utc>, na: DateTime<Utc>| CertState::Ready {
            not_before: nb,
            not_after: na,
            issuer: "CA".into(),
            names: vec!["a.tunnox.net".into()],
            note: None,
        };
        let secret = |pairs: &[(&str, String)]| Secret {
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let day = chrono::TimeDelta::days(1);
        let fresh = ready(now - day, now + day * 89);
        let old = ready(now - day * 80, now + day * 10);
        let broken = CertState::NotReady {
            reason: "CertificateExpired",
            message: String::new(),
        };
        let later = secret(&[(RENEW_AT_ANNOTATION, (now + day).to_rfc3339())]);
        let due = secret(&[(RENEW_AT_ANNOTATION, (now - day).to_rfc3339())]);
        let asked = secret(&[
            (RENEW_AT_ANNOTATION, (now + day).to_rfc3339()),
            (RENEWED_FOR_ANNOTATION, schedule::request_id("7")),
        ]);
        // Issued a minute ago: a request or a broken certificate waits.
        let fresh_issue = secret(&[
            (RENEW_AT_ANNOTATION, (now + day).to_rfc3339()),
            (
                ISSUED_AT_ANNOTATION,
                (now - chrono::TimeDelta::minutes(1)).to_rfc3339(),
            ),
        ]);
        let plain = secret(&[]);
        type Case<'a> = (
            Option<&'a Secret>,
            Option<&'a CertState>,
            Option<&'a str>,
            Option<Need>,
        );
        let cases: Vec<Case> = vec![
            (None, None, None, Some(Need::Issue)),
            (Some(&later), Some(&broken), None, Some(Need::Issue)),
            (Some(&later), Some(&fresh), None, None),
            (Some(&due), Some(&fresh), None, Some(Need::Due)),
            // No annotation: two thirds of the lifetime.
            (Some(&plain), Some(&fresh), None, None),
            (Some(&plain), Some(&old), None, Some(Need::Due)),
            (Some(&asked), Some(&fresh), Some("7"), None),
            (Some(&asked), Some(&fresh), Some("8"), Some(Need::Asked)),
            (Some(&later), Some(&fresh), Some("1"), Some(Need::Asked)),
            (Some(&fresh_issue), Some(&fresh), Some("1"), None),
            (Some(&fresh_issue), Some(&broken), None, None),
        ];
        for (s, state, ask, want) in cases {
            assert_eq!(
                assess(s, state, ask, Duration::from_secs(3600), now),
                want,
                "{state:?} {ask:?}"
            );
        }
    }
}
