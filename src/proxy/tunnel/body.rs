//! A body counted into a byte counter as it streams, holding its stream's slot until it ends;
//! a body that holds any guard until it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus::IntCounter;

use super::session::StreamSlot;
use crate::proxy::{BoxError, ProxyBody};

pub struct Counted {
    inner: ProxyBody,
    bytes: IntCounter,
    _slot: Option<StreamSlot>,
}

impl Counted {
    pub fn new(inner: ProxyBody, bytes: IntCounter, slot: Option<StreamSlot>) -> Self {
        Self {
            inner,
            bytes,
            _slot: slot,
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.bytes.inc_by(d.len() as u64);
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

/// Something a response keeps alive until it is done (its body read, or its upgraded stream
/// closed): a group member's in-flight count.
pub type Hold = Option<Box<dyn Send + Sync>>;

/// A body that keeps `guard` alive until the body is dropped (read to its end or abandoned).
pub struct Holding<G> {
    inner: ProxyBody,
    _guard: G,
}

impl<G> Holding<G> {
    pub fn new(inner: ProxyBody, guard: G) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<G: Unpin> Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
