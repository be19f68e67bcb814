//! When an issued certificate is ordered again: pure, so every rule is a table test.

use chrono::{DateTime, Utc};

/// Why a domain's certificate is ordered now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// There is none, or the one issued is not usable (expired, for another name, damaged).
    Issue,
    /// The one issued is served, and its renewal time has come.
    Due,
    /// The one issued is served, and the mapping asks for a new one
    /// (annotation [`RENEW_ANNOTATION`] with a value not yet renewed for).
    Asked,
}

impl Need {
    /// A word for Events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Due => "renewal due",
            Self::Asked => "renewal asked",
        }
    }
}

/// A mapping annotation: a new value orders a new certificate once (e.g. a date, or
/// `kubectl annotate hdm x tunnox.net/renew-certificate="$(date +%s)" --overwrite`).
pub const RENEW_ANNOTATION: &str = "tunnox.net/renew-certificate";

/// When to renew a certificate valid from `not_before` to `not_after`: inside the CA's
/// suggested window (ARI, RFC 9773) when it gives one, at `pick` (0..=1) of the way through it
/// so that many certificates do not renew at once; else at two thirds of the lifetime. Never in
/// the certificate's first hour, never in the last tenth of its lifetime.
pub fn renew_at(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pick: f64,
) -> DateTime<Utc> {
    let lifetime = (not_after - not_before).max(chrono::TimeDelta::zero());
    let default = not_before + lifetime * 2 / 3;
    let at = match window {
        Some((start, end)) if start <= end => {
            let span = (end - start).num_milliseconds() as f64 * pick.clamp(0.0, 1.0);
            start + chrono::TimeDelta::milliseconds(span as i64)
        }
        _ => default,
    };
    // Not in the first hour (a window already past would order again at once, and again),
    // and with a tenth of the lifetime left for retries before expiry.
    let earliest = not_before + (lifetime / 2).min(chrono::TimeDelta::hours(1));
    let latest = not_after - lifetime / 10;
    at.min(latest).max(earliest)
}

/// What is known of a domain's issued certificate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Issued<'a> {
    /// It is served (valid, for this name).
    pub usable: bool,
    /// When it was issued (`None`: no certificate of ours).
    pub issued_at: Option<DateTime<Utc>>,
    pub renew_at: Option<DateTime<Utc>>,
    /// The renewal request it answered ([`request_id`] of the annotation's value).
    pub renewed_for: Option<&'a str>,
}

/// How a renewal request (the annotation's value, which the tenant chooses and may make long)
/// is recorded: a short digest.
pub fn request_id(asked: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(asked.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether to order now. `asked`: the mapping's [`RENEW_ANNOTATION`] now. A request or an
/// unusable certificate waits `min_interval` after the last issuance, so that no tenant can
/// make the controller order again and again.
pub fn need(
    now: DateTime<Utc>,
    issued: Issued<'_>,
    asked: Option<&str>,
    min_interval: chrono::TimeDelta,
) -> Option<Need> {
    // An issuance time in the future (a clock ahead, an edited record) does not hold orders
    // back; no arithmetic that a far date could overflow.
    let recent = issued
        .issued_at
        .is_some_and(|t| t <= now && now - t < min_interval);
    if !issued.usable {
        return (!recent).then_some(Need::Issue);
    }
    if let Some(asked) = asked.filter(|a| !a.is_empty())
        && issued.renewed_for != Some(request_id(asked).as_str())
    {
        return (!recent).then_some(Need::Asked);
    }
    let renew_at = issued.renew_at;
    match renew_at {
        Some(at) if now < at => None,
        _ => Some(Need::Due),
    }
}

/// At most `per_hour` orders started in any hour, all domains together (a CA's limits are per
/// account and per registered domain: one tenant must not spend them for all).
#[derive(Debug)]
pub struct Budget {
    per_hour: usize,
    started: std::collections::VecDeque<std::time::Instant>,
}

impl Budget {
    pub fn new(per_hour: u32) -> Self {
        Self {
            per_hour: per_hour as usize,
            started: std::collections::VecDeque::new(),
        }
    }

    /// Counts an order started at `now`; `Err`: how long until the budget allows the next.
    pub fn spend(&mut self, now: std::time::Instant) -> Result<(), std::time::Duration> {
        let hour = std::time::Duration::from_secs(3600);
        while self
            .started
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= hour)
        {
            self.started.pop_front();
        }
        if self.started.len() >= self.per_hour {
            let oldest = self.started.front().copied().unwrap_or(now);
            return Err((oldest + hour).saturating_duration_since(now));
        }
        self.started.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn renews_inside_the_window_or_at_two_thirds() {
        let nb = t("2026-01-01T00:00:00Z");
        let na = t("2026-04-01T00:00:00Z");
        let w = Some((t("2026-03-01T00:00:00Z"), t("2026-03-03T00:00:00Z")));
        let cases = [
            (None, 0.5, nb + (na - nb) * 2 / 3),
            (w, 0.0, t("2026-03-01T00:00:00Z")),
            (w, 0.5, t("2026-03-02T00:00:00Z")),
            (w, 1.0, t("2026-03-03T00:00:00Z")),
            (w, 7.0, t("2026-03-03T00:00:00Z")),
            // A window ending after expiry: a tenth of the lifetime (9 days) left.
            (
                Some((t("2026-03-31T00:00:00Z"), t("2026-05-01T00:00:00Z"))),
                1.0,
                t("2026-03-23T00:00:00Z"),
            ),
            // A window already past: not in the first hour.
            (
                Some((t("2025-01-01T00:00:00Z"), t("2025-01-02T00:00:00Z"))),
                0.5,
                t("2026-01-01T01:00:00Z"),
            ),
            // A window backwards: ignored.
            (
                Some((t("2026-03-03T00:00:00Z"), t("2026-03-01T00:00:00Z"))),
                0.5,
                nb + (na - nb) * 2 / 3,
            ),
        ];
        for (window, pick, want) in cases {
            assert_eq!(renew_at(nb, na, window, pick), want, "{window:?} {pick}");
        }
    }

    #[test]
    fn orders_when_unusable_asked_or_due_but_not_again_at_once() {
        let now = t("2026-02-01T00:00:00Z");
        let later = Some(t("2026-03-01T00:00:00Z"));
        let past = Some(t("2026-01-15T00:00:00Z"));
        let long_ago = Some(t("2026-01-01T00:00:00Z"));
        let just_now = Some(t("2026-01-31T23:30:00Z"));
        let one = request_id("1");
        let hour = chrono::TimeDelta::hours(1);
        // (usable, issued_at, renew_at, renewed_for, asked, want)
        let cases = [
            (false, None, None, None, None, Some(Need::Issue)),
            (false, long_ago, later, None, None, Some(Need::Issue)),
            // Unusable but issued half an hour ago: wait.
            (false, just_now, later, None, None, None),
            (true, long_ago, later, None, None, None),
            (true, long_ago, past, None, None, Some(Need::Due)),
            (true, long_ago, None, None, None, Some(Need::Due)),
            (true, long_ago, later, None, Some("1"), Some(Need::Asked)),
            (true, long_ago, later, Some(one.as_str()), Some("1"), None),
            (
                true,
                long_ago,
                later,
                Some(one.as_str()),
                Some("2"),
                Some(Need::Asked),
            ),
            (true, long_ago, later, Some(one.as_str()), Some(""), None),
            // Asked again right after an issuance: wait.
            (true, just_now, later, Some(one.as_str()), Some("2"), None),
        ];
        for (usable, issued_at, renew_at, renewed_for, asked, want) in cases {
            let issued = Issued {
                usable,
                issued_at,
                renew_at,
                renewed_for,
            };
            assert_eq!(need(now, issued, asked, hour), want, "{issued:?} {asked:?}");
        }
        assert_eq!(request_id("1").len(), 16);
        assert_ne!(request_id("1"), request_id("2"));
    }

    #[test]
    fn an_issuance_time_in_the_future_does_not_hold_orders_back() {
        let now = t("2026-02-01T00:00:00Z");
        let hour = chrono::TimeDelta::hours(1);
        for issued_at in [
            t("2026-02-01T00:30:00Z"),
            DateTime::<Utc>::MAX_UTC,
            DateTime::<Utc>::MIN_UTC,
        ] {
            let issued = Issued {
                issued_at: Some(issued_at),
                ..Issued::default()
            };
            assert_eq!(
                need(now, issued, None, hour),
                Some(Need::Issue),
                "{issued_at}"
            );
        }
    }

    #[test]
    fn the_budget_allows_so_many_orders_in_any_hour() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut b = Budget::new(2);
        assert_eq!(b.spend(s(0)), Ok(()));
        assert_eq!(b.spend(s(10)), Ok(()));
        assert_eq!(b.spend(s(20)), Err(Duration::from_secs(3580)));
        assert_eq!(b.spend(s(3599)), Err(Duration::from_secs(1)));
        assert_eq!(b.spend(s(3600)), Ok(()), "the first left the hour");
        assert_eq!(b.spend(s(3605)), Err(Duration::from_secs(5)));
        assert_eq!(b.spend(s(3610)), Ok(()));
    }
}
