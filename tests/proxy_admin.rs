//! The admin surface with the real binary (issue 14, deliverable 2): `/drain` changes state
//! only on POST from a loopback client or with the bearer token; `tunnox drain` (the chart's
//! preStop hook) drains and fails clearly when it cannot.

mod support;

use std::process::Command;
use std::time::Duration;

use support::http::{Reply, Upstream, raw};
use support::process::free_port;
use support::proxy::ProxyProc;

fn yaml(dir: &std::path::Path, upstream: u16) -> String {
    format!(
        "storage: {{type: memory, hybrid: {{json: {{file_path: {}}}}}}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {upstream}}}",
        dir.join("data.json").display()
    )
}

/// A request to the admin port with extra header lines (each ending in `\r\n`).
fn admin(p: &ProxyProc, method: &str, path: &str, headers: &str) -> Reply {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n{headers}\r\n"
    );
    raw(p.admin, req.as_bytes(), Duration::from_secs(10)).expect("admin port answers")
}

fn ready(p: &ProxyProc) -> u16 {
    p.admin_get("/readyz").map(|r| r.status).unwrap_or(0)
}

fn metric(p: &ProxyProc, line_prefix: &str) -> u64 {
    let body = p.admin_get("/metrics").unwrap().body;
    body.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `tunnox [args]` to completion: (exit code, stdout, stderr).
fn tunnox(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnox"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tunnox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn get_changes_nothing_and_loopback_post_drains() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("admin-a");
    let p = ProxyProc::start(dir.path(), "pa", &yaml(dir.path(), up.port), "").ready();

    for method in ["GET", "HEAD", "PUT", "DELETE"] {
        let r = admin(&p, method, "/drain?wait=10ms", "");
        assert_eq!(r.status, 405, "{method} /drain: {r:?}");
        assert_eq!(r.header("allow"), Some("POST"), "{method}");
    }
    assert_eq!(ready(&p), 200, "still ready after GET /drain");
    assert_eq!(metric(&p, "tunnox_proxy_draining"), 0);
    assert_eq!(p.status("app.tunnox.net"), 200);

    // A request relayed by a proxy (X-Forwarded-For, Via) is not trusted for arriving over
    // loopback: it may be this proxy, made to connect to its own admin port.
    for relayed in ["X-Forwarded-For: 10.9.9.9\r\n", "Via: 1.1 tunnox\r\n"] {
        let r = admin(&p, "POST", "/drain?wait=10ms", relayed);
        assert_eq!(r.status, 401, "{relayed}: {r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(ready(&p), 200, "still ready after refused drains");
    assert_eq!(
        metric(
            &p,
            "tunnox_proxy_admin_refused_total{reason=\"no_credentials\"}"
        ),
        2
    );

    let r = admin(&p, "POST", "/drain?wait=10ms", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.starts_with("drained"), "{r:?}");
    assert_eq!(ready(&p), 503, "not ready once drained");
    assert_eq!(metric(&p, "tunnox_proxy_draining"), 1);
    assert_eq!(
        p.status("app.tunnox.net"),
        200,
        "still serving while draining"
    );
}

#[test]
fn token_required_when_loopback_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("admin-b");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let extra = format!(
        "admin_trust_loopback: false, admin_token_file: {}",
        token_file.display()
    );
    let p = ProxyProc::start(dir.path(), "pb", &yaml(dir.path(), up.port), &extra).ready();

    // Without loopback trust this client is any other peer: the same rule a pod elsewhere in
    // the cluster meets (the decision is table-tested with pod addresses in observe/guard.rs).
    let r = admin(&p, "POST", "/drain?wait=10ms", "");
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.body.contains("bearer token"), "{r:?}");
    let r = admin(
        &p,
        "POST",
        "/drain?wait=10ms",
        "Authorization: Bearer s3cret-tokeN\r\n",
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(!r.body.contains("s3cret"), "the body never echoes a token");
    assert_eq!(ready(&p), 200, "refused drains change nothing");
    assert_eq!(
        metric(&p, "tunnox_proxy_admin_refused_total{reason=\"bad_token\"}"),
        1
    );
    assert!(
        !p.log().contains("s3cret"),
        "the token is never logged:\n{}",
        p.log()
    );

    // tunnox drain with the configuration: the admin address and the token come from it.
    let admin_addr = format!("127.0.0.1:{}", p.admin);
    let (code, _, err) = tunnox(&["drain", "--admin", &admin_addr, "--wait", "10ms"]);
    assert_eq!(code, 1, "without the token: {err}");
    assert!(err.contains("refused to drain: 401"), "{err}");
    assert_eq!(ready(&p), 200);
    let config = p.config.to_str().unwrap().to_string();
    let (code, out, err) = tunnox(&["--config", &config, "drain", "--wait", "50ms"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("drained"), "{out}");
    assert_eq!(ready(&p), 503, "drained by tunnox drain");
}

#[test]
fn tunnox_drain_fails_clearly() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let (code, out, err) = tunnox(&["drain", "--admin", &addr, "--wait", "1s"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("cannot reach the proxy's admin port {addr}")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "fails at once");

    let (code, _, err) = tunnox(&["drain", "--admin", &addr, "--wait", "1h"]);
    assert_eq!(code, 2, "clap rejects the argument: {err}");
    assert!(err.contains("at most 10m"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-token");
    let (code, _, err) = tunnox(&[
        "drain",
        "--admin",
        &addr,
        "--token-file",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--token-file") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn unreadable_token_file_stops_the_proxy_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "storage: {{type: memory}}\nproxy: {{admin_token_file: {}}}\n",
            dir.path().join("nope").display()
        ),
    )
    .unwrap();
    let (code, _, err) = tunnox(&["--config", config.to_str().unwrap(), "check-config"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("proxy.admin_token_file: cannot read"), "{err}");
}
