//! The TLS server configuration each certificate is served with: ALPN `h2` and `http/1.1`,
//! TLS 1.2 and 1.3, the resumption state (session cache, ticket keys) shared by all of them.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::cert::Cert;

/// What every certificate's configuration shares: resumption state and the crypto provider.
pub struct Shared {
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Shared {
    pub fn new() -> Result<Self, String> {
        Ok(Self {
            sessions: rustls::server::ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::ring::Ticketer::new()
                .map_err(|e| format!("TLS session tickets: {e}"))?,
            provider: crate::tunnel::tls::provider(),
        })
    }

    /// The configuration a handshake for `cert` is finished with.
    pub fn config(&self, cert: &Cert) -> Result<Arc<ServerConfig>, String> {
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(cert.key.clone())));
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        c.session_storage = self.sessions.clone();
        c.ticketer = self.ticketer.clone();
        Ok(Arc::new(c))
    }
}

/// One certificate for every handshake of a configuration.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
