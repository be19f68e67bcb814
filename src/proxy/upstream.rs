//! The upstream clients of the general path: two shared ones for HTTP/1.1 with the public roots
//! (every mapping without `upstream`; one per declarer, tenant or operator), and one per route
//! for anything else (HTTP/2 without TLS `h2c`, HTTP/2 over TLS `h2`, a mapping's own trust: a
//! CA bundle or no verification). A route's client lives as long as the route, so its
//! connections are never shared with another mapping: a connection verified for one trust
//! setting is never reused for another, and a mapping whose clients hold an HTTP/2 connection's
//! streams (or stop reading) starves only itself.

use std::sync::{Arc, OnceLock};

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

use super::ProxyBody;
use super::connect::EgressConnector;
use super::forward::ForwardSettings;
use crate::domain::{Declarer, EgressPolicy, Protocol, Upstream};

pub type Connector = hyper_rustls::HttpsConnector<EgressConnector>;
pub type UpstreamClient = Client<Connector, ProxyBody>;

/// The most header bytes (fields and trailers) an HTTP/2 upstream may send in one block
/// (hyper's default, 16 KiB, refuses large cookies or `grpc-status-details-bin`).
const MAX_H2_HEADER_LIST: u32 = 64 * 1024;

/// A route's way of reaching its target, built once per record version.
#[derive(Debug)]
pub struct UpstreamRoute {
    pub protocol: Protocol,
    /// `None`: the public roots.
    trust: Option<Trust>,
    /// Built at the route's first request (a route has one declarer).
    client: OnceLock<UpstreamClient>,
}

struct Trust {
    /// SHA-256 of what the trust was built from: the key of its client.
    id: [u8; 32],
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamRoute {
    fn eq(&self, other: &Self) -> bool {
        self.protocol == other.protocol
            && self.trust.as_ref().map(|t| t.id) == other.trust.as_ref().map(|t| t.id)
    }
}

impl Eq for UpstreamRoute {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl UpstreamRoute {
    /// `None` for the default (HTTP/1.1, public roots): the shared clients serve it.
    pub fn build(u: &Upstream) -> Result<Option<Self>, String> {
        if u.is_default() {
            return Ok(None);
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let trust = if let Some(pem) = &u.ca_pem {
            let mut roots = rustls::RootCertStore::empty();
            for cert in crate::domain::upstream::parse_cas(pem)? {
                roots.add(cert).map_err(|e| format!("the CA bundle: {e}"))?;
            }
            let mut hash = sha2::Sha256::new();
            hash.update(b"ca\0");
            hash.update(pem.as_bytes());
            Some(Trust {
                id: hash.finalize().into(),
                config: Arc::new(builder.with_root_certificates(roots).with_no_client_auth()),
            })
        } else if u.insecure_skip_verify {
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth();
            Some(Trust {
                id: sha2::Sha256::digest(b"insecure").into(),
                config: Arc::new(config),
            })
        } else {
            None
        };
        Ok(Some(Self {
            protocol: u.protocol,
            trust,
            client: OnceLock::new(),
        }))
    }
}

/// `insecureSkipVerify`: any certificate is taken; the handshake's signatures are still
/// checked against it (so the connection is at least to whoever holds that key).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The two shared clients, and what a route's own client is built with.
#[derive(Clone)]
pub struct Clients {
    tenant: UpstreamClient,
    operator: UpstreamClient,
    settings: ForwardSettings,
    policy: Arc<EgressPolicy>,
}

impl Clients {
    pub fn new(settings: ForwardSettings, policy: Arc<EgressPolicy>) -> Self {
        Self {
            tenant: build(&settings, &policy, Declarer::Tenant, Protocol::Http1, None),
            operator: build(
                &settings,
                &policy,
                Declarer::Operator,
                Protocol::Http1,
                None,
            ),
            settings,
            policy,
        }
    }

    /// The client for `who` reaching a target `via` (`None`: HTTP/1.1, public roots).
    pub fn get(&self, who: Declarer, via: Option<&UpstreamRoute>) -> UpstreamClient {
        let Some(via) = via else {
            return match who {
                Declarer::Tenant => self.tenant.clone(),
                Declarer::Operator => self.operator.clone(),
            };
        };
        via.client
            .get_or_init(|| {
                build(
                    &self.settings,
                    &self.policy,
                    who,
                    via.protocol,
                    via.trust.as_ref().map(|t| (*t.config).clone()),
                )
            })
            .clone()
    }
}

fn build(
    s: &ForwardSettings,
    policy: &Arc<EgressPolicy>,
    who: Declarer,
    protocol: Protocol,
    tls: Option<rustls::ClientConfig>,
) -> UpstreamClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match tls {
        Some(config) => builder.with_tls_config(config),
        None => builder.with_webpki_roots(),
    }
    .https_or_http();
    let egress = EgressConnector {
        policy: policy.clone(),
        who,
        timeout: s.connect_timeout,
    };
    let connector = match protocol {
        Protocol::Http1 => builder.enable_http1().wrap_connector(egress),
        Protocol::H2c | Protocol::H2 => builder.enable_http2().wrap_connector(egress),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_idle_timeout(s.idle_timeout)
        .pool_max_idle_per_host(s.max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new());
    if protocol.is_http2() {
        client
            .http2_only(true)
            .http2_max_header_list_size(MAX_H2_HEADER_LIST)
            // One connection carries every stream: keep it between requests.
            .pool_max_idle_per_host(s.max_idle_per_host.max(1))
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .http2_keep_alive_while_idle(false);
    }
    client.build(connector)
}
