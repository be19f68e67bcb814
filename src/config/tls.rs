//! HTTPS settings of the configuration file: the proxy's `tls:` section (operator certificates,
//! the default one, the redirect port) and a mapping's `tls:` (single-node).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::duration::Dur;

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `proxy.tls`: what the HTTPS listener (`proxy.tls_listen`) serves besides the mappings' own
/// certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyTlsConfig {
    /// The HTTPS port clients use, for the `Location` of redirected plain requests (443 is left
    /// out of the URL). The listener's own port differs when a Service maps 443 to it.
    pub redirect_port: u16,
    /// The operator's certificates (e.g. a wildcard for a base domain): a name without a
    /// mapping certificate of its own gets the one whose names cover it, exact names first.
    pub certificates: Vec<CertFiles>,
    /// For any other name (and clients that send none); absent: such handshakes are refused.
    pub default: Option<CertFiles>,
    /// How often certificate files are checked for changes.
    pub reload_interval: Dur,
}

impl Default for ProxyTlsConfig {
    fn default() -> Self {
        Self {
            redirect_port: 443,
            certificates: Vec::new(),
            default: None,
            reload_interval: Dur::secs(2),
        }
    }
}

/// `mappings[].tls` (single-node): the domain's certificate, from files (`cert_file` and
/// `key_file`) or ordered through `proxy.acme` (`acme: true`), and the redirect of plain
/// requests.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingTlsEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acme: bool,
    #[serde(default)]
    pub redirect_http: bool,
}

/// Where a single-node mapping's certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingCert<'a> {
    Files {
        cert_file: &'a Path,
        key_file: &'a Path,
    },
    Acme,
}

impl MappingTlsEntry {
    /// Its certificate's source; `Err` (field, message) unless exactly one is given.
    pub fn cert(&self) -> Result<MappingCert<'_>, (&'static str, String)> {
        match (&self.cert_file, &self.key_file, self.acme) {
            (Some(cert_file), Some(key_file), false) => Ok(MappingCert::Files {
                cert_file,
                key_file,
            }),
            (None, None, true) => Ok(MappingCert::Acme),
            (Some(_), _, true) | (_, Some(_), true) => Err((
                "acme",
                "give cert_file and key_file, or acme: true, not both".into(),
            )),
            (Some(_), None, false) => Err(("key_file", "is missing (cert_file is given)".into())),
            (None, Some(_), false) => Err(("cert_file", "is missing (key_file is given)".into())),
            (None, None, false) => Err((
                "cert_file",
                "is missing: give cert_file and key_file, or acme: true".into(),
            )),
        }
    }
}
