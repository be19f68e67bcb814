//! Draining (seed 003, ARCHITECTURE §8): readiness off, the registry told, keep-alive
//! connections closed; SIGTERM then finishes what is in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, watch};

use super::metrics::ProxyMetrics;
use crate::observe::admin::Health;

pub struct Drain {
    draining: AtomicBool,
    warm: AtomicBool,
    health: Health,
    metrics: Arc<ProxyMetrics>,
    /// Wakes the registry heartbeat so peers learn at once.
    pub changed: Notify,
    /// Turns true when draining starts (the tunnel sessions follow it).
    started: watch::Sender<bool>,
}

impl Drain {
    pub fn new(health: Health, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            draining: AtomicBool::new(false),
            warm: AtomicBool::new(false),
            health,
            metrics,
            changed: Notify::new(),
            started: watch::channel(false).0,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts draining; returns false if it had already started.
    pub fn start(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::AcqRel);
        self.health.set_ready(false);
        if first {
            tracing::info!("draining: readiness off, node marked draining");
            self.metrics.draining.set(1);
            self.changed.notify_one();
            self.started.send_replace(true);
        }
        first
    }

    /// Resolves to true once draining has started.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.started.subscribe()
    }

    /// The cache is warm: ready, unless draining has started.
    pub fn warmed(&self) {
        self.warm.store(true, Ordering::Release);
        self.health.set_ready(true);
        // Re-check after setting, so a drain racing this call always wins.
        if self.is_draining() {
            self.health.set_ready(false);
        }
    }
}
