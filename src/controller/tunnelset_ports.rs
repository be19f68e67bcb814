//! Pure deciding for a TunnelSet's remote ports: the port requests its tunnels make (or why a
//! tunnel cannot ask), and each tunnel's status from what the store answered. No I/O.

use crate::crd::{TunnelProtocol, TunnelSet, TunnelStatus};
use crate::domain::SetName;
use crate::store::{PortClaim, PortOutcome, PortRequest};

/// Idle time of a UDP flow without `udpSessionTimeoutSeconds`.
const DEFAULT_UDP_IDLE_MS: u64 = 60_000;

/// `host:port` as the agent dials it (an IPv6 literal in brackets).
fn target(host: &str, port: i32) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One tunnel's place in the answer: a request sent to the store (its index among the
/// requests), or a status decided without asking.
#[derive(Debug, Clone, PartialEq)]
pub enum Ask {
    Request(usize),
    Decided(TunnelStatus),
}

fn refused(name: &str, message: String) -> TunnelStatus {
    TunnelStatus {
        name: name.to_string(),
        state: "Invalid".into(),
        message: Some(message),
        ..TunnelStatus::default()
    }
}

/// The requests of `ts`'s tunnels for `holder`, with one [`Ask`] per tunnel in spec order. A
/// remote port outside `range` is refused here: tenants choose among the ports the operator
/// set aside, never the proxies' own or privileged ones.
pub fn requests(
    ts: &TunnelSet,
    set: &SetName,
    holder: &str,
    range: (u16, u16),
) -> (Vec<PortRequest>, Vec<Ask>) {
    let mut reqs = Vec::new();
    let mut asks = Vec::new();
    for (i, t) in ts.spec.tunnels.iter().enumerate() {
        let port = match t.remote_port {
            None => 0,
            Some(p) => match u16::try_from(p) {
                Ok(p) if (range.0..=range.1).contains(&p) => p,
                _ => {
                    asks.push(Ask::Decided(refused(
                        &t.name,
                        format!(
                            "spec.tunnels[{i}].remotePort {p} is outside the remote port range {}-{} of this installation",
                            range.0, range.1
                        ),
                    )));
                    continue;
                }
            },
        };
        let Ok(local_port) = u16::try_from(t.local_port) else {
            asks.push(Ask::Decided(refused(
                &t.name,
                format!("spec.tunnels[{i}].localPort {} is not a port", t.local_port),
            )));
            continue;
        };
        if local_port == 0 || t.local_host.is_empty() {
            asks.push(Ask::Decided(refused(
                &t.name,
                format!("spec.tunnels[{i}]: localHost and localPort are required"),
            )));
            continue;
        }
        if t.group.is_some() && port == 0 {
            asks.push(Ask::Decided(refused(
                &t.name,
                format!(
                    "spec.tunnels[{i}].group needs an explicit remotePort: a group's members meet on one port"
                ),
            )));
            continue;
        }
        let rate = crate::config::MIN_BYTES_PER_SECOND..=crate::config::MAX_BYTES_PER_SECOND;
        if let Some(b) = t.max_bytes_per_second
            && !u64::try_from(b).is_ok_and(|b| rate.contains(&b))
        {
            asks.push(Ask::Decided(refused(
                &t.name,
                format!(
                    "spec.tunnels[{i}].maxBytesPerSecond {b} must be {}-{}",
                    rate.start(),
                    rate.end()
                ),
            )));
            continue;
        }
        let health_check = t.health_check.as_ref().map(|h| h.to_check());
        if let Some((field, why)) = health_check.as_ref().and_then(|h| h.problem()) {
            let field = match field {
                "interval" => "intervalSeconds",
                "timeout" => "timeoutSeconds",
                "max_failed" => "maxFailed",
                other => other,
            };
            asks.push(Ask::Decided(refused(
                &t.name,
                format!("spec.tunnels[{i}].healthCheck.{field}: {why}"),
            )));
            continue;
        }
        let udp = t.protocol == TunnelProtocol::Udp;
        asks.push(Ask::Request(reqs.len()));
        reqs.push(PortRequest {
            port,
            claim: PortClaim {
                holder: holder.to_string(),
                set: Some(set.clone()),
                client_id: ts.spec.client_id.clone(),
                name: t.name.clone(),
                target: target(&t.local_host, i32::from(local_port)),
                udp,
                max_connections: t.max_connections.and_then(|m| u32::try_from(m).ok()),
                max_bytes_per_second: t.max_bytes_per_second.and_then(|b| u64::try_from(b).ok()),
                udp_idle_ms: udp.then(|| {
                    t.udp_session_timeout_seconds
                        .and_then(|s| u64::try_from(s).ok())
                        .map_or(DEFAULT_UDP_IDLE_MS, |s| s * 1000)
                }),
                // Namespaced: a TunnelSet joins only its own namespace's groups.
                group: t.group.as_ref().map(|g| {
                    format!(
                        "{}/{g}",
                        ts.metadata.namespace.as_deref().unwrap_or_default()
                    )
                }),
                balance: t.group.as_ref().map(|_| t.balance.unwrap_or_default()),
                members: Vec::new(),
                health_check,
            },
        });
    }
    (reqs, asks)
}

/// Each tunnel's status: `Listening` on its port, `Conflict` naming the holder, `Exhausted`,
/// `BindFailed` when a proxy of the set reported it cannot listen there, or what [`requests`]
/// decided. `errors` are the set's bind errors (port, "node: why").
pub fn statuses(
    ts: &TunnelSet,
    asks: &[Ask],
    outcomes: &[PortOutcome],
    errors: &[(u16, String)],
    traffic: &std::collections::HashMap<u16, crate::store::PortTraffic>,
) -> Vec<TunnelStatus> {
    ts.spec
        .tunnels
        .iter()
        .zip(asks)
        .map(|(t, ask)| match ask {
            Ask::Decided(s) => s.clone(),
            Ask::Request(i) => {
                let mut s = TunnelStatus {
                    name: t.name.clone(),
                    ..TunnelStatus::default()
                };
                match outcomes.get(*i) {
                    Some(PortOutcome::Held(port)) => {
                        s.remote_port = Some(i32::from(*port));
                        if let Some(t) = traffic.get(port) {
                            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                            s.connections = n(t.connections);
                            s.bytes_in = n(t.bytes_in);
                            s.bytes_out = n(t.bytes_out);
                        }
                        let failing: Vec<&str> = errors
                            .iter()
                            .filter(|(p, _)| p == port)
                            .map(|(_, why)| why.as_str())
                            .collect();
                        if failing.is_empty() {
                            s.state = "Listening".into();
                        } else {
                            s.state = "BindFailed".into();
                            s.message = Some(format!(
                                "port {port} cannot be listened on: {}",
                                failing.join("; ")
                            ));
                        }
                    }
                    Some(PortOutcome::Conflict { port, holder }) => {
                        s.remote_port = Some(i32::from(*port));
                        s.state = "Conflict".into();
                        s.message = Some(format!(
                            "port {port} is held by {holder}; this tunnel takes it over when that one lets it go"
                        ));
                    }
                    Some(PortOutcome::Exhausted) => {
                        s.state = "Exhausted".into();
                        s.message = Some("no free port left in the remote port range".into());
                    }
                    None => s.state = "Pending".into(),
                }
                s
            }
        })
        .collect()
}

/// The Service publishing a TunnelSet's claimed ports: in the controller's namespace (the
/// proxies' pods are there; a Service selects pods of its own namespace only), so it cannot be
/// owned by the TunnelSet (no owner references across namespaces): it carries the TunnelSet's
/// namespace and name as labels and the finalizer deletes it.
pub fn service_name(ts_namespace: &str, ts_name: &str) -> String {
    // TunnelSet names may hold dots; a Service name is a DNS label.
    let name = format!("tunnox-ts-{ts_namespace}-{ts_name}").replace('.', "-");
    if name.len() <= 63 {
        return name;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", name[..54].trim_end_matches('-'))
}

/// The pod label value of a set (`*` regions are rendered `dr` in labels, as the chart does).
pub fn set_label(set: &crate::domain::SetName) -> String {
    let region = if set.is_dr() { "dr" } else { set.region() };
    format!("{}.{region}", set.business())
}

/// The set whose proxy pods a TunnelSet placed on `home` is published on: the set serving it
/// (home, else the business's DR set), home when none does or the fleet is not known yet (the
/// Service then has no ready endpoint either way).
pub fn service_set(home: &SetName, healthy: Option<&[SetName]>) -> SetName {
    healthy
        .and_then(|h| crate::domain::serving_set(home, h.iter()))
        .unwrap_or_else(|| home.clone())
}

/// The Service for `tunnels` (those holding a port), `None` when no port is held; it selects
/// the proxy pods of `set`, the set serving the TunnelSet now.
pub fn service(
    ts: &TunnelSet,
    set: &crate::domain::SetName,
    tunnels: &[TunnelStatus],
    cfg: &crate::config::TunnelServiceConfig,
    namespace: &str,
) -> Option<serde_json::Value> {
    let ports: Vec<serde_json::Value> = ts
        .spec
        .tunnels
        .iter()
        .zip(tunnels)
        .filter(|(_, s)| matches!(s.state.as_str(), "Listening" | "BindFailed"))
        .filter_map(|(t, s)| {
            let port = s.remote_port?;
            let protocol = match t.protocol {
                TunnelProtocol::Tcp => "TCP",
                TunnelProtocol::Udp => "UDP",
            };
            Some(serde_json::json!({
                "name": format!("{}-{port}", &protocol[..1].to_ascii_lowercase()),
                "port": port,
                "targetPort": port,
                "protocol": protocol,
            }))
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let ns = ts.metadata.namespace.clone().unwrap_or_default();
    let name = ts.metadata.name.clone().unwrap_or_default();
    let mut selector = cfg.selector.clone();
    selector.insert("tunnox.net/set".into(), set_label(set));
    Some(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(&ns, &name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "tunnox-controller",
                "tunnox.net/tunnelset-namespace": ns,
                "tunnox.net/tunnelset-name": name,
                "tunnox.net/set": set_label(set),
            },
            "annotations": cfg.annotations,
        },
        "spec": {
            "type": cfg.kind,
            "selector": selector,
            "ports": ports,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Placement, SecretKeyRef, Tunnel, TunnelAuth, TunnelSetSpec};

    fn tunnel(name: &str, remote: Option<i32>, udp: bool) -> Tunnel {
        Tunnel {
            name: name.into(),
            protocol: if udp {
                TunnelProtocol::Udp
            } else {
                TunnelProtocol::Tcp
            },
            local_host: "::1".into(),
            local_port: 22,
            remote_port: remote,
            group: None,
            balance: None,
            max_connections: Some(5),
            max_bytes_per_second: None,
            health_check: None,
            udp_session_timeout_seconds: None,
        }
    }

    fn ts(tunnels: Vec<Tunnel>) -> TunnelSet {
        TunnelSet::new(
            "laptop",
            TunnelSetSpec {
                client_id: "laptop".into(),
                auth: TunnelAuth {
                    secret_ref: SecretKeyRef {
                        name: "s".into(),
                        key: "token".into(),
                    },
                },
                placement: Placement {
                    business: "default".into(),
                    region: "default".into(),
                },
                groups: vec![],
                tunnels,
            },
        )
    }

    #[test]
    fn the_service_follows_the_serving_set() {
        let set = |s: &str| SetName::parse(s).unwrap();
        let home = set("novel.sh");
        let cases: [(Option<&[&str]>, &str); 5] = [
            (None, "novel.sh"),
            (Some(&["novel.sh", "novel.*"]), "novel.sh"),
            (Some(&["novel.sz", "novel.*"]), "novel.*"),
            (Some(&["novel.sz", "ams.*"]), "novel.sh"),
            (Some(&[]), "novel.sh"),
        ];
        for (healthy, want) in cases {
            let healthy: Option<Vec<SetName>> = healthy.map(|h| h.iter().map(|s| set(s)).collect());
            assert_eq!(
                service_set(&home, healthy.as_deref()),
                set(want),
                "{healthy:?}"
            );
        }
    }

    #[test]
    fn a_grouped_tunnel_names_its_namespaced_group_and_needs_a_port() {
        let mut web = tunnel("web", Some(20080), false);
        web.group = Some("web".into());
        let mut auto = tunnel("api", None, false);
        auto.group = Some("web".into());
        let mut t = ts(vec![web, auto, tunnel("ssh", Some(20022), false)]);
        t.metadata.namespace = Some("team-a".into());
        let set = SetName::parse("novel.sh").unwrap();
        let (reqs, asks) = requests(&t, &set, "k8s:c/team-a/laptop", (20000, 29999));
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].claim.group.as_deref(), Some("team-a/web"));
        assert_eq!(
            reqs[0].claim.balance,
            Some(crate::domain::Balance::RoundRobin)
        );
        assert_eq!(reqs[1].claim.group, None);
        assert_eq!(reqs[1].claim.balance, None);
        let Ask::Decided(api) = &asks[1] else {
            panic!("{asks:?}")
        };
        assert_eq!(api.state, "Invalid");
        assert!(
            api.message
                .as_deref()
                .unwrap()
                .contains("spec.tunnels[1].group needs an explicit remotePort"),
            "{api:?}"
        );
    }

    #[test]
    fn asks_for_ports_in_range_and_reports_each_tunnel() {
        let t = ts(vec![
            tunnel("ssh", Some(20022), false),
            tunnel("dns", None, true),
            tunnel("web", Some(443), false),
            tunnel("db", Some(20001), false),
        ]);
        let set = SetName::parse("novel.sh").unwrap();
        let (reqs, asks) = requests(&t, &set, "k8s:c/ns/laptop", (20000, 29999));
        assert!(
            reqs.iter().all(|r| r.claim.set.as_ref() == Some(&set)),
            "placed on its set"
        );
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].port, 20022);
        assert_eq!(reqs[0].claim.target, "[::1]:22");
        assert_eq!(reqs[0].claim.max_connections, Some(5));
        assert!(!reqs[0].claim.udp);
        assert_eq!(reqs[1].port, 0);
        assert!(reqs[1].claim.udp);
        assert_eq!(reqs[1].claim.udp_idle_ms, Some(60_000));
        let Ask::Decided(web) = &asks[2] else {
            panic!("{asks:?}")
        };
        assert_eq!(web.state, "Invalid");
        assert!(web.message.as_deref().unwrap().contains("443"));

        let outcomes = [
            PortOutcome::Held(20022),
            PortOutcome::Held(20000),
            PortOutcome::Conflict {
                port: 20001,
                holder: "k8s:c/other/x".into(),
            },
        ];
        let errors = [(20000, "p1: Address in use".to_string())];
        let traffic: std::collections::HashMap<u16, crate::store::PortTraffic> = [(
            20022,
            crate::store::PortTraffic {
                connections: 3,
                bytes_in: 100,
                bytes_out: 2000,
            },
        )]
        .into();
        let s = statuses(&t, &asks, &outcomes, &errors, &traffic);
        assert_eq!(
            (s[0].connections, s[0].bytes_in, s[0].bytes_out),
            (3, 100, 2000)
        );
        assert_eq!(s[1].connections, 0);
        let view: Vec<(&str, Option<i32>, &str)> = s
            .iter()
            .map(|s| (s.name.as_str(), s.remote_port, s.state.as_str()))
            .collect();
        assert_eq!(
            view,
            vec![
                ("ssh", Some(20022), "Listening"),
                ("dns", Some(20000), "BindFailed"),
                ("web", None, "Invalid"),
                ("db", Some(20001), "Conflict"),
            ]
        );
        assert!(
            s[1].message
                .as_deref()
                .unwrap()
                .contains("p1: Address in use")
        );
        assert!(s[3].message.as_deref().unwrap().contains("k8s:c/other/x"));
        let cfg = crate::config::TunnelServiceConfig {
            enabled: true,
            selector: [("app.kubernetes.io/name".to_string(), "tunnox".to_string())].into(),
            ..Default::default()
        };
        let set = crate::domain::SetName::parse("novel.*").unwrap();
        let svc = service(&t, &set, &s, &cfg, "tunnox-system").unwrap();
        assert_eq!(svc["metadata"]["namespace"], "tunnox-system");
        assert_eq!(svc["metadata"]["name"], "tunnox-ts--laptop");
        assert_eq!(svc["spec"]["selector"]["tunnox.net/set"], "novel.dr");
        assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/name"], "tunnox");
        // Held ports only (Listening, BindFailed): ssh (TCP) and dns (UDP).
        let ports = svc["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 2, "{ports:?}");
        assert_eq!(ports[0]["port"], 20022);
        assert_eq!(ports[0]["protocol"], "TCP");
        assert_eq!(ports[0]["name"], "t-20022");
        assert_eq!(ports[1]["protocol"], "UDP");
        assert!(service(&t, &set, &[], &cfg, "x").is_none());
        // Long names stay within 63 characters and distinct.
        let long = service_name(&"n".repeat(63), &"a".repeat(63));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, service_name(&"n".repeat(63), &"b".repeat(63)));
        let exhausted = statuses(&t, &asks, &[PortOutcome::Exhausted], &[], &traffic);
        assert_eq!(exhausted[0].state, "Exhausted");
        assert_eq!(exhausted[1].state, "Pending");
    }
}
