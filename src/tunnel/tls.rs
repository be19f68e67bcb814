//! TLS for tunnel sessions: TLS 1.3 only, ALPN `tunnox/1`. The proxy's certificate and key come
//! from PEM files; the agent trusts a CA file or the system's roots. PEM is parsed with the
//! maintained `rustls-pki-types` API. Errors name the file and what is wrong with it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field} {path}: {reason}")]
    File {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Config(String),
}

fn file_err(field: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        field,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file (a chain: leaf first). `field` names the setting.
pub fn load_certs(
    path: &Path,
    field: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(field, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(field, path, e))?;
    if certs.is_empty() {
        return Err(file_err(field, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path, field: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(field, path, e))
}

/// ring's suites with AES-128-GCM first (TLS 1.3's mandatory suite; fewer rounds per byte than
/// AES-256-GCM, which stays allowed): both sides offer it first, so sessions use it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The proxy's tunnel listener: TLS 1.3, ALPN `tunnox/1` required.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(cert_file, "proxy.tunnel.cert_file")?;
    let key = load_key(key_file, "proxy.tunnel.key_file")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            file_err(
                "proxy.tunnel.key_file",
                key_file,
                format!("does not match the certificate or is unusable: {e}"),
            )
        })?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The agent's side: trusts `ca_file` when given, else the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in load_certs(path, "agent.ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| file_err("agent.ca_file", path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::Config(
                    "no system root certificates found; set agent.ca_file (--ca-file)".into(),
                ));
            }
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_offer_aes_128_gcm_first_and_keep_the_others() {
        let suites: Vec<rustls::CipherSuite> =
            provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        for kept in [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            assert!(suites.contains(&kept), "{suites:?}");
        }
    }
}
