//! A client of the management API over real HTTP (or HTTPS), for the single-node tests and the
//! e2e suite.

use std::time::Duration;

use serde_json::Value;

use super::http::{Reply, TlsConnection, read_reply};

pub struct Api {
    pub port: u16,
    /// Over TLS, trusting this CA (PEM), to this name.
    pub tls: Option<(std::path::PathBuf, String)>,
}

impl Api {
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Reply {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        // Written beside the read: a server that answers before reading a large body (413)
        // closes on the rest, and the answer must still be read.
        if let Some((ca, name)) = &self.tls {
            let mut c = TlsConnection::open(self.port, name, ca)
                .unwrap_or_else(|e| panic!("{method} {path}: TLS: {e}"));
            return c
                .exchange(req.as_bytes())
                .unwrap_or_else(|| panic!("{method} {path}: no response over TLS"));
        }
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(req.as_bytes());
        });
        let reply = read_reply(&mut s);
        let _ = writer.join();
        reply.unwrap_or_else(|| panic!("{method} {path}: no response"))
    }

    pub fn json(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, Value) {
        let r = self.call(method, path, Some(token), body);
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {r:?}"))
        };
        (r.status, v)
    }

    pub fn create(&self, token: &str, body: &str) -> (u16, Value) {
        self.json("POST", "/api/v1/mappings", token, Some(body))
    }

    /// Every domain a listing returns, following the cursor with `limit` per page.
    pub fn domains(&self, token: &str, query: &str, limit: u32) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let sep = if query.is_empty() { "" } else { "&" };
            let path = format!("/api/v1/mappings?limit={limit}{sep}{query}{cursor}");
            let (status, page) = self.json("GET", &path, token, None);
            assert_eq!(status, 200, "{path}: {page}");
            for m in page["items"].as_array().unwrap() {
                out.push(m["domain"].as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return out,
            }
        }
        panic!("{query}: more than 1000 pages");
    }
}

/// Runs schemathesis (installed by `.ci/schemathesis.sh`) over every operation of the document
/// the API on `port` serves, as `token`, with `examples` per operation: `--checks all` but
/// `positive_data_acceptance` (a schema-valid request may still be refused by a rule the schema
/// cannot state: a label structure, a base domain, the egress policy; that is a 4xx naming the
/// field). Panics with the report on any failure. Its crash cache goes into `dir`.
pub fn fuzz(port: u16, token: &str, dir: &std::path::Path, examples: u32) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/schemathesis.sh");
    let out = std::process::Command::new(script)
        .output()
        .expect("run .ci/schemathesis.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let run = std::process::Command::new(&st)
        .args([
            "run",
            &format!("http://127.0.0.1:{port}/api/v1/openapi.json"),
            "-H",
            &format!("Authorization: Bearer {token}"),
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            &examples.to_string(),
            "--generation-deterministic",
            "--workers",
            "1",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(dir)
        .output()
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(report.contains("7 selected"), "{report}");
}
