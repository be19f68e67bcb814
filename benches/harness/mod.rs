//! Machinery shared by the benchmarks that run real processes (`proxy`, `tunnel`, `tunnel_tcp`):
//! child processes stopped on drop, a small blocking HTTP/1.1 client, the nginx upstream, `wrk`
//! runs with their CPU accounting, the statistics helpers, and the tunnel sides (tunnox proxy
//! and agent, frps and frpc, rathole's server and client) with their peers' binaries.
//!
//! The benches that include it also include `tests/support` as `support` (for `free_port`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The upstream's answer: 100 bytes.
pub const BODY: &str = "tunnox-bench upstream response body 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ";

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, stopped when dropped: SIGTERM, then SIGKILL for it and its children (nginx
/// workers outlive a SIGKILLed master).
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub graceful: bool,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path, graceful: bool) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            graceful,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Panics with the log's tail when the process has exited.
    pub fn check_alive(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("{} exited ({status}); log tail:\n{tail}", self.name);
        }
    }

    pub fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    pub fn stop(&mut self) {
        let children = self.children();
        let Some(mut c) = self.child.take() else {
            return;
        };
        if self.graceful {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
        for pid in children {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program`, run on `cpu` alone (`taskset -c`) when given: taskset execs it, so the child's pid is
/// the program's.
pub fn pinned(cpu: Option<usize>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Resident memory of a process in bytes (`VmRSS` of /proc/<pid>/status).
pub fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking HTTP/1.1 keep-alive client (verification, polling, /readyz).

pub struct Http {
    pub port: u16,
    pub conn: Option<BufReader<TcpStream>>,
    /// Sent with every request (`Name: value\r\n` lines), e.g. an `Authorization` header.
    pub headers: String,
}

pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Http {
    pub fn new(port: u16) -> Self {
        Self {
            port,
            conn: None,
            headers: String::new(),
        }
    }

    /// GET `path` with `Host: host`; reconnects once when a kept-alive connection was closed.
    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<Answer> {
        let mut last = None;
        for _ in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect(("127.0.0.1", self.port))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                self.conn = Some(BufReader::new(s));
            }
            match self.exchange(host, path) {
                Ok(a) => return Ok(a),
                Err(e) => {
                    self.conn = None;
                    last = Some(e);
                }
            }
        }
        Err(last.expect("two attempts"))
    }

    pub fn exchange(&mut self, host: &str, path: &str) -> std::io::Result<Answer> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let r = self.conn.as_mut().expect("connected");
        r.get_mut().write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\n{}\r\n",
                self.headers
            )
            .as_bytes(),
        )?;
        let mut line = String::new();
        let read_line = |r: &mut BufReader<TcpStream>, line: &mut String| {
            line.clear();
            match r.read_line(line)? {
                0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                _ => Ok(()),
            }
        };
        read_line(r, &mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            read_line(r, &mut line)?;
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                return Err(bad("header"));
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                read_line(r, &mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| bad("chunk size"))?;
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        read_line(r, &mut line)?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                r.read_exact(&mut body[start..])?;
                read_line(r, &mut line)?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        } else {
            r.read_to_end(&mut body)?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(Answer { status, body })
    }
}

/// Polls `GET /readyz` on `admin` until it answers 200; the time from `since`.
pub fn wait_ready(p: &mut Proc, admin: u16, since: Instant, within: Duration) -> Duration {
    let mut http = Http::new(admin);
    loop {
        if let Ok(a) = http.get("127.0.0.1", "/readyz")
            && a.status == 200
        {
            return since.elapsed();
        }
        p.check_alive();
        assert!(
            since.elapsed() < within,
            "{} not ready within {within:?}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `port` answers HTTP at all.
pub fn wait_http(p: &mut Proc, port: u16) {
    let start = Instant::now();
    let mut http = Http::new(port);
    while http.get("127.0.0.1", "/").is_err() {
        p.check_alive();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} does not answer on {port}",
            p.name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

pub fn pct<T: Copy>(sorted: &[T], q: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

pub fn us(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        format!("{us:.2} µs")
    } else {
        format!("{us:.0} µs")
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------
// Part 1: tunnox vs nginx under wrk

pub fn nginx_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n"
    )
}

pub fn nginx_http_common(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "access_log off;\n  client_body_temp_path {d}/client_body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
    )
}

pub fn start_nginx(name: &str, dir: &Path, conf: String) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    Proc::spawn(
        name,
        Command::new("nginx")
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

pub fn start_upstream(dir: &Path, port: u16) -> Proc {
    let conf = format!(
        "{}http {{\n  {}  default_type text/plain;\n  server {{\n    listen 127.0.0.1:{port};\n    \
         location / {{ return 200 \"{BODY}\"; }}\n  }}\n}}\n",
        nginx_common(dir),
        nginx_http_common(dir)
    );
    start_nginx("upstream nginx", dir, conf)
}

/// wrk's `done` hook: one `BENCH key=value ...` line [`wrk`] parses.
pub const WRK_DONE: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f p999_us=%.1f status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), e.status, e.connect, e.read, e.write, e.timeout))
end
"#;

#[derive(Debug, Clone, Copy)]
pub struct WrkRun {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// CPU time the proxy's serving processes used per request (/proc/<pid>/schedstat).
    pub cpu_per_request: Duration,
    /// The same split into user and kernel time (/proc/<pid>/stat, clock-tick resolution).
    pub user_per_request: Duration,
    pub kernel_per_request: Duration,
}

pub fn per_request(ticks: u64, requests: f64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / clock_ticks() / requests.max(1.0))
}

/// Nanoseconds `pids` have run on a CPU, all their threads (`/proc/<pid>/schedstat` is the main
/// thread's alone: a multi-threaded runtime such as Go's or tokio's works in the others).
pub fn cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .flat_map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| t.path().join("schedstat"))
        })
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// User and kernel CPU time `pids` have used (/proc/<pid>/stat), in clock ticks.
pub fn cpu_split(pids: &[u32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command (which may hold spaces) start at state, field 3.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((
                f.get(11)?.parse::<u64>().ok()?,
                f.get(12)?.parse::<u64>().ok()?,
            ))
        })
        .fold((0, 0), |(u, k), (du, dk)| (u + du, k + dk))
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Runs wrk against `port`; `serving` are the processes whose CPU time is charged to it.
pub fn wrk(
    port: u16,
    connections: usize,
    script: &Path,
    duration: Duration,
    serving: &[u32],
) -> WrkRun {
    wrk_on(None, port, connections, script, duration, serving)
}

/// [`wrk`] with wrk pinned to `cpu` (`taskset -c`), away from the processes under test.
pub fn wrk_on(
    cpu: Option<usize>,
    port: u16,
    connections: usize,
    script: &Path,
    duration: Duration,
    serving: &[u32],
) -> WrkRun {
    let url = format!("http://127.0.0.1:{port}/");
    wrk_url(cpu, &url, connections, script, duration, serving)
}

/// What a load generator printed, and what the serving processes spent meanwhile.
pub struct Measured {
    /// The load generator's summary line (it starts with the prefix asked for).
    pub line: String,
    /// CPU time of the serving processes, ns (`/proc/<pid>/task/*/schedstat`).
    pub cpu_ns: u64,
    /// The same as user and kernel clock ticks (`/proc/<pid>/stat`).
    pub user_ticks: u64,
    pub kernel_ticks: u64,
}

impl Measured {
    /// CPU time, user and kernel time per one of `requests`.
    pub fn per_request(&self, requests: f64) -> (Duration, Duration, Duration) {
        (
            Duration::from_nanos(self.cpu_ns / (requests as u64).max(1)),
            per_request(self.user_ticks, requests),
            per_request(self.kernel_ticks, requests),
        )
    }
}

/// Runs the load generator `cmd` (`what`, for messages) to its end and takes its summary line,
/// the one starting with `prefix`; charges the CPU `serving` used meanwhile to it.
pub fn run_load(cmd: &mut Command, what: &str, prefix: &str, serving: &[u32]) -> Measured {
    let cpu_before = cpu_ns(serving);
    let split_before = cpu_split(serving);
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let cpu = cpu_ns(serving) - cpu_before;
    let split_after = cpu_split(serving);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no summary from {what}:\n{stdout}"))
        .to_string();
    Measured {
        line,
        cpu_ns: cpu,
        user_ticks: split_after.0 - split_before.0,
        kernel_ticks: split_after.1 - split_before.1,
    }
}

/// A wrk script sending `Host: host` with every request, with [`WRK_DONE`].
pub fn host_script(dir: &Path, host: &str) -> PathBuf {
    let path = dir.join("host.lua");
    std::fs::write(
        &path,
        format!("wrk.headers[\"Host\"] = \"{host}\"\n{WRK_DONE}"),
    )
    .unwrap();
    path
}

/// [`wrk_on`] against any URL (`https://` too).
pub fn wrk_url(
    cpu: Option<usize>,
    url: &str,
    connections: usize,
    script: &Path,
    duration: Duration,
    serving: &[u32],
) -> WrkRun {
    let m = run_load(
        pinned(cpu, "wrk")
            .args([
                "-t1",
                &format!("-c{connections}"),
                &format!("-d{}s", duration.as_secs()),
                "--latency",
                "-s",
            ])
            .arg(script)
            .arg(url),
        "wrk (e2e/install-deps.sh installs it)",
        "BENCH ",
        serving,
    );
    let kv: HashMap<&str, f64> = m
        .line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k, v.parse().expect("number")))
        .collect();
    let micros = |k: &str| Duration::from_secs_f64(kv[k] / 1e6);
    let (cpu_per_request, user_per_request, kernel_per_request) = m.per_request(kv["requests"]);
    WrkRun {
        rps: kv["requests"] / (kv["duration_us"] / 1e6),
        p50: micros("p50_us"),
        p99: micros("p99_us"),
        p999: micros("p999_us"),
        non_2xx: kv["status"] as u64,
        socket_errors: (kv["connect"] + kv["read"] + kv["write"] + kv["timeout"]) as u64,
        cpu_per_request,
        user_per_request,
        kernel_per_request,
    }
}

pub struct Side {
    pub runs: Vec<WrkRun>,
}

impl Side {
    pub fn rps(&self) -> f64 {
        median(&self.runs.iter().map(|r| r.rps).collect::<Vec<_>>())
    }
    pub fn lat(&self, f: impl Fn(&WrkRun) -> Duration) -> Duration {
        Duration::from_secs_f64(median(
            &self
                .runs
                .iter()
                .map(|r| f(r).as_secs_f64())
                .collect::<Vec<_>>(),
        ))
    }
    pub fn row(&self, name: &str) -> String {
        let runs: Vec<String> = self.runs.iter().map(|r| format!("{:.0}", r.rps)).collect();
        format!(
            "| {name} | {} | **{:.0}** ({}) | {} | **{}** | {} | {:.1} µs | {:.1} / {:.1} µs | {} | {} |",
            self.runs.len(),
            self.rps(),
            runs.join(" / "),
            ms(self.lat(|r| r.p50)),
            ms(self.lat(|r| r.p99)),
            ms(self.lat(|r| r.p999)),
            self.lat(|r| r.cpu_per_request).as_secs_f64() * 1e6,
            self.lat(|r| r.user_per_request).as_secs_f64() * 1e6,
            self.lat(|r| r.kernel_per_request).as_secs_f64() * 1e6,
            self.runs.iter().map(|r| r.non_2xx).sum::<u64>(),
            self.runs.iter().map(|r| r.socket_errors).sum::<u64>(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Tunnel sides (`tunnel`, `tunnel_tcp`): tunnox, frp and rathole, each its own processes.

/// Core of the processes under test and the services they reach; the load runs on `LOAD_CPU`.
pub const SERVE_CPU: usize = 1;
pub const LOAD_CPU: usize = 0;
/// Peer versions `benches/run.sh` provides.
pub const FRP_VERSION: &str = "0.70.1";
pub const RATHOLE_VERSION: &str = "0.5.0";
/// The tunnox client id of every tunnel bench.
pub const CLIENT_ID: &str = "bench-agent";
/// Shared secret of every side (tunnox client token, frp `auth.token`, rathole service token).
pub const TOKEN: &str = "bench-token-0123456789abcdef0123456789abcdef";

/// Where the peers' binaries are: `$TUNNOX_PEERS` or `~/.cache/tunnox/peers`, outside the
/// clone (never in CI).
pub struct Peers {
    pub frps: PathBuf,
    pub frpc: PathBuf,
    pub rathole: PathBuf,
    /// rathole built with its Noise transport (encrypted, as tunnox's TLS and frp's are).
    pub rathole_noise: PathBuf,
}

impl Peers {
    pub fn locate() -> Self {
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
            rathole_noise: root.join(format!("rathole-{RATHOLE_VERSION}-noise/bin/rathole")),
        }
    }

    /// Why the frp side cannot run, if it cannot.
    pub fn frp_missing(&self) -> Option<String> {
        (!(self.frps.exists() && self.frpc.exists())).then(|| {
            format!(
                "not measured: {} and frpc not found (frp {FRP_VERSION}, built from its repository with \
                 `-tags frps,noweb` / `-tags frpc,noweb`)",
                self.frps.display()
            )
        })
    }

    /// Why the rathole side cannot run, if it cannot.
    pub fn rathole_missing(&self) -> Option<String> {
        (!self.rathole.exists()).then(|| {
            format!(
                "not measured: {} not found (`benches/run.sh` installs it)",
                self.rathole.display()
            )
        })
    }

    /// Why the encrypted rathole side cannot run, if it cannot.
    pub fn rathole_noise_missing(&self) -> Option<String> {
        (!self.rathole_noise.exists()).then(|| {
            format!(
                "not measured: {} not found (`benches/run.sh` installs it)",
                self.rathole_noise.display()
            )
        })
    }

    /// `frps --version`.
    pub fn frp_version(&self) -> String {
        first_line(Command::new(&self.frps).arg("--version"))
    }

    /// `rathole --version` prints a build table; its "Build Version:" line is the version.
    pub fn rathole_version(&self) -> String {
        Command::new(&self.rathole)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                    l.strip_prefix("Build Version:")
                        .map(|v| v.trim().to_string())
                })
            })
            .unwrap_or_default()
    }
}

/// The cores to pin to (serving, load), when there are two or more.
pub fn cpus() -> (Option<usize>, Option<usize>) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n >= 2 {
        (Some(SERVE_CPU), Some(LOAD_CPU))
    } else {
        (None, None)
    }
}

pub fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// One way of reaching the service: the port the load goes to and the processes doing the work
/// (whose CPU and memory are charged to the side).
pub struct Running {
    pub port: u16,
    pub procs: Vec<Proc>,
}

impl Running {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
    pub fn check_alive(&mut self) {
        for p in &mut self.procs {
            p.check_alive();
        }
    }
    pub fn rss(&self) -> u64 {
        self.procs
            .iter()
            .map(|p| rss_of(&p.pid().to_string()))
            .sum()
    }
}

/// Waits until `port` accepts connections: a client started before its server is listening
/// gives up (frpc exits when its first login fails).
pub fn wait_port(p: &mut Proc, port: u16) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
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
pub fn certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("e2e/tunnel-cert.sh"))
        .arg(dir)
        .stdout(Stdio::null())
        .status()
        .expect("run e2e/tunnel-cert.sh");
    assert!(status.success(), "e2e/tunnel-cert.sh failed");
    (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"))
}

/// What a tunnox side carries.
pub struct TunnoxSpec<'a> {
    /// More keys of the `CLIENT_ID` entry of `tunnel_clients` (flow YAML: `tunnels: [...]`).
    pub client: &'a str,
    /// More top-level YAML lines (`mappings:` ...), each ending in a newline.
    pub extra: &'a str,
    /// The one target the agent may dial (`--allow 127.0.0.1:<port>`).
    pub allow: u16,
    /// More `tunnox agent` arguments.
    pub agent_args: &'a [&'a str],
    /// The session on plain TCP (`proxy.tunnel.insecure`, `agent --insecure`): no TLS, for a
    /// comparison with peers that do not encrypt either.
    pub insecure: bool,
}

/// `tunnox proxy` single-node (`proxy.tunnel` on TLS 1.3 with a throwaway certificate,
/// `worker_threads: 1`) and `tunnox agent` logged in as [`CLIENT_ID`]; `port` is the proxy's
/// HTTP listener. The caller waits until its traffic comes through.
pub fn start_tunnox(dir: &Path, cpu: Option<usize>, spec: &TunnoxSpec) -> Running {
    let dir = dir.join(if spec.insecure {
        "tunnox-plain"
    } else {
        "tunnox"
    });
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificate(&dir);
    let free_port = crate::support::process::free_port;
    let (port, admin, tunnel) = (free_port(), free_port(), free_port());
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let config = dir.join("proxy.yaml");
    let client = if spec.client.is_empty() {
        String::new()
    } else {
        format!(", {}", spec.client)
    };
    std::fs::write(
        &config,
        format!(
            "storage: {{type: memory, hybrid: {{enable_persistent: false}}}}\n\
             egress: {{allow: [\"127.0.0.0/8\"]}}\n\
             http_domain: {{base_domains: [bench.test]}}\n\
             proxy:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin}\"\n  \
             worker_threads: 1\n  \
             tunnel: {{listen: \"127.0.0.1:{tunnel}\", cert_file: \"{}\", key_file: \"{}\", insecure: {}}}\n\
             tunnel_clients:\n  - {{client_id: {CLIENT_ID}, token_file: \"{}\"{client}}}\n\
             {}log: {{level: warn}}\n",
            cert.display(),
            key.display(),
            spec.insecure,
            token_file.display(),
            spec.extra,
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
    wait_ready(&mut proxy, admin, Instant::now(), Duration::from_secs(30));
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
            .arg(format!("127.0.0.1:{}", spec.allow))
            .args(spec.agent_args)
            .args(if spec.insecure {
                &["--insecure"][..]
            } else {
                &[][..]
            })
            .env("TUNNOX__LOG__LEVEL", "warn")
            .env_remove("RUST_LOG"),
        &dir.join("agent.log"),
        true,
    );
    Running {
        port,
        procs: vec![proxy, agent],
    }
}

/// frps on loopback (`frps_extra`: more lines of frps.toml) and frpc with one `[[proxies]]`
/// entry (`proxy`: its lines); `port` is where the load goes. frp's defaults otherwise: TLS to
/// frps and yamux. The caller waits until its traffic comes through.
pub fn start_frp(
    dir: &Path,
    peers: &Peers,
    cpu: Option<usize>,
    frps_extra: &str,
    proxy: &str,
    port: u16,
) -> Running {
    let dir = dir.join("frp");
    std::fs::create_dir_all(&dir).unwrap();
    let bind = crate::support::process::free_port();
    // Everything on loopback; no dashboard, no admin server (both off unless configured).
    let frps = dir.join("frps.toml");
    std::fs::write(
        &frps,
        format!(
            "bindAddr = \"127.0.0.1\"\nbindPort = {bind}\nproxyBindAddr = \"127.0.0.1\"\n\
             {frps_extra}auth.token = \"{TOKEN}\"\nlog.level = \"warn\"\n"
        ),
    )
    .unwrap();
    let frpc = dir.join("frpc.toml");
    std::fs::write(
        &frpc,
        format!(
            "serverAddr = \"127.0.0.1\"\nserverPort = {bind}\nauth.token = \"{TOKEN}\"\n\
             log.level = \"warn\"\n\n[[proxies]]\n{proxy}"
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
    Running {
        port,
        procs: vec![server, client],
    }
}

/// rathole's server and client with one TCP service to `127.0.0.1:<target>` (rathole's default
/// transport: plain TCP, one tunnel connection per visitor connection). The caller waits until
/// its traffic comes through.
pub fn start_rathole(dir: &Path, peers: &Peers, cpu: Option<usize>, target: u16) -> Running {
    start_rathole_with(dir, &peers.rathole, cpu, target, false)
}

/// rathole with its Noise transport (`Noise_NK_25519_ChaChaPoly_BLAKE2s`, a key pair from
/// `rathole --genkey`): encrypted like tunnox's TLS 1.3 and frp's TLS.
pub fn start_rathole_noise(dir: &Path, peers: &Peers, cpu: Option<usize>, target: u16) -> Running {
    start_rathole_with(dir, &peers.rathole_noise, cpu, target, true)
}

fn start_rathole_with(
    dir: &Path,
    bin: &Path,
    cpu: Option<usize>,
    target: u16,
    noise: bool,
) -> Running {
    let dir = dir.join(if noise { "rathole-noise" } else { "rathole" });
    std::fs::create_dir_all(&dir).unwrap();
    let free_port = crate::support::process::free_port;
    let (bind, service) = (free_port(), free_port());
    let (server_transport, client_transport) = if noise {
        let keys = Command::new(bin)
            .arg("--genkey")
            .output()
            .expect("rathole --genkey");
        let text = String::from_utf8_lossy(&keys.stdout).to_string();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let after = |label: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(label))
                .and_then(|i| lines.get(i + 1))
                .map(|s| s.to_string())
                .unwrap_or_else(|| panic!("rathole --genkey: no {label} in {text:?}"))
        };
        let (private, public) = (after("Private Key"), after("Public Key"));
        (
            format!(
                "[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n\n"
            ),
            format!(
                "[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n\n"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let server_conf = dir.join("server.toml");
    std::fs::write(
        &server_conf,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{bind}\"\n\n{server_transport}[server.services.web]\n\
             token = \"{TOKEN}\"\nbind_addr = \"127.0.0.1:{service}\"\n"
        ),
    )
    .unwrap();
    let client_conf = dir.join("client.toml");
    std::fs::write(
        &client_conf,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{bind}\"\n\n{client_transport}[client.services.web]\n\
             token = \"{TOKEN}\"\nlocal_addr = \"127.0.0.1:{target}\"\n"
        ),
    )
    .unwrap();
    let mut server = Proc::spawn(
        "rathole server",
        pinned(cpu, bin)
            .arg("--server")
            .arg(&server_conf)
            .env("RUST_LOG", "warn"),
        &dir.join("server.log"),
        true,
    );
    wait_port(&mut server, bind);
    let client = Proc::spawn(
        "rathole client",
        pinned(cpu, bin)
            .arg("--client")
            .arg(&client_conf)
            .env("RUST_LOG", "warn"),
        &dir.join("client.log"),
        true,
    );
    Running {
        port: service,
        procs: vec![server, client],
    }
}

/// Runs a start-up step; a panic (a side that does not come up) becomes the reason it is not
/// measured, so the other sides still are.
pub fn catch(f: impl FnOnce() -> Running) -> Result<Running, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "panicked".into());
        format!("not measured: {}", msg.lines().next().unwrap_or(""))
    })
}

pub fn goal(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

// ---------------------------------------------------------------------------------------------
// The management API

/// Every mapping listed through the management API, page by page.
pub struct Listing {
    pub pages: Vec<Duration>,
    pub items: usize,
    /// RSS before the first page, and the most seen after any page.
    pub rss_before: u64,
    pub rss_max: u64,
}

/// Pages through every mapping of the management API on `api` as `token` (`limit` per page,
/// following `next_cursor`), timing each page and reading the RSS of `pid` after each.
pub fn list_all(api: u16, pid: &str, token: &str, limit: usize) -> Listing {
    let mut http = Http::new(api);
    http.headers = format!("Authorization: Bearer {token}\r\n");
    let rss_before = rss_of(pid);
    let (mut pages, mut items, mut rss_max) = (Vec::new(), 0, rss_before);
    let mut cursor = String::new();
    loop {
        let t = Instant::now();
        let a = http
            .get(
                "localhost",
                &format!("/api/v1/mappings?limit={limit}{cursor}"),
            )
            .expect("a page");
        pages.push(t.elapsed());
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let page: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON");
        items += page["items"].as_array().expect("items").len();
        rss_max = rss_max.max(rss_of(pid));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    Listing {
        pages,
        items,
        rss_before,
        rss_max,
    }
}
