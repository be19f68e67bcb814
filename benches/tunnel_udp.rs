//! UDP tunnel benchmark: a tunnox UDP tunnel on a remote port (`tunnel_clients[].tunnels` with
//! `type: udp`) against frp's UDP proxy, and the same load sent directly to the service, side by
//! side in one run.
//!
//! The service is this bench's own binary started again as a child process: a UDP echo on one
//! socket. The service and the processes under test run on one core (`taskset`), this process
//! (the load) on the other. Two loads, each side in turn, ×[`RUNS`]:
//!
//! - fixed rate: one flow sends [`RATE`] datagrams/s of [`SIZE`] bytes for [`FIXED`]; what came
//!   back, the loss, and the round-trip times;
//! - most datagrams/s: one flow keeps [`WINDOW`] datagrams in flight (one sent per echo, one
//!   more when nothing came back for 20 ms) for [`BURST`]; echoes per second.
//!
//! Prints a Markdown section on stdout (`make bench BENCH=tunnel_udp` puts it into
//! docs/benchmarks.md). `cargo bench --bench tunnel_udp -- direct tunnox frp` runs only the sides
//! named.

mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::{
    LOAD_CPU, Peers, Proc, Running, TunnoxSpec, catch, cpu_ns, cpus, median, mib, pct, pinned,
};
use support::process::free_port;

const RUNS: usize = 3;
/// Bytes of every datagram (a sequence number and a send time, then padding).
const SIZE: usize = 512;
/// Datagrams per second of the fixed-rate load.
const RATE: u64 = 20_000;
const FIXED: Duration = Duration::from_secs(5);
/// Datagrams in flight in the most-datagrams/s load.
const WINDOW: usize = 64;
const BURST: Duration = Duration::from_secs(5);
/// Set in the environment of the child that echoes (its value: the port).
const SERVICE_ENV: &str = "TUNNOX_BENCH_UDP_SERVICE";

fn service(port: u16) {
    let s = UdpSocket::bind(("127.0.0.1", port)).expect("service port");
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

fn start_service(dir: &Path, port: u16, cpu: Option<usize>) -> Proc {
    let exe = std::env::current_exe().expect("own binary");
    Proc::spawn(
        "udp service",
        pinned(cpu, exe).env(SERVICE_ENV, port.to_string()),
        &dir.join("service.log"),
        false,
    )
}

fn socket(port: u16, timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    s.connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(timeout)).expect("timeout");
    s
}

/// A datagram: sequence number, nanoseconds since `start` when sent, padding.
fn datagram(seq: u64, start: Instant) -> [u8; SIZE] {
    let mut d = [0x5au8; SIZE];
    d[..8].copy_from_slice(&seq.to_be_bytes());
    let sent = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    d[8..16].copy_from_slice(&sent.to_be_bytes());
    d
}

fn fields(d: &[u8]) -> Option<(u64, u64)> {
    if d.len() != SIZE {
        return None;
    }
    let seq = u64::from_be_bytes(d[..8].try_into().ok()?);
    let sent = u64::from_be_bytes(d[8..16].try_into().ok()?);
    Some((seq, sent))
}

/// Sends `side` datagrams until one comes back (the tunnel is up).
fn wait_through(name: &str, side: &mut Running) {
    let start = Instant::now();
    let s = socket(side.port, Duration::from_millis(200));
    let mut buf = [0u8; SIZE];
    loop {
        let _ = s.send(&datagram(0, start));
        if s.recv(&mut buf).is_ok() {
            return;
        }
        side.check_alive();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name}: no echo through within 30 s"
        );
    }
}

#[derive(Debug, Clone)]
struct FixedRun {
    sent: u64,
    received: u64,
    p50: Duration,
    p99: Duration,
    cpu_per_k: Duration,
}

impl FixedRun {
    fn loss_pct(&self) -> f64 {
        100.0 * (self.sent.saturating_sub(self.received)) as f64 / self.sent.max(1) as f64
    }
}

fn fixed_rate(port: u16, pids: &[u32]) -> FixedRun {
    let s = socket(port, Duration::from_millis(300));
    let rx = s.try_clone().expect("clone");
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let done_rx = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut rtts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut buf = [0u8; 2048];
        loop {
            match rx.recv(&mut buf) {
                Ok(n) => {
                    if let Some((seq, sent)) = fields(&buf[..n])
                        && seen.insert(seq)
                    {
                        let now = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        rtts.push(Duration::from_nanos(now.saturating_sub(sent)));
                    }
                }
                Err(_) if done_rx.load(Ordering::Acquire) => break,
                Err(_) => {}
            }
        }
        rtts
    });
    let cpu0 = cpu_ns(pids);
    let total = RATE * FIXED.as_secs();
    for seq in 0..total {
        let due = start + Duration::from_nanos(seq * 1_000_000_000 / RATE);
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        let _ = s.send(&datagram(seq, start));
    }
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Release);
    let mut rtts = receiver.join().expect("receiver");
    let cpu = cpu_ns(pids).saturating_sub(cpu0);
    rtts.sort_unstable();
    let received = rtts.len() as u64;
    FixedRun {
        sent: total,
        received,
        p50: if rtts.is_empty() {
            Duration::ZERO
        } else {
            pct(&rtts, 0.5)
        },
        p99: if rtts.is_empty() {
            Duration::ZERO
        } else {
            pct(&rtts, 0.99)
        },
        cpu_per_k: Duration::from_nanos(cpu * 1000 / received.max(1)),
    }
}

#[derive(Debug, Clone)]
struct BurstRun {
    per_sec: f64,
    cpu_per_k: Duration,
}

fn most(port: u16, pids: &[u32]) -> BurstRun {
    let s = socket(port, Duration::from_millis(20));
    let start = Instant::now();
    let mut seq = 0u64;
    for _ in 0..WINDOW {
        let _ = s.send(&datagram(seq, start));
        seq += 1;
    }
    let cpu0 = cpu_ns(pids);
    let t0 = Instant::now();
    let mut got = 0u64;
    let mut buf = [0u8; 2048];
    while t0.elapsed() < BURST {
        if s.recv(&mut buf).is_ok() {
            got += 1;
        }
        // One more in flight for each echo, and for each 20 ms of silence (a lost one).
        let _ = s.send(&datagram(seq, start));
        seq += 1;
    }
    let took = t0.elapsed();
    let cpu = cpu_ns(pids).saturating_sub(cpu0);
    // Drain what is still in flight before the next run.
    while s.recv(&mut buf).is_ok() {}
    BurstRun {
        per_sec: got as f64 / took.as_secs_f64(),
        cpu_per_k: Duration::from_nanos(cpu * 1000 / got.max(1)),
    }
}

fn start_tunnox(dir: &Path, service: u16, cpu: Option<usize>) -> Running {
    let remote = free_port();
    let tunnels = format!(
        "tunnels: [{{name: udp, type: udp, local_host: 127.0.0.1, local_port: {service}, remote_port: {remote}}}]"
    );
    let spec = TunnoxSpec {
        client: &tunnels,
        extra: "",
        allow: service,
        agent_args: &["--worker-threads", "1"],
        insecure: false,
    };
    let mut side = harness::start_tunnox(dir, cpu, &spec);
    side.port = remote;
    wait_through("tunnox", &mut side);
    side
}

fn start_frp(dir: &Path, peers: &Peers, service: u16, cpu: Option<usize>) -> Running {
    let remote = free_port();
    let mut side = harness::start_frp(
        dir,
        peers,
        cpu,
        "",
        &format!(
            "name = \"udp\"\ntype = \"udp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {service}\n\
             remotePort = {remote}\n"
        ),
        remote,
    );
    wait_through("frp", &mut side);
    side
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Tunnox,
    Frp,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Tunnox => "tunnox",
            Self::Frp => "frp",
        }
    }
}

#[derive(Default)]
struct Results {
    fixed: Vec<FixedRun>,
    most: Vec<BurstRun>,
    rss: u64,
}

struct Measured {
    kind: Kind,
    name: String,
    result: Result<Results, String>,
}

fn main() {
    if let Ok(port) = std::env::var(SERVICE_ENV) {
        service(port.parse().expect("service port"));
        return;
    }
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |k: Kind| only.is_empty() || only.iter().any(|o| o == k.label());
    let bench_start = Instant::now();
    let peers = Peers::locate();
    let (serve_cpu, load_cpu) = cpus();
    if let Some(cpu) = load_cpu {
        let _ = Command::new("taskset")
            .args([
                "-a",
                "-p",
                "-c",
                &cpu.to_string(),
                &std::process::id().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .status();
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let service_port = free_port();
    let service = start_service(dir.path(), service_port, serve_cpu);
    let sides = [
        (Kind::Direct, "direct: client → service".to_string()),
        (
            Kind::Tunnox,
            "tunnox: UDP remote port on the proxy → one HTTP/2 CONNECT stream of length-prefixed \
             datagrams on the agent's TLS 1.3 session → agent → service"
                .to_string(),
        ),
        (
            Kind::Frp,
            format!(
                "frp {}: `type = \"udp\"` with `remotePort` (TLS, yamux) → service",
                peers.frp_version()
            ),
        ),
    ];
    let mut measured = Vec::new();
    let mut running: Vec<(usize, Running)> = Vec::new();
    for (kind, name) in sides {
        if !wanted(kind) {
            continue;
        }
        eprintln!("tunnel_udp bench: starting {}", kind.label());
        let started: Result<Running, String> = match kind {
            Kind::Direct => {
                let mut side = Running {
                    port: service_port,
                    procs: Vec::new(),
                };
                wait_through("direct", &mut side);
                Ok(side)
            }
            Kind::Tunnox => catch(|| start_tunnox(dir.path(), service_port, serve_cpu)),
            Kind::Frp => match peers.frp_missing() {
                Some(why) => Err(why),
                None => catch(|| start_frp(dir.path(), &peers, service_port, serve_cpu)),
            },
        };
        let result = match started {
            Ok(r) => {
                running.push((measured.len(), r));
                Ok(Results::default())
            }
            Err(e) => {
                eprintln!("tunnel_udp bench: {}: {e}", kind.label());
                Err(e)
            }
        };
        measured.push(Measured { kind, name, result });
    }
    for round in 0..RUNS {
        for (i, side) in &mut running {
            let pids = side.pids();
            let label = measured[*i].kind.label();
            let Ok(res) = &mut measured[*i].result else {
                continue;
            };
            let f = fixed_rate(side.port, &pids);
            eprintln!("tunnel_udp bench: round {round} {label} fixed: {f:?}");
            res.fixed.push(f);
            let m = most(side.port, &pids);
            eprintln!("tunnel_udp bench: round {round} {label} most: {m:?}");
            res.most.push(m);
            side.check_alive();
        }
    }
    for (i, side) in &running {
        if let Ok(res) = &mut measured[*i].result {
            res.rss = side.rss();
        }
    }
    drop(running);
    drop(service);
    report(&measured, serve_cpu, bench_start.elapsed());
}

fn med_d(v: impl Iterator<Item = Duration>) -> Duration {
    Duration::from_secs_f64(median(&v.map(|d| d.as_secs_f64()).collect::<Vec<_>>()))
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn report(measured: &[Measured], serve_cpu: Option<usize>, took: Duration) {
    println!("## UDP tunnels (issue: TunnelSet)\n");
    let pinning = match serve_cpu {
        Some(cpu) => format!(
            "The service and the processes of the side under test run on core {cpu} (`taskset`), \
             the load on core {LOAD_CPU}"
        ),
        None => "This machine has one core: nothing is pinned".into(),
    };
    println!(
        "One UDP echo service (the bench's own binary, one socket on loopback) reached three ways: \
         directly; through a tunnox UDP tunnel (`tunnox proxy` single-node, TLS 1.3 tunnel \
         listener, `worker_threads: 1`, a `type: udp` tunnel; `tunnox agent --worker-threads 1`); \
         through frp's UDP proxy (`type = \"udp\"`, `remotePort`, frp's defaults: TLS to frps and \
         yamux). {pinning}. Datagrams of {SIZE} bytes, one flow (one client address). Fixed \
         rate: {RATE} datagrams/s for {} s; received = distinct echoes back within 0.5 s of the \
         last send; RTT = send to echo. Most datagrams/s: {WINDOW} in flight, one sent per echo \
         (and one per 20 ms without any), for {} s. Sides alternate, ×{RUNS}; medians. CPU is \
         that of the side's own processes per 1000 datagrams echoed; RSS theirs after the runs. \
         The run took {:.0} s on a shared 2-core machine: read medians and ratios.\n",
        FIXED.as_secs(),
        BURST.as_secs(),
        took.as_secs_f64()
    );
    println!(
        "| path | fixed rate: loss % (each run) | RTT p50 / p99 | most echoes/s (each run) | CPU per 1000 (fixed / most) | RSS |"
    );
    println!("|---|---|---|---|---|---|");
    let mut most_of = std::collections::HashMap::new();
    let mut loss_of = std::collections::HashMap::new();
    for m in measured {
        match &m.result {
            Ok(r) if !r.fixed.is_empty() => {
                let loss = median(&r.fixed.iter().map(FixedRun::loss_pct).collect::<Vec<_>>());
                let each_loss: Vec<String> = r
                    .fixed
                    .iter()
                    .map(|f| format!("{:.2}", f.loss_pct()))
                    .collect();
                let per_sec = median(&r.most.iter().map(|b| b.per_sec).collect::<Vec<_>>());
                let each_most: Vec<String> =
                    r.most.iter().map(|b| format!("{:.0}", b.per_sec)).collect();
                let cpu = if m.kind == Kind::Direct {
                    "—".to_string()
                } else {
                    format!(
                        "{} / {}",
                        us(med_d(r.fixed.iter().map(|f| f.cpu_per_k))),
                        us(med_d(r.most.iter().map(|b| b.cpu_per_k)))
                    )
                };
                println!(
                    "| {} | **{loss:.2}** ({}) | {} / {} | **{per_sec:.0}** ({}) | {cpu} | {} |",
                    m.name,
                    each_loss.join(" / "),
                    us(med_d(r.fixed.iter().map(|f| f.p50))),
                    us(med_d(r.fixed.iter().map(|f| f.p99))),
                    each_most.join(" / "),
                    if m.kind == Kind::Direct {
                        "—".to_string()
                    } else {
                        mib(r.rss)
                    },
                );
                most_of.insert(m.kind.label(), per_sec);
                loss_of.insert(m.kind.label(), loss);
            }
            Ok(_) => println!("| {} | no run | | | | |", m.name),
            Err(e) => println!("| {} | not measured: {e} | | | | |", m.name),
        }
    }
    if let (Some(t), Some(f)) = (most_of.get("tunnox"), most_of.get("frp")) {
        println!(
            "\ntunnox / frp, most echoes/s: **{:.2}×**; loss at {RATE}/s: tunnox {:.2} %, frp {:.2} %.",
            t / f,
            loss_of.get("tunnox").copied().unwrap_or(f64::NAN),
            loss_of.get("frp").copied().unwrap_or(f64::NAN)
        );
    }
    println!();
}
