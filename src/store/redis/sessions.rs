//! Tunnel sessions and credentials on Redis (`docs/redis-schema.md`): a hash per client with one
//! JSON field per agent session, and a JSON string per credential. Each session write prunes
//! expired fields and refreshes the hash's TTL in one script; a removal deletes the field only
//! while it still names the closing session.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisStore;
use crate::store::{SessionRecord, StoreError, TunnelRegistry};
use crate::tunnel::credential::ClientCredential;

/// KEYS[1] the client's hash; ARGV: field, record JSON, TTL ms, now ms, the record's expiry ms,
/// and a session id that the field must still name (empty: write unconditionally). Drops fields
/// whose expiry (kept beside each record in a shadow field `<field>#exp`) has passed. Returns 0
/// when the field names another session (nothing written), else 1.
const PUT: &str = r"
if ARGV[6] ~= '' then
  local v = redis.call('HGET', KEYS[1], ARGV[1])
  if v then
    local ok, rec = pcall(cjson.decode, v)
    if ok and type(rec) == 'table' and rec['session_id'] ~= ARGV[6] then
      return 0
    end
  end
end
local now = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  if string.sub(f, -4) == '#exp' and tonumber(v) <= now then
    redis.call('HDEL', KEYS[1], f, string.sub(f, 1, -5))
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. '#exp', ARGV[5])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
";

/// KEYS[1] the client's hash; ARGV: field, session id. Deletes the field only while its record
/// names that session.
const REMOVE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local ok, rec = pcall(cjson.decode, v)
if ok and type(rec) == 'table' and rec['session_id'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1], ARGV[1] .. '#exp')
  return 1
end
return 0
";

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl RedisStore {
    /// [`PUT`]: unconditionally when `only_if` is empty, else only while the field names
    /// that session.
    async fn write_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
        ttl: Duration,
        only_if: &str,
    ) -> Result<bool, StoreError> {
        let key = self.inner.keys.client_sessions(client_id);
        let json = serde_json::to_string(record).map_err(|e| StoreError::Corrupt {
            at: key.clone(),
            detail: e.to_string(),
        })?;
        let now = chrono::Utc::now().timestamp_millis();
        let written: i64 = redis::Script::new(PUT)
            .key(&key)
            .arg(record.key())
            .arg(json)
            .arg(millis(ttl))
            .arg(now)
            .arg(record.expires_at.timestamp_millis())
            .arg(only_if)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(written == 1)
    }
}

#[async_trait]
impl TunnelRegistry for RedisStore {
    async fn put_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.write_session(client_id, record, ttl, "")
            .await
            .map(|_| ())
    }

    async fn refresh_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.write_session(client_id, record, ttl, &record.session_id)
            .await
    }

    async fn remove_session(
        &self,
        client_id: &str,
        record: &SessionRecord,
    ) -> Result<bool, StoreError> {
        let key = self.inner.keys.client_sessions(client_id);
        let removed: i64 = redis::Script::new(REMOVE)
            .key(&key)
            .arg(record.key())
            .arg(&record.session_id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(removed == 1)
    }

    async fn sessions(&self, client_id: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let key = self.inner.keys.client_sessions(client_id);
        let fields: std::collections::BTreeMap<String, String> = self.conn().hgetall(&key).await?;
        let now = chrono::Utc::now();
        let mut out = Vec::new();
        for (field, value) in fields {
            if field.ends_with("#exp") {
                continue;
            }
            match serde_json::from_str::<SessionRecord>(&value) {
                Ok(r) if r.live_at(now) => out.push(r),
                Ok(_) => {}
                // One unreadable field does not hide the client's other sessions.
                Err(e) => {
                    tracing::warn!(%key, %field, error = %e, "unreadable session record skipped")
                }
            }
        }
        Ok(out)
    }

    async fn put_credential(&self, cred: &ClientCredential) -> Result<(), StoreError> {
        let key = self.inner.keys.client_auth(&cred.client_id);
        let json = serde_json::to_string(cred).map_err(|e| StoreError::Corrupt {
            at: key.clone(),
            detail: e.to_string(),
        })?;
        let () = self.conn().set(&key, json).await?;
        Ok(())
    }

    async fn remove_credential(&self, client_id: &str) -> Result<(), StoreError> {
        let () = self
            .conn()
            .del(self.inner.keys.client_auth(client_id))
            .await?;
        Ok(())
    }

    async fn announce_session(&self, client_id: &str) {
        let published: Result<i64, _> = self
            .conn()
            .publish(self.inner.keys.session_events(), client_id)
            .await;
        if let Err(e) = published {
            tracing::debug!(client_id, error = %e, "cannot announce a session change");
        }
    }

    fn session_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Client ids are short; anything else is not an announcement.
        let parse = |raw: &[u8]| {
            std::str::from_utf8(raw)
                .ok()
                .filter(|c| c.len() <= 128)
                .map(str::to_string)
        };
        tokio::spawn(
            self.clone()
                .follow_channel(self.inner.keys.session_events(), parse, tx),
        );
        Some(rx)
    }

    async fn credential(&self, client_id: &str) -> Result<Option<ClientCredential>, StoreError> {
        let key = self.inner.keys.client_auth(client_id);
        let raw: Option<String> = self.conn().get(&key).await?;
        raw.map(|v| {
            serde_json::from_str(&v).map_err(|e| StoreError::Corrupt {
                at: key,
                detail: e.to_string(),
            })
        })
        .transpose()
    }
}
