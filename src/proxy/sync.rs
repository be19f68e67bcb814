//! Keeps the route cache in step with the store (FR-3, FR-5): warm up in the background, then
//! apply change events in version order via [`Follower`]; retry while the store is unreachable
//! and say how stale the cache may be.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::cache::RouteCache;
use super::drain::Drain;
use super::metrics::ProxyMetrics;
use crate::store::{Follower, MappingStore, SyncUpdate};

/// What other tasks need to know about the sync.
#[derive(Default)]
pub struct SyncState {
    applied: AtomicU64,
    warm: std::sync::atomic::AtomicBool,
}

impl SyncState {
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }
}

pub struct CacheSync {
    pub store: Arc<dyn MappingStore>,
    pub cache: Arc<RouteCache>,
    pub metrics: Arc<ProxyMetrics>,
    pub drain: Arc<Drain>,
    pub state: Arc<SyncState>,
    pub check_every: Duration,
}

const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl CacheSync {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let last_ok = Arc::new(std::sync::Mutex::new(Instant::now()));
        let staleness = tokio::spawn(report_staleness(
            last_ok.clone(),
            self.metrics.clone(),
            self.cache.clone(),
        ));
        tokio::select! {
            _ = self.follow(&last_ok) => {}
            _ = super::stopped(&mut stop) => {}
        }
        staleness.abort();
    }

    async fn follow(&self, last_ok: &std::sync::Mutex<Instant>) {
        let mut delay = RETRY_FIRST;
        loop {
            let started = Instant::now();
            let (mut follower, all) = match Follower::start(self.store.clone(), self.check_every)
                .await
            {
                Ok(ok) => ok,
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot load mappings; serving from the store on demand until it works");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 3 / 2).min(RETRY_MAX);
                    continue;
                }
            };
            let count = all.len();
            self.cache.apply(SyncUpdate::Reset(all));
            let mut catch_ups = 0;
            self.record(&follower, last_ok, &mut catch_ups);
            if !self.state.warm.swap(true, Ordering::AcqRel) {
                tracing::info!(mappings = count, version = follower.applied(), elapsed = ?started.elapsed(), "route cache warm; ready");
            }
            self.drain.warmed();
            delay = RETRY_FIRST;
            loop {
                match follower.next().await {
                    Ok(updates) => {
                        for u in updates {
                            if matches!(u, SyncUpdate::Reset(_)) {
                                self.metrics.sync_reloads.inc();
                            }
                            self.cache.apply(u);
                        }
                        self.record(&follower, last_ok, &mut catch_ups);
                        delay = RETRY_FIRST;
                    }
                    Err(e) => {
                        self.metrics.sync_errors.inc();
                        self.metrics.sync_connected.set(0);
                        tracing::warn!(error = %e, retry_in = ?delay, "sync failed; serving cached routes");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 3 / 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    fn record(&self, f: &Follower, last_ok: &std::sync::Mutex<Instant>, catch_ups: &mut u64) {
        let applied = f.applied();
        self.state.applied.store(applied, Ordering::Release);
        self.metrics.sync_version.set(applied as i64);
        self.metrics.sync_connected.set(i64::from(f.connected()));
        self.metrics
            .sync_catch_ups
            .inc_by(f.catch_ups().saturating_sub(*catch_ups));
        *catch_ups = f.catch_ups();
        if f.connected() {
            *last_ok.lock().expect("not poisoned") = Instant::now();
        }
    }
}

/// Once a second: how stale the cache may be, and how many entries it holds (loads on a miss
/// add entries between sync updates).
async fn report_staleness(
    last_ok: Arc<std::sync::Mutex<Instant>>,
    metrics: Arc<ProxyMetrics>,
    cache: Arc<RouteCache>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let age = last_ok.lock().expect("not poisoned").elapsed();
        metrics.sync_staleness_seconds.set(age.as_secs() as i64);
        metrics.cache_entries.set(cache.len() as i64);
    }
}
