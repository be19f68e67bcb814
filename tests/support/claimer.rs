//! A store-level stand-in for the controller: claims one new domain after another through the
//! same `RedisStore` the controller uses, retrying transient errors as the controller's
//! requeue does, and records when each claim was acknowledged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunnox::domain::MappingSpec;
use tunnox::store::{MappingStore, StoreError};

/// One acknowledged claim: the domain, and when the attempt that succeeded started and ended.
#[derive(Debug, Clone)]
pub struct Ack {
    pub domain: String,
    pub started: Instant,
    pub done: Instant,
}

#[derive(Debug, Default)]
pub struct ClaimLog {
    pub acks: Vec<Ack>,
    /// Failed attempts (retried): when, and the error's label.
    pub errors: Vec<(Instant, &'static str)>,
}

impl ClaimLog {
    /// The first claim whose successful attempt started at or after `t`.
    pub fn first_started_after(&self, t: Instant) -> Option<&Ack> {
        self.acks.iter().find(|a| a.started >= t)
    }

    pub fn acked_after(&self, t: Instant) -> usize {
        self.acks.iter().filter(|a| a.started >= t).count()
    }
}

/// Claims `<prefix><n>.tunnox.net` → `127.0.0.1:port` for n = 0, 1, … until `stop` is set.
pub async fn claim(
    store: Arc<dyn MappingStore>,
    prefix: String,
    port: u16,
    log: Arc<Mutex<ClaimLog>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let sub = format!("{prefix}{n}");
        let source = format!("claimer:{sub}");
        let mut spec = MappingSpec::new(&sub, "tunnox.net", "127.0.0.1", port);
        spec.source = Some(source.clone());
        loop {
            let started = Instant::now();
            let result = tokio::time::timeout(Duration::from_secs(10), store.create(spec.clone()))
                .await
                .unwrap_or_else(|_| panic!("create {sub} hung for 10 s"));
            match result {
                Ok(m) => {
                    log.lock().unwrap().acks.push(Ack {
                        domain: m.full_domain.to_string(),
                        started,
                        done: Instant::now(),
                    });
                    break;
                }
                // An earlier attempt landed though its reply was lost: adopt it, as the
                // controller adopts a record naming it as source.
                Err(StoreError::DomainTaken {
                    domain,
                    holder_source: Some(s),
                    ..
                }) if s == source => {
                    log.lock().unwrap().acks.push(Ack {
                        domain: domain.to_string(),
                        started,
                        done: Instant::now(),
                    });
                    break;
                }
                Err(e) if e.is_transient() => {
                    log.lock().unwrap().errors.push((Instant::now(), e.label()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("claim {sub}: {e}"),
            }
        }
        n += 1;
    }
}
