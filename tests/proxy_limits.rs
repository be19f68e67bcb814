//! The connection cap per listener (`proxy.limits.max_connections`): 10 000 idle connections
//! against a cap of 5 000 → the excess is refused at once and counted, the proxy's memory stays
//! bounded, and requests are still served.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::http::{Upstream, read_reply};
use support::process::eventually;
use support::proxy::ProxyProc;

fn metric(p: &ProxyProc, name: &str) -> u64 {
    let m = p.admin_get("/metrics").map(|r| r.body).unwrap_or_default();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_idle_connections_against_a_cap_of_five_thousand() {
    const CAP: u64 = 5_000;
    const FLOOD: usize = 10_000;
    assert!(
        open_files_limit() >= 12_000,
        "RLIMIT_NOFILE {} is too low for this test (ulimit -n 20000)",
        open_files_limit()
    );
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let yaml = format!(
        "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}
http_domain: {{base_domains: [tunnox.net]}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {}}}",
        up.port
    );
    // Idle connections are not timed out during the test.
    let p = ProxyProc::start(
        dir.path(),
        "capped",
        &yaml,
        &format!("limits: {{max_connections: {CAP}}}, timeouts: {{request_header: 120s}}"),
    )
    .ready();
    let request = b"GET / HTTP/1.1\r\nHost: app.tunnox.net\r\n\r\n";
    // A client that was there first, kept alive through the flood.
    let mut regular = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    regular
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    regular.write_all(request).unwrap();
    assert_eq!(read_reply(&mut regular).unwrap().status, 200);
    let baseline = rss_kib(p.role.pid());

    let started = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    let mut reset_at_connect = 0;
    for i in 0..FLOOD {
        match TcpStream::connect(("127.0.0.1", p.port)) {
            Ok(s) => flood.push(s),
            // Accepted and closed at once before the connect call returned: refused too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset_at_connect += 1,
            Err(e) => panic!("connect {i} failed: {e}"),
        }
    }
    assert!(reset_at_connect < FLOOD / 2, "the cap refused too many");
    eventually("the excess refused", Duration::from_secs(20), || {
        metric(&p, "tunnox_proxy_connections_refused_total") >= FLOOD as u64 + 1 - CAP
    });
    let took = started.elapsed();
    let refused = metric(&p, "tunnox_proxy_connections_refused_total");
    let open = metric(&p, "tunnox_proxy_active_connections");
    assert_eq!(open, CAP, "connections held at the cap");
    assert_eq!(
        refused,
        FLOOD as u64 + 1 - CAP,
        "every connection over the cap refused"
    );

    let at_cap = rss_kib(p.role.pid());
    let per_connection = (at_cap.saturating_sub(baseline)) * 1024 / CAP;
    eprintln!(
        "{FLOOD} connections in {took:?}: {open} held, {refused} refused; RSS {baseline} KiB → \
         {at_cap} KiB ({per_connection} bytes per held connection)"
    );
    // The bound: 32 KiB per held connection (with the debug build the tests run: the
    // connection's task and its fast-path state, socket registration, allocator slack). Measured
    // 16 KiB when this test was written, 23–24 KiB on 2026-12-01 both before and after tunnel
    // requests joined the fast path (a bound of 24 failed a CI run at 24.2); the 5 001 refused
    // connections cost nothing that stays.
    assert!(
        at_cap < baseline + CAP * 32,
        "RSS grew by more than 32 KiB per held connection: {baseline} → {at_cap} KiB"
    );

    // The proxy still serves the connection it had.
    regular.write_all(request).unwrap();
    assert_eq!(read_reply(&mut regular).unwrap().status, 200);

    // Once the flood leaves, new clients are served again.
    drop(flood);
    eventually("idle connections gone", Duration::from_secs(20), || {
        metric(&p, "tunnox_proxy_active_connections") == 1
    });
    assert_eq!(p.status("app.tunnox.net"), 200);
}
