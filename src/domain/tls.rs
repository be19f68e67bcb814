//! A mapping's HTTPS settings as the record carries them: where its certificate comes from and
//! whether plain requests are redirected. JSON field names are part of the Redis contract.

use serde::{Deserialize, Serialize};

/// HTTPS for one mapping. Unknown fields are ignored when read (a later source or setting must
/// not make older proxies refuse the record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingTls {
    /// Plain HTTP requests for the domain are answered `308` to the same URL over HTTPS.
    #[serde(default)]
    pub redirect_http: bool,
    pub cert: CertSource,
}

/// Where the certificate and its key are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum CertSource {
    /// PEM files on the proxy's disk, reloaded when they change. Single-node only: honoured
    /// for mappings of the proxy's own configuration file, never for a record from Redis.
    Files { cert_file: String, key_file: String },
    /// Cluster: the chain in PEM and the key's PEM sealed for this domain with the store key
    /// (`crate::cert::StoreKey`); written by the controller from a Secret.
    Sealed {
        chain_pem: String,
        key_sealed: String,
    },
}

/// The largest chain PEM a record carries: a leaf and a few intermediates.
pub const MAX_CHAIN_PEM: usize = 32 * 1024;
/// The largest sealed key: an RSA 8192 key in PEM, sealed and in base64.
pub const MAX_KEY_SEALED: usize = 16 * 1024;

impl MappingTls {
    pub fn validate(&self) -> Result<(), String> {
        match &self.cert {
            CertSource::Files {
                cert_file,
                key_file,
            } => {
                if cert_file.is_empty() || key_file.is_empty() {
                    return Err("cert_file and key_file must both be set".into());
                }
            }
            CertSource::Sealed {
                chain_pem,
                key_sealed,
            } => {
                if chain_pem.len() > MAX_CHAIN_PEM || key_sealed.len() > MAX_KEY_SEALED {
                    return Err(format!(
                        "certificate chain or sealed key too large (at most {MAX_CHAIN_PEM} and {MAX_KEY_SEALED} bytes)"
                    ));
                }
            }
        }
        Ok(())
    }
}
