//! TCP tunnel benchmark: tunnox's TCP tunnels on remote ports (`tunnel_clients[].tunnels`)
//! against rathole's and frp's TCP tunnels, and the same load sent directly to the service, all
//! measured side by side in one run.
//!
//! The service is this bench's own binary started again as a child process (a single-threaded
//! tokio server, see [`service`]): an echo of one small message per connection, an upload sink
//! and a download source. The service and the processes under test run on one core
//! (`taskset`), this process (the load) on the other. Two loads, each side in turn, ×3:
//!
//! - throughput: one TCP connection carries [`BYTES`] to the service (upload) and one carries
//!   [`BYTES`] from it (download);
//! - connections/s: [`CONN_THREADS`] threads each open a connection, send a [`MESSAGE`]-byte
//!   message, read its echo, close, and start again, for [`MEASURE`].
//!
//! Prints a Markdown section on stdout (`make bench BENCH=tunnel_tcp` puts it into
//! docs/benchmarks.md). `cargo bench --bench tunnel_tcp -- direct tunnox tunnox-plain frp rathole rathole-noise` runs only
//! the sides named.

mod harness;
#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::{
    LOAD_CPU, Peers, Proc, Running, TunnoxSpec, catch, cpu_ns, cpus, goal, median, mib, ms, pct,
    pinned,
};
use support::process::free_port;

/// Measured runs per side; sides alternate within each round.
const RUNS: usize = 3;
/// Bytes one throughput run carries, each way: 1 GiB.
const BYTES: u64 = 1 << 30;
/// Bytes of the warm-up transfer before a side's throughput runs of a round.
const WARM_BYTES: u64 = 64 << 20;
/// Size of every read and write of the throughput runs.
const CHUNK: usize = 256 << 10;
/// The echoed message of the connections/s load (its first byte is the service's `E`).
const MESSAGE: usize = 64;
/// Client threads of the connections/s load.
const CONN_THREADS: usize = 32;
const WARM: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// Set in the environment of the child that serves (its value: the port).
const SERVICE_ENV: &str = "TUNNOX_BENCH_TCP_SERVICE";

// ---------------------------------------------------------------------------------------------
// The service: one port, the connection's first byte says what it wants.
//
// `E` + 63 bytes: the 64 bytes come back; the service closes when the client has.
// `U` + u64 n (big-endian) + n bytes: the service answers n as u64 once it has read them all.
// `D` + u64 n: the service sends n bytes and closes.
//
// No half-close anywhere: frp closes both directions when one ends.

fn service(port: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("service port");
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(s).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
}

async fn serve(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.set_nodelay(true)?;
    let op = s.read_u8().await?;
    match op {
        b'E' => {
            let mut m = [0u8; MESSAGE];
            m[0] = op;
            s.read_exact(&mut m[1..]).await?;
            s.write_all(&m).await?;
            // The client closes first: its TIME_WAIT is on the connecting side, where loopback
            // ports are reused (`tcp_tw_reuse`), not piled up on the service's port.
            let mut rest = [0u8; 64];
            while s.read(&mut rest).await? > 0 {}
            return Ok(());
        }
        b'U' => {
            let n = s.read_u64().await?;
            let mut buf = vec![0u8; CHUNK];
            let mut left = n;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                let got = s.read(&mut buf[..want]).await?;
                if got == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left -= got as u64;
            }
            s.write_u64(n).await?;
        }
        b'D' => {
            let n = s.read_u64().await?;
            let buf = vec![0x5au8; CHUNK];
            let mut left = n;
            while left > 0 {
                let k = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                s.write_all(&buf[..k]).await?;
                left -= k as u64;
            }
        }
        _ => {}
    }
    s.shutdown().await
}

fn start_service(dir: &Path, port: u16, cpu: Option<usize>) -> Proc {
    let exe = std::env::current_exe().expect("own binary");
    let mut p = Proc::spawn(
        "tcp service",
        pinned(cpu, exe).env(SERVICE_ENV, port.to_string()),
        &dir.join("service.log"),
        false,
    );
    harness::wait_port(&mut p, port);
    p
}

// ---------------------------------------------------------------------------------------------
// The load

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

fn bad(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// One connection sends `bytes` to the service; the time from connect to the service's answer.
fn upload(port: u16, bytes: u64) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = connect(port)?;
    let mut head = [0u8; 9];
    head[0] = b'U';
    head[1..].copy_from_slice(&bytes.to_be_bytes());
    s.write_all(&head)?;
    let buf = vec![0xa5u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let k = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let took = start.elapsed();
    let got = u64::from_be_bytes(ack);
    if got != bytes {
        return Err(bad(format!("the service read {got} bytes of {bytes}")));
    }
    Ok(took)
}

/// One connection receives `bytes` from the service; the time from connect to the last byte.
fn download(port: u16, bytes: u64) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = connect(port)?;
    let mut head = [0u8; 9];
    head[0] = b'D';
    head[1..].copy_from_slice(&bytes.to_be_bytes());
    s.write_all(&head)?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        match s.read(&mut buf)? {
            0 => return Err(bad(format!("closed after {got} bytes of {bytes}"))),
            n => got += n as u64,
        }
    }
    Ok(start.elapsed())
}

/// One short connection: the message, its echo, then this side closes.
fn echo_once(port: u16, msg: &[u8; MESSAGE]) -> std::io::Result<()> {
    let mut s = connect(port)?;
    s.write_all(msg)?;
    let mut back = [0u8; MESSAGE];
    s.read_exact(&mut back)?;
    if &back != msg {
        return Err(bad("the echo differs from the message".into()));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Transfer {
    /// MB/s (10^6 bytes per second).
    mbps: f64,
    /// CPU time of the side's processes per MB.
    cpu_per_mb: Duration,
}

fn transfer(
    port: u16,
    pids: &[u32],
    f: fn(u16, u64) -> std::io::Result<Duration>,
) -> Result<Transfer, String> {
    let before = cpu_ns(pids);
    let took = f(port, BYTES).map_err(|e| e.to_string())?;
    let cpu = cpu_ns(pids) - before;
    let mb = BYTES as f64 / 1e6;
    Ok(Transfer {
        mbps: mb / took.as_secs_f64(),
        cpu_per_mb: Duration::from_secs_f64(cpu as f64 / 1e9 / mb),
    })
}

#[derive(Debug, Clone)]
struct ConnRun {
    per_sec: f64,
    errors: u64,
    first_error: Option<String>,
    p50: Duration,
    p99: Duration,
    cpu_per_conn: Duration,
}

/// [`CONN_THREADS`] threads open short connections to `port` for `duration`.
fn connections(port: u16, duration: Duration, pids: &[u32]) -> ConnRun {
    let errors = AtomicU64::new(0);
    let first_error = Mutex::new(None::<String>);
    let before = cpu_ns(pids);
    let start = Instant::now();
    let deadline = start + duration;
    let mut times: Vec<Duration> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..CONN_THREADS)
            .map(|t| {
                let (errors, first_error) = (&errors, &first_error);
                scope.spawn(move || {
                    let mut msg = [0u8; MESSAGE];
                    msg[0] = b'E';
                    for (i, b) in msg.iter_mut().enumerate().skip(1) {
                        *b = b'a' + ((i + t) % 26) as u8;
                    }
                    let mut times = Vec::new();
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        match echo_once(port, &msg) {
                            Ok(()) => times.push(t0.elapsed()),
                            Err(e) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                first_error
                                    .lock()
                                    .unwrap()
                                    .get_or_insert_with(|| e.to_string());
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    times
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("load thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let cpu = cpu_ns(pids) - before;
    times.sort();
    let n = times.len();
    ConnRun {
        per_sec: n as f64 / elapsed.as_secs_f64(),
        errors: errors.into_inner(),
        first_error: first_error.into_inner().unwrap(),
        p50: if n == 0 {
            Duration::ZERO
        } else {
            pct(&times, 0.5)
        },
        p99: if n == 0 {
            Duration::ZERO
        } else {
            pct(&times, 0.99)
        },
        cpu_per_conn: Duration::from_nanos(cpu / (n as u64).max(1)),
    }
}

// ---------------------------------------------------------------------------------------------
// The sides

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Direct,
    Tunnox,
    TunnoxPlain,
    Rathole,
    RatholeNoise,
    Frp,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Tunnox => "tunnox",
            Kind::TunnoxPlain => "tunnox-plain",
            Kind::Rathole => "rathole",
            Kind::RatholeNoise => "rathole-noise",
            Kind::Frp => "frp",
        }
    }
}

/// Waits until an echo comes back through `side` (the tunnel is up).
fn wait_through(name: &str, side: &mut Running) {
    let start = Instant::now();
    let mut msg = [b'x'; MESSAGE];
    msg[0] = b'E';
    loop {
        let last = match echo_once(side.port, &msg) {
            Ok(()) => return,
            Err(e) => e.to_string(),
        };
        side.check_alive();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name}: no echo through within 30 s (last: {last})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_tunnox(dir: &Path, service: u16, cpu: Option<usize>, insecure: bool) -> Running {
    let remote = free_port();
    let tunnels = format!(
        "tunnels: [{{name: tcp, local_host: 127.0.0.1, local_port: {service}, remote_port: {remote}}}]"
    );
    let spec = TunnoxSpec {
        client: &tunnels,
        extra: "",
        allow: service,
        agent_args: &["--worker-threads", "1"],
        insecure,
    };
    let mut side = harness::start_tunnox(dir, cpu, &spec);
    side.port = remote;
    wait_through("tunnox", &mut side);
    side
}

fn start_rathole_noise(dir: &Path, peers: &Peers, service: u16, cpu: Option<usize>) -> Running {
    let mut side = harness::start_rathole_noise(dir, peers, cpu, service);
    wait_through("rathole-noise", &mut side);
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
            "name = \"tcp\"\ntype = \"tcp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = {service}\n\
             remotePort = {remote}\n"
        ),
        remote,
    );
    wait_through("frp", &mut side);
    side
}

fn start_rathole(dir: &Path, peers: &Peers, service: u16, cpu: Option<usize>) -> Running {
    let mut side = harness::start_rathole(dir, peers, cpu, service);
    wait_through("rathole", &mut side);
    side
}

#[derive(Default)]
struct Results {
    up: Vec<Transfer>,
    down: Vec<Transfer>,
    conns: Vec<ConnRun>,
    /// Failed throughput runs, with the first reason.
    transfer_errors: Vec<String>,
    rss: u64,
}

impl Results {
    fn up_mbps(&self) -> Option<f64> {
        (!self.up.is_empty()).then(|| median(&self.up.iter().map(|r| r.mbps).collect::<Vec<_>>()))
    }
    fn down_mbps(&self) -> Option<f64> {
        (!self.down.is_empty())
            .then(|| median(&self.down.iter().map(|r| r.mbps).collect::<Vec<_>>()))
    }
    fn conns_per_sec(&self) -> Option<f64> {
        (!self.conns.is_empty())
            .then(|| median(&self.conns.iter().map(|r| r.per_sec).collect::<Vec<_>>()))
    }
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
        // This process is the load: all its threads, and those it starts, on the load core.
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

    let sides: [(Kind, String); 6] = [
        (Kind::Direct, "direct: client → service".into()),
        (
            Kind::Tunnox,
            "tunnox: remote port on the proxy → one HTTP/2 CONNECT stream on the agent's TLS 1.3 \
             session → agent → service"
                .into(),
        ),
        (
            Kind::TunnoxPlain,
            "tunnox with `proxy.tunnel.insecure` / `agent --insecure`: the same, the session on \
             plain TCP (unencrypted, as rathole's default is)"
                .into(),
        ),
        (
            Kind::Rathole,
            format!(
                "rathole {}: TCP service (plain TCP, a tunnel connection per visitor) → service",
                peers.rathole_version()
            ),
        ),
        (
            Kind::RatholeNoise,
            format!(
                "rathole {} with `transport.type = \"noise\"` (Noise_NK_25519_ChaChaPoly_BLAKE2s: \
                 encrypted, as tunnox's and frp's are) → service",
                peers.rathole_version()
            ),
        ),
        (
            Kind::Frp,
            format!(
                "frp {}: `type = \"tcp\"` with `remotePort` (TLS, yamux) → service",
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
        eprintln!("tunnel_tcp bench: starting {}", kind.label());
        let started: Result<Running, String> = match kind {
            Kind::Direct => Ok(Running {
                port: service_port,
                procs: Vec::new(),
            }),
            Kind::Tunnox => catch(|| start_tunnox(dir.path(), service_port, serve_cpu, false)),
            Kind::TunnoxPlain => catch(|| start_tunnox(dir.path(), service_port, serve_cpu, true)),
            Kind::Rathole => match peers.rathole_missing() {
                Some(why) => Err(why),
                None => catch(|| start_rathole(dir.path(), &peers, service_port, serve_cpu)),
            },
            Kind::RatholeNoise => match peers.rathole_noise_missing() {
                Some(why) => Err(why),
                None => catch(|| start_rathole_noise(dir.path(), &peers, service_port, serve_cpu)),
            },
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
                eprintln!("tunnel_tcp bench: {}: {e}", kind.label());
                Err(e)
            }
        };
        measured.push(Measured { kind, name, result });
    }

    // The service serves every side: its CPU is not charged to any of them.
    for round in 0..RUNS {
        for (i, side) in &mut running {
            let pids = side.pids();
            let label = measured[*i].kind.label();
            let Ok(res) = &mut measured[*i].result else {
                continue;
            };
            let _ = upload(side.port, WARM_BYTES);
            for (dir, f, out) in [
                ("up", upload as fn(u16, u64) -> _, &mut res.up),
                ("down", download, &mut res.down),
            ] {
                match transfer(side.port, &pids, f) {
                    Ok(t) => {
                        eprintln!("tunnel_tcp bench: round {round} {label} {dir}: {t:?}");
                        out.push(t);
                    }
                    Err(e) => {
                        eprintln!("tunnel_tcp bench: round {round} {label} {dir}: failed: {e}");
                        res.transfer_errors.push(format!("{dir}: {e}"));
                    }
                }
            }
            connections(side.port, WARM, &pids);
            let run = connections(side.port, MEASURE, &pids);
            eprintln!("tunnel_tcp bench: round {round} {label} connections: {run:?}");
            res.conns.push(run);
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

// ---------------------------------------------------------------------------------------------
// The report

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn median_d(v: impl Iterator<Item = Duration>) -> Duration {
    Duration::from_secs_f64(median(&v.map(|d| d.as_secs_f64()).collect::<Vec<_>>()))
}

fn each(v: impl Iterator<Item = f64>) -> String {
    v.map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" / ")
}

#[allow(clippy::too_many_lines)]
fn report(measured: &[Measured], serve_cpu: Option<usize>, took: Duration) {
    println!("## TCP tunnels (issue: tcp tunnels)\n");
    let pinning = match serve_cpu {
        Some(cpu) => format!(
            "The service and the processes of the side under test run on core {cpu} (`taskset`), \
             the load (this bench's threads) on core {LOAD_CPU}"
        ),
        None => "This machine has one core: nothing is pinned".into(),
    };
    println!(
        "One TCP service (the bench's own binary, a single-threaded tokio server on loopback) \
         reached six ways, each its own processes on this machine: directly; through a tunnox \
         TCP tunnel (`tunnox proxy` single-node, `proxy.tunnel` on TLS 1.3 with a throwaway \
         certificate, `worker_threads: 1`, `tunnel_clients[].tunnels` with a `remote_port`; \
         `tunnox agent --worker-threads 1 --allow 127.0.0.1:<service>`: each connection to the \
         remote port is one HTTP/2 CONNECT stream on the agent's session); the same with the session \
         on plain TCP (`insecure` on both sides: unencrypted, like rathole's default); through a \
         rathole TCP \
         service (rathole's default transport: plain TCP, no encryption, one tunnel connection \
         per visitor connection); through the same rathole with its Noise transport \
         (`Noise_NK_25519_ChaChaPoly_BLAKE2s`: encrypted, as tunnox's TLS and frp's are); \
         through an frp TCP proxy (`type = \"tcp\"`, `remotePort`, \
         frp's defaults: TLS to frps and yamux). {pinning}. Throughput: one connection carries \
         {} MiB to the service (up: from connect to the service's acknowledgement of the last \
         byte) and one carries {} MiB from it (down: connect to the last byte), {}-KiB reads and \
         writes, after a {} MiB warm-up upload; MB = 10⁶ bytes. Connections/s: {CONN_THREADS} \
         threads each connect, send {MESSAGE} bytes, read their echo, close (the client closes \
         first) and start again, for {} s after {} s of warm-up; the connection time is connect \
         to echo. The sides alternate, ×{RUNS}; medians. Every side echoed a message before it \
         was measured. CPU is that of the side's own processes (not the service's, not the \
         load's); RSS is theirs after the runs. The whole run took {:.0} s; the machine's 2 \
         cores are also used by other work and the numbers are noisy, so read the medians and \
         the ratios.\n",
        BYTES >> 20,
        BYTES >> 20,
        CHUNK >> 10,
        WARM_BYTES >> 20,
        MEASURE.as_secs(),
        WARM.as_secs(),
        took.as_secs_f64()
    );
    let not_direct = |m: &Measured, s: String| {
        if m.kind == Kind::Direct {
            "—".to_string()
        } else {
            s
        }
    };

    println!("### Throughput (one connection, 1 GiB each way)\n");
    println!(
        "| path | runs | up MB/s (each run) | down MB/s (each run) | CPU per MB up / down | failed runs |"
    );
    println!("|---|---|---|---|---|---|");
    for m in measured {
        match &m.result {
            Ok(r) => {
                let mbps = |v: &[Transfer], med: Option<f64>| {
                    med.map_or("—".to_string(), |x| {
                        format!("**{x:.0}** ({})", each(v.iter().map(|t| t.mbps)))
                    })
                };
                let cpu = |v: &[Transfer]| {
                    if v.is_empty() {
                        "—".to_string()
                    } else {
                        us(median_d(v.iter().map(|t| t.cpu_per_mb)))
                    }
                };
                println!(
                    "| {} | {} | {} | {} | {} | {} |",
                    m.name,
                    r.up.len().max(r.down.len()),
                    mbps(&r.up, r.up_mbps()),
                    mbps(&r.down, r.down_mbps()),
                    not_direct(m, format!("{} / {}", cpu(&r.up), cpu(&r.down))),
                    if r.transfer_errors.is_empty() {
                        "0".to_string()
                    } else {
                        format!(
                            "{} ({})",
                            r.transfer_errors.len(),
                            r.transfer_errors[0].replace('|', "\\|")
                        )
                    },
                );
            }
            Err(e) => println!("| {} | 0 | {} | | | |", m.name, e.replace('|', "\\|")),
        }
    }
    println!();

    println!("### Connections per second ({CONN_THREADS} client threads)\n");
    println!(
        "| path | runs | connections/s (each run) | p50 | p99 | CPU per connection | RSS | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for m in measured {
        match &m.result {
            Ok(r) if !r.conns.is_empty() => {
                let errors: u64 = r.conns.iter().map(|c| c.errors).sum();
                let first = r.conns.iter().find_map(|c| c.first_error.clone());
                println!(
                    "| {} | {} | **{:.0}** ({}) | {} | **{}** | {} | {} | {} |",
                    m.name,
                    r.conns.len(),
                    r.conns_per_sec().unwrap_or(0.0),
                    each(r.conns.iter().map(|c| c.per_sec)),
                    ms(median_d(r.conns.iter().map(|c| c.p50))),
                    ms(median_d(r.conns.iter().map(|c| c.p99))),
                    not_direct(m, us(median_d(r.conns.iter().map(|c| c.cpu_per_conn)))),
                    not_direct(m, mib(r.rss)),
                    match first {
                        Some(e) => format!("{errors} (first: {})", e.replace('|', "\\|")),
                        None => errors.to_string(),
                    },
                );
            }
            Ok(_) => println!("| {} | 0 | not measured | | | | | |", m.name),
            Err(e) => println!("| {} | 0 | {} | | | | | |", m.name, e.replace('|', "\\|")),
        }
    }
    println!();

    let get = |k: Kind| {
        measured
            .iter()
            .find(|m| m.kind == k)
            .and_then(|m| m.result.as_ref().ok())
    };
    let ratio = |a: Kind, b: Kind, f: fn(&Results) -> Option<f64>| Some(f(get(a)?)? / f(get(b)?)?);
    let fmt = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{r:.2}×"));
    let up = |r: &Results| r.up_mbps();
    let down = |r: &Results| r.down_mbps();
    let conns = |r: &Results| r.conns_per_sec();
    println!(
        "Ratios (medians): throughput up tunnox / rathole **{}**, tunnox / encrypted rathole \
         (noise) **{}**, tunnox / frp {}, tunnox / direct {}; throughput down tunnox / rathole \
         **{}**, tunnox / encrypted rathole **{}**, tunnox / frp {}, tunnox / direct {}; \
         connections/s tunnox / frp **{}**, tunnox / rathole {}, tunnox / direct {}.\n",
        fmt(ratio(Kind::Tunnox, Kind::Rathole, up)),
        fmt(ratio(Kind::Tunnox, Kind::RatholeNoise, up)),
        fmt(ratio(Kind::Tunnox, Kind::Frp, up)),
        fmt(ratio(Kind::Tunnox, Kind::Direct, up)),
        fmt(ratio(Kind::Tunnox, Kind::Rathole, down)),
        fmt(ratio(Kind::Tunnox, Kind::RatholeNoise, down)),
        fmt(ratio(Kind::Tunnox, Kind::Frp, down)),
        fmt(ratio(Kind::Tunnox, Kind::Direct, down)),
        fmt(ratio(Kind::Tunnox, Kind::Frp, conns)),
        fmt(ratio(Kind::Tunnox, Kind::Rathole, conns)),
        fmt(ratio(Kind::Tunnox, Kind::Direct, conns)),
    );
    let judged = |r: Option<f64>, at_least: f64| r.map_or("not measured", |r| goal(r >= at_least));
    println!(
        "Like for like, unencrypted tunnox / unencrypted rathole: up **{}**, down **{}**.\n",
        fmt(ratio(Kind::TunnoxPlain, Kind::Rathole, up)),
        fmt(ratio(Kind::TunnoxPlain, Kind::Rathole, down)),
    );
    println!(
        "Goals: tunnox's one-stream throughput ≥ rathole's: up **{}**, down **{}** (≥ encrypted \
         rathole's: up **{}**, down **{}**; unencrypted tunnox ≥ unencrypted rathole: up **{}**, \
         down **{}**); tunnox's connections/s ≥ 2× frp's: **{}**.\n",
        judged(ratio(Kind::Tunnox, Kind::Rathole, up), 1.0),
        judged(ratio(Kind::Tunnox, Kind::Rathole, down), 1.0),
        judged(ratio(Kind::Tunnox, Kind::RatholeNoise, up), 1.0),
        judged(ratio(Kind::Tunnox, Kind::RatholeNoise, down), 1.0),
        judged(ratio(Kind::TunnoxPlain, Kind::Rathole, up), 1.0),
        judged(ratio(Kind::TunnoxPlain, Kind::Rathole, down), 1.0),
        judged(ratio(Kind::Tunnox, Kind::Frp, conns), 2.0),
    );
}
