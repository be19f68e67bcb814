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
        self.is_fresh_at(e, Instant::now())
    }

    fn is_fresh_at(&self, e: &Entry, now: Instant) -> bool {
        let ttl = match e.value {
            Cached::Found(_) => self.settings.ttl,
            Cached::Unknown => self.settings.negative_ttl,
        };
        now.saturating_duration_since(e.loaded_at) < ttl
    }

    /// The route for `host`: from the cache when fresh, else from the store.
    pub async fn resolve(&self, host: &Hostname) -> Result<(Arc<Route>, Source), ProxyError> {
        let started = Instant::now();
        let mut stale = None;
        if self.settings.enabled
            && let Some(entry) = self.map.get(host)
        {
            if self.is_fresh_at(&entry, started) {
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
        let histogram = match source {
            Source::Cache => &self.metrics.lookup_cache,
            Source::Store | Source::Stale => &self.metrics.lookup_store,
        };
        histogram.observe(started.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MappingSpec;
    use crate::store::MemoryStore;

    fn host(h: &str) -> Hostname {
        Hostname::parse(h).unwrap()
    }

    fn cache(
        store: Arc<dyn MappingStore>,
        ttl_ms: u64,
        max_entries: usize,
    ) -> (RouteCache, Arc<ProxyMetrics>) {
        let metrics = Arc::new(ProxyMetrics::new());
        let settings = CacheSettings {
            enabled: true,
            ttl: Duration::from_millis(ttl_ms),
            negative_ttl: Duration::from_millis(ttl_ms),
            max_entries,
        };
        (RouteCache::new(settings, store, metrics.clone()), metrics)
    }

    #[tokio::test]
    async fn hits_misses_ttl_and_negative_entries() {
        let store = Arc::new(MemoryStore::new());
        let (c, m) = cache(store.clone(), 200, 100);
        let app = host("app.tunnox.net");
        assert!(matches!(
            c.resolve(&app).await,
            Err(ProxyError::UnknownHost(_))
        ));
        assert!(
            matches!(c.get_fresh(&app), Some(Cached::Unknown)),
            "negative entry kept"
        );
        let created = store
            .create(MappingSpec::new("app", "tunnox.net", "127.0.0.1", 1))
            .await
            .unwrap();
        // Still the negative answer until told or expired...
        assert!(c.resolve(&app).await.is_err());
        // ...and a creation event replaces it.
        c.apply(SyncUpdate::Upsert(Box::new(created.clone())));
        let (route, source) = c.resolve(&app).await.unwrap();
        assert_eq!((route.version, source), (created.version, Source::Cache));
        assert_eq!((m.cache_hits.get(), m.cache_misses.get()), (2, 1));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(c.get_fresh(&app).is_none(), "expired after the TTL");
        assert_eq!(
            c.resolve(&app).await.unwrap().1,
            Source::Store,
            "re-read after the TTL"
        );
    }

    #[tokio::test]
    async fn removes_only_the_named_mapping_and_warms_up_to_the_bound() {
        let store = Arc::new(MemoryStore::new());
        let (c, _) = cache(store.clone(), 60_000, 100);
        let a = store
            .create(MappingSpec::new("a", "tunnox.net", "127.0.0.1", 1))
            .await
            .unwrap();
        c.apply(SyncUpdate::Upsert(Box::new(a.clone())));
        // A removal of another mapping that once held the domain leaves the current one.
        c.apply(SyncUpdate::Remove {
            mapping_id: crate::domain::MappingId::generate(),
            full_domain: a.full_domain.clone(),
        });
        assert!(matches!(
            c.get_fresh(&a.full_domain),
            Some(Cached::Found(_))
        ));
        c.apply(SyncUpdate::Remove {
            mapping_id: a.mapping_id.clone(),
            full_domain: a.full_domain.clone(),
        });
        assert!(c.get_fresh(&a.full_domain).is_none());

        let (small, _) = cache(store.clone(), 60_000, 3);
        let mut all = Vec::new();
        for i in 0..10 {
            all.push(
                store
                    .create(MappingSpec::new(
                        &format!("w{i}"),
                        "tunnox.net",
                        "127.0.0.1",
                        1,
                    ))
                    .await
                    .unwrap(),
            );
        }
        small.apply(SyncUpdate::Reset(all));
        assert!(
            small.len() <= 3,
            "warm-up respects max_entries: {}",
            small.len()
        );
    }
}
