//! Who may call the admin port's state-changing endpoints (`/drain`): a client connecting over
//! loopback (the preStop hook, in the pod's own network namespace) unless
//! `proxy.admin_trust_loopback` is off, or anyone presenting the bearer token of
//! `proxy.admin_token_file`. Pure: decides from the peer address the kernel reported and the
//! request headers. Metrics and probes are not guarded (docs/security.md).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::config::AdminToken;

/// Why a state-changing admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not from loopback and no `Authorization: Bearer` header.
    NoCredentials,
    /// A bearer token that is not the configured one.
    BadToken,
    /// A bearer token was presented but none is configured: only loopback clients may act.
    NoTokenConfigured,
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::BadToken => "bad_token",
            Self::NoTokenConfigured => "no_token_configured",
        }
    }

    /// 401 asks for credentials; 403 refuses the ones given.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::NoCredentials => http::StatusCode::UNAUTHORIZED,
            Self::BadToken | Self::NoTokenConfigured => http::StatusCode::FORBIDDEN,
        }
    }

    /// A short body for the client; never the token or the configuration's paths.
    pub fn body(&self) -> &'static str {
        match self {
            Self::NoCredentials => {
                "refused: only a loopback client or one with the admin bearer token may do this\n"
            }
            Self::BadToken => "refused: wrong admin bearer token\n",
            Self::NoTokenConfigured => {
                "refused: no admin token is configured; only loopback clients may do this\n"
            }
        }
    }
}

/// The admin port's rule for state-changing requests.
#[derive(Debug, Clone)]
pub struct AdminGuard {
    token: Option<AdminToken>,
    trust_loopback: bool,
}

impl AdminGuard {
    pub fn new(token: Option<AdminToken>, trust_loopback: bool) -> Self {
        Self {
            token,
            trust_loopback,
        }
    }

    /// Allows or refuses a request from `peer` with `headers`.
    ///
    /// A request that names a proxy hop (`Via`, `Forwarded`, `X-Forwarded-For`, tunnox's own
    /// hop count `tunnox-hops`) is not
    /// trusted for arriving over loopback: a proxy on this host relayed it, perhaps one made
    /// to connect here by a hostile mapping (the egress policy refuses that target; this is
    /// the second line).
    pub fn check(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Refusal> {
        let relayed = ["via", "forwarded", "x-forwarded-for", "tunnox-hops"]
            .iter()
            .any(|h| headers.contains_key(*h));
        if self.trust_loopback && is_loopback(peer.ip()) && !relayed {
            return Ok(());
        }
        let Some(presented) = bearer(headers) else {
            return Err(Refusal::NoCredentials);
        };
        match &self.token {
            None => Err(Refusal::NoTokenConfigured),
            Some(t) if t.matches(presented) => Ok(()),
            Some(_) => Err(Refusal::BadToken),
        }
    }
}

/// Loopback, including IPv4 loopback seen through an IPv6 socket (`::ffff:127.0.0.1`).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// The credentials of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn decisions() {
        let token = Some(AdminToken::new("t0k"));
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.9]:5000".parse().unwrap();
        let pod: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let pod6: SocketAddr = "[fd00::3]:5000".parse().unwrap();
        let ok = Ok(());
        use Refusal::*;
        // (case, configured token, trust loopback, peer, headers, decision)
        type Case<'a> = (
            &'a str,
            Option<AdminToken>,
            bool,
            SocketAddr,
            &'a [(&'a str, &'a str)],
            Result<(), Refusal>,
        );
        let cases: &[Case] = &[
            ("loopback trusted", None, true, lo, &[], ok),
            ("ipv6 loopback", None, true, lo6, &[], ok),
            ("mapped loopback", None, true, mapped, &[], ok),
            (
                "another pod, no token configured",
                None,
                true,
                pod,
                &[],
                Err(NoCredentials),
            ),
            (
                "another pod, token configured, none sent",
                token.clone(),
                true,
                pod6,
                &[],
                Err(NoCredentials),
            ),
            (
                "another pod with the token",
                token.clone(),
                true,
                pod,
                &[("authorization", "Bearer t0k")],
                ok,
            ),
            (
                "scheme is case-insensitive",
                token.clone(),
                true,
                pod,
                &[("authorization", "bearer  t0k ")],
                ok,
            ),
            (
                "wrong token",
                token.clone(),
                true,
                pod,
                &[("authorization", "Bearer t0K")],
                Err(BadToken),
            ),
            (
                "basic is not bearer",
                token.clone(),
                true,
                pod,
                &[("authorization", "Basic t0k")],
                Err(NoCredentials),
            ),
            (
                "empty bearer",
                token.clone(),
                true,
                pod,
                &[("authorization", "Bearer ")],
                Err(NoCredentials),
            ),
            (
                "token sent, none configured",
                None,
                true,
                pod,
                &[("authorization", "Bearer x")],
                Err(NoTokenConfigured),
            ),
            (
                "loopback not trusted",
                token.clone(),
                false,
                lo,
                &[],
                Err(NoCredentials),
            ),
            (
                "loopback not trusted, token",
                token.clone(),
                false,
                lo,
                &[("authorization", "Bearer t0k")],
                ok,
            ),
            (
                "relayed by a proxy",
                None,
                true,
                lo,
                &[("x-forwarded-for", "10.9.9.9")],
                Err(NoCredentials),
            ),
            (
                "relayed by a tunnox proxy",
                None,
                true,
                lo,
                &[("tunnox-hops", "1")],
                Err(NoCredentials),
            ),
            (
                "relayed (Via)",
                None,
                true,
                lo,
                &[("via", "1.1 tunnox")],
                Err(NoCredentials),
            ),
            (
                "relayed, with the token",
                token.clone(),
                true,
                lo,
                &[
                    ("forwarded", "for=1.2.3.4"),
                    ("authorization", "Bearer t0k"),
                ],
                ok,
            ),
        ];
        for (name, token, trust, peer, hs, want) in cases {
            let g = AdminGuard::new(token.clone(), *trust);
            assert_eq!(g.check(*peer, &headers(hs)), *want, "{name}");
        }
    }

    #[test]
    fn statuses_and_labels() {
        assert_eq!(Refusal::NoCredentials.status(), 401);
        assert_eq!(Refusal::BadToken.status(), 403);
        assert_eq!(Refusal::NoTokenConfigured.label(), "no_token_configured");
        assert!(!Refusal::BadToken.body().contains("t0k"));
    }
}
