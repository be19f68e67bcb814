//! Single-node ACME (`proxy.acme`, mappings with `tls: {acme: true}`; `docs/https.md`): the
//! proxy orders each such domain's certificate itself and keeps it as files in
//! `proxy.acme.state_dir`, which its HTTPS listener serves like any certificate file (a new one
//! applies to new handshakes within `proxy.tls.reload_interval`). The challenge answers go to
//! the proxy's own memory store and are answered on its plain listener.
//!
//! In `state_dir`: `account-<hash of the directory URL>.json` (the account's credentials, its
//! private key), and per domain `<domain>.crt` (chain), `<domain>.key` and `<domain>.json`
//! (when it was issued and when to renew it). Keys and credentials are written `0600` through
//! a temporary file and a rename, so a reader never sees half a file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::schedule::{self, Budget, Need};
use super::{AccountStore, AcmeError, AcmeMetrics, Certificate, Orders, RETRY_FIRST};
use crate::cert::Cert;
use crate::config::AcmeConfig;
use crate::domain::Hostname;
use crate::store::{Backoff, ChallengeStore};

/// Orders in flight at once (each holds a challenge answer and polls the CA).
const MAX_CONCURRENT_ORDERS: usize = 4;

/// A domain's files in `state_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub meta: PathBuf,
}

impl CertPaths {
    /// A validated host name is lowercase letters, digits, `-` and `.`: a file name as it is.
    pub fn new(dir: &Path, domain: &Hostname) -> Self {
        let at = |ext: &str| dir.join(format!("{}.{ext}", domain.as_str()));
        Self {
            cert: at("crt"),
            key: at("key"),
            meta: at("json"),
        }
    }
}

/// What `<domain>.json` records of an issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub domain: String,
    pub issued_at: DateTime<Utc>,
    pub renew_at: DateTime<Utc>,
}

/// Whether to order `domain`'s certificate now, from what its files hold: `cert` (`None`:
/// missing or unreadable) and `meta` (`None`: missing, unreadable, or for another domain).
pub fn assess(
    domain: &str,
    cert: Option<&Cert>,
    meta: Option<&Meta>,
    now: DateTime<Utc>,
    min_interval: Duration,
) -> Option<Need> {
    let meta = meta.filter(|m| m.domain == domain);
    let usable = cert.filter(|c| c.covers(domain) && !c.expired(now));
    let issued = schedule::Issued {
        usable: usable.is_some(),
        issued_at: meta.map(|m| m.issued_at),
        renew_at: meta
            .map(|m| m.renew_at)
            .or_else(|| usable.map(|c| schedule::renew_at(c.not_before, c.not_after, None, 0.0))),
        renewed_for: None,
    };
    let min = chrono::TimeDelta::from_std(min_interval).unwrap_or(chrono::TimeDelta::hours(1));
    schedule::need(now, issued, None, min)
}

fn read_bounded(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match crate::cert::read_small_file(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `path` as a whole: a new temporary file beside it (mode `0600`, never
/// through a symlink, a name nobody could have prepared), flushed, renamed over `path`, and the
/// directory flushed. A failed write leaves `path` as it was and no temporary file.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// `state_dir`, created `0700` if missing; an existing one is made `0700` (it holds private
/// keys). `Err`: it cannot be used.
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The account's credentials in `state_dir`, one file per directory URL.
pub struct FileAccount {
    path: PathBuf,
}

impl FileAccount {
    pub fn new(dir: &Path, directory_url: &str) -> Self {
        Self {
            path: dir.join(format!(
                "account-{}.json",
                schedule::request_id(directory_url)
            )),
        }
    }
}

#[async_trait::async_trait]
impl AccountStore for FileAccount {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn load(&self) -> Result<Option<String>, String> {
        let bytes = read_bounded(&self.path).map_err(|e| e.to_string())?;
        bytes
            .map(|b| String::from_utf8(b).map_err(|_| "not UTF-8".to_string()))
            .transpose()
    }

    async fn save(&self, credentials: &str) -> Result<(), String> {
        write_private(&self.path, credentials.as_bytes()).map_err(|e| e.to_string())
    }
}

/// A domain this proxy orders for, and when it is looked at next.
struct Tended {
    domain: Hostname,
    paths: CertPaths,
    next: Instant,
    backoff: Option<Backoff>,
}

/// Orders and renews the certificates of the file's `acme: true` mappings.
pub struct FileIssuer {
    pub cfg: AcmeConfig,
    pub domains: Vec<Hostname>,
    pub challenges: Arc<dyn ChallengeStore>,
    pub metrics: AcmeMetrics,
}

impl FileIssuer {
    /// Looks at every domain at once, then each again at `check_interval` (a failed order
    /// after its backoff), until `stop`.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let dir = self.cfg.state_dir();
        while let Err(e) = prepare_dir(&dir) {
            tracing::error!(dir = %dir.display(), error = %e, retry_in = ?self.cfg.check_interval(), "proxy.acme.state_dir cannot be used; no certificate is ordered");
            tokio::select! {
                () = tokio::time::sleep(self.cfg.check_interval()) => {}
                () = crate::proxy::stopped(&mut stop) => return,
            }
        }
        let now = Instant::now();
        let mut tended: Vec<Tended> = self
            .domains
            .iter()
            .map(|d| Tended {
                domain: d.clone(),
                paths: CertPaths::new(&dir, d),
                next: now,
                backoff: None,
            })
            .collect();
        let mut budget = Budget::new(self.cfg.max_orders_per_hour);
        let mut orders: Option<Orders> = None;
        loop {
            let work = self.round(&dir, &mut tended, &mut budget, &mut orders);
            tokio::select! {
                () = work => {}
                () = crate::proxy::stopped(&mut stop) => return,
            }
            let next = tended.iter().map(|t| t.next).min();
            let next = next.unwrap_or_else(|| Instant::now() + self.cfg.check_interval());
            tokio::select! {
                () = tokio::time::sleep_until(next.into()) => {}
                () = crate::proxy::stopped(&mut stop) => return,
            }
        }
    }

    /// Looks at the domains that are due and orders those that need it.
    async fn round(
        &self,
        dir: &Path,
        tended: &mut [Tended],
        budget: &mut Budget,
        orders: &mut Option<Orders>,
    ) {
        let now = Instant::now();
        let interval = self.cfg.check_interval();
        let mut wanted = Vec::new();
        for (i, t) in tended.iter_mut().enumerate() {
            if t.next > now {
                continue;
            }
            t.next = now + interval;
            if let Some(need) = self.need(t) {
                wanted.push((i, need));
            }
        }
        if wanted.is_empty() {
            return;
        }
        let account = match orders {
            Some(o) => o.clone(),
            None => {
                let store = FileAccount::new(dir, &self.cfg.directory_url);
                let ca = "proxy.acme.ca_file";
                match super::account(&self.cfg, ca, &store, self.challenges.clone()).await {
                    Ok(o) => orders.insert(o).clone(),
                    Err(e) => {
                        tracing::warn!(error = %e, directory = %self.cfg.directory_url, "no ACME account; certificates are not ordered");
                        for (i, _) in wanted {
                            self.failed(&mut tended[i], &e);
                        }
                        return;
                    }
                }
            }
        };
        let mut go = Vec::new();
        for (i, need) in wanted {
            match budget.spend(now) {
                Ok(()) => go.push((i, need)),
                Err(wait) => {
                    tracing::warn!(domain = %tended[i].domain, retry_in = ?wait, "the ACME budget (proxy.acme.max_orders_per_hour) is spent");
                    tended[i].next = now + wait;
                }
            }
        }
        let results: Vec<(usize, Result<Certificate, AcmeError>)> =
            futures::stream::iter(go.into_iter().map(|(i, need)| {
                let t = &tended[i];
                let (domain, paths, account) = (t.domain.clone(), t.paths.clone(), &account);
                async move { (i, self.order(account, &domain, &paths, need).await) }
            }))
            .buffer_unordered(MAX_CONCURRENT_ORDERS)
            .collect()
            .await;
        for (i, result) in results {
            match result {
                Ok(_) => tended[i].backoff = None,
                Err(e) => self.failed(&mut tended[i], &e),
            }
        }
    }

    fn failed(&self, t: &mut Tended, e: &AcmeError) {
        let retry_max = self.cfg.retry_max.get();
        let backoff = t
            .backoff
            .get_or_insert_with(|| Backoff::between(RETRY_FIRST, retry_max));
        let wait = e.retry_in(backoff, retry_max);
        t.next = Instant::now() + wait;
        tracing::warn!(domain = %t.domain, error = %e, retry_in = ?wait, "ordering a certificate failed");
    }

    /// What the domain's files say: whether to order now.
    fn need(&self, t: &Tended) -> Option<Need> {
        let cert = Cert::from_files(&t.paths.cert, &t.paths.key)
            .map_err(|e| {
                if t.paths.cert.exists() {
                    tracing::warn!(domain = %t.domain, error = %e, "the ordered certificate's files do not load");
                }
            })
            .ok();
        let meta = read_bounded(&t.paths.meta)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
        assess(
            t.domain.as_str(),
            cert.as_ref(),
            meta.as_ref(),
            Utc::now(),
            self.cfg.min_reorder_interval.get(),
        )
    }

    /// One order, its files written.
    async fn order(
        &self,
        orders: &Orders,
        domain: &Hostname,
        paths: &CertPaths,
        need: Need,
    ) -> Result<Certificate, AcmeError> {
        tracing::info!(%domain, reason = need.as_str(), directory = %self.cfg.directory_url, "ordering a certificate");
        let started = Instant::now();
        let result = async {
            let c = orders.certificate(domain.as_str()).await?;
            let meta = Meta {
                domain: domain.to_string(),
                issued_at: Utc::now(),
                renew_at: c.renew_at,
            };
            let write = |path: &Path, bytes: &[u8]| {
                write_private(path, bytes)
                    .map_err(|e| AcmeError::Failed(format!("writing {}: {e}", path.display())))
            };
            // The key first: the listener loads the pair when the chain changes.
            write(&paths.key, c.key_pem.as_bytes())?;
            write(&paths.cert, c.chain_pem.as_bytes())?;
            write(
                &paths.meta,
                &serde_json::to_vec(&meta).expect("serializable"),
            )?;
            Ok(c)
        }
        .await;
        self.metrics.observe(&result, started.elapsed());
        if let Ok(c) = &result {
            tracing::info!(%domain, not_after = %c.cert.not_after, renew_at = %c.renew_at, took = ?started.elapsed(), "certificate issued");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn paths_are_the_domain_in_the_directory() {
        let d = Hostname::parse("app.example.com").unwrap();
        let p = CertPaths::new(Path::new("/var/acme"), &d);
        assert_eq!(p.cert, Path::new("/var/acme/app.example.com.crt"));
        assert_eq!(p.key, Path::new("/var/acme/app.example.com.key"));
        assert_eq!(p.meta, Path::new("/var/acme/app.example.com.json"));
    }

    #[test]
    fn orders_when_the_files_lack_or_when_due() {
        let hour = Duration::from_secs(3600);
        let now = t("2026-02-01T00:00:00Z");
        let meta = |domain: &str, issued: &str, renew: &str| Meta {
            domain: domain.into(),
            issued_at: t(issued),
            renew_at: t(renew),
        };
        let recent = meta("a.test", "2026-01-31T23:30:00Z", "2026-03-01T00:00:00Z");
        let due = meta("a.test", "2026-01-01T00:00:00Z", "2026-01-20T00:00:00Z");
        let other = meta("b.test", "2026-01-31T23:30:00Z", "2026-03-01T00:00:00Z");
        let cases: [(Option<&Meta>, Option<Need>); 4] = [
            (None, Some(Need::Issue)),
            // No certificate, but one was issued half an hour ago: not again yet.
            (Some(&recent), None),
            (Some(&due), Some(Need::Issue)),
            // Another domain's record is not this one's.
            (Some(&other), Some(Need::Issue)),
        ];
        for (m, want) in cases {
            assert_eq!(assess("a.test", None, m, now, hour), want, "{m:?}");
        }
    }

    #[test]
    fn files_are_written_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.key");
        write_private(&path, b"secret").unwrap();
        write_private(&path, b"again").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"again");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
        // Into a directory that is not there: an error, nothing left behind.
        assert!(write_private(&dir.path().join("none/x.key"), b"k").is_err());
        let big = crate::cert::MAX_SMALL_FILE as usize + 1;
        std::fs::write(&path, vec![b'x'; big]).unwrap();
        assert!(read_bounded(&path).is_err(), "a huge file is refused");
        assert!(read_bounded(&dir.path().join("none")).unwrap().is_none());
        // A FIFO is refused at once, not waited on.
        let fifo = dir.path().join("fifo.key");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(read_bounded(&fifo).is_err());
        // A directory open to others is closed.
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
