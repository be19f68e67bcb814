//! ACME (RFC 8555) orders answered through HTTP-01 (`docs/https.md`): an account restored from
//! (or created into) its stored credentials, and one order per domain whose challenge answers
//! go to the store, where every proxy answers them. Nothing here knows Kubernetes: the
//! controller keeps the account and the certificates in Secrets ([`crate::controller`]), a
//! single-node proxy in files ([`files`]).

pub mod files;
pub mod schedule;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use crate::cert::Cert;
use crate::config::AcmeConfig;
use crate::store::{Backoff, ChallengeStore, StoreError};

/// The first wait after a failed order; each next one is 1.5 times as long, up to
/// `retry_max`.
pub const RETRY_FIRST: Duration = Duration::from_secs(60);
/// The longest private key PEM taken from a CA (or a Secret): a P-256 or RSA-4096 key is far
/// smaller.
pub const MAX_KEY_PEM: usize = 10 * 1024;

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
    /// How long to wait before ordering for the domain again: the next step of `backoff`, or
    /// `retry_max` at once for a CA's rate limit.
    pub fn retry_in(&self, backoff: &mut Backoff, retry_max: Duration) -> Duration {
        match self {
            Self::RateLimited(_) => retry_max,
            _ => backoff.next_delay(),
        }
    }

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
pub fn http_client(
    ca_file: Option<&Path>,
    field: &'static str,
) -> Result<Box<dyn instant_acme::HttpClient>, String> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = match ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = crate::tunnel::tls::load_certs(path, field).map_err(|e| e.to_string())?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{field} {}: {e}", path.display()))?;
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

/// Where an account's credentials (JSON holding its private key) are kept: a Secret in the
/// cluster, a file in single-node mode.
#[async_trait::async_trait]
pub trait AccountStore: Send + Sync {
    /// Where, for messages (`Secret ns/name`, `file /path`).
    fn describe(&self) -> String;
    /// The credentials kept, if any.
    async fn load(&self) -> Result<Option<String>, String>;
    async fn save(&self, credentials: &str) -> Result<(), String>;
}

/// The account `cfg` orders with: restored from `store` when it holds credentials for the same
/// directory, else created there (again when the directory changed). `ca_field`: where
/// `cfg.ca_file` was given, for errors.
pub async fn account(
    cfg: &AcmeConfig,
    ca_field: &'static str,
    store: &dyn AccountStore,
    challenges: Arc<dyn ChallengeStore>,
) -> Result<Orders, AcmeError> {
    let timeout = cfg.order_timeout.get();
    let http = || http_client(cfg.ca_file.as_deref(), ca_field).map_err(AcmeError::Failed);
    let at = store.describe();
    let stored = store
        .load()
        .await
        .map_err(|e| AcmeError::Failed(format!("reading {at}: {e}")))?
        .filter(|c| credentials_directory(c).as_deref() == Some(&cfg.directory_url));
    let account = match stored {
        Some(c) => restore_account(&c, http()?, timeout)
            .await
            .map_err(|e| AcmeError::Failed(format!("the account in {at}: {e}")))?,
        None => {
            let (account, creds) =
                create_account(&cfg.directory_url, cfg.email.as_deref(), http()?, timeout).await?;
            store
                .save(&creds)
                .await
                .map_err(|e| AcmeError::Failed(format!("writing {at}: {e}")))?;
            tracing::info!(directory = %cfg.directory_url, kept_in = %at, "created an ACME account");
            account
        }
    };
    Ok(Orders {
        account,
        challenges,
        challenge_ttl: cfg.challenge_ttl.get(),
        timeout,
    })
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

/// A certificate issued and checked: it loads, its key matches, it covers the domain, it fits
/// what the store carries; with the time to order its successor.
pub struct Certificate {
    pub cert: Cert,
    /// The chain as served (PEM).
    pub chain_pem: String,
    pub key_pem: String,
    pub renew_at: DateTime<Utc>,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("names", &self.cert.names)
            .field("not_after", &self.cert.not_after)
            .field("renew_at", &self.renew_at)
            .finish_non_exhaustive()
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

    /// [`Self::issue`], then the checks a server would refuse it for (what is not served would
    /// be ordered again and again), and its renewal time: inside the CA's suggested window
    /// (ARI) when it offers one.
    pub async fn certificate(&self, domain: &str) -> Result<Certificate, AcmeError> {
        let issued = self.issue(domain).await?;
        let bad =
            |why: String| AcmeError::Failed(format!("the CA's certificate for {domain}: {why}"));
        let cert = Cert::from_pem(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        if !cert.covers(domain) {
            return Err(bad(format!("it is for [{}]", cert.names.join(", "))));
        }
        let chain_pem = cert.chain_pem();
        if chain_pem.len() > crate::domain::tls::MAX_CHAIN_PEM || issued.key_pem.len() > MAX_KEY_PEM
        {
            return Err(bad("the chain or key is larger than the store takes".into()));
        }
        let window = self.renewal_window(&issued.chain_pem).await;
        let renew_at = schedule::renew_at(
            cert.not_before,
            cert.not_after,
            window,
            rand::random::<f64>(),
        );
        Ok(Certificate {
            cert,
            chain_pem,
            key_pem: issued.key_pem,
            renew_at,
        })
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

/// The ACME metrics of whoever orders (`tunnox_controller_acme_*`, `tunnox_proxy_acme_*`).
#[derive(Clone)]
pub struct AcmeMetrics {
    /// Orders by result: `issued`, or [`AcmeError::label`].
    pub orders: prometheus::IntCounterVec,
    pub order_seconds: prometheus::Histogram,
}

impl AcmeMetrics {
    /// The metrics, registered in `registry` with names starting `prefix` (empty when the
    /// registry adds its own).
    pub fn register(registry: &prometheus::Registry, prefix: &str) -> Self {
        let orders = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                format!("{prefix}acme_orders_total"),
                "ACME certificate orders by result",
            ),
            &["result"],
        )
        .expect("valid");
        let order_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                format!("{prefix}acme_order_duration_seconds"),
                "Time from an ACME order's start to its certificate kept, or its failure",
            )
            .buckets(vec![0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
        )
        .expect("valid");
        registry
            .register(Box::new(orders.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(order_seconds.clone()))
            .expect("unique metric");
        Self {
            orders,
            order_seconds,
        }
    }

    pub fn observe(&self, result: &Result<impl Sized, AcmeError>, took: Duration) {
        let label = match result {
            Ok(_) => "issued",
            Err(e) => e.label(),
        };
        self.orders.with_label_values(&[label]).inc();
        self.order_seconds.observe(took.as_secs_f64());
    }
}
