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

    /// Records what the registry says; what it said before when that changed.
    fn update(&self, sets: Vec<SetName>) -> Option<Option<Arc<[SetName]>>> {
        let mut held = self.healthy.write().expect("not poisoned");
        if held.as_deref() == Some(sets.as_slice()) {
            return None;
        }
        Some(held.replace(sets.into()))
    }
}

/// Whether the set serving `placement` (a status's `set`) differs between two views of the
/// healthy sets; an unread view (`None`) differs from any.
pub fn serving_changed(
    placement: Option<&str>,
    before: Option<&[SetName]>,
    after: &[SetName],
) -> bool {
    let Some(placement) = placement.and_then(|p| SetName::parse(p).ok()) else {
        return false;
    };
    let Some(before) = before else {
        return true;
    };
    crate::domain::serving_set(&placement, before.iter())
        != crate::domain::serving_set(&placement, after.iter())
}

/// Reads the registry every `every` until `stop`: gives every read to `served` (versions the
/// proxies applied, with the store's epoch), and calls `changed(before, after)` when the healthy sets change.
pub async fn follow(
    fleet: Arc<Fleet>,
    nodes: Arc<dyn NodeRegistry>,
    store: Arc<dyn crate::store::MappingStore>,
    served: Arc<super::served::Served>,
    every: Duration,
    changed: impl Fn(Option<&[SetName]>, &[SetName]) + Send,
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
                // The store's epoch: a proxy following another history has not applied ours.
                let epoch = store.position().await.ok().and_then(|p| p.epoch);
                served.refresh(&list, epoch);
                let now = healthy_sets(&list);
                if let Some(before) = fleet.update(now.clone()) {
                    tracing::info!(healthy = ?now, "proxy sets with a healthy node changed");
                    changed(before.as_deref(), &now);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node registry; serving sets in status wait")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_placements_whose_serving_set_moved_are_woken() {
        let sets =
            |v: &[&str]| -> Vec<SetName> { v.iter().map(|s| SetName::parse(s).unwrap()).collect() };
        let before = sets(&["novel.sh", "novel.*", "ams.sh"]);
        let after = sets(&["novel.*", "ams.sh", "ams.sz"]);
        assert!(serving_changed(Some("novel.sh"), Some(&before), &after));
        assert!(
            !serving_changed(Some("novel.sz"), Some(&before), &after),
            "DR before and after"
        );
        assert!(!serving_changed(Some("ams.sh"), Some(&before), &after));
        assert!(serving_changed(Some("ams.sz"), Some(&before), &after));
        assert!(!serving_changed(Some("any"), Some(&before), &after));
        assert!(!serving_changed(None, Some(&before), &after));
        assert!(serving_changed(Some("ams.sh"), None, &after), "first read");
    }
}
