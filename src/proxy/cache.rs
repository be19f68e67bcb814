//! The L1 route cache (seed 000 FR-2): per-node memory with a TTL and a size bound, filled from
//! the store on a miss, kept current by the sync task, with negative entries for unknown hosts.
//!
//! Entries carry their load time and are checked against the TTL on read, so an expired entry
//! is still at hand when the store cannot be reached: it is served (stale-if-error) rather than
//! failing requests that worked a moment ago.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ProxyError;
use super::metrics::ProxyMetrics;
use super::route::Route;
use crate::domain::{Hostname, Mapping};
use crate::store::{MappingStore, StoreError, SyncUpdate};

#[derive(Debug, Clone)]
pub enum Cached {
    Found(Arc<Route>),
    /// The store had no mapping for the host when it was read.
    Unknown,
}

#[derive(Debug)]
struct Entry {
    value: Cached,
    loaded_at: Instant,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub max_entries: usize,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Store,
    /// An expired entry, because the store was unreachable.
    Stale,
}

pub struct RouteCache {
    map: quick_cache::sync::Cache<Hostname, Arc<Entry>>,
    settings: CacheSettings,
    /// Bumped by every sync update: a load that raced one is not trusted (see `load`).
    epoch: AtomicU64,
    store: Arc<dyn MappingStore>,
    metrics: Arc<ProxyMetrics>,
}

impl RouteCache {
    pub fn new(
        settings: CacheSettings,
        store: Arc<dyn MappingStore>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            map: quick_cache::sync::Cache::new(settings.max_entries.max(1)),
            settings,
            epoch: AtomicU64::new(0),
            store,
            metrics,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The cached answer for `host` if it is still fresh; never touches the store.
    pub fn get_fresh(&self, host: &Hostname) -> Option<Cached> {
        let entry = self.map.get(host)?;
        self.is_fresh(&entry).then(|| entry.value.clone())
    }

    fn is_fresh(&self, e: &Entry) -> bool {
        let ttl = match e.value {
            Cached::Found(_) => self.settings.ttl,
            Cached::Unknown => self.settings.negative_ttl,
        };
        e.loaded_at.elapsed() < ttl
    }

    /// The route for `host`: from the cache when fresh, else from the store.
    pub async fn resolve(&self, host: &Hostname) -> Result<(Arc<Route>, Source), ProxyError> {
        let started = Instant::now();
        let mut stale = None;
        if self.settings.enabled
            && let Some(entry) = self.map.get(host)
        {
            if self.is_fresh(&entry) {
                self.metrics.cache_hits.inc();
                self.observe(Source::Cache, started);
                return found(host, entry.value.clone(), Source::Cache);
            }
            stale = Some(entry);
        }
        self.metrics.cache_misses.inc();
        let answer = match self.load(host).await {
            Ok(value) => found(host, value, Source::Store),
            Err(e) => match stale {
                Some(entry) => {
                    tracing::debug!(%host, error = %e, "store unreachable; serving an expired entry");
                    self.metrics.cache_stale_served.inc();
                    found(host, entry.value.clone(), Source::Stale)
                }
                None => {
                    tracing::warn!(%host, error = %e, "store unreachable and host not cached");
                    Err(ProxyError::StoreUnavailable(host.as_str().to_string()))
                }
            },
        };
        self.observe(Source::Store, started);
        answer
    }

    fn observe(&self, source: Source, started: Instant) {
        let label = match source {
            Source::Cache => "cache",
            Source::Store | Source::Stale => "store",
        };
        self.metrics
            .lookup_seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Reads `host` from the store and caches the answer. If a sync update landed while the
    /// store was read, the answer may predate it: it is returned but not kept.
    async fn load(&self, host: &Hostname) -> Result<Cached, StoreError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let value = match self.store.get_by_domain(host).await? {
            Some(m) => Cached::Found(Arc::new(Route::from_mapping(&m))),
            None => Cached::Unknown,
        };
        if self.settings.enabled {
            self.put(host.clone(), value.clone());
            if self.epoch.load(Ordering::Acquire) != epoch {
                self.map.remove(host);
            }
        }
        Ok(value)
    }

    fn put(&self, host: Hostname, value: Cached) {
        self.map.insert(
            host,
            Arc::new(Entry {
                value,
                loaded_at: Instant::now(),
            }),
        );
    }

    /// Applies a sync update: changed mappings replace their entries (and negative entries for
    /// their host); removed ones are dropped.
    pub fn apply(&self, update: SyncUpdate) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        match update {
            SyncUpdate::Reset(all) => {
                self.map.clear();
                self.warm(&all);
            }
            SyncUpdate::Upsert(m) => self.upsert(&m),
            SyncUpdate::Remove {
                mapping_id,
                full_domain,
            } => {
                self.map.remove_if(&full_domain, |e| match &e.value {
                    Cached::Found(r) => r.mapping_id == mapping_id,
                    Cached::Unknown => false,
                });
            }
        }
        self.metrics.cache_entries.set(self.map.len() as i64);
    }

    fn upsert(&self, m: &Mapping) {
        if self.settings.enabled {
            self.put(
                m.full_domain.clone(),
                Cached::Found(Arc::new(Route::from_mapping(m))),
            );
        }
    }

    /// Fills the cache with up to `max_entries` mappings (a warm-up at start or after a reload).
    fn warm(&self, all: &[Mapping]) {
        if !self.settings.enabled {
            return;
        }
        for m in all.iter().take(self.settings.max_entries) {
            self.upsert(m);
        }
    }
}

fn found(
    host: &Hostname,
    value: Cached,
    source: Source,
) -> Result<(Arc<Route>, Source), ProxyError> {
    match value {
        Cached::Found(route) => Ok((route, source)),
        Cached::Unknown => Err(ProxyError::UnknownHost(host.as_str().to_string())),
    }
}
