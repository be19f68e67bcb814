//! `tunnox proxy` as a local process for tests: a config file in a temp dir, free ports,
//! started and ready (`/readyz` 200), killed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::process::{Role, free_port};

pub struct ProxyProc {
    pub port: u16,
    pub admin: u16,
    pub role: Role,
    pub config: PathBuf,
    pub dir: PathBuf,
    /// How it was started, to start it again on other ports when the free ports it was given
    /// were taken meanwhile by a test running beside it (`None`: the caller chose the ports).
    again: Option<(String, String, String)>,
}

impl ProxyProc {
    /// Starts a proxy whose config is `yaml` plus the `proxy:` listen addresses (the caller's
    /// `yaml` must not contain a `proxy:` section; extra proxy fields go in `proxy_extra`, as
    /// YAML flow-map entries like `set: novel.sh, worker_threads: 1`).
    pub fn start(dir: &Path, name: &str, yaml: &str, proxy_extra: &str) -> Self {
        let port = free_port();
        let admin = free_port();
        let mut p = Self::start_on(dir, name, yaml, proxy_extra, port, admin);
        p.again = Some((name.into(), yaml.into(), proxy_extra.into()));
        p
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
            again: None,
        }
    }

    /// Waits for `/readyz` to answer 200. A proxy that exited because one of its free ports
    /// was taken meanwhile (another test bound it between the pick and the start) is started
    /// again on new ones.
    pub fn ready(mut self) -> Self {
        for _ in 0..3 {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if self.admin_get("/readyz").is_some_and(|r| r.status == 200) {
                    return self;
                }
                if !self.role.is_running() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let taken = self.log().contains("in use");
            match (&self.again, taken && !self.role.is_running()) {
                (Some((name, yaml, extra)), true) => {
                    let (name, yaml, extra) = (name.clone(), yaml.clone(), extra.clone());
                    let dir = self.dir.clone();
                    self = Self::start(&dir, &name, &yaml, &extra);
                }
                _ => break,
            }
        }
        panic!("proxy ready: not within 20s; its log:\n{}", self.log());
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
