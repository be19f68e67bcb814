//! The HTTPS listener (single-node, `proxy.tls_listen`), with real TLS clients (curl, openssl
//! s_client, rustls): each mapping gets its own certificate by SNI, an operator wildcard covers
//! names without one, a name nobody declared gets no certificate at all, ALPN negotiates HTTP/2,
//! plain requests are redirected with 308, a request for another host on a connection is
//! refused with 421, and a certificate file replaced while the proxy runs is used by new
//! handshakes within seconds while a connection opened before keeps working.

mod support;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use support::http::{TlsConnection, Upstream};
use support::process::{eventually, free_port};
use support::proxy::ProxyProc;
use support::tunnel::Pki;

struct Site {
    dir: tempfile::TempDir,
    pki: Pki,
    proxy: ProxyProc,
    https: u16,
    /// a.tunnox.net's certificate and key files.
    a: (std::path::PathBuf, std::path::PathBuf),
}

fn start() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "https");
    let up = Upstream::start("web");
    let a = pki.issue(dir.path(), "a", "a.tunnox.net", "DNS:a.tunnox.net");
    let b = pki.issue(dir.path(), "b", "b.tunnox.net", "DNS:b.tunnox.net");
    let wild = pki.issue(dir.path(), "wild", "wildcard", "DNS:*.tunnox.net");
    let https = free_port();
    let p = |f: &std::path::PathBuf| f.display().to_string();
    let yaml = format!(
        "storage: {{type: memory}}
http_domain: {{base_domains: [tunnox.net]}}
mappings:
  - {{subdomain: a, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {port}, tls: {{cert_file: \"{ac}\", key_file: \"{ak}\"}}}}
  - {{subdomain: b, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {port}, tls: {{cert_file: \"{bc}\", key_file: \"{bk}\", redirect_http: true}}}}
  - {{subdomain: c, base_domain: tunnox.net, target_host: 127.0.0.1, target_port: {port}}}",
        port = up.port,
        ac = p(&a.0),
        ak = p(&a.1),
        bc = p(&b.0),
        bk = p(&b.1),
    );
    let extra = format!(
        "tls_listen: \"127.0.0.1:{https}\", tls: {{redirect_port: {https}, reload_interval: 500ms, certificates: [{{cert_file: \"{}\", key_file: \"{}\"}}]}}",
        p(&wild.0),
        p(&wild.1)
    );
    let proxy = ProxyProc::start(dir.path(), "p", &yaml, &extra).ready();
    std::mem::forget(up);
    Site {
        dir,
        pki,
        proxy,
        https,
        a,
    }
}

/// The subject of the certificate served for `sni` (`None`: no SNI), empty when the handshake
/// failed.
fn served_subject(port: u16, sni: Option<&str>) -> String {
    let mut args = vec![
        "s_client".to_string(),
        "-connect".into(),
        format!("127.0.0.1:{port}"),
    ];
    match sni {
        Some(n) => args.extend(["-servername".to_string(), n.to_string()]),
        None => args.push("-noservername".into()),
    }
    let out = Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let pem = String::from_utf8_lossy(&out.stdout).into_owned();
    if !pem.contains("BEGIN CERTIFICATE") {
        return String::new();
    }
    let mut x = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    x.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
    let out = x.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// curl against the HTTPS listener with the test CA: (exit code, http version, status, body).
fn curl(s: &Site, host: &str, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            s.pki.ca.to_str().unwrap(),
            "--resolve",
            &format!("{host}:{}:127.0.0.1", s.https),
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(extra)
        .arg(format!("https://{host}:{}/headers", s.https))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        out.status.code().unwrap_or(-1),
        tail.to_string(),
        body.to_string(),
    )
}

#[test]
fn each_name_gets_its_own_certificate_and_unknown_names_none() {
    let s = start();
    let cases = [
        // A mapping's own certificate, not the wildcard that also covers it.
        (Some("a.tunnox.net"), "CN=a.tunnox.net"),
        (Some("b.tunnox.net"), "CN=b.tunnox.net"),
        // No certificate of its own: the operator's wildcard.
        (Some("c.tunnox.net"), "CN=wildcard"),
        (Some("nobody.tunnox.net"), "CN=wildcard"),
        // Nothing declared for these, and no default: no certificate at all.
        (Some("evil.example"), ""),
        (Some("x.y.tunnox.net"), ""),
        (None, ""),
    ];
    for (sni, want) in cases {
        let got = served_subject(s.https, sni);
        assert!(
            got.contains(want) && (want.is_empty() == got.is_empty()),
            "{sni:?}: served {got:?}, want {want:?}\n{}",
            s.proxy.log()
        );
    }
    let metrics = s.proxy.admin_get("/metrics").unwrap().body;
    assert!(
        metrics.contains("tunnox_proxy_tls_handshakes_total{outcome=\"no_certificate\"} 3"),
        "{metrics}"
    );
}

#[test]
fn https_requests_negotiate_http2_redirect_plain_ones_and_refuse_other_hosts() {
    let s = start();
    // ALPN: h2 when offered, HTTP/1.1 otherwise; the upstream is told the client used HTTPS.
    let (code, tail, body) = curl(&s, "a.tunnox.net", &["--http2"]);
    assert_eq!((code, tail.as_str()), (0, "2 200"), "{body}");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    let (code, tail, _) = curl(&s, "a.tunnox.net", &["--http1.1"]);
    assert_eq!((code, tail.as_str()), (0, "1.1 200"));
    // A connection for a.tunnox.net asked for c.tunnox.net: 421, not c's content.
    let (code, tail, _) = curl(&s, "a.tunnox.net", &["-H", "Host: c.tunnox.net"]);
    assert_eq!((code, tail.as_str()), (0, "2 421"));

    // Plain HTTP: b redirects (on the fast path and without it), a does not.
    let get = |host: &str| support::http::get(s.proxy.port, host, "/x?y=1").unwrap();
    let r = get("b.tunnox.net");
    assert_eq!(r.status, 308);
    let location = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("location"))
        .map(|(_, v)| v.clone());
    assert_eq!(
        location.as_deref(),
        Some(format!("https://b.tunnox.net:{}/x?y=1", s.https).as_str())
    );
    assert_eq!(get("a.tunnox.net").status, 200);
}

#[test]
fn a_replaced_certificate_serves_new_handshakes_and_open_connections_keep_theirs() {
    let s = start();
    let mut kept = TlsConnection::open(s.https, "a.tunnox.net", &s.pki.ca).unwrap();
    assert_eq!(kept.get("a.tunnox.net").unwrap(), 200);
    assert!(served_subject(s.https, Some("a.tunnox.net")).contains("CN=a.tunnox.net"));
    // Replaced in place, as cert-manager or an operator would.
    let (cert, key) = s
        .pki
        .issue(s.dir.path(), "a2", "a.tunnox.net v2", "DNS:a.tunnox.net");
    std::fs::copy(&key, &s.a.1).unwrap();
    std::fs::copy(&cert, &s.a.0).unwrap();
    let took = eventually(
        "new handshakes use the new certificate",
        Duration::from_secs(5),
        || served_subject(s.https, Some("a.tunnox.net")).contains("CN=a.tunnox.net v2"),
    );
    println!("rotated certificate served after {took:?}");
    for _ in 0..3 {
        assert_eq!(
            kept.get("a.tunnox.net").unwrap(),
            200,
            "the open connection keeps working"
        );
    }
}

/// The proxy's `tunnox_proxy_handovers_total` by reason.
fn handovers(s: &Site) -> std::collections::BTreeMap<String, u64> {
    let metrics = s.proxy.admin_get("/metrics").unwrap().body;
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("tunnox_proxy_handovers_total{reason=\""))
        .filter_map(|l| {
            let (reason, n) = l.split_once("\"} ")?;
            Some((reason.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn http1_over_tls_takes_the_fast_path_and_hands_over_what_it_does_not_take() {
    let s = start();
    let before = handovers(&s);
    // Two requests on one kept-alive TLS connection: both answered, one connection, and the
    // upstream told HTTPS (a client's own claim replaced).
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "5", "--cacert"])
        .arg(&s.pki.ca)
        .args(["--resolve", &format!("a.tunnox.net:{}:127.0.0.1", s.https)])
        .args([
            "-H",
            "X-Forwarded-Proto: http",
            "-w",
            "|%{http_code} %{num_connects}\n",
        ])
        .arg(format!("https://a.tunnox.net:{}/headers", s.https))
        .arg(format!("https://a.tunnox.net:{}/headers", s.https))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.matches("x-forwarded-proto: https\n").count(),
        2,
        "{text}"
    );
    assert!(!text.contains("x-forwarded-proto: http\n"), "{text}");
    assert!(
        text.contains("|200 1\n") && text.contains("|200 0\n"),
        "{text}"
    );
    // A mapping that redirects plain HTTP is served over HTTPS, not redirected again.
    let (code, tail, body) = curl(&s, "b.tunnox.net", &["--http1.1"]);
    assert_eq!((code, tail.as_str()), (0, "1.1 200"), "{body}");
    // Another host on a's connection: 421 from the fast path too.
    let (code, tail, _) = curl(
        &s,
        "a.tunnox.net",
        &["--http1.1", "-H", "Host: c.tunnox.net"],
    );
    assert_eq!((code, tail.as_str()), (0, "1.1 421"));
    // A small upload is relayed on the fast path.
    let (code, tail, body) = curl(&s, "a.tunnox.net", &["--http1.1", "-d", "hello"]);
    assert_eq!((code, tail.as_str()), (0, "1.1 200"), "{body}");
    assert!(body.contains("content-length: 5"), "{body}");
    // A response larger than the socket buffers to a client that reads slowly: every byte
    // arrives (over TLS the last records must be flushed, not left in the session).
    let payload: String = (0..60_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "--limit-rate",
            "40k",
            "--cacert",
        ])
        .arg(&s.pki.ca)
        .args(["--resolve", &format!("a.tunnox.net:{}:127.0.0.1", s.https)])
        .args(["--data-binary", &payload])
        .arg(format!("https://a.tunnox.net:{}/echo", s.https))
        .output()
        .unwrap();
    assert!(
        out.stdout == payload.as_bytes(),
        "got {} of {} bytes: {}",
        out.stdout.len(),
        payload.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        handovers(&s),
        before,
        "every request above stayed on the fast path"
    );

    // A streamed upload is not the fast path's: handed over with the bytes already decrypted,
    // and the general path answers it as if it had read the connection from the start.
    let big = "x".repeat(100_000);
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "5", "--cacert"])
        .arg(&s.pki.ca)
        .args(["--resolve", &format!("a.tunnox.net:{}:127.0.0.1", s.https)])
        .args(["-H", "Transfer-Encoding: chunked", "--data-binary", &big])
        .arg(format!("https://a.tunnox.net:{}/echo", s.https))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), big);
    let after = handovers(&s);
    assert_eq!(
        after.get("transfer_encoding").copied().unwrap_or(0),
        before.get("transfer_encoding").copied().unwrap_or(0) + 1,
        "{after:?}"
    );
}
