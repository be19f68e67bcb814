//! The agent's allow-list: which local `host:port` targets a forwarded stream may reach. Pure;
//! the one place a `tunnox-target` value is judged. A target is served only when it equals an
//! entry (host compared case-insensitively, `localhost` ≠ `127.0.0.1` unless both are listed), so
//! a compromised control plane cannot make the agent reach anything else, and nothing outside
//! the list is ever resolved.

use crate::config::agent::split_host_port;

/// Why a target is refused (`tunnox-error` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing, or not `host:port`.
    BadTarget,
    /// Well-formed but not in the list.
    NotAllowed,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::BadTarget => "bad_target",
            Self::NotAllowed => "not_allowed",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// Lower-case host, as written otherwise (no brackets for IPv6).
    host: String,
    port: u16,
    /// What the agent dials: the entry as configured.
    dial: String,
}

#[derive(Debug, Clone, Default)]
pub struct AllowList {
    entries: Vec<Entry>,
}

impl AllowList {
    /// From validated `host:port` entries; an entry that is not one is skipped (validation
    /// refuses such a configuration before this is built).
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        let entries = entries
            .iter()
            .filter_map(|e| {
                let raw = e.as_ref();
                let (host, port) = split_host_port(raw)?;
                Some(Entry {
                    host: host.to_ascii_lowercase(),
                    port,
                    dial: raw.to_string(),
                })
            })
            .collect();
        Self { entries }
    }

    /// The address to dial for `target` (a `tunnox-target` value), or why not.
    pub fn check(&self, target: Option<&str>) -> Result<&str, Refusal> {
        let (host, port) = target
            .and_then(|t| split_host_port(t.trim()))
            .ok_or(Refusal::BadTarget)?;
        self.entries
            .iter()
            .find(|e| e.port == port && e.host.eq_ignore_ascii_case(host))
            .map(|e| e.dial.as_str())
            .ok_or(Refusal::NotAllowed)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_entries_pass() {
        let list = AllowList::new(&[
            "localhost:3000",
            "192.168.1.100:8080",
            "[::1]:9000",
            "Api.Local:80",
        ]);
        let cases: &[(Option<&str>, Result<&str, Refusal>)] = &[
            (Some("localhost:3000"), Ok("localhost:3000")),
            (Some("LOCALHOST:3000"), Ok("localhost:3000")),
            (Some("api.local:80"), Ok("Api.Local:80")),
            (Some("192.168.1.100:8080"), Ok("192.168.1.100:8080")),
            (Some("[::1]:9000"), Ok("[::1]:9000")),
            // Same service, other spelling: not listed, not served.
            (Some("127.0.0.1:3000"), Err(Refusal::NotAllowed)),
            (Some("localhost:3001"), Err(Refusal::NotAllowed)),
            (Some("192.168.1.101:8080"), Err(Refusal::NotAllowed)),
            (Some("[::1]:3000"), Err(Refusal::NotAllowed)),
            (Some("localhost.:3000"), Err(Refusal::NotAllowed)),
            (Some("evil.com:3000"), Err(Refusal::NotAllowed)),
            (None, Err(Refusal::BadTarget)),
            (Some(""), Err(Refusal::BadTarget)),
            (Some("localhost"), Err(Refusal::BadTarget)),
            (Some("localhost:3000/x"), Err(Refusal::BadTarget)),
            (Some("localhost:03000x"), Err(Refusal::BadTarget)),
            (Some("user@localhost:3000"), Err(Refusal::BadTarget)),
        ];
        for (target, want) in cases {
            assert_eq!(list.check(*target), *want, "{target:?}");
        }
        assert!(
            AllowList::new::<&str>(&[])
                .check(Some("localhost:3000"))
                .is_err()
        );
        assert_eq!(Refusal::NotAllowed.label(), "not_allowed");
    }
}
