//! Table tests for `decide`.
use super::*;
use crate::crd::{HTTPDomainMappingSpec, Target, TunnelTarget};
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
    let rules = |list: &[&str]| {
        list.iter()
            .map(|r| crate::domain::egress::Rule::parse(r).unwrap())
            .collect()
    };
    Policy {
        base_domains: vec![Hostname::parse("tunnox.net").unwrap()],
        per_namespace: 2,
        per_owner: 1,
        // The e2e suite's shape: loopback allowed, yet the proxies' own listeners stay refused.
        egress: EgressPolicy::new(
            rules(&["127.0.0.0/8"]),
            rules(&["*.locked.svc.cluster.local"]),
            "cluster.local",
        )
        .with_own_listeners(
            [
                "0.0.0.0:8080".parse().unwrap(),
                "0.0.0.0:9090".parse().unwrap(),
            ],
            [],
        ),
        cluster_id: "c1".into(),
    }
}

#[test]
fn evaluates_resources() {
    let now = Utc::now();
    let past = Time(jiff::Timestamp::from_millisecond(now.timestamp_millis() - 1000).unwrap());
    let mut expired = hdm("a", "e", "old", "tunnox.net", address("h", 1));
    expired.spec.expires_at = Some(past);
    let tunnel = Target {
        protocol: None,
        tls: None,
        service: None,
        address: None,
        tunnel: Some(TunnelTarget {
            client_id: Some("laptop".into()),
            group: None,
            host: "localhost".into(),
            port: 3000,
            balance: None,
        }),
    };
    // (resource, expected phase-ish label, expected detail)
    let cases: Vec<(HTTPDomainMapping, &str, &str)> = vec![
        (
            hdm("team", "web", "MyApp", "tunnox.net", service("web", 80)),
            "program",
            "web.team.svc.cluster.local:80",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("10.1.2.3", 8080)),
            "program",
            "10.1.2.3:8080",
        ),
        (
            hdm("a", "x", "x", "evil.com", address("h", 1)),
            "rejected",
            "BaseDomainNotAllowed",
        ),
        (
            hdm("a", "x", "bad_sub", "tunnox.net", address("h", 1)),
            "rejected",
            "InvalidDomain",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("bad host", 1)),
            "rejected",
            "InvalidSpec",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("h", 0)),
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
                    protocol: None,
                    tls: None,
                    service: None,
                    address: None,
                    tunnel: None,
                },
            ),
            "rejected",
            "InvalidTarget",
        ),
        // Egress: the proxies' admin and HTTP listeners, the metadata address, another
        // namespace's Service by name, a denied pattern; allowed loopback and own namespace.
        (
            hdm("a", "x", "x", "tunnox.net", address("127.0.0.1", 9090)),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("127.0.0.1", 8080)),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("169.254.169.254", 80)),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("[::1]", 9090)),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("::1", 9090)),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm(
                "a",
                "x",
                "x",
                "tunnox.net",
                address("svc.other-ns.svc.cluster.local", 80),
            ),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm("locked", "x", "x", "tunnox.net", service("db", 5432)),
            "rejected",
            "EgressDenied",
        ),
        (
            hdm(
                "a",
                "x",
                "x",
                "tunnox.net",
                address("svc.a.svc.cluster.local", 80),
            ),
            "program",
            "svc.a.svc.cluster.local:80",
        ),
        (
            hdm("a", "x", "x", "tunnox.net", address("127.0.0.1", 3000)),
            "program",
            "127.0.0.1:3000",
        ),
        (expired, "expired", "old.tunnox.net"),
        (
            hdm("a", "t", "t", "tunnox.net", tunnel),
            "pending",
            "TunnelSetNotFound",
        ),
    ];
    for (obj, want, detail) in cases {
        let got = evaluate(&obj, &policy(), &[], now);
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
fn egress_refusal_names_the_field_and_the_rule() {
    let cases = [
        (
            address("127.0.0.1", 9090),
            "spec.target.address: 127.0.0.1:9090 is one of the proxy's own listeners",
        ),
        (
            address("169.254.169.254", 80),
            "spec.target.address: 169.254.169.254:80 is a link-local address",
        ),
        (
            address("web.other.svc.cluster.local", 80),
            "spec.target.address: web.other.svc.cluster.local:80 names a Service in namespace other",
        ),
        (
            service("db", 5432),
            "spec.target.service: db.locked.svc.cluster.local:5432 is denied by egress.deny entry *.locked.svc.cluster.local",
        ),
    ];
    for (target, want) in cases {
        match evaluate(
            &hdm("locked", "x", "x", "tunnox.net", target),
            &policy(),
            &[],
            Utc::now(),
        ) {
            Verdict::Hold(Hold::Rejected {
                reason: "EgressDenied",
                message,
            }) => assert!(message.starts_with(want), "{message}"),
            other => panic!("{want}: {other:?}"),
        }
    }
}

#[test]
fn program_carries_source_and_normalised_domain() {
    let Verdict::Program(plan) = evaluate(
        &hdm("team", "web", "MyApp", "tunnox.net", service("web", 80)),
        &policy(),
        &[],
        Utc::now(),
    ) else {
        panic!("expected a plan");
    };
    assert_eq!(plan.full_domain.as_str(), "myapp.tunnox.net");
    assert_eq!(plan.spec.source.as_deref(), Some("k8s:c1/team/web"));
    assert_eq!(plan.spec.subdomain, "myapp");
    assert_eq!(plan.set, "any");
}

#[test]
fn sources_name_the_cluster() {
    assert_eq!(source_of("c1", "team", "web"), "k8s:c1/team/web");
    assert_eq!(legacy_source_of("team", "web"), "k8s:team/web");
    for (source, legacy) in [
        ("k8s:team/web", true),
        ("k8s:c1/team/web", false),
        ("config", false),
        ("api/x", false),
    ] {
        assert_eq!(is_legacy_source(source), legacy, "{source}");
    }
    // (source, shown in claimedBy by cluster c1)
    let cases = [
        (Some("k8s:c1/team/web"), "team/web"),
        (Some("k8s:c2/team/web"), "c2/team/web"),
        (Some("k8s:c10/team/web"), "c10/team/web"),
        (Some("k8s:team/web"), "team/web"),
        (Some("k8s:c1/web"), "c1/web"),
        (Some("config"), "config"),
        (None, "hdm_x"),
    ];
    for (source, want) in cases {
        assert_eq!(holder_display(source, "hdm_x", "c1"), want, "{source:?}");
    }
}

#[test]
fn resync_deletes_only_this_clusters_orphans() {
    // (source, suspected last pass, verdict for cluster c1)
    let cases = [
        ("k8s:c1/team/web", false, Orphan::Delete),
        ("k8s:c2/team/web", false, Orphan::Keep),
        ("k8s:c2/team/web", true, Orphan::Keep),
        ("k8s:c10/team/web", false, Orphan::Keep),
        ("k8s:team/web", false, Orphan::Suspect),
        ("k8s:team/web", true, Orphan::Delete),
        ("config", false, Orphan::Keep),
        ("api", true, Orphan::Keep),
    ];
    for (source, suspected, want) in cases {
        assert_eq!(
            orphan(source, "c1", suspected),
            want,
            "{source} {suspected}"
        );
    }
}

#[test]
fn quota_messages_name_the_setting() {
    assert_eq!(
        quota_message(&QuotaScope::Group("k8s:c1/team".into()), 2, 2, "team"),
        "namespace team already has 2 mappings (controller.quota.per_namespace: 2)"
    );
    assert_eq!(
        quota_message(&QuotaScope::Owner("alice".into()), 1, 1, "team"),
        "owner alice already has 1 mappings (controller.quota.per_owner: 1)"
    );
    assert_eq!(
        policy().quota(),
        Quota {
            per_group: 2,
            per_owner: 1
        }
    );
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

/// The plan of a plain valid mapping `a/x` (x.tunnox.net → h:1).
fn programmed_plan() -> Box<Plan> {
    match evaluate(
        &hdm("a", "x", "x", "tunnox.net", address("h", 1)),
        &policy(),
        &[],
        Utc::now(),
    ) {
        Verdict::Program(p) => p,
        other => panic!("{other:?}"),
    }
}

#[test]
fn status_reports_conditions_and_keeps_transition_times() {
    let plan = programmed_plan();
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

fn tunnel(client: Option<&str>, group: Option<&str>, host: &str, port: i32) -> Target {
    Target {
        protocol: None,
        tls: None,
        service: None,
        address: None,
        tunnel: Some(TunnelTarget {
            client_id: client.map(str::to_string),
            group: group.map(str::to_string),
            host: host.into(),
            port,
            balance: None,
        }),
    }
}

#[test]
fn tunnel_targets_wait_for_their_tunnelset_and_take_its_placement() {
    let client = TunnelClient {
        client_id: "laptop".into(),
        placement: Some(SetName::new("novel", "sh").unwrap()),
        holder: "a/laptop".into(),
    };
    let elsewhere = TunnelClient {
        holder: "team/laptop".into(),
        ..client.clone()
    };
    let placed = |mut h: HTTPDomainMapping| {
        h.spec.placement = Some(crate::crd::Placement {
            business: "other".into(),
            region: "bj".into(),
        });
        h
    };
    let t = |target| hdm("a", "t", "t", "tunnox.net", target);
    // (resource, accepted TunnelSet, outcome label, reason or target, message fragment)
    let cases: Vec<(HTTPDomainMapping, Option<&TunnelClient>, &str, &str, &str)> = vec![
        (
            t(tunnel(Some("laptop"), None, "localhost", 3000)),
            Some(&client),
            "program",
            "tunnel:laptop/localhost:3000",
            "",
        ),
        // No egress check: the agent's allow-list guards what it reaches, so loopback, the
        // proxies' own ports and private addresses are the agent's business.
        (
            t(tunnel(Some("laptop"), None, "127.0.0.1", 9090)),
            Some(&client),
            "program",
            "tunnel:laptop/127.0.0.1:9090",
            "",
        ),
        (
            t(tunnel(Some("laptop"), None, "::1", 8080)),
            Some(&client),
            "program",
            "tunnel:laptop/[::1]:8080",
            "",
        ),
        (
            t(tunnel(Some("laptop"), None, "192.168.1.100", 8080)),
            Some(&client),
            "program",
            "tunnel:laptop/192.168.1.100:8080",
            "",
        ),
        (
            placed(t(tunnel(Some("laptop"), None, "localhost", 3000))),
            Some(&client),
            "program",
            "tunnel:laptop/localhost:3000",
            "spec.placement other.bj is ignored for a tunnel target: TunnelSet a/laptop places client laptop in novel.sh",
        ),
        (
            t(tunnel(Some("laptop"), None, "localhost", 3000)),
            None,
            "pending",
            "TunnelSetNotFound",
            "no accepted TunnelSet has clientId laptop",
        ),
        // Another namespace's agent is not this mapping's to use.
        (
            t(tunnel(Some("laptop"), None, "localhost", 3000)),
            Some(&elsewhere),
            "pending",
            "TunnelSetInOtherNamespace",
            "held by TunnelSet team/laptop; a mapping reaches only the tunnel clients of its own namespace a",
        ),
        (
            t(tunnel(Some("laptop"), None, "bad host", 3000)),
            Some(&client),
            "rejected",
            "InvalidTarget",
            "spec.target.tunnel.host \"bad host\"",
        ),
        (
            t(tunnel(Some("laptop"), None, "LocalHost", 3000)),
            Some(&client),
            "rejected",
            "InvalidTarget",
            "spec.target.tunnel.host \"LocalHost\"",
        ),
        (
            t(tunnel(Some("laptop"), None, "localhost", 0)),
            Some(&client),
            "rejected",
            "InvalidTarget",
            "spec.target.tunnel.port 0 is outside 1-65535",
        ),
        (
            t(tunnel(Some("laptop"), None, "localhost", 70000)),
            None,
            "rejected",
            "InvalidTarget",
            "spec.target.tunnel.port 70000",
        ),
        (
            t(tunnel(Some("laptop"), Some("web"), "localhost", 1)),
            Some(&client),
            "rejected",
            "InvalidTarget",
            "exactly one of clientId or group",
        ),
    ];
    for (obj, client, want, detail, fragment) in cases {
        let members: Vec<TunnelClient> = client.into_iter().cloned().collect();
        let got = evaluate(&obj, &policy(), &members, Utc::now());
        let (label, text, message) = match &got {
            Verdict::Program(p) => {
                assert_eq!(p.spec.target_client_id.as_deref(), Some("laptop"));
                assert_eq!(
                    p.spec.placement,
                    client.and_then(|c| c.placement.clone()),
                    "the TunnelSet's placement"
                );
                assert_eq!(p.set, "novel.sh");
                assert_eq!(p.spec.source.as_deref(), Some("k8s:c1/a/t"));
                let s = status(
                    &Outcome::Active {
                        mapping_id: "hdm_1".into(),
                        version: 1,
                        plan: (**p).clone(),
                    },
                    Some(1),
                    None,
                    Utc::now(),
                );
                let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
                assert_eq!(s.target.as_deref(), Some(p.target.as_str()));
                ("program", p.target.clone(), accepted.message.clone())
            }
            Verdict::Hold(Hold::Rejected { reason, message }) => {
                ("rejected", reason.to_string(), message.clone())
            }
            Verdict::Hold(Hold::Pending { reason, message }) => {
                ("pending", reason.to_string(), message.clone())
            }
            other => panic!("{other:?}"),
        };
        assert_eq!((label, text.as_str()), (want, detail), "{:?}", obj.spec);
        assert!(message.contains(fragment), "{message}");
    }
    // The record carries the tunnel's host and port as the target.
    let Verdict::Program(p) = evaluate(
        &t(tunnel(Some("laptop"), None, "localhost", 3000)),
        &policy(),
        std::slice::from_ref(&client),
        Utc::now(),
    ) else {
        panic!()
    };
    assert_eq!(
        (p.spec.target_host.as_str(), p.spec.target_port),
        ("localhost", 3000)
    );
}

#[test]
fn group_targets_list_their_members_and_share_a_placement_only_when_they_agree() {
    let member = |id: &str, set: &str| TunnelClient {
        client_id: id.into(),
        placement: Some(SetName::parse(set).unwrap()),
        holder: format!("a/{id}"),
    };
    let mut target = tunnel(None, Some("web"), "localhost", 8080);
    target.tunnel.as_mut().unwrap().balance = Some(crate::domain::Balance::LeastConnections);
    let obj = hdm("a", "t", "t", "tunnox.net", target);
    // (members, want set, want note)
    let cases: Vec<(Vec<TunnelClient>, &str)> = vec![
        (
            vec![member("b", "novel.sh"), member("a", "novel.sh")],
            "novel.sh",
        ),
        (
            vec![member("b", "novel.sh"), member("a", "novel.bj")],
            "any",
        ),
    ];
    for (members, want_set) in cases {
        let Verdict::Program(p) = evaluate(&obj, &policy(), &members, Utc::now()) else {
            panic!("{members:?}");
        };
        let g = p.spec.target_group.as_ref().expect("a group record");
        assert_eq!(g.name, "a/web");
        assert_eq!(g.clients, ["a", "b"], "sorted");
        assert_eq!(g.balance, crate::domain::Balance::LeastConnections);
        assert_eq!(p.spec.target_client_id, None);
        assert_eq!(p.set, want_set);
        assert_eq!(p.target, "tunnel-group:web(2)/localhost:8080");
    }
    match evaluate(&obj, &policy(), &[], Utc::now()) {
        Verdict::Hold(Hold::Pending { reason, message }) => {
            assert_eq!(reason, "TunnelGroupEmpty");
            assert!(message.contains("namespace a lists group web"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let crowd: Vec<TunnelClient> = (0..=crate::domain::MAX_GROUP_MEMBERS)
        .map(|i| member(&format!("c{i:03}"), "novel.sh"))
        .collect();
    assert!(matches!(
        evaluate(&obj, &policy(), &crowd, Utc::now()),
        Verdict::Hold(Hold::Rejected {
            reason: "TunnelGroupTooLarge",
            ..
        })
    ));
    // balance without a group is refused (the API server refuses it too).
    let mut single = tunnel(Some("laptop"), None, "localhost", 8080);
    single.tunnel.as_mut().unwrap().balance = Some(crate::domain::Balance::RoundRobin);
    assert!(matches!(
        evaluate(
            &hdm("a", "t", "t", "tunnox.net", single),
            &policy(),
            &[member("laptop", "novel.sh")],
            Utc::now()
        ),
        Verdict::Hold(Hold::Rejected {
            reason: "InvalidTarget",
            ..
        })
    ));
}

#[test]
fn target_protocol_and_tls_reach_the_record_or_are_refused_by_field() {
    use crate::crd::TargetTls;
    use crate::domain::Protocol;
    let with = |protocol: Option<Protocol>,
                https: bool,
                ca: Option<&str>,
                insecure: bool,
                target: Target| {
        let mut t = target;
        t.protocol = protocol;
        t.tls = (ca.is_some() || insecure).then(|| TargetTls {
            ca_secret_name: ca.map(str::to_string),
            insecure_skip_verify: insecure,
        });
        let mut m = hdm("team", "g", "g", "tunnox.net", t);
        if https {
            m.spec.scheme = TargetScheme::Https;
        }
        let laptop = [TunnelClient {
            client_id: "laptop".into(),
            placement: None,
            holder: "team/laptop".into(),
        }];
        evaluate(&m, &policy(), &laptop, Utc::now())
    };
    let addr = || address("127.0.0.1", 50051);
    // (verdict, wanted: Ok(protocol, note) or Err(message part))
    type Want = Result<(Protocol, bool), &'static str>;
    let cases: Vec<(Verdict, Want)> = vec![
        (
            with(None, false, None, false, addr()),
            Ok((Protocol::Http1, false)),
        ),
        (
            with(Some(Protocol::H2c), false, None, false, addr()),
            Ok((Protocol::H2c, false)),
        ),
        (
            with(Some(Protocol::H2), false, Some("ca"), false, addr()),
            Ok((Protocol::H2, false)),
        ),
        (
            with(Some(Protocol::H2), false, None, true, addr()),
            Ok((Protocol::H2, true)),
        ),
        (
            with(None, true, None, true, addr()),
            Ok((Protocol::Http1, true)),
        ),
        (
            with(Some(Protocol::H2c), true, None, false, addr()),
            Err("h2c is HTTP/2 without TLS"),
        ),
        (
            with(None, false, Some("ca"), false, addr()),
            Err("spec.target.tls.caSecretName applies to TLS targets"),
        ),
        (
            with(Some(Protocol::H2c), false, None, true, addr()),
            Err("applies to TLS targets"),
        ),
        (
            with(
                Some(Protocol::H2c),
                false,
                None,
                false,
                tunnel(Some("laptop"), None, "localhost", 50051),
            ),
            Err("not to tunnels"),
        ),
    ];
    for (verdict, want) in cases {
        match (verdict, want) {
            (Verdict::Program(plan), Ok((protocol, note))) => {
                assert_eq!(plan.spec.upstream.protocol, protocol);
                assert_eq!(
                    plan.spec.upstream.ca_pem, None,
                    "the reconciler reads the CA"
                );
                assert_eq!(
                    plan.note
                        .as_deref()
                        .is_some_and(|n| n.contains("insecureSkipVerify")),
                    note
                );
            }
            (Verdict::Hold(Hold::Rejected { message, .. }), Err(part)) => {
                assert!(message.contains(part), "{message}")
            }
            (Verdict::Hold(Hold::Pending { message, .. }), Err(part)) => {
                assert!(message.contains(part), "{message}")
            }
            (other, want) => panic!("{want:?}: {other:?}"),
        }
    }
}

#[test]
fn status_names_the_set_serving_a_placed_mapping() {
    let set = |s: &str| SetName::parse(s).unwrap();
    let home = set("novel.sh");
    // (healthy sets, want serving set, ServedByHome, reason)
    let cases: &[(&[&str], Option<&str>, bool, &str)] = &[
        (
            &["novel.sh", "novel.*"],
            Some("novel.sh"),
            true,
            "HomeSetHealthy",
        ),
        (
            &["novel.*", "novel.sz"],
            Some("novel.*"),
            false,
            "DisasterRecovery",
        ),
        (&["novel.sz", "ams.sh"], None, false, "NoHealthySet"),
        (&[], None, false, "NoHealthySet"),
    ];
    for (healthy, want, ok, reason) in cases {
        let healthy: Vec<SetName> = healthy.iter().map(|s| set(s)).collect();
        let mut s = HTTPDomainMappingStatus::default();
        add_serving(&mut s, Some(&home), Some(&healthy), None, Utc::now());
        assert_eq!(s.serving_set.as_deref(), *want, "{healthy:?}");
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == "ServedByHome")
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (if *ok { "True" } else { "False" }, *reason),
            "{healthy:?}: {}",
            c.message
        );
    }
    // No placement: nothing added. Registry not read yet: what was shown stays.
    let mut s = HTTPDomainMappingStatus::default();
    add_serving(
        &mut s,
        None,
        Some(std::slice::from_ref(&home)),
        None,
        Utc::now(),
    );
    assert_eq!(s, HTTPDomainMappingStatus::default());
    let mut shown = HTTPDomainMappingStatus::default();
    add_serving(
        &mut shown,
        Some(&home),
        Some(std::slice::from_ref(&home)),
        None,
        Utc::now(),
    );
    let mut s = HTTPDomainMappingStatus::default();
    add_serving(&mut s, Some(&home), None, Some(&shown), Utc::now());
    assert_eq!(s.serving_set.as_deref(), Some("novel.sh"));
    assert_eq!(s.conditions, shown.conditions);
}

#[test]
fn ready_means_every_healthy_proxy_applied_the_version() {
    use crate::controller::served::Tally;
    let plan = programmed_plan();
    let active = Outcome::Active {
        mapping_id: "hdm_1".into(),
        version: 9,
        plan: *plan,
    };
    let tally = |served, total, behind: &[(&str, u64)]| Tally {
        scope: None,
        served,
        total,
        behind: behind.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
    };
    let decided = |t: Option<&Tally>, previous: Option<&HTTPDomainMappingStatus>| {
        let mut s = status(&active, Some(1), previous, Utc::now());
        add_served(&mut s, t, previous, Utc::now());
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        (
            ready.status.clone(),
            ready.reason.clone(),
            ready.message.clone(),
            s.proxies.clone(),
            s,
        )
    };
    /// (tally, status, reason, proxies, words the message holds)
    type Case = (
        Option<Tally>,
        &'static str,
        &'static str,
        Option<&'static str>,
        Vec<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            Some(tally(3, 3, &[])),
            "True",
            "Programmed",
            Some("3/3"),
            vec![],
        ),
        (
            Some(tally(2, 3, &[("proxy-c", 7)])),
            "False",
            "ProxiesBehind",
            Some("2/3"),
            vec!["version 9", "2/3", "proxy-c (at version 7)"],
        ),
        (
            Some(tally(0, 0, &[])),
            "False",
            "NoHealthyProxy",
            Some("0/0"),
            vec!["no healthy proxy"],
        ),
        (None, "False", "ProxiesUnknown", None, vec!["not read yet"]),
    ];
    for (t, want_status, want_reason, want_proxies, words) in cases {
        let (st, reason, message, proxies, _) = decided(t.as_ref(), None);
        assert_eq!(
            (st.as_str(), reason.as_str(), proxies.as_deref()),
            (want_status, want_reason, want_proxies),
            "{t:?}: {message}"
        );
        for w in words {
            assert!(message.contains(w), "{t:?}: {message} lacks {w:?}");
        }
    }
    // Many behind: five named, the rest counted.
    let many: Vec<(String, u64)> = (0..8).map(|i| (format!("p{i}"), 1)).collect();
    let t = Tally {
        behind: many,
        ..tally(0, 8, &[])
    };
    let (_, _, message, ..) = decided(Some(&t), None);
    assert!(message.contains("p4 (at version 1), 3 more"), "{message}");
    assert!(!message.contains("p5"), "{message}");

    // Served once: the count it showed stays while the fleet changes (no status write), and an
    // unread registry keeps what was shown.
    let (.., served) = decided(Some(&tally(3, 3, &[])), None);
    let (st, _, _, proxies, again) = decided(Some(&tally(4, 4, &[])), Some(&served));
    assert_eq!((st.as_str(), proxies.as_deref()), ("True", Some("3/3")));
    assert_eq!(again, served, "nothing to write");
    let (st, _, _, proxies, _) = decided(None, Some(&served));
    assert_eq!((st.as_str(), proxies.as_deref()), ("True", Some("3/3")));
    // Behind after being served (a newer version): not Ready, counted anew.
    let (st, reason, _, proxies, behind) =
        decided(Some(&tally(1, 3, &[("a", 8), ("b", 8)])), Some(&served));
    assert_eq!(
        (st.as_str(), reason.as_str(), proxies.as_deref()),
        ("False", "ProxiesBehind", Some("1/3"))
    );
    // An unread registry keeps Ready only for the version that was served.
    let mut edited = served.clone();
    edited.version = Some(8);
    let (st, reason, ..) = decided(None, Some(&edited));
    assert_eq!((st.as_str(), reason.as_str()), ("False", "ProxiesUnknown"));
    // ...and served again: the new count is shown.
    let (st, _, _, proxies, _) = decided(Some(&tally(3, 3, &[])), Some(&behind));
    assert_eq!((st.as_str(), proxies.as_deref()), ("True", Some("3/3")));

    // Other phases carry no count.
    let conflict = Outcome::Conflict {
        plan: match &active {
            Outcome::Active { plan, .. } => plan.clone(),
            _ => unreachable!(),
        },
        holder: "b/y".into(),
    };
    let mut s = status(&conflict, Some(1), None, Utc::now());
    add_served(&mut s, Some(&tally(0, 3, &[])), None, Utc::now());
    assert_eq!(s.proxies, None);
}
