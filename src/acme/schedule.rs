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
/// so that many certificates do not renew at once; else at two thirds of the lifetime. A
/// window the certificate has already passed, or that ends after expiry, is clamped to the
/// lifetime.
pub fn renew_at(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pick: f64,
) -> DateTime<Utc> {
    let lifetime = (not_after - not_before).max(chrono::TimeDelta::zero());
    let default = not_before + lifetime * 2 / 3;
    let Some((start, end)) = window else {
        return default;
    };
    if end < start {
        return default;
    }
    let span = (end - start).num_milliseconds() as f64 * pick.clamp(0.0, 1.0);
    let at = start + chrono::TimeDelta::milliseconds(span as i64);
    at.min(not_after)
}

/// Whether to order now. `usable`: the issued certificate is served (valid, for this name);
/// `renew_at`: its renewal time; `renewed_for`: the annotation value its order answered;
/// `asked`: the mapping's annotation value now.
pub fn need(
    now: DateTime<Utc>,
    usable: bool,
    renew_at: Option<DateTime<Utc>>,
    renewed_for: Option<&str>,
    asked: Option<&str>,
) -> Option<Need> {
    if !usable {
        return Some(Need::Issue);
    }
    if let Some(asked) = asked.filter(|a| !a.is_empty())
        && renewed_for != Some(asked)
    {
        return Some(Need::Asked);
    }
    match renew_at {
        Some(at) if now < at => None,
        _ => Some(Need::Due),
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
            // A window ending after expiry: never later than expiry.
            (
                Some((t("2026-03-31T00:00:00Z"), t("2026-05-01T00:00:00Z"))),
                1.0,
                na,
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
    fn orders_when_unusable_asked_or_due() {
        let now = t("2026-02-01T00:00:00Z");
        let later = Some(t("2026-03-01T00:00:00Z"));
        let past = Some(t("2026-01-15T00:00:00Z"));
        let cases = [
            (false, later, None, None, Some(Need::Issue)),
            (true, later, None, None, None),
            (true, past, None, None, Some(Need::Due)),
            (true, None, None, None, Some(Need::Due)),
            (true, later, None, Some("1"), Some(Need::Asked)),
            (true, later, Some("1"), Some("1"), None),
            (true, later, Some("1"), Some("2"), Some(Need::Asked)),
            (true, later, Some("1"), Some(""), None),
            (false, later, Some("1"), Some("1"), Some(Need::Issue)),
        ];
        for (usable, at, renewed_for, asked, want) in cases {
            assert_eq!(
                need(now, usable, at, renewed_for, asked),
                want,
                "{usable} {at:?} {renewed_for:?} {asked:?}"
            );
        }
    }
}
