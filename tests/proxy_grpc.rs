//! gRPC through the proxy (issue 17, `target_protocol`): a real gRPC server (tonic's health
//! service) behind a single-node proxy, once on its plain port (`h2c`) and once over TLS
//! (`h2`, verified with a CA file, or with verification off), called by a real gRPC client over
//! the proxy's plain listener (HTTP/2 with prior knowledge) and over its HTTPS listener. Unary
//! and server-streaming calls succeed, a gRPC error status arrives intact (it travels in the
//! trailers), and a TLS target the public roots do not trust is refused.

mod support;

use std::time::Duration;

use support::process::free_port;
use support::proxy::ProxyProc;
use support::tunnel::Pki;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Wire;
use tonic_health::pb::health_client::HealthClient;

struct Grpc {
    reporter: tonic_health::server::HealthReporter,
    plain: u16,
    tls: u16,
}

/// The health service on a plain port and on a TLS port (certificate for localhost and
/// 127.0.0.1 from `pki`); "" serving, "slow" not serving.
async fn grpc_server(pki: &Pki) -> Grpc {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("slow", ServingStatus::NotServing)
        .await;
    let (plain, tls) = (free_port(), free_port());
    let svc = service.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve(([127, 0, 0, 1], plain).into())
            .await
            .unwrap();
    });
    let identity = Identity::from_pem(
        std::fs::read(&pki.cert).unwrap(),
        std::fs::read(&pki.key).unwrap(),
    );
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(service)
            .serve(([127, 0, 0, 1], tls).into())
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    Grpc {
        reporter,
        plain,
        tls,
    }
}

/// A client of the proxy at `port` asking for `host` (the request's `:authority`).
async fn client(port: u16, host: &str, tls_ca: Option<&std::path::Path>) -> HealthClient<Channel> {
    let scheme = if tls_ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://127.0.0.1:{port}"))
        .unwrap()
        .origin(format!("{scheme}://{host}").parse().unwrap())
        .timeout(Duration::from_secs(10));
    if let Some(ca) = tls_ca {
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
                    .domain_name(host),
            )
            .unwrap();
    }
    HealthClient::new(endpoint.connect().await.expect("connect to the proxy"))
}

async fn check(c: &mut HealthClient<Channel>, service: &str) -> Result<i32, tonic::Status> {
    c.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass_over_h2c_and_h2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "grpc");
    let wild = pki.issue(dir.path(), "wild", "wildcard", "DNS:*.tunnox.net");
    let grpc = grpc_server(&pki).await;
    let https = free_port();
    let p = |f: &std::path::PathBuf| f.display().to_string();
    let yaml = format!(
        "storage: {{type: memory}}
http_domain: {{base_domains: [tunnox.net]}}
mappings:
  - {{subdomain: plain, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {plain}, target_protocol: h2c}}
  - {{subdomain: secure, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {tls}, target_protocol: h2, target_tls: {{ca_file: \"{ca}\"}}}}
  - {{subdomain: insecure, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {tls}, target_protocol: h2, target_tls: {{insecure_skip_verify: true}}}}
  - {{subdomain: untrusted, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {tls}, target_protocol: h2}}
  - {{subdomain: http1, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {plain}}}",
        plain = grpc.plain,
        tls = grpc.tls,
        ca = p(&pki.ca),
    );
    let extra = format!(
        "tls_listen: \"127.0.0.1:{https}\", tls: {{certificates: [{{cert_file: \"{}\", key_file: \"{}\"}}]}}",
        p(&wild.0),
        p(&wild.1)
    );
    let proxy = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || ProxyProc::start(&dir, "p", &yaml, &extra).ready()
    })
    .await
    .unwrap();

    // Over the plain listener (HTTP/2 with prior knowledge), to each way of reaching the
    // server; and over the HTTPS listener to the TLS target.
    let cases: [(&str, Option<&std::path::Path>); 4] = [
        ("plain.tunnox.net", None),
        ("secure.tunnox.net", None),
        ("insecure.tunnox.net", None),
        ("secure.tunnox.net", Some(pki.ca.as_path())),
    ];
    for (host, tls) in cases {
        let port = if tls.is_some() { https } else { proxy.port };
        let mut c = client(port, host, tls).await;
        let via = format!("{host} (client TLS: {})", tls.is_some());
        // Unary, and an error status carried in the trailers.
        assert_eq!(
            check(&mut c, "").await.unwrap(),
            Wire::Serving as i32,
            "{via}"
        );
        assert_eq!(
            check(&mut c, "slow").await.unwrap(),
            Wire::NotServing as i32,
            "{via}"
        );
        let missing = check(&mut c, "nope").await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound, "{via}: {missing:?}");
        // Server streaming: the current status, then each change as it happens.
        let mut watch = c
            .watch(HealthCheckRequest {
                service: "slow".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{via}: watch: {e:?}"))
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, Wire::NotServing as i32, "{via}");
        grpc.reporter
            .set_service_status("slow", ServingStatus::Serving)
            .await;
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("the change streams through")
            .unwrap()
            .unwrap();
        assert_eq!(next.status, Wire::Serving as i32, "{via}");
        grpc.reporter
            .set_service_status("slow", ServingStatus::NotServing)
            .await;
        drop(watch);
        eprintln!("gRPC through {via}: unary, error status, streaming ok");
    }

    // Verification is on by default: a certificate the public roots do not know is refused.
    let mut c = client(proxy.port, "untrusted.tunnox.net", None).await;
    let refused = check(&mut c, "").await.unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Ok);
    assert!(
        proxy.log().contains("UnknownIssuer") || proxy.log().contains("invalid peer certificate"),
        "the proxy says why: {}",
        proxy.log()
    );
    // A WebSocket upgrade cannot ride HTTP/2 to the target: refused, not half done.
    let port = proxy.port;
    let upgrade = tokio::task::spawn_blocking(move || {
        support::http::raw(
            port,
            b"GET / HTTP/1.1\r\nHost: plain.tunnox.net\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap()
    .expect("an answer");
    assert_eq!(upgrade.status, 502);
    // HTTP/1.1 to a gRPC server cannot work: the default protocol is refused by it, not
    // silently passed.
    let mut c = client(proxy.port, "http1.tunnox.net", None).await;
    assert!(check(&mut c, "").await.is_err());
}
