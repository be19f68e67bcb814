//! Value types of the store interface: change events, pages, subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::domain::{Hostname, Mapping, MappingId};

/// A fresh epoch id: 128 random bits, hex.
pub(crate) fn new_epoch() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Created,
    Updated,
    Deleted,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "created" => Some(Self::Created),
            "updated" => Some(Self::Updated),
            "deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// One change, as appended to the change log and published on the events channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    #[serde(rename = "type")]
    pub op: ChangeOp,
    pub version: u64,
    pub mapping_id: MappingId,
    pub full_domain: Hostname,
    /// The domain the mapping held before an update that moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_domain: Option<Hostname>,
    /// The store epoch the change was written in (absent from writers that predate epochs):
    /// version `v` of one epoch is never mistaken for version `v` of another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The version this change follows when it is not `version - 1`: a restored record skips
    /// the versions between (they never existed in this history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
}

impl ChangeEvent {
    /// The version a reader must have applied for this change to be the next one.
    pub fn follows(&self) -> u64 {
        self.after.unwrap_or(self.version.saturating_sub(1))
    }
}

/// Where a store's history stands: its epoch (a random id that changes whenever the history is
/// not continuous: a flush, a restart without data, a failover that lost writes) and version.
/// `epoch` is `None` for a store nobody has written since it was emptied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: Option<String>,
    pub version: u64,
}

/// The controller's word that the store holds everything it owns: written after a resync
/// pass against `epoch` found nothing missing, with the version the pass listed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub epoch: String,
    pub version: u64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub by: String,
}

/// A domain's record and the store's position, read together (one round trip on Redis) so a
/// reader can tell an absent record from a store that lost its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub mapping: Option<Mapping>,
    pub position: Position,
}

/// Answer to "changes since version v".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Events in version order (possibly fewer than asked), and the store's version when read.
    Events {
        events: Vec<ChangeEvent>,
        current: u64,
        epoch: Option<String>,
    },
    /// The log was trimmed past `v`: reload everything, then continue from `current`.
    Trimmed { current: u64, epoch: Option<String> },
}

impl Changes {
    /// Decides whether a log read answers "changes since `since`" or proves the log no longer
    /// reaches back that far. Each entry follows the one before (one entry per increment; a
    /// restored record's names the version it follows, the ones between never existed), so
    /// the first must follow `since`. A store whose version is below `since` went backwards
    /// (flushed or replaced): the reader must reload.
    pub fn decide(
        since: u64,
        current: u64,
        epoch: Option<String>,
        events: Vec<ChangeEvent>,
    ) -> Self {
        if since == current {
            return Self::Events {
                events: Vec::new(),
                current,
                epoch,
            };
        }
        match events.first() {
            Some(first) if since < current && first.follows() == since => Self::Events {
                events,
                current,
                epoch,
            },
            _ => Self::Trimmed { current, epoch },
        }
    }

    /// The store's position when the log was read.
    pub fn position(&self) -> Position {
        match self {
            Self::Events { current, epoch, .. } | Self::Trimmed { current, epoch } => Position {
                epoch: epoch.clone(),
                version: *current,
            },
        }
    }
}

/// What a list walks over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListFilter {
    All,
    Client(String),
    User(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Continue after this id (from [`Page::next`]); `None` starts at the beginning.
    pub after: Option<MappingId>,
    pub limit: usize,
}

impl PageRequest {
    pub fn first(limit: usize) -> Self {
        Self { after: None, limit }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Mapping>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<MappingId>,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionEvent {
    Change(ChangeEvent),
    /// Events were dropped because the subscriber fell behind: catch up.
    Lagged,
    /// The feed's connection was lost; events may be missed until [`Self::Reconnected`].
    Disconnected,
    /// The feed is live again: catch up on what was missed while it was down.
    Reconnected,
    /// The feed is live again on another server (a Sentinel failover): its history may differ
    /// from what was read before (writes the old master never replicated, versions reused),
    /// so reload everything.
    Replaced,
}

/// A live change feed. Dropping it stops the background task that feeds it.
pub struct Subscription {
    rx: mpsc::Receiver<SubscriptionEvent>,
    lagged: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// A bounded feed: the returned sender drops events rather than block when it is full.
    pub(crate) fn channel(buffer: usize) -> (LossySender, SubscriptionParts) {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        (
            LossySender {
                tx,
                lagged: lagged.clone(),
            },
            SubscriptionParts { rx, lagged },
        )
    }

    pub(crate) fn new(parts: SubscriptionParts, task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            rx: parts.rx,
            lagged: parts.lagged,
            task,
        }
    }

    /// The next event; `None` once the store is gone. [`SubscriptionEvent::Lagged`] comes as
    /// soon as the subscriber asks after an overflow, even if no further event follows.
    pub async fn next(&mut self) -> Option<SubscriptionEvent> {
        if self.lagged.swap(false, Ordering::AcqRel) {
            return Some(SubscriptionEvent::Lagged);
        }
        self.rx.recv().await
    }
}

pub(crate) struct SubscriptionParts {
    rx: mpsc::Receiver<SubscriptionEvent>,
    lagged: Arc<AtomicBool>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends to a bounded subscriber queue without ever blocking the feed: when the queue is full
/// the event is dropped and the subscriber is told it lagged.
pub(crate) struct LossySender {
    tx: mpsc::Sender<SubscriptionEvent>,
    lagged: Arc<AtomicBool>,
}

impl LossySender {
    /// Returns false when the subscriber has gone away.
    pub(crate) fn send(&mut self, event: SubscriptionEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: u64) -> ChangeEvent {
        ChangeEvent {
            op: ChangeOp::Created,
            version: v,
            mapping_id: MappingId::generate(),
            full_domain: Hostname::parse("a.b").unwrap(),
            previous_domain: None,
            epoch: None,
            after: None,
        }
    }

    #[test]
    fn decides_between_events_and_trimmed() {
        let cases: Vec<(u64, u64, Vec<u64>, Option<usize>)> = vec![
            (5, 5, vec![], Some(0)),        // up to date
            (7, 5, vec![], None),           // store went backwards (flushed): reload
            (5, 8, vec![6, 7, 8], Some(3)), // contiguous
            (5, 8, vec![7, 8], None),       // 6 was trimmed
            (5, 8, vec![], None),           // everything trimmed
            (0, 3, vec![1, 2], Some(2)),    // partial page
            (5, 9, vec![9], Some(1)),       // a restore at 9 that skipped 6..8 (follows 5)
            (6, 9, vec![9], None),          // ... a reader at 6 cannot be: 6 never existed
        ];
        for (since, current, versions, want) in cases {
            let events = versions
                .iter()
                .map(|&v| ChangeEvent {
                    // The restore in the cases above follows 5.
                    after: (v == 9).then_some(5),
                    ..ev(v)
                })
                .collect();
            let got = Changes::decide(since, current, None, events);
            match (got, want) {
                (Changes::Events { events, .. }, Some(n)) => assert_eq!(events.len(), n),
                (Changes::Trimmed { current: c, .. }, None) => assert_eq!(c, current),
                (got, want) => panic!(
                    "since {since} current {current} {versions:?}: got {got:?}, want {want:?}"
                ),
            }
        }
    }

    #[tokio::test]
    async fn overflow_is_reported_without_blocking_or_waiting_for_more_events() {
        let (mut out, parts) = Subscription::channel(2);
        let mut sub = Subscription::new(parts, tokio::spawn(async {}));
        for v in 1..=5 {
            assert!(out.send(SubscriptionEvent::Change(ev(v))));
        }
        // Lag is reported first, with no further event needed to carry it.
        assert_eq!(sub.next().await, Some(SubscriptionEvent::Lagged));
        assert!(matches!(sub.next().await, Some(SubscriptionEvent::Change(e)) if e.version == 1));
        assert!(matches!(sub.next().await, Some(SubscriptionEvent::Change(e)) if e.version == 2));
        assert!(out.send(SubscriptionEvent::Change(ev(6))));
        assert!(matches!(sub.next().await, Some(SubscriptionEvent::Change(e)) if e.version == 6));
        drop(sub);
        assert!(!out.send(SubscriptionEvent::Lagged));
    }
}
