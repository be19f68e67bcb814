//! Whether the proxy may switch its routing table to what the store holds now, or must keep
//! serving its own table marked stale until the controller has rebuilt the store (ARCHITECTURE
//! §1, §5: the data plane keeps serving its last good state). Pure: no I/O.

use crate::store::{Break, Position, Rebuilt};

/// A table that shrinks below this fraction of the one served, in the same history, is not
/// believed without the controller's word ...
pub const SHRINK_RATIO: (usize, usize) = (1, 2);
/// ... when the table served had at least this many mappings (small tables change by a few
/// mappings all the time; half of three is one `kubectl delete`).
pub const SHRINK_MIN_TABLE: usize = 100;

/// Why the proxy serves its own table rather than the store's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The store is in another epoch (flushed, restarted without data, replaced).
    EpochChanged,
    /// Same epoch, lower version: a failover lost writes.
    WentBackwards,
    /// Same history, but a reload would drop more than half of a large table.
    Shrank,
    /// Started cold against a store the controller has not rebuilt since its history broke.
    NotRebuilt,
}

impl StaleReason {
    pub fn label(&self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::WentBackwards => "went_backwards",
            Self::Shrank => "shrank",
            Self::NotRebuilt => "not_rebuilt",
        }
    }
}

impl From<Break> for StaleReason {
    fn from(b: Break) -> Self {
        match b {
            Break::EpochChanged => Self::EpochChanged,
            Break::WentBackwards => Self::WentBackwards,
        }
    }
}

/// Staleness: why, and the store's position when it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub reason: StaleReason,
    pub since: Position,
}

/// What a full load of the store is, relative to the table served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The first load of this process.
    Cold,
    /// The same history (the change log was trimmed).
    Same,
    /// Another history.
    Broken(Break),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve what the store holds.
    Switch,
    /// Serve what the store holds (nothing better is at hand) but report it stale: the cold
    /// start against an un-rebuilt store.
    SwitchStale(Stale),
    /// Keep the table served, apply the store's mappings over it, report stale.
    Keep(Stale),
}

/// Decides a full load of `next_entries` mappings at `next`, given the table served
/// (`served_entries` mappings) and the controller's last marker.
pub fn judge(
    reload: Reload,
    served_entries: usize,
    next_entries: usize,
    next: &Position,
    marker: Option<&Rebuilt>,
) -> Decision {
    let stale = |reason| Stale {
        reason,
        since: next.clone(),
    };
    match reload {
        Reload::Cold => match marker {
            // A controller exists and has not rebuilt this epoch yet.
            Some(m) if next.epoch.as_deref() != Some(m.epoch.as_str()) => {
                Decision::SwitchStale(stale(StaleReason::NotRebuilt))
            }
            _ => Decision::Switch,
        },
        // Nothing to protect: an empty table is never better than the store.
        _ if served_entries == 0 => Decision::Switch,
        Reload::Broken(b) => {
            let s = stale(b.into());
            if confirmed(&s, next, marker) {
                Decision::Switch
            } else {
                Decision::Keep(s)
            }
        }
        Reload::Same => {
            let (num, den) = SHRINK_RATIO;
            let shrank =
                served_entries >= SHRINK_MIN_TABLE && next_entries * den < served_entries * num;
            let s = stale(StaleReason::Shrank);
            if shrank && !confirmed(&s, next, marker) {
                Decision::Keep(s)
            } else {
                Decision::Switch
            }
        }
    }
}

/// True when the controller's marker vouches for the store at `now`: written for its epoch
/// after a resync pass that listed at most what `now` holds. A shrink in the same history
/// needs a pass that listed after the shrink was seen; a new epoch only exists as rebuilt once
/// a pass against it found nothing missing.
pub fn confirmed(stale: &Stale, now: &Position, marker: Option<&Rebuilt>) -> bool {
    let Some(m) = marker else { return false };
    if now.epoch.as_deref() != Some(m.epoch.as_str()) || now.version < m.version {
        return false;
    }
    match stale.reason {
        StaleReason::Shrank => m.version >= stale.since.version,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(epoch: &str, version: u64) -> Position {
        Position {
            epoch: (!epoch.is_empty()).then(|| epoch.to_string()),
            version,
        }
    }

    fn marker(epoch: &str, version: u64) -> Rebuilt {
        Rebuilt {
            epoch: epoch.into(),
            version,
            at: chrono::Utc::now(),
            by: "controller".into(),
        }
    }

    #[test]
    fn judges_full_loads() {
        use Decision::*;
        use Reload::*;
        let keep = |reason, p: Position| Keep(Stale { reason, since: p });
        let flushed = Broken(Break::EpochChanged);
        let lost = Broken(Break::WentBackwards);
        let m_e2 = marker("e2", 10);
        let m_e1 = marker("e1", 500);
        let m_e1_after = marker("e1", 600);
        #[rustfmt::skip]
        // name, reload, served, entries, next, marker, want
        type Case<'a> = (&'a str, Reload, usize, usize, Position, Option<&'a Rebuilt>, Decision);
        let cases: Vec<Case> = vec![
            (
                "cold, no controller ever",
                Cold,
                0,
                0,
                pos("e1", 5),
                None,
                Switch,
            ),
            (
                "cold, rebuilt",
                Cold,
                0,
                9,
                pos("e2", 12),
                Some(&m_e2),
                Switch,
            ),
            (
                "cold, marker of another epoch",
                Cold,
                0,
                3,
                pos("e2", 3),
                Some(&m_e1),
                SwitchStale(Stale {
                    reason: StaleReason::NotRebuilt,
                    since: pos("e2", 3),
                }),
            ),
            (
                "cold after a flush: no epoch, no marker",
                Cold,
                0,
                0,
                pos("", 0),
                None,
                Switch,
            ),
            (
                "flushed: keep",
                flushed,
                1000,
                0,
                pos("", 0),
                Some(&m_e1),
                keep(StaleReason::EpochChanged, pos("", 0)),
            ),
            (
                "new epoch, not yet rebuilt",
                flushed,
                1000,
                40,
                pos("e2", 40),
                Some(&m_e1),
                keep(StaleReason::EpochChanged, pos("e2", 40)),
            ),
            (
                "new epoch, rebuilt",
                flushed,
                1000,
                1000,
                pos("e2", 1000),
                Some(&m_e2),
                Switch,
            ),
            (
                "new epoch, marker ahead of what we hold",
                flushed,
                1000,
                5,
                pos("e2", 5),
                Some(&m_e2),
                keep(StaleReason::EpochChanged, pos("e2", 5)),
            ),
            (
                "nothing served: nothing to protect",
                flushed,
                0,
                0,
                pos("", 0),
                None,
                Switch,
            ),
            (
                "went backwards",
                lost,
                1000,
                990,
                pos("e3", 480),
                Some(&m_e1),
                keep(StaleReason::WentBackwards, pos("e3", 480)),
            ),
            (
                "trimmed, about the same",
                Same,
                1000,
                990,
                pos("e1", 600),
                None,
                Switch,
            ),
            (
                "trimmed, exactly half",
                Same,
                1000,
                500,
                pos("e1", 600),
                None,
                Switch,
            ),
            (
                "trimmed, shrank",
                Same,
                1000,
                499,
                pos("e1", 600),
                Some(&m_e1),
                keep(StaleReason::Shrank, pos("e1", 600)),
            ),
            (
                "small tables may shrink",
                Same,
                99,
                0,
                pos("e1", 600),
                None,
                Switch,
            ),
            (
                "shrank, and a pass after it agrees",
                Same,
                1000,
                10,
                pos("e1", 600),
                Some(&m_e1_after),
                Switch,
            ),
        ];
        for (name, reload, served, entries, next, m, want) in cases {
            assert_eq!(judge(reload, served, entries, &next, m), want, "{name}");
        }
    }

    #[test]
    fn confirmation_needs_the_epoch_and_a_new_enough_pass() {
        let s = |reason, since| Stale { reason, since };
        let epoch = s(StaleReason::EpochChanged, pos("e2", 3));
        assert!(!confirmed(&epoch, &pos("e2", 50), None));
        assert!(!confirmed(&epoch, &pos("e2", 50), Some(&marker("e1", 10))));
        assert!(confirmed(&epoch, &pos("e2", 50), Some(&marker("e2", 40))));
        assert!(
            !confirmed(&epoch, &pos("e2", 30), Some(&marker("e2", 40))),
            "not caught up"
        );
        let shrank = s(StaleReason::Shrank, pos("e1", 600));
        assert!(
            !confirmed(&shrank, &pos("e1", 700), Some(&marker("e1", 599))),
            "pass before the shrink"
        );
        assert!(confirmed(
            &shrank,
            &pos("e1", 700),
            Some(&marker("e1", 650))
        ));
    }
}
