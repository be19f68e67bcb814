//! `tunnox proxy` as a local process for tests: a config file in a temp dir, free ports,
//! started and ready (`/readyz` 200), killed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::process::{Role, eventually, free_port};

pub struct ProxyProc {
    pub port: u16,
    pub admin: u16,
    pub role: Role,
    pub config: PathBuf,
    pub dir: PathBuf,
}

impl ProxyProc {
    /// Starts a proxy whose config is `yaml` plus the `proxy:` listen addresses (the caller's
    /// `yaml` must not contain a `proxy:` section; extra proxy fields go in `proxy_extra`, as
    /// YAML flow-map entries like `set: novel.sh, worker_threads: 1`).
    pub fn start(dir: &Path, name: &str, yaml: &str, proxy_extra: &str) -> Self {
        let port = free_port();
        let admin = free_port();
        Self::start_on(dir, name, yaml, proxy_extra, port, admin)
    }

    pub fn start_on(
        dir: &Path,
        name: &str,
        yaml: &str,
        proxy_extra: &str,
        port: u16,
        admin: u16,
    ) -> Self {
        let config = dir.join(format!("{name}.yaml"));
        let extra = if proxy_extra.is_empty() {
            String::new()
        } else {
            format!(", {proxy_extra}")
        };
        let text = format!(
            "{yaml}\nproxy: {{listen: \"127.0.0.1:{port}\", admin_listen: \"127.0.0.1:{admin}\", node_id: {name}{extra}}}\n"
        );
        std::fs::write(&config, text).unwrap();
        let role = Role::start(
            &["proxy", "-c", config.to_str().unwrap()],
            &[],
            &dir.join(format!("{name}.log")),
        );
        Self {
            port,
            admin,
            role,
            config,
            dir: dir.to_path_buf(),
        }
    }

    /// Waits for `/readyz` to answer 200.
    pub fn ready(self) -> Self {
        eventually("proxy ready", Duration::from_secs(20), || {
            self.admin_get("/readyz").is_some_and(|r| r.status == 200)
        });
        self
    }

    pub fn admin_get(&self, path: &str) -> Option<super::http::Reply> {
        super::http::get(self.admin, "localhost", path)
    }

    pub fn status(&self, host: &str) -> u16 {
        super::http::status(self.port, host)
    }

    pub fn log(&self) -> String {
        self.role.log()
    }
}
