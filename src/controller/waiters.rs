//! The mappings waiting in `Conflict`, by the domain they want, kept from the same watch stream
//! that fills the reflector's cache. A new claim looks here for older waiters instead of
//! scanning every cached mapping: that scan made a first programming of 100 000 mappings
//! quadratic (56 claims a second at 44 000, most of the controller's CPU in the scan).
//!
//! It only names candidates: the claim checks each against the cache as it is then, so an
//! entry a moment stale can cost a lookup, never a wrong verdict.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::crd::{HTTPDomainMapping, Phase};
use crate::domain::Hostname;

type Resource = ObjectRef<HTTPDomainMapping>;

#[derive(Default)]
struct Index {
    by_domain: HashMap<Hostname, HashSet<Resource>>,
    domain_of: HashMap<Resource, Hostname>,
}

impl Index {
    fn remove(&mut self, r: &Resource) {
        if let Some(domain) = self.domain_of.remove(r)
            && let Some(set) = self.by_domain.get_mut(&domain)
        {
            set.remove(r);
            if set.is_empty() {
                self.by_domain.remove(&domain);
            }
        }
    }

    fn apply(&mut self, obj: &HTTPDomainMapping) {
        let r = ObjectRef::from_obj(obj);
        self.remove(&r);
        let waiting = obj
            .status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Conflict);
        if waiting && let Some(domain) = super::decide::full_domain(obj) {
            self.by_domain
                .entry(domain.clone())
                .or_default()
                .insert(r.clone());
            self.domain_of.insert(r, domain);
        }
    }
}

#[derive(Default)]
pub struct Waiters {
    inner: Mutex<(Index, Option<Index>)>,
}

impl Waiters {
    /// Follows one watch event (a relist builds a new index, used once complete).
    pub fn observe(&self, event: &Event<HTTPDomainMapping>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (current, relist) = &mut *inner;
        match event {
            Event::Apply(obj) => current.apply(obj),
            Event::Delete(obj) => current.remove(&ObjectRef::from_obj(obj)),
            Event::Init => *relist = Some(Index::default()),
            Event::InitApply(obj) => relist.get_or_insert_with(Index::default).apply(obj),
            Event::InitDone => {
                if let Some(done) = relist.take() {
                    *current = done;
                }
            }
        }
    }

    /// The mappings last seen waiting for `domain`.
    pub fn candidates(&self, domain: &Hostname) -> Vec<Resource> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .0
            .by_domain
            .get(domain)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{HTTPDomainMappingSpec, HTTPDomainMappingStatus, Target};

    fn hdm(name: &str, sub: &str, phase: Option<Phase>) -> HTTPDomainMapping {
        let mut h = HTTPDomainMapping::new(
            name,
            HTTPDomainMappingSpec::new(sub, "tunnox.net", Target::service("web", 80)),
        );
        h.metadata.namespace = Some("ns".into());
        h.status = phase.map(|phase| HTTPDomainMappingStatus {
            phase,
            ..Default::default()
        });
        h
    }

    fn names(w: &Waiters, sub: &str) -> Vec<String> {
        let domain = Hostname::join(sub, "tunnox.net").unwrap();
        let mut n: Vec<String> = w.candidates(&domain).into_iter().map(|r| r.name).collect();
        n.sort();
        n
    }

    #[test]
    fn follows_waiting_mappings_through_events_and_relists() {
        let w = Waiters::default();
        w.observe(&Event::Apply(hdm("a", "x", Some(Phase::Conflict))));
        w.observe(&Event::Apply(hdm("b", "x", Some(Phase::Conflict))));
        w.observe(&Event::Apply(hdm("c", "x", Some(Phase::Active))));
        w.observe(&Event::Apply(hdm("d", "y", None)));
        assert_eq!(names(&w, "x"), ["a", "b"]);
        assert!(names(&w, "y").is_empty());
        // No longer waiting; deleted; moved to another domain.
        w.observe(&Event::Apply(hdm("a", "x", Some(Phase::Active))));
        assert_eq!(names(&w, "x"), ["b"]);
        w.observe(&Event::Apply(hdm("b", "z", Some(Phase::Conflict))));
        assert!(names(&w, "x").is_empty());
        assert_eq!(names(&w, "z"), ["b"]);
        w.observe(&Event::Delete(hdm("b", "z", Some(Phase::Conflict))));
        assert!(names(&w, "z").is_empty());
        // A relist replaces the index once complete; until then the old one answers.
        w.observe(&Event::Apply(hdm("gone", "x", Some(Phase::Conflict))));
        w.observe(&Event::Init);
        w.observe(&Event::InitApply(hdm("e", "x", Some(Phase::Conflict))));
        assert_eq!(names(&w, "x"), ["gone"]);
        w.observe(&Event::InitDone);
        assert_eq!(names(&w, "x"), ["e"]);
    }
}
