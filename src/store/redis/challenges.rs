//! ACME answers on Redis: one string per token with a TTL (`docs/redis-schema.md`).

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisStore;
use crate::store::{ChallengeStore, StoreError, challenges::check_put};

#[async_trait]
impl ChallengeStore for RedisStore {
    async fn put_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_put(token, key_authorization)?;
        let key = self.inner.keys.acme_challenge(token);
        let () = self
            .conn()
            .set_ex(&key, key_authorization, ttl.as_secs().max(1))
            .await?;
        Ok(())
    }

    async fn challenge(&self, token: &str) -> Result<Option<String>, StoreError> {
        if !crate::store::is_token(token) {
            return Ok(None);
        }
        let key = self.inner.keys.acme_challenge(token);
        Ok(self.conn().get(&key).await?)
    }

    async fn remove_challenge(&self, token: &str) -> Result<(), StoreError> {
        if !crate::store::is_token(token) {
            return Ok(());
        }
        let key = self.inner.keys.acme_challenge(token);
        let () = self.conn().del(&key).await?;
        Ok(())
    }
}
