//! Configuration of `tunnox agent` (`agent:`) and its validation; every field also has a flag and
//! an environment variable (src/main.rs). docs/agent.md and docs/configuration.md are the
//! reference.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::{ConfigError, Dur};

/// Most sessions one agent holds at once.
pub const MAX_SESSIONS: u32 = 16;

/// `tunnox agent`. Every field also has a flag and an environment variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The proxies' tunnel listeners, `host:port` each, tried in order (a list, or one string
    /// with comma-separated addresses).
    #[serde(deserialize_with = "one_or_many")]
    pub server: Vec<String>,
    /// TLS server name to verify; default the host of the address dialled.
    pub server_name: Option<String>,
    pub client_id: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) to trust; default the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Plain TCP, no TLS (logged as a warning).
    pub insecure: bool,
    /// Local targets the agent may reach, `host:port` each; nothing else is served.
    #[serde(deserialize_with = "one_or_many")]
    pub allow: Vec<String>,
    /// Sessions held at once (1..=16), to different proxies when several are known.
    pub sessions: u32,
    /// `/metrics` and `/healthz`; `None`: no admin server.
    pub admin_listen: Option<SocketAddr>,
    /// Dialling a proxy (TCP + TLS + authentication), and connecting to a local target.
    pub connect_timeout: Dur,
    /// How long a local service may take to answer a request's headers (then 504).
    pub response_timeout: Dur,
    /// Most concurrent streams served per session (the HTTP/2 setting; beyond it a stream is
    /// refused).
    pub max_streams: u32,
    /// Longest time a retired session is kept for streams in flight (a `ServerShutdown`'s own
    /// grace period may shorten it).
    pub grace_period: Dur,
    /// Runtime threads: 0 = one per CPU; 1 = a single-threaded runtime (best on one core).
    pub worker_threads: usize,
    /// Where the configuration proxies push is kept (JSON, replaced whole on each change) and
    /// read back at start; `None`: memory only.
    pub config_cache: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: Vec::new(),
            server_name: None,
            client_id: String::new(),
            token: None,
            token_file: None,
            ca_file: None,
            insecure: false,
            allow: Vec::new(),
            sessions: 1,
            admin_listen: None,
            connect_timeout: Dur::secs(5),
            response_timeout: Dur::secs(60),
            max_streams: 1000,
            grace_period: Dur::secs(30),
            worker_threads: 0,
            config_cache: None,
        }
    }
}

/// A list, or one string holding comma-separated items (what an environment variable gives).
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => split_list(&s),
        OneOrMany::Many(v) => v.iter().flat_map(|s| split_list(s)).collect(),
    })
}

/// `a, b,,c` → `[a, b, c]`.
pub fn split_list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Splits `host:port` (`[v6]:port` for IPv6); `None` when it is not that shape.
pub fn split_host_port(raw: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h, p)
    } else {
        let (h, p) = raw.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return None;
    }
    if p_invalid(port) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((host, port))
}

fn p_invalid(port: &str) -> bool {
    port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit())
}

impl AgentConfig {
    /// Checks every field; the error names the field and the value. `origin` is where the
    /// configuration came from (file or flags).
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let err = |path: &str, msg: String| ConfigError::at(origin, path, msg, None, None);
        if self.server.is_empty() {
            return Err(err(
                "agent.server",
                "is empty: give the proxy's tunnel address, host:port (--server)".into(),
            ));
        }
        for s in &self.server {
            if split_host_port(s).is_none() {
                return Err(err(
                    "agent.server",
                    format!("{s:?} is not host:port (e.g. tunnel.example.com:7000)"),
                ));
            }
        }
        if let Some(name) = &self.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(err(
                "agent.server_name",
                format!("{name:?} is not a DNS name or IP address"),
            ));
        }
        if self.client_id.trim().is_empty() {
            return Err(err(
                "agent.client_id",
                "is empty: set the client id of this agent (--client-id)".into(),
            ));
        }
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "agent.token",
                    "set either token or token_file, not both".into(),
                ));
            }
            (Some(t), None) if t.is_empty() => {
                return Err(err("agent.token", "is empty".into()));
            }
            (None, None) => {
                return Err(err(
                    "agent.token_file",
                    "is not set: give a file holding the client's token (--token-file)".into(),
                ));
            }
            _ => {}
        }
        if self.sessions == 0 || self.sessions > MAX_SESSIONS {
            return Err(err(
                "agent.sessions",
                format!("{} is out of range 1..={MAX_SESSIONS}", self.sessions),
            ));
        }
        if self.allow.is_empty() {
            return Err(err(
                "agent.allow",
                "is empty: an agent that may reach nothing serves nothing; list the local \
                 targets it may forward to, host:port each (--allow)"
                    .into(),
            ));
        }
        for a in &self.allow {
            if split_host_port(a).is_none() {
                return Err(err(
                    "agent.allow",
                    format!("{a:?} is not host:port (e.g. localhost:3000)"),
                ));
            }
        }
        if self.max_streams == 0 {
            return Err(err("agent.max_streams", "0: must be at least 1".into()));
        }
        if self.worker_threads > super::MAX_WORKER_THREADS {
            return Err(err(
                "agent.worker_threads",
                format!(
                    "must be 0 (one per CPU) to {}, got {}",
                    super::MAX_WORKER_THREADS,
                    self.worker_threads
                ),
            ));
        }
        for (path, d) in [
            ("agent.connect_timeout", self.connect_timeout),
            ("agent.response_timeout", self.response_timeout),
        ] {
            if d.get().is_zero() {
                return Err(err(path, "0: must be longer than zero".into()));
            }
        }
        Ok(())
    }

    /// The token: inline, or read from `token_file` (which must exist and not be empty).
    pub fn read_token(&self, origin: &str) -> Result<String, ConfigError> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(path)) => super::read_secret(path, "agent.token_file", origin),
            (None, None) => Err(ConfigError::at(
                origin,
                "agent.token_file",
                "is not set",
                None,
                None,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AgentConfig {
        AgentConfig {
            server: vec!["proxy.example.com:7000".into()],
            client_id: "laptop".into(),
            token: Some("t".into()),
            allow: vec!["localhost:3000".into()],
            ..AgentConfig::default()
        }
    }

    #[test]
    fn host_port_shapes() {
        let cases: &[(&str, Option<(&str, u16)>)] = &[
            ("localhost:3000", Some(("localhost", 3000))),
            ("127.0.0.1:80", Some(("127.0.0.1", 80))),
            ("[::1]:8080", Some(("::1", 8080))),
            ("LocalHost:1", Some(("LocalHost", 1))),
            ("localhost", None),
            ("localhost:", None),
            (":80", None),
            ("localhost:0", None),
            ("localhost:65536", None),
            ("localhost:+80", None),
            ("::1:80", None),
            ("[zz]:80", None),
            ("a b:80", None),
            ("http://x:80", None),
            ("x:80/path", None),
        ];
        for (raw, want) in cases {
            assert_eq!(split_host_port(raw), *want, "{raw}");
        }
    }

    #[test]
    fn lists_split_on_commas() {
        assert_eq!(split_list(" a:1, b:2,,c:3 "), vec!["a:1", "b:2", "c:3"]);
        let cfg: AgentConfig =
            serde_yaml::from_str("server: a:1,b:2\nallow: [x:1, 'y:2,z:3']").unwrap();
        assert_eq!(cfg.server, vec!["a:1", "b:2"]);
        assert_eq!(cfg.allow, vec!["x:1", "y:2", "z:3"]);
    }

    #[test]
    fn validation_names_the_field_and_the_value() {
        type Edit = fn(&mut AgentConfig);
        let cases: &[(Edit, &str)] = &[
            (|c| c.server.clear(), "agent.server: is empty"),
            (
                |c| c.server = vec!["proxy".into()],
                "agent.server: \"proxy\" is not host:port",
            ),
            (|c| c.client_id = " ".into(), "agent.client_id: is empty"),
            (|c| c.token = None, "agent.token_file: is not set"),
            (|c| c.token = Some(String::new()), "agent.token: is empty"),
            (
                |c| c.sessions = 0,
                "agent.sessions: 0 is out of range 1..=16",
            ),
            (
                |c| c.sessions = 17,
                "agent.sessions: 17 is out of range 1..=16",
            ),
            (
                |c| c.allow.clear(),
                "agent.allow: is empty: an agent that may reach nothing",
            ),
            (
                |c| c.allow.push("3000".into()),
                "agent.allow: \"3000\" is not host:port",
            ),
            (|c| c.max_streams = 0, "agent.max_streams: 0"),
        ];
        assert!(valid().validate("flags").is_ok());
        for (edit, want) in cases {
            let mut c = valid();
            edit(&mut c);
            let got = c.validate("flags").unwrap_err().to_string();
            assert!(got.starts_with(&format!("flags: {want}")), "{got} / {want}");
        }
    }

    #[test]
    fn token_file_must_exist_and_hold_something() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "s3cret\n").unwrap();
        let with = |p: PathBuf| AgentConfig {
            token: None,
            token_file: Some(p),
            ..valid()
        };
        assert_eq!(with(good).read_token("flags").unwrap(), "s3cret");
        let e = with(empty).read_token("flags").unwrap_err().to_string();
        assert!(
            e.contains("agent.token_file") && e.contains("is empty"),
            "{e}"
        );
        let e = with(dir.path().join("missing"))
            .read_token("flags")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.token_file") && e.contains("cannot read"),
            "{e}"
        );
    }
}
