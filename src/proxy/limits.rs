//! Isolation limits (docs/sets.md "Limits"): per mapping, the requests in flight at once and an
//! optional rate with a burst; per proxy — so per set, whose nodes all run the set's settings —
//! the requests in flight to upstreams at once. A request over a limit is answered 503 with
//! `Retry-After` before anything is sent upstream, so a flood on one mapping spends none of
//! another mapping's connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `proxy.limits` as the request path uses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitSettings {
    /// Requests of one mapping in flight at once on this proxy; 0: no limit.
    pub mapping_concurrency: u32,
    /// Requests of one mapping per second on this proxy, with `mapping_burst` at once; `None`:
    /// no rate limit.
    pub mapping_rate: Option<Rate>,
    /// Requests in flight to upstreams at once on this proxy (each holds one upstream
    /// connection over HTTP/1.1); 0: no limit.
    pub upstream_requests: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// The mapping's requests in flight.
    Concurrency { max: u32 },
    /// The mapping's rate: a token comes back in `retry_after` seconds.
    Rate { retry_after: u32 },
    /// This proxy's requests in flight to upstreams.
    Upstream { max: usize },
}

impl Over {
    /// A bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Concurrency { .. } => "mapping_concurrency",
            Self::Rate { .. } => "mapping_rate",
            Self::Upstream { .. } => "upstream_requests",
        }
    }

    /// Seconds a client should wait before trying again.
    pub fn retry_after(self) -> u32 {
        match self {
            Self::Rate { retry_after } => retry_after.max(1),
            Self::Concurrency { .. } | Self::Upstream { .. } => 1,
        }
    }
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Concurrency { max } => {
                write!(
                    f,
                    "{max} requests of the mapping already in flight (proxy.limits.mapping_concurrency)"
                )
            }
            Self::Rate { .. } => {
                write!(f, "over the mapping's rate (proxy.limits.mapping_rate)")
            }
            Self::Upstream { max } => {
                write!(
                    f,
                    "{max} requests already in flight to upstreams (proxy.limits.upstream_requests)"
                )
            }
        }
    }
}

/// A token bucket: `tokens` left at `at`. Pure: the caller passes the time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst.max(1)),
            at: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let cap = f64::from(rate.burst.max(1));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(cap);
        // A request that read the clock before another took the bucket must not move it back.
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate.per_second;
        Err(Duration::from_secs_f64(wait.min(3600.0)))
    }

    /// Whether, at `now`, the bucket has filled up again (it can be forgotten).
    fn refilled(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= f64::from(rate.burst.max(1))
    }
}

/// One mapping's state on this proxy.
struct Gate {
    in_flight: AtomicU32,
    bucket: Mutex<Option<Bucket>>,
}

/// Held while a request is in flight; gives its places back when dropped.
pub struct Permit {
    gate: Option<Arc<Gate>>,
    upstream: Option<Arc<AtomicUsize>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(g) = &self.gate {
            g.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(u) = &self.upstream {
            u.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The gates by mapping id, and when idle ones were last forgotten.
type Gates = (HashMap<Box<str>, Arc<Gate>>, Instant);

/// How often gates of idle mappings are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub struct Limits {
    settings: LimitSettings,
    /// Gates of the mappings with requests lately, by mapping id.
    gates: Mutex<Gates>,
    upstream: Arc<AtomicUsize>,
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            settings,
            gates: Mutex::new((HashMap::new(), Instant::now())),
            upstream: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn per_mapping(&self) -> bool {
        self.settings.mapping_concurrency > 0 || self.settings.mapping_rate.is_some()
    }

    /// A place for one request of `mapping`, or the limit it is over.
    pub fn admit(&self, mapping: &str) -> Result<Permit, Over> {
        let mut permit = Permit {
            gate: None,
            upstream: None,
        };
        let now = Instant::now();
        if self.per_mapping() {
            let (gate, was) = self.enter(mapping, now);
            let max = self.settings.mapping_concurrency;
            permit.gate = Some(gate.clone());
            if max > 0 && was >= max {
                return Err(Over::Concurrency { max });
            }
            if let Some(rate) = self.settings.mapping_rate {
                let mut bucket = gate.bucket.lock().expect("not poisoned");
                let b = bucket.get_or_insert_with(|| Bucket::full(rate, now));
                if let Err(wait) = b.take(rate, now) {
                    let retry_after = u32::try_from(wait.as_secs())
                        .unwrap_or(u32::MAX)
                        .saturating_add(1);
                    return Err(Over::Rate { retry_after });
                }
            }
        }
        let max = self.settings.upstream_requests;
        if max > 0 {
            let was = self.upstream.fetch_add(1, Ordering::AcqRel);
            permit.upstream = Some(self.upstream.clone());
            if was >= max {
                return Err(Over::Upstream { max });
            }
        }
        Ok(permit)
    }

    /// The mapping's gate, with this request counted in it (under the lock, so the sweep never
    /// forgets a gate a request is entering), and the count before it.
    fn enter(&self, mapping: &str, now: Instant) -> (Arc<Gate>, u32) {
        let mut guard = self.gates.lock().expect("not poisoned");
        let (gates, swept) = &mut *guard;
        if now.saturating_duration_since(*swept) >= SWEEP_EVERY {
            *swept = now;
            let rate = self.settings.mapping_rate;
            gates.retain(|_, g| {
                g.in_flight.load(Ordering::Acquire) > 0
                    || match (rate, *g.bucket.lock().expect("not poisoned")) {
                        (Some(rate), Some(b)) => !b.refilled(rate, now),
                        _ => false,
                    }
            });
        }
        let g = match gates.get(mapping) {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(Gate {
                    in_flight: AtomicU32::new(0),
                    bucket: Mutex::new(None),
                });
                gates.insert(mapping.into(), g.clone());
                g
            }
        };
        let was = g.in_flight.fetch_add(1, Ordering::AcqRel);
        (g, was)
    }

    /// Mappings with a gate now (for tests and the sweep's bound).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.gates.lock().expect("not poisoned").0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_one_token_per_interval() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        // (seconds after t0, want Ok or the wait in ms)
        let steps: &[(f64, Result<(), u64>)] = &[
            (0.0, Ok(())),
            (0.0, Ok(())),
            (0.0, Ok(())),
            (0.0, Err(500)),
            (0.25, Err(250)),
            (0.5, Ok(())),
            (0.5, Err(500)),
            // A long pause refills to the burst, not beyond.
            (100.0, Ok(())),
            (100.0, Ok(())),
            (100.0, Ok(())),
            (100.0, Err(500)),
        ];
        for (i, (at, want)) in steps.iter().enumerate() {
            let now = t0 + Duration::from_secs_f64(*at);
            let got = b.take(rate, now).map_err(|w| w.as_millis() as u64);
            assert_eq!(&got, want, "step {i} at {at}s");
        }
    }

    #[test]
    fn a_mapping_over_its_concurrency_is_refused_and_others_are_not() {
        let limits = Limits::new(LimitSettings {
            mapping_concurrency: 2,
            ..Default::default()
        });
        let a1 = limits.admit("a").unwrap();
        let _a2 = limits.admit("a").unwrap();
        assert_eq!(limits.admit("a").err(), Some(Over::Concurrency { max: 2 }));
        let _b = limits
            .admit("b")
            .expect("another mapping has its own places");
        drop(a1);
        let _a3 = limits.admit("a").expect("a place came back");
        assert_eq!(limits.admit("a").err().map(Over::retry_after), Some(1));
    }

    #[test]
    fn a_rate_refuses_with_the_seconds_to_wait() {
        let limits = Limits::new(LimitSettings {
            mapping_rate: Some(Rate {
                per_second: 0.1,
                burst: 2,
            }),
            ..Default::default()
        });
        assert!(limits.admit("a").is_ok());
        assert!(limits.admit("a").is_ok());
        match limits.admit("a") {
            Err(Over::Rate { retry_after }) => assert!((9..=11).contains(&retry_after)),
            other => panic!("{:?}", other.err()),
        }
        assert!(limits.admit("b").is_ok());
    }

    #[test]
    fn the_upstream_limit_counts_every_mapping() {
        let limits = Limits::new(LimitSettings {
            upstream_requests: 2,
            ..Default::default()
        });
        let _a = limits.admit("a").unwrap();
        let b = limits.admit("b").unwrap();
        assert_eq!(limits.admit("c").err(), Some(Over::Upstream { max: 2 }));
        drop(b);
        assert!(limits.admit("c").is_ok());
        assert_eq!(
            limits.tracked(),
            0,
            "no per-mapping state without per-mapping limits"
        );
    }

    #[test]
    fn idle_mappings_are_forgotten() {
        let limits = Limits::new(LimitSettings {
            mapping_concurrency: 5,
            ..Default::default()
        });
        for i in 0..100 {
            drop(limits.admit(&format!("m{i}")).unwrap());
        }
        let _held = limits.admit("kept").unwrap();
        assert_eq!(limits.tracked(), 101);
        // Pretend the last sweep was long ago.
        limits.gates.lock().unwrap().1 = Instant::now() - SWEEP_EVERY;
        drop(limits.admit("new").unwrap());
        assert_eq!(limits.tracked(), 2, "only the busy mapping and the new one");
    }
}
