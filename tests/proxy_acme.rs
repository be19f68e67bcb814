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
