//! End-to-end tests on a real Kubernetes API server (etcd + kube-apiserver v1.34.4, no kubelet):
//! the CRDs as users meet them through kubectl, and the Helm chart with its least-privilege RBAC.
//! Run with `make e2e` (builds the control plane into a cache on first use).
//!
//! One control plane serves every scenario (starting one takes seconds, building it minutes);
//! it is stopped when this binary ends, whatever the scenarios did.

mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};

use std::time::Duration;

use serde::Deserialize;
use support::ControlPlane;
use support::controlplane::{ok, stderr};
use support::process::{Role, eventually, free_port, http_get, settles};
use tunnox::controller::access;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

type Scenario = fn(&Stack);

/// The control plane with the chart installed, a Redis, and the controller's credentials.
pub struct Stack {
    cp: ControlPlane,
    redis: support::RedisServer,
    dir: tempfile::TempDir,
    /// Kubeconfig carrying the chart's controller ServiceAccount token.
    sa_kubeconfig: std::path::PathBuf,
    /// The configuration file the chart renders.
    config: std::path::PathBuf,
}

impl Stack {
    /// Starts `tunnox proxy` with the chart's configuration (as its pods run it: set from the
    /// environment); only loopback addresses are overridden. Returns it ready, with its port.
    fn proxy(&self, name: &str) -> (Role, u16) {
        self.proxy_with(name, &[])
    }

    /// [`Stack::proxy`] with more environment (e.g. the HTTPS listener).
    fn proxy_with(&self, name: &str, extra: &[(&'static str, String)]) -> (Role, u16) {
        let port = free_port();
        let admin = free_port();
        let mut env = vec![
            ("TUNNOX__PROXY__SET", "default.default".to_string()),
            ("TUNNOX__PROXY__NODE_ID", name.to_string()),
            ("TUNNOX__STORAGE__REDIS__ADDR", self.redis.addr()),
            // The test Redis has no password; in pods the file is the mounted Secret.
            ("TUNNOX__STORAGE__REDIS__PASSWORD_FILE", String::new()),
            ("TUNNOX__PROXY__LISTEN", format!("127.0.0.1:{port}")),
            ("TUNNOX__PROXY__ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
            // The test's upstreams are on loopback, which proxies refuse for tenants.
            ("TUNNOX__EGRESS__ALLOW", "[\"127.0.0.0/8\"]".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let log = self.dir.path().join(format!("{name}.log"));
        let role = Role::start(
            &["--config", self.config.to_str().unwrap(), "proxy"],
            &env,
            &log,
        );
        eventually("proxy ready", Duration::from_secs(20), || {
            support::http::get(admin, "localhost", "/readyz").is_some_and(|r| r.status == 200)
        });
        (role, port)
    }

    /// Starts `tunnox controller` as the chart's ServiceAccount with the chart's configuration;
    /// only loopback addresses and short intervals are overridden, and loopback targets are
    /// allowed (the suite's upstreams listen on 127.0.0.1).
    fn controller(&self, name: &str) -> (Role, u16) {
        self.controller_with(name, &self.sa_kubeconfig, &[])
    }

    /// [`Stack::controller`] against the API server of `kubeconfig`, with `extra` environment
    /// (overriding the defaults).
    fn controller_with(
        &self,
        name: &str,
        kubeconfig: &std::path::Path,
        extra: &[(&'static str, String)],
    ) -> (Role, u16) {
        let admin = free_port();
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("POD_NAME", name.to_string()),
            ("POD_NAMESPACE", NS.to_string()),
            ("TUNNOX__STORAGE__REDIS__ADDR", self.redis.addr()),
            ("TUNNOX__STORAGE__REDIS__PASSWORD_FILE", String::new()),
            (
                "TUNNOX__CONTROLLER__ADMIN_LISTEN",
                format!("127.0.0.1:{admin}"),
            ),
            ("TUNNOX__CONTROLLER__RESYNC_INTERVAL", "3s".to_string()),
            ("TUNNOX__CONTROLLER__CONFLICT_RETRY", "2s".to_string()),
            ("TUNNOX__CONTROLLER__LEASE_DURATION", "4s".to_string()),
            ("TUNNOX__CONTROLLER__RENEW_INTERVAL", "1s".to_string()),
            ("TUNNOX__EGRESS__ALLOW", "['127.0.0.0/8']".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let log = self.dir.path().join(format!("{name}.log"));
        let role = Role::start(
            &["--config", self.config.to_str().unwrap(), "controller"],
            &env,
            &log,
        );
        (role, admin)
    }

    fn redis_keys(&self, pattern: &str) -> Vec<String> {
        let out = self.redis.cli(&["--scan", "--pattern", pattern]);
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    fn phases(&self, ns: &str) -> Vec<String> {
        let out = self.cp.kubectl_ok(&[
            "get",
            "hdm",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
        ]);
        out.lines().map(str::to_string).collect()
    }

    /// A field of one mapping, by JSONPath (`{.status.phase}`); empty when absent.
    fn field(&self, ns: &str, name: &str, jsonpath: &str) -> String {
        text(&self.cp.kubectl(&[
            "get",
            "hdm",
            name,
            "-n",
            ns,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ]))
    }

    /// Merge-patches a mapping's spec as a user would.
    fn patch(&self, ns: &str, name: &str, json: &str) {
        self.cp
            .kubectl_ok(&["patch", "hdm", name, "-n", ns, "--type=merge", "-p", json]);
    }

    fn phase(&self, ns: &str, name: &str) -> String {
        self.field(ns, name, "{.status.phase}")
    }
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let scenarios: &[(&str, Scenario)] = &[
        ("crds_show_columns_and_explain", |s| {
            crds_show_columns_and_explain(&s.cp)
        }),
        ("api_server_rejects_invalid_resources", |s| {
            api_server_rejects_invalid_resources(&s.cp)
        }),
        ("chart_grants_least_privilege", |s| {
            chart_grants_least_privilege(&s.cp)
        }),
        ("chart_installs_four_proxy_sets", |s| {
            chart_installs_four_proxy_sets(&s.cp)
        }),
        ("chart_refuses_bad_values", |s| {
            chart_refuses_bad_values(&s.cp)
        }),
        ("install_manifest_matches_the_chart", |s| {
            install_manifest_matches_the_chart(&s.cp)
        }),
        ("examples_are_valid_resources", |s| {
            examples_are_valid_resources(&s.cp)
        }),
        (
            "controller_programs_and_cleans_up_100_mappings",
            controller_programs_and_cleans_up_100_mappings,
        ),
        (
            "controller_conflict_and_takeover",
            controller_conflict_and_takeover,
        ),
        (
            "controller_rejects_without_hot_loop",
            controller_rejects_without_hot_loop,
        ),
        (
            "controller_rebuilds_flushed_redis",
            controller_rebuilds_flushed_redis,
        ),
        ("controller_leader_election", controller_leader_election),
        (
            "controller_updates_expires_and_reports_events",
            controller_updates_expires_and_reports_events,
        ),
        (
            "proxy_serves_what_kubectl_applies",
            proxy_serves_what_kubectl_applies,
        ),
        (
            "mapping_status_names_the_serving_set",
            mapping_status_names_the_serving_set,
        ),
        (
            "ready_means_served_by_every_proxy",
            ready_means_served_by_every_proxy,
        ),
        (
            "controller_refuses_egress_at_admission",
            controller_refuses_egress_at_admission,
        ),
        (
            "controller_enforces_quota_atomically",
            controller_enforces_quota_atomically,
        ),
        ("two_clusters_share_one_redis", two_clusters_share_one_redis),
        (
            "tunnel_set_with_secret_admits_agent_and_serves_mapping",
            tunnel_set_with_secret_admits_agent_and_serves_mapping,
        ),
        (
            "tunnel_set_remote_ports_reach_the_agent_and_conflicts_take_over",
            tunnel_set_remote_ports_reach_the_agent_and_conflicts_take_over,
        ),
        (
            "tunnel_set_group_spreads_connections_over_its_agents",
            tunnel_set_group_spreads_connections_over_its_agents,
        ),
        (
            "https_certificates_from_secrets",
            https_certificates_from_secrets,
        ),
        ("https_certificates_from_acme", https_certificates_from_acme),
        (
            "controller_rbac_is_what_it_calls",
            controller_rbac_is_what_it_calls,
        ),
        (
            "management_api_over_the_cluster",
            management_api_over_the_cluster,
        ),
        // Last: it leaves its many mappings behind for the stack's end to take away.
        (
            "controller_restart_with_nothing_changed_writes_nothing",
            controller_restart_with_nothing_changed_writes_nothing,
        ),
    ];
    let stack = setup();
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in scenarios {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        eprintln!("e2e: {name} ...");
        match catch_unwind(AssertUnwindSafe(|| scenario(&stack))) {
            Ok(()) => {
                passed += 1;
                eprintln!("e2e: {name} ok");
            }
            Err(_) => {
                failed += 1;
                eprintln!("e2e: {name} FAILED");
            }
        }
    }
    drop(stack);
    println!("e2e: {passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// Control plane, CRDs, the chart installed (no pod runs: there is no kubelet), a Redis, and the
/// controller's ServiceAccount token and configuration taken from what the chart created.
fn setup() -> Stack {
    let cp = ControlPlane::start();
    cp.install_crds();
    ok(
        cp.helm(&[
            "install",
            "tunnox",
            &format!("{ROOT}/charts/tunnox"),
            "--namespace",
            NS,
            "--create-namespace",
            "--skip-crds",
        ]),
        "helm install",
    );
    let dir = tempfile::tempdir().unwrap();
    let token = cp
        .kubectl_ok(&[
            "create",
            "token",
            "tunnox-controller",
            "-n",
            NS,
            "--duration=2h",
        ])
        .trim()
        .to_string();
    let admin_config = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    let sa_config: String = admin_config
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("token:") {
                format!("    token: {token}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let sa_kubeconfig = dir.path().join("controller.kubeconfig");
    std::fs::write(&sa_kubeconfig, sa_config).unwrap();
    let rendered = chart_config(&cp);
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, rendered).unwrap();
    let redis = support::RedisServer::start();
    Stack {
        cp,
        redis,
        dir,
        sa_kubeconfig,
        config,
    }
}

/// The cluster identity a controller defaults to: the uid of `kube-system`.
fn cluster_id(cp: &ControlPlane) -> String {
    cp.kubectl_ok(&[
        "get",
        "namespace",
        "kube-system",
        "-o",
        "jsonpath={.metadata.uid}",
    ])
    .trim()
    .to_string()
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn crds_show_columns_and_explain(cp: &ControlPlane) {
    cp.kubectl_ok(&["create", "namespace", "cols"]);
    ok(
        cp.apply(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {name: web, namespace: cols}\n\
             spec: {subdomain: myapp, baseDomain: tunnox.net, target: {service: {name: web, port: 80}}}\n",
        ),
        "apply hdm",
    );
    // Status is a subresource: write it as the controller will, then read the columns.
    cp.kubectl_ok(&[
        "patch", "hdm", "web", "-n", "cols", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"fullDomain":"myapp.tunnox.net","target":"web.cols.svc.cluster.local:80","set":"default.default","phase":"Active","mappingId":"hdm_01JD0Q3W8Z9V4S6T2R1P0N5M7K","version":7}}"#,
    ]);
    let table = cp.kubectl_ok(&["get", "hdm", "-n", "cols"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "DOMAIN", "TARGET", "SET", "PHASE", "PROXIES", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        [
            "web",
            "myapp.tunnox.net",
            "web.cols.svc.cluster.local:80",
            "default.default",
            "Active"
        ]
    );
    let wide = cp.kubectl_ok(&["get", "hdm", "-n", "cols", "-o", "wide"]);
    for col in ["CLAIMED-BY", "MAPPING-ID", "VERSION"] {
        assert!(wide.lines().next().unwrap().contains(col), "{wide}");
    }
    // Short names and categories work; spec edits do not touch status and vice versa.
    assert!(
        cp.kubectl_ok(&["get", "tunnox", "-n", "cols"])
            .contains("httpdomainmapping.tunnox.net/web")
    );
    let explain = cp.kubectl_ok(&["explain", "hdm.spec.target"]);
    assert!(
        explain.contains("exactly one of `service`, `address`"),
        "{explain}"
    );
    let ts_explain = cp.kubectl_ok(&["explain", "ts.spec.placement.region"]);
    assert!(ts_explain.contains("disaster-recovery"), "{ts_explain}");
    let ts_header = cp.kubectl_ok(&["get", "ts", "-A"]);
    let _ = ts_header; // empty list prints nothing on stdout
    cp.kubectl_ok(&["delete", "hdm", "web", "-n", "cols"]);
}

fn api_server_rejects_invalid_resources(cp: &ControlPlane) {
    let hdm = |name: &str, spec: &str| {
        format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: {name}}}\nspec: {spec}\n"
        )
    };
    let cases = [
        (
            hdm("two", "{subdomain: two, baseDomain: tunnox.net, target: {service: {name: web, port: 80}, address: {host: 1.2.3.4, port: 80}}}"),
            "exactly one of service, address or tunnel must be set",
        ),
        (hdm("none", "{subdomain: none, baseDomain: tunnox.net, target: {}}"), "exactly one of service, address or tunnel"),
        (hdm("zero", "{subdomain: zero, baseDomain: tunnox.net, target: {address: {host: example.org, port: 0}}}"), "spec.target.address.port"),
        (hdm("big", "{subdomain: big, baseDomain: tunnox.net, target: {service: {name: web, port: 70000}}}"), "spec.target.service.port"),
        (hdm("under", "{subdomain: My_App, baseDomain: tunnox.net, target: {address: {host: a, port: 1}}}"), "spec.subdomain"),
        (hdm("base", "{subdomain: a, baseDomain: 'tunnox..net', target: {address: {host: a, port: 1}}}"), "spec.baseDomain"),
        (hdm("scheme", "{subdomain: a, baseDomain: tunnox.net, scheme: ftp, target: {address: {host: a, port: 1}}}"), "spec.scheme"),
        (
            hdm("tun", "{subdomain: a, baseDomain: tunnox.net, target: {tunnel: {clientId: c, group: g, host: localhost, port: 3000}}}"),
            "exactly one of clientId or group",
        ),
        (
            "apiVersion: tunnox.net/v1alpha1\nkind: TunnelSet\nmetadata: {name: dup}\nspec: {clientId: c1, auth: {secretRef: {name: s}}, placement: {business: novel, region: sh}, tunnels: [{name: a, localHost: h, localPort: 1}, {name: a, localHost: h, localPort: 2}]}\n".to_string(),
            "Duplicate value",
        ),
        (
            "apiVersion: tunnox.net/v1alpha1\nkind: TunnelSet\nmetadata: {name: place}\nspec: {clientId: c2, auth: {secretRef: {name: s}}, placement: {business: Novel, region: sh}, tunnels: []}\n".to_string(),
            "spec.placement.business",
        ),
    ];
    for (yaml, want) in cases {
        let out = cp.apply(&yaml);
        assert!(!out.status.success(), "accepted:\n{yaml}");
        let err = stderr(&out);
        assert!(err.contains(want), "for\n{yaml}\nwant {want:?} in: {err}");
    }
    // The DR region is a valid placement.
    ok(
        cp.apply("apiVersion: tunnox.net/v1alpha1\nkind: TunnelSet\nmetadata: {name: dr}\nspec: {clientId: c3, auth: {secretRef: {name: s}}, placement: {business: novel, region: '*'}, tunnels: [{name: ssh, localHost: localhost, localPort: 22}]}\n"),
        "apply DR TunnelSet",
    );
    cp.kubectl_ok(&["delete", "ts", "dr"]);
}

const NS: &str = "tunnox-system";

/// The configuration file the installed chart renders (its ConfigMap).
fn chart_config(cp: &ControlPlane) -> String {
    cp.kubectl_ok(&[
        "get",
        "configmap",
        "tunnox",
        "-n",
        NS,
        "-o",
        "jsonpath={.data.config\\.yaml}",
    ])
}

fn chart_grants_least_privilege(cp: &ControlPlane) {
    for kind in [
        "deployment/tunnox-controller",
        "deployment/tunnox-proxy-default-default",
        "statefulset/tunnox-redis",
        "serviceaccount/tunnox-controller",
        "configmap/tunnox",
    ] {
        cp.kubectl_ok(&["get", "-n", NS, kind]);
    }
    let token = cp
        .kubectl_ok(&["create", "token", "tunnox-controller", "-n", NS])
        .trim()
        .to_string();
    let can = |verb: &str, resource: &str, ns: Option<&str>| {
        let mut args = vec!["auth", "can-i", verb, resource];
        match ns {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("-A"),
        }
        text(&cp.kubectl_as(&token, &args)).trim() == "yes"
    };
    // What the controller calls (src/controller/access.rs; controller_rbac_is_what_it_calls
    // checks the whole list against the chart and the audit log).
    for (verb, resource, ns) in [
        ("watch", "httpdomainmappings.tunnox.net", None),
        ("list", "httpdomainmappings.tunnox.net", None),
        ("patch", "httpdomainmappings.tunnox.net", Some("rbac")),
        ("patch", "httpdomainmappings.tunnox.net/status", None),
        ("create", "events.events.k8s.io", Some("rbac")),
        ("get", "namespaces/kube-system", None),
        ("list", "tunnelsets.tunnox.net", None),
        ("watch", "tunnelsets.tunnox.net", None),
        ("patch", "tunnelsets.tunnox.net", Some("rbac")),
        ("patch", "tunnelsets.tunnox.net/status", None),
        ("get", "secrets", Some("rbac")),
        ("create", "leases.coordination.k8s.io", Some(NS)),
        (
            "update",
            "leases.coordination.k8s.io/tunnox-controller",
            Some(NS),
        ),
    ] {
        assert!(
            can(verb, resource, ns),
            "controller should be allowed to {verb} {resource}"
        );
    }
    // What nothing in the controller calls.
    for (verb, resource, ns) in [
        ("delete", "httpdomainmappings.tunnox.net", None),
        ("create", "httpdomainmappings.tunnox.net", None),
        ("get", "httpdomainmappings.tunnox.net", None),
        ("update", "httpdomainmappings.tunnox.net", None),
        ("update", "httpdomainmappings.tunnox.net/finalizers", None),
        ("get", "tunnelsets.tunnox.net", None),
        ("update", "tunnelsets.tunnox.net", None),
        ("delete", "tunnelsets.tunnox.net", None),
        ("create", "tunnelsets.tunnox.net", None),
        // Secrets are read by name only: never enumerated, watched or written.
        ("list", "secrets", Some(NS)),
        ("list", "secrets", None),
        ("watch", "secrets", None),
        ("create", "secrets", None),
        ("update", "secrets", None),
        ("create", "services", None),
        ("list", "services", None),
        ("create", "events", Some("rbac")),
        ("get", "namespaces/default", None),
        ("list", "namespaces", None),
        ("list", "pods", None),
        ("create", "clusterroles.rbac.authorization.k8s.io", None),
        (
            "delete",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        (
            "update",
            "leases.coordination.k8s.io/another-lease",
            Some(NS),
        ),
        (
            "delete",
            "leases.coordination.k8s.io/tunnox-controller",
            Some(NS),
        ),
    ] {
        assert!(
            !can(verb, resource, ns),
            "controller must not be allowed to {verb} {resource}"
        );
    }
    assert!(
        !can(
            "update",
            "leases.coordination.k8s.io/tunnox-controller",
            Some("default")
        ),
        "leases only in its own namespace"
    );
    // Real requests with the ServiceAccount's token: an allowed one works, a refused one is 403.
    cp.kubectl_ok(&["create", "namespace", "rbac"]);
    ok(
        cp.apply("apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {name: r, namespace: rbac}\nspec: {subdomain: r, baseDomain: tunnox.net, target: {address: {host: 127.0.0.1, port: 8080}}}\n"),
        "apply",
    );
    let listed = cp.kubectl_as(&token, &["get", "hdm", "-A", "-o", "name"]);
    assert!(
        text(&listed).contains("httpdomainmapping.tunnox.net/r"),
        "{}",
        stderr(&listed)
    );
    let refused = cp.kubectl_as(&token, &["delete", "hdm", "r", "-n", "rbac"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("Forbidden") || stderr(&refused).contains("forbidden"),
        "{}",
        stderr(&refused)
    );
    let refused = cp.kubectl_as(&token, &["get", "pods", "-n", NS]);
    assert!(
        stderr(&refused).to_lowercase().contains("forbidden"),
        "{}",
        stderr(&refused)
    );
    // The proxies have no API access at all.
    let sa = cp.kubectl_ok(&[
        "get",
        "serviceaccount",
        "tunnox-proxy",
        "-n",
        NS,
        "-o",
        "jsonpath={.automountServiceAccountToken}",
    ]);
    assert_eq!(sa.trim(), "false");
    // Pods run non-root on a read-only root filesystem.
    let sec = cp.kubectl_ok(&[
        "get",
        "deployment",
        "tunnox-controller",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].securityContext}",
    ]);
    assert!(
        sec.contains(r#""readOnlyRootFilesystem":true"#) && sec.contains(r#""runAsNonRoot":true"#),
        "{sec}"
    );
    // The configuration the chart renders is one tunnox accepts (with the pods' environment).
    let config = chart_config(cp);
    let file =
        std::env::temp_dir().join(format!("tunnox-chart-config-{}.yaml", std::process::id()));
    std::fs::write(&file, &config).unwrap();
    let password = file.with_extension("password");
    std::fs::write(&password, "from-the-secret\n").unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tunnox"))
        .args(["--config", file.to_str().unwrap(), "check-config"])
        // The Secret's file, mounted where the chart says in pods.
        .env(
            "TUNNOX__STORAGE__REDIS__PASSWORD_FILE",
            password.to_str().unwrap(),
        )
        .env("TUNNOX__PROXY__SET", "default.default")
        .env("TUNNOX__PROXY__NODE_ID", "tunnox-proxy-default-default-0")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&password);
    let printed = ok(check, "tunnox check-config on the chart's configuration");
    assert!(printed.contains("mapping store: redis"), "{printed}");
    assert!(
        config.contains("password_file: \"/var/run/secrets/tunnox/redis/password\"")
            && printed.contains("password: <redacted>"),
        "the password comes from the Secret's file: {config}\n{printed}"
    );
    // Secrets reach tunnox pods as files, never as environment variables.
    for workload in [
        "deployment/tunnox-controller",
        "deployment/tunnox-proxy-default-default",
        "statefulset/tunnox-redis",
    ] {
        let env = cp.kubectl_ok(&[
            "get",
            workload,
            "-n",
            NS,
            "-o",
            "jsonpath={.spec.template.spec.containers[*].env}",
        ]);
        assert!(
            !env.contains("secretKeyRef"),
            "{workload} takes a Secret as a variable: {env}"
        );
    }
    // The preStop hook drains over loopback inside the container (POST), not an HTTP GET.
    let pre_stop = cp.kubectl_ok(&[
        "get",
        "deployment/tunnox-proxy-default-default",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].lifecycle.preStop}",
    ]);
    assert!(
        pre_stop.contains(r#""exec""#)
            && pre_stop.contains(r#""drain""#)
            && !pre_stop.contains("httpGet"),
        "{pre_stop}"
    );
    let policies = cp.kubectl_ok(&["get", "networkpolicy", "-n", NS, "-o", "name"]);
    for np in ["tunnox-proxy", "tunnox-controller", "tunnox-redis"] {
        assert!(
            policies.contains(&format!("networkpolicy.networking.k8s.io/{np}")),
            "{policies}"
        );
    }
    cp.kubectl_ok(&["delete", "hdm", "r", "-n", "rbac"]);
}

/// The chart with four sets of two businesses (issue #18): installed into the real API server
/// as a second release, one Deployment per set started with its set name and limits, one
/// PodDisruptionBudget per set, one Service per business selecting all of its sets' pods.
fn chart_installs_four_proxy_sets(cp: &ControlPlane) {
    let ns = "sets";
    let values = "proxy:\n  sets:\n        \x20   - {name: novel.sh, replicas: 3, limits: {mappingConcurrency: 500, upstreamRequests: 4000}}\n        \x20   - {name: novel.sz}\n        \x20   - {name: \"novel.*\", replicas: 1}\n        \x20   - {name: ams.sh, limits: {maxConnections: 2000, mappingRate: 50, mappingBurst: 10}}\n";
    let file = std::env::temp_dir().join(format!("tunnox-sets-{}.yaml", std::process::id()));
    std::fs::write(&file, values).unwrap();
    ok(
        cp.helm(&[
            "install",
            "sets",
            &format!("{ROOT}/charts/tunnox"),
            "--namespace",
            ns,
            "--create-namespace",
            "--skip-crds",
            "-f",
            file.to_str().unwrap(),
        ]),
        "helm install with four sets",
    );
    let _ = std::fs::remove_file(&file);
    // name, set, replicas, the limits' environment
    let want = [
        (
            "sets-tunnox-proxy-novel-sh",
            "novel.sh",
            "3",
            "TUNNOX__PROXY__LIMITS__UPSTREAM_REQUESTS=4000 TUNNOX__PROXY__LIMITS__MAPPING_CONCURRENCY=500",
        ),
        ("sets-tunnox-proxy-novel-sz", "novel.sz", "2", ""),
        ("sets-tunnox-proxy-novel-dr", "novel.*", "1", ""),
        (
            "sets-tunnox-proxy-ams-sh",
            "ams.sh",
            "2",
            "TUNNOX__PROXY__LIMITS__MAX_CONNECTIONS=2000 TUNNOX__PROXY__LIMITS__MAPPING_RATE=50 TUNNOX__PROXY__LIMITS__MAPPING_BURST=10",
        ),
    ];
    let deployments = cp.kubectl_ok(&[
        "get",
        "deployments",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/component=proxy",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.replicas}{range .spec.template.spec.containers[0].env[*]} {.name}={.value}{end}{\"\\n\"}{end}",
    ]);
    let lines: Vec<&str> = deployments.lines().collect();
    assert_eq!(lines.len(), 4, "{deployments}");
    for (name, set, replicas, limits) in want {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no Deployment {name}: {deployments}"));
        assert!(line.starts_with(&format!("{name} {replicas} ")), "{line}");
        assert!(
            line.contains(&format!(" TUNNOX__PROXY__SET={set} ")),
            "{line}"
        );
        let got: Vec<&str> = line
            .split(' ')
            .filter(|kv| kv.starts_with("TUNNOX__PROXY__LIMITS__"))
            .collect();
        assert_eq!(got.join(" "), limits, "{name}");
    }
    let pdbs = cp.kubectl_ok(&["get", "pdb", "-n", ns, "-o", "name"]);
    assert_eq!(pdbs.lines().count(), 4, "{pdbs}");
    let services = cp.kubectl_ok(&[
        "get",
        "services",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/component=proxy,tunnox.net/business",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.selector}{\"\\n\"}{end}",
    ]);
    let mut names: Vec<&str> = services
        .lines()
        .filter_map(|l| l.split(' ').next())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["sets-tunnox-proxy-ams", "sets-tunnox-proxy-novel"],
        "one Service per business: {services}"
    );
    // Each selects its business's pods, of every set (no region in the selector).
    assert!(
        services
            .lines()
            .all(|l| l.contains("\"tunnox.net/business\"") && !l.contains("tunnox.net/set")),
        "{services}"
    );
    ok(
        cp.helm(&["uninstall", "sets", "--namespace", ns, "--wait"]),
        "helm uninstall",
    );
}

fn chart_refuses_bad_values(cp: &ControlPlane) {
    let chart = format!("{ROOT}/charts/tunnox");
    let cases: [(&[&str], &str); 8] = [
        (&["--set", "redis.bundled=false"], "/redis/external/addr"),
        (
            &["--set", "https.acme.directoryUrl=https://acme.example/dir"],
            "https.acme.directoryUrl is set but https.enabled is false",
        ),
        (
            &["--set", "https.acme.directoryUrl=http://acme.example/dir"],
            "/https/acme/directoryUrl",
        ),
        (
            &["--set", "proxy.admin.trustLoopback=false"],
            "proxy.admin.tokenSecret.name is empty",
        ),
        (&["--set", "image.digest=latest"], "/image/digest"),
        (&["--set", "baseDomains[0]=Bad_Domain"], "/baseDomains/0"),
        (&["--set", "proxy.sets[0].name=novel"], "/proxy/sets/0/name"),
        (
            &["--set", "proxy.sets[0].name=novel.SH"],
            "/proxy/sets/0/name",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["template", "t", chart.as_str()];
        all.extend_from_slice(args);
        let out = cp.helm(&all);
        assert!(!out.status.success(), "helm template {args:?} should fail");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let out = cp.helm(&[
        "template",
        "t",
        chart.as_str(),
        "--set",
        "proxy.sets[0].name=novel.sh",
        "--set",
        "proxy.sets[1].name=novel.*",
    ]);
    let rendered = ok(out, "two sets of one business");
    assert!(
        rendered.contains("name: t-tunnox-proxy-novel-sh")
            && rendered.contains("name: t-tunnox-proxy-novel-dr")
    );
}

fn install_manifest_matches_the_chart(cp: &ControlPlane) {
    let out = cp.helm(&[
        "template",
        "tunnox",
        &format!("{ROOT}/charts/tunnox"),
        "--namespace",
        NS,
        "--include-crds",
        "--set",
        "redis.existingSecret=tunnox-redis",
    ]);
    let rendered = ok(out, "helm template");
    let committed = std::fs::read_to_string(format!("{ROOT}/manifests/install.yaml")).unwrap();
    // The first three lines are the header `make generate` writes above the chart's output.
    let body: String = committed
        .lines()
        .skip(3)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        body, rendered,
        "manifests/install.yaml is stale: run make generate"
    );
    // And it applies to a real API server (server-side dry run validates every object).
    cp.kubectl_ok(&["create", "namespace", NS, "--dry-run=client", "-o", "yaml"]);
    let _ = cp.kubectl(&["create", "namespace", NS]);
    ok(
        cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered),
        "server-side dry run of install.yaml",
    );
}

fn hdm_yaml(ns: &str, name: &str, sub: &str, port: u16) -> String {
    format!(
        "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{subdomain: {sub}, baseDomain: tunnox.net, target: {{address: {{host: 127.0.0.1, port: {port}}}}}}}\n"
    )
}

fn no_permission_errors(role: &Role) {
    let log = role.log();
    // The API server's refusals ("... is forbidden: User \"system:serviceaccount:..." and
    // the 403 kube reports), not a CA's "forbidden by policy".
    let denied = log
        .lines()
        .filter(|l| {
            l.contains("is forbidden: User")
                || l.contains("\"Forbidden\"")
                || l.contains("code: 403")
        })
        .collect::<Vec<_>>();
    assert!(
        denied.is_empty(),
        "permission error in controller log:\n{}",
        denied.join("\n")
    );
}

fn controller_programs_and_cleans_up_100_mappings(s: &Stack) {
    let (ctl, admin) = s.controller("ctl-bulk");
    s.cp.kubectl_ok(&["create", "namespace", "bulk"]);
    let docs: Vec<String> = (0..100)
        .map(|i| hdm_yaml("bulk", &format!("m{i}"), &format!("bulk{i}"), 20000 + i))
        .collect();
    ok(s.cp.apply(&docs.join("---\n")), "apply 100 mappings");
    let took = eventually("100 mappings Active", Duration::from_secs(60), || {
        s.phases("bulk").iter().filter(|p| *p == "Active").count() == 100
    });
    eprintln!("e2e: 100 mappings Active {took:?} after apply");
    assert_eq!(
        s.redis_keys("tunnox:http_domain:index:domain:bulk*").len(),
        100
    );
    let table = s.cp.kubectl_ok(&["get", "hdm", "-n", "bulk", "m7"]);
    assert!(
        table.contains("bulk7.tunnox.net")
            && table.contains("127.0.0.1:20007")
            && table.contains("Active"),
        "{table}"
    );
    assert!(http_get(admin, "/metrics").contains("tunnox_controller_reconciles_total"));
    assert_eq!(http_get(admin, "/readyz").trim(), "ok");
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", "bulk", "--timeout=60s"]),
        "delete all",
    );
    assert_eq!(
        s.cp.kubectl_ok(&["get", "hdm", "-n", "bulk", "-o", "name"])
            .trim(),
        "",
        "finalizers released"
    );
    assert!(
        s.redis_keys("tunnox:http_domain:index:domain:bulk*")
            .is_empty(),
        "claims released"
    );
    let records = s.redis.cli(&["ZCARD", "tunnox:http_domain:index:all"]);
    assert_eq!(records, "0", "no record or index entry left");
    assert!(
        s.redis_keys("tunnox:http_domain:mapping:*").is_empty(),
        "no record left"
    );
    no_permission_errors(&ctl);
}

fn controller_conflict_and_takeover(s: &Stack) {
    let (ctl, _) = s.controller("ctl-conflict");
    for ns in ["team-a", "team-b", "team-c"] {
        s.cp.kubectl_ok(&["create", "namespace", ns]);
    }
    ok(
        s.cp.apply(&hdm_yaml("team-a", "web", "shared", 1)),
        "apply older",
    );
    eventually("older Active", Duration::from_secs(20), || {
        s.phase("team-a", "web") == "Active"
    });
    ok(
        s.cp.apply(&hdm_yaml("team-b", "web", "shared", 2)),
        "apply newer",
    );
    std::thread::sleep(Duration::from_secs(1));
    ok(
        s.cp.apply(&hdm_yaml("team-c", "web", "shared", 3)),
        "apply newest",
    );
    eventually(
        "newer in Conflict naming the holder",
        Duration::from_secs(20),
        || s.phase("team-b", "web") == "Conflict" && s.phase("team-c", "web") == "Conflict",
    );
    let claimed = s.field("team-b", "web", "{.status.claimedBy}");
    assert_eq!(claimed, "team-a/web");
    let wide =
        s.cp.kubectl_ok(&["get", "hdm", "web", "-n", "team-b", "-o", "wide"]);
    assert!(wide.contains("team-a/web"), "{wide}");
    ok(
        s.cp.kubectl(&["delete", "hdm", "web", "-n", "team-a", "--timeout=30s"]),
        "delete holder",
    );
    let took = eventually(
        "the older waiter takes over by itself",
        Duration::from_secs(20),
        || s.phase("team-b", "web") == "Active",
    );
    eprintln!("e2e: takeover {took:?} after the holder was deleted");
    eventually(
        "the newest now names the new holder",
        Duration::from_secs(20),
        || s.field("team-c", "web", "{.status.claimedBy}") == "team-b/web",
    );
    assert_eq!(s.phase("team-c", "web"), "Conflict");
    let port = s
        .redis
        .cli(&["GET", "tunnox:http_domain:index:domain:shared.tunnox.net"]);
    let record = s
        .redis
        .cli(&["GET", &format!("tunnox:http_domain:mapping:{port}")]);
    assert!(
        record.contains("\"target_port\":2")
            && record.contains(&format!(
                "\"source\":\"k8s:{}/team-b/web\"",
                cluster_id(&s.cp)
            )),
        "{record}"
    );
    for ns in ["team-b", "team-c"] {
        ok(
            s.cp.kubectl(&["delete", "hdm", "--all", "-n", ns, "--timeout=30s"]),
            "clean up",
        );
    }
    no_permission_errors(&ctl);
}

fn controller_rejects_without_hot_loop(s: &Stack) {
    let (ctl, admin) = s.controller("ctl-reject");
    s.cp.kubectl_ok(&["create", "namespace", "rejects"]);
    let bad = "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {name: evil, namespace: rejects}\n\
               spec: {subdomain: x, baseDomain: evil.example, target: {address: {host: 127.0.0.1, port: 80}}}\n";
    ok(s.cp.apply(bad), "apply disallowed base domain");
    eventually("Rejected", Duration::from_secs(20), || {
        s.phase("rejects", "evil") == "Rejected"
    });
    let message = s.field(
        "rejects",
        "evil",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert!(
        message.contains("evil.example is not allowed") && message.contains("tunnox.net"),
        "{message}"
    );
    let reconciles = |body: String| -> u64 {
        body.lines()
            .filter(|l| l.starts_with("tunnox_controller_outcomes_total{outcome=\"rejected\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = reconciles(http_get(admin, "/metrics"));
    std::thread::sleep(Duration::from_secs(5));
    let after = reconciles(http_get(admin, "/metrics"));
    // The only rejected mapping waits for a change; a loop would count hundreds.
    assert!(before >= 1, "the rejection was counted");
    assert!(
        after - before <= 1,
        "reconciled {} times in 5 s: a hot loop",
        after - before
    );
    let mut ctl = ctl;
    assert!(ctl.is_running(), "controller crashed");
    assert!(
        s.redis_keys("tunnox:http_domain:index:domain:x.evil*")
            .is_empty()
    );
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", "rejects", "--timeout=30s"]),
        "clean up",
    );
}

fn controller_rebuilds_flushed_redis(s: &Stack) {
    let (mut ctl, _) = s.controller("ctl-flush");
    s.cp.kubectl_ok(&["create", "namespace", "flush"]);
    let docs: Vec<String> = (0..20)
        .map(|i| hdm_yaml("flush", &format!("f{i}"), &format!("flush{i}"), 9000 + i))
        .collect();
    ok(s.cp.apply(&docs.join("---\n")), "apply");
    eventually("20 Active", Duration::from_secs(30), || {
        s.phases("flush").iter().filter(|p| *p == "Active").count() == 20
    });
    assert_eq!(s.redis.cli(&["FLUSHALL"]), "OK");
    let took = eventually(
        "every mapping back after FLUSHALL",
        Duration::from_secs(15),
        || s.redis_keys("tunnox:http_domain:index:domain:flush*").len() == 20,
    );
    eprintln!("e2e: rebuilt 20 mappings {took:?} after FLUSHALL (resync interval 3 s)");
    // The controller marks the new epoch rebuilt: what stale proxies wait for.
    let started = std::time::Instant::now();
    let marked = loop {
        let epoch = s.redis.cli(&["GET", "tunnox:http_domain:epoch"]);
        if !epoch.is_empty()
            && s.redis
                .cli(&["HGET", "tunnox:http_domain:rebuilt", "epoch"])
                == epoch
        {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(10) {
            let log = ctl.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "no rebuilt marker for epoch {epoch:?} within 10 s; marker {:?}; keys {:?}; controller log (last lines, newest first):\n{}",
                s.redis.cli(&["HGETALL", "tunnox:http_domain:rebuilt"]),
                s.redis_keys("tunnox:*").len(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("e2e: marker written {marked:?} after the rebuild");
    // Restart the controller with Redis emptied while it was down.
    assert_eq!(
        ctl.terminate(Duration::from_secs(10)),
        Some(0),
        "clean exit on SIGTERM"
    );
    assert_eq!(s.redis.cli(&["FLUSHALL"]), "OK");
    let (ctl2, _) = s.controller("ctl-flush-2");
    eventually(
        "every mapping back after a restart on an empty Redis",
        Duration::from_secs(20),
        || s.redis_keys("tunnox:http_domain:index:domain:flush*").len() == 20,
    );
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", "flush", "--timeout=60s"]),
        "delete mappings",
    );
    eventually(
        "records of deleted mappings gone",
        Duration::from_secs(20),
        || {
            s.redis_keys("tunnox:http_domain:index:domain:flush*")
                .is_empty()
        },
    );
    no_permission_errors(&ctl2);
}

fn controller_leader_election(s: &Stack) {
    let leader_of = |port: u16| {
        http_get(port, "/metrics")
            .lines()
            .any(|l| l == "tunnox_controller_leader 1")
    };
    let (mut first, p1) = s.controller("ctl-one");
    eventually("first leads", Duration::from_secs(15), || leader_of(p1));
    let (mut second, p2) = s.controller("ctl-two");
    std::thread::sleep(Duration::from_secs(3));
    let (one, two) = (leader_of(p1), leader_of(p2));
    assert!(
        one && !two,
        "exactly one leader: ctl-one leads {one}, ctl-two leads {two}; lease {}\nctl-one log:\n{}\nctl-two log:\n{}",
        String::from_utf8_lossy(
            &s.cp
                .kubectl(&["get", "lease", "-n", NS, "-o", "yaml"])
                .stdout
        ),
        first.log(),
        second.log()
    );
    assert_eq!(http_get(p2, "/readyz").trim(), "ok", "a standby is ready");
    s.cp.kubectl_ok(&["create", "namespace", "lead"]);
    ok(s.cp.apply(&hdm_yaml("lead", "a", "lead-a", 1)), "apply");
    eventually("leader reconciles", Duration::from_secs(15), || {
        s.phase("lead", "a") == "Active"
    });
    first.kill();
    let took = eventually(
        "the standby takes over within the lease",
        Duration::from_secs(15),
        || leader_of(p2),
    );
    eprintln!("e2e: standby took over {took:?} after the leader was killed (lease 4 s)");
    ok(
        s.cp.apply(&hdm_yaml("lead", "b", "lead-b", 2)),
        "apply after failover",
    );
    eventually(
        "new leader reconciles new changes",
        Duration::from_secs(15),
        || s.phase("lead", "b") == "Active",
    );
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", "lead", "--timeout=60s"]),
        "delete mappings",
    );
    // A contender holding the lease (as after a partition): the leader stops reconciling and
    // exits 1, so that its orchestrator restarts it as a standby, within the renew deadline
    // (2/3 of the 4 s lease) and the grace for reconciles in flight (1/3).
    let now = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .output()
        .expect("date");
    let now = String::from_utf8_lossy(&now.stdout).trim().to_string();
    s.cp.kubectl_ok(&[
        "patch",
        "lease",
        "tunnox-controller",
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        &format!(
            r#"{{"spec":{{"holderIdentity":"contender","renewTime":"{now}","leaseDurationSeconds":60}}}}"#
        ),
    ]);
    let took = eventually(
        "the leader that lost its lease exits",
        Duration::from_secs(15),
        || second.exit_code().is_some(),
    );
    assert_eq!(second.exit_code(), Some(1), "{}", second.log());
    assert!(
        second.log().contains("lost leadership; stopping"),
        "{}",
        second.log()
    );
    eprintln!("e2e: a leader whose lease was taken exited {took:?} later");
    // Later scenarios' controllers must not wait for the contender's minute.
    s.cp.kubectl_ok(&["delete", "lease", "tunnox-controller", "-n", NS]);
    no_permission_errors(&second);
}

fn controller_updates_expires_and_reports_events(s: &Stack) {
    let (ctl, _) = s.controller("ctl-update");
    s.cp.kubectl_ok(&["create", "namespace", "upd"]);
    ok(s.cp.apply(&hdm_yaml("upd", "web", "upd", 18080)), "apply");
    eventually("Active", Duration::from_secs(20), || {
        s.phase("upd", "web") == "Active"
    });
    let record = || {
        let id = s
            .redis
            .cli(&["GET", "tunnox:http_domain:index:domain:upd.tunnox.net"]);
        s.redis
            .cli(&["GET", &format!("tunnox:http_domain:mapping:{id}")])
    };
    // A target change updates the record in place (compare-and-set) and the observed generation.
    s.patch(
        "upd",
        "web",
        r#"{"spec":{"target":{"address":{"host":"127.0.0.1","port":19090}}}}"#,
    );
    eventually(
        "record follows the new target",
        Duration::from_secs(20),
        || record().contains("\"target_port\":19090"),
    );
    eventually(
        "observedGeneration follows",
        Duration::from_secs(20),
        || s.field("upd", "web", "{.status.observedGeneration}") == "2",
    );
    // A subdomain change moves the claim.
    s.patch("upd", "web", r#"{"spec":{"subdomain":"moved"}}"#);
    eventually("claim moved", Duration::from_secs(20), || {
        s.redis_keys("tunnox:http_domain:index:domain:moved.tunnox.net")
            .len()
            == 1
            && s.redis_keys("tunnox:http_domain:index:domain:upd.tunnox.net")
                .is_empty()
    });
    // expiresAt: served until then, Expired and released after.
    let soon = chrono::Utc::now() + chrono::Duration::seconds(4);
    let expiring = format!(
        "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: brief, namespace: upd}}\n\
         spec: {{subdomain: brief, baseDomain: tunnox.net, expiresAt: '{}', target: {{address: {{host: 127.0.0.1, port: 1}}}}}}\n",
        soon.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    ok(s.cp.apply(&expiring), "apply expiring");
    eventually("Active before expiry", Duration::from_secs(10), || {
        s.phase("upd", "brief") == "Active"
    });
    eventually("Expired after expiresAt", Duration::from_secs(20), || {
        s.phase("upd", "brief") == "Expired"
    });
    assert!(
        s.redis_keys("tunnox:http_domain:index:domain:brief.tunnox.net")
            .is_empty(),
        "domain released"
    );
    // Events tell the story.
    let events = s.cp.kubectl_ok(&[
        "get",
        "events",
        "-n",
        "upd",
        "-o",
        "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
    ]);
    for reason in ["Claimed", "Released", "Expired"] {
        assert!(
            events.lines().any(|l| l == reason),
            "event {reason} missing: {events}"
        );
    }
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", "upd", "--timeout=30s"]),
        "clean up",
    );
    no_permission_errors(&ctl);
}

/// The whole path a user takes: `kubectl apply` a mapping, the controller programs Redis, the
/// proxy serves it; `kubectl delete` and the proxy answers 404.
fn proxy_serves_what_kubectl_applies(s: &Stack) {
    let ns = "e2e-proxy";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    let upstream = support::http::Upstream::start("e2e-demo");
    let (mut controller, _) = s.controller("ctl-proxy");
    let (mut proxy, port) = s.proxy("proxy-e2e");
    ok(
        s.cp.apply(&hdm_yaml(ns, "demo", "demo", upstream.port)),
        "apply demo mapping",
    );
    eventually("mapping Active", Duration::from_secs(20), || {
        s.phase(ns, "demo") == "Active"
    });
    let listed = s.cp.kubectl_ok(&["get", "hdm", "-n", ns]);
    assert!(
        listed.contains("demo.tunnox.net") && listed.contains("Active"),
        "{listed}"
    );
    eventually("served through the proxy", Duration::from_secs(5), || {
        support::http::get(port, "demo.tunnox.net", "/")
            .is_some_and(|r| r.status == 200 && r.body == "hello from e2e-demo\n")
    });
    s.cp.kubectl_ok(&["delete", "hdm", "demo", "-n", ns, "--wait=true"]);
    eventually("404 once deleted", Duration::from_secs(10), || {
        support::http::status(port, "demo.tunnox.net") == 404
    });
    assert_eq!(
        proxy.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        proxy.log()
    );
    controller.terminate(Duration::from_secs(10));
    no_permission_errors(&controller);
}

/// `Ready` means served (issue #19): after `kubectl wait --for=condition=Ready` a request
/// through any of three proxies answers from the new mapping, 200 times in a row. A proxy frozen
/// with SIGSTOP holds mappings applied meanwhile at `2/3`, named in `Ready`'s message and in the
/// controller's metrics; SIGCONT brings them to `3/3` and `Ready`.
fn ready_means_served_by_every_proxy(s: &Stack) {
    let ns = "e2e-ready";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    // Every registered proxy of the set counts: earlier scenarios' must have left.
    eventually(
        "no proxy of an earlier scenario registered",
        Duration::from_secs(30),
        || s.redis_keys("tunnox:node:*").is_empty(),
    );
    let upstream = support::http::Upstream::start("e2e-ready");
    let (mut controller, admin) = s.controller("ctl-ready");
    let proxies: Vec<(Role, u16)> = (0..3)
        .map(|i| s.proxy(&format!("proxy-ready-{i}")))
        .collect();
    let served = |port: u16, name: &str| {
        support::http::get(port, &format!("{name}.tunnox.net"), "/")
            .is_some_and(|r| r.status == 200 && r.body == "hello from e2e-ready\n")
    };
    let wait_ready = |name: &str| {
        ok(
            s.cp.kubectl(&[
                "wait",
                "--for=condition=Ready",
                &format!("hdm/{name}"),
                "-n",
                ns,
                "--timeout=30s",
            ]),
            &format!("kubectl wait Ready {name}"),
        )
    };
    // The controller counts a proxy once its registry read shows it warm (every 2 s).
    eventually(
        "the controller knows 3 healthy proxies",
        Duration::from_secs(20),
        || {
            http_get(admin, "/metrics")
                .lines()
                .any(|l| l == "tunnox_controller_proxies_healthy 3")
        },
    );
    let n = 200;
    let mut took = Vec::with_capacity(n);
    let mut misses = Vec::new();
    for i in 0..n {
        let name = format!("r{i}");
        let started = std::time::Instant::now();
        ok(
            s.cp.apply(&hdm_yaml(ns, &name, &name, upstream.port)),
            "apply",
        );
        wait_ready(&name);
        took.push(started.elapsed());
        for (p, (_, port)) in proxies.iter().enumerate() {
            if !served(*port, &name) {
                misses.push(format!("{name} through proxy-ready-{p}"));
            }
        }
    }
    took.sort();
    let pct = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    eprintln!(
        "e2e: apply → Ready, {n} mappings, 3 proxies (kubectl apply and kubectl wait included): p50 {:?}, p99 {:?}, max {:?}; requests right after Ready that missed: {}",
        pct(0.5),
        pct(0.99),
        took[took.len() - 1],
        misses.len()
    );
    assert!(misses.is_empty(), "missed after Ready: {misses:?}");
    assert_eq!(s.field(ns, "r0", "{.status.proxies}"), "3/3");
    let listed = s.cp.kubectl_ok(&["get", "hdm", "r0", "-n", ns]);
    assert!(
        listed.contains("PROXIES") && listed.contains("3/3"),
        "{listed}"
    );

    // Freeze one proxy: what is applied meanwhile is served by the other two, and says so.
    let frozen = &proxies[2].0;
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &frozen.pid().to_string()])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    let names = ["f0", "f1", "f2"];
    for name in names {
        ok(
            s.cp.apply(&hdm_yaml(ns, name, name, upstream.port)),
            "apply while frozen",
        );
    }
    let ready = |name: &str| {
        (
            s.field(ns, name, "{.status.proxies}"),
            s.field(
                ns,
                name,
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            ),
        )
    };
    // Well within the registry TTL (15 s): the frozen proxy is still a registered, healthy one.
    eventually(
        "2/3 while one proxy is frozen",
        Duration::from_secs(8),
        || {
            names
                .iter()
                .all(|n| ready(n) == ("2/3".to_string(), "False".to_string()))
        },
    );
    let message = s.field(
        ns,
        "f2",
        "{.status.conditions[?(@.type==\"Ready\")].message}",
    );
    assert!(
        message.contains("proxy-ready-2") && message.contains("2/3"),
        "{message}"
    );
    // The per-node gauges are refreshed with each registry read (every 2 s).
    eventually(
        "the metric names the frozen proxy",
        Duration::from_secs(8),
        || {
            http_get(admin, "/metrics")
                .lines()
                .find(|l| {
                    l.starts_with("tunnox_controller_proxy_behind_seconds{node=\"proxy-ready-2\"}")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .is_some_and(|b| b > 0.0)
        },
    );
    for name in names {
        assert!(
            served(proxies[0].1, name) && served(proxies[1].1, name),
            "{name}"
        );
    }
    signal("-CONT");
    let back = eventually("3/3 once it runs again", Duration::from_secs(10), || {
        names
            .iter()
            .all(|n| ready(n) == ("3/3".to_string(), "True".to_string()))
    });
    eprintln!("e2e: the thawed proxy caught up and the mappings became Ready within {back:?}");
    for name in names {
        assert!(
            served(proxies[2].1, name),
            "{name} through the thawed proxy"
        );
    }
    // Released while the controller runs (finalizers), so later scenarios do not meet them.
    s.cp.kubectl_ok(&[
        "delete",
        "hdm",
        "--all",
        "-n",
        ns,
        "--wait=true",
        "--timeout=120s",
    ]);
    for (mut p, _) in proxies {
        p.terminate(Duration::from_secs(30));
    }
    controller.terminate(Duration::from_secs(10));
    no_permission_errors(&controller);
}

/// Issue #19: a controller restarted over 10 000 programmed mappings (`TUNNOX_E2E_RESTART_MAPPINGS`
/// to change the count) with nothing changed reconciles every one of them and writes nothing: no
/// mapping's resourceVersion moves (no status, finalizer or metadata write), no Event is
/// recorded, and Redis sees no write at all (its dirty counter, `rdb_changes_since_last_save`,
/// stays). Prints how long the cold start and the restart took.
fn controller_restart_with_nothing_changed_writes_nothing(s: &Stack) {
    let ns = "e2e-restart";
    let n: usize = std::env::var("TUNNOX_E2E_RESTART_MAPPINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    // A proxy expiring from the registry meanwhile would change what status shows.
    eventually(
        "no proxy of an earlier scenario registered",
        Duration::from_secs(30),
        || s.redis_keys("tunnox:node:*").is_empty(),
    );
    // The default resync interval: the suite's 3 s would requeue every mapping every 3 s. The
    // default lease too: the suite's 4 s (for quick failovers) leaves 2.7 s to renew, and a CI
    // machine's API server, busy listing 10 000 objects, once took longer.
    let defaults = [
        ("TUNNOX__CONTROLLER__RESYNC_INTERVAL", "30s".to_string()),
        ("TUNNOX__CONTROLLER__LEASE_DURATION", "15s".to_string()),
        ("TUNNOX__CONTROLLER__RENEW_INTERVAL", "5s".to_string()),
    ];
    let started = std::time::Instant::now();
    let chunks = 8;
    std::thread::scope(|scope| {
        for c in 0..chunks {
            scope.spawn(move || {
                let docs: Vec<String> = (c..n)
                    .step_by(chunks)
                    .map(|i| hdm_yaml(ns, &format!("m{i}"), &format!("m{i}"), 9))
                    .collect();
                ok(
                    s.cp.kubectl_stdin(&["create", "-f", "-"], &docs.join("---\n")),
                    "create mappings",
                );
            });
        }
    });
    let created = started.elapsed();
    // Created first, then programmed by a controller starting over all of them (a cold start).
    let (mut first, _) = s.controller_with("ctl-restart-1", &s.sa_kubeconfig, &defaults);
    let active = || s.phases(ns).iter().filter(|p| *p == "Active").count();
    // Listing every mapping is heavy for the API server (and a CI machine's API server is the
    // bottleneck of this start): wait for the records in Redis first, then look every few
    // seconds only.
    let programmed = {
        let since = std::time::Instant::now();
        let records = || {
            s.redis
                .cli(&["ZCARD", "tunnox:http_domain:index:all"])
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        };
        while records() < n && since.elapsed() < Duration::from_secs(900) {
            std::thread::sleep(Duration::from_secs(1));
        }
        while active() != n {
            assert!(
                since.elapsed() < Duration::from_secs(900),
                "{} of {n} Active after 900 s",
                active()
            );
            std::thread::sleep(Duration::from_secs(5));
        }
        since.elapsed()
    };
    eprintln!(
        "e2e: {n} mappings created in {created:?}, all Active {programmed:?} after the controller started"
    );
    // Its resync marks the store rebuilt at the version it lists (every 30 s): a controller
    // stopped before that pass leaves its successor one marker to write, which is news.
    eventually(
        "the rebuilt marker at the store's version",
        Duration::from_secs(60),
        || {
            s.redis
                .cli(&["HGET", "tunnox:http_domain:rebuilt", "version"])
                == s.redis.cli(&["GET", "tunnox:http_domain:version"])
        },
    );
    assert_eq!(first.terminate(Duration::from_secs(30)), Some(0));

    let versions = || {
        s.cp.kubectl_ok(&[
            "get",
            "hdm",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.metadata.resourceVersion}{\"\\n\"}{end}",
        ])
    };
    let events = || {
        s.cp.kubectl_ok(&["get", "events", "-n", ns, "-o", "name"])
            .lines()
            .count()
    };
    let dirty = || {
        s.redis
            .cli(&["INFO", "persistence"])
            .lines()
            .find_map(|l| l.strip_prefix("rdb_changes_since_last_save:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("rdb_changes_since_last_save")
    };
    let before = (versions(), events(), dirty());
    assert_eq!(before.0.lines().count(), n);

    let (mut second, admin) = s.controller_with("ctl-restart-2", &s.sa_kubeconfig, &defaults);
    let restarted = std::time::Instant::now();
    let reconciled = || {
        http_get(admin, "/metrics")
            .lines()
            .filter(|l| l.starts_with("tunnox_controller_reconciles_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    // CI once saw this not finish within 300 s where a run here takes 17 s at 10 000: on a
    // timeout the controller's own account is printed before failing.
    if !settles(Duration::from_secs(300), || reconciled() >= n) {
        let log = second.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let metrics: Vec<String> = http_get(admin, "/metrics")
            .lines()
            .filter(|l| l.starts_with("tunnox_controller_") && !l.contains("_bucket"))
            .map(str::to_string)
            .collect();
        panic!(
            "{n} mappings reconciled after the restart: not within 300 s ({} so far)\n\
             metrics:\n{}\nlog (last lines, newest first):\n{}",
            reconciled(),
            metrics.join("\n"),
            tail.join("\n")
        );
    }
    let took = restarted.elapsed();
    // Let anything a reconcile would still write land (status writes follow within ms).
    std::thread::sleep(Duration::from_secs(3));
    let after = (versions(), events(), dirty());
    let moved: Vec<&str> = before
        .0
        .lines()
        .zip(after.0.lines())
        .filter(|(b, a)| b != a)
        .map(|(b, _)| b)
        .collect();
    eprintln!(
        "e2e: restart over {n} unchanged mappings: all reconciled {took:?} after the start; {} mappings written, {} Events, {} Redis writes; {} lease renewals failed",
        moved.len(),
        after.1 - before.1,
        after.2 - before.2,
        second.log().matches("lease update failed").count()
    );
    assert!(
        moved.is_empty(),
        "written: {:?}",
        &moved[..moved.len().min(10)]
    );
    assert_eq!(after.1, before.1, "Events recorded");
    assert_eq!(after.2, before.2, "Redis writes");
    assert_eq!(active(), n);
    assert_eq!(second.terminate(Duration::from_secs(30)), Some(0));
    no_permission_errors(&second);

    // The store lost (Redis flushed) and a controller starting over it: every record comes
    // back with the id and version its status names, so no status is written (issue #19).
    assert_eq!(s.redis.cli(&["FLUSHALL"]), "OK");
    let before = (versions(), events());
    let (mut third, admin) = s.controller_with("ctl-restart-3", &s.sa_kubeconfig, &defaults);
    let restarted = std::time::Instant::now();
    let records = || {
        s.redis
            .cli(&["ZCARD", "tunnox:http_domain:index:all"])
            .parse::<usize>()
            .unwrap_or(0)
    };
    eventually(
        &format!("{n} records back in the flushed store"),
        Duration::from_secs(300),
        || records() >= n,
    );
    let took = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let after = (versions(), events());
    let moved = before
        .0
        .lines()
        .zip(after.0.lines())
        .filter(|(b, a)| b != a)
        .count();
    let metrics = http_get(admin, "/metrics");
    eprintln!(
        "e2e: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("tunnox_controller_restores_total")
                || l.starts_with("tunnox_controller_outcomes_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let restored = metrics
        .lines()
        .find(|l| l.starts_with("tunnox_controller_restores_total{outcome=\"restored\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as usize;
    eprintln!(
        "e2e: flushed store, {n} mappings: all records back {took:?} after the controller started; \
         {restored} restored as their status names them, {moved} mappings written, {} Events",
        after.1 - before.1
    );
    assert_eq!(moved, 0, "status written while restoring");
    assert_eq!(after.1, before.1, "Events recorded");
    assert_eq!(
        restored, n,
        "restored with the id and version their status names"
    );
    // Spot checks: the record under each domain is the one the status names, at its version.
    for i in [0, n / 2, n - 1] {
        let status = s.cp.kubectl_ok(&[
            "get",
            "hdm",
            &format!("m{i}"),
            "-n",
            ns,
            "-o",
            "jsonpath={.status.mappingId} {.status.version}",
        ]);
        let id = s.redis.cli(&[
            "GET",
            &format!("tunnox:http_domain:index:domain:m{i}.tunnox.net"),
        ]);
        let record = s
            .redis
            .cli(&["GET", &format!("tunnox:http_domain:mapping:{id}")]);
        let version =
            serde_json::from_str::<serde_json::Value>(&record).expect("a record")["version"]
                .to_string();
        assert_eq!(status, format!("{id} {version}"), "m{i}");
    }
    third.terminate(Duration::from_secs(30));
    no_permission_errors(&third);
}

/// A mapping placed on `novel.sh` (issue #18): its status names the set serving it, from the
/// proxies' registry, and follows as sets come and go — the DR set (`ServedByHome=False`,
/// `DisasterRecovery`), home (`True`), nothing (`NoHealthySet`).
fn mapping_status_names_the_serving_set(s: &Stack) {
    let ns = "e2e-placed";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    let (mut controller, _) = s.controller("ctl-placed");
    ok(
        s.cp.apply(&format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: placed, namespace: {ns}}}\n\
             spec: {{subdomain: placed, baseDomain: tunnox.net, placement: {{business: novel, region: sh}}, target: {{address: {{host: 127.0.0.1, port: 9}}}}}}\n"
        )),
        "apply a placed mapping",
    );
    // A TunnelSet placed on the same set (admitted: only an admitted client is served).
    s.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "placed-token",
        "-n",
        ns,
        "--from-literal=token=placed-secret-token",
    ]);
    ok(
        s.cp.apply(
            &tunnelset_yaml(ns, "placed-ts", "placed-client", "placed-token").replace(
                "business: default, region: default",
                "business: novel, region: sh",
            ),
        ),
        "apply a placed TunnelSet",
    );
    let ts_field = |jsonpath: &str| {
        text(&s.cp.kubectl(&[
            "get",
            "ts",
            "placed-ts",
            "-n",
            ns,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ]))
    };
    let shown = |want_set: &str, want_reason: &str| {
        let took = eventually(
            &format!("servingSet {want_set:?}, ServedByHome {want_reason}"),
            Duration::from_secs(20),
            || {
                s.field(ns, "placed", "{.status.servingSet}") == want_set
                    && s.field(
                        ns,
                        "placed",
                        "{.status.conditions[?(@.type==\"ServedByHome\")].reason}",
                    ) == want_reason
                    && ts_field("{.status.servingSet}") == want_set
                    && ts_field("{.status.conditions[?(@.type==\"ServedByHome\")].reason}")
                        == want_reason
            },
        );
        eprintln!("e2e: status shows {want_reason} ({want_set:?}) {took:?} after the change");
    };
    let proxy = |name: &str, set: &str| {
        s.proxy_with(
            name,
            &[
                ("TUNNOX__PROXY__SET", set.to_string()),
                (
                    "TUNNOX__PROXY__REGISTRY__HEARTBEAT_INTERVAL",
                    "500ms".into(),
                ),
                ("TUNNOX__PROXY__REGISTRY__TTL", "3s".into()),
                ("TUNNOX__PROXY__DRAIN__PROPAGATION_DELAY", "0s".into()),
            ],
        )
        .0
    };
    // No proxy of the business yet.
    shown("", "NoHealthySet");
    assert_eq!(s.field(ns, "placed", "{.status.set}"), "novel.sh");
    let mut dr = proxy("placed-dr", "novel.*");
    shown("novel.*", "DisasterRecovery");
    let mut home = proxy("placed-sh", "novel.sh");
    shown("novel.sh", "HomeSetHealthy");
    let listed = s.cp.kubectl_ok(&["get", "hdm", "-n", ns, "-o", "wide"]);
    assert!(listed.contains("SERVING"), "{listed}");
    home.terminate(Duration::from_secs(30));
    shown("novel.*", "DisasterRecovery");
    dr.terminate(Duration::from_secs(30));
    shown("", "NoHealthySet");
    s.cp.kubectl_ok(&["delete", "hdm", "placed", "-n", ns, "--wait=true"]);
    controller.terminate(Duration::from_secs(10));
    no_permission_errors(&controller);
}

/// One mapping in `ns` whose `address` target is `host:port`.
fn address_yaml(ns: &str, name: &str, sub: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{subdomain: {sub}, baseDomain: tunnox.net, target: {{address: {{host: '{host}', port: {port}}}}}}}\n"
    )
}

/// `name → (phase, claimedBy)` of every mapping in `ns`.
fn phases_by_name(
    cp: &ControlPlane,
    ns: &str,
) -> std::collections::BTreeMap<String, (String, String)> {
    let out = cp.kubectl_ok(&[
        "get",
        "hdm",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}|{.status.phase}|{.status.claimedBy}{\"\\n\"}{end}",
    ]);
    out.lines()
        .filter_map(|l| {
            let mut parts = l.split('|');
            Some((
                parts.next()?.to_string(),
                (parts.next()?.to_string(), parts.next()?.to_string()),
            ))
        })
        .collect()
}

/// Targets a tenant must not reach are `Rejected` with the reason before anything is claimed;
/// a configuration change that refuses a programmed target releases it when the controller
/// restarts with it.
fn controller_refuses_egress_at_admission(s: &Stack) {
    let ns = "egress";
    let (mut ctl, admin) = s.controller("ctl-egress");
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    // (name, host, port, what the message must say). The chart's proxies listen on 8080 and
    // 9090 (admin); the suite allows 127.0.0.0/8, yet own listeners stay refused.
    let refused = [
        (
            "admin",
            "127.0.0.1",
            9090,
            "is one of the proxy's own listeners",
        ),
        (
            "itself",
            "127.0.0.1",
            8080,
            "is one of the proxy's own listeners",
        ),
        ("metadata", "169.254.169.254", 80, "is a link-local address"),
        (
            "othersvc",
            "web.other-ns.svc.cluster.local",
            80,
            "names a Service in namespace other-ns",
        ),
    ];
    let mut docs = vec![address_yaml(
        ns,
        "allowed",
        "eg-allowed",
        "127.0.0.1",
        23456,
    )];
    docs.extend(
        refused.iter().map(|(name, host, port, _)| {
            address_yaml(ns, name, &format!("eg-{name}"), host, *port)
        }),
    );
    ok(s.cp.apply(&docs.join("---\n")), "apply");
    eventually(
        "the allowed one Active, the others Rejected",
        Duration::from_secs(20),
        || {
            s.phase(ns, "allowed") == "Active"
                && refused
                    .iter()
                    .all(|(name, ..)| s.phase(ns, name) == "Rejected")
        },
    );
    for (name, host, port, why) in refused {
        let reason = s.field(
            ns,
            name,
            "{.status.conditions[?(@.type==\"Ready\")].reason}",
        );
        let message = s.field(
            ns,
            name,
            "{.status.conditions[?(@.type==\"Accepted\")].message}",
        );
        assert_eq!(reason, "EgressDenied", "{name}");
        assert!(
            message.starts_with("spec.target.address: ")
                && message.contains(&format!("{host}:{port}"))
                && message.contains(why),
            "{name}: {message}"
        );
        assert!(
            s.redis_keys(&format!("tunnox:http_domain:index:domain:eg-{name}.*"))
                .is_empty(),
            "{name} claimed nothing"
        );
    }
    let events = s.cp.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.type}/{.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        events.lines().any(|l| l == "Warning/EgressDenied"),
        "{events}"
    );
    let counted: u64 = http_get(admin, "/metrics")
        .lines()
        .filter(|l| l.starts_with("tunnox_controller_rejections_total{reason=\"EgressDenied\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(counted >= 4, "EgressDenied rejections counted: {counted}");
    // The operator takes loopback off the allow list: on restart the programmed mapping is
    // reconciled, refused and its claim released.
    assert_eq!(ctl.terminate(Duration::from_secs(10)), Some(0));
    let (ctl2, _) = s.controller_with(
        "ctl-egress-2",
        &s.sa_kubeconfig,
        &[("TUNNOX__EGRESS__ALLOW", "[]".to_string())],
    );
    let took = eventually(
        "the now refused mapping Rejected and released",
        Duration::from_secs(20),
        || {
            s.phase(ns, "allowed") == "Rejected"
                && s.redis_keys("tunnox:http_domain:index:domain:eg-allowed.*")
                    .is_empty()
        },
    );
    eprintln!("e2e: refused target released {took:?} after the controller restarted");
    let message = s.field(
        ns,
        "allowed",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert!(message.contains("loopback"), "{message}");
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", ns, "--timeout=30s"]),
        "clean up",
    );
    no_permission_errors(&ctl2);
}

/// `controller.quota.per_namespace` holds when every mapping of a namespace is reconciled at
/// once (concurrency 16): the store counts in the claiming script, not the controller's cache.
fn controller_enforces_quota_atomically(s: &Stack) {
    let ns = "quota";
    let (ctl, _) = s.controller_with(
        "ctl-quota",
        &s.sa_kubeconfig,
        &[("TUNNOX__CONTROLLER__QUOTA__PER_NAMESPACE", "3".to_string())],
    );
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    let docs: Vec<String> = (0..12)
        .map(|i| hdm_yaml(ns, &format!("q{i}"), &format!("quota{i}"), 25000 + i))
        .collect();
    ok(s.cp.apply(&docs.join("---\n")), "apply 12 mappings at once");
    let count = |phase: &str| s.phases(ns).iter().filter(|p| *p == phase).count();
    eventually("3 Active, 9 Rejected", Duration::from_secs(30), || {
        count("Active") == 3 && count("Rejected") == 9
    });
    // Retries (every conflict_retry) never admit a fourth.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!((count("Active"), count("Rejected")), (3, 9));
    assert_eq!(
        s.redis_keys("tunnox:http_domain:index:domain:quota*").len(),
        3
    );
    let group = format!(
        "tunnox:http_domain:index:group:k8s:{}/{ns}",
        cluster_id(&s.cp)
    );
    assert_eq!(s.redis.cli(&["ZCARD", &group]), "3");
    let table = phases_by_name(&s.cp, ns);
    let (rejected, _) = table
        .iter()
        .find(|(_, (phase, _))| phase == "Rejected")
        .unwrap();
    let message = s.field(
        ns,
        rejected,
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert_eq!(
        message,
        "namespace quota already has 3 mappings (controller.quota.per_namespace: 3)"
    );
    // A freed slot goes to one waiting mapping.
    let (active, _) = table
        .iter()
        .find(|(_, (phase, _))| phase == "Active")
        .unwrap();
    s.cp.kubectl_ok(&["delete", "hdm", active, "-n", ns, "--timeout=30s"]);
    eventually(
        "a waiting mapping takes the slot",
        Duration::from_secs(20),
        || count("Active") == 3 && count("Rejected") == 8,
    );
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", ns, "--timeout=60s"]),
        "clean up",
    );
    assert_eq!(s.redis.cli(&["ZCARD", &group]), "0");
    no_permission_errors(&ctl);
}

/// Two clusters, one Redis: the same 40 mappings applied to both at once give each domain
/// exactly one holder; the other cluster's mapping is `Conflict` naming the holder with its
/// cluster. A record in the legacy source form (no cluster) is taken over by exactly one.
fn two_clusters_share_one_redis(s: &Stack) {
    let ns = "shared";
    let cp2 = ControlPlane::start();
    cp2.install_crds();
    eventually(
        "kube-system in the second cluster",
        Duration::from_secs(30),
        || {
            cp2.kubectl(&["get", "namespace", "kube-system"])
                .status
                .success()
        },
    );
    cp2.kubectl_ok(&["create", "namespace", NS]);
    let (id_a, id_b) = (cluster_id(&s.cp), cluster_id(&cp2));
    assert!(!id_a.is_empty() && id_a != id_b, "{id_a} vs {id_b}");

    // An upgrade: both clusters have `shared/legacy` and the store holds its record as an older
    // controller wrote it (no cluster in the source); the new controllers start on it at once.
    let planted = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use tunnox::store::MappingStore;
        let store =
            tunnox::store::RedisStore::connect(tunnox::store::RedisOptions::new(&s.redis.addr()))
                .await
                .unwrap();
        let mut spec = tunnox::domain::MappingSpec::new("legacy", "tunnox.net", "127.0.0.1", 24000);
        spec.source = Some(format!("k8s:{ns}/legacy"));
        store.create(spec).await.unwrap()
    });

    s.cp.kubectl_ok(&["create", "namespace", ns]);
    cp2.kubectl_ok(&["create", "namespace", ns]);
    ok(
        s.cp.apply(&hdm_yaml(ns, "legacy", "legacy", 26100)),
        "legacy mapping in cluster A",
    );
    ok(
        cp2.apply(&hdm_yaml(ns, "legacy", "legacy", 27100)),
        "legacy mapping in cluster B",
    );
    let (ctl_a, admin_a) = s.controller("ctl-cluster-a");
    let (ctl_b, admin_b) =
        s.controller_with("ctl-cluster-b", std::path::Path::new(cp2.kubeconfig()), &[]);
    // Both lead before anything is applied, so the race is a real one.
    eventually("both controllers lead", Duration::from_secs(20), || {
        [admin_a, admin_b].iter().all(|p| {
            http_get(*p, "/metrics")
                .lines()
                .any(|l| l == "tunnox_controller_leader 1")
        })
    });
    let docs = |base: u16| {
        let d: Vec<String> = (0..40)
            .map(|i| hdm_yaml(ns, &format!("d{i}"), &format!("two{i}"), base + i))
            .collect();
        d.join("---\n")
    };
    let (docs_a, docs_b) = (docs(26000), docs(27000));
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        let a = scope.spawn(|| ok(s.cp.apply(&docs_a), "apply to cluster A"));
        let b = scope.spawn(|| ok(cp2.apply(&docs_b), "apply to cluster B"));
        a.join().unwrap();
        b.join().unwrap();
    });
    let settled = || {
        let (a, b) = (phases_by_name(&s.cp, ns), phases_by_name(&cp2, ns));
        a.len() == 41
            && b.len() == 41
            && a.iter().all(|(name, (pa, _))| {
                let pb = &b[name].0;
                (pa == "Active" && pb == "Conflict") || (pa == "Conflict" && pb == "Active")
            })
    };
    eventually(
        "exactly one Active and one Conflict per domain",
        Duration::from_secs(60),
        settled,
    );
    let took = started.elapsed();
    let (a, b) = (phases_by_name(&s.cp, ns), phases_by_name(&cp2, ns));
    let mut wins_a = 0;
    for (name, (phase_a, claimed_a)) in &a {
        let (_, claimed_b) = &b[name];
        // The loser names the holder with the holder's cluster.
        let (winner, loser_claimed, port_base) = if phase_a == "Active" {
            wins_a += 1;
            (&id_a, claimed_b, 26000)
        } else {
            (&id_b, claimed_a, 27000)
        };
        assert_eq!(loser_claimed, &format!("{winner}/{ns}/{name}"), "{name}");
        let sub = if name == "legacy" {
            "legacy".to_string()
        } else {
            format!("two{}", &name[1..])
        };
        let id = s.redis.cli(&[
            "GET",
            &format!("tunnox:http_domain:index:domain:{sub}.tunnox.net"),
        ]);
        let record = s
            .redis
            .cli(&["GET", &format!("tunnox:http_domain:mapping:{id}")]);
        let offset: u16 = if name == "legacy" {
            100
        } else {
            name[1..].parse().unwrap()
        };
        assert!(
            record.contains(&format!("\"source\":\"k8s:{winner}/{ns}/{name}\""))
                && record.contains(&format!("\"target_port\":{}", port_base + offset)),
            "{name}: {record}"
        );
        if name == "legacy" {
            assert_eq!(
                id,
                planted.mapping_id.as_str(),
                "the legacy record was taken over, not replaced"
            );
        }
    }
    eprintln!(
        "e2e: 41 contested domains settled {took:?} after apply: cluster A holds {wins_a}, cluster B {}",
        41 - wins_a
    );
    let holders = || {
        let mut h = s.redis_keys("tunnox:http_domain:index:domain:two*");
        h.extend(s.redis_keys("tunnox:http_domain:index:domain:legacy*"));
        h.into_iter()
            .map(|k| {
                let id = s.redis.cli(&["GET", &k]);
                (k, id)
            })
            .collect::<Vec<_>>()
    };
    let before = holders();
    assert_eq!(before.len(), 41);
    // Stable across resyncs (3 s) and conflict retries (2 s): neither cluster deletes or takes
    // the other's records.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(holders(), before, "holders changed");
    assert_eq!(phases_by_name(&s.cp, ns), a, "cluster A's phases changed");
    assert_eq!(phases_by_name(&cp2, ns), b, "cluster B's phases changed");

    // Cluster A lets go: cluster B's waiters take every domain A held.
    ok(
        s.cp.kubectl(&["delete", "hdm", "--all", "-n", ns, "--timeout=60s"]),
        "delete in cluster A",
    );
    eventually("cluster B holds all 41", Duration::from_secs(30), || {
        phases_by_name(&cp2, ns)
            .values()
            .all(|(phase, _)| phase == "Active")
    });
    ok(
        cp2.kubectl(&["delete", "hdm", "--all", "-n", ns, "--timeout=60s"]),
        "delete in cluster B",
    );
    eventually("every claim released", Duration::from_secs(20), || {
        holders().is_empty()
    });
    no_permission_errors(&ctl_a);
    drop(ctl_b);
}

/// The controller's permissions as the chart grants them: (scope, group, resource, name or "",
/// verb), from the rendered ClusterRole and Role bound to its ServiceAccount.
fn chart_permissions(rendered: &str) -> Vec<access::Permission> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let Ok(v) = serde_yaml::Value::deserialize(doc) else {
            continue;
        };
        let scope = match v["kind"].as_str() {
            Some("ClusterRole") => access::Scope::Cluster,
            Some("Role") => access::Scope::OwnNamespace,
            _ => continue,
        };
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        if !name.starts_with("tunnox-controller") {
            continue;
        }
        let strings = |x: &serde_yaml::Value| -> Vec<String> {
            x.as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|i| i.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        for rule in v["rules"].as_sequence().cloned().unwrap_or_default() {
            let mut names = strings(&rule["resourceNames"]);
            if names.is_empty() {
                names.push(String::new());
            }
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for n in &names {
                        for verb in strings(&rule["verbs"]) {
                            out.push((scope, group.clone(), resource.clone(), n.clone(), verb));
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// One API request of the controller, from the API server's audit log.
#[derive(Debug)]
struct Call {
    verb: String,
    group: String,
    resource: String,
    namespace: String,
    name: String,
    code: i64,
}

/// Requests made with the controller's ServiceAccount token by anything but kubectl since
/// `since`, one per request (watches are logged when they start).
fn controller_calls(audit_log: &str, since: chrono::DateTime<chrono::Utc>) -> Vec<Call> {
    let user = format!("system:serviceaccount:{NS}:tunnox-controller");
    let text = std::fs::read_to_string(audit_log).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let at = e["requestReceivedTimestamp"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if e["user"]["username"] != user.as_str()
            || e["userAgent"]
                .as_str()
                .unwrap_or_default()
                .starts_with("kubectl")
            || at.is_none_or(|t| t < since)
            || !seen.insert(e["auditID"].as_str().unwrap_or_default().to_string())
        {
            continue;
        }
        let o = &e["objectRef"];
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let mut resource = s(&o["resource"]);
        if let Some(sub) = o["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        calls.push(Call {
            verb: s(&e["verb"]),
            group: s(&o["apiGroup"]),
            resource,
            namespace: s(&o["namespace"]),
            name: s(&o["name"]),
            code: e["responseStatus"]["code"].as_i64().unwrap_or(0),
        });
    }
    calls
}

/// RBAC is exactly what the code calls (issue 14): the chart grants the list in
/// src/controller/access.rs, no more and no less; the controller, run as the chart's
/// ServiceAccount through a mapping's life (claim, move, move back, delete) and a leader
/// election from scratch, makes only calls that list names, all allowed, and uses every entry.
fn controller_rbac_is_what_it_calls(s: &Stack) {
    // The chart with its defaults, with ACME, with the management API: each adds its Role
    // and rules only when configured.
    let with = |extra: &[&access::Grant]| -> Vec<access::Grant> {
        access::GRANTS
            .iter()
            .chain(extra.iter().copied())
            .copied()
            .collect()
    };
    let acme: Vec<&access::Grant> = access::ACME_GRANTS.iter().collect();
    let api: Vec<&access::Grant> = access::API_GRANTS.iter().collect();
    for (set, grants) in [
        (None, with(&[])),
        (
            Some(
                "https.enabled=true,https.storeKeySecret.name=k,https.acme.directoryUrl=https://acme.example/dir",
            ),
            with(&acme),
        ),
        (Some("api.enabled=true,api.tokensSecret.name=t"), with(&api)),
    ] {
        let chart = format!("{ROOT}/charts/tunnox");
        let mut args = vec!["template", "tunnox", chart.as_str(), "--namespace", NS];
        args.extend(set.iter().flat_map(|v| ["--set", *v]));
        let rendered = &ok(s.cp.helm(&args), &format!("helm template {set:?}"));
        let granted = chart_permissions(rendered);
        let declared = access::permissions(&grants);
        let extra: Vec<_> = granted.iter().filter(|p| !declared.contains(p)).collect();
        let missing: Vec<_> = declared.iter().filter(|p| !granted.contains(p)).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "controller-rbac.yaml differs from src/controller/access.rs:\n  in the chart only: {extra:?}\n  in access.rs only: {missing:?}"
        );
    }

    let declared = access::permissions(access::GRANTS);
    let since = chrono::Utc::now() - chrono::Duration::seconds(1);
    // From scratch, so the Lease is created, read and renewed.
    s.cp.kubectl_ok(&[
        "delete",
        "lease",
        "tunnox-controller",
        "-n",
        NS,
        "--ignore-not-found",
    ]);
    let (mut ctl, _) = s.controller("ctl-rbac");
    let ns = "rbac-audit";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    // (Not 8080 or 9090: the chart's proxy ports are the proxies' own, refused as targets.)
    ok(s.cp.apply(&hdm_yaml(ns, "m", "audit-a", 3001)), "apply");
    eventually("Active", Duration::from_secs(20), || {
        s.phase(ns, "m") == "Active"
    });
    let claim = |d: &str| s.redis_keys(&format!("tunnox:http_domain:index:domain:{d}.tunnox.net"));
    // Moving the domain away and back repeats the event "claimed audit-a…": a patch.
    s.patch(ns, "m", r#"{"spec":{"subdomain":"audit-b"}}"#);
    eventually("moved", Duration::from_secs(20), || {
        claim("audit-b").len() == 1 && claim("audit-a").is_empty()
    });
    s.patch(ns, "m", r#"{"spec":{"subdomain":"audit-a"}}"#);
    eventually("moved back", Duration::from_secs(20), || {
        claim("audit-a").len() == 1 && claim("audit-b").is_empty()
    });
    ok(
        s.cp.kubectl(&["delete", "hdm", "m", "-n", ns, "--timeout=30s"]),
        "delete (finalizer removed)",
    );
    // A TunnelSet's life: its Secret read, the credential written, a remote port claimed and
    // its Service applied, status applied, the finalizer added and removed, the Service
    // deleted.
    s.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "audit-token",
        "-n",
        ns,
        "--from-literal=token=audit-secret-token",
    ]);
    let with_tunnel = tunnelset_yaml(ns, "audit", "audit-client", "audit-token").replace(
        "placement: {business: default, region: default}}",
        "placement: {business: default, region: default}, tunnels: [{name: ssh, localHost: 127.0.0.1, localPort: 22}]}",
    );
    ok(s.cp.apply(&with_tunnel), "apply TunnelSet");
    eventually(
        "TunnelSet Accepted, its Service made",
        Duration::from_secs(20),
        || {
            ts_condition(s, ns, "audit", "Accepted") == "True/CredentialWritten"
                && ts_field(s, ns, "audit", "{.status.endpoint}")
                    .starts_with("tunnox-ts-rbac-audit-audit.")
        },
    );
    ok(
        s.cp.kubectl(&["delete", "ts", "audit", "-n", ns, "--timeout=30s"]),
        "delete TunnelSet (finalizer removed)",
    );
    assert!(
        s.redis_keys("tunnox:tunnel:client:audit-client:auth")
            .is_empty()
    );
    // A few lease renewals (renew interval 1 s).
    std::thread::sleep(Duration::from_secs(3));
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);

    let calls = controller_calls(s.cp.var("AUDIT_LOG"), since);
    assert!(!calls.is_empty(), "no audited call: is the audit log on?");
    let mut used = std::collections::BTreeSet::new();
    let mut unlisted = Vec::new();
    for c in &calls {
        assert_ne!(c.code, 403, "forbidden: {c:?}");
        let hit = declared
            .iter()
            .find(|(scope, group, resource, name, verb)| {
                *group == c.group
                    && *resource == c.resource
                    && *verb == c.verb
                    && (name.is_empty() || *name == c.name)
                    && match scope {
                        access::Scope::Cluster => true,
                        access::Scope::OwnNamespace => c.namespace == NS,
                    }
            });
        match hit {
            Some(p) => {
                used.insert(p.clone());
            }
            None => unlisted.push(c),
        }
    }
    assert!(
        unlisted.is_empty(),
        "calls src/controller/access.rs does not list: {unlisted:?}"
    );
    // Server-side apply of a Service that does not exist yet is authorized as create but
    // audited as the patch it is.
    if used
        .iter()
        .any(|(_, _, r, _, v)| r == "services" && v == "patch")
    {
        used.insert((
            access::Scope::OwnNamespace,
            String::new(),
            "services".into(),
            String::new(),
            "create".into(),
        ));
    }
    let unused: Vec<_> = declared.iter().filter(|p| !used.contains(*p)).collect();
    assert!(
        unused.is_empty(),
        "granted but never called during a mapping's life and an election: {unused:?}"
    );
    eprintln!(
        "e2e: {} controller calls audited, {} permissions each used",
        calls.len(),
        used.len()
    );
}

/// A TunnelSet for `client` whose token is in Secret `secret` (key `token`), placed in the
/// chart's proxy set `default.default`.
fn tunnelset_yaml(ns: &str, name: &str, client: &str, secret: &str) -> String {
    format!(
        "apiVersion: tunnox.net/v1alpha1\nkind: TunnelSet\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clientId: {client}, auth: {{secretRef: {{name: {secret}}}}}, placement: {{business: default, region: default}}}}\n"
    )
}

/// `status/reason` of a TunnelSet's condition, e.g. `True/CredentialWritten`; `/` when absent.
fn ts_condition(s: &Stack, ns: &str, name: &str, kind: &str) -> String {
    text(&s.cp.kubectl(&[
        "get",
        "ts",
        name,
        "-n",
        ns,
        "-o",
        &format!(
            "jsonpath={{.status.conditions[?(@.type==\"{kind}\")].status}}/{{.status.conditions[?(@.type==\"{kind}\")].reason}}"
        ),
    ]))
    .trim()
    .to_string()
}

fn ts_field(s: &Stack, ns: &str, name: &str, jsonpath: &str) -> String {
    text(&s.cp.kubectl(&[
        "get",
        "ts",
        name,
        "-n",
        ns,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ]))
}

/// The client's credential as stored (`tunnox:tunnel:client:{id}:auth`); empty when absent.
fn credential_json(s: &Stack, client: &str) -> String {
    s.redis
        .cli(&["GET", &format!("tunnox:tunnel:client:{client}:auth")])
        .trim()
        .to_string()
}

/// Issue 15, "Cluster": a TunnelSet's Secret becomes a credential (a hash, never the token) in
/// Redis, an HTTPDomainMapping with a tunnel target is programmed with the TunnelSet's placement
/// once the TunnelSet is accepted, a missing Secret shows in the status and is picked up when it
/// appears (default recheck interval, no change to the TunnelSet), a rotated token replaces the
/// hash, a second TunnelSet with the same client id is refused naming the holder, and deleting
/// the TunnelSet removes the credential and parks the mapping.
fn tunnel_set_with_secret_admits_agent_and_serves_mapping(s: &Stack) {
    let ns = "e2e-tunnel";
    let client = "laptop-e2e";
    let token = "e2e-tunnel-token-4f9c2a";
    let cluster = cluster_id(&s.cp);
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    let upstream = support::http::Upstream::start("behind-the-agent");
    // First with the default recheck (controller.resync_interval 30 s): what "picked up within
    // ~30 s" means for users.
    let (mut ctl, _) = s.controller_with(
        "ctl-tunnel",
        &s.sa_kubeconfig,
        &[("TUNNOX__CONTROLLER__RESYNC_INTERVAL", "30s".to_string())],
    );
    let hdm = format!(
        "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: tun, namespace: {ns}}}\n\
         spec: {{subdomain: tun, baseDomain: tunnox.net, placement: {{business: other, region: bj}}, \
         target: {{tunnel: {{clientId: {client}, host: 127.0.0.1, port: {}}}}}}}\n",
        upstream.port
    );
    // The mapping first: it waits for its client's TunnelSet.
    ok(s.cp.apply(&hdm), "apply tunnel mapping");
    let ready = |name: &str| {
        format!(
            "{}/{}",
            s.field(
                ns,
                name,
                "{.status.conditions[?(@.type==\"Ready\")].status}"
            ),
            s.field(
                ns,
                name,
                "{.status.conditions[?(@.type==\"Ready\")].reason}"
            )
        )
    };
    eventually(
        "mapping Pending TunnelSetNotFound",
        Duration::from_secs(20),
        || ready("tun") == "False/TunnelSetNotFound",
    );
    assert_eq!(s.phase(ns, "tun"), "Pending");
    assert!(
        s.field(
            ns,
            "tun",
            "{.status.conditions[?(@.type==\"Ready\")].message}"
        )
        .contains(client)
    );

    // A TunnelSet whose Secret does not exist yet.
    ok(
        s.cp.apply(&tunnelset_yaml(ns, "laptop", client, "laptop-token")),
        "apply TunnelSet",
    );
    eventually(
        "Accepted=False SecretNotFound",
        Duration::from_secs(20),
        || ts_condition(s, ns, "laptop", "Accepted") == "False/SecretNotFound",
    );
    let message = ts_field(
        s,
        ns,
        "laptop",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert!(
        message.contains(&format!("Secret {ns}/laptop-token")),
        "{message}"
    );
    assert_eq!(
        credential_json(s, client),
        "",
        "no credential without a Secret"
    );
    assert_eq!(ts_condition(s, ns, "laptop", "Online"), "False/NoSession");
    assert_eq!(s.phase(ns, "tun"), "Pending");

    // The Secret appears: picked up at the next recheck, the TunnelSet untouched.
    let generation = ts_field(s, ns, "laptop", "{.metadata.generation}");
    s.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "laptop-token",
        "-n",
        ns,
        &format!("--from-literal=token={token}"),
    ]);
    let took = eventually(
        "Accepted once the Secret exists",
        Duration::from_secs(45),
        || ts_condition(s, ns, "laptop", "Accepted") == "True/CredentialWritten",
    );
    eprintln!("e2e: Secret created → TunnelSet Accepted in {took:?}");
    assert_eq!(
        ts_field(s, ns, "laptop", "{.metadata.generation}"),
        generation
    );
    assert_eq!(
        ts_field(s, ns, "laptop", "{.status.set}"),
        "default.default"
    );
    assert_eq!(ts_field(s, ns, "laptop", "{.status.clientId}"), client);
    let cred: serde_json::Value = serde_json::from_str(&credential_json(s, client)).unwrap();
    assert_eq!(
        cred["token_sha256"].as_str(),
        Some(
            tunnox::tunnel::credential::TokenHash::of(token)
                .to_hex()
                .as_str()
        )
    );
    assert_eq!(cred["client_id"], client);
    assert_eq!(cred["placement"], "default.default");
    assert_eq!(
        cred["source"].as_str(),
        Some(format!("k8s:{cluster}/{ns}/laptop").as_str())
    );
    assert!(
        !credential_json(s, client).contains(token),
        "a hash, never the token"
    );

    // The mapping is woken and programmed: the tunnel target, the TunnelSet's placement.
    eventually("mapping Active", Duration::from_secs(10), || {
        s.phase(ns, "tun") == "Active"
    });
    assert_eq!(
        s.field(ns, "tun", "{.status.target}"),
        format!("tunnel:{client}/127.0.0.1:{}", upstream.port)
    );
    assert_eq!(s.field(ns, "tun", "{.status.set}"), "default.default");
    let accepted = s.field(
        ns,
        "tun",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert!(
        accepted.contains("spec.placement other.bj is ignored for a tunnel target"),
        "{accepted}"
    );
    let id = s.field(ns, "tun", "{.status.mappingId}");
    let record: serde_json::Value = serde_json::from_str(
        s.redis
            .cli(&["GET", &format!("tunnox:http_domain:mapping:{id}")])
            .trim(),
    )
    .unwrap();
    assert_eq!(record["target_client_id"], client);
    assert_eq!(record["target_host"], "127.0.0.1");
    assert_eq!(record["target_port"], upstream.port);
    assert_eq!(record["placement"], "default.default");
    assert_eq!(
        s.redis
            .cli(&[
                "ZRANGE",
                &format!("tunnox:http_domain:index:client:{client}"),
                "0",
                "-1"
            ])
            .trim(),
        id
    );

    // The part that needs `tunnox agent` and the proxy's tunnel listener.
    tunnel_traffic_through_agent(s, client, token, &upstream);

    // The rest with a short recheck (3 s), under a new leader: what was programmed stays.
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);
    let first_log = ctl.log();
    let (mut ctl, _) = s.controller("ctl-tunnel-2");
    eventually("the new controller leads", Duration::from_secs(20), || {
        ctl.log().contains("leading: reconciling")
    });
    // It reconciles everything when it starts: the mapping keeps its record, since the
    // credential it is programmed by is in Redis, not in the old leader's memory.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.phase(ns, "tun"), "Active");
    assert_eq!(s.field(ns, "tun", "{.status.mappingId}"), id);
    assert_eq!(
        ts_condition(s, ns, "laptop", "Accepted"),
        "True/CredentialWritten"
    );

    // A second TunnelSet with the same client id: refused, naming the holder.
    ok(
        s.cp.apply(&tunnelset_yaml(ns, "laptop-dup", client, "laptop-token")),
        "apply duplicate TunnelSet",
    );
    eventually("duplicate refused", Duration::from_secs(20), || {
        ts_condition(s, ns, "laptop-dup", "Accepted") == "False/ClientIdConflict"
    });
    let message = ts_field(
        s,
        ns,
        "laptop-dup",
        "{.status.conditions[?(@.type==\"Accepted\")].message}",
    );
    assert!(
        message.contains(&format!("held by TunnelSet {ns}/laptop")),
        "{message}"
    );
    // Its deletion leaves the holder's credential alone.
    ok(
        s.cp.kubectl(&["delete", "ts", "laptop-dup", "-n", ns, "--timeout=30s"]),
        "delete duplicate",
    );
    assert_eq!(
        cred["source"].as_str().unwrap(),
        serde_json::from_str::<serde_json::Value>(&credential_json(s, client)).unwrap()["source"]
    );

    // A Secret without the key: refused, naming Secret and key.
    s.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "wrong-key",
        "-n",
        ns,
        "--from-literal=password=x",
    ]);
    ok(
        s.cp.apply(&tunnelset_yaml(ns, "badkey", "badkey-e2e", "wrong-key")),
        "apply TunnelSet with a Secret without the key",
    );
    eventually("SecretKeyMissing", Duration::from_secs(20), || {
        ts_condition(s, ns, "badkey", "Accepted") == "False/SecretKeyMissing"
    });
    assert!(
        ts_field(
            s,
            ns,
            "badkey",
            "{.status.conditions[?(@.type==\"Accepted\")].message}"
        )
        .contains(&format!("Secret {ns}/wrong-key has no key \"token\""))
    );
    assert_eq!(credential_json(s, "badkey-e2e"), "");
    ok(
        s.cp.kubectl(&["delete", "ts", "badkey", "-n", ns, "--timeout=30s"]),
        "delete badkey",
    );

    // A rotated token replaces the hash at the next recheck.
    let rotated = "e2e-tunnel-token-rotated-77d1";
    let patch = format!("{{\"stringData\":{{\"token\":\"{rotated}\"}}}}");
    s.cp.kubectl_ok(&["patch", "secret", "laptop-token", "-n", ns, "-p", &patch]);
    let want = tunnox::tunnel::credential::TokenHash::of(rotated).to_hex();
    let took = eventually(
        "rotated token's hash stored",
        Duration::from_secs(45),
        || credential_json(s, client).contains(&want),
    );
    eprintln!("e2e: Secret rotated → credential replaced in {took:?} (recheck 3 s)");

    // The Secret deleted: the credential goes (an agent with the old token stops being
    // admitted) and the mapping parks.
    s.cp.kubectl_ok(&["delete", "secret", "laptop-token", "-n", ns]);
    eventually(
        "credential removed with its Secret",
        Duration::from_secs(45),
        || {
            credential_json(s, client).is_empty()
                && ts_condition(s, ns, "laptop", "Accepted") == "False/SecretNotFound"
        },
    );
    eventually("mapping parked", Duration::from_secs(10), || {
        ready("tun") == "False/TunnelSetNotFound"
    });
    s.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "laptop-token",
        "-n",
        ns,
        &format!("--from-literal=token={token}"),
    ]);
    eventually("Accepted again", Duration::from_secs(20), || {
        ts_condition(s, ns, "laptop", "Accepted") == "True/CredentialWritten"
            && s.phase(ns, "tun") == "Active"
    });

    // Deleting the TunnelSet removes the credential; the mapping waits again, its record gone.
    ok(
        s.cp.kubectl(&["delete", "ts", "laptop", "-n", ns, "--timeout=30s"]),
        "delete TunnelSet (finalizer removes the credential)",
    );
    assert_eq!(
        credential_json(s, client),
        "",
        "credential removed before the TunnelSet went"
    );
    eventually("mapping Pending again", Duration::from_secs(10), || {
        ready("tun") == "False/TunnelSetNotFound"
    });
    assert!(
        s.redis_keys(&format!("tunnox:http_domain:mapping:{id}"))
            .is_empty(),
        "record released"
    );
    ok(
        s.cp.kubectl(&["delete", "hdm", "tun", "-n", ns, "--timeout=30s"]),
        "delete mapping",
    );

    // The token never reaches status, events or the log.
    let everything = format!(
        "{}{}{}",
        s.cp.kubectl_ok(&["get", "events", "-n", ns, "-o", "yaml"]),
        s.cp.kubectl_ok(&["get", "ts", "-A", "-o", "yaml"]),
        first_log + &ctl.log()
    );
    for t in [token, rotated] {
        assert!(!everything.contains(t), "the token {t} leaked");
    }
    let events = s.cp.kubectl_ok(&["get", "events", "-n", ns]);
    assert!(
        events.contains("SecretNotFound") && events.contains("Accepted"),
        "{events}"
    );
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);
}

/// Agent + proxy: `tunnox proxy` with the chart's configuration and a TLS tunnel listener,
/// `tunnox agent` with the TunnelSet's token and an allow-list of the upstream only; `curl`
/// (a raw HTTP client) through the proxy with the mapping's Host reaches the upstream behind
/// the agent. Assumes the mapping `tun.tunnox.net` is Active for `client`.
/// A throwaway CA and a loopback server certificate signed by it, in `dir`: (ca, cert, key).
fn tunnel_certs(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    // A throwaway CA and a loopback server certificate signed by it (rustls refuses a CA
    // certificate as the server's own).
    let (ca, cert, key) = (
        dir.join("ca.crt"),
        dir.join("tunnel.crt"),
        dir.join("tunnel.key"),
    );
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let p = |f: &std::path::Path| f.display().to_string();
    let ca_key = dir.join("ca.key");
    let csr = dir.join("tunnel.csr");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (what, args) in [
        (
            "CA",
            [
                &["req", "-x509"][..],
                &ec,
                &["-days", "1", "-subj", "/CN=tunnox-e2e-ca"],
            ]
            .concat()
            .iter()
            .map(|a| a.to_string())
            .chain(["-keyout".into(), p(&ca_key), "-out".into(), p(&ca)])
            .collect::<Vec<String>>(),
        ),
        (
            "request",
            [&["req"][..], &ec, &["-subj", "/CN=localhost"]]
                .concat()
                .iter()
                .map(|a| a.to_string())
                .chain(["-keyout".into(), p(&key), "-out".into(), p(&csr)])
                .collect(),
        ),
        (
            "certificate",
            ["x509", "-req", "-days", "1", "-CAcreateserial"]
                .iter()
                .map(|a| a.to_string())
                .chain([
                    "-in".into(),
                    p(&csr),
                    "-CA".into(),
                    p(&ca),
                    "-CAkey".into(),
                    p(&ca_key),
                    "-extfile".into(),
                    p(&ext),
                    "-out".into(),
                    p(&cert),
                ])
                .collect(),
        ),
    ] {
        let made = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .unwrap();
        ok(made, &format!("openssl: tunnel {what}"));
    }
    (ca, cert, key)
}

/// A proxy of set default.default with a TLS tunnel listener (the chart's configuration, loopback
/// addresses): (the process, its HTTP port, its tunnel port).
fn tunnel_proxy(
    s: &Stack,
    name: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (Role, u16, u16) {
    let tunnel_port = free_port();
    let port = free_port();
    let admin = free_port();
    let env = vec![
        ("TUNNOX__PROXY__SET", "default.default".to_string()),
        ("TUNNOX__PROXY__NODE_ID", name.to_string()),
        ("TUNNOX__STORAGE__REDIS__ADDR", s.redis.addr()),
        ("TUNNOX__STORAGE__REDIS__PASSWORD_FILE", String::new()),
        ("TUNNOX__PROXY__LISTEN", format!("127.0.0.1:{port}")),
        ("TUNNOX__PROXY__ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
        ("TUNNOX__EGRESS__ALLOW", "[\"127.0.0.0/8\"]".to_string()),
        (
            "TUNNOX__PROXY__TUNNEL__LISTEN",
            format!("127.0.0.1:{tunnel_port}"),
        ),
        (
            "TUNNOX__PROXY__TUNNEL__CERT_FILE",
            cert.display().to_string(),
        ),
        ("TUNNOX__PROXY__TUNNEL__KEY_FILE", key.display().to_string()),
    ];
    let proxy = Role::start(
        &["--config", s.config.to_str().unwrap(), "proxy"],
        &env,
        &s.dir.path().join(format!("{name}.log")),
    );
    eventually("proxy ready", Duration::from_secs(20), || {
        support::http::get(admin, "localhost", "/readyz").is_some_and(|r| r.status == 200)
    });
    (proxy, port, tunnel_port)
}

fn tunnel_traffic_through_agent(
    s: &Stack,
    client: &str,
    token: &str,
    upstream: &support::http::Upstream,
) {
    let dir = s.dir.path().join("tunnel");
    let (ca, cert, key) = tunnel_certs(&dir);
    let (mut proxy, port, tunnel_port) = tunnel_proxy(s, "proxy-tunnel", &cert, &key);
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let agent_config = dir.join("agent.yaml");
    std::fs::write(
        &agent_config,
        format!(
            "agent:\n  server: \"127.0.0.1:{tunnel_port}\"\n  server_name: localhost\n  client_id: \"{client}\"\n  token_file: \"{}\"\n  ca_file: \"{}\"\n  allow: [\"127.0.0.1:{}\"]\n",
            token_file.display(),
            ca.display(),
            upstream.port
        ),
    )
    .unwrap();
    let mut agent = Role::start(
        &["--config", agent_config.to_str().unwrap(), "agent"],
        &[],
        &s.dir.path().join("agent.log"),
    );
    // By hand rather than `eventually`: a failure shows both logs (TLS, auth, allow-list).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let last = support::http::get(port, "tun.tunnox.net", "/").map(|r| (r.status, r.body));
        if last
            .as_ref()
            .is_some_and(|(st, b)| *st == 200 && b == "hello from behind-the-agent\n")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not served through the tunnel within 20 s (last answer {last:?})\n--- proxy log:\n{}\n--- agent log:\n{}",
            proxy.log(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("e2e: served through the agent's session");
    // The session is registered where other proxies find it.
    assert_eq!(
        s.redis_keys(&format!("tunnox:client:{client}:session"))
            .len(),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.log()
    );
    eventually(
        "offline once the agent left",
        Duration::from_secs(10),
        || support::http::status(port, "tun.tunnox.net") == 502,
    );
    assert_eq!(
        proxy.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        proxy.log()
    );
}

/// TunnelSet remote ports in a cluster: the controller claims them in Redis, the proxy of the
/// set listens, TCP and UDP reach the agent's local services; a second TunnelSet asking for a
/// held port shows `Conflict` naming the holder and takes the port over when the holder goes.
fn tunnel_set_remote_ports_reach_the_agent_and_conflicts_take_over(s: &Stack) {
    use std::io::{Read, Write};
    let ns = "e2e-ports";
    let token = "e2e-ports-token-31b7";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    s.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "ports-token",
        "-n",
        ns,
        &format!("--from-literal=token={token}"),
    ]);
    // A TCP echo and a UDP echo on loopback: the agent's local services.
    let tcp_echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp_echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in tcp_echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let mut w = c;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    // A second TCP service the echo tunnel is moved to below: it answers in capitals.
    let upper = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upper_port = upper.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in upper.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let udp_echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp_echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf) {
            let _ = udp_echo.send_to(&buf[..n], from);
        }
    });
    // Two free ports, and a remote port range holding both.
    let (a, b) = (free_port(), free_port());
    let range = format!("[{}, {}]", a.min(b), a.max(b));
    let (mut ctl, _) = s.controller_with(
        "ctl-ports",
        &s.sa_kubeconfig,
        &[
            ("TUNNOX__CONTROLLER__REMOTE_PORT_RANGE", range),
            // Long: what shows within 2 s below comes from the proxies' announcements.
            ("TUNNOX__CONTROLLER__RESYNC_INTERVAL", "60s".to_string()),
        ],
    );
    let ts = |name: &str, client: &str, tunnels: &str| {
        format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: TunnelSet\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{clientId: {client}, auth: {{secretRef: {{name: ports-token}}}}, placement: {{business: default, region: default}}, tunnels: [{tunnels}]}}\n"
        )
    };
    // ports-a, its echo tunnel aimed at local port `echo_to`.
    let ports_a = |echo_to: u16| {
        ts(
            "ports-a",
            "ports-e2e",
            &format!(
                "{{name: echo, localHost: 127.0.0.1, localPort: {echo_to}, remotePort: {a}}}, \
                 {{name: dns, type: udp, localHost: 127.0.0.1, localPort: {udp_port}, remotePort: {b}, udpSessionTimeoutSeconds: 5}}, \
                 {{name: web, localHost: 127.0.0.1, localPort: 80, remotePort: 443}}"
            ),
        )
    };
    ok(
        s.cp.apply(&ports_a(tcp_port)),
        "apply TunnelSet with tunnels",
    );
    let tunnel_states = |name: &str| {
        ts_field(
            s,
            ns,
            name,
            "{range .status.tunnels[*]}{.name}={.state}:{.remotePort};{end}",
        )
    };
    let want = format!("echo=Listening:{a};dns=Listening:{b};web=Invalid:;");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tunnel_states("ports-a") != want {
        assert!(
            std::time::Instant::now() < deadline,
            "ports not claimed within 20 s: {}\n--- controller log:\n{}",
            tunnel_states("ports-a"),
            ctl.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ts_field(s, ns, "ports-a", "{.status.tunnels[2].message}").contains("443"),
        "a port outside the range is refused, naming it"
    );
    assert_eq!(ts_field(s, ns, "ports-a", "{.status.tunnelCount}"), "3");
    // The Service publishing the held ports on the set's proxy pods, in the release namespace.
    let svc = "tunnox-ts-e2e-ports-ports-a";
    eventually("the TunnelSet's Service", Duration::from_secs(20), || {
        ts_field(s, ns, "ports-a", "{.status.endpoint}") == format!("{svc}.{NS}.svc")
    });
    let ports = text(&s.cp.kubectl(&[
        "get",
        "svc",
        svc,
        "-n",
        NS,
        "-o",
        "jsonpath={range .spec.ports[*]}{.port}/{.protocol};{end}|{.spec.selector.tunnox\\.net/set}|{.metadata.labels.tunnox\\.net/tunnelset-name}",
    ]))
    .trim()
    .to_string();
    assert_eq!(ports, format!("{a}/TCP;{b}/UDP;|default.default|ports-a"));
    let claims = s.redis.cli(&["HGETALL", "tunnox:ports:default"]);
    assert!(
        claims.contains(&format!("127.0.0.1:{tcp_port}")),
        "{claims}"
    );

    // The proxy of the set listens on the claimed ports; the agent carries the connections.
    let dir = s.dir.path().join("ports");
    let (ca, cert, key) = tunnel_certs(&dir);
    let (proxy, _port, tunnel_port) = tunnel_proxy(s, "proxy-ports", &cert, &key);
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut agent = Role::start(
        &[
            "agent",
            "--server",
            &format!("127.0.0.1:{tunnel_port}"),
            "--server-name",
            "localhost",
            "--client-id",
            "ports-e2e",
            "--token-file",
            token_file.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
            "--allow",
            &format!("127.0.0.1:{tcp_port}"),
            "--allow",
            &format!("127.0.0.1:{udp_port}"),
            "--allow",
            &format!("127.0.0.1:{upper_port}"),
        ],
        &[],
        &s.dir.path().join("agent-ports.log"),
    );
    let tcp_round_trip = |port: u16| -> Option<Vec<u8>> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        c.write_all(b"through the tunnel").ok()?;
        let mut buf = [0u8; 18];
        c.read_exact(&mut buf).ok()?;
        Some(buf.to_vec())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tcp_round_trip(a).as_deref() != Some(&b"through the tunnel"[..]) {
        assert!(
            std::time::Instant::now() < deadline,
            "remote TCP port not served within 20 s\n--- proxy log:\n{}\n--- agent log:\n{}",
            proxy.log(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = None;
    for _ in 0..10 {
        udp.send_to(b"datagram", ("127.0.0.1", b)).unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = udp.recv(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"datagram"[..]), "{}", agent.log());
    eprintln!("e2e: TCP and UDP through TunnelSet remote ports");

    // Configuration push: the agent acknowledged its tunnels' hash; `get ts -o wide` shows it.
    let wide = || {
        text(
            &s.cp
                .kubectl(&["get", "ts", "ports-a", "-n", ns, "-o", "wide"]),
        )
    };
    let hash = |s_: &Stack| ts_field(s_, ns, "ports-a", "{.status.configHash}");
    eventually("the acknowledged hash", Duration::from_secs(5), || {
        hash(s).starts_with("sha256:")
    });
    let first = hash(s);
    assert!(wide().contains(&first), "{}", wide());
    // The echo tunnel moves to the capitals service: the agent is pushed the change, the port
    // serves the new target, and the new hash is acknowledged — no process restarts.
    ok(s.cp.apply(&ports_a(upper_port)), "move the echo tunnel");
    let moved = eventually("the moved tunnel serves", Duration::from_secs(10), || {
        tcp_round_trip(a).as_deref() == Some(&b"THROUGH THE TUNNEL"[..])
    });
    let acked = eventually("the new hash acknowledged", Duration::from_secs(5), || {
        let h = hash(s);
        h.starts_with("sha256:") && h != first
    });
    let second = hash(s);
    assert!(wide().contains(&second), "{}", wide());
    eprintln!(
        "e2e: local port changed → served in {moved:?}, hash {second} acknowledged after {acked:?}"
    );
    // A target the agent's allow list does not hold: acknowledged, and the tunnel `Rejected`
    // with the agent's reason.
    ok(
        s.cp.apply(&ports_a(1)),
        "aim the echo tunnel at a port the agent refuses",
    );
    eventually("Rejected by the agent", Duration::from_secs(10), || {
        tunnel_states("ports-a").starts_with(&format!("echo=Rejected:{a};"))
    });
    let message = ts_field(s, ns, "ports-a", "{.status.tunnels[0].message}");
    assert!(
        message.contains("127.0.0.1:1 is not in this agent's allow list"),
        "{message}"
    );
    ok(s.cp.apply(&ports_a(tcp_port)), "aim the echo tunnel back");
    eventually("Listening again", Duration::from_secs(10), || {
        tunnel_states("ports-a") == want && hash(s) == first
    });
    assert!(agent.is_running(), "the agent was not restarted");
    let sessions_opened = proxy.log().matches("tunnel session opened").count();
    assert_eq!(
        sessions_opened,
        1,
        "one session throughout:\n{}",
        proxy.log()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tcp_round_trip(a).as_deref() != Some(&b"through the tunnel"[..]) {
        assert!(std::time::Instant::now() < deadline, "echo back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A connection's traffic is counted when it ends.
    eventually(
        "the TCP connection's traffic",
        Duration::from_secs(5),
        || {
            s.redis
                .cli(&[
                    "HGET",
                    "tunnox:ports:default:traffic",
                    &format!("{a}:bytes_in"),
                ])
                .trim()
                .parse::<u64>()
                .is_ok_and(|n| n >= 18)
        },
    );
    // The agent's session shows in status within 2 s, and so does its leaving (event-driven:
    // the resync is 60 s here).
    let online = eventually("Online within 2 s", Duration::from_secs(2), || {
        ts_condition(s, ns, "ports-a", "Online") == "True/SessionsSeen"
    });
    assert_eq!(ts_field(s, ns, "ports-a", "{.status.node}"), "proxy-ports");
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.log()
    );
    let offline = eventually("offline within 2 s", Duration::from_secs(2), || {
        ts_condition(s, ns, "ports-a", "Online") == "False/NoSession"
    });
    eprintln!(
        "e2e: status Online {online:?} after traffic flowed; offline {offline:?} after the agent left"
    );
    // What the ports carried: the TCP echo's connections in status (each carried 18 bytes each
    // way), the UDP flow's (ended with the agent) in the set's traffic.
    let echo_traffic = ts_field(
        s,
        ns,
        "ports-a",
        "{.status.tunnels[0].connections}/{.status.tunnels[0].bytesIn}/{.status.tunnels[0].bytesOut}",
    );
    let n: Vec<u64> = echo_traffic
        .split('/')
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    assert!(
        n[0] >= 1 && n[1] == 18 * n[0] && n[2] == 18 * n[0],
        "connections/bytesIn/bytesOut {echo_traffic}; in the store: {}",
        s.redis
            .cli(&["HGETALL", "tunnox:ports:default:traffic"])
            .replace('\n', " ")
    );
    eventually("the UDP flow's traffic", Duration::from_secs(5), || {
        s.redis
            .cli(&[
                "HGET",
                "tunnox:ports:default:traffic",
                &format!("{b}:bytes_in"),
            ])
            .trim()
            == "8"
    });

    // Another TunnelSet asks for a held port: Conflict naming the holder.
    ok(
        s.cp.apply(&ts(
            "ports-b",
            "ports-e2e-2",
            &format!(
                "{{name: other, localHost: 127.0.0.1, localPort: {tcp_port}, remotePort: {a}}}"
            ),
        )),
        "apply conflicting TunnelSet",
    );
    eventually("Conflict", Duration::from_secs(20), || {
        tunnel_states("ports-b") == format!("other=Conflict:{a};")
    });
    let message = ts_field(s, ns, "ports-b", "{.status.tunnels[0].message}");
    assert!(message.contains(&format!("{ns}/ports-a")), "{message}");
    // The holder goes: the port is taken over without anyone touching ports-b.
    ok(
        s.cp.kubectl(&["delete", "ts", "ports-a", "-n", ns, "--timeout=30s"]),
        "delete the holder",
    );
    let took = eventually("taken over", Duration::from_secs(20), || {
        tunnel_states("ports-b") == format!("other=Listening:{a};")
    });
    eprintln!("e2e: holder deleted → port taken over in {took:?}");
    let claims = s.redis.cli(&["HGETALL", "tunnox:ports:default"]);
    assert!(!claims.contains("ports-a"), "{claims}");
    let svc_exists = |name: &str| {
        s.cp.kubectl(&["get", "svc", name, "-n", NS])
            .status
            .success()
    };
    assert!(!svc_exists(svc), "the holder's Service is deleted with it");
    eventually("the new holder's Service", Duration::from_secs(20), || {
        svc_exists("tunnox-ts-e2e-ports-ports-b")
    });
    assert!(
        !claims.contains(&b.to_string()),
        "the UDP port is freed: {claims}"
    );
    ok(
        s.cp.kubectl(&["delete", "ts", "ports-b", "-n", ns, "--timeout=30s"]),
        "delete ports-b",
    );
    eventually(
        "every port and Service gone",
        Duration::from_secs(20),
        || {
            !svc_exists("tunnox-ts-e2e-ports-ports-b")
                && s.redis.cli(&["HLEN", "tunnox:ports:default"]).trim() == "0"
        },
    );
    drop(agent);
    drop(proxy);
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);
}

/// A load-balancing group through the controller: two TunnelSets of one namespace naming group
/// `web` on one port are both `Listening` and their agents take turns; a TunnelSet of another
/// namespace naming `web` is another group and gets `Conflict`; deleting one member leaves the
/// port to the other.
fn tunnel_set_group_spreads_connections_over_its_agents(s: &Stack) {
    use std::io::Read;
    let (ns, other_ns) = ("e2e-group", "e2e-group-other");
    let token = "e2e-group-token-7c41";
    for n in [ns, other_ns] {
        s.cp.kubectl_ok(&["create", "namespace", n]);
        s.cp.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "group-token",
            "-n",
            n,
            &format!("--from-literal=token={token}"),
        ]);
    }
    // Each member's service answers a connection with its letter.
    let lettered = |letter: u8| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                use std::io::Write;
                let _ = c.write_all(&[letter]);
            }
        });
        port
    };
    let services = [lettered(b'A'), lettered(b'B')];
    let port = free_port();
    let (mut ctl, _) = s.controller_with(
        "ctl-group",
        &s.sa_kubeconfig,
        &[(
            "TUNNOX__CONTROLLER__REMOTE_PORT_RANGE",
            format!("[{port}, {port}]"),
        )],
    );
    let member = |namespace: &str, name: &str, client: &str, local: u16| {
        format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: TunnelSet\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{clientId: {client}, auth: {{secretRef: {{name: group-token}}}}, placement: {{business: default, region: default}}, \
             groups: [site], tunnels: [{{name: web, localHost: 127.0.0.1, localPort: {local}, remotePort: {port}, group: web}}]}}\n"
        )
    };
    ok(
        s.cp.apply(&member(ns, "web-1", "group-e2e-1", services[0])),
        "apply web-1",
    );
    ok(
        s.cp.apply(&member(ns, "web-2", "group-e2e-2", services[1])),
        "apply web-2",
    );
    let state = |n: &str, name: &str| {
        ts_field(
            s,
            n,
            name,
            "{range .status.tunnels[*]}{.state}:{.remotePort}{end}",
        )
    };
    let listening = format!("Listening:{port}");
    eventually("both members Listening", Duration::from_secs(20), || {
        state(ns, "web-1") == listening && state(ns, "web-2") == listening
    });
    // Same group name, another namespace: another group, refused.
    ok(
        s.cp.apply(&member(other_ns, "web-x", "group-e2e-x", services[0])),
        "apply web-x",
    );
    eventually(
        "Conflict in the other namespace",
        Duration::from_secs(20),
        || state(other_ns, "web-x") == format!("Conflict:{port}"),
    );
    let message = ts_field(s, other_ns, "web-x", "{.status.tunnels[0].message}");
    assert!(message.contains("group:e2e-group/web"), "{message}");
    // A mapping naming another namespace's client never uses its agent.
    ok(
        s.cp.apply(&format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: stranger, namespace: {ns}}}\n\
             spec: {{subdomain: stranger, baseDomain: tunnox.net, \
             target: {{tunnel: {{clientId: group-e2e-x, host: 127.0.0.1, port: 80}}}}}}\n"
        )),
        "apply cross-namespace mapping",
    );
    eventually(
        "Pending TunnelSetInOtherNamespace",
        Duration::from_secs(20),
        || {
            s.field(
                ns,
                "stranger",
                "{.status.conditions[?(@.type==\"Ready\")].reason}",
            ) == "TunnelSetInOtherNamespace"
        },
    );
    assert_eq!(s.phase(ns, "stranger"), "Pending");
    ok(
        s.cp.kubectl(&["delete", "hdm", "stranger", "-n", ns, "--timeout=30s"]),
        "delete cross-namespace mapping",
    );

    let dir = s.dir.path().join("group");
    let (ca, cert, key) = tunnel_certs(&dir);
    let (proxy, http_port, tunnel_port) = tunnel_proxy(s, "proxy-group", &cert, &key);
    // An HTTP mapping to the group `site` both TunnelSets list in spec.groups.
    let upstream = support::http::Upstream::start("site-behind-a-group");
    let admins = [free_port(), free_port()];
    ok(
        s.cp.apply(&format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: site, namespace: {ns}}}\n\
             spec: {{subdomain: site, baseDomain: tunnox.net, \
             target: {{tunnel: {{group: site, host: 127.0.0.1, port: {}}}}}}}\n",
            upstream.port
        )),
        "apply group mapping",
    );
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let agents: Vec<Role> = [("group-e2e-1", services[0]), ("group-e2e-2", services[1])]
        .iter()
        .map(|(client, local)| {
            Role::start(
                &[
                    "agent",
                    "--server",
                    &format!("127.0.0.1:{tunnel_port}"),
                    "--server-name",
                    "localhost",
                    "--client-id",
                    client,
                    "--token-file",
                    token_file.to_str().unwrap(),
                    "--ca-file",
                    ca.to_str().unwrap(),
                    "--allow",
                    &format!("127.0.0.1:{local}"),
                    "--allow",
                    &format!("127.0.0.1:{}", upstream.port),
                    "--admin-listen",
                    &format!("127.0.0.1:{}", admins[usize::from(*local == services[1])]),
                ],
                &[],
                &s.dir.path().join(format!("agent-{client}.log")),
            )
        })
        .collect();
    let letter = || -> char {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return '-';
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
        let mut l = [0u8; 1];
        match c.read_exact(&mut l) {
            Ok(()) => l[0] as char,
            Err(_) => '-',
        }
    };
    let letters = |n: usize| -> String { (0..n).map(|_| letter()).collect() };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = letters(4);
        if seen.contains('A') && seen.contains('B') {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both members not serving within 20 s: {seen}\n--- proxy log:\n{}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let seq = letters(8);
    assert!(
        seq.as_bytes().windows(2).all(|w| w[0] != w[1]) && !seq.contains('-'),
        "round robin: {seq}"
    );
    eprintln!("e2e: group of two TunnelSets: {seq}");
    // The HTTP mapping to the group: Active with both members, requests alternate (each
    // agent counts what it forwarded).
    eventually("group mapping Active", Duration::from_secs(20), || {
        s.phase(ns, "site") == "Active"
    });
    assert_eq!(
        s.field(ns, "site", "{.status.target}"),
        format!("tunnel-group:site(2)/127.0.0.1:{}", upstream.port)
    );
    let forwarded =
        |admin: u16| support::process::metric(admin, "tunnox_agent_streams_total{outcome=\"ok\"}");
    let site = || support::http::status(http_port, "site.tunnox.net");
    eventually("the group mapping serves", Duration::from_secs(20), || {
        site() == 200
    });
    let before = admins.map(forwarded);
    for _ in 0..10 {
        assert_eq!(site(), 200);
    }
    let after = admins.map(forwarded);
    let split = (after[0] - before[0], after[1] - before[1]);
    eprintln!("e2e: HTTP mapping to a group of two TunnelSets: {split:?}");
    assert_eq!(split, (5, 5), "round robin over the group's members");
    // One member deleted: the other keeps the port and takes every connection.
    ok(
        s.cp.kubectl(&["delete", "ts", "web-1", "-n", ns, "--timeout=30s"]),
        "delete web-1",
    );
    eventually("only web-2 serves", Duration::from_secs(10), || {
        letters(4) == "BBBB"
    });
    assert_eq!(state(ns, "web-2"), listening);
    // The group mapping follows the membership: one member left, every request goes to it.
    eventually(
        "group mapping has one member",
        Duration::from_secs(20),
        || {
            s.field(ns, "site", "{.status.target}")
                == format!("tunnel-group:site(1)/127.0.0.1:{}", upstream.port)
        },
    );
    let before = forwarded(admins[1]);
    for _ in 0..4 {
        assert_eq!(site(), 200);
    }
    assert_eq!(forwarded(admins[1]) - before, 4);
    // The last member gone: the mapping waits for one (and no longer routes).
    ok(
        s.cp.kubectl(&[
            "patch",
            "ts",
            "web-2",
            "-n",
            ns,
            "--type=merge",
            "-p",
            "{\"spec\":{\"groups\":[]}}",
        ]),
        "web-2 leaves the group",
    );
    eventually("group mapping Pending", Duration::from_secs(20), || {
        s.field(
            ns,
            "site",
            "{.status.conditions[?(@.type==\"Ready\")].reason}",
        ) == "TunnelGroupEmpty"
    });
    eventually(
        "no route for the emptied group",
        Duration::from_secs(10),
        || site() == 404,
    );
    ok(
        s.cp.kubectl(&["delete", "hdm", "site", "-n", ns, "--timeout=30s"]),
        "delete group mapping",
    );
    for (n, name) in [(ns, "web-2"), (other_ns, "web-x")] {
        ok(
            s.cp.kubectl(&["delete", "ts", name, "-n", n, "--timeout=30s"]),
            "delete TunnelSets",
        );
    }
    drop(agents);
    drop(proxy);
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);
}

/// Every resource in `examples/` is one the API server accepts (server-side dry run: the CRD
/// schemas and CEL rules judge it, nothing is stored). Files without a tunnox.net resource
/// (single-node configuration) are skipped.
fn examples_are_valid_resources(cp: &ControlPlane) {
    // The namespaces the examples name (others go to `default`).
    for ns in ["shop", "it"] {
        let _ = cp.kubectl(&["create", "namespace", ns]);
    }
    let mut checked = 0;
    let mut files: Vec<_> = std::fs::read_dir(format!("{ROOT}/examples"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("apiVersion: tunnox.net/") {
            continue;
        }
        ok(
            cp.kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()]),
            &format!("{} is accepted", path.display()),
        );
        checked += 1;
    }
    eprintln!("e2e: {checked} example files accepted by the API server");
    assert!(checked >= 5, "the examples were found: {checked}");
}

/// HTTPS with certificates from Secrets (`spec.tls {secretName, redirectHTTP}`): the
/// controller reads the `kubernetes.io/tls` Secret, checks it (type, key, names, expiry) and
/// publishes it through Redis with the key sealed under the store key; a proxy (a local process
/// with `proxy.tls_listen`) serves it by SNI. A replaced Secret reaches new handshakes within
/// seconds; a Secret of the wrong type or with a key that does not match leaves that mapping
/// `CertificateReady=False` with the reason while the other is still served.
fn https_certificates_from_secrets(s: &Stack) {
    let ns = "e2e-https";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    let dir = s.dir.path().join("https");
    std::fs::create_dir_all(&dir).unwrap();
    let pki = support::tunnel::Pki::new(&dir, "https");
    let store_key = dir.join("store-key");
    std::fs::write(
        &store_key,
        "e2e-store-key-0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let key_env = (
        "TUNNOX__HTTP_DOMAIN__TLS_STORE_KEY_FILE",
        store_key.display().to_string(),
    );
    let (mut ctl, _) = s.controller_with(
        "ctl-https",
        &s.sa_kubeconfig,
        std::slice::from_ref(&key_env),
    );
    let upstream = support::http::Upstream::start("secure-site");
    let tls_secret = |name: &str, cert: &std::path::Path, key: &std::path::Path| {
        let yaml = s.cp.kubectl_ok(&[
            "create",
            "secret",
            "tls",
            name,
            "-n",
            ns,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--dry-run=client",
            "-o",
            "yaml",
        ]);
        ok(s.cp.apply(&yaml), "apply TLS Secret");
    };
    let (a_cert, a_key) = pki.issue(&dir, "a", "a.tunnox.net", "DNS:a.tunnox.net");
    tls_secret("a-cert", &a_cert, &a_key);
    let mapping = |name: &str, secret: &str| {
        format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{subdomain: {name}, baseDomain: tunnox.net, tls: {{secretName: {secret}, redirectHTTP: true}}, \
             target: {{address: {{host: 127.0.0.1, port: {}}}}}}}\n",
            upstream.port
        )
    };
    ok(s.cp.apply(&mapping("a", "a-cert")), "apply mapping a");
    let cert_ready = |name: &str| {
        s.field(
            ns,
            name,
            "{.status.conditions[?(@.type==\"CertificateReady\")].status}/{.status.conditions[?(@.type==\"CertificateReady\")].reason}",
        )
    };
    eventually("a CertificateReady", Duration::from_secs(20), || {
        cert_ready("a") == "True/Ready"
    });
    assert_eq!(s.phase(ns, "a"), "Active");
    assert!(
        !s.field(ns, "a", "{.status.certificate.notAfter}")
            .is_empty()
    );
    let wide =
        s.cp.kubectl_ok(&["get", "hdm", "a", "-n", ns, "-o", "wide"]);
    assert!(wide.contains("TLS") && wide.contains("Ready"), "{wide}");
    // Redis holds the chain and a sealed key, never the key itself.
    let record = s.redis.cli(&["--scan", "--pattern", "*mapping:*"]);
    let key_pem = std::fs::read_to_string(&a_key).unwrap();
    let key_body: String = key_pem.lines().nth(1).unwrap_or_default().to_string();
    for k in record.lines() {
        let v = s.redis.cli(&["GET", k]);
        assert!(
            !v.contains(&key_body),
            "a private key in the clear in Redis"
        );
    }

    // A proxy with the HTTPS listener and the same store key.
    let https = free_port();
    let (proxy, http) = s.proxy_with(
        "proxy-https",
        &[
            key_env,
            ("TUNNOX__PROXY__TLS_LISTEN", format!("127.0.0.1:{https}")),
            ("TUNNOX__PROXY__TLS__REDIRECT_PORT", https.to_string()),
        ],
    );
    let curl = |host: &str| -> (String, String) {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "--cacert",
                pki.ca.to_str().unwrap(),
                "--resolve",
                &format!("{host}:{https}:127.0.0.1"),
                "-w",
                "\n%{http_code}",
                &format!("https://{host}:{https}/"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    eventually("served over HTTPS", Duration::from_secs(20), || {
        curl("a.tunnox.net").0 == "200"
    });
    assert!(curl("a.tunnox.net").1.contains("secure-site"));
    let plain = support::http::get(http, "a.tunnox.net", "/p").unwrap();
    assert_eq!(plain.status, 308, "redirectHTTP");
    let subject = |host: &str| {
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "openssl s_client -connect 127.0.0.1:{https} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -subject -nameopt RFC2253"
                ),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(subject("a.tunnox.net"), "subject=CN=a.tunnox.net");

    // Renewal: the Secret replaced, new handshakes get the new certificate, while requests
    // keep flowing over kept connections and new ones.
    let (a2_cert, a2_key) = pki.issue(&dir, "a2", "a.tunnox.net renewed", "DNS:a.tunnox.net");
    let load = support::http::TlsLoad::start(https, "a.tunnox.net", &pki.ca);
    std::thread::sleep(Duration::from_millis(500));
    tls_secret("a-cert", &a2_cert, &a2_key);
    let started = std::time::Instant::now();
    eventually(
        "renewed certificate served",
        Duration::from_secs(15),
        || subject("a.tunnox.net") == "subject=CN=a.tunnox.net renewed",
    );
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (done, failed, leaves) = load.stop();
    eprintln!(
        "e2e: a replaced Secret served {took:?} after it was applied (tls_recheck_interval 5 s); {done} requests under load, {} failed",
        failed.len()
    );
    assert!(took < Duration::from_secs(5), "served within 5 s: {took:?}");
    assert!(failed.is_empty(), "failed during the rotation: {failed:?}");
    assert!(
        done > 20 && leaves == 2,
        "{done} requests, {leaves} certificates"
    );
    assert_eq!(curl("a.tunnox.net").0, "200");

    // Broken Secrets: the reason in status; a is still served.
    ok(
        s.cp.apply(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: opaque, namespace: {ns}}}\nstringData: {{tls.crt: \"x\", tls.key: \"z\"}}\n"
        )),
        "apply opaque Secret",
    );
    ok(s.cp.apply(&mapping("b", "opaque")), "apply mapping b");
    let (c_cert, _) = pki.issue(&dir, "c", "c.tunnox.net", "DNS:c.tunnox.net");
    let (_, other_key) = pki.issue(&dir, "other", "other", "DNS:other.tunnox.net");
    // kubectl refuses to make this one; the API server takes it as written.
    {
        use base64::Engine;
        let b64 = |p: &std::path::Path| {
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
        };
        ok(
            s.cp.apply(&format!(
                "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: c-cert, namespace: {ns}}}\ndata: {{tls.crt: {}, tls.key: {}}}\n",
                b64(&c_cert),
                b64(&other_key)
            )),
            "apply mismatched TLS Secret",
        );
    }
    ok(s.cp.apply(&mapping("c", "c-cert")), "apply mapping c");
    ok(s.cp.apply(&mapping("d", "nothing-here")), "apply mapping d");
    // A certificate that expired (2020-2021).
    let expired = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["e.tunnox.net".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("expired.crt"), dir.join("expired.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    tls_secret("e-cert", &expired.0, &expired.1);
    ok(s.cp.apply(&mapping("e", "e-cert")), "apply mapping e");
    for (name, want) in [
        ("b", "False/SecretWrongType"),
        ("c", "False/KeyMismatch"),
        ("d", "False/SecretNotFound"),
        ("e", "False/CertificateExpired"),
    ] {
        eventually(&format!("{name} {want}"), Duration::from_secs(20), || {
            cert_ready(name) == want
        });
        // Served over plain HTTP still (the mapping itself is fine).
        assert_eq!(s.phase(ns, name), "Active");
    }
    assert_eq!(
        subject("c.tunnox.net"),
        "",
        "no certificate for c: no handshake"
    );
    assert_eq!(curl("a.tunnox.net").0, "200", "a unaffected");
    eprintln!(
        "e2e: broken Secrets reported: SecretWrongType, KeyMismatch, SecretNotFound, CertificateExpired"
    );

    for name in ["a", "b", "c", "d", "e"] {
        ok(
            s.cp.kubectl(&["delete", "hdm", name, "-n", ns, "--timeout=30s"]),
            "delete mapping",
        );
    }
    drop(proxy);
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);
}

/// Issue 17, ACME: `spec.tls.mode: acme` against pebble on loopback (a real ACME server whose
/// root changes every run). The leader creates its account (kept in a Secret), orders the
/// domain's certificate, writes the HTTP-01 answer to Redis, where the proxy answers pebble's
/// validation on its HTTP port, and keeps the certificate in a Secret of its namespace; the
/// proxy serves it by SNI. A renewal asked for by annotation replaces it while a load generator
/// keeps requests flowing (kept connections and new handshakes) with no failed request. A name
/// the CA refuses shows `IssuanceFailed` with the CA's reason, and nothing else is affected.
fn https_certificates_from_acme(s: &Stack) {
    let ns = "e2e-acme";
    s.cp.kubectl_ok(&["create", "namespace", ns]);
    let dir = s.dir.path().join("acme");
    std::fs::create_dir_all(&dir).unwrap();
    // The Role the chart adds with https.acme: Secrets created and patched in its namespace.
    let rbac = ok(
        s.cp.helm(&[
            "template",
            "tunnox",
            &format!("{ROOT}/charts/tunnox"),
            "--namespace",
            NS,
            "--show-only",
            "templates/controller-rbac.yaml",
            "--set",
            "https.enabled=true,https.storeKeySecret.name=k,https.acme.directoryUrl=https://acme.example/dir",
        ]),
        "helm template RBAC with ACME",
    );
    ok(
        s.cp.apply(&rbac),
        "apply the chart's RBAC with the ACME Role",
    );
    let store_key = dir.join("store-key");
    std::fs::write(
        &store_key,
        "e2e-acme-store-key-0123456789abcdef0123456789\n",
    )
    .unwrap();
    let key_env = (
        "TUNNOX__HTTP_DOMAIN__TLS_STORE_KEY_FILE",
        store_key.display().to_string(),
    );
    let https = free_port();
    let (proxy, http) = s.proxy_with(
        "proxy-acme",
        &[
            key_env.clone(),
            ("TUNNOX__PROXY__TLS_LISTEN", format!("127.0.0.1:{https}")),
            ("TUNNOX__PROXY__TLS__REDIRECT_PORT", https.to_string()),
        ],
    );
    // pebble validates HTTP-01 on the proxy's HTTP port; every name resolves to 127.0.0.1.
    let pebble = support::pebble::Pebble::start(&dir, http, &["blocked.tunnox.net"]);
    let (mut ctl, _) = s.controller_with(
        "ctl-acme",
        &s.sa_kubeconfig,
        &[
            key_env,
            (
                "TUNNOX__CONTROLLER__ACME__DIRECTORY_URL",
                pebble.directory.clone(),
            ),
            (
                "TUNNOX__CONTROLLER__ACME__CA_FILE",
                pebble.listener_ca.display().to_string(),
            ),
            ("TUNNOX__CONTROLLER__ACME__EMAIL", "ops@tunnox.net".into()),
            ("TUNNOX__CONTROLLER__ACME__ORDER_TIMEOUT", "60s".into()),
            // The renewal asked for below comes seconds after the issuance.
            (
                "TUNNOX__CONTROLLER__ACME__MIN_REORDER_INTERVAL",
                "1s".into(),
            ),
        ],
    );
    let upstream = support::http::Upstream::start("acme-site");
    let mapping = |name: &str| {
        format!(
            "apiVersion: tunnox.net/v1alpha1\nkind: HTTPDomainMapping\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{subdomain: {name}, baseDomain: tunnox.net, tls: {{mode: acme, redirectHTTP: true}}, \
             target: {{address: {{host: 127.0.0.1, port: {}}}}}}}\n",
            upstream.port
        )
    };
    let cert_ready = |name: &str| {
        s.field(
            ns,
            name,
            "{.status.conditions[?(@.type==\"CertificateReady\")].status}/{.status.conditions[?(@.type==\"CertificateReady\")].reason}",
        )
    };
    ok(s.cp.apply(&mapping("site")), "apply mapping site");
    let started = std::time::Instant::now();
    let ready = std::panic::catch_unwind(AssertUnwindSafe(|| {
        eventually("site CertificateReady", Duration::from_secs(90), || {
            cert_ready("site") == "True/Ready"
        })
    }));
    if ready.is_err() {
        panic!(
            "not issued: {}\ncontroller:\n{}\npebble:\n{}",
            cert_ready("site"),
            ctl.log(),
            pebble.log()
        );
    }
    eprintln!(
        "e2e: ACME certificate issued and ready {:?} after the mapping was applied",
        started.elapsed()
    );
    assert_eq!(s.phase(ns, "site"), "Active");
    assert!(
        !s.field(ns, "site", "{.status.certificate.notAfter}")
            .is_empty()
    );
    let issuer = s.field(ns, "site", "{.status.certificate.issuer}");
    assert!(issuer.contains("Pebble"), "issued by pebble: {issuer}");
    // Served by SNI, trusted through pebble's root of this run.
    let roots = pebble.roots_file();
    let host = "site.tunnox.net";
    let mut first = support::http::TlsConnection::open(https, host, &roots).expect("handshake");
    assert_eq!(first.get(host).unwrap(), 200);
    // The certificate's Secret and the account's, in the controller's namespace.
    let secret = tunnox::controller::issuer::secret_name(host);
    let annotations = s.cp.kubectl_ok(&[
        "get",
        "secret",
        &secret,
        "-n",
        NS,
        "-o",
        "jsonpath={.type} {.metadata.annotations}",
    ]);
    assert!(
        annotations.starts_with("kubernetes.io/tls")
            && annotations.contains(host)
            && annotations.contains("renew-at"),
        "{annotations}"
    );
    s.cp.kubectl_ok(&["get", "secret", "tunnox-acme-account", "-n", NS]);
    let events = s.cp.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "involvedObject.name=site",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        events.contains("Issuing") && events.contains("Issued"),
        "{events}"
    );

    // A renewal asked for by annotation, under load: kept connections and new handshakes.
    let before = first.peer_leaf();
    let load = support::http::TlsLoad::start(https, host, &roots);
    std::thread::sleep(Duration::from_secs(1));
    s.cp.kubectl_ok(&[
        "annotate",
        "hdm",
        "site",
        "-n",
        ns,
        "tunnox.net/renew-certificate=1",
    ]);
    let took = eventually(
        "the renewed certificate served",
        Duration::from_secs(60),
        || {
            support::http::TlsConnection::open(https, host, &roots)
                .is_ok_and(|c| c.peer_leaf() != before)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let (done, failed, leaves) = load.stop();
    eprintln!(
        "e2e: ACME renewal served {took:?} after the annotation; {done} requests under load, {} failed, {leaves} certificates seen",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed requests during the renewal: {failed:?}"
    );
    assert!(
        done > 50 && leaves == 2,
        "{done} requests, {leaves} certificates"
    );
    assert_eq!(
        first.get(host).unwrap(),
        200,
        "a connection from before keeps working"
    );
    let renewed_for = s.cp.kubectl_ok(&[
        "get",
        "secret",
        &secret,
        "-n",
        NS,
        "-o",
        "jsonpath={.metadata.annotations.tunnox\\.net/renewed-for}",
    ]);
    assert_eq!(
        renewed_for.trim(),
        tunnox::acme::schedule::request_id("1"),
        "the request answered, recorded as its digest"
    );
    assert_eq!(cert_ready("site"), "True/Ready");

    // A name the CA refuses: IssuanceFailed with its reason; site unaffected.
    ok(s.cp.apply(&mapping("blocked")), "apply mapping blocked");
    eventually("blocked IssuanceFailed", Duration::from_secs(60), || {
        cert_ready("blocked") == "False/IssuanceFailed"
    });
    let message = s.field(
        ns,
        "blocked",
        "{.status.conditions[?(@.type==\"CertificateReady\")].message}",
    );
    assert!(
        message.contains("forbidden by policy") && message.contains("next attempt in"),
        "{message}"
    );
    assert_eq!(
        s.phase(ns, "blocked"),
        "Active",
        "served over plain HTTP meanwhile"
    );
    let events = s.cp.kubectl_ok(&[
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        "involvedObject.name=blocked",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("IssuanceFailed"), "{events}");
    assert_eq!(
        support::http::TlsConnection::open(https, host, &roots)
            .unwrap()
            .get(host)
            .unwrap(),
        200
    );

    for name in ["site", "blocked"] {
        ok(
            s.cp.kubectl(&["delete", "hdm", name, "-n", ns, "--timeout=30s"]),
            "delete mapping",
        );
    }
    drop(proxy);
    ctl.terminate(Duration::from_secs(10));
    no_permission_errors(&ctl);
    for kind in ["role", "rolebinding"] {
        s.cp.kubectl_ok(&["delete", kind, "tunnox-controller-acme", "-n", NS]);
    }
}

const API_ADMIN: &str = "e2e-admin-token-0123456789abcdef";
const API_ALICE: &str = "e2e-alice-token-0123456789abcdef";
const API_BOB: &str = "e2e-bob-token-0123456789abcdef00";

fn api_mapping(sub: &str, port: u16, extra: &str) -> String {
    format!(
        r#"{{"subdomain": "{sub}", "base_domain": "tunnox.net", "target_host": "127.0.0.1", "target_port": {port}{extra}}}"#
    )
}

/// The management API served by `tunnox controller` (issue #20, cluster half), on the leader and
/// on a standby: a create is an `HTTPDomainMapping` (`kubectl get hdm` shows it `Active`, a proxy
/// serves it); availability flips; filters return exactly their set; a domain held by a kubectl
/// resource is refused and leaves nothing behind; the quota holds; force-delete is an
/// administrator's and takes the resource and the claim away; statistics come from real
/// requests; bad input is a 4xx naming the field.
fn management_api_over_the_cluster(s: &Stack) {
    use support::api::Api;
    let (api_ns, other_ns) = ("e2e-api", "e2e-api-kubectl");
    for ns in [api_ns, other_ns] {
        s.cp.kubectl_ok(&["create", "namespace", ns]);
    }
    // The chart with the API on: its Role in api.namespace, its ClusterRole rule.
    ok(
        s.cp.helm(&[
            "upgrade",
            "tunnox",
            &format!("{ROOT}/charts/tunnox"),
            "--namespace",
            NS,
            "--reuse-values",
            "--skip-crds",
            "--set",
            &format!(
                "api.enabled=true,api.tokensSecret.name=tunnox-api-tokens,api.namespace={api_ns}"
            ),
        ]),
        "helm upgrade with the API",
    );
    let up = support::http::Upstream::start("e2e-api");
    let tokens = format!(
        "[{{token: {API_ADMIN}, role: admin}}, {{token: {API_ALICE}, role: 'user:alice'}}, {{token: {API_BOB}, role: 'user:bob'}}]"
    );
    let api_env = |port: u16| {
        vec![
            ("TUNNOX__API__LISTEN", format!("127.0.0.1:{port}")),
            ("TUNNOX__API__TOKENS", tokens.clone()),
            ("TUNNOX__API__NAMESPACE", api_ns.to_string()),
            ("TUNNOX__API__MAX_MAPPINGS_PER_USER", "2".to_string()),
            ("TUNNOX__API__WAIT", "8s".to_string()),
        ]
    };
    let (leader_port, standby_port) = (free_port(), free_port());
    let (mut leader, leader_admin) =
        s.controller_with("ctl-api", &s.sa_kubeconfig, &api_env(leader_port));
    let (mut proxy, proxy_port) = s.proxy_with(
        "proxy-api",
        &[("TUNNOX__PROXY__STATS_FLUSH_INTERVAL", "200ms".to_string())],
    );
    let api = Api {
        port: leader_port,
        tls: None,
    };
    eventually("the API answers", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", leader_port)).is_ok()
    });
    // Standing by (the leader holds the Lease), and serving the API all the same.
    let (mut standby, _) =
        s.controller_with("ctl-api-standby", &s.sa_kubeconfig, &api_env(standby_port));
    let standby_api = Api {
        port: standby_port,
        tls: None,
    };
    eventually("the standby's API answers", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", standby_port)).is_ok()
    });

    // Tokens.
    assert_eq!(api.call("GET", "/api/v1/mappings", None, None).status, 401);
    assert_eq!(
        api.call(
            "GET",
            "/api/v1/mappings",
            Some("wrong-token-0123456789abcdef"),
            None
        )
        .status,
        401
    );

    // Availability, create: a resource in api.namespace, Active, served.
    let avail = "/api/v1/availability?subdomain=api-a&base_domain=tunnox.net";
    let (_, a) = api.json("GET", avail, API_ALICE, None);
    assert_eq!(a["verdict"], "free", "{a}");
    let started = std::time::Instant::now();
    let (status, m) = api.json(
        "POST",
        "/api/v1/mappings?wait=ready",
        API_ALICE,
        Some(&api_mapping("api-a", up.port, "")),
    );
    assert_eq!(status, 201, "{m}");
    eprintln!(
        "e2e: create through the API (wait=ready) answered in {:?}",
        started.elapsed()
    );
    assert_eq!(
        (m["phase"].as_str(), m["owner_user_id"].as_str()),
        (Some("Active"), Some("alice"))
    );
    let id_a = m["id"].as_str().unwrap().to_string();
    assert_eq!(
        m["source"].as_str(),
        Some(format!("k8s:{}/{api_ns}/api-a.tunnox.net", cluster_id(&s.cp)).as_str())
    );
    assert_eq!(s.phase(api_ns, "api-a.tunnox.net"), "Active");
    assert_eq!(
        s.field(api_ns, "api-a.tunnox.net", "{.status.mappingId}"),
        id_a
    );
    // wait=ready: answered once every proxy applied it, so served at once (no retry).
    let r = support::http::get(proxy_port, "api-a.tunnox.net", "/").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "hello from e2e-api\n"));
    let (_, a) = api.json("GET", avail, API_ALICE, None);
    assert_eq!(
        (a["verdict"].as_str(), a["held_by"]["yours"].as_bool()),
        (Some("taken"), Some(true)),
        "{a}"
    );
    let (_, a) = api.json("GET", avail, API_BOB, None);
    assert!(
        a["held_by"]["mapping_id"].is_null(),
        "not named to another user: {a}"
    );

    // Taken: by alice's mapping (not named to bob); by a kubectl resource (named to an
    // administrator), and the refused resource is withdrawn.
    let (status, e) = api.create(API_BOB, &api_mapping("api-a", up.port, ""));
    assert_eq!(
        (status, e["code"].as_str()),
        (409, Some("domain_taken")),
        "{e}"
    );
    assert!(!e["message"].as_str().unwrap().contains(api_ns), "{e}");
    ok(
        s.cp.apply(&hdm_yaml(other_ns, "kube-a", "kube-a", up.port)),
        "apply kube-a",
    );
    eventually("kube-a Active", Duration::from_secs(20), || {
        s.phase(other_ns, "kube-a") == "Active"
    });
    let (status, e) = api.create(API_ADMIN, &api_mapping("kube-a", up.port, ""));
    assert_eq!(
        (status, e["code"].as_str()),
        (409, Some("domain_taken")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{other_ns}/kube-a")),
        "{e}"
    );
    eventually(
        "the refused resource withdrawn",
        Duration::from_secs(10),
        || {
            s.field(api_ns, "kube-a.tunnox.net", "{.metadata.name}")
                .is_empty()
        },
    );
    // The same create by a caller that hangs up at once: the resource is withdrawn all the
    // same (left in Conflict it would take the domain when its holder lets go).
    let withdrawn = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("withdrew a refused API mapping") && l.contains("kube-a.tunnox.net")
            })
            .count()
    };
    let before = withdrawn(&leader.log());
    {
        use std::io::Write;
        let body = api_mapping("kube-a", up.port, "");
        let mut c = std::net::TcpStream::connect(("127.0.0.1", leader_port)).unwrap();
        write!(
            c,
            "POST /api/v1/mappings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_ALICE}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        drop(c);
    }
    eventually(
        "withdrawn after the caller hung up",
        Duration::from_secs(15),
        || withdrawn(&leader.log()) > before,
    );
    assert_eq!(
        s.field(api_ns, "kube-a.tunnox.net", "{.metadata.name}"),
        "",
        "nothing left in Conflict"
    );

    // Created through the standby; the quota (2 per user) holds.
    let (status, m) = standby_api.create(API_BOB, &api_mapping("api-b", up.port, ""));
    assert_eq!(status, 201, "through the standby: {m}");
    let id_b = m["id"].as_str().unwrap().to_string();
    assert_eq!(
        api.create(API_ALICE, &api_mapping("api-c", up.port, "")).0,
        201
    );
    let (status, e) = api.create(API_ALICE, &api_mapping("api-d", up.port, ""));
    assert_eq!(
        (status, e["code"].as_str()),
        (409, Some("quota_exceeded")),
        "{e}"
    );

    // Filters return exactly their set, on both replicas.
    let set = |v: Vec<String>| v.into_iter().collect::<std::collections::BTreeSet<_>>();
    let want = |d: &[&str]| {
        d.iter()
            .map(|x| x.to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    for a in [&api, &standby_api] {
        assert_eq!(
            set(a.domains(API_ADMIN, "user=alice", 1)),
            want(&["api-a.tunnox.net", "api-c.tunnox.net"])
        );
        assert_eq!(
            set(a.domains(API_ALICE, "", 100)),
            want(&["api-a.tunnox.net", "api-c.tunnox.net"])
        );
        assert_eq!(
            set(a.domains(API_ADMIN, "user=bob", 2)),
            want(&["api-b.tunnox.net"])
        );
        assert_eq!(
            set(a.domains(API_ADMIN, "domain_prefix=kube-", 100)),
            want(&["kube-a.tunnox.net"])
        );
        let all = set(a.domains(API_ADMIN, "phase=Active", 2));
        assert!(
            want(&[
                "api-a.tunnox.net",
                "api-b.tunnox.net",
                "api-c.tunnox.net",
                "kube-a.tunnox.net"
            ])
            .is_subset(&all),
            "{all:?}"
        );
    }
    let listed = s.cp.kubectl_ok(&["get", "hdm", "-n", api_ns]);
    assert!(
        listed.contains("api-b.tunnox.net") && listed.contains("Active"),
        "{listed}"
    );

    // Statistics from real requests through the proxy.
    for _ in 0..3 {
        assert_eq!(support::http::status(proxy_port, "api-b.tunnox.net"), 200);
    }
    eventually("3 requests counted", Duration::from_secs(20), || {
        let (status, st) = api.json(
            "GET",
            &format!("/api/v1/mappings/{id_b}/stats"),
            API_BOB,
            None,
        );
        status == 200 && st["requests"].as_u64() >= Some(3) && st["bytes_out"].as_u64() > Some(0)
    });
    let (status, sys) = api.json("GET", "/api/v1/stats/system", API_ADMIN, None);
    assert_eq!(status, 200, "{sys}");
    assert!(sys["mappings"]["Active"].as_u64() >= Some(4), "{sys}");
    assert!(
        sys["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["node_id"] == "proxy-api"),
        "{sys}"
    );
    assert_eq!(
        api.json("GET", "/api/v1/stats/system", API_ALICE, None).0,
        403
    );

    // A tunnel client with no TunnelSet: declared, Pending past the wait: 202.
    let (status, p) = api.create(
        API_ADMIN,
        &api_mapping("api-t", 3000, r#", "target_client_id": "nobody""#),
    );
    assert_eq!(status, 202, "{p}");
    assert_eq!(p["resource"], format!("{api_ns}/api-t.tunnox.net"));
    assert_eq!(s.phase(api_ns, "api-t.tunnox.net"), "Pending");
    s.cp.kubectl_ok(&[
        "delete",
        "hdm",
        "api-t.tunnox.net",
        "-n",
        api_ns,
        "--wait=true",
    ]);

    // Bad input: 4xx naming the field.
    for (path, field) in [
        ("/api/v1/mappings?colour=red", "colour"),
        ("/api/v1/mappings?limit=1000000000", "limit"),
        ("/api/v1/mappings?phase=Sleeping", "phase"),
    ] {
        let (status, e) = api.json("GET", path, API_ADMIN, None);
        assert_eq!(
            (status, e["field"].as_str()),
            (400, Some(field)),
            "{path}: {e}"
        );
    }
    let (status, e) = api.create(API_ADMIN, "{not json");
    assert_eq!((status, e["field"].as_str()), (400, Some("body")), "{e}");
    let big = format!(r#"{{"subdomain": "{}"}}"#, "x".repeat(10 << 20));
    assert_eq!(api.create(API_ADMIN, &big).0, 413);
    let (status, e) = api.create(API_ALICE, &api_mapping("Bad_Name", up.port, ""));
    assert_eq!(
        (status, e["field"].as_str()),
        (422, Some("subdomain")),
        "{e}"
    );

    // Deletes: kube-a is kubectl's (409 without force), force is an administrator's; with it
    // the resource and the claim are gone.
    let (status, page) = api.json(
        "GET",
        "/api/v1/mappings?domain_prefix=kube-a",
        API_ADMIN,
        None,
    );
    assert_eq!(status, 200);
    let id_kube = page["items"][0]["id"].as_str().unwrap().to_string();
    let path = format!("/api/v1/mappings/{id_kube}");
    assert_eq!(api.json("DELETE", &path, API_ADMIN, None).0, 409);
    assert_eq!(
        api.json("DELETE", &format!("{path}?force=true"), API_ALICE, None)
            .0,
        403
    );
    let (status, body) = api.json("DELETE", &format!("{path}?force=true"), API_ADMIN, None);
    assert_eq!(status, 204, "{body}");
    assert_eq!(
        s.field(other_ns, "kube-a", "{.metadata.name}"),
        "",
        "the resource is gone"
    );
    assert!(
        s.redis_keys("tunnox:http_domain:index:domain:kube-a.tunnox.net")
            .is_empty()
    );
    // An owner deletes its own; another user cannot see it.
    let path = format!("/api/v1/mappings/{id_a}");
    assert_eq!(api.json("DELETE", &path, API_BOB, None).0, 404);
    assert_eq!(standby_api.json("DELETE", &path, API_ALICE, None).0, 204);
    assert_eq!(s.field(api_ns, "api-a.tunnox.net", "{.metadata.name}"), "");
    let (_, a) = api.json("GET", avail, API_ALICE, None);
    assert_eq!(a["verdict"], "free", "{a}");
    eventually("404 once deleted", Duration::from_secs(10), || {
        support::http::status(proxy_port, "api-a.tunnox.net") == 404
    });

    let requests = support::process::metric(
        leader_admin,
        "tunnox_controller_api_requests_total{method=\"POST\",route=\"/api/v1/mappings\",status=\"201\"}",
    );
    assert!(
        requests >= 2,
        "API requests in the leader's metrics: {requests}\n{}",
        http_get(leader_admin, "/metrics")
    );
    // Every operation of the served document, fuzzed against the cluster's intent.
    let fuzz_started = std::time::Instant::now();
    for token in [API_ALICE, API_ADMIN] {
        support::api::fuzz(leader_port, token, s.dir.path(), 20);
    }
    eprintln!(
        "e2e: the cluster API fuzzed in {:?}",
        fuzz_started.elapsed()
    );
    assert!(leader.is_running() && standby.is_running());

    // Nothing left for later scenarios: the API's resources go while a controller runs.
    for ns in [api_ns, other_ns] {
        ok(
            s.cp.kubectl(&["delete", "hdm", "--all", "-n", ns, "--timeout=30s"]),
            "delete the API's resources",
        );
    }
    for (role, name) in [(&mut standby, "standby"), (&mut leader, "leader")] {
        assert_eq!(
            role.terminate(Duration::from_secs(15)),
            Some(0),
            "{name}: {}",
            role.log()
        );
        no_permission_errors(role);
    }
    proxy.terminate(Duration::from_secs(30));
}
