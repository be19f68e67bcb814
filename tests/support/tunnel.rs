//! Tunnels in tests: a throwaway CA and a certificate for `localhost` / `127.0.0.1` made with
//! the `openssl` command, and `tunnox agent` as a local process.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::Role;

/// A CA and a server certificate it signed, as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (.ci/deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// ECDSA P-256 CA `prefix-ca.pem` and a server certificate for `localhost` and `127.0.0.1`.
    pub fn new(dir: &Path, prefix: &str) -> Self {
        let (ca, ca_key) = (
            dir.join(format!("{prefix}-ca.pem")),
            dir.join(format!("{prefix}-ca.key")),
        );
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &s(&ca_key),
            "-out",
            &s(&ca),
            "-days",
            "2",
            "-subj",
            &format!("/CN={prefix} test CA"),
        ]);
        let mut pki = Self {
            ca,
            ca_key,
            cert: PathBuf::new(),
            key: PathBuf::new(),
        };
        (pki.cert, pki.key) = pki.issue(
            dir,
            &format!("{prefix}-server"),
            "localhost",
            "DNS:localhost,IP:127.0.0.1",
        );
        pki
    }

    /// A new ECDSA P-256 server certificate signed by this CA, with subject `CN=cn` and the
    /// subject alternative names `sans` (e.g. `DNS:a.tunnox.net`), as `dir/<file>.pem` and
    /// `dir/<file>.key`.
    pub fn issue(&self, dir: &Path, file: &str, cn: &str, sans: &str) -> (PathBuf, PathBuf) {
        let (key, csr, cert, ext) = (
            dir.join(format!("{file}.key")),
            dir.join(format!("{file}.csr")),
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.cnf")),
        );
        let s = |p: &PathBuf| p.to_str().unwrap().to_string();
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        std::fs::write(
            &ext,
            format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&self.ca),
            "-CAkey",
            &s(&self.ca_key),
            "-CAcreateserial",
            "-out",
            &s(&cert),
            "-days",
            "2",
            "-extfile",
            &s(&ext),
        ]);
        (cert, key)
    }

    /// The `proxy.tunnel` flow map for a listener on `port` with this certificate.
    pub fn tunnel_yaml(&self, port: u16, node_token_file: &Path) -> String {
        format!(
            "tunnel: {{listen: \"127.0.0.1:{port}\", cert_file: \"{}\", key_file: \"{}\", node_token_file: \"{}\", heartbeat_interval: 1s}}",
            self.cert.display(),
            self.key.display(),
            node_token_file.display()
        )
    }
}

/// Writes `token` to `dir/name` (a secret file) and returns its path.
pub fn secret_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// What a test agent is started with.
pub struct AgentSpec<'a> {
    pub client_id: &'a str,
    pub token_file: &'a Path,
    /// The CA to trust.
    pub ca: &'a Path,
    /// Tunnel listener ports on 127.0.0.1 to dial.
    pub servers: &'a [u16],
    /// `host:port` targets the agent may reach.
    pub allow: &'a [String],
    pub extra: &'a [&'a str],
}

/// `tunnox agent` as a local process, logging to `dir/<name>.log`.
pub fn agent(dir: &Path, name: &str, spec: &AgentSpec<'_>) -> Role {
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--client-id".into(),
        spec.client_id.into(),
        "--token-file".into(),
        spec.token_file.display().to_string(),
        "--ca-file".into(),
        spec.ca.display().to_string(),
    ];
    for port in spec.servers {
        args.push("--server".into());
        args.push(format!("127.0.0.1:{port}"));
    }
    for a in spec.allow {
        args.push("--allow".into());
        args.push(a.clone());
    }
    args.extend(spec.extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Role::start(&refs, &[], &dir.join(format!("{name}.log")))
}
