//! Draining under load (seed 003, ARCHITECTURE §8): wrk sends through nginx to two proxies while
//! one is drained, stopped with SIGTERM and started again; no request may fail, and the balancer
//! may not have hidden a failure by retrying it on the other proxy (every request reached exactly
//! one proxy). nginx follows readiness as a Service's endpoints do: a proxy that reports not ready
//! is taken out of its upstream list (configuration reload), and put back once ready.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::balancer::Balancer;
use support::http::{Upstream, raw};
use support::process::free_port;
use support::proxy::ProxyProc;

fn yaml(dir: &std::path::Path, name: &str, upstream: u16) -> String {
    format!(
        "storage: {{type: memory, hybrid: {{json: {{file_path: {}}}}}}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {upstream}}}",
        dir.join(format!("{name}.json")).display()
    )
}

#[test]
fn drain_and_restart_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let (pa, aa, pb) = (free_port(), free_port(), free_port());
    let mut a =
        ProxyProc::start_on(dir.path(), "a", &yaml(dir.path(), "a", up.port), "", pa, aa).ready();
    let b = ProxyProc::start_on(
        dir.path(),
        "b",
        &yaml(dir.path(), "b", up.port),
        "",
        pb,
        free_port(),
    )
    .ready();
    let lb_port = free_port();
    let lb = Balancer::start(dir.path(), lb_port, &[pa, pb]);
    support::process::eventually("balancer up", Duration::from_secs(5), || {
        support::http::status(lb_port, "app.tunnox.net") == 200
    });

    let load = std::thread::spawn(move || {
        Command::new("wrk")
            .args(["-t1", "-c16", "-d8s", "-H", "Host: app.tunnox.net"])
            .arg(format!("http://127.0.0.1:{lb_port}/"))
            .output()
            .expect("wrk (e2e/install-deps.sh installs it)")
    });
    std::thread::sleep(Duration::from_millis(1500));

    // preStop: /drain flips readiness and waits; keep-alive answers now say Connection: close.
    let drain = std::thread::spawn(move || {
        raw(
            aa,
            b"POST /drain?wait=1s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        support::http::get(aa, "localhost", "/readyz")
            .unwrap()
            .status,
        503
    );
    // Not ready: out of the endpoints.
    lb.set_backends(&[pb]);
    let keep_alive = raw(
        pa,
        b"GET / HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(keep_alive.status, 200);
    assert_eq!(
        keep_alive.header("connection"),
        Some("close"),
        "{keep_alive:?}"
    );
    assert_eq!(drain.join().unwrap().unwrap().status, 200);

    // SIGTERM with a slow request in flight: it completes, then the process exits 0.
    let in_flight =
        std::thread::spawn(move || support::http::get(pa, "app.tunnox.net", "/slow?ms=1500"));
    std::thread::sleep(Duration::from_millis(200));
    let stopping = Instant::now();
    assert_eq!(
        a.role.terminate(Duration::from_secs(30)),
        Some(0),
        "{}",
        a.log()
    );
    let slow = in_flight
        .join()
        .unwrap()
        .expect("in-flight request answered");
    assert_eq!(slow.status, 200, "{slow:?}");
    assert!(
        stopping.elapsed() >= Duration::from_millis(1000),
        "exited before the request finished"
    );

    // The new version comes up on the same ports.
    let a2 = ProxyProc::start_on(
        dir.path(),
        "a2",
        &yaml(dir.path(), "a", up.port),
        "",
        pa,
        aa,
    )
    .ready();
    lb.set_backends(&[pa, pb]);

    let out = load.join().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let (retried, failed, logged) = lb.retries_and_failures();
    eprintln!("{report}\nbalancer log: {logged} requests");
    assert!(
        retried.is_empty(),
        "{} requests failed on one proxy and were retried on another, e.g. {:?}\n{}",
        retried.len(),
        &retried[..retried.len().min(5)],
        lb.errors()
    );
    assert!(
        failed.is_empty(),
        "{} requests failed at the balancer, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        !lb.errors().contains("[error]"),
        "balancer errors:\n{}",
        lb.errors()
    );
    let requests: u64 = report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        requests > 1000,
        "too little load to prove anything: {report}"
    );
    assert!(
        !report.contains("Non-2xx"),
        "failed requests during the drain:\n{report}"
    );
    assert!(
        !report.contains("Socket errors"),
        "socket errors during the drain:\n{report}"
    );
    assert_eq!(a2.status("app.tunnox.net"), 200);
    assert_eq!(b.status("app.tunnox.net"), 200);
}
