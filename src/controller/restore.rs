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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{Notify, mpsc};

use crate::crd::{HTTPDomainMapping, Phase};
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
    /// The resource's uid when handed in: a resource of the same name made since is another.
    pub uid: Option<String>,
    pub id: MappingId,
    pub spec: MappingSpec,
}

/// What becomes of a record a reconcile hands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandIn {
    /// Expected: it will be written in its turn (or is being written).
    Taken,
    /// No resync pass has said what to expect yet (this controller just started): ask again
    /// shortly rather than create it anew.
    NotYet,
    /// Not expected: create it anew.
    Refused,
}

/// The pure part: which versions are expected from which resource, and which have been handed
/// in. Each pass replaces what is expected, so an entry whose resource no longer qualifies
/// (deleted, reprogrammed, held) goes with the next pass, and one resource expects one version.
#[derive(Debug, Default)]
pub struct Queue {
    expected: BTreeMap<u64, Resource>,
    versions: HashMap<Resource, u64>,
    handed_in: BTreeMap<u64, Pending>,
    /// Taken out to be written and not written yet: its reconcile waits for the write too.
    writing: BTreeMap<u64, Resource>,
    /// A resync pass has said what to expect.
    primed: bool,
    /// The store's epoch the expectations are for: another one starts afresh.
    epoch: Option<String>,
    /// The highest version restored in this epoch: the store is past it, so nothing at or
    /// below it can be restored any more (a pass that listed the store just before a write
    /// would otherwise expect it again).
    restored_up_to: u64,
}

impl Queue {
    /// What one resync pass found restorable in the store at `epoch`. A version two resources
    /// name is expected from neither (the store cannot tell which is right).
    pub fn expect(
        &mut self,
        epoch: Option<&str>,
        found: impl IntoIterator<Item = (u64, Resource)>,
    ) {
        self.primed = true;
        if self.epoch.as_deref() != epoch {
            self.epoch = epoch.map(str::to_string);
            self.restored_up_to = 0;
            self.handed_in.clear();
        }
        let mut named: BTreeMap<u64, Option<Resource>> = BTreeMap::new();
        for (v, r) in found {
            if v > self.restored_up_to && !self.writing.contains_key(&v) {
                named
                    .entry(v)
                    .and_modify(|first| *first = None)
                    .or_insert(Some(r));
            }
        }
        self.expected = named
            .into_iter()
            .filter_map(|(v, r)| Some((v, r?)))
            .collect();
        self.versions = self.expected.iter().map(|(v, r)| (r.clone(), *v)).collect();
        let expected = &self.expected;
        self.handed_in
            .retain(|v, p| expected.get(v) == Some(&p.resource));
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

    /// A reconcile of `resource` that did not hand it in (its record exists, it is held, its
    /// domain changed, it is being deleted): nothing of it is written any more. True while a
    /// write of it is in flight (the caller waits for it).
    pub fn forget(&mut self, resource: &Resource) -> bool {
        if let Some(v) = self.versions.remove(resource) {
            self.expected.remove(&v);
            self.handed_in.remove(&v);
        }
        self.writing.values().any(|r| r == resource)
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
            self.versions.remove(&p.resource);
            self.writing.insert(v, p.resource.clone());
            run.push((v, p));
        }
        run
    }

    /// `version` was written (`restored`: at that version) or refused; its reconcile is woken
    /// next.
    pub fn written(&mut self, version: u64, restored: bool) {
        self.writing.remove(&version);
        if restored {
            self.restored_up_to = self.restored_up_to.max(version);
        }
    }

    /// Gives up the expected versions below the lowest handed in: they hold the others back.
    /// Returns their resources, to be reconciled anew. Nothing while nothing is handed in.
    pub fn give_up_blocking(&mut self) -> Vec<Resource> {
        let Some(&below) = self.handed_in.keys().next() else {
            return Vec::new();
        };
        let kept = self.expected.split_off(&below);
        let given_up = std::mem::replace(&mut self.expected, kept);
        given_up
            .into_values()
            .inspect(|r| {
                self.versions.remove(r);
            })
            .collect()
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
}

/// Whether the resource, as the cache holds it now, still wants its record written as handed
/// in: the same object (uid), not being deleted, `Active` with that id and version, for the
/// domain the spec claims.
pub fn still_wanted(obj: &HTTPDomainMapping, version: u64, p: &Pending) -> bool {
    let Some(status) = obj.status.as_ref() else {
        return false;
    };
    obj.metadata.uid == p.uid
        && obj.metadata.deletion_timestamp.is_none()
        && status.phase == Phase::Active
        && status.mapping_id.as_deref() == Some(p.id.as_str())
        && status.version.and_then(|v| u64::try_from(v).ok()) == Some(version)
        && p.spec
            .validate()
            .is_ok_and(|full| status.full_domain.as_deref() == Some(full.as_str()))
}

/// How long after this leader starts a reconcile waits for the first resync pass before it
/// creates a lost record anew (the pass normally runs within a second or two).
const PRIME_WITHIN: Duration = Duration::from_secs(60);

/// The queue shared by the resync pass, the reconciles and the writer.
pub struct Restorer {
    queue: Mutex<Queue>,
    changed: Notify,
    started: Instant,
}

impl Default for Restorer {
    fn default() -> Self {
        Self {
            queue: Mutex::default(),
            changed: Notify::new(),
            started: Instant::now(),
        }
    }
}

impl Restorer {
    /// Called by every resync pass, with what it found restorable (possibly nothing) in the
    /// store at `epoch`.
    pub fn expect(&self, epoch: Option<&str>, found: Vec<(u64, Resource)>) {
        self.lock().expect(epoch, found);
        self.changed.notify_one();
    }

    /// See [`Queue::is_handed_in`].
    pub fn is_handed_in(&self, version: u64) -> bool {
        self.lock().is_handed_in(version)
    }

    /// See [`Queue::forget`].
    pub fn forget(&self, resource: &Resource) -> bool {
        self.lock().forget(resource)
    }

    /// See [`Queue::hand_in`]; past [`PRIME_WITHIN`] without a pass, `NotYet` is `Refused`.
    pub fn hand_in(&self, version: u64, pending: Pending) -> HandIn {
        let answer = match self.lock().hand_in(version, pending) {
            HandIn::NotYet if self.started.elapsed() > PRIME_WITHIN => HandIn::Refused,
            answer => answer,
        };
        if answer == HandIn::Taken {
            self.changed.notify_one();
        }
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer: restores each run in version order (each record only if its resource, as
    /// the cache holds it then, still wants it), wakes each resource (its reconcile then finds
    /// the record as its status names it, or creates it anew), and gives up what does not
    /// come.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn MappingStore>,
        cache: Store<HTTPDomainMapping>,
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
                    let wanted = cache
                        .get(&p.resource)
                        .is_some_and(|obj| still_wanted(&obj, version, &p));
                    let outcome = if !wanted {
                        "no_longer_wanted"
                    } else {
                        match store
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
                        }
                    };
                    metrics.restores.with_label_values(&[outcome]).inc();
                    self.lock().written(version, outcome == "restored");
                    let _ = wake.send(p.resource);
                }
                continue;
            }
            let (idle, handed_in) = {
                let q = self.lock();
                (q.is_idle(), q.handed_in())
            };
            if idle || handed_in == 0 {
                // Nothing to write, nor anything held back: wait for a pass or a hand-in.
                self.changed.notified().await;
                (progress, seen) = (tokio::time::Instant::now(), 0);
                continue;
            }
            if handed_in != seen {
                (progress, seen) = (tokio::time::Instant::now(), handed_in);
            }
            if tokio::time::timeout_at(progress + GIVE_UP_AFTER, self.changed.notified())
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

    fn spec(name: &str) -> MappingSpec {
        serde_json::from_value(serde_json::json!({
            "subdomain": name, "base_domain": "tunnox.net",
            "target_host": "127.0.0.1", "target_port": 80,
        }))
        .unwrap()
    }

    fn pending(name: &str) -> Pending {
        Pending {
            resource: res(name),
            uid: Some(format!("uid-{name}")),
            id: MappingId::generate(),
            spec: spec(name),
        }
    }

    fn versions(run: &[(u64, Pending)]) -> Vec<u64> {
        run.iter().map(|(v, _)| *v).collect()
    }

    fn taken(q: &mut Queue, v: u64, name: &str) -> bool {
        q.hand_in(v, pending(name)) == HandIn::Taken
    }

    const E: Option<&str> = Some("e1");

    #[test]
    fn nothing_is_refused_before_the_first_pass() {
        let mut q = Queue::default();
        assert_eq!(q.hand_in(10, pending("a")), HandIn::NotYet);
        q.expect(E, []);
        assert_eq!(q.hand_in(10, pending("a")), HandIn::Refused);
    }

    #[test]
    fn writes_in_version_order_once_every_lower_one_is_in() {
        let mut q = Queue::default();
        q.expect(E, [(30, res("c")), (10, res("a")), (20, res("b"))]);
        assert!(taken(&mut q, 30, "c"));
        assert!(q.next_run(10).is_empty(), "10 and 20 are still to come");
        assert!(taken(&mut q, 10, "a"));
        assert_eq!(versions(&q.next_run(10)), [10]);
        // Being written: a reconcile meanwhile waits for that write, it does not create anew.
        assert!(q.is_handed_in(10) && taken(&mut q, 10, "a"));
        q.written(10, true);
        assert!(!q.is_handed_in(10) && !taken(&mut q, 10, "a"));
        assert!(taken(&mut q, 20, "b"));
        assert_eq!(versions(&q.next_run(10)), [20, 30]);
        q.written(20, true);
        q.written(30, false);
        assert!(q.is_idle());
        // A pass that listed the store before those writes expects nothing at or below the
        // highest restored.
        q.expect(E, [(20, res("b")), (25, res("x")), (31, res("d"))]);
        assert!(!taken(&mut q, 20, "b"));
        assert!(
            taken(&mut q, 25, "x"),
            "30 was refused, not restored: the floor is 20"
        );
        assert!(taken(&mut q, 31, "d"));
    }

    #[test]
    fn each_pass_replaces_what_is_expected() {
        let mut q = Queue::default();
        q.expect(E, [(10, res("a")), (20, res("b"))]);
        assert!(taken(&mut q, 20, "b"));
        // b no longer qualifies (deleted, reprogrammed): its hand-in goes too.
        q.expect(E, [(10, res("a"))]);
        assert!(!q.is_handed_in(20));
        assert!(taken(&mut q, 10, "a"));
        assert_eq!(versions(&q.next_run(10)), [10]);
        // Another epoch (flushed again): everything starts afresh, also the floor.
        q.written(10, true);
        q.expect(Some("e2"), [(5, res("a"))]);
        assert!(taken(&mut q, 5, "a"));
    }

    #[test]
    fn a_version_two_resources_name_is_expected_from_neither() {
        let mut q = Queue::default();
        q.expect(
            E,
            [(10, res("victim")), (10, res("copycat")), (11, res("c"))],
        );
        assert!(!taken(&mut q, 10, "victim"));
        assert!(!taken(&mut q, 10, "copycat"));
        assert!(taken(&mut q, 11, "c"));
        assert_eq!(versions(&q.next_run(10)), [11]);
    }

    #[test]
    fn only_expected_versions_from_their_own_resource() {
        let mut q = Queue::default();
        q.expect(E, [(10, res("a"))]);
        assert!(!taken(&mut q, 11, "a"), "not expected");
        assert!(!taken(&mut q, 10, "b"), "another resource's version");
        assert!(taken(&mut q, 10, "a"));
        assert!(
            taken(&mut q, 10, "a"),
            "handed in again: still to be written"
        );
    }

    #[test]
    fn a_forgotten_resource_is_not_written() {
        let mut q = Queue::default();
        q.expect(E, [(10, res("a")), (20, res("b"))]);
        assert!(taken(&mut q, 10, "a") && taken(&mut q, 20, "b"));
        assert!(!q.forget(&res("b")), "not being written");
        assert_eq!(versions(&q.next_run(10)), [10]);
        assert!(
            q.forget(&res("a")),
            "a is being written: the caller waits for it"
        );
        q.written(10, true);
        assert!(!q.forget(&res("a")));
        assert!(q.is_idle());
    }

    #[test]
    fn runs_are_bounded() {
        let mut q = Queue::default();
        q.expect(E, (1..=5).map(|v| (v, res(&v.to_string()))));
        for v in 1..=5 {
            assert!(taken(&mut q, v, &v.to_string()));
        }
        assert_eq!(versions(&q.next_run(2)), [1, 2]);
        assert_eq!(versions(&q.next_run(10)), [3, 4, 5]);
    }

    #[test]
    fn giving_up_frees_the_versions_held_back() {
        let mut q = Queue::default();
        q.expect(
            E,
            [
                (10, res("a")),
                (20, res("b")),
                (30, res("c")),
                (40, res("d")),
            ],
        );
        assert!(
            q.give_up_blocking().is_empty(),
            "nothing handed in: nothing held back"
        );
        assert!(taken(&mut q, 30, "c"));
        assert_eq!(q.give_up_blocking(), [res("a"), res("b")]);
        assert_eq!(versions(&q.next_run(10)), [30]);
        assert!(!taken(&mut q, 10, "a"), "given up: created anew");
        assert!(taken(&mut q, 40, "d"));
    }

    #[test]
    fn only_the_same_active_resource_with_that_id_and_version_is_written() {
        let p = pending("a");
        let obj = |edit: &dyn Fn(&mut HTTPDomainMapping)| {
            let mut o: HTTPDomainMapping = serde_json::from_value(serde_json::json!({
                "apiVersion": "tunnox.net/v1alpha1", "kind": "HTTPDomainMapping",
                "metadata": {"name": "a", "namespace": "default", "uid": "uid-a"},
                "spec": {"subdomain": "a", "baseDomain": "tunnox.net",
                         "target": {"address": {"host": "127.0.0.1", "port": 80}}},
                "status": {"phase": "Active", "mappingId": p.id.as_str(), "version": 10,
                           "fullDomain": "a.tunnox.net"},
            }))
            .unwrap();
            edit(&mut o);
            o
        };
        assert!(still_wanted(&obj(&|_| {}), 10, &p));
        type Edit<'a> = &'a dyn Fn(&mut HTTPDomainMapping);
        let cases: [(&str, Edit); 5] = [
            ("another object of that name", &|o| {
                o.metadata.uid = Some("uid-b".into())
            }),
            ("being deleted", &|o| {
                o.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        jiff::Timestamp::UNIX_EPOCH,
                    ))
            }),
            ("held since", &|o| {
                o.status.as_mut().unwrap().phase = Phase::Rejected
            }),
            ("another version", &|o| {
                o.status.as_mut().unwrap().version = Some(11)
            }),
            ("another domain", &|o| {
                o.status.as_mut().unwrap().full_domain = Some("b.tunnox.net".into())
            }),
        ];
        for (what, edit) in cases {
            assert!(!still_wanted(&obj(edit), 10, &p), "{what}");
        }
    }
}
