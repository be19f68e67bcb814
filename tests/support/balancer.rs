//! nginx as the local balancer in front of proxies in tests (what a Service does in a cluster):
//! backends change by reload, as endpoints follow readiness; its access log tells retried and
//! failed requests apart.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// nginx as the local balancer in front of the proxies (what a Service does in a cluster), with
/// a master process so its backends can change by reload (as endpoints follow readiness).
pub struct Balancer {
    child: std::process::Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Balancer {
    fn config(dir: &std::path::Path, port: u16, backends: &[u16]) -> std::path::PathBuf {
        let servers: String = backends
            .iter()
            .map(|p| format!("server 127.0.0.1:{p} max_fails=0;\n"))
            .collect();
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format tried '$upstream_addr $status';
  # A reload closes the old workers' idle client connections, which races with a client reusing
  # one: wrk gets a connection per request so what is counted is the proxies' doing.
  keepalive_timeout 0;
  access_log {d}/nginx-access.log tried;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream proxies {{ {servers} keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://proxies;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host $http_host;
      proxy_next_upstream error timeout;
    }}
  }}
}}"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        path
    }

    pub fn start(dir: &std::path::Path, port: u16, backends: &[u16]) -> Self {
        let path = Self::config(dir, port, backends);
        let child = Command::new("nginx")
            .args([
                "-p",
                &dir.display().to_string(),
                "-c",
                path.to_str().unwrap(),
                "-g",
                "daemon off;",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (e2e/install-deps.sh installs it)");
        Self {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Sends new requests to `backends` only (requests in flight finish where they are).
    pub fn set_backends(&self, backends: &[u16]) {
        Self::config(&self.dir, self.port, backends);
        assert!(
            Command::new("kill")
                .args(["-HUP", &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        // The new workers take over within a few milliseconds.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Requests that the balancer sent to more than one proxy (a failure retried elsewhere),
    /// and requests it answered with a non-2xx status; and the number of requests logged.
    pub fn retries_and_failures(&self) -> (Vec<String>, Vec<String>, usize) {
        let log = std::fs::read_to_string(self.dir.join("nginx-access.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let retried = lines
            .iter()
            .filter(|l| l.contains(','))
            .map(|l| l.to_string())
            .collect();
        let failed = lines
            .iter()
            // 499: wrk closing its connections when its time is up, with requests in flight.
            .filter(|l| !l.ends_with(" 200") && !l.ends_with(" 499"))
            .map(|l| l.to_string())
            .collect();
        (retried, failed, lines.len())
    }

    pub fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.join("nginx-error.log")).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // The master stops its workers on TERM ("fast shutdown").
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
