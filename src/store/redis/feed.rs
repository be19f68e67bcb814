//! The change feed: a pub/sub subscription that reconnects by itself (to the new master after
//! a failover) and says when it was down.

use futures::StreamExt;
use tokio::sync::watch;

use super::RedisStore;
use crate::store::types::LossySender;
use crate::store::{Backoff, ChangeEvent, StoreError, SubscriptionEvent};

impl RedisStore {
    /// Forwards each message of `channel` that `parse` accepts to `tx` until it closes;
    /// subscribes again (with [`Backoff`]) whenever the subscription is lost. For best-effort
    /// announcements whose loss a periodic read makes good (session changes, applied versions).
    pub(super) async fn follow_channel<T: Send + 'static>(
        self,
        channel: String,
        parse: fn(&[u8]) -> Option<T>,
        tx: tokio::sync::mpsc::UnboundedSender<T>,
    ) {
        let mut backoff = Backoff::new();
        loop {
            let subscribed = async {
                let mut ps = self.inner.link.client()?.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            };
            match subscribed.await {
                Ok(ps) => {
                    backoff.reset();
                    let mut stream = ps.into_on_message();
                    while let Some(msg) = stream.next().await {
                        if let Some(item) = parse(msg.get_payload_bytes())
                            && tx.send(item).is_err()
                        {
                            return;
                        }
                    }
                    tracing::debug!(%channel, "subscription lost; subscribing again");
                }
                Err(e) => tracing::debug!(%channel, error = %e, "cannot subscribe"),
            }
            if tx.is_closed() {
                return;
            }
            backoff.wait().await;
        }
    }

    /// Subscribes on the current server. `moved` is marked seen first, so a move to another
    /// master from now on is noticed.
    pub(super) async fn open_pubsub(
        &self,
        moved: &mut watch::Receiver<u64>,
    ) -> Result<redis::aio::PubSub, StoreError> {
        moved.borrow_and_update();
        let link = &self.inner.link;
        let opened = async {
            let mut pubsub = link.client()?.get_async_pubsub().await?;
            pubsub.subscribe(self.inner.keys.events()).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        // A server that accepts nothing must not hold the feed (it would not look elsewhere).
        let within = self.inner.opts.connect_timeout + self.inner.opts.response_timeout;
        match tokio::time::timeout(within, opened).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => {
                link.suspect();
                Err(e.into())
            }
            Err(_) => {
                link.suspect();
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "subscribing took longer than storage.redis.connect_timeout + response_timeout",
                ))
                .into())
            }
        }
    }

    /// Forwards pub/sub messages until the subscriber goes away. When the connection ends, or
    /// the store moved to another master, it subscribes again (with [`Backoff`]) and reports
    /// the gap: `Reconnected` to catch up, `Replaced` (after a move) to reload.
    pub(super) async fn feed(
        self,
        first: redis::aio::PubSub,
        mut moved: watch::Receiver<u64>,
        mut out: LossySender,
    ) {
        let mut pubsub = Some(first);
        let mut backoff = Backoff::new();
        // Set when the store moved to another master since the last subscription.
        let mut replaced = false;
        loop {
            if let Some(ps) = pubsub.take() {
                let mut stream = ps.into_on_message();
                loop {
                    let msg = tokio::select! {
                        msg = stream.next() => msg,
                        // The old master may still be up (as a replica): leave it.
                        _ = moved.changed() => {
                            replaced = true;
                            None
                        }
                    };
                    let Some(msg) = msg else { break };
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
                // Behind sentinels, a lost subscription is a reason to ask where the master is.
                self.inner.link.suspect();
                tracing::warn!("change feed disconnected; reconnecting");
                if !out.send(SubscriptionEvent::Disconnected) {
                    return;
                }
            }
            backoff.wait().await;
            // A move while the feed was down counts too.
            replaced |= moved.has_changed().unwrap_or(false);
            match self.open_pubsub(&mut moved).await {
                Ok(ps) => {
                    backoff.reset();
                    pubsub = Some(ps);
                    tracing::info!(on_another_master = replaced, "change feed reconnected");
                    let event = if std::mem::take(&mut replaced) {
                        SubscriptionEvent::Replaced
                    } else {
                        SubscriptionEvent::Reconnected
                    };
                    if !out.send(event) {
                        return;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "change feed reconnect failed"),
            }
        }
    }
}
