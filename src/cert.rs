//! A TLS certificate with its key, parsed and checked from PEM: the key matches the chain's
//! first certificate; the names it covers, its expiry and issuer are read from it. One home for
//! the proxy's HTTPS listener, the configuration checks and the controller.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Why PEM text is not a usable certificate and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate PEM: {0}")]
    Pem(String),
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("certificate: {0}")]
    X509(String),
    #[error("key: {0}")]
    Key(String),
    #[error("the key does not match the certificate")]
    KeyMismatch,
}

/// A certificate chain with its key, and what was read from the first certificate.
#[derive(Debug)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    /// DNS names of its subject alternative names, lower case (`*.` for wildcards).
    pub names: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub issuer: String,
}

impl Cert {
    /// From PEM text: the chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(chain: &[u8], key: &[u8]) -> Result<Self, CertError> {
        // PEM errors quote the offending text, which may be a key: never passed on.
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|_| CertError::Pem("malformed".into()))?;
        let Some(leaf) = chain.first() else {
            return Err(CertError::NoCertificate);
        };
        let Described {
            names,
            not_before,
            not_after,
            issuer,
        } = describe(leaf).map_err(CertError::X509)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|_| CertError::Key("no well-formed PEM private key".into()))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CertError::Key(format!("unsupported ({e})")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| CertError::KeyMismatch)?;
        Ok(Self {
            key: Arc::new(certified),
            names,
            not_before,
            not_after,
            issuer,
        })
    }

    /// From two PEM files ([`read_small_file`]); errors name the file.
    pub fn from_files(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let read = |p: &Path| read_small_file(p).map_err(|e| format!("{}: {e}", p.display()));
        let (chain, key) = (read(cert_file)?, read(key_file)?);
        Self::from_pem(&chain, &key)
            .map_err(|e| format!("{} / {}: {e}", cert_file.display(), key_file.display()))
    }

    /// The chain as PEM, re-encoded from the parsed certificates: only certificates, whatever
    /// else (a key, say) the text it was read from held.
    pub fn chain_pem(&self) -> String {
        use base64::Engine;
        let mut out = String::new();
        for c in &self.key.cert {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
            for line in b64.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(line).unwrap_or_default());
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
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

struct Described {
    names: Vec<String>,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    issuer: String,
}

/// The leaf's DNS names, validity and issuer.
fn describe(leaf: &CertificateDer<'_>) -> Result<Described, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|e| format!("not X.509 ({e})"))?;
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
    let time = |t: x509_parser::time::ASN1Time| {
        DateTime::from_timestamp(t.timestamp(), 0).ok_or("validity out of range")
    };
    Ok(Described {
        names,
        not_before: time(x.validity().not_before)?,
        not_after: time(x.validity().not_after)?,
        issuer: x.issuer().to_string(),
    })
}

/// The key that seals certificate keys in the store: the controller seals what it reads from
/// Secrets, proxies open it; Redis holds no private key in the clear. Derived (SHA-256) from
/// the text of a file both mount from one Secret (e.g. `openssl rand -hex 32`).
#[derive(Clone)]
pub struct StoreKey(Arc<ring::aead::LessSafeKey>);

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

/// Fewer characters than this is not a key worth the name.
const MIN_STORE_KEY_CHARS: usize = 32;

/// The largest certificate, key or credentials file read (a chain of a dozen certificates is
/// far smaller).
pub const MAX_SMALL_FILE: u64 = 256 * 1024;

/// Reads a certificate, key or credentials file: a regular file (a symlink to one is fine, as
/// Kubernetes mounts Secrets) of at most [`MAX_SMALL_FILE`] bytes. A FIFO or a device is
/// refused without blocking on it, a larger file without reading it all.
pub fn read_small_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    file.take(MAX_SMALL_FILE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_SMALL_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SMALL_FILE} bytes"
        )));
    }
    Ok(buf)
}

impl StoreKey {
    /// The key in `http_domain.tls_store_key_file`, if set; an error names the field.
    pub fn from_config(path: Option<&Path>) -> Result<Option<Self>, String> {
        let Some(path) = path else {
            return Ok(None);
        };
        const FIELD: &str = "http_domain.tls_store_key_file";
        let text =
            crate::config::read_secret(path, FIELD, "configuration").map_err(|e| e.to_string())?;
        Self::from_secret(&text)
            .map(Some)
            .map_err(|e| format!("{FIELD} ({}): {e}", path.display()))
    }

    pub fn from_secret(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() < MIN_STORE_KEY_CHARS {
            return Err(format!(
                "holds {} characters; at least {MIN_STORE_KEY_CHARS} (e.g. openssl rand -hex 32)",
                text.len()
            ));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, digest.as_ref())
            .map_err(|_| "cannot make a key".to_string())?;
        Ok(Self(Arc::new(ring::aead::LessSafeKey::new(unbound))))
    }

    /// `plain` sealed for `domain` (which must be given again to open it: a sealed key moved to
    /// another domain's record does not open): base64 of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, domain: &str, plain: &[u8]) -> Result<String, String> {
        use base64::Engine;
        use ring::rand::SecureRandom;
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "no randomness".to_string())?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(domain.as_bytes()),
                &mut buf,
            )
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// What [`StoreKey::seal`] sealed for `domain`; an error when the key, the domain or the
    /// bytes differ.
    pub fn open(&self, domain: &str, sealed: &str) -> Result<Vec<u8>, String> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| "not base64".to_string())?;
        if raw.len() < ring::aead::NONCE_LEN + ring::aead::AES_256_GCM.tag_len() {
            return Err("too short".into());
        }
        let (nonce, rest) = raw.split_at(ring::aead::NONCE_LEN);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| "bad nonce".to_string())?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, ring::aead::Aad::from(domain.as_bytes()), &mut buf)
            .map_err(|_| {
                "does not open with this key for this domain (another key, or altered)".to_string()
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_key_and_domain() {
        let k = StoreKey::from_secret(&"k".repeat(40)).unwrap();
        let other = StoreKey::from_secret(&"o".repeat(40)).unwrap();
        let sealed = k.seal("a.tunnox.net", b"secret key").unwrap();
        assert_eq!(k.open("a.tunnox.net", &sealed).unwrap(), b"secret key");
        assert!(
            k.open("b.tunnox.net", &sealed).is_err(),
            "moved to another domain"
        );
        assert!(other.open("a.tunnox.net", &sealed).is_err(), "another key");
        let mut altered = sealed.into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(
            k.open("a.tunnox.net", std::str::from_utf8(&altered).unwrap())
                .is_err()
        );
        assert!(k.open("a.tunnox.net", "!!").is_err());
        assert!(k.open("a.tunnox.net", "").is_err());
        assert!(StoreKey::from_secret("short").is_err());
    }
}
