//! Which session carries a request (pure, table-tested): a local active session with the
//! fewest open streams; else another node's live session from the store (active before
//! leaving); else a local leaving session; else the client is offline. A request another node
//! forwarded here is served from local sessions only (never forwarded again).

use chrono::{DateTime, Utc};

use crate::store::{SessionRecord, SessionState};

/// What the choice needs to know of a local session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalView {
    pub leaving: bool,
    pub usable: bool,
    pub open: usize,
    pub full: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// Index into the local sessions.
    Local(usize),
    /// Another node's HTTP address and its node id.
    Peer {
        address: String,
        node_id: String,
    },
    Offline,
}

/// Whether the store must be asked: only when no local active session can take the request.
pub fn needs_store(local: &[LocalView], from_peer: bool) -> bool {
    !from_peer && best_local(local, false).is_none()
}

fn best_local(local: &[LocalView], leaving: bool) -> Option<usize> {
    local
        .iter()
        .enumerate()
        .filter(|(_, v)| v.usable && !v.full && v.leaving == leaving)
        .min_by_key(|(_, v)| v.open)
        .map(|(i, _)| i)
}

/// Decides. `remote` is what the store holds for the client (this node's own records and
/// expired ones are skipped); `me` is this node's id.
pub fn choose(
    local: &[LocalView],
    remote: &[SessionRecord],
    me: &str,
    now: DateTime<Utc>,
    from_peer: bool,
) -> Pick {
    if let Some(i) = best_local(local, false) {
        return Pick::Local(i);
    }
    if !from_peer {
        let elsewhere = |state: SessionState| {
            remote
                .iter()
                .find(|r| r.state == state && reachable_elsewhere(r, me, now))
        };
        if let Some(r) =
            elsewhere(SessionState::Active).or_else(|| elsewhere(SessionState::Leaving))
        {
            return Pick::Peer {
                address: r.node_address.clone(),
                node_id: r.node_id.clone(),
            };
        }
    }
    match best_local(local, true) {
        Some(i) => Pick::Local(i),
        None => Pick::Offline,
    }
}

/// Whether a request may be sent to the node a record names: another node's, live, with an
/// address (a record naming this node that the local table does not back is stale).
pub fn reachable_elsewhere(r: &SessionRecord, me: &str, now: DateTime<Utc>) -> bool {
    r.node_id != me && r.live_at(now) && !r.node_address.is_empty()
}

/// When the choice found nothing: whether the client's sessions look like they are moving, so
/// that one more store read (issued after what was seen here) may find where the agent went. A
/// session of this node that refused the stream or is closing, or a record naming this node
/// that the local table no longer backs.
pub fn in_flux(
    local: &[LocalView],
    remote: &[SessionRecord],
    me: &str,
    refused_here: bool,
) -> bool {
    refused_here || !local.is_empty() || remote.iter().any(|r| r.node_id == me)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(leaving: bool, usable: bool, open: usize) -> LocalView {
        LocalView {
            leaving,
            usable,
            open,
            full: false,
        }
    }

    fn r(node: &str, state: SessionState, expires_in: i64) -> SessionRecord {
        let now = Utc::now();
        SessionRecord {
            session_id: format!("s-{node}"),
            node_id: node.into(),
            node_address: format!("{node}:8080"),
            instance: "i".into(),
            slot: 0,
            since: now,
            last_seen: now,
            expires_at: now + chrono::Duration::seconds(expires_in),
            state,
            config: None,
            unhealthy: Vec::new(),
        }
    }

    fn peer(node: &str) -> Pick {
        Pick::Peer {
            address: format!("{node}:8080"),
            node_id: node.into(),
        }
    }

    #[test]
    fn picks_local_then_peer_then_leaving_then_offline() {
        use SessionState::{Active, Leaving};
        let full = LocalView {
            full: true,
            ..l(false, true, 0)
        };
        type Case = (Vec<LocalView>, Vec<SessionRecord>, bool, Pick);
        let cases: Vec<Case> = vec![
            // Fewest open streams among local active ones.
            (
                vec![l(false, true, 5), l(false, true, 2)],
                vec![],
                false,
                Pick::Local(1),
            ),
            // Local active beats any peer.
            (
                vec![l(false, true, 9)],
                vec![r("b", Active, 10)],
                false,
                Pick::Local(0),
            ),
            // Only a leaving local one: a peer's active session first.
            (
                vec![l(true, true, 0)],
                vec![r("b", Active, 10)],
                false,
                peer("b"),
            ),
            // Peers: active before leaving.
            (
                vec![],
                vec![r("b", Leaving, 10), r("c", Active, 10)],
                false,
                peer("c"),
            ),
            (vec![], vec![r("b", Leaving, 10)], false, peer("b")),
            // Expired and own records do not count.
            (
                vec![],
                vec![r("b", Active, -1), r("me", Active, 10)],
                false,
                Pick::Offline,
            ),
            (
                vec![l(true, true, 3)],
                vec![r("me", Active, 10)],
                false,
                Pick::Local(0),
            ),
            // Unusable or full local sessions are skipped.
            (vec![l(false, false, 0), full], vec![], false, Pick::Offline),
            (
                vec![l(false, false, 0), l(false, true, 7)],
                vec![],
                false,
                Pick::Local(1),
            ),
            // Forwarded by a peer: local only, never forwarded again.
            (vec![], vec![r("b", Active, 10)], true, Pick::Offline),
            (
                vec![l(true, true, 0)],
                vec![r("b", Active, 10)],
                true,
                Pick::Local(0),
            ),
            (vec![], vec![], false, Pick::Offline),
        ];
        for (i, (local, remote, from_peer, want)) in cases.into_iter().enumerate() {
            let got = choose(&local, &remote, "me", Utc::now(), from_peer);
            assert_eq!(
                got, want,
                "case {i}: {local:?} {remote:?} from_peer={from_peer}"
            );
        }
        let leaving = [l(true, false, 3)];
        let mine = [r("me", Active, 10)];
        let theirs = [r("b", Active, -1)];
        for (local, remote, refused, want) in [
            (&leaving[..], &[][..], false, true),
            (&[][..], &mine[..], false, true),
            (&[][..], &[][..], true, true),
            (&[][..], &theirs[..], false, false),
            (&[][..], &[][..], false, false),
        ] {
            assert_eq!(
                in_flux(local, remote, "me", refused),
                want,
                "{local:?} {remote:?} {refused}"
            );
        }
        assert!(!needs_store(&[l(false, true, 0)], false));
        assert!(needs_store(&[l(true, true, 0)], false));
        assert!(!needs_store(&[], true));
    }
}
