//! Access statistics: counters the proxy aggregates in memory and flushes to the store in
//! batches (ARCHITECTURE: never one write per request).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{Mapping, MappingId};

/// Traffic seen for one mapping since the previous flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDelta {
    pub mapping_id: MappingId,
    pub count: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_access_at: DateTime<Utc>,
}

/// The accumulated counters of one mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessStats {
    pub access_count: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_access_at: Option<DateTime<Utc>>,
}

impl AccessStats {
    /// The counters as kept in a record's statistics fields.
    pub fn of(m: &Mapping) -> Self {
        Self {
            access_count: m.access_count,
            bytes_in: m.bytes_in,
            bytes_out: m.bytes_out,
            last_access_at: m.last_access_at,
        }
    }

    /// Adds `d`: counters saturate rather than wrap, and the last access only moves forward
    /// (batches from several nodes arrive in any order). The last access is kept to the
    /// millisecond, as Redis keeps it, so both stores answer alike.
    pub fn add(&mut self, d: &AccessDelta) {
        self.access_count = self.access_count.saturating_add(d.count);
        self.bytes_in = self.bytes_in.saturating_add(d.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(d.bytes_out);
        let last = DateTime::from_timestamp_millis(d.last_access_at.timestamp_millis());
        self.last_access_at = self.last_access_at.max(last);
    }

    /// Writes the counters back into a record's statistics fields.
    pub(crate) fn store_in(&self, m: &mut Mapping) {
        m.access_count = self.access_count;
        m.bytes_in = self.bytes_in;
        m.bytes_out = self.bytes_out;
        m.last_access_at = self.last_access_at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn delta(count: u64, bytes_in: u64, bytes_out: u64, last_ms: i64) -> AccessDelta {
        AccessDelta {
            mapping_id: MappingId::generate(),
            count,
            bytes_in,
            bytes_out,
            last_access_at: at(last_ms),
        }
    }

    #[test]
    fn adds_counters_and_keeps_the_latest_access() {
        let full = AccessStats {
            access_count: u64::MAX - 1,
            bytes_in: 1,
            bytes_out: 1,
            last_access_at: Some(at(5_000)),
        };
        let cases: Vec<(&str, AccessStats, AccessDelta, AccessStats)> = vec![
            (
                "from nothing",
                AccessStats::default(),
                delta(2, 10, 20, 1_000),
                AccessStats {
                    access_count: 2,
                    bytes_in: 10,
                    bytes_out: 20,
                    last_access_at: Some(at(1_000)),
                },
            ),
            (
                "an older batch does not move the last access back",
                AccessStats {
                    access_count: 1,
                    bytes_in: 1,
                    bytes_out: 1,
                    last_access_at: Some(at(9_000)),
                },
                delta(1, 1, 1, 2_000),
                AccessStats {
                    access_count: 2,
                    bytes_in: 2,
                    bytes_out: 2,
                    last_access_at: Some(at(9_000)),
                },
            ),
            (
                "saturates instead of wrapping",
                full.clone(),
                delta(5, 0, 0, 6_000),
                AccessStats {
                    access_count: u64::MAX,
                    last_access_at: Some(at(6_000)),
                    ..full
                },
            ),
        ];
        for (name, mut start, d, want) in cases {
            start.add(&d);
            assert_eq!(start, want, "{name}");
        }
    }

    #[test]
    fn last_access_is_kept_to_the_millisecond() {
        let mut stats = AccessStats::default();
        let mut d = delta(1, 0, 0, 0);
        d.last_access_at = at(1_234) + chrono::Duration::nanoseconds(999_999);
        stats.add(&d);
        assert_eq!(stats.last_access_at, Some(at(1_234)));
    }
}
