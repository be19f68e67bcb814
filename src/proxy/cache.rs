//! The L1 route cache (seed 000 FR-2): per-node memory with a TTL and a size bound, filled from
//! the store on a miss, kept current by the sync task.
//!
//! Rules (docs/proxy.md "The L1 cache"):
//! - A host outside `http_domain.base_domains` is unknown without asking the store.
//! - Unknown hosts are remembered in their own bounded space, so a flood of random hosts never
//!   evicts a real route.
//! - One store lookup per host is in flight at a time: concurrent misses wait for it.
//! - Entries carry their load time and are checked against the TTL on read, so an expired
//!   entry is still at hand when the store cannot be reached (stale-if-error), and when the store
//!   answers from another history (flushed, emptied, failed over) or the table is stale: then a
//!   host the store lacks keeps its route (the last good state) instead of becoming a 404.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::ProxyError;
use super::metrics::ProxyMetrics;
use super::route::Route;
use crate::domain::{Hostname, Mapping};
use crate::store::{MappingStore, Position, SyncUpdate};

/// A cached answer, as [`RouteCache::get_fresh`] reports it.
#[derive(Debug, Clone)]
pub enum Cached {
    Found(Arc<Route>),
    /// The store had no mapping for the host when it was read.
    Unknown,
}

/// The routes held, keyed by a 64-bit hash of their host under a key random to this process:
/// the host is held once, in its route, not again as the key (a million routes saved 40 bytes
/// each: issue: scale, docs/proxy.md "Route memory"). Two hosts of one hash (about three chances
/// in 10^8 among a million hosts, and not choosable from outside) only take turns in the cache:
/// a route is returned only for its own host. An entry is the route alone: when it was taken in
/// is kept in the route (microseconds from `base`).
struct Routes<S = std::hash::RandomState> {
    cache: quick_cache::sync::Cache<u64, Arc<Route>>,
    hasher: S,
    base: Instant,
}

impl Routes {
    fn new(capacity: usize) -> Self {
        Self::with_hasher(capacity, std::hash::RandomState::new())
    }
}

impl<S: std::hash::BuildHasher> Routes<S> {
    fn with_hasher(capacity: usize, hasher: S) -> Self {
        Self {
            cache: quick_cache::sync::Cache::new(capacity),
            hasher,
            base: Instant::now(),
        }
    }

    fn key(&self, host: &str) -> u64 {
        self.hasher.hash_one(host)
    }

    /// `host`'s route and when it was loaded.
    fn get(&self, host: &str) -> Option<(Arc<Route>, Instant)> {
        let route = self.cache.get(&self.key(host))?;
        let at = self.base + Duration::from_micros(route.loaded_at());
        (route.host() == host).then_some((route, at))
    }

    fn insert(&self, route: Arc<Route>, now: Instant) {
        route.set_loaded_at(now.saturating_duration_since(self.base).as_micros() as u64);
        self.cache.insert(self.key(route.host()), route);
    }

    fn remove(&self, host: &str) {
        self.cache.remove_if(&self.key(host), |r| r.host() == host);
    }

    /// Removes `host`'s route if it is `mapping_id`'s.
    fn remove_mapping(&self, host: &str, mapping_id: &crate::domain::MappingId) {
        let id = mapping_id.ulid_bytes();
        self.cache.remove_if(&self.key(host), |r| {
            r.host() == host && r.ulid_bytes() == id
        });
    }

    fn len(&self) -> usize {
        self.cache.len()
    }

    fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    fn clear(&self) {
        self.cache.clear();
    }
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub max_entries: usize,
    /// Bound of the space for unknown hosts, apart from `max_entries`.
    pub negative_max_entries: usize,
    /// Hosts outside these (and their subdomains) are unknown without a lookup; empty: any host.
    pub base_domains: Vec<Hostname>,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Store,
    /// A route kept because the store was unreachable or lost it (stale table).
    Stale,
}

/// What one store lookup decided, shared by every request that waited for it.
#[derive(Debug, Clone)]
enum Loaded {
    Found(Arc<Route>),
    /// The store lacks the host but its history broke (or the table is stale): the route
    /// served before is kept.
    Kept(Arc<Route>),
    Unknown,
}

type Shared = Option<Result<Loaded, String>>;

pub struct RouteCache {
    routes: Routes,
    unknown: quick_cache::sync::Cache<Hostname, Instant>,
    settings: CacheSettings,
    /// Bumped by every sync update: a load that raced one is not trusted (see `load`).
    generation: AtomicU64,
    inflight: Mutex<HashMap<Hostname, watch::Receiver<Shared>>>,
    /// The store position the table follows; `None` until the first load.
    history: RwLock<Option<Position>>,
    /// Set while the proxy serves its own table rather than the store's (see `sync.rs`).
    stale: AtomicBool,
    /// Tells the sync task that a lookup saw another history, so it looks at once.
    pub history_changed: Arc<Notify>,
    store: Arc<dyn MappingStore>,
    metrics: Arc<ProxyMetrics>,
}

/// Removes a host's in-flight marker when its lookup ends, also if the request was dropped
/// (waiters then see the channel closed and look up themselves).
struct InflightGuard<'a> {
    map: &'a Mutex<HashMap<Hostname, watch::Receiver<Shared>>>,
    host: &'a Hostname,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.host);
    }
}

impl RouteCache {
    pub fn new(
        settings: CacheSettings,
        store: Arc<dyn MappingStore>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            routes: Routes::new(settings.max_entries.max(1)),
            unknown: quick_cache::sync::Cache::new(settings.negative_max_entries.max(1)),
            settings,
            generation: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
            history: RwLock::new(None),
            stale: AtomicBool::new(false),
            history_changed: Arc::new(Notify::new()),
            store,
            metrics,
        }
    }

    /// Routes held (unknown hosts are counted apart: [`Self::unknown_len`]).
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn unknown_len(&self) -> usize {
        self.unknown.len()
    }

    /// The cached answer for `host` if it is still fresh; never touches the store.
    pub fn get_fresh(&self, host: &Hostname) -> Option<Cached> {
        let now = Instant::now();
        if let Some((route, loaded_at)) = self.routes.get(host.as_str())
            && fresh(loaded_at, self.settings.ttl, now)
        {
            return Some(Cached::Found(route));
        }
        self.unknown
            .get(host)
            .filter(|at| fresh(*at, self.settings.negative_ttl, now))
            .map(|_| Cached::Unknown)
    }

    /// True when `host` is one of the base domains or below one (or none are configured).
    fn in_base_domains(&self, host: &Hostname) -> bool {
        let bases = &self.settings.base_domains;
        bases.is_empty()
            || bases.iter().any(|b| {
                let (h, b) = (host.as_str(), b.as_str());
                h == b
                    || (h.len() > b.len()
                        && h.ends_with(b)
                        && h.as_bytes()[h.len() - b.len() - 1] == b'.')
            })
    }

    /// The route for `host`: from the cache when fresh, else from the store.
    pub async fn resolve(&self, host: &Hostname) -> Result<(Arc<Route>, Source), ProxyError> {
        if !self.in_base_domains(host) {
            self.metrics.cache_outside_base.inc();
            return Err(ProxyError::UnknownHost(host.as_str().to_string()));
        }
        let started = Instant::now();
        let mut expired = None;
        if self.settings.enabled {
            if let Some((route, loaded_at)) = self.routes.get(host.as_str()) {
                if fresh(loaded_at, self.settings.ttl, started) {
                    self.metrics.cache_hits.inc();
                    self.observe(Source::Cache, started);
                    return Ok((route, Source::Cache));
                }
                expired = Some(route);
            } else if let Some(at) = self.unknown.get(host)
                && fresh(at, self.settings.negative_ttl, started)
            {
                self.metrics.cache_hits.inc();
                self.observe(Source::Cache, started);
                return Err(ProxyError::UnknownHost(host.as_str().to_string()));
            }
        }
        self.metrics.cache_misses.inc();
        let answer = match self.load_once(host).await {
            Ok(Loaded::Found(route)) => Ok((route, Source::Store)),
            Ok(Loaded::Kept(route)) => {
                self.metrics.cache_stale_served.inc();
                Ok((route, Source::Stale))
            }
            Ok(Loaded::Unknown) => Err(ProxyError::UnknownHost(host.as_str().to_string())),
            Err(e) => match expired {
                Some(route) => {
                    tracing::debug!(%host, error = %e, "store unreachable; serving an expired entry");
                    self.metrics.cache_stale_served.inc();
                    Ok((route, Source::Stale))
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

    /// Single-flight: the first miss for a host reads the store; concurrent misses for the same
    /// host wait for its answer instead of sending their own.
    async fn load_once(&self, host: &Hostname) -> Result<Loaded, String> {
        enum Role {
            Lead(watch::Sender<Shared>),
            Wait(watch::Receiver<Shared>),
        }
        loop {
            let role = {
                let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(host) {
                    Some(rx) => Role::Wait(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        map.insert(host.clone(), rx);
                        Role::Lead(tx)
                    }
                }
            };
            match role {
                Role::Lead(tx) => {
                    let guard = InflightGuard {
                        map: &self.inflight,
                        host,
                    };
                    // A lookup that ended between our cache check and now has cached its
                    // answer (before leaving the map): use it rather than read again.
                    let result = match self
                        .settings
                        .enabled
                        .then(|| self.get_fresh(host))
                        .flatten()
                    {
                        Some(Cached::Found(r)) => Ok(Loaded::Found(r)),
                        Some(Cached::Unknown) => Ok(Loaded::Unknown),
                        None => self.load(host).await,
                    };
                    drop(guard);
                    let _ = tx.send(Some(result.clone()));
                    return result;
                }
                Role::Wait(mut rx) => {
                    self.metrics.cache_coalesced.inc();
                    match rx.wait_for(Option::is_some).await {
                        Ok(v) => return v.clone().expect("waited for Some"),
                        // The lookup was abandoned (its request went away): look up ourselves.
                        Err(_) => continue,
                    }
                }
            }
        }
    }

    /// True when the store answered from a history other than the table's.
    fn other_history(&self, at: &Position) -> bool {
        match &*self.history.read().unwrap_or_else(|e| e.into_inner()) {
            Some(h) => at.epoch != h.epoch || at.version < h.version,
            None => false,
        }
    }

    /// Reads `host` from the store and caches the answer. If a sync update landed while the
    /// store was read, the answer may predate it: it is returned but not kept.
    async fn load(&self, host: &Hostname) -> Result<Loaded, String> {
        let generation = self.generation.load(Ordering::Acquire);
        let lookup = self.store.lookup(host).await.map_err(|e| e.to_string())?;
        let broken = self.other_history(&lookup.position);
        let already_stale = self.stale.load(Ordering::Acquire);
        // Once stale, the sync task knows: misses need not wake it again.
        if broken && !already_stale {
            self.history_changed.notify_one();
        }
        let stale = broken || already_stale;
        let value = match lookup.mapping {
            Some(m) => Loaded::Found(Arc::new(Route::from_mapping(&m))),
            None if stale => match self.routes.get(host.as_str()) {
                Some((route, _)) => Loaded::Kept(route),
                None => Loaded::Unknown,
            },
            None => Loaded::Unknown,
        };
        if self.settings.enabled {
            match &value {
                // A kept route is checked again once per TTL, not on every request.
                Loaded::Found(r) | Loaded::Kept(r) => {
                    self.put(r.clone());
                }
                Loaded::Unknown => {
                    self.routes.remove(host.as_str());
                    self.unknown.insert(host.clone(), Instant::now());
                }
            }
            if self.generation.load(Ordering::Acquire) != generation {
                self.routes.remove(host.as_str());
                self.unknown.remove(host);
            }
        }
        Ok(value)
    }

    fn put(&self, route: Arc<Route>) {
        self.unknown.remove(route.host());
        self.routes.insert(route, Instant::now());
    }

    /// The store position the table now follows (set by the sync task while fresh).
    pub fn set_history(&self, at: Position) {
        *self.history.write().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// Marks the table stale (the store may lack routes it holds) or fresh.
    pub fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Ordering::Release);
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// Applies a sync update: changed mappings replace their entries (and negative entries for
    /// their host); removed ones are dropped; a reset replaces everything, a rebase is laid over
    /// what is held (the sync task decides which a full load is: see `freshness.rs`).
    pub fn apply(&self, update: SyncUpdate) {
        match update {
            SyncUpdate::Reset(all) => self.replace(&all),
            SyncUpdate::Rebase { mappings, .. } => self.overlay(&mappings),
            SyncUpdate::Upsert(m) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.upsert(&m);
            }
            SyncUpdate::Remove {
                mapping_id,
                full_domain,
            } => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.routes
                    .remove_mapping(full_domain.as_str(), &mapping_id);
            }
        }
        self.metrics.cache_entries.set(self.routes.len() as i64);
    }

    /// Replaces everything with `all` (up to `max_entries` are kept).
    pub fn replace(&self, all: &[Mapping]) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.routes.clear();
        self.unknown.clear();
        self.warm(all);
        self.metrics.cache_entries.set(self.routes.len() as i64);
    }

    /// Lays `all` over what is held: their routes win, routes they lack stay.
    pub fn overlay(&self, all: &[Mapping]) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.warm(all);
        self.metrics.cache_entries.set(self.routes.len() as i64);
    }

    fn upsert(&self, m: &Mapping) {
        if self.settings.enabled {
            self.put(Arc::new(Route::from_mapping(m)));
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

fn fresh(loaded_at: Instant, ttl: Duration, now: Instant) -> bool {
    now.saturating_duration_since(loaded_at) < ttl
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MappingSpec;
    use crate::store::MemoryStore;

    fn host(h: &str) -> Hostname {
        Hostname::parse(h).unwrap()
    }

    /// Every host hashes alike.
    #[derive(Default)]
    struct Colliding;

    impl std::hash::Hasher for Colliding {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn hosts_of_one_hash_take_turns_and_never_get_each_others_route() {
        let routes =
            Routes::with_hasher(100, std::hash::BuildHasherDefault::<Colliding>::default());
        let route = |h: &str| {
            let spec = MappingSpec::new(h, "tunnox.net", "127.0.0.1", 80);
            let full = spec.validate().unwrap();
            let m = Mapping::from_spec(
                crate::domain::MappingId::generate(),
                spec,
                full,
                "n",
                chrono::Utc::now(),
            );
            Arc::new(Route::from_mapping(&m))
        };
        let (a, b) = (route("a"), route("b"));
        let now = Instant::now();
        routes.insert(a.clone(), now);
        assert_eq!(routes.get(a.host()).map(|(r, _)| r), Some(a.clone()));
        assert!(routes.get(b.host()).is_none(), "b is not a's");
        routes.insert(b.clone(), now);
        assert!(routes.get(a.host()).is_none(), "b took the place");
        assert_eq!(routes.get(b.host()).map(|(r, _)| r), Some(b.clone()));
        routes.remove(a.host());
        routes.remove_mapping(b.host(), &a.mapping_id());
        assert_eq!(routes.len(), 1, "neither removal was b's");
        let (_, loaded) = routes.get(b.host()).unwrap();
        assert!(loaded.duration_since(now) < Duration::from_millis(1));
        routes.remove_mapping(b.host(), &b.mapping_id());
        assert!(routes.is_empty());
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
            negative_max_entries: 100,
            base_domains: vec![host("tunnox.net")],
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
        assert_eq!((route.version(), source), (created.version, Source::Cache));
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

    #[tokio::test]
    async fn outside_base_domains_is_unknown_without_a_lookup() {
        let store = Arc::new(MemoryStore::new());
        store
            .create(MappingSpec::new("app", "other.example", "127.0.0.1", 1))
            .await
            .unwrap();
        let (c, m) = cache(store, 60_000, 10);
        for h in ["app.other.example", "tunnox.net.evil", "xtunnox.net"] {
            assert!(
                matches!(c.resolve(&host(h)).await, Err(ProxyError::UnknownHost(_))),
                "{h}"
            );
        }
        assert_eq!(m.cache_misses.get(), 0, "no store lookup");
        assert_eq!(m.cache_outside_base.get(), 3);
        assert!(c.in_base_domains(&host("tunnox.net")));
        assert!(c.in_base_domains(&host("a.b.tunnox.net")));
    }

    #[tokio::test]
    async fn unknown_hosts_never_evict_routes() {
        let store = Arc::new(MemoryStore::new());
        let (c, _) = cache(store.clone(), 60_000, 4);
        let mut routes = Vec::new();
        for i in 0..3 {
            let m = store
                .create(MappingSpec::new(
                    &format!("r{i}"),
                    "tunnox.net",
                    "127.0.0.1",
                    1,
                ))
                .await
                .unwrap();
            c.apply(SyncUpdate::Upsert(Box::new(m.clone())));
            routes.push(m.full_domain);
        }
        for i in 0..1000 {
            let _ = c.resolve(&host(&format!("u{i}.tunnox.net"))).await;
        }
        for r in &routes {
            assert!(
                matches!(c.get_fresh(r), Some(Cached::Found(_))),
                "{r} evicted"
            );
        }
        assert!(
            c.unknown_len() <= 200,
            "negative space bounded: {}",
            c.unknown_len()
        );
    }

    #[tokio::test]
    async fn a_store_from_another_history_never_takes_a_route_away() {
        let store = Arc::new(MemoryStore::new());
        let (c, m) = cache(store.clone(), 1, 10);
        let gone = store
            .create(MappingSpec::new("gone", "tunnox.net", "127.0.0.1", 1))
            .await
            .unwrap();
        c.apply(SyncUpdate::Upsert(Box::new(gone.clone())));
        store.delete(&gone.mapping_id, None).await.unwrap();
        // The table follows another epoch than the store answers from (a flush): the expired
        // route is kept, not turned into a 404.
        c.set_history(crate::store::Position {
            epoch: Some("before-the-flush".into()),
            version: 1,
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (route, source) = c.resolve(&gone.full_domain).await.unwrap();
        assert_eq!(
            (route.mapping_id(), source),
            (gone.mapping_id.clone(), Source::Stale)
        );
        assert_eq!(m.cache_stale_served.get(), 1);
        // Same history again: an absent record is a deletion, the route goes.
        c.set_history(store.position().await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(
            c.resolve(&gone.full_domain).await,
            Err(ProxyError::UnknownHost(_))
        ));
        // A stale table keeps routes the store lacks, whatever the history.
        c.apply(SyncUpdate::Upsert(Box::new(gone.clone())));
        c.set_stale(true);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(c.resolve(&gone.full_domain).await.unwrap().1, Source::Stale);
    }
}
