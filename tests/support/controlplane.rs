//! A real Kubernetes API server (etcd + kube-apiserver, started by `e2e/controlplane.sh`) for
//! one test binary, stopped when dropped, even when a test fails.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub struct ControlPlane {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/controlplane.sh")
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on free loopback ports (building or installing what is
    /// missing on first use).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tunnox-cp-")
            .tempdir()
            .expect("temp dir");
        let status = Command::new(script())
            .arg("up")
            .arg(dir.path())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .expect("run e2e/controlplane.sh");
        let mut cp = Self {
            env: HashMap::new(),
            dir,
        };
        assert!(status.success(), "control plane did not start");
        let text = std::fs::read_to_string(cp.dir.path().join("env")).expect("env file");
        cp.env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cp
    }

    pub fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{name} not in env file"))
    }

    pub fn kubeconfig(&self) -> &str {
        self.var("KUBECONFIG")
    }

    /// Runs kubectl as the cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(args, None, None)
    }

    /// Runs kubectl with a bearer token instead of the admin's (e.g. a ServiceAccount token).
    pub fn kubectl_as(&self, token: &str, args: &[&str]) -> Output {
        self.kubectl_with(args, Some(token), None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        self.kubectl_with(args, None, Some(input))
    }

    fn kubectl_with(&self, args: &[&str], token: Option<&str>, input: Option<&str>) -> Output {
        let mut cmd = Command::new(self.var("KUBECTL"));
        cmd.env("KUBECONFIG", self.kubeconfig()).args(args);
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        run(cmd, input)
    }

    /// Runs kubectl and returns stdout; panics with stderr on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        ok(self.kubectl(args), &format!("kubectl {args:?}"))
    }

    pub fn apply(&self, yaml: &str) -> Output {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// Applies `crds/tunnox.yaml` and waits until both kinds are served.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/tunnox.yaml");
        ok(
            self.kubectl(&["apply", "-f", crds.to_str().expect("utf-8 path")]),
            "apply CRDs",
        );
        self.kubectl_ok(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/httpdomainmappings.tunnox.net",
            "crd/tunnelsets.tunnox.net",
        ]);
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.var("HELM"));
        cmd.env("KUBECONFIG", self.kubeconfig()).args(args);
        run(cmd, None)
    }
}

fn run(mut cmd: Command, input: Option<&str>) -> Output {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait")
}

/// Stdout of a successful command; panics with its stderr otherwise.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("down")
            .arg(self.dir.path())
            .status();
    }
}
