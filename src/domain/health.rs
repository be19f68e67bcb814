//! Health checks of a tunnel's local service (frp's `healthCheck`): what to probe, how often,
//! and when the service counts as down. The agent probes (it is the one next to the service);
//! the proxies skip a member whose check fails. Pure: the check's definition and its verdict.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection to the target within the timeout.
    Tcp,
    /// `GET <path>` on the target answered 2xx or 3xx within the timeout.
    Http,
}

/// A check as proxies push it to agents.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// HTTP only: the path asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures before the service counts as down; one success brings it back.
    pub max_failed: u32,
}

/// Defaults (frp's): every 10 s, 3 s to answer, down after 3 failures.
pub const DEFAULT_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;
pub const DEFAULT_MAX_FAILED: u32 = 3;

impl HealthCheck {
    /// Why the check cannot be run, naming the field (relative: `interval`, `path`, ...).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !(1_000..=3_600_000).contains(&self.interval_ms) {
            return Some((
                "interval",
                format!("must be 1s to 1h, got {}ms", self.interval_ms),
            ));
        }
        if self.timeout_ms < 100 || self.timeout_ms > self.interval_ms {
            return Some((
                "timeout",
                format!(
                    "must be at least 100ms and at most the interval ({}ms), got {}ms",
                    self.interval_ms, self.timeout_ms
                ),
            ));
        }
        if !(1..=100).contains(&self.max_failed) {
            return Some((
                "max_failed",
                format!("must be 1-100, got {}", self.max_failed),
            ));
        }
        match (self.kind, &self.path) {
            (CheckKind::Tcp, Some(_)) => Some(("path", "applies to http checks only".into())),
            (CheckKind::Http, Some(p))
                if !p.starts_with('/')
                    || p.len() > 1024
                    || !p.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some((
                    "path",
                    format!(
                        "must start with / and be at most 1024 visible ASCII characters, got {p:?}"
                    ),
                ))
            }
            _ => None,
        }
    }

    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

/// Consecutive results of one check: up until `max_failed` failures in a row, up again at
/// the first success.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    failed: u32,
    down: bool,
}

impl Verdict {
    /// Records one probe; `Some(up)` when the service's state changed.
    pub fn record(&mut self, ok: bool, max_failed: u32) -> Option<bool> {
        if ok {
            self.failed = 0;
            if self.down {
                self.down = false;
                return Some(true);
            }
            return None;
        }
        self.failed = self.failed.saturating_add(1);
        if !self.down && self.failed >= max_failed.max(1) {
            self.down = true;
            return Some(false);
        }
        None
    }

    pub fn is_down(&self) -> bool {
        self.down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        kind: CheckKind,
        path: Option<&str>,
        interval: u64,
        timeout: u64,
        max: u32,
    ) -> HealthCheck {
        HealthCheck {
            kind,
            path: path.map(Into::into),
            interval_ms: interval,
            timeout_ms: timeout,
            max_failed: max,
        }
    }

    #[test]
    fn checks_are_bounded_and_name_the_field() {
        use CheckKind::{Http, Tcp};
        let cases: &[(HealthCheck, Option<&str>)] = &[
            (check(Tcp, None, 10_000, 3_000, 3), None),
            (check(Http, Some("/healthz"), 1_000, 1_000, 1), None),
            (check(Http, None, 10_000, 3_000, 3), None),
            (check(Tcp, None, 999, 500, 3), Some("interval")),
            (check(Tcp, None, 3_600_001, 500, 3), Some("interval")),
            (check(Tcp, None, 1_000, 99, 3), Some("timeout")),
            (check(Tcp, None, 1_000, 2_000, 3), Some("timeout")),
            (check(Tcp, None, 1_000, 500, 0), Some("max_failed")),
            (check(Tcp, None, 1_000, 500, 101), Some("max_failed")),
            (check(Tcp, Some("/x"), 1_000, 500, 3), Some("path")),
            (check(Http, Some("health"), 1_000, 500, 3), Some("path")),
            (check(Http, Some("/a b"), 1_000, 500, 3), Some("path")),
        ];
        for (c, want) in cases {
            assert_eq!(c.problem().map(|p| p.0), *want, "{c:?}");
        }
        let json = serde_json::to_string(&check(Http, Some("/h"), 1_000, 500, 2)).unwrap();
        assert_eq!(
            json,
            r#"{"type":"http","path":"/h","interval_ms":1000,"timeout_ms":500,"max_failed":2}"#
        );
    }

    #[test]
    fn down_after_max_failed_in_a_row_up_at_the_first_success() {
        let mut v = Verdict::default();
        let seq = [
            (false, None),
            (true, None),
            (false, None),
            (false, None),
            (false, Some(false)),
            (false, None),
            (true, Some(true)),
            (true, None),
        ];
        for (i, (ok, want)) in seq.into_iter().enumerate() {
            assert_eq!(v.record(ok, 3), want, "probe {i}");
        }
        let mut once = Verdict::default();
        assert_eq!(once.record(false, 1), Some(false));
        assert!(once.is_down());
    }
}
