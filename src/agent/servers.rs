//! The proxy addresses an agent may dial: the configured ones plus those learnt at run time
//! (`AuthOk.peers`, `ServerShutdown.reconnect_to`), and the order a slot tries them in. Pure.

use crate::config::agent::split_host_port;

/// Learnt addresses kept at most (they come from a proxy: bounded like any peer input).
pub const MAX_LEARNT: usize = 32;

#[derive(Debug, Clone, Default)]
pub struct Servers {
    configured: Vec<String>,
    learnt: Vec<String>,
}

impl Servers {
    pub fn new(configured: &[String]) -> Self {
        let mut s = Self::default();
        for a in configured {
            if !s.configured.contains(a) {
                s.configured.push(a.clone());
            }
        }
        s
    }

    /// Remembers `addr` (ignored when it is not `host:port`, already known, or the list is
    /// full). Returns whether it was new.
    pub fn learn(&mut self, addr: &str) -> bool {
        let addr = addr.trim();
        if split_host_port(addr).is_none()
            || self.configured.iter().any(|a| a == addr)
            || self.learnt.iter().any(|a| a == addr)
            || self.learnt.len() >= MAX_LEARNT
        {
            return false;
        }
        self.learnt.push(addr.to_string());
        true
    }

    /// Every known address, configured first.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.configured.iter().chain(self.learnt.iter())
    }

    /// The order to try: `first` (a `reconnect_to`) when given, then the known addresses
    /// rotated by `offset` (so slots start on different proxies) with those in `busy` (held by
    /// other slots) after the rest, and `leaving` (the draining proxy) last of all: a configured
    /// address may be a load-balanced Service that reaches another node.
    pub fn order(
        &self,
        first: Option<&str>,
        offset: usize,
        busy: &[String],
        leaving: Option<&str>,
    ) -> Vec<String> {
        let known: Vec<&String> = self.all().collect();
        let n = known.len();
        let rotated = (0..n).map(|i| known[(i + offset) % n.max(1)]);
        let mut out: Vec<String> = Vec::with_capacity(n + 1);
        if let Some(f) = first.filter(|f| split_host_port(f).is_some()) {
            out.push(f.to_string());
        }
        let mut later = Vec::new();
        let mut last = Vec::new();
        for a in rotated {
            if out.contains(a) {
                continue;
            }
            if leaving == Some(a.as_str()) {
                last.push(a.clone());
            } else if busy.contains(a) {
                later.push(a.clone());
            } else {
                out.push(a.clone());
            }
        }
        out.extend(later);
        out.extend(last);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn order_prefers_reconnect_to_free_proxies_and_leaves_the_draining_one_last() {
        let mut servers = Servers::new(&s(&["a:1", "b:1", "a:1"]));
        assert!(servers.learn("c:1"));
        assert!(!servers.learn("c:1"));
        assert!(!servers.learn("a:1"));
        assert!(!servers.learn("not an address"));
        assert!(!servers.learn("d"));
        type Case<'a> = (
            Option<&'a str>,
            usize,
            &'a [&'a str],
            Option<&'a str>,
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            (None, 0, &[], None, &["a:1", "b:1", "c:1"]),
            (None, 1, &[], None, &["b:1", "c:1", "a:1"]),
            (None, 4, &[], None, &["b:1", "c:1", "a:1"]),
            (None, 0, &["a:1"], None, &["b:1", "c:1", "a:1"]),
            (Some("c:1"), 0, &[], Some("a:1"), &["c:1", "b:1", "a:1"]),
            (
                Some("x:9"),
                0,
                &[],
                Some("a:1"),
                &["x:9", "b:1", "c:1", "a:1"],
            ),
            (
                Some("bad"),
                0,
                &["b:1"],
                Some("a:1"),
                &["c:1", "b:1", "a:1"],
            ),
        ];
        for (first, offset, busy, leaving, want) in cases {
            let got = servers.order(*first, *offset, &s(busy), *leaving);
            assert_eq!(got, s(want), "{first:?} {offset} {busy:?} {leaving:?}");
        }
        // A single configured address (a Service) is still tried when it is the leaving one.
        let one = Servers::new(&s(&["svc:7000"]));
        assert_eq!(one.order(None, 0, &[], Some("svc:7000")), s(&["svc:7000"]));
    }

    #[test]
    fn learnt_addresses_are_bounded() {
        let mut servers = Servers::new(&s(&["a:1"]));
        for i in 0..100 {
            servers.learn(&format!("p{i}:7000"));
        }
        assert_eq!(servers.all().count(), 1 + MAX_LEARNT);
    }
}
