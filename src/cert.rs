//! A TLS certificate with its key, parsed and checked from PEM: the key matches the chain's
//! first certificate; the names it covers, its expiry and issuer are read from it. One home for
//! the proxy's HTTPS listener, the configuration checks and the controller.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate chain with its key, and what was read from the first certificate.
#[derive(Debug)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    /// DNS names of its subject alternative names, lower case (`*.` for wildcards).
    pub names: Vec<String>,
    pub not_after: DateTime<Utc>,
    pub issuer: String,
}

impl Cert {
    /// From PEM text: the chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(chain: &[u8], key: &[u8]) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate PEM: {e}"))?;
        let Some(leaf) = chain.first() else {
            return Err("holds no PEM certificate".into());
        };
        let (names, not_after, issuer) = describe(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key PEM: {e}"))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("key: unsupported ({e})"))?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|_| "the key does not match the certificate".to_string())?;
        Ok(Self {
            key: Arc::new(certified),
            names,
            not_after,
            issuer,
        })
    }

    /// From two PEM files; errors name the file.
    pub fn from_files(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let (chain, key) = (read(cert_file)?, read(key_file)?);
        Self::from_pem(&chain, &key)
            .map_err(|e| format!("{} / {}: {e}", cert_file.display(), key_file.display()))
    }

    /// Whether the certificate is valid for `name` (exact or wildcard, as clients judge it).
    pub fn covers(&self, name: &str) -> bool {
        let Ok(server) = ServerName::try_from(name) else {
            return false;
        };
        let Some(leaf) = self.key.cert.first() else {
            return false;
        };
        webpki::EndEntityCert::try_from(leaf)
            .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&server).is_ok())
    }

    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.not_after <= now
    }
}

/// The leaf's DNS names, expiry and issuer.
fn describe(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, DateTime<Utc>, String), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("certificate: not X.509 ({e})"))?;
    let names = x
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_after = DateTime::from_timestamp(x.validity().not_after.timestamp(), 0)
        .ok_or("certificate: expiry out of range")?;
    Ok((names, not_after, x.issuer().to_string()))
}
