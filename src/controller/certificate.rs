//! Which certificate a mapping's domain is served with (`spec.tls`), decided from the Secret it
//! names: pure, so every refusal is a table test. A usable certificate becomes the record's
//! `tls` (the key sealed with the store key for this domain); anything else leaves the domain
//! without a certificate of its own (the proxies' operator or default certificate, or none) and
//! says why in `CertificateReady`. Other mappings are not affected either way.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;

use crate::cert::{Cert, CertError, StoreKey};
use crate::crd::{MappingTls as TlsSpec, TlsMode};
use crate::domain::{CertSource, Hostname, MappingTls};

/// The largest `tls.key` accepted: an RSA 8192 key in PEM is about 6.5 KiB; sealed and in
/// base64 this stays under the record's limit.
pub use crate::acme::MAX_KEY_PEM;

/// The Secret type whose certificates are served.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// What became of a mapping's certificate.
#[derive(Debug, Clone, PartialEq)]
pub enum CertState {
    Ready {
        not_before: DateTime<Utc>,
        not_after: DateTime<Utc>,
        issuer: String,
        names: Vec<String>,
        /// Something to know although it is served (a renewal failing).
        note: Option<String>,
    },
    NotReady {
        reason: &'static str,
        message: String,
    },
}

/// The record's `tls` for `spec` (`None`: no certificate of its own) and the state to report.
/// `secret` is the Secret `spec.secretName` names in `ns` (looked up by the caller); `key` the
/// store key (`None`: not configured).
pub fn decide(
    spec: &TlsSpec,
    ns: &str,
    secret: Option<&Secret>,
    full: &Hostname,
    key: Option<&StoreKey>,
    now: DateTime<Utc>,
) -> (Option<MappingTls>, CertState) {
    let not_ready = |reason, message: String| (None, CertState::NotReady { reason, message });
    let name = match (spec.mode, &spec.secret_name) {
        (TlsMode::Acme, _) => {
            return not_ready(
                "AcmeNotConfigured",
                "spec.tls.mode acme: the controller has no controller.acme (an ACME directory to order from); use mode secret with a Secret (e.g. from cert-manager)".into(),
            );
        }
        (TlsMode::Secret, None) => {
            return not_ready(
                "SecretNotSet",
                "spec.tls.secretName is required with mode secret".into(),
            );
        }
        (TlsMode::Secret, Some(n)) => n,
    };
    let Some(secret) = secret else {
        if key.is_none() {
            return not_ready("StoreKeyMissing", STORE_KEY_MISSING.into());
        }
        return not_ready(
            "SecretNotFound",
            format!("Secret {ns}/{name} (spec.tls.secretName) does not exist"),
        );
    };
    from_secret(
        secret,
        &format!("Secret {ns}/{name}"),
        full,
        key,
        spec.redirect_http,
        now,
    )
}

pub(crate) const STORE_KEY_MISSING: &str = "the controller has no http_domain.tls_store_key_file: certificates cannot be published to the proxies";

/// The record's `tls` and the state for the certificate in `secret` (`at` names it in
/// messages): what `mode: secret` and `mode: acme` (its issued Secret) share.
pub fn from_secret(
    secret: &Secret,
    at: &str,
    full: &Hostname,
    key: Option<&StoreKey>,
    redirect_http: bool,
    now: DateTime<Utc>,
) -> (Option<MappingTls>, CertState) {
    let not_ready = |reason, message: String| (None, CertState::NotReady { reason, message });
    let Some(key) = key else {
        return not_ready("StoreKeyMissing", STORE_KEY_MISSING.into());
    };
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != TLS_SECRET_TYPE {
        return not_ready(
            "SecretWrongType",
            format!("{at} is of type {kind}, not {TLS_SECRET_TYPE}"),
        );
    }
    let field = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.as_slice())
    };
    let (Some(chain), Some(pem)) = (field("tls.crt"), field("tls.key")) else {
        return not_ready("SecretIncomplete", format!("{at} lacks tls.crt or tls.key"));
    };
    if pem.len() > MAX_KEY_PEM {
        return not_ready(
            "CertificateInvalid",
            format!(
                "{at}: tls.key is {} bytes, more than {MAX_KEY_PEM}",
                pem.len()
            ),
        );
    }
    if chain.len() > crate::domain::tls::MAX_CHAIN_PEM {
        return not_ready(
            "CertificateInvalid",
            format!(
                "{at}: tls.crt is {} bytes, more than {}",
                chain.len(),
                crate::domain::tls::MAX_CHAIN_PEM
            ),
        );
    }
    let cert = match Cert::from_pem(chain, pem) {
        Ok(c) => c,
        Err(CertError::KeyMismatch) => {
            return not_ready(
                "KeyMismatch",
                format!("{at}: tls.key does not match the certificate in tls.crt"),
            );
        }
        Err(e) => {
            return not_ready("CertificateInvalid", format!("{at}: {e}"));
        }
    };
    if !cert.covers(full.as_str()) {
        return not_ready(
            "NameMismatch",
            format!(
                "{at}: the certificate is for [{}], not {full}",
                cert.names.join(", ")
            ),
        );
    }
    if cert.expired(now) {
        return not_ready(
            "CertificateExpired",
            format!("{at}: the certificate expired at {}", cert.not_after),
        );
    }
    // Only the parsed certificates: a key bundled into tls.crt never reaches the store.
    let chain_pem = cert.chain_pem();
    let key_sealed = match key.seal(full.as_str(), pem) {
        Ok(s) => s,
        Err(e) => return not_ready("SealFailed", format!("sealing the key failed: {e}")),
    };
    (
        Some(MappingTls {
            redirect_http,
            cert: CertSource::Sealed {
                chain_pem,
                key_sealed,
            },
        }),
        CertState::Ready {
            not_before: cert.not_before,
            not_after: cert.not_after,
            issuer: cert.issuer,
            names: cert.names,
            note: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    /// A self-signed certificate for `names` (expired when `expired`) and its key, PEM.
    fn issued(names: &[&str], expired: bool) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn secret(kind: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            type_: Some(kind.into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn decides_each_secret_and_seals_only_a_good_certificate() {
        let key = StoreKey::from_secret(&"s".repeat(40)).unwrap();
        let full = Hostname::parse("a.tunnox.net").unwrap();
        let (good, good_key) = issued(&["a.tunnox.net"], false);
        let (wild, wild_key) = issued(&["*.tunnox.net"], false);
        let (other, other_key) = issued(&["b.tunnox.net"], false);
        let (old, old_key) = issued(&["a.tunnox.net"], true);
        let tls = |k: &str, c: &str| secret(TLS_SECRET_TYPE, &[("tls.crt", c), ("tls.key", k)]);
        let spec = |mode, name: Option<&str>| TlsSpec {
            mode,
            secret_name: name.map(str::to_string),
            redirect_http: true,
        };
        let s = spec(TlsMode::Secret, Some("cert"));
        // (spec, secret, store key, want reason)
        let cases: Vec<(TlsSpec, Option<Secret>, Option<&StoreKey>, &str)> = vec![
            (s.clone(), Some(tls(&good_key, &good)), Some(&key), "Ready"),
            (s.clone(), Some(tls(&wild_key, &wild)), Some(&key), "Ready"),
            (
                spec(TlsMode::Acme, None),
                None,
                Some(&key),
                "AcmeNotConfigured",
            ),
            (
                spec(TlsMode::Secret, None),
                None,
                Some(&key),
                "SecretNotSet",
            ),
            (
                s.clone(),
                Some(tls(&good_key, &good)),
                None,
                "StoreKeyMissing",
            ),
            (s.clone(), None, Some(&key), "SecretNotFound"),
            (
                s.clone(),
                Some(secret(
                    "Opaque",
                    &[("tls.crt", &good), ("tls.key", &good_key)],
                )),
                Some(&key),
                "SecretWrongType",
            ),
            (
                s.clone(),
                Some(secret(TLS_SECRET_TYPE, &[("tls.crt", &good)])),
                Some(&key),
                "SecretIncomplete",
            ),
            (
                s.clone(),
                Some(tls(&good_key, "garbage")),
                Some(&key),
                "CertificateInvalid",
            ),
            (
                s.clone(),
                Some(tls(&other_key, &good)),
                Some(&key),
                "KeyMismatch",
            ),
            (
                s.clone(),
                Some(tls(&other_key, &other)),
                Some(&key),
                "NameMismatch",
            ),
            (
                s.clone(),
                Some(tls(&old_key, &old)),
                Some(&key),
                "CertificateExpired",
            ),
        ];
        // A key bundled into tls.crt passes, and never reaches the record.
        let bundle = format!("{good}{good_key}");
        let huge = format!("{good_key}{}", " ".repeat(MAX_KEY_PEM));
        let one_line = good_key.replace('\n', "\\n");
        let cases: Vec<_> = cases
            .into_iter()
            .chain([
                (
                    s.clone(),
                    Some(tls(&good_key, &bundle)),
                    Some(&key),
                    "Ready",
                ),
                (
                    s.clone(),
                    Some(tls(&huge, &good)),
                    Some(&key),
                    "CertificateInvalid",
                ),
                (
                    s.clone(),
                    Some(tls(&one_line, &good)),
                    Some(&key),
                    "CertificateInvalid",
                ),
            ])
            .collect();
        let key_line = good_key.lines().nth(1).unwrap().to_string();
        for (spec, secret, store_key, want) in cases {
            let (record, state) =
                decide(&spec, "team", secret.as_ref(), &full, store_key, Utc::now());
            let got = match &state {
                CertState::Ready { .. } => "Ready",
                CertState::NotReady { reason, .. } => reason,
            };
            assert_eq!(got, want, "{state:?}");
            if let CertState::NotReady { message, .. } = &state {
                // Never a key's text (or its bytes) in a message anyone may read.
                assert!(
                    !message.contains(&key_line[..20]) && !message.contains("[45,"),
                    "{message}"
                );
            }
            match (record, want) {
                (Some(r), "Ready") => {
                    assert!(r.redirect_http);
                    let CertSource::Sealed {
                        chain_pem,
                        key_sealed,
                    } = r.cert
                    else {
                        panic!("sealed");
                    };
                    assert!(chain_pem.contains("BEGIN CERTIFICATE"));
                    assert!(!chain_pem.contains("PRIVATE KEY"), "no key in the chain");
                    assert!(
                        !key_sealed.contains("PRIVATE KEY"),
                        "sealed, not in the clear"
                    );
                    let opened = key.open(full.as_str(), &key_sealed).unwrap();
                    assert!(String::from_utf8(opened).unwrap().contains("PRIVATE KEY"));
                }
                (None, w) if w != "Ready" => {}
                (r, w) => panic!("{w}: record {r:?}"),
            }
        }
    }
}
