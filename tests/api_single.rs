//! The management API served by `tunnox proxy` in single-node mode, over real HTTP: tokens and
//! roles, availability, create (then served by the proxy), filters and paging, statistics,
//! delete and force-delete, and bad input answered with a 4xx naming the field.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::api::Api;
use support::http::{Upstream, get};
use support::process::{eventually, free_port};
use support::proxy::ProxyProc;

const ADMIN: &str = "admin-token-0123456789abcdef";
const ALICE: &str = "alice-token-0123456789abcdef";
const BOB: &str = "bob-token-0123456789abcdef00";

fn start() -> (tempfile::TempDir, Upstream, ProxyProc, Api) {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start("one");
    let api_port = free_port();
    let yaml = config(dir.path(), api_port, up.port);
    let p = ProxyProc::start(dir.path(), "p1", &yaml, EXTRA).ready();
    (
        dir,
        up,
        p,
        Api {
            port: api_port,
            tls: None,
        },
    )
}

const EXTRA: &str = "stats_flush_interval: 100ms";

fn config(dir: &std::path::Path, api_port: u16, upstream: u16) -> String {
    format!(
        "storage: {{type: memory, hybrid: {{json: {{file_path: {data}, save_interval: 0}}}}}}
http_domain: {{base_domains: [tunnox.net]}}
log: {{level: debug}}
egress: {{allow: [\"127.0.0.1/32\"]}}
api:
  listen: \"127.0.0.1:{api_port}\"
  max_mappings_per_user: 3
  tokens:
    - {{token: {ADMIN}, role: admin}}
    - {{token: {ALICE}, role: \"user:alice\"}}
    - {{token: {BOB}, role: \"user:bob\"}}
mappings:
  - {{subdomain: app, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {upstream}}}",
        data = dir.join("data.json").display(),
    )
}

fn mapping(sub: &str, port: u32, extra: &str) -> String {
    format!(
        r#"{{"subdomain": "{sub}", "base_domain": "tunnox.net", "target_host": "127.0.0.1", "target_port": {port}{extra}}}"#
    )
}

#[test]
fn tokens_and_roles_are_required() {
    let (_dir, _up, _p, api) = start();
    for (token, why) in [
        (None, "missing"),
        (Some("wrong-token-0123456789"), "not accepted"),
    ] {
        let r = api.call("GET", "/api/v1/mappings", token, None);
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let e: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(e["code"], "unauthorized");
        assert_eq!(e["field"], "authorization");
        assert!(e["message"].as_str().unwrap().contains(why), "{e}");
    }
    // The document needs no token and describes every operation.
    let doc = api.call("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(doc.status, 200);
    let doc: Value = serde_json::from_str(&doc.body).unwrap();
    assert!(
        doc["paths"]["/api/v1/mappings"]["post"].is_object(),
        "{doc}"
    );
    let (status, e) = api.json("GET", "/api/v1/stats/system", ALICE, None);
    assert_eq!((status, e["code"].as_str()), (403, Some("forbidden")));
    let (status, stats) = api.json("GET", "/api/v1/stats/system", ADMIN, None);
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["cache"]["type"], "memory");
    assert_eq!(stats["mappings"]["Active"], 1, "{stats}");
    assert_eq!(stats["proxies"][0]["node_id"], "p1", "{stats}");
    let (status, e) = api.json("GET", "/api/v1/nope", ADMIN, None);
    assert_eq!((status, e["code"].as_str()), (404, Some("not_found")));
    let (status, e) = api.json("PUT", "/api/v1/mappings", ADMIN, None);
    assert_eq!(
        (status, e["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

#[test]
fn create_serve_availability_and_delete() {
    let (_dir, up, p, api) = start();
    let free = "/api/v1/availability?subdomain=new&base_domain=tunnox.net";
    let (status, a) = api.json("GET", free, ALICE, None);
    assert_eq!(status, 200);
    assert_eq!(
        (a["available"].as_bool(), a["verdict"].as_str()),
        (Some(true), Some("free"))
    );

    let (status, m) = api.create(
        ALICE,
        &mapping("new", up.port.into(), r#", "description": "mine""#),
    );
    assert_eq!(status, 201, "{m}");
    assert_eq!(m["owner_user_id"], "alice");
    assert_eq!(m["source"], "api");
    assert_eq!(m["phase"], "Active");
    let id = m["id"].as_str().unwrap().to_string();
    // Served by the proxy at once.
    eventually("new.tunnox.net served", Duration::from_secs(5), || {
        p.status("new.tunnox.net") == 200
    });
    assert_eq!(
        get(p.port, "new.tunnox.net", "/").unwrap().body,
        "hello from one\n"
    );

    let (_, a) = api.json("GET", free, ALICE, None);
    assert_eq!(
        (a["available"].as_bool(), a["verdict"].as_str()),
        (Some(false), Some("taken"))
    );
    assert_eq!(a["held_by"]["yours"], true);
    assert_eq!(a["held_by"]["mapping_id"], id.as_str());
    let (_, a) = api.json("GET", free, BOB, None);
    assert_eq!(a["held_by"]["yours"], false);
    assert!(
        a["held_by"]["mapping_id"].is_null(),
        "another user's holder is not named: {a}"
    );
    let (_, a) = api.json("GET", free, ADMIN, None);
    assert_eq!(a["held_by"]["owner_user_id"], "alice");
    let (_, a) = api.json(
        "GET",
        "/api/v1/availability?subdomain=x&base_domain=other.org",
        ALICE,
        None,
    );
    assert_eq!(a["verdict"], "not_allowed", "{a}");
    assert!(a["message"].as_str().unwrap().contains("other.org"), "{a}");

    // Taken, someone else as owner, and another user's mapping.
    let (status, e) = api.create(BOB, &mapping("new", up.port.into(), ""));
    assert_eq!(
        (status, e["code"].as_str(), e["field"].as_str()),
        (409, Some("domain_taken"), Some("subdomain"))
    );
    assert!(
        !e["message"].as_str().unwrap().contains("hdm_"),
        "the holder is not named to another user: {e}"
    );
    let (_, e) = api.create(ADMIN, &mapping("new", up.port.into(), ""));
    assert!(
        e["message"].as_str().unwrap().contains(&id),
        "an administrator is told the holder: {e}"
    );
    // A user claims one label exactly under a base domain, never a tunnel client.
    for (body, status, field) in [
        (mapping("login.new", up.port.into(), ""), 422, "subdomain"),
        (
            mapping("x", up.port.into(), "").replace("\"tunnox.net\"", "\"new.tunnox.net\""),
            422,
            "base_domain",
        ),
        (
            mapping("x", up.port.into(), r#", "target_client_id": "laptop""#),
            403,
            "target_client_id",
        ),
    ] {
        let (got, e) = api.create(BOB, &body);
        assert_eq!(
            (got, e["field"].as_str()),
            (status, Some(field)),
            "{body}: {e}"
        );
    }
    // At most max_mappings_per_user (3) per user, counted atomically by the store.
    for sub in ["q1", "q2"] {
        assert_eq!(api.create(ALICE, &mapping(sub, up.port.into(), "")).0, 201);
    }
    let (status, e) = api.create(ALICE, &mapping("q3", up.port.into(), ""));
    assert_eq!(
        (status, e["code"].as_str()),
        (409, Some("quota_exceeded")),
        "{e}"
    );
    let (status, e) = api.create(
        ALICE,
        &mapping("b2", up.port.into(), r#", "owner_user_id": "bob""#),
    );
    assert_eq!((status, e["field"].as_str()), (403, Some("owner_user_id")));
    let (status, _) = api.json("GET", &format!("/api/v1/mappings/{id}"), BOB, None);
    assert_eq!(status, 404, "another user's mapping is not shown");
    let (status, got) = api.json("GET", &format!("/api/v1/mappings/{id}"), ALICE, None);
    assert_eq!(
        (status, got["domain"].as_str()),
        (200, Some("new.tunnox.net"))
    );

    // Its traffic, as the proxy counted it.
    for _ in 0..3 {
        assert_eq!(p.status("new.tunnox.net"), 200);
    }
    eventually("the requests counted", Duration::from_secs(5), || {
        let (_, s) = api.json("GET", &format!("/api/v1/mappings/{id}/stats"), ALICE, None);
        s["requests"].as_u64() >= Some(4) && s["bytes_out"].as_u64() > Some(0)
    });

    // Declared in the configuration file: only an administrator's force-delete removes it.
    let (_, page) = api.json("GET", "/api/v1/mappings?domain_prefix=app.", ADMIN, None);
    let app = page["items"][0]["id"].as_str().unwrap().to_string();
    let (status, e) = api.json("DELETE", &format!("/api/v1/mappings/{app}"), ADMIN, None);
    assert_eq!((status, e["code"].as_str()), (409, Some("conflict")), "{e}");
    let (status, e) = api.json(
        "DELETE",
        &format!("/api/v1/mappings/{app}?force=true"),
        ALICE,
        None,
    );
    assert_eq!((status, e["field"].as_str()), (403, Some("force")));
    let (status, _) = api.json(
        "DELETE",
        &format!("/api/v1/mappings/{app}?force=true"),
        ADMIN,
        None,
    );
    assert_eq!(status, 204);
    eventually("app.tunnox.net gone", Duration::from_secs(5), || {
        p.status("app.tunnox.net") == 404
    });
    let (_, a) = api.json(
        "GET",
        "/api/v1/availability?subdomain=app&base_domain=tunnox.net",
        BOB,
        None,
    );
    assert_eq!(a["verdict"], "free");

    // The owner deletes its own; another user cannot.
    let (status, _) = api.json("DELETE", &format!("/api/v1/mappings/{id}"), BOB, None);
    assert_eq!(status, 404);
    let (status, _) = api.json("DELETE", &format!("/api/v1/mappings/{id}"), ALICE, None);
    assert_eq!(status, 204);
    eventually("new.tunnox.net gone", Duration::from_secs(5), || {
        p.status("new.tunnox.net") == 404
    });
    let (_, a) = api.json("GET", free, ALICE, None);
    assert_eq!(a["verdict"], "free");

    // Requests in the metrics, by route template and status.
    let metrics = p.admin_get("/metrics").unwrap().body;
    assert!(
        metrics.contains(
            r#"tunnox_api_requests_total{method="POST",route="/api/v1/mappings",status="201"} 3"#
        ),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("tunnox_api"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn filters_return_exactly_their_set_and_pages_cover_everything() {
    let (_dir, up, _p, api) = start();
    let own = |owner: &str| format!(r#", "owner_user_id": "{owner}""#);
    let made = [
        ("api-a1", own("alice")),
        ("api-a2", own("alice")),
        ("web-b1", own("bob")),
        (
            "web-b2",
            format!(r#"{}, "target_client_id": "laptop""#, own("bob")),
        ),
        ("api-n1", String::new()),
        ("tun-n2", r#", "target_client_id": "laptop""#.to_string()),
        ("tun-n3", r#", "target_client_id": "desk""#.to_string()),
    ];
    for (sub, extra) in &made {
        let (status, m) = api.create(ADMIN, &mapping(sub, up.port.into(), extra));
        assert_eq!(status, 201, "{sub}: {m}");
    }
    let set = |v: Vec<String>| v.into_iter().collect::<BTreeSet<_>>();
    let names = |subs: &[&str]| {
        subs.iter()
            .map(|s| format!("{s}.tunnox.net"))
            .collect::<BTreeSet<_>>()
    };
    let all = names(&[
        "app", "api-a1", "api-a2", "web-b1", "web-b2", "api-n1", "tun-n2", "tun-n3",
    ]);
    let cases: &[(&str, &str, BTreeSet<String>)] = &[
        (ADMIN, "", all.clone()),
        (ADMIN, "user=alice", names(&["api-a1", "api-a2"])),
        (ADMIN, "client=laptop", names(&["web-b2", "tun-n2"])),
        (ADMIN, "user=bob&client=laptop", names(&["web-b2"])),
        (
            ADMIN,
            "domain_prefix=api-",
            names(&["api-a1", "api-a2", "api-n1"]),
        ),
        (
            ADMIN,
            "domain_prefix=api-&user=alice",
            names(&["api-a1", "api-a2"]),
        ),
        (ADMIN, "phase=Active", all.clone()),
        (ADMIN, "phase=Conflict", BTreeSet::new()),
        (ADMIN, "set=default.local", BTreeSet::new()),
        (ALICE, "", names(&["api-a1", "api-a2"])),
        (BOB, "client=laptop", names(&["web-b2"])),
    ];
    for (token, query, want) in cases {
        for limit in [1, 2, 100] {
            let got = api.domains(token, query, limit);
            assert_eq!(
                got.len(),
                set(got.clone()).len(),
                "{query} limit {limit}: duplicates {got:?}"
            );
            assert_eq!(&set(got), want, "{query} limit {limit}");
        }
    }
    let (status, e) = api.json("GET", "/api/v1/mappings?user=bob", ALICE, None);
    assert_eq!((status, e["field"].as_str()), (403, Some("user")));
}

#[test]
fn bad_input_is_a_4xx_naming_the_field() {
    let (_dir, up, mut p, api) = start();
    let own_admin = format!(
        r#"{{"subdomain": "loop", "base_domain": "tunnox.net", "target_host": "127.0.0.1", "target_port": {}}}"#,
        p.admin
    );
    let big = format!(r#"{{"subdomain": "{}"}}"#, "a".repeat(10 * 1024 * 1024));
    let bodies: &[(&str, String, u16, &str)] = &[
        (
            "invalid domain",
            mapping("bad_domain", up.port.into(), ""),
            422,
            "subdomain",
        ),
        (
            "other base domain",
            mapping("x", up.port.into(), "").replace("tunnox.net", "other.org"),
            422,
            "base_domain",
        ),
        ("the proxy's own admin port", own_admin, 422, "target_host"),
        ("port 0", mapping("x", 0, ""), 422, "target_port"),
        (
            "port out of range",
            mapping("x", 70000, ""),
            400,
            "target_port",
        ),
        (
            "port as text",
            mapping("x", up.port.into(), "").replace(&up.port.to_string(), "\"80\""),
            400,
            "target_port",
        ),
        ("malformed JSON", "{\"subdomain\": ".into(), 400, "body"),
        (
            "missing field",
            r#"{"subdomain": "x"}"#.into(),
            400,
            "base_domain",
        ),
        (
            "unknown field",
            mapping("x", up.port.into(), r#", "colour": "red""#),
            400,
            "colour",
        ),
        (
            "reserved header",
            mapping(
                "x",
                up.port.into(),
                r#", "custom_headers": {"Transfer-Encoding": "x"}"#,
            ),
            422,
            "custom_headers",
        ),
        (
            "expired already",
            mapping(
                "x",
                up.port.into(),
                r#", "expires_at": "2000-01-01T00:00:00Z""#,
            ),
            422,
            "expires_at",
        ),
        (
            "scheme",
            mapping("x", up.port.into(), r#", "target_scheme": "gopher""#),
            400,
            "target_scheme",
        ),
        ("10 MB body", big, 413, "body"),
        (
            "a proxy header",
            mapping(
                "x",
                up.port.into(),
                r#", "custom_headers": {"Tunnox-Target": "x"}"#,
            ),
            422,
            "custom_headers",
        ),
    ];
    for (what, body, status, field) in bodies {
        let (got, e) = api.create(ADMIN, body);
        assert_eq!(got, *status, "{what}: {e}");
        assert_eq!(e["field"], *field, "{what}: {e}");
        assert!(
            !e["message"].as_str().unwrap_or("").is_empty(),
            "{what}: {e}"
        );
    }
    let queries: &[(&str, u16, &str)] = &[
        ("/api/v1/mappings?limit=1000000000", 400, "limit"),
        ("/api/v1/mappings?limit=0", 400, "limit"),
        ("/api/v1/mappings?limit=-1", 400, "limit"),
        ("/api/v1/mappings?colour=red", 400, "colour"),
        ("/api/v1/mappings?phase=Sleeping", 400, "phase"),
        ("/api/v1/mappings?cursor=nope", 400, "cursor"),
        ("/api/v1/mappings?set=NO", 400, "set"),
        ("/api/v1/mappings?domain_prefix=%00", 400, "domain_prefix"),
        ("/api/v1/mappings/nope", 400, "id"),
        ("/api/v1/availability?subdomain=x", 400, "base_domain"),
        (
            "/api/v1/mappings/hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV?force=maybe",
            400,
            "force",
        ),
    ];
    for (path, status, field) in queries {
        let method = if path.contains("force") {
            "DELETE"
        } else {
            "GET"
        };
        let (got, e) = api.json(method, path, ADMIN, None);
        assert_eq!(got, *status, "{path}: {e}");
        assert_eq!(e["field"], *field, "{path}: {e}");
    }
    assert!(p.role.is_running(), "the proxy is still up");
}

/// Every operation of the OpenAPI document fuzzed by schemathesis (property-based, from PyPI;
/// `.ci/schemathesis.sh` installs it outside the clone): no 5xx, every response as documented
/// (status, content type, schema, headers), schema-invalid input refused, authentication
/// enforced; as an administrator and as a user.
#[test]
fn fuzzed_from_the_openapi_document() {
    let (dir, _up, mut p, api) = start();
    for token in [ADMIN, ALICE] {
        support::api::fuzz(api.port, token, dir.path(), 50);
    }
    assert!(p.role.is_running(), "the proxy is still up");
}

#[test]
fn mappings_created_through_the_api_survive_a_restart() {
    let (dir, up, mut p, api) = start();
    let (status, m) = api.create(ALICE, &mapping("kept", up.port.into(), ""));
    assert_eq!(status, 201, "{m}");
    assert_eq!(p.role.terminate(Duration::from_secs(10)), Some(0));
    let yaml = config(dir.path(), api.port, up.port);
    let p = ProxyProc::start_on(dir.path(), "p1", &yaml, EXTRA, p.port, p.admin).ready();
    assert_eq!(p.status("kept.tunnox.net"), 200);
    let (status, got) = api.json(
        "GET",
        &format!("/api/v1/mappings/{}", m["id"].as_str().unwrap()),
        ALICE,
        None,
    );
    assert_eq!(
        (status, got["owner_user_id"].as_str()),
        (200, Some("alice")),
        "{got}"
    );
}

/// `api.tls`: the API is served over TLS with the configured certificate, and a plain-HTTP
/// request gets no HTTP answer.
#[test]
fn served_over_tls_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::tunnel::Pki::new(dir.path(), "api");
    let up = Upstream::start("tls");
    let api_port = free_port();
    let yaml = config(dir.path(), api_port, up.port).replace(
        "  max_mappings_per_user: 3\n",
        &format!(
            "  max_mappings_per_user: 3\n  tls: {{cert_file: {}, key_file: {}}}\n",
            pki.cert.display(),
            pki.key.display()
        ),
    );
    let _p = ProxyProc::start(dir.path(), "tls", &yaml, EXTRA).ready();
    let api = Api {
        port: api_port,
        tls: Some((pki.ca.clone(), "localhost".into())),
    };
    let (status, page) = api.json("GET", "/api/v1/mappings", ADMIN, None);
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["domain"], "app.tunnox.net");
    let (status, e) = api.json(
        "GET",
        "/api/v1/mappings",
        "wrong-token-0123456789abcdef",
        None,
    );
    assert_eq!((status, e["code"].as_str()), (401, Some("unauthorized")));
    let plain = support::http::raw(
        api_port,
        b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        plain.is_none(),
        "a plain request is not answered in HTTP: {plain:?}"
    );
}
