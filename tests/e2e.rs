//! End-to-end tests on a real Kubernetes API server (etcd + kube-apiserver v1.34.4, no kubelet):
//! the CRDs as users meet them through kubectl, and the Helm chart with its least-privilege RBAC.
//! Run with `make e2e` (builds the control plane into a cache on first use).
//!
//! One control plane serves every scenario (starting one takes seconds, building it minutes);
//! it is stopped when this binary ends, whatever the scenarios did.

mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};

use support::ControlPlane;
use support::controlplane::{ok, stderr};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

type Scenario = fn(&ControlPlane);

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let scenarios: &[(&str, Scenario)] = &[
        (
            "crds_show_columns_and_explain",
            crds_show_columns_and_explain,
        ),
        (
            "api_server_rejects_invalid_resources",
            api_server_rejects_invalid_resources,
        ),
        (
            "chart_installs_with_least_privilege",
            chart_installs_with_least_privilege,
        ),
        ("chart_refuses_bad_values", chart_refuses_bad_values),
        (
            "install_manifest_matches_the_chart",
            install_manifest_matches_the_chart,
        ),
    ];
    let cp = ControlPlane::start();
    ok(
        cp.kubectl(&["apply", "-f", &format!("{ROOT}/crds/tunnox.yaml")]),
        "apply CRDs",
    );
    cp.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/httpdomainmappings.tunnox.net",
        "crd/tunnelsets.tunnox.net",
    ]);
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in scenarios {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        eprintln!("e2e: {name} ...");
        match catch_unwind(AssertUnwindSafe(|| scenario(&cp))) {
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
    drop(cp);
    println!("e2e: {passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
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
        ["NAME", "DOMAIN", "TARGET", "SET", "PHASE", "AGE"],
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
    cp.kubectl_ok(&["delete", "namespace", "cols", "--wait=false"]);
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

fn chart_installs_with_least_privilege(cp: &ControlPlane) {
    let chart = format!("{ROOT}/charts/tunnox");
    ok(
        cp.helm(&[
            "install",
            "tunnox",
            &chart,
            "--namespace",
            NS,
            "--create-namespace",
            "--skip-crds",
            "--wait=false",
        ]),
        "helm install",
    );
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
    // What the controller needs.
    for (verb, resource) in [
        ("watch", "httpdomainmappings.tunnox.net"),
        ("patch", "httpdomainmappings.tunnox.net/status"),
        ("update", "httpdomainmappings.tunnox.net/finalizers"),
        ("list", "tunnelsets.tunnox.net"),
        ("create", "services"),
        ("get", "secrets"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            can(verb, resource, None),
            "controller should be allowed to {verb} {resource}"
        );
    }
    assert!(can("update", "leases.coordination.k8s.io", Some(NS)));
    // What it must not have.
    for (verb, resource) in [
        ("delete", "httpdomainmappings.tunnox.net"),
        ("create", "httpdomainmappings.tunnox.net"),
        ("create", "secrets"),
        ("list", "pods"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ] {
        assert!(
            !can(verb, resource, None),
            "controller must not be allowed to {verb} {resource}"
        );
    }
    assert!(
        !can("update", "leases.coordination.k8s.io", Some("default")),
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
    let config = cp.kubectl_ok(&[
        "get",
        "configmap",
        "tunnox",
        "-n",
        NS,
        "-o",
        "jsonpath={.data.config\\.yaml}",
    ]);
    let file =
        std::env::temp_dir().join(format!("tunnox-chart-config-{}.yaml", std::process::id()));
    std::fs::write(&file, &config).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tunnox"))
        .args(["--config", file.to_str().unwrap(), "check-config"])
        .env("TUNNOX__STORAGE__REDIS__PASSWORD", "from-the-secret")
        .env("TUNNOX__PROXY__SET", "default.default")
        .env("TUNNOX__PROXY__NODE_ID", "tunnox-proxy-default-default-0")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let printed = ok(check, "tunnox check-config on the chart's configuration");
    assert!(printed.contains("mapping store: redis"), "{printed}");
    ok(
        cp.helm(&["uninstall", "tunnox", "--namespace", NS]),
        "helm uninstall",
    );
    cp.kubectl_ok(&["delete", "namespace", "rbac", "--wait=false"]);
}

fn chart_refuses_bad_values(cp: &ControlPlane) {
    let chart = format!("{ROOT}/charts/tunnox");
    let cases: [(&[&str], &str); 4] = [
        (&["--set", "redis.bundled=false"], "/redis/external/addr"),
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
