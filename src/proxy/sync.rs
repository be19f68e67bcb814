//! Keeps the route cache in step with the store (FR-3, FR-5): warm up in the background, then
//! apply change events in version order via [`Follower`]; retry while the store is unreachable
//! and say how stale the cache may be. When the store's history breaks (another epoch, a
//! version below ours) or a reload would drop most of the table, keep serving the table held,
//! marked stale, until the controller's "rebuilt" marker vouches for the store (`freshness.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::cache::RouteCache;
use super::drain::Drain;
use super::freshness::{self, Decision, Reload, Stale};
use super::metrics::ProxyMetrics;
use crate::domain::Mapping;
use crate::store::{Follower, MappingStore, Position, Rebuilt, SyncUpdate};

/// What other tasks need to know about the sync.
#[derive(Default)]
pub struct SyncState {
    applied: AtomicU64,
    warm: std::sync::atomic::AtomicBool,
    detail: std::sync::Mutex<Detail>,
    /// The store epoch and version the table applied, set together (an announcement never
    /// pairs one history's epoch with another's version).
    applied_at: std::sync::Mutex<(String, u64)>,
    /// Notified when that moves (the heartbeat announces it at once).
    pub advanced: tokio::sync::Notify,
}

/// The history followed and, when stale, why.
#[derive(Debug, Clone, Default)]
pub struct Detail {
    pub epoch: Option<String>,
    pub stale_reason: Option<&'static str>,
}

impl SyncState {
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The epoch and version applied, read together; the epoch is empty until the first load.
    pub fn applied_at(&self) -> (String, u64) {
        self.applied_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    pub fn detail(&self) -> Detail {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_detail(&self, d: Detail) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = d;
    }
}

pub struct CacheSync {
    pub store: Arc<dyn MappingStore>,
    pub cache: Arc<RouteCache>,
    pub metrics: Arc<ProxyMetrics>,
    pub drain: Arc<Drain>,
    pub state: Arc<SyncState>,
    pub check_every: Duration,
    /// How long a stale table waits for the controller's marker (`http_domain.sync.rebuild_wait`).
    pub rebuild_wait: Duration,
}

const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Failures retried after `RETRY_FIRST` before the backoff grows.
const QUICK_RETRIES: u32 = 16;
/// While stale, the marker is looked for this often (or at the check interval if shorter).
const STALE_CHECK: Duration = Duration::from_secs(1);

/// Compiles the pages of the first load into routes on a thread of its own while the next page
/// is read and decoded, so the two overlap (issue: scale: a million mappings warm in about half
/// the time on two cores). At most two pages wait for it.
struct Warmer {
    pages: tokio::sync::mpsc::Sender<Vec<Mapping>>,
    done: tokio::task::JoinHandle<()>,
}

impl Warmer {
    fn start(cache: Arc<RouteCache>) -> Self {
        let (pages, mut rx) = tokio::sync::mpsc::channel::<Vec<Mapping>>(2);
        // A blocking task, not a worker: compiling a page takes a millisecond or more.
        let done = tokio::task::spawn_blocking(move || {
            while let Some(page) = rx.blocking_recv() {
                cache.overlay(&page);
            }
        });
        Self { pages, done }
    }

    /// Hands a page over; waits while two are waiting.
    fn take(&self, page: Vec<Mapping>) -> impl std::future::Future<Output = ()> + use<> {
        let pages = self.pages.clone();
        async move {
            // Closed only if the blocking task ended early: `finish` reports it.
            let _ = pages.send(page).await;
        }
    }

    /// Waits until every page handed over is in the table; an error if one could not be.
    async fn finish(self) -> Result<(), String> {
        drop(self.pages);
        self.done
            .await
            .map_err(|e| format!("compiling the routes of the first load failed: {e}"))
    }
}

/// The table served: its size when last loaded in full, and whether it is stale (since when).
#[derive(Default)]
struct Table {
    entries: usize,
    stale: Option<(Stale, Instant)>,
}

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
        let started = Instant::now();
        // The first load streams into the table page by page: a large store is never held as
        // a full list beside it (issue: scale). Whatever an earlier attempt left is cleared.
        let mut count;
        let mut follower = loop {
            self.cache.replace(&[]);
            count = 0;
            let warmer = Warmer::start(self.cache.clone());
            let paged = Follower::start_paged(self.store.clone(), self.check_every, |page| {
                count += page.len();
                warmer.take(page)
            });
            let loaded = paged.await;
            // A page the warmer could not compile fails the load: it is tried again, never
            // reported ready with part of the table missing.
            let warmed = warmer.finish().await;
            match loaded
                .map_err(|e| e.to_string())
                .and_then(|ok| warmed.map(|()| ok))
            {
                Ok(ok) => break ok,
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot load mappings; serving from the store on demand until it works");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 3 / 2).min(RETRY_MAX);
                }
            }
        };
        follower.wake_on(self.cache.history_changed.clone());
        let mut table = Table::default();
        let marker = self.marker().await;
        self.cold_loaded(&mut table, &mut follower, count, marker.as_ref());
        let mut catch_ups = 0;
        self.record(&follower, last_ok, &mut catch_ups);
        self.state.warm.store(true, Ordering::Release);
        tracing::info!(mappings = count, version = follower.applied(), elapsed = ?started.elapsed(), "route cache warm; ready");
        self.drain.warmed();
        crate::observe::memory::release_freed();
        delay = RETRY_FIRST;
        let mut failures = 0u32;
        loop {
            match follower.next().await {
                Ok(updates) => {
                    for u in updates {
                        match u {
                            SyncUpdate::Reset(all) => {
                                self.metrics.sync_reloads.inc();
                                let m = self.marker().await;
                                self.full_load(
                                    &mut table,
                                    &mut follower,
                                    Reload::Same,
                                    all,
                                    m.as_ref(),
                                );
                                crate::observe::memory::release_freed();
                            }
                            SyncUpdate::Rebase { mappings, cause } => {
                                self.metrics.sync_reloads.inc();
                                let m = self.marker().await;
                                self.full_load(
                                    &mut table,
                                    &mut follower,
                                    Reload::Broken(cause),
                                    mappings,
                                    m.as_ref(),
                                );
                                crate::observe::memory::release_freed();
                            }
                            other => self.cache.apply(other),
                        }
                    }
                    if table.stale.is_some() {
                        self.check_rebuilt(&mut table, &mut follower).await;
                    } else {
                        self.cache.set_history(follower.position());
                    }
                    self.record(&follower, last_ok, &mut catch_ups);
                    delay = RETRY_FIRST;
                    failures = 0;
                }
                Err(e) => {
                    self.metrics.sync_errors.inc();
                    self.metrics.sync_connected.set(0);
                    tracing::warn!(error = %e, retry_in = ?delay, "sync failed; serving cached routes");
                    tokio::time::sleep(delay).await;
                    // A restarted Redis breaks every pooled connection at once and each fails
                    // once before it reconnects: back off only after a pool's worth of failures,
                    // so a restart is noticed within a second or two.
                    failures += 1;
                    if failures > QUICK_RETRIES {
                        delay = (delay * 3 / 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    /// The controller's marker; unreadable counts as absent (never vouches for anything).
    async fn marker(&self) -> Option<Rebuilt> {
        match self.store.rebuilt().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the rebuilt marker");
                None
            }
        }
    }

    /// The first load, already streamed into the table: a cold table takes everything listed
    /// whatever `freshness::judge` decides, so only fresh or stale is left to settle.
    fn cold_loaded(
        &self,
        table: &mut Table,
        follower: &mut Follower,
        count: usize,
        marker: Option<&Rebuilt>,
    ) {
        let at = follower.position();
        table.entries = count;
        match freshness::judge(Reload::Cold, 0, count, &at, marker) {
            Decision::Switch => self.go_fresh(table, follower, at),
            Decision::SwitchStale(stale) | Decision::Keep(stale) => {
                self.go_stale(table, follower, stale)
            }
        }
    }

    /// Applies a full load of the store as `freshness::judge` decides.
    fn full_load(
        &self,
        table: &mut Table,
        follower: &mut Follower,
        reload: Reload,
        all: Vec<Mapping>,
        marker: Option<&Rebuilt>,
    ) {
        let at = follower.position();
        match freshness::judge(reload, table.entries, all.len(), &at, marker) {
            Decision::Switch => {
                self.cache.replace(&all);
                table.entries = all.len();
                self.go_fresh(table, follower, at);
            }
            Decision::SwitchStale(stale) => {
                self.cache.replace(&all);
                table.entries = all.len();
                self.go_stale(table, follower, stale);
            }
            Decision::Keep(stale) => {
                self.cache.overlay(&all);
                self.go_stale(table, follower, stale);
            }
        }
    }

    fn go_stale(&self, table: &mut Table, follower: &mut Follower, stale: Stale) {
        let reason = stale.reason.label();
        let epoch = stale.since.epoch.clone();
        match &mut table.stale {
            Some((s, _)) => *s = stale,
            None => {
                tracing::warn!(
                    reason,
                    store = ?stale.since,
                    entries = table.entries,
                    "store lost history or shrank: serving the last good table (stale) until the controller has rebuilt it"
                );
                self.metrics.sync_stale.set(1);
                self.metrics
                    .sync_stale_episodes
                    .with_label_values(&[reason])
                    .inc();
                table.stale = Some((stale, Instant::now()));
            }
        }
        self.cache.set_stale(true);
        follower.set_check_every(self.check_every.min(STALE_CHECK));
        self.state.set_detail(Detail {
            epoch,
            stale_reason: Some(reason),
        });
    }

    fn go_fresh(&self, table: &mut Table, follower: &mut Follower, at: Position) {
        if let Some((stale, since)) = table.stale.take() {
            tracing::info!(reason = stale.reason.label(), stale_for = ?since.elapsed(), store = ?at, "store rebuilt: serving it again (fresh)");
            follower.set_check_every(self.check_every);
        }
        self.metrics.sync_stale.set(0);
        self.cache.set_stale(false);
        self.state.set_detail(Detail {
            epoch: at.epoch.clone(),
            stale_reason: None,
        });
        self.cache.set_history(at);
    }

    /// While stale: switches to the store once the marker vouches for it, or after
    /// `rebuild_wait` without one.
    async fn check_rebuilt(&self, table: &mut Table, follower: &mut Follower) {
        let Some((stale, since)) = table.stale.clone() else {
            return;
        };
        let at = follower.position();
        let marker = self.marker().await;
        let confirmed = freshness::confirmed(&stale, &at, marker.as_ref());
        if !confirmed && since.elapsed() < self.rebuild_wait {
            return;
        }
        if !confirmed {
            tracing::error!(waited = ?since.elapsed(), "no rebuilt marker from the controller within http_domain.sync.rebuild_wait; serving what the store holds");
        }
        match self.store.list_all().await {
            Ok(all) => {
                self.cache.replace(&all);
                table.entries = all.len();
                self.go_fresh(table, follower, at);
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload the rebuilt store; still stale"),
        }
    }

    fn record(&self, f: &Follower, last_ok: &std::sync::Mutex<Instant>, catch_ups: &mut u64) {
        let applied = f.applied();
        self.state.applied.store(applied, Ordering::Release);
        let at = (f.position().epoch.unwrap_or_default(), applied);
        let moved = {
            let mut held = self
                .state
                .applied_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *held, at.clone()) != at
        };
        if moved {
            // One stored permit: announcements coalesce while one is on its way.
            self.state.advanced.notify_one();
        }
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
