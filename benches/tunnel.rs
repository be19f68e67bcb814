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

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{
    BODY, CLIENT_ID, Http, LOAD_CPU, Peers, Proc, Running, Side, TunnoxSpec, catch, cpus, goal,
    mib, ms, start_upstream, wrk_on,
};
use support::process::free_port;

/// Measured runs per side; sides alternate within each round.
const RUNS: usize = 3;
/// The load: `wrk -t1 -c50`.
const CONNECTIONS: usize = 50;
const WARM: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// The Host every request carries (the mapping's, frp's `customDomains`).
const HOST: &str = "t.bench.test";

// ---------------------------------------------------------------------------------------------
// The sides

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

fn start_tunnox(dir: &Path, upstream: u16, cpu: Option<usize>, insecure: bool) -> Running {
    let mapping = format!(
        "mappings:\n  - {{subdomain: t, base_domain: bench.test, target_client_id: {CLIENT_ID}, \
         target_host: 127.0.0.1, target_port: {upstream}}}\n"
    );
    let spec = TunnoxSpec {
        client: "",
        extra: &mapping,
        allow: upstream,
        agent_args: &[],
        insecure,
    };
    let mut side = harness::start_tunnox(dir, cpu, &spec);
    wait_through("tunnox", &mut side);
    side
}

/// The same HTTP carried by a tunnox TCP tunnel (a remote port, one HTTP/2 CONNECT stream per
/// connection): what the proxy's HTTP path adds on top of carrying bytes.
fn start_tunnox_tcp(dir: &Path, upstream: u16, cpu: Option<usize>) -> Running {
    let remote = free_port();
    let tunnels = format!(
        "tunnels: [{{name: web, local_host: 127.0.0.1, local_port: {upstream}, remote_port: {remote}}}]"
    );
    let spec = TunnoxSpec {
        client: &tunnels,
        extra: "",
        allow: upstream,
        agent_args: &[],
        insecure: false,
    };
    let mut side = harness::start_tunnox(&dir.join("tcp"), cpu, &spec);
    side.port = remote;
    wait_through("tunnox-tcp", &mut side);
    side
}

fn start_frp(dir: &Path, peers: &Peers, upstream: u16, cpu: Option<usize>) -> Running {
    let vhost = free_port();
    let mut side = harness::start_frp(
        dir,
        peers,
        cpu,
        &format!("vhostHTTPPort = {vhost}\n"),
        &format!(
            "name = \"web\"\ntype = \"http\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {upstream}\n\
             customDomains = [\"{HOST}\"]\n"
        ),
        vhost,
    );
    wait_through("frp", &mut side);
    side
}

fn start_rathole(dir: &Path, peers: &Peers, upstream: u16, cpu: Option<usize>) -> Running {
    let mut side = harness::start_rathole(dir, peers, cpu, upstream);
    wait_through("rathole", &mut side);
    side
}

fn start_rathole_noise(dir: &Path, peers: &Peers, upstream: u16, cpu: Option<usize>) -> Running {
    let mut side = harness::start_rathole_noise(dir, peers, cpu, upstream);
    wait_through("rathole-noise", &mut side);
    side
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Tunnox,
    TunnoxPlain,
    TunnoxTcp,
    Frp,
    Rathole,
    RatholeNoise,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Tunnox => "tunnox",
            Kind::TunnoxPlain => "tunnox-plain",
            Kind::TunnoxTcp => "tunnox-tcp",
            Kind::RatholeNoise => "rathole-noise",
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
    let script = harness::host_script(dir.path(), HOST);

    let frp_version = peers.frp_version();
    let rathole_version = peers.rathole_version();
    let mut measured = Vec::new();
    let mut running: Vec<(usize, Running)> = Vec::new();
    let sides: [(Kind, String); 7] = [
        (Kind::Direct, "direct: wrk → upstream".into()),
        (
            Kind::Tunnox,
            "tunnox proxy → tunnel (TLS 1.3, HTTP/2) → tunnox agent → upstream".into(),
        ),
        (
            Kind::TunnoxPlain,
            "tunnox with `proxy.tunnel.insecure` / `agent --insecure`: the same, the session on plain TCP (unencrypted, as rathole's default is)".into(),
        ),
        (
            Kind::TunnoxTcp,
            "tunnox TCP tunnel (a remote port; TLS 1.3, a CONNECT stream per connection) → tunnox agent → upstream".into(),
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
        (
            Kind::RatholeNoise,
            format!(
                "rathole {rathole_version} with `transport.type = \"noise\"` (Noise_NK_25519_ChaChaPoly_BLAKE2s: encrypted, as tunnox's and frp's are) → upstream"
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
            Kind::Tunnox => catch(|| start_tunnox(dir.path(), upstream_port, serve_cpu, false)),
            Kind::TunnoxPlain => catch(|| start_tunnox(dir.path(), upstream_port, serve_cpu, true)),
            Kind::TunnoxTcp => catch(|| start_tunnox_tcp(dir.path(), upstream_port, serve_cpu)),
            Kind::Frp => match peers.frp_missing() {
                Some(why) => Err(why),
                None => catch(|| start_frp(dir.path(), &peers, upstream_port, serve_cpu)),
            },
            Kind::Rathole => match peers.rathole_missing() {
                Some(why) => Err(why),
                None => catch(|| start_rathole(dir.path(), &peers, upstream_port, serve_cpu)),
            },
            Kind::RatholeNoise => match peers.rathole_noise_missing() {
                Some(why) => Err(why),
                None => catch(|| start_rathole_noise(dir.path(), &peers, upstream_port, serve_cpu)),
            },
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

/// `a - b` in milliseconds with its sign.
fn signed_ms(a: Duration, b: Duration) -> String {
    let d = a.as_secs_f64() - b.as_secs_f64();
    format!("{}{:.2} ms", if d < 0.0 { "−" } else { "+" }, d.abs() * 1e3)
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
         reached seven ways, each its own processes on this machine: directly; through tunnox \
         (`tunnox proxy` single-node with `proxy.tunnel` on TLS 1.3 with a throwaway certificate, \
         `tunnel_clients` and a mapping with `target_client_id`, `worker_threads: 1`; `tunnox agent \
         --allow 127.0.0.1:<upstream>`; the proxy's fast path writes each request on a raw stream \
         parked on the agent's session, docs/tunnels.md \"HTTP on the fast path\"); the same with \
         the session on plain TCP (`insecure`); the same HTTP through a tunnox TCP tunnel (a \
         remote port: bytes only, no HTTP handling on the proxy); through frp (frps \
         `vhostHTTPPort`, frpc `type = \"http\"` with `customDomains`, frp's defaults: TLS to frps \
         and yamux multiplexing); through rathole (a TCP service carrying the same HTTP, \
         rathole's default TCP transport: no encryption, one tunnel connection per visitor \
         connection); through rathole with its Noise transport (encrypted). {pinning}. `wrk -t1 \
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
                "Like for like: encrypted tunnox / encrypted rathole (Noise) **{}**; unencrypted \
                 tunnox / unencrypted rathole **{}**.\n",
                fmt(ratio(Kind::Tunnox, Kind::RatholeNoise)),
                fmt(ratio(Kind::TunnoxPlain, Kind::Rathole)),
            );
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
