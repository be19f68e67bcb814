//! How the proxies speak to a direct target beyond its host and port: the HTTP version
//! (HTTP/1.1, HTTP/2 without TLS, HTTP/2 over TLS, e.g. for gRPC) and whom to trust for TLS.
//! Part of the record (field `upstream`, `docs/redis-schema.md`); absent means HTTP/1.1 with
//! the public roots.

use serde::{Deserialize, Serialize};

/// The largest CA bundle a record carries (PEM).
pub const MAX_CA_PEM: usize = 64 * 1024;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (over TLS when the target's scheme is `https`).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge, without TLS (a gRPC server's plain port).
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`), whatever the target's scheme says.
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
            Self::H2 => "h2",
        }
    }

    pub fn is_http2(self) -> bool {
        !matches!(self, Self::Http1)
    }
}

/// The record's `upstream`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Upstream {
    #[serde(default)]
    pub protocol: Protocol,
    /// CA certificates (PEM) a TLS target is verified with instead of the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// A TLS target's certificate is not verified at all (shown in the mapping's status).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

impl Upstream {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the combination with the target's `tls_target` (scheme `https`): `h2c` has no
    /// TLS, and trust settings need TLS.
    pub fn validate(&self, tls_target: bool) -> Result<(), String> {
        let tls = tls_target || self.protocol == Protocol::H2;
        if self.protocol == Protocol::H2c && tls_target {
            return Err("protocol h2c is HTTP/2 without TLS; for HTTP/2 over TLS use h2".into());
        }
        if !tls && (self.ca_pem.is_some() || self.insecure_skip_verify) {
            return Err(format!(
                "a CA or insecure_skip_verify applies to TLS targets (scheme https or protocol h2), not to protocol {} over plain TCP",
                self.protocol.as_str()
            ));
        }
        if self.ca_pem.is_some() && self.insecure_skip_verify {
            return Err("a CA and insecure_skip_verify together: choose one".into());
        }
        if let Some(pem) = &self.ca_pem {
            if pem.len() > MAX_CA_PEM {
                return Err(format!(
                    "the CA bundle is {} bytes, more than {MAX_CA_PEM}",
                    pem.len()
                ));
            }
            parse_cas(pem)?;
        }
        Ok(())
    }
}

/// The certificates of a PEM CA bundle (at least one).
pub fn parse_cas(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    // PEM errors may quote the text: never passed on.
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "the CA bundle is not well-formed PEM".to_string())?;
    if certs.is_empty() {
        return Err("the CA bundle holds no PEM certificate".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_protocol_and_trust_together() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let up = |protocol, ca_pem: Option<&str>, insecure| Upstream {
            protocol,
            ca_pem: ca_pem.map(str::to_string),
            insecure_skip_verify: insecure,
        };
        // (upstream, scheme https, ok)
        let cases = [
            (up(Protocol::Http1, None, false), false, true),
            (up(Protocol::H2c, None, false), false, true),
            (up(Protocol::H2c, None, false), true, false),
            (up(Protocol::H2, None, false), false, true),
            (up(Protocol::H2, Some(&ca), false), false, true),
            (up(Protocol::Http1, Some(&ca), false), true, true),
            (up(Protocol::Http1, Some(&ca), false), false, false),
            (up(Protocol::H2c, None, true), false, false),
            (up(Protocol::H2, None, true), false, true),
            (up(Protocol::H2, Some(&ca), true), false, false),
            (up(Protocol::H2, Some("garbage"), false), false, false),
            (
                up(Protocol::H2, Some(&"x".repeat(MAX_CA_PEM + 1)), false),
                false,
                false,
            ),
        ];
        for (u, https, ok) in cases {
            assert_eq!(u.validate(https).is_ok(), ok, "{u:?} https={https}");
        }
        assert!(Upstream::default().is_default());
        assert_eq!(
            serde_json::to_string(&up(Protocol::H2c, None, false)).unwrap(),
            r#"{"protocol":"h2c"}"#
        );
    }
}
