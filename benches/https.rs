//! HTTPS benchmark (issue 17): `tunnox proxy`'s HTTPS listener against nginx terminating TLS
//! with the same ECDSA P-256 certificate, each with one worker pinned to the same core, both
//! proxying to the same upstream (a separate nginx) with keep-alive:
//!
//! 1. full TLS 1.3 handshakes: a new connection per request, from this bench's own client
//!    (rustls, session resumption off, SNI naming the mapped host, one `GET` with
//!    `Connection: close`), run as a separate process on the other core;
//! 2. HTTPS requests on keep-alive connections (`wrk` over TLS).
//!
//! On 2 cores the client bounds the rates, so the server's own CPU time per handshake and per
//! request (/proc) is reported beside them. Prints a Markdown section on stdout (`make bench`
//! collects it into docs/benchmarks.md).

mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    BODY, Proc, Side, WrkRun, nginx_common, nginx_http_common, pinned, rss_of, wait_port,
    wait_ready,
};
use support::process::free_port;

/// The mapped host the certificate is for.
const HOST: &str = "h0.bench.test";
/// Measured runs per side, alternating nginx / tunnox.
const RUNS: usize = 5;
const WARM: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// Connections the handshake client keeps opening at once.
const HANDSHAKE_CONCURRENCY: usize = 32;
const KEEPALIVE_CONNECTIONS: usize = 64;
/// Handshake client arguments: the flag that makes this binary the client.
const CLIENT_FLAG: &str = "--handshake-client";

// ---------------------------------------------------------------------------------------------
// The handshake client (this binary, re-run with CLIENT_FLAG)

/// One client run: new connections until `duration` has passed; prints one `HS ...` line.
fn client_main(args: &[String]) {
    let [port, ca, concurrency, secs] = args else {
        panic!("usage: {CLIENT_FLAG} PORT CA CONCURRENCY SECONDS");
    };
    let port: u16 = port.parse().expect("port");
    let concurrency: usize = concurrency.parse().expect("concurrency");
    let duration = Duration::from_secs(secs.parse().expect("seconds"));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Every connection a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut latencies, errors, first_error) = rt.block_on(async move {
        let deadline = tokio::time::Instant::now() + duration;
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let connector = connector.clone();
                tokio::spawn(async move {
                    let (mut lat, mut errors, mut first) = (Vec::new(), 0u64, None);
                    while tokio::time::Instant::now() < deadline {
                        let t = Instant::now();
                        match one_handshake(&connector, port).await {
                            Ok(()) => lat.push(t.elapsed()),
                            Err(e) => {
                                errors += 1;
                                first.get_or_insert(e.to_string());
                            }
                        }
                    }
                    (lat, errors, first)
                })
            })
            .collect();
        let (mut all, mut errors, mut first) = (Vec::new(), 0, None);
        for t in tasks {
            let (lat, e, f) = t.await.expect("client task");
            all.extend(lat);
            errors += e;
            first = first.or(f);
        }
        (all, errors, first)
    });
    latencies.sort();
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "HS requests={} errors={errors} seconds={} p50_us={:.1} p99_us={:.1} p999_us={:.1} first_error={:?}",
        latencies.len(),
        duration.as_secs(),
        q(0.5),
        q(0.99),
        q(0.999),
        first_error.unwrap_or_default()
    );
}

/// Connects, completes a full handshake, sends one request, reads the whole answer and waits
/// for the server to close (so the server, not this client, keeps the closed connection's
/// TIME_WAIT and the client's ports do not run out).
async fn one_handshake(connector: &tokio_rustls::TlsConnector, port: u16) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(HOST).expect("valid name");
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let complete = loop {
        let n = match tls.read(&mut chunk).await {
            Ok(n) => n,
            // Closed without close_notify: the answer is judged by what arrived.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 {
            break true;
        }
    };
    let text = String::from_utf8_lossy(&buf);
    if !(complete && text.starts_with("HTTP/1.1 200") && text.ends_with(BODY)) {
        return Err(std::io::Error::other(format!(
            "unexpected answer: {:?}",
            text.chars().take(120).collect::<String>()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The servers

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn certificate(dir: &Path) -> Pki {
    let pki = support::tunnel::Pki::new(dir, "https-bench");
    let (cert, key) = pki.issue(
        dir,
        "site",
        HOST,
        &format!("DNS:{HOST},DNS:localhost,IP:127.0.0.1"),
    );
    Pki {
        ca: pki.ca.clone(),
        cert,
        key,
    }
}

fn start_upstream(dir: &Path, cpu: Option<usize>, port: u16) -> Proc {
    let conf = format!(
        "{}http {{\n  {}  default_type text/plain;\n  server {{\n    listen 127.0.0.1:{port};\n    \
         location / {{ return 200 \"{BODY}\"; }}\n  }}\n}}\n",
        nginx_common(dir),
        nginx_http_common(dir)
    );
    nginx_on(cpu, "upstream nginx", dir, conf)
}

fn nginx_on(cpu: Option<usize>, name: &str, dir: &Path, conf: String) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    Proc::spawn(
        name,
        pinned(cpu, "nginx")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"]),
        &dir.join("stdout.log"),
        true,
    )
}

/// nginx terminating TLS (1.2 and 1.3, ALPN h2 and http/1.1 as tunnox offers) and proxying to
/// the upstream with the same headers tunnox sends; its defaults otherwise (session tickets on,
/// as tunnox's).
fn start_nginx_tls(dir: &Path, cpu: Option<usize>, port: u16, upstream: u16, pki: &Pki) -> Proc {
    let conf = format!(
        "{}http {{\n  {}  upstream up {{\n    server 127.0.0.1:{upstream};\n    keepalive 64;\n    \
         keepalive_requests 1000000;\n  }}\n  \
         server {{\n    listen 127.0.0.1:{port} ssl http2;\n    server_name {HOST};\n    \
         ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    \
         location / {{\n      proxy_pass http://up;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n      \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
         proxy_set_header X-Forwarded-Proto $scheme;\n      \
         proxy_set_header X-Forwarded-Host $http_host;\n    }}\n  }}\n}}\n",
        nginx_common(dir),
        nginx_http_common(dir),
        pki.cert.display(),
        pki.key.display(),
    );
    nginx_on(cpu, "nginx TLS", dir, conf)
}

/// `tunnox proxy` single-node, one worker thread, its HTTPS listener serving the mapping's
/// certificate by SNI and the same one as the default (for clients that send no name: wrk
/// connects to an address).
fn start_tunnox(dir: &Path, cpu: Option<usize>, https: u16, upstream: u16, pki: &Pki) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let (port, admin) = (free_port(), free_port());
    let (c, k) = (pki.cert.display(), pki.key.display());
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}\n\
             http_domain: {{base_domains: [bench.test]}}\n\
             proxy:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin}\"\n  \
             worker_threads: 1\n  tls_listen: \"127.0.0.1:{https}\"\n  \
             tls: {{default: {{cert_file: \"{c}\", key_file: \"{k}\"}}}}\n\
             log: {{level: warn}}\n\
             mappings:\n  - {{subdomain: h0, base_domain: bench.test, target_host: 127.0.0.1, \
             target_port: {upstream}, tls: {{cert_file: \"{c}\", key_file: \"{k}\"}}}}\n"
        ),
    )
    .unwrap();
    let mut p = Proc::spawn(
        "tunnox proxy",
        pinned(cpu, env!("CARGO_BIN_EXE_tunnox"))
            .arg("-c")
            .arg(&config)
            .arg("proxy")
            .env_remove("RUST_LOG"),
        &dir.join("proxy.log"),
        true,
    );
    wait_ready(&mut p, admin, Instant::now(), Duration::from_secs(30));
    p
}

// ---------------------------------------------------------------------------------------------
// Runs

/// One handshake run against `port`: the client's line, with the server's CPU per handshake.
fn handshakes(cpu: Option<usize>, port: u16, ca: &Path, secs: u64, serving: &[u32]) -> WrkRun {
    let exe = std::env::current_exe().expect("this bench's path");
    let m = harness::run_load(
        pinned(cpu, exe)
            .arg(CLIENT_FLAG)
            .arg(port.to_string())
            .arg(ca)
            .arg(HANDSHAKE_CONCURRENCY.to_string())
            .arg(secs.to_string()),
        "the handshake client",
        "HS ",
        serving,
    );
    let line = &m.line;
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    let requests = field("requests");
    let errors = field("errors") as u64;
    if errors > 0 {
        eprintln!("https bench: handshake errors: {line}");
    }
    let micros = |k: &str| Duration::from_secs_f64(field(k) / 1e6);
    let (cpu_per_request, user_per_request, kernel_per_request) = m.per_request(requests);
    WrkRun {
        rps: requests / field("seconds"),
        p50: micros("p50_us"),
        p99: micros("p99_us"),
        p999: micros("p999_us"),
        non_2xx: 0,
        socket_errors: errors,
        cpu_per_request,
        user_per_request,
        kernel_per_request,
    }
}

struct Sides {
    nginx: Side,
    tunnox: Side,
}

fn ratio_line(what: &str, s: &Sides) -> String {
    let cpu = |side: &Side| side.lat(|r| r.cpu_per_request).as_secs_f64();
    let (n, t) = (&s.nginx, &s.tunnox);
    format!(
        "{what}: tunnox / nginx rate **{:.2}×**, p50 {:.2}×, p99 **{:.2}×**; nginx's CPU per {} / tunnox's **{:.2}×**",
        t.rps() / n.rps(),
        t.lat(|r| r.p50).as_secs_f64() / n.lat(|r| r.p50).as_secs_f64(),
        t.lat(|r| r.p99).as_secs_f64() / n.lat(|r| r.p99).as_secs_f64(),
        if what.starts_with("Handshakes") {
            "handshake"
        } else {
            "request"
        },
        cpu(n) / cpu(t),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == CLIENT_FLAG) {
        return client_main(&args[i + 1..]);
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let (serve, load) = harness::cpus();
    let pki = certificate(dir.path());
    let upstream_port = free_port();
    let mut upstream = start_upstream(&dir.path().join("upstream"), load, upstream_port);
    wait_port(&mut upstream, upstream_port);
    let nginx_port = free_port();
    let mut nginx = start_nginx_tls(
        &dir.path().join("nginx"),
        serve,
        nginx_port,
        upstream_port,
        &pki,
    );
    wait_port(&mut nginx, nginx_port);
    let tunnox_port = free_port();
    let mut tunnox = start_tunnox(
        &dir.path().join("tunnox"),
        serve,
        tunnox_port,
        upstream_port,
        &pki,
    );
    wait_port(&mut tunnox, tunnox_port);
    // Both answer the upstream's body over a verified TLS 1.3 handshake before anything is
    // measured.
    for (name, port) in [("nginx", nginx_port), ("tunnox", tunnox_port)] {
        let check = handshakes(load, port, &pki.ca, 1, &[]);
        assert!(
            check.rps > 0.0 && check.socket_errors == 0,
            "{name} does not serve HTTPS: {check:?}"
        );
    }
    let nginx_serving = nginx.children();
    let tunnox_serving = vec![tunnox.pid()];
    let script = harness::host_script(dir.path(), HOST);
    let wrk = |port: u16, secs: Duration, serving: &[u32]| {
        harness::wrk_url(
            load,
            &format!("https://127.0.0.1:{port}/"),
            KEEPALIVE_CONNECTIONS,
            &script,
            secs,
            serving,
        )
    };
    let mut full = [(); 2].map(|_| Side { runs: Vec::new() });
    let mut kept = [(); 2].map(|_| Side { runs: Vec::new() });
    for round in 0..RUNS {
        for (i, (port, p, serving)) in [
            (nginx_port, &mut nginx, &nginx_serving),
            (tunnox_port, &mut tunnox, &tunnox_serving),
        ]
        .into_iter()
        .enumerate()
        {
            handshakes(load, port, &pki.ca, WARM.as_secs(), serving);
            let run = handshakes(load, port, &pki.ca, MEASURE.as_secs(), serving);
            eprintln!("https bench: round {round} side {i} handshakes: {run:?}");
            full[i].runs.push(run);
            wrk(port, WARM, serving);
            let run = wrk(port, MEASURE, serving);
            eprintln!("https bench: round {round} side {i} keep-alive: {run:?}");
            kept[i].runs.push(run);
            p.check_alive();
        }
    }
    let nginx_rss: u64 = nginx_serving.iter().map(|p| rss_of(&p.to_string())).sum();
    let tunnox_rss = rss_of(&tunnox.pid().to_string());
    let [nginx_full, tunnox_full] = full;
    let [nginx_kept, tunnox_kept] = kept;
    let full = Sides {
        nginx: nginx_full,
        tunnox: tunnox_full,
    };
    let kept = Sides {
        nginx: nginx_kept,
        tunnox: tunnox_kept,
    };

    let nginx_version = harness::first_line(Command::new("nginx").arg("-v"));
    println!("## HTTPS (issue: HTTPS)\n");
    let core = |c: Option<usize>| c.map_or("any".to_string(), |c| c.to_string());
    let (serve_core, load_core) = (core(serve), core(load));
    println!(
        "Each party is its own process: the server under test on core {serve_core} (nginx `worker_processes 1`; tunnox `worker_threads: 1`), \
         the clients and the upstream (nginx, `return 200` with a {}-byte body) on core {load_core}. Both servers terminate TLS with the same \
         ECDSA P-256 certificate (TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, session tickets on: each one's defaults) and proxy to the \
         upstream over kept connections with the same forwarded headers. Runs alternate nginx, tunnox, ×{RUNS}; {}s of warm-up before \
         each {}s run; medians. CPU is the server's own (`/proc/<pid>/schedstat` of the tunnox process, of the nginx worker) over the run, \
         per completed request. The whole run took {} s. {nginx_version}.\n",
        BODY.len(),
        WARM.as_secs(),
        MEASURE.as_secs(),
        started.elapsed().as_secs(),
    );
    let header = "| server | runs | per second (each run) | p50 | p99 | p99.9 | server CPU per request | user / kernel | non-2xx | errors |\n|---|---|---|---|---|---|---|---|---|---|";
    println!(
        "### Full TLS 1.3 handshakes: a new connection per request\n\n\
         This bench's own client (rustls, X25519, resumption off so every connection is a full handshake; it verifies the chain; \
         SNI `{HOST}`), {HANDSHAKE_CONCURRENCY} connections at a time: connect, handshake, `GET /` with `Connection: close`, read the \
         whole answer until the server closes. Latency is from connect to the end of the answer.\n\n{header}"
    );
    println!("{}", full.nginx.row("nginx (`ssl`, `proxy_pass`)"));
    println!("{}", full.tunnox.row("tunnox proxy"));
    println!("\n{}\n", ratio_line("Handshakes", &full));
    println!(
        "### HTTPS requests on keep-alive connections\n\n\
         `wrk -t1 -c{KEEPALIVE_CONNECTIONS} -d{}s --latency` over TLS (OpenSSL, HTTP/1.1; wrk connects to the address and sends no \
         name, so both answer with their default certificate, the same one), `Host: {HOST}`.\n\n{header}",
        MEASURE.as_secs()
    );
    println!("{}", kept.nginx.row("nginx (`ssl`, `proxy_pass`)"));
    println!("{}", kept.tunnox.row("tunnox proxy"));
    println!("\n{}\n", ratio_line("Keep-alive requests", &kept));
    let hs_cpu = full.nginx.lat(|r| r.cpu_per_request).as_secs_f64()
        / full.tunnox.lat(|r| r.cpu_per_request).as_secs_f64();
    let ka_ok = kept.tunnox.rps() >= kept.nginx.rps()
        && kept.tunnox.lat(|r| r.p99) <= kept.nginx.lat(|r| r.p99);
    println!(
        "Goals: nginx's CPU per handshake ≥ 1.2× tunnox's: **{}** ({hs_cpu:.2}×); keep-alive HTTPS requests/s ≥ nginx's with p99 no worse: **{}**. \
         RSS after the runs: tunnox {}, nginx worker {}.\n",
        harness::goal(hs_cpu >= 1.2),
        harness::goal(ka_ok),
        harness::mib(tunnox_rss),
        harness::mib(nginx_rss),
    );
}
