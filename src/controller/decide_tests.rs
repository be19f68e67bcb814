//! Table tests for `decide`.
use super::*;
use crate::crd::{HTTPDomainMappingSpec, Owner, Target, TunnelTarget};
use kube::api::ObjectMeta;

fn hdm(ns: &str, name: &str, sub: &str, base: &str, target: Target) -> HTTPDomainMapping {
    let mut h = HTTPDomainMapping::new(name, HTTPDomainMappingSpec::new(sub, base, target));
    h.metadata.namespace = Some(ns.into());
    h
}

fn service(name: &str, port: i32) -> Target {
    Target::service(name, port)
}

fn address(host: &str, port: i32) -> Target {
    Target::address(host, port)
}

fn policy() -> Policy {
    Policy {
        base_domains: vec![Hostname::parse("tunnox.net").unwrap()],
        per_namespace: 2,
        per_owner: 1,
    }
}

#[test]
fn evaluates_resources() {
    let now = Utc::now();
    let past = Time(jiff::Timestamp::from_millisecond(now.timestamp_millis() - 1000).unwrap());
    let mut expired = hdm("a", "e", "old", "tunnox.net", address("h", 1));
    expired.spec.expires_at = Some(past);
    let mut owned = hdm("a", "o", "own", "tunnox.net", address("h", 1));
    owned.spec.owner = Some(Owner {
        user_id: "alice".into(),
    });
    let tunnel = Target {
        service: None,
        address: None,
        tunnel: Some(TunnelTarget {
            client_id: Some("laptop".into()),
            group: None,
            host: "localhost".into(),
            port: 3000,
        }),
    };
    // (resource, usage, expected phase-ish label, expected detail)
    let cases: Vec<(HTTPDomainMapping, Usage, &str, &str)> = vec![
        (
            hdm("team", "web", "MyApp", "tunnox.net", service("web", 80)),
            Usage::default(),
            "program",
            "web.team.svc.cluster.local:80",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("10.1.2.3", 8080)),
            Usage::default(),
            "program",
            "10.1.2.3:8080",
        ),
        (
            hdm("a", "x", "x", "evil.com", address("h", 1)),
            Usage::default(),
            "rejected",
            "BaseDomainNotAllowed",
        ),
        (
            hdm("a", "x", "bad_sub", "tunnox.net", address("h", 1)),
            Usage::default(),
            "rejected",
            "InvalidDomain",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("bad host", 1)),
            Usage::default(),
            "rejected",
            "InvalidSpec",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("h", 0)),
            Usage::default(),
            "rejected",
            "InvalidTarget",
        ),
        (
            hdm(
                "a",
                "x",
                "x",
                "tunnox.net",
                Target {
                    service: None,
                    address: None,
                    tunnel: None,
                },
            ),
            Usage::default(),
            "rejected",
            "InvalidTarget",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("h", 1)),
            Usage {
                in_namespace: 2,
                by_owner: 0,
            },
            "rejected",
            "QuotaExceeded",
        ),
        (
            owned.clone(),
            Usage {
                in_namespace: 0,
                by_owner: 1,
            },
            "rejected",
            "QuotaExceeded",
        ),
        (
            owned,
            Usage {
                in_namespace: 1,
                by_owner: 0,
            },
            "program",
            "h:1",
        ),
        (expired, Usage::default(), "expired", "old.tunnox.net"),
        (
            hdm("a", "t", "t", "tunnox.net", tunnel),
            Usage::default(),
            "pending",
            "TunnelNotServed",
        ),
    ];
    for (obj, usage, want, detail) in cases {
        let got = evaluate(&obj, &policy(), usage, now);
        let (label, text) = match &got {
            Verdict::Program(p) => ("program", p.target.clone()),
            Verdict::Hold(Hold::Rejected { reason, .. }) => ("rejected", reason.to_string()),
            Verdict::Hold(Hold::Pending { reason, .. }) => ("pending", reason.to_string()),
            Verdict::Hold(Hold::Expired { full_domain }) => (
                "expired",
                full_domain
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
        };
        assert_eq!((label, text.as_str()), (want, detail), "{:?}", obj.spec);
    }
}

#[test]
fn program_carries_source_and_normalised_domain() {
    let Verdict::Program(plan) = evaluate(
        &hdm("team", "web", "MyApp", "tunnox.net", service("web", 80)),
        &policy(),
        Usage::default(),
        Utc::now(),
    ) else {
        panic!("expected a plan");
    };
    assert_eq!(plan.full_domain.as_str(), "myapp.tunnox.net");
    assert_eq!(plan.spec.source.as_deref(), Some("k8s:team/web"));
    assert_eq!(plan.spec.subdomain, "myapp");
    assert_eq!(plan.set, "any");
    assert_eq!(
        holder_display(plan.spec.source.as_deref(), "hdm_x"),
        "team/web"
    );
    assert_eq!(holder_display(None, "hdm_x"), "hdm_x");
}

#[test]
fn oldest_waits_first() {
    let at = |ms: i64, ns: &str, name: &str| {
        let mut h = hdm(ns, name, "x", "tunnox.net", address("h", 1));
        h.metadata = ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_millisecond(ms).unwrap(),
            )),
            ..Default::default()
        };
        h
    };
    assert!(waits_behind(&at(2000, "b", "x"), &at(1000, "a", "x")));
    assert!(!waits_behind(&at(1000, "a", "x"), &at(2000, "b", "x")));
    // Same second: namespace/name breaks the tie, so exactly one of two goes first.
    assert!(waits_behind(&at(1000, "b", "x"), &at(1000, "a", "x")));
    assert!(!waits_behind(&at(1000, "a", "x"), &at(1000, "b", "x")));
}

#[test]
fn status_reports_conditions_and_keeps_transition_times() {
    let plan = match evaluate(
        &hdm("a", "x", "x", "tunnox.net", address("h", 1)),
        &policy(),
        Usage::default(),
        Utc::now(),
    ) {
        Verdict::Program(p) => p,
        other => panic!("{other:?}"),
    };
    let t0 = Utc::now() - chrono::Duration::seconds(60);
    let conflict = Outcome::Conflict {
        plan: (*plan).clone(),
        holder: "b/y".into(),
    };
    let s1 = status(&conflict, Some(3), None, t0);
    assert_eq!(s1.phase, Phase::Conflict);
    assert_eq!(s1.claimed_by.as_deref(), Some("b/y"));
    let ready = s1.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "DomainClaimed")
    );
    assert_eq!(ready.observed_generation, Some(3));
    // Same outcome later: nothing changes, so the status is equal (no write needed).
    assert_eq!(status(&conflict, Some(3), Some(&s1), Utc::now()), s1);
    let active = Outcome::Active {
        mapping_id: "hdm_1".into(),
        version: 9,
        plan: *plan,
    };
    let s2 = status(&active, Some(3), Some(&s1), Utc::now());
    assert_eq!(s2.phase, Phase::Active);
    assert_eq!(s2.claimed_by, None);
    let accepted = |s: &HTTPDomainMappingStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Accepted")
            .unwrap()
            .last_transition_time
            .clone()
    };
    assert_eq!(accepted(&s2), accepted(&s1), "Accepted did not change");
    let r2 = s2.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(r2.status, "True");
    assert_ne!(r2.last_transition_time, ready.last_transition_time);
}
