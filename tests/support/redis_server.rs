//! A private `redis-server` per test: its own port, its own directory, AOF on.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
    tls: bool,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

fn redis_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

impl RedisServer {
    /// Starts a server with AOF (`appendfsync always`) on a free loopback port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls: false,
        };
        server.spawn();
        server
    }

    /// Starts a TLS-only server; returns it and the CA certificate file to trust.
    pub fn start_tls() -> (Self, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tunnox-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ]);
        let p = |f: &str| d.join(f).display().to_string();
        let extra = vec![
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            extra,
            tls: true,
        };
        server.spawn();
        let ca = server.dir.path().join("ca.crt");
        (server, ca)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new(redis_binary());
        cmd.arg("--bind").arg("127.0.0.1");
        if self.tls {
            cmd.args(["--port", "0", "--tls-port", &port]);
        } else {
            cmd.args(["--port", &port]);
        }
        cmd.args(["--dir", &self.dir.path().display().to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .expect("start redis-server (is it installed? .ci/run installs it)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && (self.tls || self.ping())
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("redis-server exited during start: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not become ready", self.port);
    }

    fn ping(&self) -> bool {
        let mut args = vec!["-p".to_string(), self.port.to_string()];
        if let Some(pw) = self.password() {
            args.extend(["-a".into(), pw, "--no-auth-warning".into()]);
        }
        Command::new("redis-cli")
            .args(&args)
            .arg("PING")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
            .unwrap_or(false)
    }

    fn password(&self) -> Option<String> {
        self.extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.extra.get(i + 1).cloned())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// False after [`Self::kill`] until a restart.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (no chance to flush anything beyond what AOF already has)
    /// and starts it again on the same port and directory.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops the server (SIGKILL) without restarting it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again after [`Self::kill`] as a replica of `master_port` (how a Redis
    /// pod behind Sentinel restarts: it asks the sentinels for the master and follows it).
    pub fn restart_as_replica_of(&mut self, master_port: u16) {
        if let Some(i) = self.extra.iter().position(|a| a == "--replicaof") {
            self.extra.drain(i..i + 3);
        }
        self.extra.extend([
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            master_port.to_string(),
        ]);
        self.restart();
    }

    /// Starts the server again after [`Self::kill`].
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Kills the server (SIGKILL), deletes everything in its data directory and starts it again
    /// on the same port: a restart that lost every key (no AOF, no RDB to load).
    pub fn restart_empty(&mut self) {
        self.kill();
        for entry in std::fs::read_dir(self.dir.path()).expect("read data dir") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Data only: a TLS server's certificates live in the same directory.
            if !(name == "appendonlydir" || name == "dump.rdb" || name.ends_with(".aof")) {
                continue;
            }
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove data");
            } else {
                std::fs::remove_file(&path).expect("remove data");
            }
        }
        self.spawn();
    }

    /// Runs a command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(pw) = self.password() {
            cmd.args(["-a", &pw, "--no-auth-warning"]);
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `redis-server --sentinel` with its own config file (Sentinel rewrites it).
struct SentinelProc {
    port: u16,
    child: Child,
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`SentinelGroup`] is started with.
#[derive(Debug, Clone)]
pub struct SentinelSetup {
    pub master_name: String,
    /// How long a silent master takes to be judged down (`down-after-milliseconds`).
    pub down_after_ms: u64,
    /// `requirepass` of the sentinels themselves.
    pub sentinel_password: Option<String>,
    /// Extra `redis-server` arguments for both data nodes.
    pub server_args: Vec<String>,
}

impl Default for SentinelSetup {
    fn default() -> Self {
        Self {
            master_name: "tunnox-test".into(),
            down_after_ms: 1000,
            sentinel_password: None,
            server_args: Vec::new(),
        }
    }
}

/// 1 master, 1 replica and 3 sentinels (quorum 2) on free loopback ports, each data node in
/// its own temp dir and the sentinels' configs in another; everything killed on drop.
pub struct SentinelGroup {
    pub setup: SentinelSetup,
    /// The data nodes: index 0 started as the master, 1 as its replica.
    pub servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProc>,
    dir: tempfile::TempDir,
}

impl SentinelGroup {
    pub fn start() -> Self {
        Self::start_with(SentinelSetup::default())
    }

    pub fn start_with(setup: SentinelSetup) -> Self {
        let args: Vec<&str> = setup.server_args.iter().map(String::as_str).collect();
        let master = RedisServer::start_with(&args);
        let master_port = master.port().to_string();
        let mut replica_args = args.clone();
        replica_args.extend(["--replicaof", "127.0.0.1", &master_port]);
        let replica = RedisServer::start_with(&replica_args);
        wait_for("replica in sync", || {
            replica
                .cli(&["info", "replication"])
                .contains("master_link_status:up")
        });
        let mut group = Self {
            setup,
            servers: vec![master, replica],
            sentinels: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for _ in 0..3 {
            group.start_sentinel(master_port.parse().unwrap());
        }
        // A failover needs the sentinels to know the replica and each other (hello messages
        // every 2 s) and a quorum that can authorise it.
        wait_for("sentinels know the replica and each other", || {
            (0..3).all(|i| {
                group
                    .sentinel_cli(i, &["sentinel", "ckquorum", &group.setup.master_name])
                    .starts_with("OK 3 usable")
                    && group
                        .sentinel_cli(i, &["sentinel", "replicas", &group.setup.master_name])
                        .contains(&format!("127.0.0.1:{}", group.servers[1].port()))
            })
        });
        group
    }

    fn start_sentinel(&mut self, master_port: u16) {
        let port = free_port();
        let conf = self.dir.path().join(format!("sentinel-{port}.conf"));
        let s = &self.setup;
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {name} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {name} {down}\nsentinel failover-timeout {name} 3000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = self.dir.path().display(),
            name = s.master_name,
            down = s.down_after_ms,
        );
        if let Some(pw) = &s.sentinel_password {
            text.push_str(&format!("requirepass {pw}\nsentinel sentinel-pass {pw}\n"));
        }
        std::fs::write(&conf, text).expect("sentinel config");
        let child = Command::new(redis_binary())
            .arg(&conf)
            .arg("--sentinel")
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args([
                "--logfile",
                &self
                    .dir
                    .path()
                    .join(format!("sentinel-{port}.log"))
                    .display()
                    .to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server --sentinel");
        self.sentinels.push(SentinelProc { port, child });
        let i = self.sentinels.len() - 1;
        wait_for("sentinel answers", || {
            self.sentinel_cli(i, &["ping"]) == "PONG"
        });
    }

    /// `127.0.0.1:port` of each sentinel.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    pub fn master_name(&self) -> &str {
        &self.setup.master_name
    }

    /// Runs `redis-cli` against sentinel `i`.
    pub fn sentinel_cli(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.sentinels[i].port.to_string()]);
        if let Some(pw) = &self.setup.sentinel_password {
            cmd.args(["-a", pw, "--no-auth-warning"]);
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The port the first sentinel that answers names as the master.
    pub fn master_port(&self) -> u16 {
        (0..self.sentinels.len())
            .find_map(|i| {
                self.sentinel_cli(
                    i,
                    &["sentinel", "get-master-addr-by-name", self.master_name()],
                )
                .lines()
                .nth(1)
                .and_then(|p| p.trim().parse().ok())
            })
            .expect("a sentinel names the master")
    }

    /// How many failovers the sentinels have made for the master: its `config-epoch`, the
    /// highest any sentinel reports (one that lagged a switch reports less).
    pub fn failovers(&self) -> u64 {
        (0..self.sentinels.len())
            .filter_map(|i| {
                let out = self.sentinel_cli(i, &["sentinel", "master", self.master_name()]);
                let lines: Vec<&str> = out.lines().map(str::trim).collect();
                lines
                    .chunks(2)
                    .find(|kv| kv[0] == "config-epoch")
                    .and_then(|kv| kv.get(1)?.parse().ok())
            })
            .max()
            .unwrap_or(0)
    }

    /// The data node that is the master now.
    pub fn master(&mut self) -> &mut RedisServer {
        let port = self.master_port();
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .expect("the master is one of the data nodes")
    }

    /// SIGKILLs the current master; returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let m = self.master();
        let port = m.port();
        m.kill();
        port
    }

    /// Waits until the data node on `port` is in sync: a replica with its link to the master up,
    /// or, when the sentinels failed over again meanwhile and chose it (a busy machine can make
    /// the new master miss their pings), the master with an online replica. Returns the time it
    /// took.
    pub fn wait_replica_synced(&self, port: u16, within: Duration) -> Duration {
        let node = self.servers.iter().find(|s| s.port() == port).unwrap();
        let start = Instant::now();
        while start.elapsed() < within {
            let info = node.cli(&["info", "replication"]);
            if info.contains("master_link_status:up")
                || (info.contains("role:master")
                    && info.contains("state=online")
                    && self.master_port() == port)
            {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // What the node and the sentinels say, for whoever reads the failure.
        panic!(
            "replica on {port} not in sync within {within:?}\n--- its replication info:\n{}\n--- the sentinels name the master on port {}",
            node.cli(&["info", "replication"]),
            self.master_port()
        );
    }

    /// Restarts the killed data node on `port` as a replica of the current master.
    pub fn restart_as_replica(&mut self, port: u16) {
        let master = self.master_port();
        let node = self
            .servers
            .iter_mut()
            .find(|s| s.port() == port)
            .expect("a data node on that port");
        node.restart_as_replica_of(master);
    }

    /// Waits until the sentinels name another master than `old` and it answers as a master.
    pub fn wait_failover(&self, old: u16, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within {
            let now = self.master_port();
            if now != old
                && self
                    .servers
                    .iter()
                    .find(|s| s.port() == now)
                    .is_some_and(|s| s.cli(&["role"]).starts_with("master"))
            {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no failover away from port {old} within {within:?}");
    }
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within 30 s");
}
