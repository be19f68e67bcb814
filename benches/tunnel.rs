//! Tunnel benchmark: plain HTTP through tunnox's tunnel against the same requests sent directly
//! to the upstream and through two peers carrying them, frp (HTTP vhost) and rathole (a TCP
//! tunnel), all measured side by side in one run with the same `wrk` load.
//!
//! Every party is its own process on this machine. The processes under test (tunnox proxy and
//! agent; frps and frpc; rathole's server and client) and the upstream nginx run on one core
//! (`taskset`), `wrk` on the other, so each side gets the same CPU. The peers are not built here:
//! `benches/run.sh` installs rathole, and frp is looked for as prebuilt binaries (see
//! [`Peers`]); a side whose binaries are missing is reported as not measured.
//!
//! Prints a Markdown section on stdout (`make bench` collects it into docs/benchmarks.md).
//! `cargo bench --bench tunnel -- direct tunnox frp rathole` runs only the sides named.

mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{BODY, Http, Proc, Side, WRK_DONE, mib, ms, pinned, rss_of, start_upstream, wrk_on};
use support::process::free_port;

/// Measured runs per side; sides alternate within each round.
const RUNS: usize = 3;
/// The load: `wrk -t1 -c50`.
const CONNECTIONS: usize = 50;
const WARM: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// The Host every request carries (the mapping's, frp's `customDomains`).
const HOST: &str = "t.bench.test";
const CLIENT_ID: &str = "bench-agent";
/// Shared secret of every side (tunnox client token, frp `auth.token`, rathole service token).
const TOKEN: &str = "bench-token-0123456789abcdef0123456789abcdef";
/// Core of the processes under test and the upstream; `wrk` runs on `LOAD_CPU`.
const SERVE_CPU: usize = 1;
const LOAD_CPU: usize = 0;
/// Peer versions `benches/run.sh` provides.
const FRP_VERSION: &str = "0.70.1";
const RATHOLE_VERSION: &str = "0.5.0";

/// Where the peers' binaries are: `$TUNNOX_PEERS` or `~/.cache/tunnox/peers`, outside the
/// clone (never in CI).
struct Peers {
    frps: PathBuf,
    frpc: PathBuf,
    rathole: PathBuf,
}

impl Peers {
    fn locate() -> Self {
        let root = std::env::var_os("TUNNOX_PEERS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/tunnox/peers")
            });
        let frp = root.join(format!("frp-{FRP_VERSION}"));
        Self {
            frps: frp.join("frps"),
            frpc: frp.join("frpc"),
            rathole: root.join(format!("rathole-{RATHOLE_VERSION}/bin/rathole")),
        }
    }
}

/// The cores to pin to, when there are two or more.
fn cpus() -> (Option<usize>, Option<usize>) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n >= 2 {
        (Some(SERVE_CPU), Some(LOAD_CPU))
    } else {
        (None, None)
    }
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The sides

/// One way of reaching the upstream: the port wrk sends to and the processes doing the work
/// (whose CPU and memory are charged to the side).
struct Running {
    port: u16,
    procs: Vec<Proc>,
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
    fn check_alive(&mut self) {
        for p in &mut self.procs {
            p.check_alive();
        }
    }
    fn rss(&self) -> u64 {
        self.procs
            .iter()
            .map(|p| rss_of(&p.pid().to_string()))
            .sum()
    }
}

/// Polls `GET /` with [`HOST`] on `port` until the upstream's body comes back (the tunnel is up).
fn wait_through(name: &str, side: &mut Running) {
    let start = Instant::now();
    loop {
        let last = match Http::new(side.port).get(HOST, "/") {
            Ok(a) if a.status == 200 && a.body == BODY.as_bytes() => return,
            Ok(a) => format!("status {}: {}", a.status, String::from_utf8_lossy(&a.body)),
            Err(e) => e.to_string(),
        };
        side.check_alive();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name}: the upstream's page does not come through within 30 s (last: {last})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `port` accepts connections: a client started before its server is listening
/// gives up (frpc exits when its first login fails).
fn wait_port(p: &mut Proc, port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        p.check_alive();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} does not listen on {port} within 30 s",
            p.name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it (e2e/tunnel-cert.sh, openssl).
fn certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("e2e/tunnel-cert.sh"))
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run e2e/tunnel-cert.sh");
    assert!(status.success(), "e2e/tunnel-cert.sh failed");
    (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"))
}

fn start_tunnox(dir: &Path, upstream: u16, cpu: Option<usize>) -> Running {
    let dir = dir.join("tunnox");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificate(&dir);
    let (port, admin, tunnel) = (free_port(), free_port(), free_port());
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}\n\
             egress: {{allow: [\"127.0.0.0/8\"]}}\n\
             http_domain: {{base_domains: [bench.test]}}\n\
             proxy:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin}\"\n  \
             worker_threads: 1\n  \
             tunnel: {{listen: \"127.0.0.1:{tunnel}\", cert_file: \"{}\", key_file: \"{}\"}}\n\
             tunnel_clients:\n  - {{client_id: {CLIENT_ID}, token_file: \"{}\"}}\n\
             mappings:\n  - {{subdomain: t, base_domain: bench.test, target_client_id: {CLIENT_ID}, \
             target_host: 127.0.0.1, target_port: {upstream}}}\n\
             log: {{level: warn}}\n",
            cert.display(),
            key.display(),
            token_file.display()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tunnox");
    let mut proxy = Proc::spawn(
        "tunnox proxy",
        pinned(cpu, bin)
            .arg("-c")
            .arg(&config)
            .arg("proxy")
            .env_remove("RUST_LOG"),
        &dir.join("proxy.log"),
        true,
    );
    harness::wait_ready(&mut proxy, admin, Instant::now(), Duration::from_secs(30));
    wait_port(&mut proxy, tunnel);
    let agent = Proc::spawn(
        "tunnox agent",
        pinned(cpu, bin)
            .arg("agent")
            .arg("--server")
            .arg(format!("127.0.0.1:{tunnel}"))
            .args(["--client-id", CLIENT_ID])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(&ca)
            .arg("--allow")
            .arg(format!("127.0.0.1:{upstream}"))
            .env("TUNNOX__LOG__LEVEL", "warn")
            .env_remove("RUST_LOG"),
        &dir.join("agent.log"),
        true,
    );
    let mut side = Running {
        port,
        procs: vec![proxy, agent],
    };
    wait_through("tunnox", &mut side);
    side
}

fn start_frp(dir: &Path, peers: &Peers, upstream: u16, cpu: Option<usize>) -> Running {
    let dir = dir.join("frp");
    std::fs::create_dir_all(&dir).unwrap();
    let (bind, vhost) = (free_port(), free_port());
    // Everything on loopback; no dashboard, no admin server (both off unless configured).
    let frps = dir.join("frps.toml");
    std::fs::write(
        &frps,
        format!(
            "bindAddr = \"127.0.0.1\"\nbindPort = {bind}\nproxyBindAddr = \"127.0.0.1\"\n\
             vhostHTTPPort = {vhost}\nauth.token = \"{TOKEN}\"\nlog.level = \"warn\"\n"
        ),
    )
    .unwrap();
    let frpc = dir.join("frpc.toml");
    std::fs::write(
        &frpc,
        format!(
            "serverAddr = \"127.0.0.1\"\nserverPort = {bind}\nauth.token = \"{TOKEN}\"\n\
             log.level = \"warn\"\n\n[[proxies]]\nname = \"web\"\ntype = \"http\"\n\
             localIP = \"127.0.0.1\"\nlocalPort = {upstream}\ncustomDomains = [\"{HOST}\"]\n"
        ),
    )
    .unwrap();
    let mut server = Proc::spawn(
        "frps",
        pinned(cpu, &peers.frps).arg("-c").arg(&frps),
        &dir.join("frps.log"),
        true,
    );
    wait_port(&mut server, bind);
    let client = Proc::spawn(
        "frpc",
        pinned(cpu, &peers.frpc).arg("-c").arg(&frpc),
        &dir.join("frpc.log"),
        true,
    );
    let mut side = Running {
        port: vhost,
        procs: vec![server, client],
    };
    wait_through("frp", &mut side);
    side
}

fn start_rathole(dir: &Path, peers: &Peers, upstream: u16, cpu: Option<usize>) -> Running {
    let dir = dir.join("rathole");
    std::fs::create_dir_all(&dir).unwrap();
    let (bind, service) = (free_port(), free_port());
    let server_conf = dir.join("server.toml");
    std::fs::write(
        &server_conf,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{bind}\"\n\n[server.services.web]\n\
             token = \"{TOKEN}\"\nbind_addr = \"127.0.0.1:{service}\"\n"
        ),
    )
    .unwrap();
    let client_conf = dir.join("client.toml");
    std::fs::write(
        &client_conf,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{bind}\"\n\n[client.services.web]\n\
             token = \"{TOKEN}\"\nlocal_addr = \"127.0.0.1:{upstream}\"\n"
        ),
    )
    .unwrap();
    let mut server = Proc::spawn(
        "rathole server",
        pinned(cpu, &peers.rathole)
            .arg("--server")
            .arg(&server_conf)
            .env("RUST_LOG", "warn"),
        &dir.join("server.log"),
        true,
    );
    wait_port(&mut server, bind);
    let client = Proc::spawn(
        "rathole client",
        pinned(cpu, &peers.rathole)
            .arg("--client")
            .arg(&client_conf)
            .env("RUST_LOG", "warn"),
        &dir.join("client.log"),
        true,
    );
    let mut side = Running {
        port: service,
        procs: vec![server, client],
    };
    wait_through("rathole", &mut side);
    side
}

fn wrk_script(dir: &Path) -> PathBuf {
    let path = dir.join("tunnel.lua");
    std::fs::write(
        &path,
        format!("wrk.headers[\"Host\"] = \"{HOST}\"\n{WRK_DONE}"),
    )
    .unwrap();
    path
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Tunnox,
    Frp,
    Rathole,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Tunnox => "tunnox",
            Kind::Frp => "frp",
            Kind::Rathole => "rathole",
        }
    }
}

/// A side's outcome: measured, or why not.
struct Measured {
    kind: Kind,
    name: String,
    result: Result<(Side, u64), String>,
}

fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |k: Kind| only.is_empty() || only.iter().any(|o| o == k.label());
    let bench_start = Instant::now();
    let peers = Peers::locate();
    let (serve_cpu, load_cpu) = cpus();
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream_port = free_port();
    let mut upstream = pinned_upstream(dir.path(), upstream_port, serve_cpu);
    harness::wait_http(&mut upstream, upstream_port);
    let script = wrk_script(dir.path());

    let frp_version = first_line(Command::new(&peers.frps).arg("--version"));
    // `rathole --version` prints a build table; its "Build Version:" line is the version.
    let rathole_version = Command::new(&peers.rathole)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                l.strip_prefix("Build Version:")
                    .map(|v| v.trim().to_string())
            })
        })
        .unwrap_or_default();
    let mut measured = Vec::new();
    let mut running: Vec<(usize, Running)> = Vec::new();
    let sides: [(Kind, String); 4] = [
        (Kind::Direct, "direct: wrk → upstream".into()),
        (
            Kind::Tunnox,
            "tunnox proxy → tunnel (TLS 1.3, HTTP/2) → tunnox agent → upstream".into(),
        ),
        (
            Kind::Frp,
            format!("frp {frp_version}: frps HTTP vhost → frpc (TLS, yamux) → upstream"),
        ),
        (
            Kind::Rathole,
            format!(
                "rathole {rathole_version}: TCP tunnel (plain TCP, a connection per visitor) → upstream"
            ),
        ),
    ];
    for (kind, name) in sides {
        if !wanted(kind) {
            continue;
        }
        eprintln!("tunnel bench: starting {}", kind.label());
        let started: Result<Running, String> = match kind {
            Kind::Direct => Ok(Running {
                port: upstream_port,
                procs: Vec::new(),
            }),
            Kind::Tunnox => catch(|| start_tunnox(dir.path(), upstream_port, serve_cpu)),
            Kind::Frp if !(peers.frps.exists() && peers.frpc.exists()) => Err(format!(
                "not measured: {} and frpc not found (frp {FRP_VERSION}, built from its repository with \
                 `-tags frps,noweb` / `-tags frpc,noweb`)",
                peers.frps.display()
            )),
            Kind::Frp => catch(|| start_frp(dir.path(), &peers, upstream_port, serve_cpu)),
            Kind::Rathole if !peers.rathole.exists() => Err(format!(
                "not measured: {} not found (`benches/run.sh` installs it)",
                peers.rathole.display()
            )),
            Kind::Rathole => catch(|| start_rathole(dir.path(), &peers, upstream_port, serve_cpu)),
        };
        match started {
            Ok(r) => {
                running.push((measured.len(), r));
                measured.push(Measured {
                    kind,
                    name,
                    result: Ok((Side { runs: Vec::new() }, 0)),
                });
            }
            Err(e) => {
                eprintln!("tunnel bench: {}: {e}", kind.label());
                measured.push(Measured {
                    kind,
                    name,
                    result: Err(e),
                });
            }
        }
    }

    // The upstream serves every side: its CPU is not charged to any of them.
    for round in 0..RUNS {
        for (i, side) in running.iter_mut() {
            let pids = side.pids();
            wrk_on(load_cpu, side.port, CONNECTIONS, &script, WARM, &pids);
            let run = wrk_on(load_cpu, side.port, CONNECTIONS, &script, MEASURE, &pids);
            side.check_alive();
            eprintln!(
                "tunnel bench: round {round} {}: {run:?}",
                measured[*i].kind.label()
            );
            if let Ok((s, _)) = &mut measured[*i].result {
                s.runs.push(run);
            }
        }
    }
    for (i, side) in &running {
        if let Ok((_, rss)) = &mut measured[*i].result {
            *rss = side.rss();
        }
    }
    drop(running);
    drop(upstream);
    report(&measured, serve_cpu, bench_start.elapsed());
}

/// The upstream nginx on the serving core (its workers inherit the affinity).
fn pinned_upstream(dir: &Path, port: u16, cpu: Option<usize>) -> Proc {
    let p = start_upstream(&dir.join("upstream"), port);
    if let Some(cpu) = cpu {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &p.pid().to_string()])
            .stdout(std::process::Stdio::null())
            .status();
        for child in p.children() {
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", &cpu.to_string(), &child.to_string()])
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
    p
}

/// Runs a start-up step; a panic (a side that does not come up) becomes the reason it is not
/// measured, so the other sides still are.
fn catch(f: impl FnOnce() -> Running) -> Result<Running, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into());
        format!("not measured: {}", msg.lines().next().unwrap_or(""))
    })
}

/// `a - b` in milliseconds with its sign.
fn signed_ms(a: Duration, b: Duration) -> String {
    let d = a.as_secs_f64() - b.as_secs_f64();
    format!("{}{:.2} ms", if d < 0.0 { "−" } else { "+" }, d.abs() * 1e3)
}

fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

fn report(measured: &[Measured], serve_cpu: Option<usize>, took: Duration) {
    println!("## Tunnels (issue: tunnels)\n");
    let pinning = match serve_cpu {
        Some(cpu) => format!(
            "The processes of the side under test and the upstream run on core {cpu} (`taskset`), \
             `wrk` on core {LOAD_CPU}"
        ),
        None => "This machine has one core: nothing is pinned".into(),
    };
    println!(
        "One upstream (nginx, `worker_processes 1`, `return 200` with a {}-byte body, keep-alive) \
         reached four ways, each its own processes on this machine: directly; through tunnox \
         (`tunnox proxy` single-node with `proxy.tunnel` on TLS 1.3 with a throwaway certificate, \
         `tunnel_clients` and a mapping with `target_client_id`, `worker_threads: 1`; `tunnox agent \
         --allow 127.0.0.1:<upstream>`); through frp (frps `vhostHTTPPort`, frpc `type = \"http\"` \
         with `customDomains`, frp's defaults: TLS to frps and yamux multiplexing); through \
         rathole (a TCP service carrying the same HTTP, rathole's default TCP transport: no \
         encryption, one tunnel connection per visitor connection). {pinning}. `wrk -t1 \
         -c{CONNECTIONS} -d{}s --latency` with `Host: {HOST}`, {} s of warm-up before each run; \
         the sides alternate, ×{RUNS}; medians. Every side answered the upstream's body before it \
         was measured. CPU per request is that of the side's own processes (not the upstream's); \
         RSS is theirs after the runs. The whole run took {:.0} s; the machine's 2 cores are also \
         used by other work, so read the ratios.\n",
        BODY.len(),
        MEASURE.as_secs(),
        WARM.as_secs(),
        took.as_secs_f64()
    );
    println!(
        "| path | runs | requests/s (each run) | p50 | p99 | p99.9 | added p99 vs direct | CPU per request | RSS | non-2xx | socket errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let get = |k: Kind| {
        measured
            .iter()
            .find(|m| m.kind == k)
            .and_then(|m| m.result.as_ref().ok())
            .filter(|(s, _)| !s.runs.is_empty())
    };
    let direct_p99 = get(Kind::Direct).map(|(s, _)| s.lat(|r| r.p99));
    for m in measured {
        match &m.result {
            Ok((s, rss)) if !s.runs.is_empty() => {
                let runs: Vec<String> = s.runs.iter().map(|r| format!("{:.0}", r.rps)).collect();
                let added = match (m.kind, direct_p99) {
                    (Kind::Direct, _) | (_, None) => "—".to_string(),
                    (_, Some(d)) => signed_ms(s.lat(|r| r.p99), d),
                };
                let cpu = if m.kind == Kind::Direct {
                    "—".to_string()
                } else {
                    format!("{:.1} µs", s.lat(|r| r.cpu_per_request).as_secs_f64() * 1e6)
                };
                println!(
                    "| {} | {} | **{:.0}** ({}) | {} | **{}** | {} | {} | {} | {} | {} | {} |",
                    m.name,
                    s.runs.len(),
                    s.rps(),
                    runs.join(" / "),
                    ms(s.lat(|r| r.p50)),
                    ms(s.lat(|r| r.p99)),
                    ms(s.lat(|r| r.p999)),
                    added,
                    cpu,
                    if m.kind == Kind::Direct {
                        "—".to_string()
                    } else {
                        mib(*rss)
                    },
                    s.runs.iter().map(|r| r.non_2xx).sum::<u64>(),
                    s.runs.iter().map(|r| r.socket_errors).sum::<u64>(),
                );
            }
            Ok(_) => println!("| {} | 0 | not measured | | | | | | | | |", m.name),
            Err(e) => println!(
                "| {} | 0 | {} | | | | | | | | |",
                m.name,
                e.replace('|', "\\|")
            ),
        }
    }
    println!();
    let ratio = |a: Kind, b: Kind| match (get(a), get(b)) {
        (Some((a, _)), Some((b, _))) => Some(a.rps() / b.rps()),
        _ => None,
    };
    let fmt = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{r:.2}×"));
    println!(
        "Throughput ratios: tunnox / rathole **{}**, tunnox / frp **{}**, tunnox / direct {}, \
         rathole / frp {}.\n",
        fmt(ratio(Kind::Tunnox, Kind::Rathole)),
        fmt(ratio(Kind::Tunnox, Kind::Frp)),
        fmt(ratio(Kind::Tunnox, Kind::Direct)),
        fmt(ratio(Kind::Rathole, Kind::Frp)),
    );
    match get(Kind::Tunnox) {
        Some((t, _)) => {
            let p99 = t.lat(|r| r.p99);
            let added = direct_p99.map(|d| p99.saturating_sub(d));
            // A direct p99 above the tunnel's is noise (other work on the cores), not a gain.
            let noisy = direct_p99.is_some_and(|d| d > p99);
            let vs_rathole = ratio(Kind::Tunnox, Kind::Rathole);
            let vs_frp = ratio(Kind::Tunnox, Kind::Frp);
            println!(
                "Goals: tunnox ≥ rathole's requests/s: **{}**; ≥ 10× frp's: **{}**; p99 < 2 ms: \
                 **{}** ({}); added p99 vs direct < 1 ms: **{}** ({}).{}\n",
                vs_rathole.map_or("not measured", |r| goal(r >= 1.0)),
                vs_frp.map_or("not measured", |r| goal(r >= 10.0)),
                goal(p99 < Duration::from_millis(2)),
                ms(p99),
                added.map_or("not measured", |a| if noisy {
                    "not judged"
                } else {
                    goal(a < Duration::from_millis(1))
                }),
                added.map_or("—".to_string(), ms),
                if noisy {
                    " The direct path's p99 was above the tunnel's in this run: the tail is \
                     dominated by other work on the shared cores, so the added p99 says nothing."
                } else {
                    ""
                },
            );
        }
        None => println!(
            "Goals (tunnox ≥ rathole's requests/s and ≥ 10× frp's, p99 < 2 ms, added p99 < 1 ms): \
             not measured, the tunnox side did not run.\n"
        ),
    }
}
