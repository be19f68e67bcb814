//! The sessions this proxy holds: each agent connection's HTTP/2 client handle behind the
//! [`Transport`] trait (so QUIC can be added without touching routing), its state and open
//! streams, and the in-memory table client id → sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

    /// Marks the session as taking no new streams; true when it was not already.
    pub fn set_leaving(&self) -> bool {
        !self.leaving.swap(true, Ordering::AcqRel)
    }

    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a stream as open until the guard drops; `None` at `max_streams`.
    pub fn enter(self: &Arc<Self>) -> Option<StreamSlot> {
        let mut cur = self.open.load(Ordering::Acquire);
        loop {
            if cur >= self.max_streams {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(StreamSlot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    pub fn key(&self) -> (String, u32) {
        (self.instance.clone(), self.slot)
    }
}

/// One open stream on a session (the request and its response body).
pub struct StreamSlot(Arc<Session>);

impl StreamSlot {
    pub fn session(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
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
        Arc::new(Session::new(record, client.into(), Box::new(Dead), 2, tx))
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
