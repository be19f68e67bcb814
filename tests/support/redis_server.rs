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
