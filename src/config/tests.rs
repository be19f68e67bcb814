//! Table tests for parsing, overrides, the auto-sharing rules and validation.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn settings(yaml: &str) -> Result<Settings, ConfigError> {
    settings_env(yaml, &[])
}

fn settings_env(yaml: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    resolve(parse(yaml, "test.yaml", &env(vars))?, "test.yaml")
}

#[test]
fn empty_file_is_single_node_defaults() {
    let s = settings("").unwrap();
    assert!(!s.uses_redis);
    assert!(s.auto_shared.is_empty());
    assert_eq!(s.config.http_domain.cache.local.ttl, Dur::secs(60));
    assert_eq!(s.config.http_domain.cache.local.max_size, 10_000);
    assert_eq!(s.config.storage.hybrid.json.save_interval, Dur::secs(30));
    assert_eq!(s.config.proxy.set.to_string(), "default.default");
    assert_eq!(s.config.controller.cluster_id, None);
    let named = settings("controller: {cluster_id: prod-eu.1}").unwrap();
    assert_eq!(
        named.config.controller.cluster_id.as_deref(),
        Some("prod-eu.1")
    );
}

#[test]
fn auto_sharing_rules() {
    // (yaml, rules that fire in order, uses redis, broker addr after, storage addr after)
    let cases: Vec<(&str, Vec<&str>, bool, &str, &str)> = vec![
        // Rule 1 + rule 3: storage Redis configures the broker and upgrades the cache.
        (
            "storage: {redis: {addr: 'localhost:6379', password: pw, db: 2}, hybrid: {cache_type: memory}}",
            vec![AUTO_BROKER, AUTO_CACHE],
            true,
            "localhost:6379",
            "localhost:6379",
        ),
        // Rule 1 with an explicit memory broker.
        (
            "storage: {redis: {addr: 'r:6379'}}\nmessage_broker: {type: memory}",
            vec![AUTO_BROKER, AUTO_CACHE],
            true,
            "r:6379",
            "r:6379",
        ),
        // Rule 2 + rule 3: broker Redis configures storage.
        (
            "message_broker: {type: redis, redis: {addr: 'mq:6379', password: x, db: 1}}\nstorage: {type: hybrid}",
            vec![AUTO_STORAGE, AUTO_CACHE],
            true,
            "mq:6379",
            "mq:6379",
        ),
        // Explicit cache_type redis: no upgrade line (rule 1 still configures the broker).
        (
            "storage: {redis: {addr: 'r:6379'}, hybrid: {cache_type: redis}}",
            vec![AUTO_BROKER],
            true,
            "r:6379",
            "r:6379",
        ),
        // Both configured explicitly: nothing fires.
        (
            "storage: {type: redis, redis: {addr: 'a:1'}}\nmessage_broker: {type: redis, redis: {addr: 'b:2'}}",
            vec![],
            true,
            "b:2",
            "a:1",
        ),
        // Sentinels count as Redis: rules 1 and 3 fire, the broker shares them (no address).
        (
            "storage: {redis: {sentinel: {master_name: m1, addrs: ['s1:26379', 's2:26379']}}}",
            vec![AUTO_BROKER, AUTO_CACHE],
            true,
            "",
            "",
        ),
        // A broker address does not become the storage's when sentinels name the master.
        (
            "storage: {redis: {sentinel: {master_name: m1, addrs: ['s1:26379']}}}\nmessage_broker: {type: redis, redis: {addr: 'mq:6379'}}",
            vec![AUTO_CACHE],
            true,
            "mq:6379",
            "",
        ),
        // No Redis anywhere: single node.
        (
            "storage: {hybrid: {cache_type: memory}}",
            vec![],
            false,
            "",
            "",
        ),
        // Rule 3 only applies to hybrid storage: type redis uses Redis without the upgrade line.
        (
            "storage: {type: redis, redis: {addr: 'a:1'}}\nmessage_broker: {type: redis, redis: {addr: 'a:1'}}",
            vec![],
            true,
            "a:1",
            "a:1",
        ),
    ];
    for (yaml, rules, redis, broker, storage) in cases {
        let s = settings(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        assert_eq!(s.auto_shared, rules, "{yaml}");
        assert_eq!(s.uses_redis, redis, "{yaml}");
        assert_eq!(s.config.message_broker.redis.addr, broker, "{yaml}");
        assert_eq!(s.config.storage.redis.addr, storage, "{yaml}");
    }
}

#[test]
fn rules_copy_password_and_db() {
    let s = settings("storage: {redis: {addr: 'r:1', password: secret, db: 3}}").unwrap();
    assert_eq!(s.config.message_broker.redis.password, "secret");
    assert_eq!(s.config.message_broker.redis.db, 3);
    let s = settings("message_broker: {type: redis, redis: {addr: 'm:1', password: 42, db: 4}}")
        .unwrap();
    assert_eq!(s.config.storage.redis.password, "42");
    assert_eq!(s.config.storage.redis.db, 4);
}

#[test]
fn errors_name_the_field() {
    // (yaml, env, expected substrings)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "proxy: {limits: {max_header_bytes: 1024}}",
            vec![],
            vec!["proxy.limits.max_header_bytes", "at least 8192", "1024"],
        ),
        (
            "proxy: {registry: {ttl: 5s, heartbeat_interval: 5s}}",
            vec![],
            vec!["proxy.registry.ttl", "heartbeat_interval"],
        ),
        (
            "proxy: {timeouts: {connect: 0s}}",
            vec![],
            vec!["proxy.timeouts.connect", "greater than 0"],
        ),
        (
            "proxy: {timeouts: {websocket_idle: 0s}}",
            vec![],
            vec!["proxy.timeouts.websocket_idle", "greater than 0"],
        ),
        (
            "proxy: {timeouts: {client_write_idle: 0ms}}",
            vec![],
            vec!["proxy.timeouts.client_write_idle", "greater than 0"],
        ),
        (
            "proxy: {limits: {max_hops: 0}}",
            vec![],
            vec!["proxy.limits.max_hops", "1 to 64", "0"],
        ),
        (
            "proxy: {limits: {max_hops: 65}}",
            vec![],
            vec!["proxy.limits.max_hops", "65"],
        ),
        (
            "proxy: {limits: {max_connections: 0}}",
            vec![],
            vec!["proxy.limits.max_connections", "at least 1"],
        ),
        (
            "proxy: {limits: {mapping_rate: -1}}",
            vec![],
            vec!["proxy.limits.mapping_rate", "got -1"],
        ),
        (
            "proxy: {limits: {mapping_rate: .nan}}",
            vec![],
            vec!["proxy.limits.mapping_rate", "NaN"],
        ),
        (
            "proxy: {limits: {mapping_burst: 0}}",
            vec![],
            vec!["proxy.limits.mapping_burst", "at least 1"],
        ),
        (
            "proxy: {listen: 'nowhere'}",
            vec![],
            vec!["proxy.listen", "nowhere"],
        ),
        (
            "",
            vec![("TUNNOX__PROXY__WORKER_THREADS", "4096")],
            vec!["proxy.worker_threads", "4096"],
        ),
        (
            "storage: {hybrid: {cache_type: redis}}",
            vec![],
            vec![
                "storage.redis.addr",
                "redis cache enabled",
                "not configured",
            ],
        ),
        (
            "storage: {type: redis}",
            vec![],
            vec!["storage.redis.addr", "required"],
        ),
        (
            "message_broker: {type: redis}",
            vec![],
            vec!["message_broker.redis.addr", "required"],
        ),
        (
            "http_domain:\n  cache:\n    local:\n      ttl: 6o s\n",
            vec![],
            vec![
                "test.yaml:4:",
                "http_domain.cache.local.ttl",
                "invalid duration \"6o s\"",
            ],
        ),
        (
            "storage:\n  redis:\n    adr: x\n",
            vec![],
            vec!["test.yaml:3:", "storage.redis", "unknown field `adr`"],
        ),
        (
            "proxy:\n  listen: nowhere\n",
            vec![],
            vec![
                "test.yaml:2:",
                "proxy.listen",
                "not an IP address with a port",
            ],
        ),
        (
            "storage: {type: disk}",
            vec![],
            vec!["storage.type", "unknown variant `disk`"],
        ),
        (
            "http_domain: {base_domains: [tunnox.net, 'bad_domain.net']}",
            vec![],
            vec!["http_domain.base_domains[1]", "bad_domain.net"],
        ),
        (
            "proxy: {set: novel}",
            vec![],
            vec!["proxy.set", "<business>.<region>"],
        ),
        (
            "storage: {redis: {addr: 'http://x:1'}}",
            vec![],
            vec!["storage.redis.addr", "rediss://"],
        ),
        (
            "storage: {redis: {sentinel: {addrs: ['s:26379']}}}",
            vec![],
            vec!["storage.redis.sentinel.master_name", "required"],
        ),
        (
            "storage: {redis: {sentinel: {master_name: m1}}}",
            vec![],
            vec!["storage.redis.sentinel.addrs", "at least one sentinel"],
        ),
        (
            "storage: {redis: {sentinel: {master_name: 'my master', addrs: ['s:1']}}}",
            vec![],
            vec!["storage.redis.sentinel.master_name", "my master", "spaces"],
        ),
        (
            "storage: {redis: {sentinel: {master_name: m1, addrs: ['s:1', 'http://s:2']}}}",
            vec![],
            vec!["storage.redis.sentinel.addrs[1]", "http://s:2"],
        ),
        (
            "storage: {redis: {sentinel: {master_name: m1, addrs: ['s:1', 'redis://s:99999']}}}",
            vec![],
            vec!["storage.redis.sentinel.addrs[1]", "s:99999"],
        ),
        (
            "storage: {redis: {sentinel: {master_name: m1, addrs: ['redis://:pw@s:1']}}}",
            vec![],
            vec![
                "storage.redis.sentinel.addrs[0]",
                "storage.redis.sentinel.password",
            ],
        ),
        (
            "storage: {redis: {sentinel: {master_name: m1, addrs: ['rediss://s:1', 's:2']}}}",
            vec![],
            vec![
                "storage.redis.sentinel.addrs[1]",
                "rediss:// for every sentinel",
            ],
        ),
        (
            "storage: {redis: {addr: 'r:1', sentinel: {master_name: m1, addrs: ['s:1']}}}",
            vec![],
            vec!["storage.redis.addr", "together with storage.redis.sentinel"],
        ),
        (
            "storage: {type: memory, redis: {sentinel: {master_name: m1, addrs: ['s:1']}}}",
            vec![],
            vec!["storage.redis.sentinel", "storage.type is memory"],
        ),
        (
            "storage: {redis: {addr: 'r:1', wait_replicas: 1, wait_timeout: 2s}}",
            vec![],
            vec![
                "storage.redis.wait_timeout",
                "shorter than storage.redis.response_timeout",
            ],
        ),
        (
            "storage: {redis: {addr: 'r:1', wait_replicas: 1, wait_timeout: 0s}}",
            vec![],
            vec!["storage.redis.wait_timeout", "greater than 0"],
        ),
        (
            "storage: {redis: {addr: 'r:1', wait_replicas: -1}}",
            vec![],
            vec!["storage.redis.wait_replicas"],
        ),
        (
            "storage: {redis: {addr: 'r:1', pool_size: 0}}",
            vec![],
            vec!["storage.redis.pool_size", "at least 1"],
        ),
        (
            "http_domain: {cache: {local: {max_size: 0}}}",
            vec![],
            vec!["http_domain.cache.local.max_size"],
        ),
        (
            "storage: {type: memory, redis: {addr: 'r:1'}}",
            vec![],
            vec!["storage.redis.addr", "storage.type is memory"],
        ),
        (
            "storage: {redis: {password: '${NOPE}'}}",
            vec![],
            vec!["storage.redis.password", "NOPE is not set"],
        ),
        (
            "mappings:\n  - {subdomain: a, base_domain: other.org, target_host: h, target_port: 1}\n",
            vec![],
            vec!["mappings[0].base_domain", "other.org"],
        ),
        (
            "mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 0}\n",
            vec![],
            vec!["mappings[0]", "target_port"],
        ),
        (
            "mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1}\n  - {subdomain: A, base_domain: tunnox.net, target_host: h, target_port: 2}\n",
            vec![],
            vec!["mappings[1].subdomain", "already declared by mappings[0]"],
        ),
        (
            "storage:\n  redis: [1, 2\n",
            vec![],
            vec!["test.yaml:", "invalid YAML"],
        ),
        (
            "",
            vec![("TUNNOX__HTTP_DOMAIN__CACHE__LOCAL__TTL", "soon")],
            vec!["http_domain.cache.local.ttl", "invalid duration \"soon\""],
        ),
        (
            "",
            vec![("TUNNOX__STORAGE__TYPO", "1")],
            vec!["unknown field `typo`"],
        ),
        (
            "storage: {redis: {addr: 'r:1'}}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: h, target_port: 1}\n",
            vec![],
            vec!["mappings", "single-node"],
        ),
        (
            "egress: {allow: ['10.0.0.0/8', '10.0.0.0/33']}",
            vec![],
            vec!["egress.allow[1]", "10.0.0.0/33"],
        ),
        (
            "egress: {deny: ['x.com:0']}",
            vec![],
            vec!["egress.deny[0]", "port"],
        ),
        (
            "egress: {cluster_domain: 'a b'}",
            vec![],
            vec!["egress.cluster_domain", "a b"],
        ),
        (
            "proxy: {admin_listen: '127.0.0.1:9090'}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 9090}\n",
            vec![],
            vec!["mappings[0].target_host", "own listeners"],
        ),
        (
            "mappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 169.254.169.254, target_port: 80}\n",
            vec![],
            vec!["mappings[0].target_host", "link-local"],
        ),
        (
            "controller: {cluster_id: 'prod/eu'}",
            vec![],
            vec!["controller.cluster_id", "\"prod/eu\"", "1-63"],
        ),
        (
            "",
            vec![("TUNNOX__CONTROLLER__CLUSTER_ID", "{tunnox}")],
            vec!["controller.cluster_id", "{tunnox}"],
        ),
        (
            "controller: {cluster_id: '-a'}",
            vec![],
            vec!["controller.cluster_id"],
        ),
        (
            "controller: {acme: {directory_url: 'http://acme.example/dir'}}",
            vec![],
            vec!["controller.acme.directory_url", "acme.example", "https://"],
        ),
        (
            "controller: {acme: {directory_url: 'https://acme.example/dir', email: 'a b@c'}}",
            vec![],
            vec!["controller.acme.email", "a b@c"],
        ),
        (
            "controller: {acme: {directory_url: 'https://acme.example/dir', account_secret: 'Acme_1'}}",
            vec![],
            vec!["controller.acme.account_secret", "Acme_1"],
        ),
        (
            "controller: {acme: {directory_url: 'https://acme.example/dir', order_timeout: 0s}}",
            vec![],
            vec!["controller.acme.order_timeout", "between 1s and 24h"],
        ),
        (
            "controller: {acme: {directory_url: 'https://acme.example/dir', state_dir: /x}}",
            vec![],
            vec!["controller.acme.state_dir", "proxy.acme only"],
        ),
        (
            "proxy: {acme: {directory_url: 'https://acme.example/dir', namespace: x}}",
            vec![],
            vec!["proxy.acme.namespace", "controller.acme only"],
        ),
        (
            "proxy: {acme: {directory_url: 'https://acme.example/dir', check_interval: 0s}}",
            vec![],
            vec!["proxy.acme.check_interval", "between 1s and 24h"],
        ),
        (
            "proxy: {acme: {directory_url: 'ftp://acme.example/dir'}}",
            vec![],
            vec!["proxy.acme.directory_url", "ftp://"],
        ),
        (
            "storage: {type: redis, redis: {addr: '127.0.0.1:6379'}}\nproxy: {acme: {directory_url: 'https://acme.example/dir'}}",
            vec![],
            vec!["proxy.acme", "single-node", "controller.acme"],
        ),
        (
            "proxy: {tls_listen: '127.0.0.1:8443'}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 80, tls: {acme: true}}\n",
            vec![],
            vec!["mappings[0].tls.acme", "proxy.acme.directory_url"],
        ),
        (
            "proxy: {tls_listen: '127.0.0.1:8443', acme: {directory_url: 'https://acme.example/dir'}}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 80, tls: {acme: true, cert_file: /a, key_file: /b}}\n",
            vec![],
            vec!["mappings[0].tls.acme", "not both"],
        ),
        (
            "proxy: {tls_listen: '127.0.0.1:8443'}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 80, tls: {cert_file: /a}}\n",
            vec![],
            vec!["mappings[0].tls.key_file", "missing"],
        ),
        (
            "proxy: {tls_listen: '127.0.0.1:8443'}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 80, tls: {redirect_http: true}}\n",
            vec![],
            vec!["mappings[0].tls.cert_file", "acme: true"],
        ),
    ];
    for (yaml, vars, wants) in cases {
        let e = settings_env(yaml, &vars)
            .err()
            .unwrap_or_else(|| panic!("{yaml:?} should fail"))
            .to_string();
        for want in wants {
            assert!(
                e.contains(want),
                "error for {yaml:?}: {e:?} should contain {want:?}"
            );
        }
    }
}

#[test]
fn a_well_formed_acme_section_is_taken() {
    let s = settings_env(
        "controller: {acme: {directory_url: 'http://127.0.0.1:14000/dir', email: ops@example.com, retry_max: 10m}}",
        &[],
    )
    .unwrap();
    let acme = s.config.controller.acme.unwrap();
    assert_eq!(acme.directory_url, "http://127.0.0.1:14000/dir");
    assert_eq!(acme.email.as_deref(), Some("ops@example.com"));
    assert_eq!(acme.retry_max.get(), std::time::Duration::from_secs(600));
    assert_eq!(acme.account_secret, "tunnox-acme-account");
}

#[test]
fn a_single_node_acme_mapping_is_served_from_its_files_in_the_state_dir() {
    let s = settings_env(
        "proxy: {tls_listen: '127.0.0.1:8443', acme: {directory_url: 'https://acme.example/dir'}}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 80, tls: {acme: true}}\n",
        &[],
    )
    .unwrap();
    let acme = s.config.proxy.acme.as_ref().unwrap();
    assert_eq!(acme.state_dir(), std::path::Path::new("data/acme"));
    assert_eq!(acme.check_interval(), std::time::Duration::from_secs(60));
    let spec = crate::proxy::seed::spec_of(&s.config.mappings[0], &[], Some(&acme.state_dir()));
    assert_eq!(
        spec.tls.unwrap().cert,
        crate::domain::CertSource::Files {
            cert_file: "data/acme/a.tunnox.net.crt".into(),
            key_file: "data/acme/a.tunnox.net.key".into(),
        }
    );
}

#[test]
fn env_overrides_and_expansion() {
    let yaml = "storage:\n  redis:\n    addr: '${REDIS_HOST}:${REDIS_PORT:-6379}'\n    password: ${REDIS_PASSWORD}\n    db: ${REDIS_DB}\nhttp_domain:\n  cache:\n    local:\n      ttl: 60s\n";
    let s = settings_env(
        yaml,
        &[
            ("REDIS_HOST", "redis.internal"),
            ("REDIS_PASSWORD", "12345"),
            ("REDIS_DB", "3"),
            ("TUNNOX__HTTP_DOMAIN__CACHE__LOCAL__TTL", "5m"),
            ("TUNNOX__HTTP_DOMAIN__CACHE__LOCAL__MAX_SIZE", "500000"),
            ("TUNNOX__PROXY__SET", "novel.sh"),
            ("TUNNOX_CONFIG", "ignored: a flag, not an override"),
        ],
    )
    .unwrap();
    let c = &s.config;
    assert_eq!(c.storage.redis.addr, "redis.internal:6379");
    assert_eq!(c.storage.redis.password, "12345");
    assert_eq!(c.storage.redis.db, 3);
    assert_eq!(c.http_domain.cache.local.ttl, Dur::secs(300));
    assert_eq!(c.http_domain.cache.local.max_size, 500_000);
    assert_eq!(c.proxy.set.to_string(), "novel.sh");
    assert!(s.uses_redis);
}

#[test]
fn environment_text_is_kept_exactly_for_text_fields() {
    let s = settings_env(
        "storage: {redis: {addr: 'r:1', password: '${PW}'}}",
        &[
            ("PW", "0x1F"),
            ("TUNNOX__STORAGE__REDIS__KEY_PREFIX", "{tunnox}"),
            ("TUNNOX__MESSAGE_BROKER__REDIS__CHANNEL", "ab #1"),
            ("TUNNOX__PROXY__NODE_ID", "007"),
            ("TUNNOX__HTTP_DOMAIN__BASE_DOMAINS", "[a.io, b.io]"),
            ("TUNNOX__STORAGE__REDIS__DB", "2"),
        ],
    )
    .unwrap();
    let c = &s.config;
    assert_eq!(c.storage.redis.password, "0x1F");
    assert_eq!(c.storage.redis.key_prefix, "{tunnox}");
    assert_eq!(c.message_broker.redis.channel, "ab #1");
    assert_eq!(c.proxy.node_id.as_deref(), Some("007"));
    assert_eq!(c.http_domain.base_domains.len(), 2);
    assert_eq!(c.storage.redis.db, 2);
}

#[test]
fn seed_000_and_001_documents_parse() {
    let seed = r#"
storage:
  type: hybrid
  redis: {addr: "redis.example.com:6379", password: "p", db: 0, pool_size: 50}
  hybrid:
    cache_type: memory
    enable_persistent: true
    json: {file_path: "data/tunnox-data.json", auto_save: true, save_interval: 30}
message_broker:
  type: redis
  redis: {addr: "redis.example.com:6379", password: "p", channel: "tunnox:messages"}
http_domain:
  enabled: true
  base_domains: [tunnox.net, tunnel.example.com]
  cache:
    local: {enabled: true, ttl: 60s, max_size: 10000}
    shared: {enabled: true, ttl: 300s}
  persistence: {key_prefix: "tunnox:http_domain"}
  sync: {channel: "tunnox:http_domain:events", buffer_size: 1000}
  lock: {ttl: 10s, retry_count: 3, retry_interval: 100ms}
"#;
    let s = settings(seed).unwrap();
    assert_eq!(s.auto_shared, vec![AUTO_CACHE]);
    assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
    match s.store_backend("n1") {
        crate::store::StoreBackend::Redis(o) => {
            assert_eq!(o.prefix, "tunnox:http_domain");
            assert_eq!(
                o.root_prefix, "tunnox",
                "the node registry lives under storage.redis.key_prefix"
            );
            assert_eq!(o.pool_size, 50);
            assert_eq!(
                o.events_channel.as_deref(),
                Some("tunnox:http_domain:events")
            );
        }
        other => panic!("expected redis, got {other:?}"),
    }
}

#[test]
fn file_mappings_may_reach_loopback_but_not_the_proxy() {
    let s = settings(
        "egress: {allow: ['*.trusted.example'], deny: ['10.96.0.0/12']}\nmappings:\n  - {subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 3000}\n",
    )
    .unwrap();
    assert_eq!(s.egress.allow().len(), 1);
    assert_eq!(s.egress.deny()[0].to_string(), "10.96.0.0/12");
}

#[test]
fn memory_backend_carries_persistence() {
    let s =
        settings("storage: {hybrid: {json: {file_path: /tmp/x.json, save_interval: 0}}}").unwrap();
    match s.store_backend("n") {
        crate::store::StoreBackend::Memory {
            persist: Some(p), ..
        } => {
            assert_eq!(p.path, std::path::PathBuf::from("/tmp/x.json"));
            assert!(p.save_interval.is_zero());
        }
        other => panic!("{other:?}"),
    }
    let s = settings("storage: {hybrid: {enable_persistent: false}}").unwrap();
    assert!(matches!(
        s.store_backend("n"),
        crate::store::StoreBackend::Memory { persist: None, .. }
    ));
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn fragment() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "storage:",
            "redis:",
            "addr:",
            "type:",
            "hybrid:",
            "cache_type:",
            "http_domain:",
            "cache:",
            "local:",
            "ttl:",
            "max_size:",
            "base_domains:",
            "mappings:",
            "- ",
            "{",
            "}",
            "[",
            "]",
            ",",
            "'",
            "\"",
            "${X}",
            "${",
            "60s",
            "-1",
            "99999999999999999999",
            "memory",
            "redis",
            "\n",
            "\n  ",
            "\n    ",
            ": ",
            "&a",
            "*a",
            "!!binary",
            "~",
            "null",
            "true",
            "é",
            "\t",
        ])
        .prop_map(str::to_string)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Configuration text never panics the loader: it is accepted or named as an error.
        #[test]
        fn arbitrary_config_text_never_panics(parts in prop::collection::vec(fragment(), 0..40), noise in ".{0,40}") {
            let text = parts.concat() + &noise;
            let env = env(&[("X", "1")]);
            if let Ok(cfg) = parse(&text, "fuzz.yaml", &env) {
                let _ = resolve(cfg, "fuzz.yaml");
            }
        }
    }
}

#[test]
fn egress_allow_comes_from_the_environment_as_a_list() {
    let s = settings_env("", &[("TUNNOX__EGRESS__ALLOW", "[\"127.0.0.0/8\"]")]).unwrap();
    assert_eq!(s.config.egress.allow, vec!["127.0.0.0/8".to_string()]);
    assert_eq!(s.egress.allow().len(), 1);
}

#[test]
fn sentinel_reaches_the_store_options() {
    let s = settings_env(
        "storage:\n  redis:\n    password: master-pw\n    wait_replicas: 1\n    wait_timeout: 250ms\n    sentinel: {master_name: m1, addrs: ['10.0.0.1:26379', 'redis://s2:26380'], password: '${SENTINEL_PW}', tls: true}\n",
        &[("SENTINEL_PW", "s-pw")],
    )
    .unwrap();
    assert!(s.uses_redis);
    match s.store_backend("n") {
        crate::store::StoreBackend::Redis(o) => {
            let sentinel = o.sentinel.expect("sentinel options");
            assert_eq!(sentinel.master_name, "m1");
            assert_eq!(sentinel.addrs, ["10.0.0.1:26379", "redis://s2:26380"]);
            assert_eq!(sentinel.password.as_deref(), Some("s-pw"));
            assert!(sentinel.tls);
            assert_eq!(o.password.as_deref(), Some("master-pw"));
            assert_eq!(o.wait_replicas, 1);
            assert_eq!(o.wait_timeout, std::time::Duration::from_millis(250));
        }
        other => panic!("expected redis, got {other:?}"),
    }
    // Without sentinels nothing waits and no sentinel is asked.
    match settings("storage: {redis: {addr: 'r:1'}}")
        .unwrap()
        .store_backend("n")
    {
        crate::store::StoreBackend::Redis(o) => {
            assert!(o.sentinel.is_none());
            assert_eq!(o.wait_replicas, 0);
        }
        other => panic!("expected redis, got {other:?}"),
    }
    // The whole section from the environment, as the chart can set it.
    let s = settings_env(
        "",
        &[
            ("TUNNOX__STORAGE__REDIS__SENTINEL__MASTER_NAME", "mymaster"),
            (
                "TUNNOX__STORAGE__REDIS__SENTINEL__ADDRS",
                "[a:26379, b:26379]",
            ),
        ],
    )
    .unwrap();
    assert!(s.uses_redis);
    assert_eq!(s.config.storage.redis.sentinel.addrs.len(), 2);
}

#[test]
fn a_group_mapping_with_acme_is_ordered_for() {
    let s = settings_env(
        "tunnel_clients:\n  - {client_id: a, token: a-secret-0123456789, groups: [site]}\nproxy: {tls_listen: '127.0.0.1:8443', tunnel: {listen: '127.0.0.1:7000', insecure: true}, acme: {directory_url: 'https://acme.example/dir'}}\nmappings:\n  - {subdomain: g, base_domain: tunnox.net, target_group: site, target_host: 127.0.0.1, target_port: 80, tls: {acme: true}}\n  - {subdomain: f, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: 80}\n",
        &[],
    )
    .unwrap();
    let domains = crate::proxy::seed::acme_domains(&s.config.mappings, &s.config.tunnel_clients);
    let names: Vec<&str> = domains.iter().map(|d| d.as_str()).collect();
    assert_eq!(names, ["g.tunnox.net"]);
}
