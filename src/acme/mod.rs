//! ACME (RFC 8555) orders answered through HTTP-01 (`docs/https.md`): an account restored from
//! (or created into) its stored credentials, and one order per domain whose challenge answers
//! go to the store, where every proxy answers them. Nothing here knows Kubernetes: the
//! controller keeps the account and the certificates in Secrets ([`crate::controller`]).

pub mod schedule;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use crate::store::{ChallengeStore, StoreError};

/// The longest message kept from a CA's error (it reaches status and Events).
const MAX_DETAIL: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA said no for now (its `rateLimited` problem): wait long before the next try.
    #[error("rate limited by the ACME server: {0}")]
    RateLimited(String),
    #[error("{0}")]
    Failed(String),
    #[error("the order did not finish within {0:?}")]
    Timeout(Duration),
    #[error("publishing the challenge answer: {0}")]
    Store(#[from] StoreError),
}

impl AcmeError {
    /// A bounded word for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::RateLimited(_) => "rate_limited",
            Self::Failed(_) => "failed",
            Self::Timeout(_) => "timeout",
            Self::Store(_) => "store",
        }
    }
}

/// `s`, cut to what status and Events carry.
pub fn short(s: &str) -> String {
    if s.len() <= MAX_DETAIL {
        return s.to_string();
    }
    let mut end = MAX_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        match &e {
            instant_acme::Error::Api(p)
                if p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":rateLimited")) =>
            {
                Self::RateLimited(short(&e.to_string()))
            }
            _ => Self::Failed(short(&e.to_string())),
        }
    }
}

/// The HTTP client an account talks to its CA with: the CAs in `ca_file` (a private ACME
/// server), else the public roots built in.
pub fn http_client(ca_file: Option<&Path>) -> Result<Box<dyn instant_acme::HttpClient>, String> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = crate::tunnel::tls::load_certs(path, "controller.acme.ca_file")
                .map_err(|e| e.to_string())?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("controller.acme.ca_file {}: {e}", path.display()))?;
            }
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(cfg)
        }
        None => builder
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| e.to_string())?,
    };
    let connector = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Box::new(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, instant_acme::BodyWrapper<bytes::Bytes>>(connector),
    ))
}

/// An account restored from `credentials` (JSON, as [`create_account`] returned them).
pub async fn restore_account(
    credentials: &str,
    http: Box<dyn instant_acme::HttpClient>,
    timeout: Duration,
) -> Result<Account, AcmeError> {
    let creds: instant_acme::AccountCredentials = serde_json::from_str(credentials)
        .map_err(|e| AcmeError::Failed(format!("the stored account credentials: {e}")))?;
    within(timeout, async {
        Ok(Account::builder_with_http(http)
            .from_credentials(creds)
            .await?)
    })
    .await
}

/// A new account on `directory_url` (terms of service agreed), and its credentials as JSON to
/// keep: they hold the account's private key.
pub async fn create_account(
    directory_url: &str,
    email: Option<&str>,
    http: Box<dyn instant_acme::HttpClient>,
    timeout: Duration,
) -> Result<(Account, String), AcmeError> {
    let contact = email.map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.as_deref().into_iter().collect();
    let (account, creds) = within(timeout, async {
        Ok(Account::builder_with_http(http)
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory_url.to_string(),
                None,
            )
            .await?)
    })
    .await?;
    let json = serde_json::to_string(&creds)
        .map_err(|e| AcmeError::Failed(format!("serializing the account credentials: {e}")))?;
    Ok((account, json))
}

/// The directory URL stored credentials were made for (`None`: unreadable).
pub fn credentials_directory(credentials: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(credentials)
        .ok()?
        .get("directory")?
        .as_str()
        .map(str::to_string)
}

async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, AcmeError>>,
) -> Result<T, AcmeError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(AcmeError::Timeout(limit)))
}

/// A certificate issued: its chain and its (P-256) key, PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// Orders certificates for one account, answering HTTP-01 through `challenges`.
#[derive(Clone)]
pub struct Orders {
    pub account: Account,
    pub challenges: Arc<dyn ChallengeStore>,
    /// How long an answer stays in the store (it is removed once the order is decided).
    pub challenge_ttl: Duration,
    /// How long one order may take, from creation to the downloaded certificate.
    pub timeout: Duration,
}

impl Orders {
    /// Orders a certificate for `domain` (a single DNS name), its key a fresh P-256 key.
    pub async fn issue(&self, domain: &str) -> Result<Issued, AcmeError> {
        let deadline = Instant::now() + self.timeout;
        let mut tokens = Vec::new();
        let result = within(self.timeout, self.order(domain, deadline, &mut tokens)).await;
        // The answers are no use once the order is decided (or given up).
        for token in tokens {
            if let Err(e) = self.challenges.remove_challenge(&token).await {
                tracing::debug!(error = %e, "could not remove an ACME challenge answer; it expires");
            }
        }
        result
    }

    async fn order(
        &self,
        domain: &str,
        deadline: Instant,
        tokens: &mut Vec<String>,
    ) -> Result<Issued, AcmeError> {
        let ids = [Identifier::Dns(domain.to_string())];
        let mut order = self.account.new_order(&NewOrder::new(&ids)).await?;
        let mut authorizations = order.authorizations();
        while let Some(auth) = authorizations.next().await {
            let mut auth = auth?;
            match auth.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Failed(format!(
                        "the CA's authorization for {domain} is {other:?}"
                    )));
                }
            }
            let mut challenge = auth.challenge(ChallengeType::Http01).ok_or_else(|| {
                AcmeError::Failed(format!("the CA offers no http-01 challenge for {domain}"))
            })?;
            let answer = challenge.key_authorization();
            self.challenges
                .put_challenge(&challenge.token, answer.as_str(), self.challenge_ttl)
                .await?;
            tokens.push(challenge.token.clone());
            challenge.set_ready().await?;
        }
        let left = |d: Instant| d.saturating_duration_since(Instant::now());
        let retries = |d: Instant| {
            RetryPolicy::new()
                .initial_delay(Duration::from_millis(250))
                .backoff(1.5)
                .timeout(left(d))
        };
        match order.poll_ready(&retries(deadline)).await? {
            OrderStatus::Ready => {}
            status => {
                // Why: the failed challenge's error, as the CA wrote it.
                let mut why = Vec::new();
                let mut authorizations = order.authorizations();
                while let Some(Ok(auth)) = authorizations.next().await {
                    for ch in &auth.challenges {
                        if let Some(e) = &ch.error {
                            why.push(e.to_string());
                        }
                    }
                }
                return Err(AcmeError::Failed(short(&format!(
                    "the order for {domain} is {status:?}: {}",
                    if why.is_empty() {
                        "the CA gave no reason".to_string()
                    } else {
                        why.join("; ")
                    }
                ))));
            }
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries(deadline)).await?;
        Ok(Issued { chain_pem, key_pem })
    }

    /// The CA's suggested renewal window for the first certificate of `chain_pem` (ARI), when
    /// it offers one.
    pub async fn renewal_window(&self, chain_pem: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        use rustls_pki_types::pem::PemObject;
        let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()?
            .ok()?;
        let id = instant_acme::CertificateIdentifier::try_from(&leaf).ok()?;
        let info = match tokio::time::timeout(
            Duration::from_secs(30),
            self.account.renewal_info(&id),
        )
        .await
        {
            Ok(Ok((info, _))) => info,
            Ok(Err(instant_acme::Error::Unsupported(_))) => return None,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "no renewal information from the CA; renewing at two thirds of the lifetime");
                return None;
            }
            Err(_) => return None,
        };
        let window = info.suggested_window;
        Some((
            DateTime::<Utc>::from_timestamp(window.start.unix_timestamp(), 0)?,
            DateTime::<Utc>::from_timestamp(window.end.unix_timestamp(), 0)?,
        ))
    }
}
