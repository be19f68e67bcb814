//! Which proxies serve a mapping's version, so that `Ready` means served (docs/controller.md
//! "Ready means served"): a programmed mapping is `Ready` only once every healthy proxy of its
//! serving set has applied its store version.
//!
//! Proxies announce each version they apply at once on pub/sub, and with every heartbeat in
//! the node registry. The leader keeps what both say here, tallies a mapping's version against
//! it, and wakes the mappings that wait for a proxy when it catches up or leaves the registry.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use prometheus::{IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, watch};

use crate::crd::HTTPDomainMapping;
use crate::domain::SetName;
use crate::store::{Applied, NodeRecord, NodeState};

/// A proxy behind for longer than this without advancing is lagging: it is named in status and
/// metrics, and reconciles stop waiting for it.
pub const LAGGING_AFTER: Duration = Duration::from_secs(1);

/// What the leader knows of one registered proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub set: SetName,
    /// Active (not draining): a healthy proxy that must have applied a version.
    pub active: bool,
    /// The store epoch its table follows; empty until its first load is done (warming).
    pub epoch: String,
    pub applied: u64,
    /// Its epoch is the store's (or the store's is not known): its versions compare with ours.
    pub current: bool,
    /// Since when it is below the newest version the controller programmed without advancing.
    pub behind_since: Option<Instant>,
}

impl NodeView {
    fn new(set: SetName, active: bool) -> Self {
        Self {
            set,
            active,
            epoch: String::new(),
            applied: 0,
            current: false,
            behind_since: None,
        }
    }

    /// Healthy: active, and warm (a proxy still loading its table takes no traffic yet).
    pub fn healthy(&self) -> bool {
        self.active && !self.epoch.is_empty()
    }

    /// Takes what a node says it applied: a higher version of the same history, or any version
    /// of another history (the store was replaced); an empty epoch (not warm) never replaces a
    /// known one. A stale read of the registry, older than an announcement already taken,
    /// changes nothing. True when the version moved; then it is no longer lagging.
    pub fn take(&mut self, epoch: &str, applied: u64) -> bool {
        let moved = if self.epoch != epoch && !epoch.is_empty() {
            self.epoch = epoch.to_string();
            self.applied = applied;
            true
        } else if self.epoch == epoch && applied > self.applied {
            self.applied = applied;
            true
        } else {
            false
        };
        if moved {
            self.behind_since = None;
        }
        moved
    }
}

/// A mapping's version against the proxies that must serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    /// The set serving the mapping (`None`: an unplaced mapping, served by every set).
    pub scope: Option<SetName>,
    /// Healthy proxies of the scope that applied the version.
    pub served: usize,
    pub total: usize,
    /// Those that did not, by name, with the version they are at.
    pub behind: Vec<(String, u64)>,
}

impl Tally {
    /// Served by every healthy proxy of its scope, and there is at least one.
    pub fn complete(&self) -> bool {
        self.total > 0 && self.served == self.total
    }

    /// `N/M`, as `status.proxies` shows it.
    pub fn shown(&self) -> String {
        format!("{}/{}", self.served, self.total)
    }
}

/// The tally of `version` for a mapping placed on `placement` (`None`: unplaced): its serving
/// set is decided from the active nodes as proxies decide it (home, else the business's DR set).
pub fn tally(
    nodes: &BTreeMap<String, NodeView>,
    placement: Option<&SetName>,
    version: u64,
) -> Tally {
    let active = || nodes.iter().filter(|(_, n)| n.healthy());
    let scope = placement.and_then(|p| {
        let healthy: Vec<&SetName> = active().map(|(_, n)| &n.set).collect();
        crate::domain::serving_set(p, healthy.iter().copied())
    });
    let mut t = Tally {
        scope: scope.clone(),
        served: 0,
        total: 0,
        behind: Vec::new(),
    };
    if placement.is_some() && scope.is_none() {
        return t;
    }
    for (id, n) in active().filter(|(_, n)| scope.as_ref().is_none_or(|s| &n.set == s)) {
        t.total += 1;
        if n.current && n.applied >= version {
            t.served += 1;
        } else {
            t.behind.push((id.clone(), n.applied));
        }
    }
    t
}

/// The highest version every healthy proxy serving `placement` has applied; `None` while no
/// healthy proxy serves it. A mapping of that placement at or below it is served.
pub fn served_up_to(
    nodes: &BTreeMap<String, NodeView>,
    placement: Option<&SetName>,
) -> Option<u64> {
    let t = tally(nodes, placement, 0);
    if t.total == 0 || t.served < t.total {
        // None, or one follows another history: nothing is served by all of them.
        return None;
    }
    nodes
        .values()
        .filter(|n| n.healthy() && t.scope.as_ref().is_none_or(|s| &n.set == s))
        .map(|n| n.applied)
        .min()
}

type Mappings = std::collections::HashSet<ObjectRef<HTTPDomainMapping>>;

#[derive(Default)]
struct Inner {
    /// `None` until the registry was read once.
    nodes: Option<BTreeMap<String, NodeView>>,
    /// Mappings not served yet, by placement, then by the version they wait for: one look per
    /// placement finds every waiter now served (those at or below [`served_up_to`]).
    waiting: HashMap<Option<SetName>, BTreeMap<u64, Mappings>>,
    /// What each waiting mapping waits for (to replace or forget it).
    waits_for: HashMap<ObjectRef<HTTPDomainMapping>, (Option<SetName>, u64)>,
    /// The newest version the controller programmed: a node below it is behind.
    wanted: u64,
    /// The store's epoch, as last read (`None`: not known; every node's versions count).
    epoch: Option<String>,
}

impl Inner {
    /// Which nodes follow the store's history.
    fn mark_current(&mut self) {
        let epoch = self.epoch.as_deref();
        for n in self.nodes.iter_mut().flat_map(|n| n.values_mut()) {
            n.current = epoch.is_none_or(|e| e == n.epoch);
        }
    }

    /// Marks who is behind `wanted` (since when).
    fn mark_behind(&mut self, now: Instant) {
        for n in self.nodes.iter_mut().flat_map(|n| n.values_mut()) {
            if n.current && n.applied >= self.wanted {
                n.behind_since = None;
            } else if n.behind_since.is_none() {
                n.behind_since = Some(now);
            }
        }
    }

    /// Wakes the waiters now served.
    fn wake_served(&mut self, wake: &mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>) {
        let Some(nodes) = &self.nodes else {
            return;
        };
        for (placement, by_version) in &mut self.waiting {
            let Some(up_to) = served_up_to(nodes, placement.as_ref()) else {
                continue;
            };
            let later = by_version.split_off(&(up_to + 1));
            for obj in std::mem::replace(by_version, later).into_values().flatten() {
                self.waits_for.remove(&obj);
                let _ = wake.send(obj);
            }
        }
        self.waiting.retain(|_, by_version| !by_version.is_empty());
    }

    fn forget(&mut self, obj: &ObjectRef<HTTPDomainMapping>) {
        let Some((placement, version)) = self.waits_for.remove(obj) else {
            return;
        };
        if let Some(by_version) = self.waiting.get_mut(&placement) {
            if let Some(objs) = by_version.get_mut(&version) {
                objs.remove(obj);
                if objs.is_empty() {
                    by_version.remove(&version);
                }
            }
            if by_version.is_empty() {
                self.waiting.remove(&placement);
            }
        }
    }
}

/// The fleet's applied versions, as the leader sees them.
pub struct Served {
    inner: Mutex<Inner>,
    /// Moves on every change, for [`Served::settle`] to wait on.
    changed: watch::Sender<u64>,
    wake: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
    metrics: ServedMetrics,
}

impl Served {
    pub fn new(
        wake: mpsc::UnboundedSender<ObjectRef<HTTPDomainMapping>>,
        registry: &Registry,
    ) -> Self {
        Self {
            inner: Mutex::default(),
            changed: watch::channel(0).0,
            wake,
            metrics: ServedMetrics::register(registry),
        }
    }

    /// Applies `f`, then settles who is current and behind and wakes the waiters served;
    /// returns what `f` returned.
    fn update<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut inner = self.inner.lock().expect("not poisoned");
        let r = f(&mut inner);
        inner.mark_current();
        inner.mark_behind(Instant::now());
        inner.wake_served(&self.wake);
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
        r
    }

    /// The registry as read, with the store's epoch (`None`: unknown): nodes gone from it are
    /// forgotten, new ones added, each one's version taken by [`NodeView::take`].
    pub fn refresh(&self, list: &[NodeRecord], epoch: Option<String>) {
        self.update(|inner| {
            if epoch.is_some() && inner.epoch != epoch {
                // Another history: versions start over.
                inner.wanted = 0;
                inner.epoch = epoch;
            }
            let old = inner.nodes.take().unwrap_or_default();
            let mut nodes = BTreeMap::new();
            for r in list {
                let mut view = old
                    .get(&r.node_id)
                    .cloned()
                    .unwrap_or_else(|| NodeView::new(r.set.clone(), false));
                view.set = r.set.clone();
                view.active = r.state == NodeState::Active;
                view.take(&r.epoch, r.applied_version);
                nodes.insert(r.node_id.clone(), view);
            }
            inner.nodes = Some(nodes);
        });
        let inner = self.inner.lock().expect("not poisoned");
        self.metrics.show(inner.nodes.as_ref());
    }

    /// A node's announcement. Only nodes of the last registry read are taken (a node registers
    /// before it announces): an announcement of a node that left, or of no node at all, changes
    /// nothing.
    pub fn observe(&self, a: &Applied) {
        let moved = self.update(|inner| {
            inner
                .nodes
                .as_mut()
                .and_then(|nodes| nodes.get_mut(&a.node_id))
                .is_some_and(|n| n.take(&a.epoch, a.applied))
        });
        if moved {
            self.metrics.applied(&a.node_id, a.applied);
        }
    }

    /// The tally of `version` now; `None` until the registry was read.
    pub fn tally(&self, placement: Option<&SetName>, version: u64) -> Option<Tally> {
        let inner = self.inner.lock().expect("not poisoned");
        inner
            .nodes
            .as_ref()
            .map(|nodes| tally(nodes, placement, version))
    }

    /// The tally of a version just programmed, once every proxy of its scope applied it, or
    /// after `within`, or as soon as a proxy it waits for is lagging (a frozen proxy must not
    /// hold up every reconcile). Waits for the first registry read, too.
    pub async fn settle(
        &self,
        placement: Option<&SetName>,
        version: u64,
        within: Duration,
    ) -> Option<Tally> {
        let deadline = tokio::time::Instant::now() + within;
        let mut changes = self.changed.subscribe();
        {
            let mut inner = self.inner.lock().expect("not poisoned");
            if version > inner.wanted {
                inner.wanted = version;
                inner.mark_behind(Instant::now());
            }
        }
        loop {
            changes.borrow_and_update();
            let (t, lagging) = {
                let inner = self.inner.lock().expect("not poisoned");
                match &inner.nodes {
                    None => (None, false),
                    Some(nodes) => {
                        let t = tally(nodes, placement, version);
                        let lagging = t.behind.iter().any(|(id, _)| {
                            nodes
                                .get(id)
                                .and_then(|n| n.behind_since)
                                .is_some_and(|s| s.elapsed() >= LAGGING_AFTER)
                        });
                        (Some(t), lagging)
                    }
                }
            };
            let done = t.as_ref().is_some_and(|t| t.complete() || t.total == 0);
            if done || lagging {
                return t;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return t;
            }
        }
    }

    /// Wakes `obj` when every proxy of its scope has applied `version` (a later call for the
    /// same mapping replaces this one); [`Served::forget`] when it no longer waits.
    pub fn wait_for(
        &self,
        obj: ObjectRef<HTTPDomainMapping>,
        placement: Option<SetName>,
        version: u64,
    ) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.forget(&obj);
        inner
            .waiting
            .entry(placement.clone())
            .or_default()
            .entry(version)
            .or_default()
            .insert(obj.clone());
        inner.waits_for.insert(obj, (placement, version));
        // Served meanwhile (between the caller's tally and now): woken at once.
        inner.wake_served(&self.wake);
    }

    pub fn forget(&self, obj: &ObjectRef<HTTPDomainMapping>) {
        self.inner.lock().expect("not poisoned").forget(obj);
    }

    /// How many mappings wait for a proxy.
    pub fn waiting(&self) -> usize {
        self.inner.lock().expect("not poisoned").waits_for.len()
    }
}

/// `tunnox_controller_proxy_applied_version{node}` and `..._proxy_behind_seconds{node}`: one
/// series per registered proxy (bounded by the fleet), removed when it leaves the registry.
struct ServedMetrics {
    /// Healthy proxies known (active and warm): those a mapping's `Ready` waits for.
    healthy: prometheus::IntGauge,
    applied: IntGaugeVec,
    behind: prometheus::GaugeVec,
    shown: Mutex<Vec<String>>,
}

impl ServedMetrics {
    fn register(registry: &Registry) -> Self {
        let applied = IntGaugeVec::new(
            Opts::new(
                "proxy_applied_version",
                "Store version each registered proxy has applied to its routing table",
            ),
            &["node"],
        )
        .expect("valid");
        let behind = prometheus::GaugeVec::new(
            Opts::new(
                "proxy_behind_seconds",
                "How long each proxy has been below the newest version the controller programmed (0: caught up)",
            ),
            &["node"],
        )
        .expect("valid");
        let healthy = prometheus::IntGauge::new(
            "proxies_healthy",
            "Registered proxies that are active and warm: those Ready waits for",
        )
        .expect("valid");
        for c in [
            Box::new(healthy.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(applied.clone()),
            Box::new(behind.clone()),
        ] {
            // Once per registry: a second `Served` on the same one (unit tests) stays unregistered.
            let _ = registry.register(c);
        }
        Self {
            healthy,
            applied,
            behind,
            shown: Mutex::default(),
        }
    }

    /// One node's version, as announced (the rest are shown with each registry read).
    fn applied(&self, node: &str, applied: u64) {
        if let Ok(g) = self.applied.get_metric_with_label_values(&[node]) {
            g.set(i64::try_from(applied).unwrap_or(i64::MAX));
        }
    }

    fn show(&self, nodes: Option<&BTreeMap<String, NodeView>>) {
        let Some(nodes) = nodes else {
            return;
        };
        let mut shown = self.shown.lock().expect("not poisoned");
        for gone in shown.iter().filter(|id| !nodes.contains_key(*id)) {
            let _ = self.applied.remove_label_values(&[gone]);
            let _ = self.behind.remove_label_values(&[gone]);
        }
        *shown = nodes.keys().cloned().collect();
        self.healthy
            .set(nodes.values().filter(|n| n.healthy()).count() as i64);
        for (id, n) in nodes {
            self.applied
                .with_label_values(&[id])
                .set(i64::try_from(n.applied).unwrap_or(i64::MAX));
            self.behind
                .with_label_values(&[id])
                .set(n.behind_since.map_or(0.0, |s| s.elapsed().as_secs_f64()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> SetName {
        SetName::parse(s).unwrap()
    }

    fn view(s: &str, active: bool, applied: u64) -> NodeView {
        NodeView {
            epoch: "e1".into(),
            applied,
            current: true,
            ..NodeView::new(set(s), active)
        }
    }

    #[test]
    fn a_version_is_tallied_against_the_healthy_proxies_of_its_serving_set() {
        let nodes: BTreeMap<String, NodeView> = [
            ("a", view("novel.sh", true, 10)),
            ("b", view("novel.sh", true, 7)),
            ("c", view("novel.sh", false, 1)), // draining: not counted
            ("d", view("novel.sz", true, 3)),
            ("e", view("game.sh", true, 10)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // (placement, version, scope, served, total, behind)
        type Case = (
            Option<&'static str>,
            u64,
            Option<&'static str>,
            usize,
            usize,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (Some("novel.sh"), 7, Some("novel.sh"), 2, 2, vec![]),
            (Some("novel.sh"), 8, Some("novel.sh"), 1, 2, vec!["b"]),
            // novel.bj has no node: its business's DR set novel.* has none either.
            (Some("novel.bj"), 1, None, 0, 0, vec![]),
            (Some("novel.sz"), 3, Some("novel.sz"), 1, 1, vec![]),
            (Some("game.sh"), 11, Some("game.sh"), 0, 1, vec!["e"]),
            // Unplaced: every healthy proxy of every set.
            (None, 7, None, 3, 4, vec!["d"]),
            (None, 11, None, 0, 4, vec!["a", "b", "d", "e"]),
        ];
        for (placement, version, scope, served, total, behind) in cases {
            let t = tally(&nodes, placement.map(set).as_ref(), version);
            let what = format!("{placement:?} at {version}: {t:?}");
            assert_eq!(t.scope, scope.map(set), "{what}");
            assert_eq!((t.served, t.total), (served, total), "{what}");
            let names: Vec<&str> = t.behind.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, behind, "{what}");
            assert_eq!(t.complete(), total > 0 && served == total, "{what}");
        }
        // The version every proxy of a placement has applied.
        assert_eq!(served_up_to(&nodes, Some(&set("novel.sh"))), Some(7));
        assert_eq!(served_up_to(&nodes, None), Some(3));
        assert_eq!(
            served_up_to(&nodes, Some(&set("novel.bj"))),
            None,
            "no proxy"
        );
        // A proxy still warming is not counted; one following another history is behind.
        let mut mixed = nodes.clone();
        mixed.insert(
            "w".into(),
            NodeView {
                epoch: String::new(),
                ..view("novel.sh", true, 0)
            },
        );
        mixed.insert(
            "o".into(),
            NodeView {
                epoch: "e0".into(),
                current: false,
                ..view("novel.sh", true, 99)
            },
        );
        let t = tally(&mixed, Some(&set("novel.sh")), 7);
        assert_eq!((t.served, t.total), (2, 3), "{t:?}");
        assert_eq!(t.behind, vec![("o".to_string(), 99)]);
        assert_eq!(served_up_to(&mixed, Some(&set("novel.sh"))), None);
        let dr = BTreeMap::from([("z".to_string(), view("novel.*", true, 5))]);
        let t = tally(&dr, Some(&set("novel.sh")), 5);
        assert_eq!(
            (t.scope.clone(), t.served, t.total),
            (Some(set("novel.*")), 1, 1),
            "DR set"
        );
        assert_eq!(t.shown(), "1/1");
    }

    #[test]
    fn a_stale_registry_read_never_moves_a_node_back_but_a_new_history_does() {
        let mut n = view("novel.sh", true, 10);
        assert!(!n.take("e1", 9), "older read of the same history");
        assert_eq!(n.applied, 10);
        assert!(n.take("e1", 12));
        assert_eq!(n.applied, 12);
        assert!(n.take("e2", 3), "the store was replaced");
        assert_eq!((n.epoch.as_str(), n.applied), ("e2", 3));
        assert!(
            !n.take("", 0),
            "a warming node's empty epoch never replaces a known one"
        );
        assert_eq!((n.epoch.as_str(), n.applied), ("e2", 3));
        n.behind_since = Some(Instant::now());
        assert!(n.take("e2", 4));
        assert_eq!(n.behind_since, None, "advancing is not lagging");
    }

    fn record(id: &str, state: NodeState, applied: u64) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            set: set("default.default"),
            address: "127.0.0.1:1".into(),
            admin_address: "127.0.0.1:2".into(),
            tunnel_address: String::new(),
            state,
            applied_version: applied,
            epoch: "e1".into(),
            heartbeat_at: chrono::Utc::now(),
        }
    }

    fn announce(id: &str, applied: u64) -> Applied {
        Applied {
            node_id: id.into(),
            set: set("default.default"),
            epoch: "e1".into(),
            applied,
        }
    }

    #[tokio::test]
    async fn waiters_wake_when_the_last_proxy_applies_or_leaves() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let served = Served::new(tx, &Registry::new());
        let obj = ObjectRef::<HTTPDomainMapping>::new("m").within("ns");
        assert_eq!(served.tally(None, 1), None, "unread registry");
        served.observe(&announce("a", 5));
        assert_eq!(
            served.tally(None, 1),
            None,
            "announcements wait for the registry"
        );
        served.refresh(
            &[
                record("a", NodeState::Active, 5),
                record("b", NodeState::Active, 5),
                record("c", NodeState::Active, 5),
            ],
            Some("e1".into()),
        );
        served.observe(&announce("nobody", 9));
        assert_eq!(
            served.tally(None, 5).unwrap().total,
            3,
            "an announcement of an unregistered node adds nothing"
        );
        served.wait_for(obj.clone(), None, 6);
        // Another mapping waits for a later version: woken only when that one is applied.
        let later = ObjectRef::<HTTPDomainMapping>::new("later").within("ns");
        served.wait_for(later.clone(), None, 7);
        assert_eq!(served.waiting(), 2);
        served.observe(&announce("a", 6));
        served.observe(&announce("b", 7));
        assert!(rx.try_recv().is_err(), "c has not applied 6");
        assert_eq!(served.tally(None, 6).unwrap().shown(), "2/3");
        served.observe(&announce("c", 6));
        assert_eq!(rx.try_recv().unwrap(), obj);
        assert!(rx.try_recv().is_err(), "7 is not applied by a and c");
        assert!(served.tally(None, 6).unwrap().complete());
        served.observe(&announce("a", 7));
        served.observe(&announce("c", 7));
        assert_eq!(rx.try_recv().unwrap(), later);
        assert_eq!(served.waiting(), 0);
        // Waiting again replaces what a mapping waited for; served already: woken at once.
        served.wait_for(obj.clone(), None, 100);
        served.wait_for(obj.clone(), None, 7);
        assert_eq!(rx.try_recv().unwrap(), obj);
        assert_eq!(served.waiting(), 0);

        // A proxy that leaves the registry (expired, or drained) no longer holds anything up.
        served.wait_for(obj.clone(), None, 8);
        served.observe(&announce("a", 8));
        served.observe(&announce("b", 8));
        assert!(rx.try_recv().is_err());
        served.refresh(
            &[
                record("a", NodeState::Active, 8),
                record("b", NodeState::Active, 8),
            ],
            Some("e1".into()),
        );
        assert_eq!(rx.try_recv().unwrap(), obj);

        // A draining proxy does not count; a forgotten waiter is not woken.
        served.wait_for(obj.clone(), None, 9);
        served.forget(&obj);
        assert_eq!(served.waiting(), 0);
        served.refresh(
            &[
                record("a", NodeState::Active, 9),
                record("b", NodeState::Draining, 8),
            ],
            Some("e1".into()),
        );
        assert!(rx.try_recv().is_err());
        assert!(served.tally(None, 9).unwrap().complete());
    }

    #[tokio::test]
    async fn settle_returns_when_served_and_stops_waiting_for_a_lagging_proxy() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let served = std::sync::Arc::new(Served::new(tx, &Registry::new()));
        served.refresh(
            &[
                record("a", NodeState::Active, 1),
                record("b", NodeState::Active, 1),
            ],
            Some("e1".into()),
        );
        let waiting = {
            let s = served.clone();
            tokio::spawn(async move { s.settle(None, 2, Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        served.observe(&announce("a", 2));
        served.observe(&announce("b", 2));
        let t = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("settles as soon as both applied")
            .unwrap()
            .unwrap();
        assert_eq!(t.shown(), "2/2");

        // b stops advancing: the first settle waits for it up to `within`; once b is behind for
        // LAGGING_AFTER, settles return at once with b named.
        let started = Instant::now();
        let t = served
            .settle(None, 3, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(t.shown(), "0/2");
        served.observe(&announce("a", 3));
        tokio::time::sleep(LAGGING_AFTER).await;
        let started = Instant::now();
        let t = served
            .settle(None, 3, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(t.behind, vec![("b".to_string(), 2)]);
    }
}
