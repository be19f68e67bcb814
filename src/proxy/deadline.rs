//! Deadlines after the request head, on both sides of a proxied exchange: a client that stops
//! taking the response (`client_write_idle`), an upstream that stops sending it
//! (`upstream_read_idle`), a client that stops sending its upload (`request_body_idle`), a
//! WebSocket (any upgraded connection) with no bytes either way (`websocket_idle`), an HTTP/2
//! connection with no stream (`http2_idle`). Each is an idle time: progress resets it, so a
//! slow transfer that moves is not cut. Every expiry is counted
//! (`tunnox_proxy_timeouts_total{kind}`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::metrics::ProxyMetrics;

/// Which deadline expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ClientWrite,
    UpstreamRead,
    RequestBody,
    WebSocket,
    Http2Idle,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientWrite => "client_write",
            Self::UpstreamRead => "upstream_read",
            Self::RequestBody => "request_body",
            Self::WebSocket => "websocket_idle",
            Self::Http2Idle => "http2_idle",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no progress for {idle:?} ({})", kind.label())]
pub struct Expired {
    pub kind: Kind,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub client_write_idle: Duration,
    pub upstream_read_idle: Duration,
    pub request_body_idle: Duration,
    pub http2_idle: Duration,
}

/// Counts an expiry and returns it as an I/O error.
pub fn expired(metrics: &ProxyMetrics, kind: Kind, idle: Duration) -> io::Error {
    metrics.timeouts.with_label_values(&[kind.label()]).inc();
    io::Error::new(io::ErrorKind::TimedOut, Expired { kind, idle })
}

/// A body that fails when no frame arrives for `idle` while it is waited for.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    kind: Kind,
    metrics: Arc<ProxyMetrics>,
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration, kind: Kind, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            inner,
            idle,
            kind,
            metrics,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<super::BoxError>,
{
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    let at = Instant::now() + this.idle;
                    this.timer.as_mut().reset(at);
                }
                ready!(this.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(
                    expired(&this.metrics, this.kind, this.idle).into()
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose writes fail once the client has taken no byte for `idle`.
pub struct WriteIdle<T> {
    inner: T,
    idle: Duration,
    metrics: Arc<ProxyMetrics>,
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl<T> WriteIdle<T> {
    pub fn new(inner: T, idle: Duration, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            inner,
            idle,
            metrics,
            timer: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        }
    }

    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if !self.armed {
            self.armed = true;
            let at = Instant::now() + self.idle;
            self.timer.as_mut().reset(at);
        }
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(Err(expired(&self.metrics, Kind::ClientWrite, self.idle)))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteIdle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteIdle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.stalled(cx),
            done => {
                self.armed = false;
                done
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.stalled(cx),
            done => {
                self.armed = false;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.stalled(cx),
            done => {
                self.armed = false;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Milliseconds since `origin` of the last byte moved, shared by both directions of a joined
/// connection.
#[derive(Clone)]
pub struct Activity {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: Arc::default(),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.last() + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A connection that records its progress in an [`Activity`].
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The requests (streams) open on one client connection, for closing an HTTP/2 connection that
/// has had none for `http2_idle` (its pings keep it busy, so the bytes moving do not tell).
#[derive(Clone, Default)]
pub struct OpenStreams {
    open: Arc<AtomicU64>,
    changed: Activity,
}

/// One open stream; closed when dropped (with the response body it travels in).
pub struct StreamGuard(OpenStreams);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.changed.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OpenStreams {
    pub fn enter(&self) -> StreamGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.changed.touch();
        StreamGuard(self.clone())
    }

    /// Resolves once no stream was open for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            self.changed.idle_for(idle).await;
            if self.open.load(Ordering::Relaxed) == 0 {
                return;
            }
            // Busy: look again one period later.
            self.changed.touch();
        }
    }
}

/// A body that holds a [`StreamGuard`] until it is dropped.
pub struct Guarded<B> {
    inner: B,
    _guard: StreamGuard,
}

impl<B> Guarded<B> {
    pub fn new(inner: B, guard: StreamGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Copies both ways between two upgraded connections until either side ends, or nothing moved
/// for `idle`. Returns whether the idle deadline ended it.
pub async fn join_with_idle<A, B>(
    a: A,
    b: B,
    idle: Duration,
    metrics: &ProxyMetrics,
) -> io::Result<bool>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::default();
    let mut a = Tracked::new(a, activity.clone());
    let mut b = Tracked::new(b, activity.clone());
    tokio::select! {
        done = tokio::io::copy_bidirectional(&mut a, &mut b) => done.map(|_| false),
        () = activity.idle_for(idle) => {
            metrics.timeouts.with_label_values(&[Kind::WebSocket.label()]).inc();
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A body fed by a channel; pending while the channel is empty and open.
    struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn a_body_that_stalls_fails_at_its_deadline_and_one_that_moves_does_not() {
        let metrics = Arc::new(ProxyMetrics::new());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut idle = IdleBody::new(Fed(rx), ms(300), Kind::UpstreamRead, metrics.clone());
        let feeder = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(ms(200)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
            // Then nothing, without ending.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..4 {
            let f = idle.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), "x");
        }
        let stalled = Instant::now();
        let err = idle.frame().await.unwrap().unwrap_err();
        let took = stalled.elapsed();
        assert!(err.to_string().contains("upstream_read"), "{err}");
        assert!(took >= ms(290) && took < ms(600), "{took:?}");
        assert_eq!(
            metrics.timeouts.with_label_values(&["upstream_read"]).get(),
            1
        );
        feeder.abort();
    }

    #[tokio::test]
    async fn an_idle_joined_connection_ends_at_its_deadline() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let join = tokio::spawn(async move {
            let m = ProxyMetrics::new();
            let idle = join_with_idle(a, b, ms(400), &m).await.unwrap();
            (
                idle,
                Instant::now(),
                m.timeouts.with_label_values(&["websocket_idle"]).get(),
            )
        });
        tokio::time::sleep(ms(300)).await;
        a_peer.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_peer.read_exact(&mut got).await.unwrap();
        let last = Instant::now();
        let (idle, ended, counted) = join.await.unwrap();
        let after = ended - last;
        assert!(idle && counted == 1);
        assert!(
            after >= ms(390) && after < ms(700),
            "{after:?} after the last byte"
        );
    }

    #[tokio::test]
    async fn streams_keep_a_connection_busy_until_they_end() {
        let streams = OpenStreams::default();
        let guard = streams.enter();
        let watch = {
            let s = streams.clone();
            tokio::spawn(async move {
                s.idle_for(ms(200)).await;
                Instant::now()
            })
        };
        tokio::time::sleep(ms(500)).await;
        assert!(!watch.is_finished(), "a stream is open");
        let closed = Instant::now();
        drop(guard);
        let idle_at = watch.await.unwrap();
        let after = idle_at - closed;
        assert!(after >= ms(190) && after < ms(600), "{after:?}");
    }
}
