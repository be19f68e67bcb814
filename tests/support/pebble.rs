//! pebble, Let's Encrypt's ACME test server, and its DNS test server on loopback: a real ACME
//! CA for the ACME tests (`e2e/install-deps.sh --print-pebble` builds both). Every name
//! resolves to 127.0.0.1, so pebble validates HTTP-01 challenges against the proxy listening on
//! `http_port` there. Its root changes every run and is read from its management port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::process::{eventually, free_port};
use super::tunnel::Pki;

pub struct Pebble {
    pebble: Child,
    dns: Child,
    /// The ACME directory URL.
    pub directory: String,
    /// The CA of pebble's own listener (what an ACME client trusts to reach it).
    pub listener_ca: PathBuf,
    management: u16,
    dir: PathBuf,
}

fn binaries() -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/e2e/install-deps.sh"))
        .arg("--print-pebble")
        .stderr(Stdio::inherit())
        .output()
        .expect("run e2e/install-deps.sh --print-pebble");
    assert!(
        out.status.success(),
        "e2e/install-deps.sh --print-pebble failed"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl Pebble {
    /// pebble validating HTTP-01 on `http_port`, refusing to issue for `blocked` names.
    pub fn start(dir: &Path, http_port: u16, blocked: &[&str]) -> Self {
        let bin = binaries();
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::new(&dir, "pebble");
        let (acme, management, dns) = (free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": pki.cert,
            "privateKey": pki.key,
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "domainBlocklist": blocked,
            "retryAfter": {"authz": 1, "order": 1},
            "keyAlgorithm": "ecdsa",
            "profiles": {"default": {"description": "tests", "validityPeriod": 7_776_000}},
        }});
        let config_file = dir.join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        // Every name is 127.0.0.1 (no IPv6 answer, or pebble would dial ::1 first).
        let dns_child = Command::new(bin.join("pebble-challtestsrv"))
            .args([
                "-dnsserver",
                &format!("127.0.0.1:{dns}"),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-doh",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let pebble = Command::new(bin.join("pebble"))
            .args([
                "-config",
                config_file.to_str().unwrap(),
                "-dnsserver",
                &format!("127.0.0.1:{dns}"),
            ])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("start pebble");
        let me = Self {
            pebble,
            dns: dns_child,
            directory: format!("https://127.0.0.1:{acme}/dir"),
            listener_ca: pki.ca.clone(),
            management,
            dir,
        };
        eventually(
            "pebble serves its directory",
            Duration::from_secs(30),
            || {
                me.get(&me.directory)
                    .is_some_and(|d| d.contains("newOrder"))
            },
        );
        me
    }

    fn get(&self, url: &str) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "5", "--cacert"])
            .arg(&self.listener_ca)
            .arg(url)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The root certificates pebble issues under (new every run), as a PEM file.
    pub fn roots_file(&self) -> PathBuf {
        let pem = self
            .get(&format!("https://127.0.0.1:{}/roots/0", self.management))
            .expect("pebble's root");
        let path = self.dir.join("issuing-root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }

    /// pebble's log, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.dns] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
