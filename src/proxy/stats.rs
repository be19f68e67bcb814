//! Access statistics per mapping (count, bytes in/out, last access): counted in memory on the
//! request path, written to the store in batches. A failed write keeps the counts for the next.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use super::metrics::ProxyMetrics;
use super::route::Route;
use crate::domain::MappingId;
use crate::store::{AccessDelta, MappingStore};

#[derive(Default)]
pub struct AccessLog {
    pending: Mutex<foldhash::HashMap<MappingId, AccessDelta>>,
}

impl AccessLog {
    pub fn record(&self, id: &MappingId, count: u64, bytes_in: u64, bytes_out: u64) {
        self.merge(id, count, bytes_in, bytes_out, Utc::now());
    }

    /// Adds to the pending counts of `id`; the id is copied only for its first entry.
    fn merge(
        &self,
        id: &MappingId,
        count: u64,
        bytes_in: u64,
        bytes_out: u64,
        at: chrono::DateTime<Utc>,
    ) {
        let mut pending = self.pending.lock().expect("not poisoned");
        let d = match pending.get_mut(id) {
            Some(d) => d,
            None => pending.entry(id.clone()).or_insert(AccessDelta {
                mapping_id: id.clone(),
                count: 0,
                bytes_in: 0,
                bytes_out: 0,
                last_access_at: at,
            }),
        };
        d.count = d.count.saturating_add(count);
        d.bytes_in = d.bytes_in.saturating_add(bytes_in);
        d.bytes_out = d.bytes_out.saturating_add(bytes_out);
        d.last_access_at = d.last_access_at.max(at);
    }

    fn take(&self) -> Vec<AccessDelta> {
        let mut pending = self.pending.lock().expect("not poisoned");
        std::mem::take(&mut *pending).into_values().collect()
    }

    fn put_back(&self, batch: Vec<AccessDelta>) {
        for d in batch {
            self.merge(
                &d.mapping_id,
                d.count,
                d.bytes_in,
                d.bytes_out,
                d.last_access_at,
            );
        }
    }

    /// Writes what has been counted so far; on failure the counts stay for the next flush.
    pub async fn flush(&self, store: &dyn MappingStore, metrics: &ProxyMetrics) {
        let batch = self.take();
        if batch.is_empty() {
            return;
        }
        if let Err(e) = store.record_access(&batch).await {
            metrics.stats_flush_errors.inc();
            tracing::warn!(error = %e, mappings = batch.len(), "cannot write access statistics; keeping them");
            self.put_back(batch);
        }
    }

    /// Flushes every `every` until `stop`, then once more.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn MappingStore>,
        metrics: Arc<ProxyMetrics>,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(store.as_ref(), &metrics).await,
                _ = super::stopped(&mut stop) => break,
            }
        }
        self.flush(store.as_ref(), &metrics).await;
    }
}

/// Which side of a request a metered body is.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The client's request body: bytes in.
    Request,
    /// The response body: one access and bytes out.
    Response,
}

/// A body that counts its bytes and records them when it is done (or dropped).
pub struct Metered<B> {
    inner: B,
    bytes: u64,
    to: Option<(Arc<AccessLog>, Arc<Route>, Side)>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, log: Arc<AccessLog>, route: Arc<Route>, side: Side) -> Self {
        Self {
            inner,
            bytes: 0,
            to: Some((log, route, side)),
        }
    }

    fn finish(&mut self) {
        if let Some((log, route, side)) = self.to.take() {
            match side {
                Side::Request => log.record(&route.mapping_id(), 0, self.bytes, 0),
                Side::Response => log.record(&route.mapping_id(), 1, 0, self.bytes),
            }
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_per_mapping_and_keeps_failed_batches() {
        let log = AccessLog::default();
        let a = MappingId::generate();
        let b = MappingId::generate();
        log.record(&a, 1, 10, 100);
        log.record(&a, 1, 0, 50);
        log.record(&b, 0, 7, 0);
        let mut batch = log.take();
        batch.sort_by(|x, y| x.mapping_id.as_str().cmp(y.mapping_id.as_str()));
        let got: Vec<_> = batch
            .iter()
            .map(|d| (d.count, d.bytes_in, d.bytes_out))
            .collect();
        assert_eq!(got, vec![(2, 10, 150), (0, 7, 0)]);
        assert!(log.take().is_empty());
        // A failed flush puts the counts back, merged with what arrived meanwhile.
        log.record(&a, 1, 1, 1);
        log.put_back(batch);
        let again: std::collections::HashMap<_, _> = log
            .take()
            .into_iter()
            .map(|d| (d.mapping_id.clone(), d.count))
            .collect();
        assert_eq!(again[&a], 3);
        assert_eq!(again[&b], 0);
    }
}
