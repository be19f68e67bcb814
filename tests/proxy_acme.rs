//! ACME HTTP-01 answers: every `tunnox proxy` sharing a real redis-server serves the store's
//! challenge answers at `/.well-known/acme-challenge/<token>` on any Host, before Host
//! routing; a token it does not hold is routed to the tenant's upstream as usual.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::RedisServer;
use support::http::{Upstream, get};
use support::process::{eventually, metric};
use support::proxy::ProxyProc;
use tunnox::domain::MappingSpec;
use tunnox::store::{ChallengeStore, MappingStore, RedisOptions, RedisStore};

fn yaml(redis: &RedisServer) -> String {
    format!(
        "storage: {{type: redis, redis: {{addr: \"{}\"}}}}
http_domain: {{base_domains: [tunnox.net]}}
egress: {{allow: [\"127.0.0.0/8\"]}}",
        redis.addr()
    )
}

#[test]
fn every_proxy_answers_http01_challenges_from_the_store_on_any_host() {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(
        rt.block_on(RedisStore::connect(RedisOptions::new(&redis.addr())))
            .unwrap(),
    );
    let up = Upstream::start("one");
    let dir = tempfile::tempdir().unwrap();
    let fast = ProxyProc::start(dir.path(), "fast", &yaml(&redis), "").ready();
    let general =
        ProxyProc::start(dir.path(), "general", &yaml(&redis), "fast_path: false").ready();
    rt.block_on(store.create(MappingSpec::new("app", "tunnox.net", "127.0.0.1", up.port)))
        .unwrap();
    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let answer = format!("{token}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI");
    rt.block_on(store.put_challenge(token, &answer, Duration::from_secs(60)))
        .unwrap();
    let path = format!("/.well-known/acme-challenge/{token}");
    for p in [&fast, &general] {
        eventually("app served", Duration::from_secs(10), || {
            p.status("app.tunnox.net") == 200
        });
        // The mapped host and a host nobody mapped alike: the CA asks for the domain it
        // validates, which may not be routed yet.
        for host in ["app.tunnox.net", "not-mapped.example"] {
            let r = get(p.port, host, &path).expect("an answer");
            assert_eq!(
                (r.status, r.body.as_str()),
                (200, answer.as_str()),
                "{host}"
            );
            assert_eq!(r.header("content-type"), Some("text/plain"));
            assert_eq!(r.header("x-upstream"), None, "not the upstream's");
        }
        // Not a token, or not one the store holds: the tenant's own (cert-manager behind the
        // proxy), routed to its upstream like any other path.
        for bad in ["nope", "a.b", "%2e%2e", "", &"a".repeat(200)] {
            let r = get(
                p.port,
                "app.tunnox.net",
                &format!("/.well-known/acme-challenge/{bad}"),
            )
            .expect("an answer");
            assert_eq!(r.header("x-upstream"), Some("one"), "{bad}: {r:?}");
        }
        let r = get(
            p.port,
            "not-mapped.example",
            "/.well-known/acme-challenge/nope",
        )
        .unwrap();
        assert_eq!(
            r.status, 404,
            "an unmapped host without an answer: no mapping"
        );
        // Everything else on the host still goes to its upstream.
        let r = get(p.port, "app.tunnox.net", "/.well-known/other").unwrap();
        assert_eq!(r.header("x-upstream"), Some("one"));
    }
    assert!(
        metric(
            fast.admin,
            "tunnox_proxy_handovers_total{reason=\"acme_challenge\"}"
        ) >= 2,
        "the fast path hands challenges to the general path"
    );
    // Removed (or expired): no answer any more.
    rt.block_on(store.remove_challenge(token)).unwrap();
    assert_eq!(
        get(fast.port, "app.tunnox.net", &path)
            .unwrap()
            .header("x-upstream"),
        Some("one")
    );
    rt.block_on(store.put_challenge(token, &answer, Duration::from_secs(1)))
        .unwrap();
    assert_eq!(get(general.port, "x.example", &path).unwrap().status, 200);
    eventually("the answer expires", Duration::from_secs(5), || {
        get(general.port, "x.example", &path).is_some_and(|r| r.status == 404)
    });
    // A store refuses what no CA would send.
    assert!(
        rt.block_on(store.put_challenge("../x", "../x.t", Duration::from_secs(60)))
            .is_err()
    );
    assert!(
        rt.block_on(store.put_challenge(token, "other.t", Duration::from_secs(60)))
            .is_err()
    );
}

/// Single-node ACME (`proxy.acme`, a mapping with `tls: {acme: true}`) against pebble on
/// loopback: the proxy creates its account, orders the certificate, answers pebble's HTTP-01
/// validation on its own plain listener, keeps account and certificate as private files in
/// `state_dir` and serves the certificate by SNI. A renewal that comes due replaces it while
/// requests keep flowing (kept connections and new handshakes) with no failure; a name the CA
/// refuses is retried with backoff and affects nothing else; a restart orders nothing.
#[test]
fn a_single_node_proxy_orders_serves_and_renews_its_own_certificates() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("acme-single");
    let (port, admin, https) = (
        support::process::free_port(),
        support::process::free_port(),
        support::process::free_port(),
    );
    let pebble = support::pebble::Pebble::start(dir.path(), port, &["blocked.tunnox.net"]);
    let state = dir.path().join("acme-state");
    let yaml = format!(
        "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}
http_domain: {{base_domains: [tunnox.net]}}
mappings:
  - {{subdomain: site, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {up}, tls: {{acme: true, redirect_http: true}}}}
  - {{subdomain: blocked, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {up}, tls: {{acme: true}}}}
  - {{subdomain: plain, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {up}}}",
        up = up.port
    );
    let extra = format!(
        "tls_listen: \"127.0.0.1:{https}\", tls: {{redirect_port: {https}, reload_interval: 500ms}}, \
         acme: {{directory_url: \"{}\", ca_file: \"{}\", email: ops@tunnox.net, state_dir: \"{}\", \
         check_interval: 1s, min_reorder_interval: 1s, order_timeout: 60s}}",
        pebble.directory,
        pebble.listener_ca.display(),
        state.display()
    );
    let start = || ProxyProc::start_on(dir.path(), "p", &yaml, &extra, port, admin).ready();
    let proxy = start();
    let host = "site.tunnox.net";
    let roots = std::cell::OnceCell::new();
    let served = |roots: &std::path::Path| {
        support::http::TlsConnection::open(https, host, roots)
            .and_then(|mut c| Ok((c.get(host)?, c.peer_leaf())))
    };
    let began = std::time::Instant::now();
    let issued = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eventually(
            "the ordered certificate served",
            Duration::from_secs(60),
            || served(roots.get_or_init(|| pebble.roots_file())).is_ok_and(|(code, _)| code == 200),
        )
    }));
    if issued.is_err() {
        panic!(
            "not issued\nproxy:\n{}\npebble:\n{}",
            proxy.log(),
            pebble.log()
        );
    }
    eprintln!("single-node ACME: served {:?} after start", began.elapsed());
    let roots = roots.get().unwrap().clone();
    // Account and certificate kept as private files.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let key = state.join(format!("{host}.key"));
    assert_eq!(mode(&key), 0o600, "the key is private");
    let account = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("account-")
        })
        .expect("the account's credentials kept");
    assert_eq!(mode(&account), 0o600, "the account's key is private");
    // Plain requests go to HTTPS; the name without TLS is unaffected.
    let plain = get(port, host, "/").expect("an answer");
    assert_eq!(plain.status, 308, "redirect_http");
    assert_eq!(
        get(port, "plain.tunnox.net", "/")
            .expect("an answer")
            .status,
        200
    );
    // The refused name: failed, retried, nothing served for it.
    eventually("the refused order counted", Duration::from_secs(30), || {
        metric(admin, "tunnox_proxy_acme_orders_total{result=\"failed\"}") >= 1
    });
    assert!(
        support::http::TlsConnection::open(https, "blocked.tunnox.net", &roots).is_err(),
        "no certificate for a name the CA refused"
    );
    assert_eq!(
        metric(admin, "tunnox_proxy_acme_orders_total{result=\"issued\"}"),
        1
    );

    // Renewal comes due (its record says so): a new certificate, no failed request.
    let (_, before) = served(&roots).unwrap();
    let load = support::http::TlsLoad::start(https, host, &roots);
    std::thread::sleep(Duration::from_secs(1));
    let meta_file = state.join(format!("{host}.json"));
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_file).unwrap()).unwrap();
    meta["renew_at"] = serde_json::json!(chrono::Utc::now().to_rfc3339());
    std::fs::write(&meta_file, meta.to_string()).unwrap();
    let took = eventually(
        "the renewed certificate served",
        Duration::from_secs(60),
        || served(&roots).is_ok_and(|(_, leaf)| leaf != before),
    );
    std::thread::sleep(Duration::from_secs(1));
    let (done, failed, leaves) = load.stop();
    eprintln!(
        "single-node ACME: renewal served {took:?} after it came due; {done} requests under load, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed during the renewal: {failed:?}");
    assert!(
        done > 50 && leaves == 2,
        "{done} requests, {leaves} certificates"
    );
    assert_eq!(
        metric(admin, "tunnox_proxy_acme_orders_total{result=\"issued\"}"),
        2
    );

    // A restart serves the kept certificate at once and orders nothing.
    drop(proxy);
    let proxy = start();
    let (code, leaf) = served(&roots).expect("served right after the restart");
    assert_eq!(code, 200);
    assert_ne!(leaf, before, "the renewed one");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        metric(admin, "tunnox_proxy_acme_orders_total{result=\"issued\"}"),
        0,
        "nothing ordered again:\n{}",
        proxy.log()
    );
    std::mem::forget(up);
}
