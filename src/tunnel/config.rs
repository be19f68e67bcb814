//! The configuration a proxy pushes to an agent and what the agent answers (seed 003's
//! `ClientConfig` and `LastConfigHash`): the client's tunnels with one hash over them, and the
//! hash the agent applied with the tunnels it refuses and why. Pure: building, hashing,
//! and bounding what the other side sent.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::msg::{Kind, Message};

/// Most tunnels one push carries (a TunnelSet holds at most 256).
pub const MAX_TUNNELS: usize = 256;
/// Longest reason an agent may give for refusing a tunnel; longer ones are cut.
pub const MAX_REASON: usize = 200;
/// Refusals kept from one acknowledgement (the rest only in the agent's log): the session's
/// record, rewritten at every heartbeat, stays small.
pub const MAX_KEPT_REFUSALS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// One tunnel as the agent sees it: a name and the local target it carries to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PushedTunnel {
    pub name: String,
    #[serde(rename = "type")]
    pub transport: Transport,
    /// `host:port` the agent dials.
    pub target: String,
    /// Probed by the agent; a failing one takes the tunnel out of its group's rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::domain::HealthCheck>,
}

#[cfg(test)]
impl PushedTunnel {
    /// A TCP tunnel without a health check (tests).
    pub fn tcp(name: &str, target: &str) -> Self {
        Self {
            name: name.into(),
            transport: Transport::Tcp,
            target: target.into(),
            health_check: None,
        }
    }
}

/// proxy → agent: every tunnel of the client, sorted by name, and their hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPush {
    pub hash: String,
    pub tunnels: Vec<PushedTunnel>,
}

impl Message for ConfigPush {
    const KIND: Kind = Kind::ConfigPush;
}

impl ConfigPush {
    /// The configuration of `tunnels` (any order): sorted by name, hashed.
    pub fn new(mut tunnels: Vec<PushedTunnel>) -> Self {
        tunnels.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.target.cmp(&b.target)));
        tunnels.dedup();
        Self {
            hash: hash_of(&tunnels),
            tunnels,
        }
    }

    /// Whether the hash is the one of the tunnels it carries (a push is believed only then).
    pub fn consistent(&self) -> bool {
        self.tunnels.len() <= MAX_TUNNELS && self.hash == hash_of(&self.tunnels)
    }
}

/// `sha256:` and the first 16 hex digits of SHA-256 over the tunnels' JSON: the same tunnels
/// give the same hash on every proxy.
fn hash_of(tunnels: &[PushedTunnel]) -> String {
    let json = serde_json::to_vec(tunnels).unwrap_or_default();
    let digest = Sha256::digest(&json);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A tunnel the agent will not carry, and why (shown in the TunnelSet's status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// agent → proxy: the configuration hash applied and the tunnels refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ConfigAck {
    pub hash: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejected>,
}

impl Message for ConfigAck {
    const KIND: Kind = Kind::ConfigAck;
}

impl ConfigAck {
    /// What an agent sent, bounded before it is kept or written to the store: a hash of the
    /// form this protocol makes, at most [`MAX_TUNNELS`] rejections with DNS-label names, each
    /// reason cut at [`MAX_REASON`] bytes. Otherwise why not.
    pub fn bounded(mut self) -> Result<Self, String> {
        let hash_ok = self.hash.len() == 23
            && self
                .hash
                .strip_prefix("sha256:")
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !hash_ok {
            return Err(format!(
                "ConfigAck hash {:?} is not sha256:<16 hex digits>",
                cut(&self.hash, 40)
            ));
        }
        if self.rejected.len() > MAX_TUNNELS {
            return Err(format!(
                "ConfigAck rejects {} tunnels, more than {MAX_TUNNELS}",
                self.rejected.len()
            ));
        }
        self.rejected.truncate(MAX_KEPT_REFUSALS);
        for r in &mut self.rejected {
            if !tunnel_name(&r.name) {
                return Err(format!(
                    "ConfigAck names tunnel {:?}, not a tunnel name",
                    cut(&r.name, 70)
                ));
            }
            r.reason = cut(&r.reason, MAX_REASON)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
        }
        Ok(self)
    }
}

/// A tunnel whose health check fails on the agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Down {
    pub name: String,
    pub target: String,
}

/// agent → proxy: every tunnel whose health check fails now (the whole set, on every change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Health {
    #[serde(default)]
    pub down: Vec<Down>,
}

impl Message for Health {
    const KIND: Kind = Kind::Health;
}

impl Health {
    /// What an agent sent, bounded: at most [`MAX_TUNNELS`] entries, tunnel names, targets of
    /// at most 300 bytes. Otherwise why not.
    pub fn bounded(self) -> Result<Self, String> {
        if self.down.len() > MAX_TUNNELS {
            return Err(format!(
                "Health names {} tunnels, more than {MAX_TUNNELS}",
                self.down.len()
            ));
        }
        for d in &self.down {
            if !tunnel_name(&d.name) {
                return Err(format!(
                    "Health names tunnel {:?}, not a tunnel name",
                    cut(&d.name, 70)
                ));
            }
            if d.target.is_empty()
                || d.target.len() > 300
                || !d.target.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "Health names target {:?}, not host:port",
                    cut(&d.target, 70)
                ));
            }
        }
        Ok(self)
    }
}

fn tunnel_name(n: &str) -> bool {
    (1..=63).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, target: &str) -> PushedTunnel {
        PushedTunnel::tcp(name, target)
    }

    #[test]
    fn the_same_tunnels_give_the_same_hash_in_any_order() {
        let a = ConfigPush::new(vec![t("ssh", "localhost:22"), t("db", "localhost:5432")]);
        let b = ConfigPush::new(vec![t("db", "localhost:5432"), t("ssh", "localhost:22")]);
        assert_eq!(a, b);
        assert_eq!(a.tunnels[0].name, "db");
        assert!(
            a.hash.starts_with("sha256:") && a.hash.len() == 23,
            "{}",
            a.hash
        );
        assert!(a.consistent());
        let moved = ConfigPush::new(vec![t("db", "localhost:5433"), t("ssh", "localhost:22")]);
        assert_ne!(a.hash, moved.hash, "a changed local port changes the hash");
        let mut udp = a.clone();
        udp.tunnels[0].transport = Transport::Udp;
        assert!(
            !udp.consistent(),
            "a hash that is not the tunnels' is not believed"
        );
        assert_eq!(ConfigPush::new(vec![]).hash, ConfigPush::new(vec![]).hash);
        let json = serde_json::to_string(&a.tunnels[0]).unwrap();
        assert_eq!(
            json,
            r#"{"name":"db","type":"tcp","target":"localhost:5432"}"#
        );
    }

    #[test]
    fn an_ack_is_bounded_before_it_is_kept() {
        let good = ConfigPush::new(vec![]).hash;
        let ack = |hash: &str, rejected: Vec<Rejected>| ConfigAck {
            hash: hash.into(),
            rejected,
        };
        let r = |name: &str, reason: &str| Rejected {
            name: name.into(),
            reason: reason.into(),
        };
        let cases: Vec<(ConfigAck, Option<&str>)> = vec![
            (ack(&good, vec![]), None),
            (ack("", vec![]), Some("is not sha256")),
            (
                ack("sha256:zz00000000000000", vec![]),
                Some("is not sha256"),
            ),
            (ack(&"x".repeat(10_000), vec![]), Some("is not sha256")),
            (
                ack(&good, vec![r("Bad Name", "x")]),
                Some("not a tunnel name"),
            ),
            (ack(&good, vec![r("", "x")]), Some("not a tunnel name")),
            (
                ack(&good, vec![r("db", "x"); MAX_TUNNELS + 1]),
                Some("more than 256"),
            ),
        ];
        for (a, want) in cases {
            let got = a.clone().bounded();
            match want {
                None => assert!(got.is_ok(), "{a:?}: {got:?}"),
                Some(w) => {
                    let e = got.expect_err("refused");
                    assert!(e.contains(w), "{e}");
                    assert!(e.len() < 200, "the error stays short: {e}");
                }
            }
        }
        let long = ack(
            &good,
            vec![r("db", &format!("a\nb\u{7}{}", "é".repeat(300)))],
        )
        .bounded()
        .unwrap();
        assert!(long.rejected[0].reason.len() <= MAX_REASON);
        assert!(!long.rejected[0].reason.chars().any(char::is_control));
    }

    #[test]
    fn a_health_report_is_bounded() {
        let d = |name: &str, target: &str| Down {
            name: name.into(),
            target: target.into(),
        };
        assert!(
            Health {
                down: vec![d("web", "127.0.0.1:80")]
            }
            .bounded()
            .is_ok()
        );
        assert!(Health::default().bounded().is_ok());
        for (bad, says) in [
            (vec![d("Web", "127.0.0.1:80")], "not a tunnel name"),
            (vec![d("web", "")], "not host:port"),
            (vec![d("web", &"x".repeat(301))], "not host:port"),
            (vec![d("web", "a b:1")], "not host:port"),
            (vec![d("web", "a:1"); MAX_TUNNELS + 1], "more than 256"),
        ] {
            let e = Health { down: bad }.bounded().unwrap_err();
            assert!(e.contains(says) && e.len() < 200, "{e}");
        }
    }
}
