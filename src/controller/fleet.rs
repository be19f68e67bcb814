//! The proxy sets with a healthy node, as the node registry says: which set serves a placed
//! mapping now (`status.servingSet`, condition `ServedByHome`; docs/sets.md). Read every few
//! seconds; when it changes, the placed mappings are reconciled again so their status follows.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::SetName;
use crate::store::{NodeRegistry, healthy_sets};

#[derive(Default)]
pub struct Fleet {
    healthy: RwLock<Option<Arc<[SetName]>>>,
}

impl Fleet {
    /// The sets with a healthy node; `None` until the registry was read once.
    pub fn get(&self) -> Option<Arc<[SetName]>> {
        self.healthy.read().expect("not poisoned").clone()
    }

    /// Records what the registry says; true when it changed.
    fn update(&self, sets: Vec<SetName>) -> bool {
        let mut held = self.healthy.write().expect("not poisoned");
        if held.as_deref() == Some(sets.as_slice()) {
            return false;
        }
        *held = Some(sets.into());
        true
    }
}

/// Reads the registry every `every` until `stop`; calls `changed` when the healthy sets change.
pub async fn follow(
    fleet: Arc<Fleet>,
    nodes: Arc<dyn NodeRegistry>,
    every: Duration,
    changed: impl Fn() + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match nodes.list_nodes().await {
            Ok(list) => {
                if fleet.update(healthy_sets(&list)) {
                    tracing::info!(healthy = ?fleet.get().unwrap_or_default(), "proxy sets with a healthy node changed");
                    changed();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node registry; serving sets in status wait")
            }
        }
    }
}
