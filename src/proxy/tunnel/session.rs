//! The sessions this proxy holds: each agent connection's HTTP/2 client handle behind the
//! [`Transport`] trait (so QUIC can be added without touching routing), its state and open
//! streams, and the in-memory table client id → sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::sync::{Notify, mpsc};

use crate::domain::SetName;
use crate::proxy::ProxyBody;
use crate::store::SessionRecord;

/// Why a stream did not carry a request.
pub enum StreamError {
    /// Never started (the session is closing, GOAWAY came first): the request comes back
    /// untouched and may go to another session.
    NotSent(Box<Request<ProxyBody>>),
    /// The agent refused the stream before processing it (REFUSED_STREAM): safe to repeat when
    /// the request had no body.
    Refused(String),
    Failed(String),
}

/// One multiplexed session to an agent: opens streams, says whether it can.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn open(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, StreamError>;
    fn usable(&self) -> bool;
}

/// HTTP/2 with the roles reversed: this proxy is the client of the agent's server.
pub struct H2Transport(pub hyper::client::conn::http2::SendRequest<ProxyBody>);

#[async_trait]
impl Transport for H2Transport {
    async fn open(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, StreamError> {
        let mut send = self.0.clone();
        if send.ready().await.is_err() {
            return Err(StreamError::NotSent(Box::new(req)));
        }
        match send.try_send_request(req).await {
            Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(StreamError::NotSent(Box::new(req))),
                None if refused(e.error()) => Err(StreamError::Refused(chain(e.error()))),
                None => Err(StreamError::Failed(chain(e.error()))),
            },
        }
    }

    fn usable(&self) -> bool {
        !self.0.is_closed()
    }
}

/// Whether the agent left the stream unprocessed, so it is safe to send again: refused
/// (REFUSED_STREAM, RFC 9113 §8.7), or above the last stream id of a graceful GOAWAY
/// (NO_ERROR, §6.8: the agent retiring the session opened it never).
fn refused(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            let graceful_goaway =
                h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) || graceful_goaway {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

pub(crate) use crate::proxy::forward::error_chain as chain;

/// A live session of one client on this proxy.
pub struct Session {
    pub id: String,
    pub client_id: String,
    pub instance: String,
    pub slot: u32,
    pub since: Instant,
    pub transport: Box<dyn Transport>,
    /// Takes no new streams: the agent said `Leaving`, this proxy drains, or a reconnect of the
    /// same agent session replaced it.
    leaving: AtomicBool,
    open: AtomicUsize,
    pub max_streams: usize,
    /// Frames to the agent on the control stream.
    pub control: mpsc::Sender<Bytes>,
    /// Wakes the session's task: it was replaced or must close.
    pub retire: Notify,
    /// Wakes whoever waits for the last stream to end.
    pub idle: Notify,
    /// What was registered in the store (compare-on-remove needs it).
    pub record: Mutex<SessionRecord>,
    /// Hash of the configuration last sent to the agent.
    pub pushed: Mutex<Option<String>>,
    /// Targets whose health check fails on the agent: no new streams to them on this session.
    pub down: std::sync::RwLock<std::collections::HashSet<String>>,
    /// When what the agent reports (acknowledgement, health) was last written to the store,
    /// and whether a later report waits for the next heartbeat.
    pub reported: Mutex<Option<Instant>>,
    pub report_pending: AtomicBool,
    /// The client's home set when it authenticated (`None`: any set).
    placement: std::sync::OnceLock<SetName>,
    /// Addresses of its serving set the agent could not reach when it connected.
    unreachable: std::sync::OnceLock<Vec<String>>,
    /// Idle raw streams kept for the fast path's next request to their target; each still
    /// counted open (the agent holds it open too).
    parked: Mutex<Vec<Parked>>,
}

/// A raw stream through a session (a plain CONNECT's upgraded stream), as bytes.
pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> RawIo for T {}
pub type RawStream = Box<dyn RawIo>;

/// An idle raw stream to `target` (`fast.rs`).
pub struct Parked {
    target: Box<str>,
    io: RawStream,
    since: Instant,
}

impl Parked {
    /// Whether the stream still looks open and unused: an idle stream has nothing to say, so
    /// anything readable (bytes, its end, a reset) means the agent or its service closed it.
    /// Reads the state the stream already has; never waits.
    fn still_open(&mut self, now: Instant, idle_timeout: Duration) -> bool {
        use tokio::io::AsyncRead;
        if now.duration_since(self.since) >= idle_timeout {
            return false;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        std::pin::Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }
}

impl Session {
    pub fn new(
        record: SessionRecord,
        client_id: String,
        transport: Box<dyn Transport>,
        max_streams: usize,
        control: mpsc::Sender<Bytes>,
    ) -> Self {
        Self {
            id: record.session_id.clone(),
            client_id,
            instance: record.instance.clone(),
            slot: record.slot,
            since: Instant::now(),
            transport,
            leaving: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            max_streams,
            control,
            retire: Notify::new(),
            idle: Notify::new(),
            record: Mutex::new(record),
            pushed: Mutex::new(None),
            down: std::sync::RwLock::default(),
            reported: Mutex::new(None),
            report_pending: AtomicBool::new(false),
            placement: std::sync::OnceLock::new(),
            unreachable: std::sync::OnceLock::new(),
            parked: Mutex::default(),
        }
    }

    /// Records the client's home set and what its agent could not reach (at authentication).
    pub fn set_placement(&self, placement: Option<SetName>, unreachable: Vec<String>) {
        if let Some(p) = placement {
            let _ = self.placement.set(p);
        }
        let _ = self.unreachable.set(unreachable);
    }

    pub fn unreachable(&self) -> &[String] {
        self.unreachable.get().map_or(&[], Vec::as_slice)
    }

    pub fn placement(&self) -> Option<&SetName> {
        self.placement.get()
    }

    /// Whether the agent reports `target`'s health check failing.
    pub fn is_down(&self, target: &str) -> bool {
        self.down.read().expect("not poisoned").contains(target)
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Marks the session as taking no new streams (its parked ones close); true when it was
    /// not already.
    pub fn set_leaving(&self) -> bool {
        let first = !self.leaving.swap(true, Ordering::AcqRel);
        let parked = std::mem::take(&mut *self.parked.lock().expect("not poisoned"));
        self.close_parked(parked);
        first
    }

    /// Keeps `io`, the stream `slot` counts, for the next request to `target` (still counted
    /// open); at most `max` per session and a quarter of its `max_streams`, the oldest closes.
    /// A session taking no new streams keeps none: the stream closes.
    pub fn park(slot: StreamSlot, target: &str, io: RawStream, max: usize) {
        let max = max.min(slot.session().max_streams / 4);
        let evicted = {
            let s = slot.session();
            let mut parked = s.parked.lock().expect("not poisoned");
            // Read under the lock: `set_leaving` sets the flag, then empties the list.
            if max == 0 || s.is_leaving() {
                return;
            }
            parked.push(Parked {
                target: target.into(),
                io,
                since: Instant::now(),
            });
            if parked.len() > max {
                vec![parked.remove(0)]
            } else {
                Vec::new()
            }
        };
        // The slot's count passes to the entry.
        let s = slot.keep_count();
        s.close_parked(evicted);
    }

    /// Closes the longest parked stream, if any: a new stream needs its place.
    fn evict_parked(&self) -> bool {
        let oldest = {
            let mut parked = self.parked.lock().expect("not poisoned");
            if parked.is_empty() {
                return false;
            }
            vec![parked.remove(0)]
        };
        self.close_parked(oldest);
        true
    }

    /// Streams open and in use: parked ones are not (they give way to a new one).
    pub fn busy_streams(&self) -> usize {
        let parked = self.parked.lock().expect("not poisoned").len();
        self.open_streams().saturating_sub(parked)
    }

    /// The most recently parked stream to `target` that still looks open; the stale ones met
    /// on the way close.
    pub fn unpark(
        self: &Arc<Self>,
        target: &str,
        idle_timeout: Duration,
    ) -> Option<(StreamSlot, RawStream)> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut parked = self.parked.lock().expect("not poisoned");
            let mut found = None;
            while let Some(i) = parked.iter().rposition(|p| &*p.target == target) {
                let mut p = parked.remove(i);
                if p.still_open(now, idle_timeout) {
                    found = Some(p);
                    break;
                }
                stale.push(p);
            }
            found
        };
        self.close_parked(stale);
        // The entry's count passes to the slot.
        found.map(|p| (StreamSlot(Some(self.clone())), p.io))
    }

    /// Closes parked streams idle past `idle_timeout` or closed by the agent.
    pub fn sweep_parked(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let stale: Vec<Parked> = self
            .parked
            .lock()
            .expect("not poisoned")
            .extract_if(.., |p| !p.still_open(now, idle_timeout))
            .collect();
        self.close_parked(stale);
    }

    /// Closes streams taken out of the parked list (outside its lock) and stops counting them.
    fn close_parked(&self, gone: Vec<Parked>) {
        let n = gone.len();
        drop(gone);
        self.release(n);
    }

    /// `n` streams are no longer open.
    fn release(&self, n: usize) {
        if n > 0 && self.open.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }

    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a stream as open until the guard drops; `None` at `max_streams` (a parked stream
    /// is closed to make room first).
    pub fn enter(self: &Arc<Self>) -> Option<StreamSlot> {
        let mut cur = self.open.load(Ordering::Acquire);
        loop {
            if cur >= self.max_streams {
                if !self.evict_parked() {
                    return None;
                }
                cur = self.open.load(Ordering::Acquire);
                continue;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(StreamSlot(Some(self.clone()))),
                Err(now) => cur = now,
            }
        }
    }

    pub fn key(&self) -> (String, u32) {
        (self.instance.clone(), self.slot)
    }
}

/// One open stream on a session (the request and its response body). Always `Some` but in
/// [`StreamSlot::keep_count`].
pub struct StreamSlot(Option<Arc<Session>>);

impl StreamSlot {
    pub fn session(&self) -> &Arc<Session> {
        self.0.as_ref().expect("a slot holds its session")
    }

    /// The session, its count of this stream left in place (a parked entry holds it now).
    fn keep_count(mut self) -> Arc<Session> {
        self.0.take().expect("a slot holds its session")
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.release(1);
        }
    }
}

/// Sessions by client id.
#[derive(Default)]
pub struct LocalSessions {
    by_client: Mutex<HashMap<String, Vec<Arc<Session>>>>,
}

/// Why a session is not admitted into the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    Client,
    Proxy,
}

impl LocalSessions {
    /// Adds `s`; a session of the same agent instance and slot is taken out and returned (its
    /// task retires it). Refused over `per_client` sessions (the replaced one not counted) or
    /// `total` on this proxy.
    pub fn insert(
        &self,
        s: Arc<Session>,
        per_client: usize,
        total: usize,
    ) -> Result<Option<Arc<Session>>, Full> {
        let mut t = self.by_client.lock().expect("not poisoned");
        let all: usize = t.values().map(Vec::len).sum();
        let list = t.entry(s.client_id.clone()).or_default();
        let same = list.iter().position(|o| o.key() == s.key());
        let after = list.len() + usize::from(same.is_none());
        if after > per_client {
            return Err(Full::Client);
        }
        if same.is_none() && all >= total {
            return Err(Full::Proxy);
        }
        let replaced = same.map(|i| list.swap_remove(i));
        list.push(s);
        Ok(replaced)
    }

    /// Whether a session of `client_id` with `key` would be admitted now (checked before
    /// `AuthOk`, so an agent over a limit is told why; [`LocalSessions::insert`] checks again).
    pub fn check(
        &self,
        client_id: &str,
        key: &(String, u32),
        per_client: usize,
        total: usize,
    ) -> Result<(), Full> {
        let t = self.by_client.lock().expect("not poisoned");
        let all: usize = t.values().map(Vec::len).sum();
        let list = t.get(client_id).map(Vec::as_slice).unwrap_or_default();
        let same = list.iter().any(|o| &o.key() == key);
        if !same && list.len() >= per_client {
            return Err(Full::Client);
        }
        if !same && all >= total {
            return Err(Full::Proxy);
        }
        Ok(())
    }

    /// Takes `session_id` out of the table; true when it was there.
    pub fn remove(&self, client_id: &str, session_id: &str) -> bool {
        let mut t = self.by_client.lock().expect("not poisoned");
        let Some(list) = t.get_mut(client_id) else {
            return false;
        };
        let before = list.len();
        list.retain(|s| s.id != session_id);
        let removed = list.len() != before;
        if list.is_empty() {
            t.remove(client_id);
        }
        removed
    }

    pub fn of(&self, client_id: &str) -> Vec<Arc<Session>> {
        self.by_client
            .lock()
            .expect("not poisoned")
            .get(client_id)
            .cloned()
            .unwrap_or_default()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.by_client
            .lock()
            .expect("not poisoned")
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_client
            .lock()
            .expect("not poisoned")
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub struct Dead;

    #[async_trait]
    impl Transport for Dead {
        async fn open(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, StreamError> {
            Err(StreamError::NotSent(Box::new(req)))
        }
        fn usable(&self) -> bool {
            false
        }
    }

    pub fn session(client: &str, id: &str, instance: &str, slot: u32) -> Arc<Session> {
        session_with(client, id, instance, slot, 2)
    }

    fn session_with(
        client: &str,
        id: &str,
        instance: &str,
        slot: u32,
        max_streams: usize,
    ) -> Arc<Session> {
        let now = chrono::Utc::now();
        let record = SessionRecord {
            session_id: id.into(),
            node_id: "n1".into(),
            node_address: "127.0.0.1:8080".into(),
            instance: instance.into(),
            slot,
            since: now,
            last_seen: now,
            expires_at: now,
            state: Default::default(),
            config: None,
            unhealthy: Vec::new(),
        };
        let (tx, _rx) = mpsc::channel(1);
        Arc::new(Session::new(
            record,
            client.into(),
            Box::new(Dead),
            max_streams,
            tx,
        ))
    }

    #[test]
    fn a_reconnect_replaces_its_own_session_and_limits_hold() {
        let t = LocalSessions::default();
        assert!(
            t.insert(session("c", "s1", "i1", 0), 2, 10)
                .unwrap()
                .is_none()
        );
        assert!(
            t.insert(session("c", "s2", "i1", 1), 2, 10)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            t.insert(session("c", "s3", "i2", 0), 2, 10).err(),
            Some(Full::Client)
        );
        assert_eq!(t.check("c", &("i2".into(), 0), 2, 10), Err(Full::Client));
        assert_eq!(
            t.check("c", &("i1".into(), 0), 2, 10),
            Ok(()),
            "a reconnect fits"
        );
        assert_eq!(t.check("d", &("i9".into(), 0), 2, 2), Err(Full::Proxy));
        let replaced = t.insert(session("c", "s4", "i1", 0), 2, 10).unwrap();
        assert_eq!(replaced.map(|s| s.id.clone()).as_deref(), Some("s1"));
        assert_eq!(
            t.insert(session("d", "s5", "i9", 0), 8, 2).err(),
            Some(Full::Proxy)
        );
        let mut ids: Vec<String> = t.of("c").iter().map(|s| s.id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["s2", "s4"]);
        assert!(!t.remove("c", "s1"), "the replaced one is gone already");
        assert!(t.remove("c", "s2"));
        assert_eq!(t.len(), 1);
    }

    /// A raw stream over an in-memory pipe; the other end returned.
    fn stream() -> (RawStream, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(1024);
        (Box::new(a), b)
    }

    fn parked(s: &Session) -> usize {
        s.parked.lock().unwrap().len()
    }

    #[tokio::test]
    async fn parked_streams_stay_counted_until_they_close_and_only_open_ones_come_back() {
        use tokio::io::AsyncWriteExt;
        let minute = Duration::from_secs(60);
        // At most 16 / 4 = 4 parked.
        let s = session_with("c", "s1", "i1", 0, 16);
        let (io, _far) = stream();
        Session::park(s.enter().unwrap(), "t:1", io, 4);
        assert_eq!((s.open_streams(), parked(&s)), (1, 1), "parked: still open");
        assert!(s.unpark("other:1", minute).is_none(), "another target's");
        let (slot, _io) = s.unpark("t:1", minute).expect("taken again");
        assert_eq!((s.open_streams(), parked(&s)), (1, 0));
        drop(slot);
        assert_eq!(s.open_streams(), 0);

        // Closed by the far side, or with something to say: not handed out, and released.
        let (io, far) = stream();
        Session::park(s.enter().unwrap(), "t:1", io, 4);
        drop(far);
        let (io, mut far) = stream();
        Session::park(s.enter().unwrap(), "t:1", io, 4);
        far.write_all(b"stray").await.unwrap();
        assert!(s.unpark("t:1", minute).is_none());
        assert_eq!((s.open_streams(), parked(&s)), (0, 0));

        // Past the idle timeout.
        let (io, _far) = stream();
        Session::park(s.enter().unwrap(), "t:1", io, 4);
        assert!(s.unpark("t:1", Duration::ZERO).is_none());
        assert_eq!(s.open_streams(), 0);

        // At most `max` per session, the oldest closes; a sweep closes closed ones.
        let mut fars = Vec::new();
        for _ in 0..2 {
            let (io, far) = stream();
            fars.push(far);
            Session::park(s.enter().unwrap(), "t:1", io, 1);
        }
        assert_eq!((s.open_streams(), parked(&s)), (1, 1));
        s.sweep_parked(minute);
        assert_eq!((s.open_streams(), parked(&s)), (1, 1), "still open");
        fars.pop();
        s.sweep_parked(minute);
        assert_eq!((s.open_streams(), parked(&s)), (0, 0));
        let (io, _far) = stream();
        Session::park(s.enter().unwrap(), "t:1", io, 1);

        // A new stream at the session's limit closes a parked one to make room; parked ones are
        // not busy.
        let slots: Vec<StreamSlot> = (0..15).map(|_| s.enter().unwrap()).collect();
        assert_eq!((s.open_streams(), s.busy_streams()), (16, 15));
        let last = s.enter().expect("the parked stream gave way");
        assert_eq!((s.open_streams(), parked(&s)), (16, 0));
        assert!(s.enter().is_none(), "nothing left to give way");
        drop(slots);
        drop(last);
        assert_eq!(s.open_streams(), 0);
        let mut fars = Vec::new();
        for _ in 0..6 {
            let (io, far) = stream();
            fars.push(far);
            Session::park(s.enter().unwrap(), "t:1", io, 64);
        }
        assert_eq!(
            (s.open_streams(), parked(&s)),
            (4, 4),
            "a quarter of max_streams"
        );

        // Leaving closes them all and parks none after.
        assert!(s.set_leaving());
        assert_eq!((s.open_streams(), parked(&s)), (0, 0));
        let (io, _far) = stream();
        Session::park(s.enter().unwrap(), "t:1", io, 2);
        assert_eq!((s.open_streams(), parked(&s)), (0, 0));
    }

    #[test]
    fn counts_streams_up_to_the_limit() {
        let s = session("c", "s1", "i1", 0);
        let a = s.enter().unwrap();
        let b = s.enter().unwrap();
        assert!(s.enter().is_none(), "max_streams is 2");
        drop(a);
        assert_eq!(s.open_streams(), 1);
        drop(b);
        assert_eq!(s.open_streams(), 0);
    }
}
