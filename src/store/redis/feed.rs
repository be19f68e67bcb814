//! The change feed: a pub/sub subscription that reconnects by itself and says when it was down.

use std::time::Duration;

use futures::StreamExt;

use super::RedisStore;
use crate::store::types::LossySender;
use crate::store::{ChangeEvent, StoreError, SubscriptionEvent};

impl RedisStore {
    pub(super) async fn open_pubsub(&self) -> Result<redis::aio::PubSub, StoreError> {
        let mut pubsub = self.inner.client.get_async_pubsub().await?;
        pubsub.subscribe(self.inner.keys.events()).await?;
        Ok(pubsub)
    }

    /// Forwards pub/sub messages until the subscriber goes away; reconnects with backoff
    /// (100 ms, ×1.5, capped at 5 s) and reports the gap so the subscriber can catch up.
    pub(super) async fn feed(self, first: redis::aio::PubSub, mut out: LossySender) {
        let mut pubsub = Some(first);
        let mut delay = Duration::from_millis(100);
        loop {
            if let Some(ps) = pubsub.take() {
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<ChangeEvent>(&payload) {
                        Ok(event) => {
                            if !out.send(SubscriptionEvent::Change(event)) {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "ignoring malformed change event"),
                    }
                }
                tracing::warn!("change feed disconnected; reconnecting");
                if !out.send(SubscriptionEvent::Disconnected) {
                    return;
                }
            }
            tokio::time::sleep(delay).await;
            match self.open_pubsub().await {
                Ok(ps) => {
                    delay = Duration::from_millis(100);
                    pubsub = Some(ps);
                    tracing::info!("change feed reconnected");
                    if !out.send(SubscriptionEvent::Reconnected) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "change feed reconnect failed");
                    delay = (delay.mul_f64(1.5)).min(Duration::from_secs(5));
                }
            }
        }
    }
}
