//! Access counters on Redis: the hash `<prefix>:stats:<mapping id>`, written by one script call
//! per batch and deleted together with its mapping.

use chrono::DateTime;

use super::RedisStore;
use crate::domain::MappingId;
use crate::store::{AccessDelta, AccessStats, StoreError};

const FIELDS: [&str; 4] = ["access_count", "bytes_in", "bytes_out", "last_access_at"];

/// `HINCRBY` takes a signed 64-bit increment: a larger delta is capped rather than refused,
/// since a refused increment would fail the rest of the batch.
fn increment(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The counters from `HMGET <stats> access_count bytes_in bytes_out last_access_at`.
fn parse(values: &[Option<String>]) -> Result<AccessStats, String> {
    let get = |i: usize| values.get(i).cloned().flatten();
    let counter = |i: usize| -> Result<u64, String> {
        get(i).map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| format!("{} {v:?} is not a counter", FIELDS[i]))
        })
    };
    let last_access_at = match get(3) {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .and_then(DateTime::from_timestamp_millis)
                .ok_or_else(|| format!("last_access_at {v:?} is not Unix milliseconds"))?,
        ),
    };
    Ok(AccessStats {
        access_count: counter(0)?,
        bytes_in: counter(1)?,
        bytes_out: counter(2)?,
        last_access_at,
    })
}

impl RedisStore {
    pub(super) async fn record_access_batch(
        &self,
        batch: &[AccessDelta],
    ) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let k = &self.inner.keys;
        let mut inv = self.inner.scripts.record_access.prepare_invoke();
        for d in batch {
            inv.key(k.mapping(&d.mapping_id))
                .key(k.stats(&d.mapping_id))
                .arg(increment(d.count))
                .arg(increment(d.bytes_in))
                .arg(increment(d.bytes_out))
                .arg(d.last_access_at.timestamp_millis());
        }
        let _applied: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    pub(super) async fn read_access_stats(
        &self,
        id: &MappingId,
    ) -> Result<AccessStats, StoreError> {
        let key = self.inner.keys.stats(id);
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&FIELDS)
            .query_async(&mut self.conn())
            .await?;
        parse(&values).map_err(|detail| StoreError::Corrupt { at: key, detail })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn parses_counters_and_refuses_garbage() {
        /// (HMGET reply, the counters or a word of the error)
        type Case = (Vec<Option<String>>, Result<AccessStats, &'static str>);
        let cases: Vec<Case> = vec![
            (vec![None, None, None, None], Ok(AccessStats::default())),
            (
                vec![s("3"), s("10"), s("20"), s("1700000000123")],
                Ok(AccessStats {
                    access_count: 3,
                    bytes_in: 10,
                    bytes_out: 20,
                    last_access_at: DateTime::from_timestamp_millis(1_700_000_000_123),
                }),
            ),
            (vec![s("-1"), None, None, None], Err("access_count")),
            (vec![None, s("x"), None, None], Err("bytes_in")),
            (vec![None, None, None, s("soon")], Err("last_access_at")),
        ];
        for (values, want) in cases {
            match (parse(&values), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{values:?}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{values:?}: {got}"),
                (got, want) => panic!("{values:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn increments_are_capped_to_what_hincrby_takes() {
        for (n, want) in [(0, 0), (7, 7), (u64::MAX, i64::MAX)] {
            assert_eq!(increment(n), want);
        }
    }
}
