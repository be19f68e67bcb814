//! HTTPS termination (`proxy.tls_listen`): the certificate for a handshake is chosen by the
//! name the client sent (SNI), looked up through the same route cache as requests: the
//! mapping's own certificate, else an operator certificate covering the name (exact names
//! before wildcards), else the default one, else the handshake is refused. A name never
//! receives a certificate that was not declared for it: an unknown name gets the operator's
//! or the default certificate, never a tenant's. Certificate files are checked for changes
//! every `proxy.tls.reload_interval`; a new handshake uses a changed file, connections already
//! open keep theirs.

mod config;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConfig;

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::policy::Ctx;
use super::server::Conn;
use crate::cert::{Cert, StoreKey};
use crate::config::{CertFiles, ProxyTlsConfig};
use crate::domain::{CertSource, Declarer, Hostname};
use config::Shared;

/// A certificate loaded from files (`None`: they never loaded), with what tells a change of
/// them.
struct Loaded {
    config: Option<Arc<ServerConfig>>,
    /// The last load failed: tried again every reload interval (logged when the files change).
    failed: bool,
    stamp: Option<(FileStamp, FileStamp)>,
    checked: Instant,
}

/// What tells a change of a file: its modification and change times, size and inode (a
/// `chmod`, or a copy keeping the modification time, changes one of them).
type FileStamp = (SystemTime, i64, u64, u64);

fn stamp(cert_file: &Path, key_file: &Path) -> Option<(FileStamp, FileStamp)> {
    use std::os::unix::fs::MetadataExt;
    let m = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((
            m.modified().ok()?,
            m.ctime_nsec() + m.ctime() * 1_000_000_000,
            m.len(),
            m.ino(),
        ))
    };
    Some((m(cert_file)?, m(key_file)?))
}

/// The operator's certificates by the names they cover, and the default one.
#[derive(Default)]
struct Operator {
    /// Exact names → index into `all`.
    exact: HashMap<String, usize>,
    /// Parent of a wildcard (`*.example.com` → `example.com`) → index into `all`.
    wildcard: HashMap<String, usize>,
    all: Vec<Arc<ServerConfig>>,
    default: Option<Arc<ServerConfig>>,
}

impl Operator {
    fn load(cfg: &ProxyTlsConfig, shared: &Shared) -> Result<Self, String> {
        let mut op = Operator::default();
        for (i, f) in cfg.certificates.iter().enumerate() {
            let at = format!("proxy.tls.certificates[{i}]");
            let cert =
                Cert::from_files(&f.cert_file, &f.key_file).map_err(|e| format!("{at}: {e}"))?;
            let idx = op.all.len();
            op.all
                .push(shared.config(&cert).map_err(|e| format!("{at}: {e}"))?);
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(parent) => op.wildcard.entry(parent.to_string()).or_insert(idx),
                    None => op.exact.entry(name.clone()).or_insert(idx),
                };
            }
        }
        if let Some(f) = &cfg.default {
            let cert = Cert::from_files(&f.cert_file, &f.key_file)
                .map_err(|e| format!("proxy.tls.default: {e}"))?;
            op.default = Some(shared.config(&cert)?);
        }
        Ok(op)
    }

    fn for_name(&self, name: &str) -> Option<Arc<ServerConfig>> {
        let exact = self.exact.get(name);
        let wildcard = || {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent)
        };
        exact.or_else(wildcard).map(|&i| self.all[i].clone())
    }
}

/// Every certificate the HTTPS listener can serve.
pub struct Certs {
    shared: Shared,
    cfg: ProxyTlsConfig,
    operator: RwLock<Arc<Operator>>,
    operator_stamps: Mutex<Vec<Option<(FileStamp, FileStamp)>>>,
    /// Mapping certificates from files (single-node), by (cert_file, key_file).
    files: Mutex<HashMap<(PathBuf, PathBuf), Loaded>>,
    /// Opens the mapping certificates the controller sealed into the store (cluster).
    store_key: Option<StoreKey>,
    /// Those certificates opened, by domain, with the sealed key they were opened from.
    sealed: quick_cache::sync::Cache<Hostname, (Arc<str>, Arc<ServerConfig>)>,
    /// Sealed keys that did not open (logged once each, not at every handshake).
    unopened: quick_cache::sync::Cache<Hostname, Arc<str>>,
}

/// Sealed certificates kept opened: beyond this, the least used are opened again when needed.
const MAX_OPENED: usize = 16 * 1024;

impl Certs {
    /// Loads the operator's certificates; an unreadable or mismatched one is an error naming
    /// its field.
    pub fn new(cfg: &ProxyTlsConfig, store_key: Option<StoreKey>) -> Result<Self, String> {
        let shared = Shared::new()?;
        let operator = Operator::load(cfg, &shared)?;
        let certs = Self {
            shared,
            cfg: cfg.clone(),
            operator: RwLock::new(Arc::new(operator)),
            operator_stamps: Mutex::new(Vec::new()),
            files: Mutex::new(HashMap::new()),
            store_key,
            sealed: quick_cache::sync::Cache::new(MAX_OPENED),
            unopened: quick_cache::sync::Cache::new(MAX_OPENED),
        };
        *certs.operator_stamps.lock().expect("not poisoned") = certs.operator_file_stamps();
        Ok(certs)
    }

    fn operator_files(&self) -> impl Iterator<Item = &CertFiles> {
        self.cfg.certificates.iter().chain(self.cfg.default.iter())
    }

    fn operator_file_stamps(&self) -> Vec<Option<(FileStamp, FileStamp)>> {
        self.operator_files()
            .map(|f| stamp(&f.cert_file, &f.key_file))
            .collect()
    }

    pub fn reload_interval(&self) -> Duration {
        self.cfg.reload_interval.get()
    }

    /// Loads the operator's certificates again if a file changed; a change that does not load
    /// keeps the previous ones (and is logged).
    pub fn reload_operator(&self) {
        let now = self.operator_file_stamps();
        let mut seen = self.operator_stamps.lock().expect("not poisoned");
        if *seen == now {
            return;
        }
        *seen = now;
        match Operator::load(&self.cfg, &self.shared) {
            Ok(op) => {
                *self.operator.write().expect("not poisoned") = Arc::new(op);
                tracing::info!("proxy.tls certificates reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "proxy.tls certificates changed but do not load; keeping the previous ones")
            }
        }
    }

    /// The configuration for a mapping certificate in files, loaded again when the files
    /// changed (checked at most every reload interval). `None` when it never loaded (missing
    /// files, e.g. an ACME certificate not yet issued): logged once per change of the files,
    /// not at every handshake.
    pub fn for_files(&self, cert_file: &Path, key_file: &Path) -> Option<Arc<ServerConfig>> {
        let key = (cert_file.to_path_buf(), key_file.to_path_buf());
        let interval = self.reload_interval();
        {
            let files = self.files.lock().expect("not poisoned");
            if let Some(l) = files.get(&key)
                && l.checked.elapsed() < interval
            {
                return l.config.clone();
            }
        }
        let now = stamp(cert_file, key_file);
        let mut files = self.files.lock().expect("not poisoned");
        if let Some(l) = files.get_mut(&key)
            && l.stamp == now
            && !l.failed
        {
            l.checked = Instant::now();
            return l.config.clone();
        }
        let seen = files.get(&key).is_some_and(|l| l.stamp == now);
        let loaded = Cert::from_files(cert_file, key_file)
            .and_then(|cert| Ok((self.shared.config(&cert)?, cert)));
        match loaded {
            Ok((config, cert)) => {
                if files.get(&key).is_some_and(|l| l.config.is_some()) {
                    tracing::info!(cert_file = %cert_file.display(), not_after = %cert.not_after, "mapping certificate reloaded");
                }
                files.insert(
                    key,
                    Loaded {
                        config: Some(config.clone()),
                        failed: false,
                        stamp: now,
                        checked: Instant::now(),
                    },
                );
                Some(config)
            }
            Err(e) => {
                let previous = files.get(&key).and_then(|l| l.config.clone());
                if !seen {
                    tracing::error!(error = %e, cert_file = %cert_file.display(), kept_previous = previous.is_some(), "mapping certificate does not load; tried again every reload interval");
                }
                files.insert(
                    key,
                    Loaded {
                        config: previous.clone(),
                        failed: true,
                        stamp: now,
                        checked: Instant::now(),
                    },
                );
                previous
            }
        }
    }

    /// The configuration for a certificate the controller sealed for `domain`; `None` without
    /// the store key, or when it does not open or load (logged: the record is the controller's,
    /// and the handshake falls back to the operator's certificates).
    pub fn for_sealed(
        &self,
        domain: &str,
        chain_pem: &str,
        key_sealed: &str,
    ) -> Option<Arc<ServerConfig>> {
        if let Some((seen, config)) = self.sealed.get(domain)
            && &*seen == key_sealed
        {
            return Some(config);
        }
        if self
            .unopened
            .get(domain)
            .is_some_and(|seen| &*seen == key_sealed)
        {
            return None;
        }
        // A route's host, valid when the route was compiled.
        let domain = Hostname::parse(domain).ok()?;
        let domain = &domain;
        let Some(key) = self.store_key.as_ref() else {
            self.unopened.insert(domain.clone(), Arc::from(key_sealed));
            tracing::warn!(%domain, "the store has a certificate for this domain but the proxy has no http_domain.tls_store_key_file: not served");
            return None;
        };
        let opened = key
            .open(domain.as_str(), key_sealed)
            .and_then(|pem| Cert::from_pem(chain_pem.as_bytes(), &pem).map_err(|e| e.to_string()))
            .and_then(|cert| self.shared.config(&cert));
        match opened {
            Ok(config) => {
                self.sealed
                    .insert(domain.clone(), (Arc::from(key_sealed), config.clone()));
                Some(config)
            }
            Err(e) => {
                self.unopened.insert(domain.clone(), Arc::from(key_sealed));
                tracing::warn!(%domain, error = %e, "the certificate in the store does not open; not served");
                None
            }
        }
    }

    /// The operator's certificate for `name`, else the default.
    pub fn fallback(&self, name: Option<&Hostname>) -> Option<Arc<ServerConfig>> {
        let op = self.operator.read().expect("not poisoned").clone();
        name.and_then(|n| op.for_name(n.as_str()))
            .or_else(|| op.default.clone())
    }
}

/// Completes the TLS handshake of a new connection on the HTTPS listener, with the certificate
/// for the name the client sent; `None` (connection closed) when no certificate is for it, the
/// handshake fails or takes longer than `within`.
pub async fn accept(
    ctx: &Ctx,
    certs: &Certs,
    tcp: TcpStream,
    peer: SocketAddr,
    within: Duration,
) -> Option<(TlsStream<TcpStream>, Conn)> {
    let outcome = |label: &str| {
        ctx.metrics.tls_handshakes.with_label_values(&[label]).inc();
    };
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(|e| ("client_hello", e.to_string()))?;
        let sni = start
            .client_hello()
            .server_name()
            .and_then(|n| Hostname::parse(n).ok());
        let Some(config) = choose(ctx, certs, sni.as_ref()).await else {
            return Err(("no_certificate", format!("no certificate for {sni:?}")));
        };
        let stream = start
            .into_stream(config)
            .await
            .map_err(|e| ("handshake", e.to_string()))?;
        Ok((stream, sni))
    };
    match tokio::time::timeout(within, handshake).await {
        Ok(Ok((stream, sni))) => {
            outcome("ok");
            Some((
                stream,
                Conn {
                    peer,
                    secure: true,
                    sni,
                },
            ))
        }
        Ok(Err((label, e))) => {
            outcome(label);
            tracing::debug!(%peer, error = %e, "TLS handshake refused or failed");
            None
        }
        Err(_) => {
            outcome("timeout");
            None
        }
    }
}

/// The configuration for a handshake naming `sni`: the mapping's own certificate, else the
/// operator's for the name, else the default.
async fn choose(ctx: &Ctx, certs: &Certs, sni: Option<&Hostname>) -> Option<Arc<ServerConfig>> {
    if let Some(name) = sni
        && let Ok((route, _)) = ctx.cache.resolve(name).await
        && let Some(tls) = route.tls()
    {
        match &tls.cert {
            // Files are the operator's: only a mapping of the configuration file may name one.
            CertSource::Files {
                cert_file,
                key_file,
            } if ctx.declarer(&route) == Declarer::Operator => {
                if let Some(c) = certs.for_files(Path::new(cert_file), Path::new(key_file)) {
                    return Some(c);
                }
            }
            CertSource::Files { .. } => {}
            CertSource::Sealed {
                chain_pem,
                key_sealed,
            } => {
                if let Some(c) = certs.for_sealed(route.host(), chain_pem, key_sealed) {
                    return Some(c);
                }
            }
        }
    }
    certs.fallback(sni)
}
