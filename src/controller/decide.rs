//! Pure deciding for HTTPDomainMapping: what a resource asks for, whether it is allowed, which
//! mapping should wait for which, and the status that tells the user. No I/O.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{HTTPDomainMapping, HTTPDomainMappingStatus, Phase, TargetScheme, TunnelTarget};
use crate::domain::Upstream;
use crate::domain::{
    Declarer, EgressPolicy, Hostname, MAX_GROUP_MEMBERS, MappingSpec, Scheme, SetName, TargetGroup,
};
use crate::store::{Quota, QuotaScope};

/// What the controller enforces beyond the schema.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub base_domains: Vec<Hostname>,
    /// Programmed mappings allowed per namespace / per owner; 0 is unlimited. Counted by the
    /// store in the same step as the claim ([`Policy::quota`]).
    pub per_namespace: usize,
    pub per_owner: usize,
    /// Where targets may point, with the proxies' own listeners as far as the configuration
    /// tells them.
    pub egress: EgressPolicy,
    /// This cluster's identity in record sources (`controller.cluster_id`).
    pub cluster_id: String,
}

impl Policy {
    /// The store quota of one create: a namespace of this cluster is one source group.
    pub fn quota(&self) -> Quota {
        Quota {
            per_group: self.per_namespace,
            per_owner: self.per_owner,
        }
    }
}

/// A mapping that may be programmed: the store spec and what status shows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub spec: MappingSpec,
    pub full_domain: Hostname,
    pub target: String,
    pub set: String,
    /// Something the user should know although the mapping is valid (shown in `Accepted`).
    pub note: Option<String>,
    /// With `spec.tls`: the certificate's state (the record's `tls` is in `spec`).
    pub certificate: Option<super::certificate::CertState>,
}

/// Why a mapping is not programmed (and holds no claim).
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    Rejected {
        reason: &'static str,
        message: String,
    },
    Pending {
        reason: &'static str,
        message: String,
    },
    Expired {
        full_domain: Option<Hostname>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Program(Box<Plan>),
    Hold(Hold),
}

/// `k8s:<cluster>/<namespace>/<name>`: the store record's `source` for a resource. The cluster
/// keeps two clusters that share one Redis from taking each other's records for their own.
pub fn source_of(cluster: &str, namespace: &str, name: &str) -> String {
    format!("k8s:{cluster}/{namespace}/{name}")
}

/// `k8s:<namespace>/<name>`: the source written before sources named their cluster. A record in
/// this form is taken over by the first controller that rewrites it with a compare-and-set
/// update (docs/controller.md, "Cluster identity").
pub fn legacy_source_of(namespace: &str, name: &str) -> String {
    format!("k8s:{namespace}/{name}")
}

/// True for a source in the form of [`legacy_source_of`].
pub fn is_legacy_source(source: &str) -> bool {
    source
        .strip_prefix("k8s:")
        .is_some_and(|rest| rest.matches('/').count() == 1)
}

/// Who holds a domain, for `claimedBy`: `namespace/name` for a resource of this cluster,
/// `cluster/namespace/name` for one of another cluster; other sources as they are.
pub fn holder_display(source: Option<&str>, holder_id: &str, my_cluster: &str) -> String {
    match source {
        Some(s) => {
            let rest = s.strip_prefix("k8s:").unwrap_or(s);
            rest.strip_prefix(my_cluster)
                .and_then(|r| r.strip_prefix('/'))
                .filter(|r| r.contains('/'))
                .unwrap_or(rest)
                .to_string()
        }
        None => holder_id.to_string(),
    }
}

/// What resync does with a record no resource of this cluster wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphan {
    /// Not ours: another cluster's, or not from Kubernetes at all.
    Keep,
    /// Legacy form (no cluster), first seen orphaned: another cluster sharing the store may
    /// still take it over; look again next pass.
    Suspect,
    Delete,
}

/// Resync's rule for a record whose `source` no resource of this cluster claims: only this
/// cluster's records are deleted; a legacy one only when it was already `Suspect` last pass.
pub fn orphan(source: &str, my_cluster: &str, suspected_last_pass: bool) -> Orphan {
    if is_legacy_source(source) {
        return if suspected_last_pass {
            Orphan::Delete
        } else {
            Orphan::Suspect
        };
    }
    match source
        .strip_prefix("k8s:")
        .and_then(|r| r.strip_prefix(my_cluster))
    {
        Some(rest) if rest.starts_with('/') => Orphan::Delete,
        _ => Orphan::Keep,
    }
}

/// The status message of a quota refusal, naming the setting and its value.
pub fn quota_message(scope: &QuotaScope, count: u64, limit: usize, namespace: &str) -> String {
    match scope {
        QuotaScope::Group(_) => format!(
            "namespace {namespace} already has {count} mappings (controller.quota.per_namespace: {limit})"
        ),
        QuotaScope::Owner(owner) => format!(
            "owner {owner} already has {count} mappings (controller.quota.per_owner: {limit})"
        ),
    }
}

/// The full domain a resource asks for, if it is a valid hostname.
pub fn full_domain(hdm: &HTTPDomainMapping) -> Option<Hostname> {
    Hostname::join(&hdm.spec.subdomain, &hdm.spec.base_domain).ok()
}

/// Decides what a mapping resource should become.
///
/// `members` are the accepted TunnelSets a tunnel target reaches (looked up by the caller: the
/// client's credential in the store, or a group's members in the mapping's namespace); empty
/// when there is none or the target is no tunnel.
pub fn evaluate(
    hdm: &HTTPDomainMapping,
    policy: &Policy,
    members: &[TunnelClient],
    now: DateTime<Utc>,
) -> Verdict {
    let spec = &hdm.spec;
    let ns = hdm.metadata.namespace.as_deref().unwrap_or("default");
    let reject = |reason, message: String| Verdict::Hold(Hold::Rejected { reason, message });

    let base = match Hostname::parse(&spec.base_domain) {
        Ok(b) => b,
        Err(e) => return reject("InvalidDomain", format!("spec.baseDomain: {e}")),
    };
    if !policy.base_domains.contains(&base) {
        let allowed: Vec<&str> = policy.base_domains.iter().map(Hostname::as_str).collect();
        return reject(
            "BaseDomainNotAllowed",
            format!(
                "spec.baseDomain {base} is not allowed here; allowed: {}",
                allowed.join(", ")
            ),
        );
    }
    let full = match Hostname::join(&spec.subdomain, base.as_str()) {
        Ok(f) => f,
        Err(e) => {
            return reject(
                "InvalidDomain",
                format!("spec.subdomain {:?}: {e}", spec.subdomain),
            );
        }
    };
    if let Some(at) = &spec.expires_at
        && at.0.as_millisecond() <= now.timestamp_millis()
    {
        return Verdict::Hold(Hold::Expired {
            full_domain: Some(full),
        });
    }
    let target = &spec.target;
    let (field, host, port, display) = match (&target.service, &target.address, &target.tunnel) {
        (Some(s), None, None) => {
            let host = format!("{}.{ns}.svc.{}", s.name, policy.egress.cluster_domain());
            let display = format!("{host}:{}", s.port);
            ("spec.target.service", host, s.port, display)
        }
        (None, Some(a), None) => (
            "spec.target.address",
            a.host.clone(),
            a.port,
            format!("{}:{}", a.host, a.port),
        ),
        (None, None, Some(_)) if target.tls.is_some() || target.protocol.is_some() => {
            return reject(
                "InvalidTarget",
                "spec.target.protocol and spec.target.tls apply to service and address targets, not to tunnels".into(),
            );
        }
        (None, None, Some(t)) => return tunnel_verdict(hdm, policy, t, members, full, base),
        _ => {
            return reject(
                "InvalidTarget",
                "spec.target: exactly one of service, address or tunnel must be set".into(),
            );
        }
    };
    let Some(port) = u16::try_from(port).ok().filter(|p| *p != 0) else {
        return reject(
            "InvalidTarget",
            format!("spec.target port {port} is outside 1-65535"),
        );
    };
    // A Service target names this namespace by construction; it is checked too, so that
    // `egress.deny` host patterns apply to it as well.
    if let Err(refusal) = policy
        .egress
        .check_declared(&host, port, Some(ns), Declarer::Tenant)
    {
        return reject("EgressDenied", format!("{field}: {refusal}"));
    }
    let placement = match &spec.placement {
        Some(p) => match SetName::new(&p.business, &p.region) {
            Ok(s) => Some(s),
            Err(e) => return reject("InvalidPlacement", format!("spec.placement: {e}")),
        },
        None => None,
    };
    let store_spec = store_spec(
        hdm,
        policy,
        &full,
        base,
        None,
        None,
        host,
        port,
        placement.clone(),
    );
    if let Err(e) = store_spec.validate() {
        return reject("InvalidSpec", e.to_string());
    }
    let tls_target = store_spec.target_scheme == Scheme::Https
        || store_spec.upstream.protocol == crate::domain::Protocol::H2;
    let target_tls = target.tls.clone().unwrap_or_default();
    if target_tls.ca_secret_name.is_some() && !tls_target {
        return reject(
            "InvalidTarget",
            "spec.target.tls.caSecretName applies to TLS targets (spec.scheme https or spec.target.protocol h2)".into(),
        );
    }
    let note = target_tls.insecure_skip_verify.then(|| {
        "spec.target.tls.insecureSkipVerify: the target's certificate is not verified".to_string()
    });
    Verdict::Program(Box::new(Plan {
        spec: store_spec,
        full_domain: full,
        target: display,
        set: placement
            .map(|p| p.to_string())
            .unwrap_or_else(|| "any".into()),
        note,
        certificate: None,
    }))
}

/// The accepted TunnelSet of a client, as a tunnel target needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelClient {
    pub client_id: String,
    /// Its placement (the proxy set holding the client's sessions).
    pub placement: Option<SetName>,
    /// `namespace/name` of the TunnelSet, for messages.
    pub holder: String,
}

/// The record's spec; `validate` is the caller's.
#[allow(clippy::too_many_arguments)]
fn store_spec(
    hdm: &HTTPDomainMapping,
    policy: &Policy,
    full: &Hostname,
    base: Hostname,
    target_client_id: Option<String>,
    target_group: Option<TargetGroup>,
    host: String,
    port: u16,
    placement: Option<SetName>,
) -> MappingSpec {
    let spec = &hdm.spec;
    let ns = hdm.metadata.namespace.as_deref().unwrap_or("default");
    let name = hdm.metadata.name.as_deref().unwrap_or("");
    MappingSpec {
        subdomain: full.as_str()[..full.as_str().len() - base.as_str().len() - 1].to_string(),
        base_domain: base,
        target_client_id,
        target_group,
        target_host: host,
        target_port: port,
        target_scheme: match spec.scheme {
            TargetScheme::Http => Scheme::Http,
            TargetScheme::Https => Scheme::Https,
        },
        owner_user_id: spec.owner.as_ref().map(|o| o.user_id.clone()),
        placement,
        source: Some(source_of(&policy.cluster_id, ns, name)),
        expires_at: spec
            .expires_at
            .as_ref()
            .and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond())),
        description: spec.description.clone(),
        custom_headers: spec.custom_headers.clone(),
        enable_https: spec.tls.is_some(),
        // The certificate is decided by the reconciler (it reads the Secret).
        tls: None,
        // The CA (from a Secret) is the reconciler's too.
        upstream: Upstream {
            protocol: spec.target.protocol.unwrap_or_default(),
            ca_pem: None,
            insecure_skip_verify: spec
                .target
                .tls
                .as_ref()
                .is_some_and(|t| t.insecure_skip_verify),
        },
    }
}

/// A tunnel target: served once its client's TunnelSet is accepted, with that TunnelSet's
/// placement; a group target once one TunnelSet of the mapping's namespace serving the group is,
/// with its members' placement when they share one. No egress check: `host:port` is reached by
/// the agent from its own network, and the agent's allow-list is what guards it; only the syntax
/// is checked here.
fn tunnel_verdict(
    hdm: &HTTPDomainMapping,
    policy: &Policy,
    t: &TunnelTarget,
    members: &[TunnelClient],
    full: Hostname,
    base: Hostname,
) -> Verdict {
    let reject = |message: String| {
        Verdict::Hold(Hold::Rejected {
            reason: "InvalidTarget",
            message,
        })
    };
    let host_ok = t.host.parse::<std::net::IpAddr>().is_ok()
        || Hostname::parse(&t.host).is_ok_and(|h| h.as_str() == t.host);
    if !host_ok {
        return reject(format!(
            "spec.target.tunnel.host {:?} is not a lower-case hostname or an IP address",
            t.host
        ));
    }
    let Some(port) = u16::try_from(t.port).ok().filter(|p| *p != 0) else {
        return reject(format!(
            "spec.target.tunnel.port {} is outside 1-65535",
            t.port
        ));
    };
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    let ignored = |what: String| {
        hdm.spec.placement.as_ref().map(|p| {
            format!(
                "spec.placement {}.{} is ignored for a tunnel target: {what}",
                p.business, p.region
            )
        })
    };
    let ns = hdm.metadata.namespace.as_deref().unwrap_or("default");
    // A tunnel reaches into its agent's network: only mappings of the TunnelSet's own namespace
    // may send traffic through it.
    let own_namespace = |m: &&TunnelClient| m.holder.split('/').next() == Some(ns);
    let (client_id, group, placement, target, note) = match (&t.client_id, &t.group) {
        (Some(client_id), None) => {
            if t.balance.is_some() {
                return reject("spec.target.tunnel.balance applies to a group only".into());
            }
            let Some(client) = members.iter().find(|m| &m.client_id == client_id) else {
                return Verdict::Hold(Hold::Pending {
                    reason: "TunnelSetNotFound",
                    message: format!(
                        "no accepted TunnelSet has clientId {client_id}; the mapping is programmed once one is"
                    ),
                });
            };
            if !own_namespace(&client) {
                return Verdict::Hold(Hold::Pending {
                    reason: "TunnelSetInOtherNamespace",
                    message: format!(
                        "clientId {client_id} is held by TunnelSet {}; a mapping reaches only the tunnel clients of its own namespace {ns}",
                        client.holder
                    ),
                });
            }
            let set = set_label(client.placement.as_ref());
            (
                Some(client_id.clone()),
                None,
                client.placement.clone(),
                format!("tunnel:{client_id}/{host}:{port}"),
                ignored(format!(
                    "TunnelSet {} places client {client_id} in {set}",
                    client.holder
                )),
            )
        }
        (None, Some(g)) => {
            let members: Vec<&TunnelClient> = members.iter().filter(own_namespace).collect();
            if members.is_empty() {
                return Verdict::Hold(Hold::Pending {
                    reason: "TunnelGroupEmpty",
                    message: format!(
                        "no accepted TunnelSet in namespace {ns} lists group {g} in spec.groups; the mapping is programmed once one does"
                    ),
                });
            }
            if members.len() > MAX_GROUP_MEMBERS {
                return Verdict::Hold(Hold::Rejected {
                    reason: "TunnelGroupTooLarge",
                    message: format!(
                        "group {g} has {} members in namespace {ns}; at most {MAX_GROUP_MEMBERS}",
                        members.len()
                    ),
                });
            }
            let mut clients: Vec<String> = members.iter().map(|m| m.client_id.clone()).collect();
            clients.sort();
            clients.dedup();
            // One set serves the group when its members agree; otherwise any proxy may take the
            // request and forwards it to the node holding the chosen member's session.
            let first = members[0].placement.clone();
            let shared = members.iter().all(|m| m.placement == first);
            let placement = if shared { first } else { None };
            let n = clients.len();
            (
                None,
                Some(TargetGroup {
                    name: format!("{ns}/{g}"),
                    clients,
                    balance: t.balance.unwrap_or_default(),
                }),
                placement.clone(),
                format!("tunnel-group:{g}({n})/{host}:{port}"),
                ignored(format!(
                    "group {g} is served where its members are ({})",
                    set_label(placement.as_ref())
                )),
            )
        }
        _ => {
            return reject(
                "spec.target.tunnel: exactly one of clientId or group must be set".into(),
            );
        }
    };
    let set = set_label(placement.as_ref());
    let store_spec = store_spec(
        hdm,
        policy,
        &full,
        base,
        client_id,
        group,
        t.host.clone(),
        port,
        placement,
    );
    if let Err(e) = store_spec.validate() {
        return Verdict::Hold(Hold::Rejected {
            reason: "InvalidSpec",
            message: e.to_string(),
        });
    }
    Verdict::Program(Box::new(Plan {
        spec: store_spec,
        full_domain: full,
        target,
        set,
        note,
        certificate: None,
    }))
}

fn set_label(placement: Option<&SetName>) -> String {
    placement
        .map(ToString::to_string)
        .unwrap_or_else(|| "any".into())
}

/// Among mappings that want one domain and do not hold it, the oldest goes first: true when
/// `other` should be served before `me` (older creation, then namespace/name).
pub fn waits_behind(me: &HTTPDomainMapping, other: &HTTPDomainMapping) -> bool {
    let key = |h: &HTTPDomainMapping| {
        (
            h.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
                .unwrap_or(i64::MAX),
            h.metadata.namespace.clone().unwrap_or_default(),
            h.metadata.name.clone().unwrap_or_default(),
        )
    };
    key(other) < key(me)
}

/// The result of one reconcile, as the status will show it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Active {
        mapping_id: String,
        version: u64,
        plan: Plan,
    },
    Conflict {
        plan: Plan,
        holder: String,
    },
    Held(Hold),
}

impl Outcome {
    pub fn phase(&self) -> Phase {
        match self {
            Self::Active { .. } => Phase::Active,
            Self::Conflict { .. } => Phase::Conflict,
            Self::Held(Hold::Rejected { .. }) => Phase::Rejected,
            Self::Held(Hold::Pending { .. }) => Phase::Pending,
            Self::Held(Hold::Expired { .. }) => Phase::Expired,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Active { .. } => "active",
            Self::Conflict { .. } => "conflict",
            Self::Held(Hold::Rejected { .. }) => "rejected",
            Self::Held(Hold::Pending { .. }) => "pending",
            Self::Held(Hold::Expired { .. }) => "expired",
        }
    }
}

pub(crate) fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
    previous: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // Keep the transition time while nothing about the condition changed.
    let last = previous
        .iter()
        .find(|c| c.type_ == kind && c.status == status && c.reason == reason)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: kind.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

fn valid_message(plan: &Plan) -> String {
    match &plan.note {
        Some(note) => format!("the mapping is valid; {note}"),
        None => "the mapping is valid".into(),
    }
}

/// The status for an outcome; `previous` keeps condition transition times. `stats` is left out:
/// the proxies own it.
pub fn status(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&HTTPDomainMappingStatus>,
    now: DateTime<Utc>,
) -> HTTPDomainMappingStatus {
    let now = Time(
        jiff::Timestamp::from_millisecond(now.timestamp_millis())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    );
    let prev: &[Condition] = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let mut s = HTTPDomainMappingStatus {
        phase: outcome.phase(),
        observed_generation: generation,
        ..Default::default()
    };
    let (accepted, ready) = match outcome {
        Outcome::Active {
            mapping_id,
            version,
            plan,
        } => {
            s.mapping_id = Some(mapping_id.clone());
            s.version = i64::try_from(*version).ok();
            s.full_domain = Some(plan.full_domain.to_string());
            s.target = Some(plan.target.clone());
            s.set = Some(plan.set.clone());
            (
                (true, "Valid", valid_message(plan)),
                (
                    true,
                    "Programmed",
                    format!("{} is served", plan.full_domain),
                ),
            )
        }
        Outcome::Conflict { plan, holder } => {
            s.full_domain = Some(plan.full_domain.to_string());
            s.target = Some(plan.target.clone());
            s.set = Some(plan.set.clone());
            s.claimed_by = Some(holder.clone());
            (
                (true, "Valid", valid_message(plan)),
                (
                    false,
                    "DomainClaimed",
                    format!(
                        "{} is claimed by {holder}; this mapping takes over when it is released",
                        plan.full_domain
                    ),
                ),
            )
        }
        Outcome::Held(Hold::Rejected { reason, message }) => (
            (false, *reason, message.clone()),
            (false, *reason, message.clone()),
        ),
        Outcome::Held(Hold::Pending { reason, message }) => (
            (true, "Valid", "the mapping is valid".into()),
            (false, *reason, message.clone()),
        ),
        Outcome::Held(Hold::Expired { full_domain }) => {
            s.full_domain = full_domain.as_ref().map(ToString::to_string);
            (
                (true, "Valid", "the mapping is valid".into()),
                (
                    false,
                    "Expired",
                    "spec.expiresAt has passed; the domain was released".into(),
                ),
            )
        }
    };
    s.conditions = vec![
        condition(
            "Accepted", accepted.0, accepted.1, accepted.2, generation, &now, prev,
        ),
        condition("Ready", ready.0, ready.1, ready.2, generation, &now, prev),
    ];
    let cert = match outcome {
        // Only what is served: a mapping in Conflict serves nothing.
        Outcome::Active { plan, .. } => plan.certificate.as_ref(),
        Outcome::Conflict { .. } | Outcome::Held(_) => None,
    };
    if let Some(cert) = cert {
        use super::certificate::CertState;
        let time = |t: &DateTime<Utc>| {
            jiff::Timestamp::from_millisecond(t.timestamp_millis())
                .ok()
                .map(Time)
        };
        let (ok, reason, message, status) = match cert {
            CertState::Ready {
                not_after,
                issuer,
                names,
                note,
                ..
            } => (
                true,
                "Ready",
                match note {
                    Some(n) => format!("served until {not_after}, issued by {issuer}; {n}"),
                    None => format!("served until {not_after}, issued by {issuer}"),
                },
                crate::crd::CertificateStatus {
                    state: "Ready".into(),
                    not_after: time(not_after),
                    issuer: Some(issuer.clone()),
                    names: names.clone(),
                },
            ),
            CertState::NotReady { reason, message } => (
                false,
                *reason,
                message.clone(),
                crate::crd::CertificateStatus {
                    state: (*reason).to_string(),
                    ..Default::default()
                },
            ),
        };
        s.conditions.push(condition(
            "CertificateReady",
            ok,
            reason,
            message,
            generation,
            &now,
            prev,
        ));
        s.certificate = Some(status);
    }
    s
}

/// For a placed mapping or TunnelSet, given the sets with a healthy proxy (`None`: the
/// registry was not read yet): the set serving it now, and the `ServedByHome` condition —
/// True at home; False with `DisasterRecovery` while the DR set serves it, or `NoHealthySet`
/// while nothing does (its requests get 503). `None` without a placement.
pub fn serving(
    placement: Option<&SetName>,
    healthy: Option<&[SetName]>,
) -> Option<(Option<SetName>, bool, &'static str, String)> {
    let (placement, healthy) = (placement?, healthy?);
    let serving = crate::domain::serving_set(placement, healthy.iter());
    Some(match &serving {
        Some(set) if set == placement => (
            serving.clone(),
            true,
            "HomeSetHealthy",
            format!("served by its home set {placement}"),
        ),
        Some(set) => (
            serving.clone(),
            false,
            "DisasterRecovery",
            format!("{placement} has no healthy proxy: served by the DR set {set}"),
        ),
        None => (
            None,
            false,
            "NoHealthySet",
            format!(
                "neither {placement} nor {} has a healthy proxy: requests get 503",
                placement.dr()
            ),
        ),
    })
}

/// The most lagging proxies a `Ready` message names (the count says the rest).
const NAMED_BEHIND: usize = 5;

/// For a programmed (`Active`) mapping: `Ready` and `proxies` from the tally of its version
/// against the healthy proxies of its serving set (docs/controller.md "Ready means served").
/// `Ready` stays as [`status`] decided it only when all of them, at least one, applied it. A
/// mapping that was served keeps the count it showed, so the fleet growing or shrinking writes
/// no status. `tally` `None` (the registry unread): what was shown stays.
pub fn add_served(
    s: &mut HTTPDomainMappingStatus,
    tally: Option<&super::served::Tally>,
    previous: Option<&HTTPDomainMappingStatus>,
    now: DateTime<Utc>,
) {
    if s.phase != Phase::Active {
        return;
    }
    // Served before at this very version (a new version is tallied anew).
    let ready_before = |p: &HTTPDomainMappingStatus| {
        p.phase == Phase::Active
            && p.version == s.version
            && p.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let was_served = previous.filter(|p| ready_before(p));
    let domain = s.full_domain.as_deref().unwrap_or_default();
    let version = s.version.unwrap_or_default();
    let (reason, message) = match tally {
        None => {
            s.proxies = previous.and_then(|p| p.proxies.clone());
            if was_served.is_some() {
                return;
            }
            (
                "ProxiesUnknown",
                format!(
                    "{domain} is programmed (version {version}); the node registry was not read yet"
                ),
            )
        }
        Some(t) if t.complete() => {
            s.proxies = match was_served.filter(|p| p.proxies.is_some()) {
                Some(p) => p.proxies.clone(),
                None => Some(t.shown()),
            };
            return;
        }
        Some(t) => {
            s.proxies = Some(t.shown());
            behind(t, domain, version)
        }
    };
    let now = Time(
        jiff::Timestamp::from_millisecond(now.timestamp_millis())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    );
    let prev: &[Condition] = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let ready = condition(
        "Ready",
        false,
        reason,
        message,
        s.observed_generation,
        &now,
        prev,
    );
    for c in s.conditions.iter_mut().filter(|c| c.type_ == "Ready") {
        *c = ready.clone();
    }
}

/// `Ready`'s reason and message while some healthy proxy has not applied a version, or none is
/// registered.
fn behind(t: &super::served::Tally, domain: &str, version: i64) -> (&'static str, String) {
    if t.total == 0 {
        return (
            "NoHealthyProxy",
            format!(
                "{domain} is programmed (version {version}) but no healthy proxy is registered to serve it"
            ),
        );
    }
    let scope = match &t.scope {
        Some(set) => format!("proxies of {set}"),
        None => "proxies".to_string(),
    };
    let mut names: Vec<String> = t
        .behind
        .iter()
        .take(NAMED_BEHIND)
        .map(|(node, at)| format!("{node} (at version {at})"))
        .collect();
    if t.behind.len() > NAMED_BEHIND {
        names.push(format!("{} more", t.behind.len() - NAMED_BEHIND));
    }
    (
        "ProxiesBehind",
        format!(
            "{domain} is programmed (version {version}) and applied by {} {scope}; waiting for {}",
            t.shown(),
            names.join(", ")
        ),
    )
}

/// Adds [`serving`]'s answer to a mapping's status (kept as it was when the registry is unread).
pub fn add_serving(
    s: &mut HTTPDomainMappingStatus,
    placement: Option<&SetName>,
    healthy: Option<&[SetName]>,
    previous: Option<&HTTPDomainMappingStatus>,
    now: DateTime<Utc>,
) {
    let generation = s.observed_generation;
    let shown = previous.map(|p| (p.serving_set.as_deref(), p.conditions.as_slice()));
    serving_into(
        (&mut s.serving_set, &mut s.conditions),
        generation,
        placement,
        healthy,
        shown,
        now,
    );
}

/// [`serving`]'s answer into a status's `servingSet` and conditions, for mappings and
/// TunnelSets alike; `shown`: what the previous status showed (kept while the registry is
/// unread).
pub fn serving_into(
    (serving_set, conditions): (&mut Option<String>, &mut Vec<Condition>),
    generation: Option<i64>,
    placement: Option<&SetName>,
    healthy: Option<&[SetName]>,
    shown: Option<(Option<&str>, &[Condition])>,
    now: DateTime<Utc>,
) {
    const KIND: &str = "ServedByHome";
    conditions.retain(|c| c.type_ != KIND);
    let prev: &[Condition] = shown.map(|(_, c)| c).unwrap_or(&[]);
    let Some((set, ok, reason, message)) = serving(placement, healthy) else {
        *serving_set = None;
        if placement.is_some() {
            // Not read yet: what was shown stays.
            *serving_set = shown.and_then(|(s, _)| s).map(str::to_string);
            conditions.extend(prev.iter().filter(|c| c.type_ == KIND).cloned());
        }
        return;
    };
    let now = Time(
        jiff::Timestamp::from_millisecond(now.timestamp_millis())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    );
    *serving_set = set.map(|s| s.to_string());
    conditions.push(condition(KIND, ok, reason, message, generation, &now, prev));
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
