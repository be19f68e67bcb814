//! Per-mapping isolation under a flood (issue #18, docs/sets.md "Limits"), in its own test
//! binary so that no other test shares the machine while latency is measured.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::http::{Upstream, read_reply};
use support::proxy::ProxyProc;

/// Pins every thread of process `pid` to CPU `cpu` (when the machine has two or more).
fn pin(pid: u32, cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status();
}

/// Per-mapping isolation (issue #18, docs/sets.md "Limits"): wrk floods one mapping with slow
/// requests. Over `mapping_concurrency` it gets 503 with `Retry-After`; another mapping on the
/// same proxy and one on another set's proxy (another process) keep answering every request.
/// Latency: wrk runs on one core, the proxies, the upstream and this client on the other. The
/// flood's 503s still take CPU from every process on that core (the other set's proxy, which
/// carries none of the flood, sees its p99 grow 1.5–2.7×), so the calm mapping's p99 under the
/// flood is held to 1.5× of that other proxy's p99 under the same flood — the flooded proxy
/// adds no latency of its own to another mapping; both are printed beside the unloaded ones. The control: the same flood against a proxy without the per-mapping limit takes every
/// upstream place (`upstream_requests`) and the calm mapping is refused with it — the
/// per-mapping limit is what isolates.
#[test]
fn a_flooded_mapping_is_limited_and_the_others_keep_their_latency() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("limits");
    let mappings = |names: &[&str]| {
        let list: Vec<String> = names
            .iter()
            .map(|n| {
                format!(
                    "  - {{subdomain: {n}, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {}}}",
                    up.port
                )
            })
            .collect();
        format!(
            "storage: {{type: memory}}\nhttp_domain: {{base_domains: [tunnox.net]}}\nmappings:\n{}",
            list.join("\n")
        )
    };
    let limits = |per_mapping: u32| {
        format!(
            "set: novel.sh, limits: {{mapping_concurrency: {per_mapping}, upstream_requests: 16}}"
        )
    };
    let here =
        ProxyProc::start(dir.path(), "sh", &mappings(&["flood", "calm"]), &limits(4)).ready();
    let other = ProxyProc::start(
        dir.path(),
        "ams",
        &mappings(&["other"]),
        "set: ams.sh, limits: {mapping_concurrency: 4}",
    )
    .ready();
    let unlimited = ProxyProc::start(
        dir.path(),
        "open",
        &mappings(&["flood", "calm"]),
        &limits(0),
    )
    .ready();

    // The load generator on one core, everything measured (proxies, upstream, this client) on
    // the other: the flood's own client does not take the CPU the proxies answer with.
    for pid in [
        here.role.pid(),
        other.role.pid(),
        unlimited.role.pid(),
        std::process::id(),
    ] {
        pin(pid, 1);
    }
    let unloaded = (
        p99(here.port, "calm.tunnox.net"),
        p99(other.port, "other.tunnox.net"),
    );

    // The flood: 32 connections asking for 300 ms answers, each pausing 20 ms between requests.
    let script = dir.path().join("flood.lua");
    std::fs::write(&script, "delay = function() return 20 end\n").unwrap();
    let flood = |port: u16| {
        std::process::Command::new("taskset")
            .args([
                "-c",
                "0",
                "wrk",
                "-t1",
                "-c32",
                "-d8s",
                "-H",
                "Host: flood.tunnox.net",
                "-s",
            ])
            .arg(&script)
            .arg(format!("http://127.0.0.1:{port}/slow?ms=300"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("wrk (e2e/install-deps.sh installs it)")
    };
    let wrk = flood(here.port);
    std::thread::sleep(Duration::from_secs(1));
    let refused = support::http::get(here.port, "flood.tunnox.net", "/slow?ms=300").unwrap();
    // Twice each, interleaved, the lower kept: one scheduler hiccup of the shared machine is
    // not the proxy's latency.
    let calm = [
        p99(here.port, "calm.tunnox.net"),
        p99(here.port, "calm.tunnox.net"),
    ];
    let elsewhere = [
        p99(other.port, "other.tunnox.net"),
        p99(other.port, "other.tunnox.net"),
    ];
    let loaded = (calm[0].min(calm[1]), elsewhere[0].min(elsewhere[1]));
    let out = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!(
        "flood: {}",
        report
            .lines()
            .filter(|l| l.contains("Non-2xx") || l.contains("Requests/sec"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "p99 unloaded: same set {:?}, other set {:?}",
        unloaded.0, unloaded.1
    );
    println!(
        "p99 under the flood: same set {:?}, other set {:?}",
        loaded.0, loaded.1
    );

    assert_eq!(refused.status, 503, "{}", refused.body);
    let retry_after = refused
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.as_str());
    assert_eq!(retry_after, Some("1"));
    assert!(
        report.contains("Non-2xx"),
        "the flood was refused: {report}"
    );
    assert!(
        support::process::metric(
            here.admin,
            "tunnox_proxy_limited_total{limit=\"mapping_concurrency\"}"
        ) > 0,
        "counted"
    );
    assert!(
        loaded.0.as_secs_f64() <= loaded.1.as_secs_f64() * 1.5,
        "the flooded proxy's calm mapping: p99 {:?} under the flood; the other set's proxy: {:?}",
        loaded.0,
        loaded.1
    );

    // The control: no per-mapping limit, so the flood takes all 16 upstream places. A place
    // freed by an answer is free until the next flood request takes it (about a millisecond),
    // so one calm request may slip in: 20 of them, 50 ms apart, and most must be refused (one
    // request alone, 200 instead of 503, failed twice: once beside a build, once in CI).
    let wrk = flood(unlimited.port);
    std::thread::sleep(Duration::from_secs(1));
    let statuses: Vec<u16> = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            support::http::get(unlimited.port, "calm.tunnox.net", "/")
                .unwrap()
                .status
        })
        .collect();
    wrk.wait_with_output().unwrap();
    let refused = statuses.iter().filter(|s| **s == 503).count();
    println!("control: the calm mapping refused {refused} times of 20 under the flood");
    assert!(
        refused >= 10,
        "without the per-mapping limit the flood starves the calm mapping: {statuses:?}"
    );
    assert!(
        support::process::metric(
            unlimited.admin,
            "tunnox_proxy_limited_total{limit=\"upstream_requests\"}"
        ) > 0,
        "counted"
    );
}

/// The 99th percentile of 1 000 sequential GETs for `host` on one kept-alive connection; every
/// answer must be 200.
fn p99(port: u16, host: &str) -> Duration {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut took: Vec<Duration> = (0..1000)
        .map(|_| {
            let t = Instant::now();
            s.write_all(req.as_bytes()).unwrap();
            let r = read_reply(&mut s).expect("an answer");
            assert_eq!(r.status, 200, "{host}: {}", r.body);
            t.elapsed()
        })
        .collect();
    took.sort();
    took[took.len() * 99 / 100]
}
