//! The store epoch on Redis (docs/redis-schema.md "Epoch"): reading the position, creating the
//! epoch, replacing it when the history went backwards, and the controller's rebuilt marker.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::ScriptInvocation;

use super::RedisStore;
use super::scripts::ScriptReply;
use crate::domain::Hostname;
use crate::store::types::new_epoch;
use crate::store::{Lookup, Position, Rebuilt, StoreError};

impl RedisStore {
    /// Appends what every mutation script needs last: the epoch key, a fresh epoch id, and the
    /// position this client last saw (see `lua/common.lua`).
    pub(super) fn epoch_args(&self, inv: &mut ScriptInvocation<'_>) {
        let seen = self.inner.seen.lock().expect("not poisoned").clone();
        inv.key(self.inner.keys.epoch())
            .arg(new_epoch())
            .arg(seen.epoch.unwrap_or_default())
            .arg(seen.version);
    }

    /// Parses a mutation's reply and remembers the position it was written at.
    pub(super) fn mutation_reply(&self, value: redis::Value) -> Result<ScriptReply, StoreError> {
        let epoch = ScriptReply::epoch_of(&value);
        let reply = ScriptReply::parse(value)?;
        if let ScriptReply::Ok(v) = &reply {
            self.saw(epoch.as_deref(), *v);
        }
        Ok(reply)
    }

    /// Moves the furthest seen position forward (a new epoch starts over).
    pub(super) fn saw(&self, epoch: Option<&str>, version: u64) {
        let mut seen = self.inner.seen.lock().expect("not poisoned");
        if seen.epoch.as_deref() == epoch {
            seen.version = seen.version.max(version);
        } else {
            *seen = Position {
                epoch: epoch.map(str::to_string),
                version,
            };
        }
    }

    pub(super) async fn lookup_at(&self, domain: &Hostname) -> Result<Lookup, StoreError> {
        let k = &self.inner.keys;
        let (json, epoch, version): (Option<String>, Option<String>, Option<u64>) = self
            .inner
            .scripts
            .lookup
            .key(k.domain(domain))
            .key(k.epoch())
            .key(k.version())
            .arg(format!("{}:mapping:", k.prefix()))
            .invoke_async(&mut self.conn())
            .await?;
        let position = Position {
            epoch,
            version: version.unwrap_or(0),
        };
        let mapping = match json {
            Some(json) => {
                let m = self.decode(&k.domain(domain), &json)?;
                // A claim naming a record of another domain (the claim outlived its record,
                // whose id was then used again) is not this domain's record.
                (!m.is_expired(Utc::now()) && m.full_domain == *domain).then_some(m)
            }
            None => None,
        };
        Ok(Lookup { mapping, position })
    }

    pub(super) async fn read_position(&self) -> Result<Position, StoreError> {
        let k = &self.inner.keys;
        let (epoch, version): (Option<String>, Option<u64>) = redis::pipe()
            .atomic()
            .get(k.epoch())
            .get(k.version())
            .query_async(&mut self.conn())
            .await?;
        let version = version.unwrap_or(0);
        self.saw(epoch.as_deref(), version);
        Ok(Position { epoch, version })
    }

    pub(super) async fn ensure_epoch_now(&self) -> Result<String, StoreError> {
        let key = self.inner.keys.epoch();
        let (_, epoch): (Option<String>, Option<String>) = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&key)
            .arg(new_epoch())
            .arg("NX")
            .get(&key)
            .query_async(&mut self.conn())
            .await?;
        epoch.ok_or_else(|| StoreError::Corrupt {
            at: key,
            detail: "epoch missing right after SET NX".into(),
        })
    }

    pub(super) async fn check_backwards(
        &self,
        seen: &Position,
    ) -> Result<Option<String>, StoreError> {
        let k = &self.inner.keys;
        let epoch: Option<String> = self
            .inner
            .scripts
            .check_epoch
            .key(k.epoch())
            .key(k.version())
            .arg(seen.epoch.clone().unwrap_or_default())
            .arg(seen.version)
            .arg(new_epoch())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(epoch)
    }

    pub(super) async fn read_rebuilt(&self) -> Result<Option<Rebuilt>, StoreError> {
        let key = self.inner.keys.rebuilt();
        let fields: HashMap<String, String> = self.conn().hgetall(&key).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let bad = |what: &str| StoreError::Corrupt {
            at: key.clone(),
            detail: format!("field {what} missing or invalid: {fields:?}"),
        };
        Ok(Some(Rebuilt {
            epoch: fields.get("epoch").cloned().ok_or_else(|| bad("epoch"))?,
            version: fields
                .get("version")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("version"))?,
            at: fields
                .get("at")
                .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| bad("at"))?,
            by: fields.get("by").cloned().unwrap_or_default(),
        }))
    }

    pub(super) async fn write_rebuilt(
        &self,
        epoch: &str,
        version: u64,
        by: &str,
    ) -> Result<bool, StoreError> {
        let k = &self.inner.keys;
        let written: i64 = self
            .inner
            .scripts
            .mark_rebuilt
            .key(k.epoch())
            .key(k.rebuilt())
            .arg(epoch)
            .arg(version)
            .arg(Utc::now().to_rfc3339())
            .arg(by)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(written == 1)
    }
}
