//! Records lost with the store (a flushed or replaced Redis) come back with the id and version
//! their resource's status names, so the status stays true and a cold start writes no status
//! (docs/controller.md "Restoring a lost store").
//!
//! The store takes a restore only ahead of its version (its change log stays in order), and
//! reconciles finish in any order. So the resync pass tells the [`Restorer`] which versions to
//! expect, reconciles hand in the specs they computed without waiting, and one task writes
//! them lowest version first, each as soon as every lower expected one is in. A version that
//! does not come within [`GIVE_UP_AFTER`] of the last progress is given up; its mapping is then
//! created anew like any other (a new version, one status write).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use tokio::sync::{Notify, mpsc};

use crate::crd::HTTPDomainMapping;
use crate::domain::{MappingId, MappingSpec};
use crate::store::{MappingStore, Quota};

/// How long the writer waits for the lowest expected version before giving up on the versions
/// that hold back the ones handed in.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(2);

/// The most restores written back to back before the queue is looked at again.
const BATCH: usize = 256;

type Resource = ObjectRef<HTTPDomainMapping>;

/// A record to write again.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub resource: Resource,
    pub id: MappingId,
    pub spec: MappingSpec,
}

/// What becomes of a record a reconcile hands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandIn {
    /// Expected: it will be written in its turn.
    Taken,
    /// No resync pass has said what to expect yet (this controller just started): ask again
    /// shortly rather than create it anew.
    NotYet,
    /// Not expected: create it anew.
    Refused,
}

/// The pure part: which versions are expected and which have been handed in.
#[derive(Debug, Default)]
pub struct Queue {
    expected: BTreeMap<u64, Resource>,
    handed_in: BTreeMap<u64, Pending>,
    /// Taken out to be written and not written yet: its reconcile waits for the write too.
    writing: BTreeMap<u64, Resource>,
    /// A resync pass has said what to expect.
    primed: bool,
    /// The highest version taken out to be written: the store is at or past it once written,
    /// so nothing at or below it can be restored any more (a pass that listed the store just
    /// before a write would otherwise expect it again).
    taken_up_to: u64,
}

impl Queue {
    /// Expects these versions (the store is below each). Versions already expected stay.
    pub fn expect(&mut self, versions: impl IntoIterator<Item = (u64, Resource)>) {
        self.primed = true;
        for (v, r) in versions {
            if v > self.taken_up_to {
                self.expected.entry(v).or_insert(r);
            }
        }
    }

    /// Takes a reconcile's record if its version is expected from that resource (again: a
    /// later reconcile's spec replaces the earlier one until it is written).
    pub fn hand_in(&mut self, version: u64, pending: Pending) -> HandIn {
        if !self.primed {
            return HandIn::NotYet;
        }
        if self.writing.get(&version) == Some(&pending.resource) {
            return HandIn::Taken;
        }
        if self.expected.get(&version) != Some(&pending.resource) {
            return HandIn::Refused;
        }
        self.handed_in.insert(version, pending);
        HandIn::Taken
    }

    /// The lowest expected versions, in order, while each has been handed in (at most `max`).
    pub fn next_run(&mut self, max: usize) -> Vec<(u64, Pending)> {
        let mut run = Vec::new();
        while run.len() < max {
            let Some((&v, _)) = self.expected.first_key_value() else {
                break;
            };
            let Some(p) = self.handed_in.remove(&v) else {
                break;
            };
            self.expected.remove(&v);
            self.taken_up_to = v;
            self.writing.insert(v, p.resource.clone());
            run.push((v, p));
        }
        run
    }

    /// Gives up the expected versions below the lowest handed in (all of them when none is):
    /// they hold the others back. Returns their resources, to be reconciled anew.
    pub fn give_up_blocking(&mut self) -> Vec<Resource> {
        let below = self
            .handed_in
            .first_key_value()
            .map(|(v, _)| *v)
            .unwrap_or(u64::MAX);
        let kept = self.expected.split_off(&below);
        let given_up = std::mem::replace(&mut self.expected, kept);
        given_up.into_values().collect()
    }

    pub fn is_idle(&self) -> bool {
        self.expected.is_empty()
    }

    pub fn handed_in(&self) -> usize {
        self.handed_in.len()
    }

    /// True when `version` has been handed in and waits for its turn or its write.
    pub fn is_handed_in(&self, version: u64) -> bool {
        self.handed_in.contains_key(&version) || self.writing.contains_key(&version)
    }

    /// `version` was written (or refused): its reconcile is woken next.
    pub fn written(&mut self, version: u64) {
        self.writing.remove(&version);
    }

    pub fn expected(&self) -> usize {
        self.expected.len()
    }
}

/// The queue shared by the resync pass, the reconciles and the writer.
#[derive(Default)]
pub struct Restorer {
    queue: Mutex<Queue>,
    changed: Notify,
}

impl Restorer {
    /// Called by every resync pass, with what it found restorable (possibly nothing).
    pub fn expect(&self, versions: Vec<(u64, Resource)>) {
        let any = !versions.is_empty();
        self.lock().expect(versions);
        if any {
            self.changed.notify_one();
        }
    }

    /// See [`Queue::is_handed_in`].
    pub fn is_handed_in(&self, version: u64) -> bool {
        self.lock().is_handed_in(version)
    }

    /// See [`Queue::hand_in`].
    pub fn hand_in(&self, version: u64, pending: Pending) -> HandIn {
        let answer = self.lock().hand_in(version, pending);
        if answer == HandIn::Taken {
            self.changed.notify_one();
        }
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer: restores each run in version order, wakes each resource (its reconcile then
    /// finds the record as its status names it, or creates it anew), and gives up what does
    /// not come.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn MappingStore>,
        wake: mpsc::UnboundedSender<Resource>,
        metrics: super::metrics::Metrics,
    ) {
        // Progress: a run written, or more records handed in (not the same ones again).
        let (mut progress, mut seen) = (tokio::time::Instant::now(), 0);
        loop {
            let run = self.lock().next_run(BATCH);
            if !run.is_empty() {
                progress = tokio::time::Instant::now();
                for (version, p) in run {
                    let outcome = match store
                        .restore_within(p.spec, Quota::UNLIMITED, p.id.clone(), version)
                        .await
                    {
                        Ok(m) if m.version == version => "restored",
                        // The log was ahead of the counter: written at the next version.
                        Ok(_) => "restored_at_another_version",
                        Err(e) => {
                            tracing::debug!(id = %p.id, version, error = %e, "not restored; created anew");
                            e.label()
                        }
                    };
                    metrics.restores.with_label_values(&[outcome]).inc();
                    self.lock().written(version);
                    let _ = wake.send(p.resource);
                }
                continue;
            }
            let (idle, handed_in) = {
                let q = self.lock();
                (q.is_idle(), q.handed_in())
            };
            if idle {
                self.changed.notified().await;
                progress = tokio::time::Instant::now();
                continue;
            }
            if handed_in != seen {
                (progress, seen) = (tokio::time::Instant::now(), handed_in);
            }
            let deadline = progress + GIVE_UP_AFTER;
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                progress = tokio::time::Instant::now();
                let given_up = self.lock().give_up_blocking();
                tracing::warn!(
                    count = given_up.len(),
                    first = ?given_up.first(),
                    "records expected back as their status names them did not come; creating them anew"
                );
                metrics
                    .restores
                    .with_label_values(&["given_up"])
                    .inc_by(given_up.len() as u64);
                for r in given_up {
                    let _ = wake.send(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str) -> Resource {
        ObjectRef::new(name).within("default")
    }

    fn pending(name: &str) -> Pending {
        Pending {
            resource: res(name),
            id: MappingId::generate(),
            spec: serde_json::from_value(serde_json::json!({
                "subdomain": name, "base_domain": "tunnox.net",
                "target_host": "127.0.0.1", "target_port": 80,
            }))
            .unwrap(),
        }
    }

    fn versions(run: &[(u64, Pending)]) -> Vec<u64> {
        run.iter().map(|(v, _)| *v).collect()
    }

    fn taken(q: &mut Queue, v: u64, name: &str) -> bool {
        q.hand_in(v, pending(name)) == HandIn::Taken
    }

    #[test]
    fn nothing_is_refused_before_the_first_pass() {
        let mut q = Queue::default();
        assert_eq!(q.hand_in(10, pending("a")), HandIn::NotYet);
        q.expect([]);
        assert_eq!(q.hand_in(10, pending("a")), HandIn::Refused);
    }

    #[test]
    fn writes_in_version_order_once_every_lower_one_is_in() {
        let mut q = Queue::default();
        q.expect([(30, res("c")), (10, res("a")), (20, res("b"))]);
        assert!(taken(&mut q, 30, "c"));
        assert!(q.next_run(10).is_empty(), "10 and 20 are still to come");
        assert!(taken(&mut q, 10, "a"));
        assert_eq!(versions(&q.next_run(10)), [10]);
        // Being written: a reconcile meanwhile waits for that write, it does not create anew.
        assert!(q.is_handed_in(10) && taken(&mut q, 10, "a"));
        q.written(10);
        assert!(!q.is_handed_in(10) && !taken(&mut q, 10, "a"));
        assert!(taken(&mut q, 20, "b"));
        assert_eq!(versions(&q.next_run(10)), [20, 30]);
        assert!(q.is_idle());
        q.written(20);
        q.written(30);
        // A pass that listed the store before those writes expects nothing at or below them.
        q.expect([(20, res("b")), (31, res("d"))]);
        assert!(!taken(&mut q, 20, "b"));
        assert!(taken(&mut q, 31, "d"));
    }

    #[test]
    fn only_expected_versions_from_their_own_resource_once() {
        let mut q = Queue::default();
        q.expect([(10, res("a"))]);
        assert!(!taken(&mut q, 11, "a"), "not expected");
        assert!(!taken(&mut q, 10, "b"), "another resource's version");
        assert!(taken(&mut q, 10, "a"));
        assert!(
            taken(&mut q, 10, "a"),
            "handed in again: still to be written"
        );
        // Expecting again keeps what is there.
        q.expect([(10, res("z"))]);
        assert_eq!(q.next_run(10)[0].1.resource, res("a"));
    }

    #[test]
    fn runs_are_bounded() {
        let mut q = Queue::default();
        q.expect((1..=5).map(|v| (v, res(&v.to_string()))));
        for v in 1..=5 {
            assert!(taken(&mut q, v, &v.to_string()));
        }
        assert_eq!(versions(&q.next_run(2)), [1, 2]);
        assert_eq!(versions(&q.next_run(10)), [3, 4, 5]);
    }

    #[test]
    fn giving_up_frees_the_versions_held_back() {
        let mut q = Queue::default();
        q.expect([
            (10, res("a")),
            (20, res("b")),
            (30, res("c")),
            (40, res("d")),
        ]);
        assert!(taken(&mut q, 30, "c"));
        assert_eq!(q.give_up_blocking(), [res("a"), res("b")]);
        assert_eq!(versions(&q.next_run(10)), [30]);
        // Nothing handed in: everything left is given up.
        assert_eq!(q.give_up_blocking(), [res("d")]);
        assert!(q.is_idle());
        assert!(!taken(&mut q, 10, "a"), "given up: created anew");
    }
}
