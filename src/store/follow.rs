//! Keeping a local copy in step with the store: pub/sub is the nudge, the change log is the
//! record (ARCHITECTURE §4). The proxy cache and the tests use this one implementation.

use std::sync::Arc;
use std::time::Duration;

use super::{
    ChangeEvent, ChangeOp, Changes, MappingStore, Position, StoreError, Subscription,
    SubscriptionEvent,
};
use crate::domain::{Hostname, Mapping, MappingId};

/// What to do with an event, given the last version applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next version: apply it.
    Apply,
    /// Already applied (duplicate or replayed): ignore.
    Skip,
    /// Versions are missing in between: catch up from the log.
    CatchUp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VersionTracker {
    applied: u64,
}

impl VersionTracker {
    pub fn new(applied: u64) -> Self {
        Self { applied }
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// `follows`: the version the change follows ([`ChangeEvent::follows`]).
    pub fn step(&self, version: u64, follows: u64) -> Step {
        match version {
            v if v <= self.applied => Step::Skip,
            _ if follows == self.applied => Step::Apply,
            _ => Step::CatchUp,
        }
    }

    pub fn advance(&mut self, version: u64) {
        self.applied = self.applied.max(version);
    }

    /// After a full reload at `version`, which may be lower than before (the store was reset).
    pub fn reset(&mut self, version: u64) {
        self.applied = version;
    }
}

/// Why the store's history is not the one a reader followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// Another epoch (or none): flushed, restarted without data, or replaced.
    EpochChanged,
    /// The same epoch below the version already applied: a failover that lost writes (the
    /// epoch has been replaced since, so other readers learn it too).
    WentBackwards,
}

impl Break {
    pub fn label(&self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::WentBackwards => "went_backwards",
        }
    }
}

/// A change to apply to a local copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncUpdate {
    /// Replace everything with these mappings (same history: the log was trimmed).
    Reset(Vec<Mapping>),
    /// Everything the store holds now, in a history other than the one followed so far: the
    /// store may have lost mappings (a reader that must not lose routes keeps its own until
    /// the controller says the store is rebuilt).
    Rebase {
        mappings: Vec<Mapping>,
        cause: Break,
    },
    /// Insert or replace this mapping (by id and by domain).
    Upsert(Box<Mapping>),
    /// Drop `full_domain` if it still maps to `mapping_id`.
    Remove {
        mapping_id: MappingId,
        full_domain: Hostname,
    },
}

/// Follows the store: a snapshot to start from, then updates in version order with no gaps.
pub struct Follower {
    store: Arc<dyn MappingStore>,
    subscription: Subscription,
    tracker: VersionTracker,
    /// The epoch of the history followed (`None`: a store not written since it was emptied).
    epoch: Option<String>,
    check: tokio::time::Interval,
    /// Someone saw the store answer from another history: look at once.
    wake: Option<Arc<tokio::sync::Notify>>,
    connected: bool,
    catch_ups: u64,
}

const PAGE: usize = 1000;

impl Follower {
    /// Subscribes, then loads the current state. Events racing the load are replayed
    /// idempotently, so nothing between the two is lost.
    pub async fn start(
        store: Arc<dyn MappingStore>,
        check_every: Duration,
    ) -> Result<(Self, Vec<Mapping>), StoreError> {
        let mut all = Vec::new();
        let follower = Self::start_paged(store, check_every, |page| {
            all.extend(page);
            std::future::ready(())
        })
        .await?;
        Ok((follower, all))
    }

    /// [`Follower::start`] handing the current state over page by page, as it is read, so a
    /// large store is never held twice (the caller's table and a full list). The store reads a
    /// few pages ahead of `page` ([`MappingStore::read_all`]), never more: what is held at once
    /// stays a handful of pages.
    pub async fn start_paged<F>(
        store: Arc<dyn MappingStore>,
        check_every: Duration,
        mut page: impl FnMut(Vec<Mapping>) -> F,
    ) -> Result<Self, StoreError>
    where
        F: std::future::Future<Output = ()>,
    {
        let subscription = store.subscribe().await?;
        let position = store.position().await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let taking = async {
            while let Some(items) = rx.recv().await {
                page(items).await;
            }
        };
        let (read, ()) = tokio::join!(store.read_all(PAGE, tx), taking);
        read?;
        let mut check = tokio::time::interval(check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        Ok(Self {
            store,
            subscription,
            tracker: VersionTracker::new(position.version),
            epoch: position.epoch,
            check,
            wake: None,
            connected: true,
            catch_ups: 0,
        })
    }

    pub fn applied(&self) -> u64 {
        self.tracker.applied()
    }

    /// The epoch and version applied.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            version: self.tracker.applied(),
        }
    }

    /// Catches up whenever `wake` is notified (besides events and the periodic check).
    pub fn wake_on(&mut self, wake: Arc<tokio::sync::Notify>) {
        self.wake = Some(wake);
    }

    /// Changes the periodic check (e.g. faster while waiting for a rebuild).
    pub fn set_check_every(&mut self, every: Duration) {
        if self.check.period() != every {
            self.check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            self.check
                .set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
    }

    /// How many times this follower has read the change log (after a gap, a reconnect, a
    /// periodic check).
    pub fn catch_ups(&self) -> u64 {
        self.catch_ups
    }

    /// False between a lost feed connection and its recovery.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Waits for the next updates. An error leaves the position unchanged; call again to retry.
    pub async fn next(&mut self) -> Result<Vec<SyncUpdate>, StoreError> {
        tokio::select! {
            event = self.subscription.next() => match event {
                // A change of another epoch: the history broke; the log read tells how.
                Some(SubscriptionEvent::Change(e))
                    if e.epoch.is_some() && e.epoch != self.epoch => self.catch_up().await,
                Some(SubscriptionEvent::Change(e)) => match self.tracker.step(e.version, e.follows()) {
                    Step::Skip => Ok(Vec::new()),
                    Step::Apply => {
                        let updates = self.resolve(&e).await?;
                        self.tracker.advance(e.version);
                        Ok(updates)
                    }
                    Step::CatchUp => self.catch_up().await,
                },
                Some(SubscriptionEvent::Disconnected) => {
                    self.connected = false;
                    Ok(Vec::new())
                }
                Some(SubscriptionEvent::Reconnected) => {
                    self.connected = true;
                    self.catch_up().await
                }
                Some(SubscriptionEvent::Replaced) => {
                    self.connected = true;
                    self.reload().await
                }
                Some(SubscriptionEvent::Lagged) => self.catch_up().await,
                None => {
                    // The feed ended: subscribe again, then catch up on the gap.
                    self.subscription = self.store.subscribe().await?;
                    self.catch_up().await
                }
            },
            _ = self.check.tick() => self.catch_up().await,
            _ = woken(self.wake.as_deref()) => self.catch_up().await,
        }
    }

    /// Applies everything after the last applied version, or reloads when the log was trimmed.
    /// All or nothing: on an error the position is unchanged and nothing is returned, so the
    /// next attempt starts from the same place.
    pub async fn catch_up(&mut self) -> Result<Vec<SyncUpdate>, StoreError> {
        self.catch_ups += 1;
        let mut tracker = self.tracker;
        let mut updates = Vec::new();
        loop {
            let changes = self.store.changes_since(tracker.applied(), PAGE).await?;
            let now = changes.position();
            if now.epoch != self.epoch {
                // A store never written when we loaded it (no epoch, version 0) gets its first
                // epoch with its first write: nothing was lost. Anything else is a break.
                if self.epoch.is_none() && self.tracker.applied() == 0 {
                    self.epoch = now.epoch.clone();
                } else {
                    return self.rebase(Break::EpochChanged, now).await;
                }
            }
            if now.version < self.tracker.applied() {
                // Same epoch, lower version: writes were lost. Replace the epoch so that every
                // reader (and writer) learns it, then reload.
                let seen = self.position();
                let epoch = self.store.note_backwards(&seen).await?;
                let now = Position {
                    epoch,
                    version: now.version,
                };
                return self.rebase(Break::WentBackwards, now).await;
            }
            match changes {
                Changes::Events {
                    events, current, ..
                } => {
                    let done =
                        events.len() < PAGE || events.last().is_none_or(|e| e.version >= current);
                    for e in &events {
                        updates.extend(self.resolve(e).await?);
                        tracker.advance(e.version);
                    }
                    if done {
                        self.tracker = tracker;
                        return Ok(updates);
                    }
                }
                Changes::Trimmed { current, .. } => {
                    tracing::info!(
                        applied = tracker.applied(),
                        current,
                        "change log no longer reaches our position; reloading"
                    );
                    let all = self.store.list_all().await?;
                    self.tracker.reset(current);
                    return Ok(vec![SyncUpdate::Reset(all)]);
                }
            }
        }
    }

    /// Follows another history from `now` on: everything the store holds, as a rebase.
    async fn rebase(&mut self, cause: Break, now: Position) -> Result<Vec<SyncUpdate>, StoreError> {
        tracing::warn!(
            cause = cause.label(),
            followed_epoch = ?self.epoch,
            epoch = ?now.epoch,
            applied = self.tracker.applied(),
            version = now.version,
            "the store's history is not the one followed; reloading"
        );
        let all = self.store.list_all().await?;
        self.tracker.reset(now.version);
        self.epoch = now.epoch;
        Ok(vec![SyncUpdate::Rebase {
            mappings: all,
            cause,
        }])
    }

    /// Everything again, from the version read first (events racing the load are replayed
    /// idempotently, as at start).
    async fn reload(&mut self) -> Result<Vec<SyncUpdate>, StoreError> {
        let version = self.store.current_version().await?;
        let all = self.store.list_all().await?;
        tracing::info!(
            applied = self.tracker.applied(),
            version,
            "the store moved to another server; reloading"
        );
        self.tracker.reset(version);
        Ok(vec![SyncUpdate::Reset(all)])
    }

    async fn resolve(&self, e: &ChangeEvent) -> Result<Vec<SyncUpdate>, StoreError> {
        let mut out = Vec::with_capacity(2);
        if let Some(prev) = &e.previous_domain {
            out.push(SyncUpdate::Remove {
                mapping_id: e.mapping_id.clone(),
                full_domain: prev.clone(),
            });
        }
        let current = match e.op {
            ChangeOp::Deleted => None,
            ChangeOp::Created | ChangeOp::Updated => match self.store.get(&e.mapping_id).await {
                Ok(found) => found,
                // One unreadable record must not stall the reader: it is not served.
                Err(err @ StoreError::Corrupt { .. }) => {
                    tracing::error!(error = %err, "unreadable mapping record; not serving it");
                    None
                }
                Err(err) => return Err(err),
            },
        };
        out.push(match current {
            Some(m) => SyncUpdate::Upsert(Box::new(m)),
            None => SyncUpdate::Remove {
                mapping_id: e.mapping_id.clone(),
                full_domain: e.full_domain.clone(),
            },
        });
        Ok(out)
    }
}

async fn woken(wake: Option<&tokio::sync::Notify>) {
    match wake {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_steps() {
        // (applied, incoming version, the version it follows, step)
        let cases = [
            (5, 3, 2, Step::Skip),
            (5, 5, 4, Step::Skip),
            (5, 6, 5, Step::Apply),
            (5, 8, 7, Step::CatchUp),
            (0, 1, 0, Step::Apply),
            (5, 9, 5, Step::Apply),   // a restore that skipped 6..8
            (5, 9, 6, Step::CatchUp), // ... after 6, which this reader has not seen
        ];
        for (applied, incoming, follows, want) in cases {
            assert_eq!(
                VersionTracker::new(applied).step(incoming, follows),
                want,
                "applied {applied} incoming {incoming}"
            );
        }
        let mut t = VersionTracker::new(5);
        t.advance(3);
        assert_eq!(t.applied(), 5);
        t.reset(2);
        assert_eq!(t.applied(), 2);
    }
}
