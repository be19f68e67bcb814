//! One session slot's supervisor: dial (trying every known proxy, then backing off), serve until
//! the session ends, reconnect; on `ServerShutdown` dial the replacement first and only then
//! retire the old session (make-before-break), timing the move.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::servers::Servers;
use super::session::{DialError, Dialer, Event, Session};
use crate::observe::admin::Health;
use crate::store::{Backoff, RETRY_MAX};
use crate::tunnel::msg::AuthErrorCode;

/// A session must live this long before a failure restarts the backoff at its first delay
/// (a proxy that accepts and drops at once is not hammered).
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// Redirects to another proxy set followed in one round of dialling.
const MAX_REDIRECTS: usize = 4;
/// The same failure is logged at most this often (a wrong token retries forever).
const LOG_EVERY: Duration = Duration::from_secs(60);

pub struct Shared {
    pub dialer: Dialer,
    pub servers: Mutex<Servers>,
    /// The address each slot holds a session to.
    pub held: Mutex<Vec<Option<String>>>,
    pub grace: Duration,
    pub health: Health,
    /// How many slots have had their first session up (or given up waiting): slot `i` starts
    /// dialling once `i` slots did, so it knows the peers the first sessions learnt and can
    /// pick a proxy no other slot holds.
    pub started: watch::Sender<u32>,
    pub stagger: Duration,
}

/// Logs a failure once per [`LOG_EVERY`] per distinct message.
#[derive(Default)]
struct RateLimitedLog {
    last: HashMap<String, Instant>,
}

impl RateLimitedLog {
    fn error(&mut self, e: &DialError) {
        let msg = e.to_string();
        let now = Instant::now();
        if self.last.len() > 64 {
            self.last.clear();
        }
        match self.last.get(&msg) {
            Some(t) if now.duration_since(*t) < LOG_EVERY => {
                tracing::debug!(error = %msg, "session attempt failed (again)");
            }
            _ => {
                self.last.insert(msg.clone(), now);
                if matches!(
                    e,
                    DialError::Refused {
                        code: AuthErrorCode::Draining | AuthErrorCode::OtherSet,
                        ..
                    }
                ) {
                    // Expected during a rollout, or when the address reached a proxy of another
                    // set: the next address (or the one named) is tried at once.
                    tracing::info!(kind = e.label(), "{msg}");
                } else {
                    tracing::error!(kind = e.label(), "{msg}");
                }
            }
        }
    }
}

enum Stopped {
    Yes,
}

impl Shared {
    fn set_held(&self, slot: u32, addr: Option<String>) {
        if let Ok(mut h) = self.held.lock() {
            if let Some(x) = h.get_mut(slot as usize) {
                *x = addr;
            }
            let up = h.iter().any(Option::is_some);
            self.health.set_ready(up);
        }
    }

    fn busy(&self, slot: u32) -> Vec<String> {
        self.held
            .lock()
            .map(|h| {
                h.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != slot as usize)
                    .filter_map(|(_, a)| a.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Dials until a session is up: every candidate once per round, then a backoff delay.
    async fn connect(
        &self,
        slot: u32,
        first: Option<&str>,
        leaving: Option<&str>,
        backoff: &mut Backoff,
        log: &mut RateLimitedLog,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Session, Stopped> {
        loop {
            let order = self
                .servers
                .lock()
                .map(|s| s.order(first, slot as usize, &self.busy(slot), leaving))
                .unwrap_or_default();
            let mut order: std::collections::VecDeque<String> = order.into();
            let mut tried: Vec<String> = Vec::new();
            // Addresses proxies sent this slot to this round, and those of them it could not
            // reach (told to the next proxies, which offer others or take the agent).
            let mut redirected: Vec<String> = Vec::new();
            let mut unreachable: Vec<String> = Vec::new();
            let mut wait = None;
            while let Some(addr) = order.pop_front() {
                let addr = &addr;
                tried.push(addr.clone());
                if *stop.borrow() {
                    return Err(Stopped::Yes);
                }
                let attempt = tokio::select! {
                    r = self.dialer.open(addr, slot, &unreachable) => r,
                    _ = stop.wait_for(|s| *s) => return Err(Stopped::Yes),
                };
                match attempt {
                    Ok(s) => {
                        if let Ok(mut servers) = self.servers.lock() {
                            for p in &s.ok.peers {
                                servers.learn(p);
                            }
                        }
                        return Ok(s);
                    }
                    Err(e) => {
                        self.dialer
                            .metrics
                            .dial_failures
                            .with_label_values(&[e.label()])
                            .inc();
                        log.error(&e);
                        let other_set = matches!(
                            e,
                            DialError::Refused {
                                code: AuthErrorCode::OtherSet,
                                ..
                            }
                        );
                        if redirected.contains(addr) && !other_set {
                            unreachable.push(addr.clone());
                            // Asked again with what failed: the proxy that sent us there may
                            // name another node, or take the agent itself.
                            for a in tried.iter().rev() {
                                if a != addr && !order.contains(a) && !redirected.contains(a) {
                                    order.push_front(a.clone());
                                    break;
                                }
                            }
                        }
                        // A proxy of another set names one of the client's serving set: that
                        // one next (each address once a round, and a few redirects at most, so
                        // proxies cannot bounce the agent).
                        if let DialError::Refused {
                            reconnect_to: Some(to),
                            ..
                        } = &e
                            && !tried.contains(to)
                            && redirected.len() < MAX_REDIRECTS
                            && crate::config::agent::split_host_port(to).is_some()
                        {
                            redirected.push(to.clone());
                            order.retain(|a| a != to);
                            order.push_front(to.clone());
                        }
                        // A wrong token stays wrong: retry at the cap, not faster. (A proxy
                        // answering `draining` is simply passed over for the next address.)
                        if let DialError::Refused { code, .. } = &e
                            && !code.retryable()
                        {
                            wait = Some(RETRY_MAX);
                        }
                    }
                }
            }
            let delay = wait.unwrap_or_else(|| backoff.next_delay());
            let delay = crate::store::jitter(delay, rand::random::<f64>());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => return Err(Stopped::Yes),
            }
        }
    }
}

/// The slot's life until the agent stops.
pub async fn run(shared: std::sync::Arc<Shared>, slot: u32, mut stop: watch::Receiver<bool>) {
    let metrics = shared.dialer.metrics.clone();
    let mut started = shared.started.subscribe();
    let _ = tokio::time::timeout(shared.stagger, started.wait_for(|n| *n >= slot)).await;
    let mut first = true;
    let mut backoff = Backoff::new();
    let mut log = RateLimitedLog::default();
    let mut next: Option<Session> = None;
    loop {
        let mut session = match next.take() {
            Some(s) => s,
            None => match shared
                .connect(slot, None, None, &mut backoff, &mut log, &mut stop)
                .await
            {
                Ok(s) => s,
                Err(Stopped::Yes) => return,
            },
        };
        shared.set_held(slot, Some(session.addr.clone()));
        metrics.sessions.inc();
        if std::mem::take(&mut first) {
            shared.started.send_modify(|n| *n += 1);
        }
        tracing::info!(
            slot,
            server = %session.addr,
            node = %session.ok.node_id,
            session = %session.ok.session_id,
            "session up"
        );
        let event = tokio::select! {
            e = session.events.recv() => e,
            _ = stop.wait_for(|s| *s) => None,
        };
        metrics.sessions.dec();
        shared.set_held(slot, None);
        match event {
            None => {
                // Stopping (SIGTERM): retire the session and end the slot.
                let addr = session.addr.clone();
                session.retire("agent stopping", shared.grace).await;
                tracing::info!(slot, server = %addr, "session retired");
                return;
            }
            Some(Event::Shutdown(msg)) => {
                let started = Instant::now();
                tracing::info!(
                    slot,
                    server = %session.addr,
                    reason = %msg.reason,
                    reconnect_to = msg.reconnect_to.as_deref().unwrap_or("-"),
                    grace_s = msg.grace_period,
                    "server shutting down: opening a new session before leaving"
                );
                if let (Some(to), Ok(mut s)) = (&msg.reconnect_to, shared.servers.lock()) {
                    s.learn(to);
                }
                let old_addr = session.addr.clone();
                let new = shared
                    .connect(
                        slot,
                        msg.reconnect_to.as_deref(),
                        Some(&old_addr),
                        &mut backoff,
                        &mut log,
                        &mut stop,
                    )
                    .await;
                let grace = Duration::from_secs(msg.grace_period).min(shared.grace);
                match new {
                    Ok(n) => {
                        let took = started.elapsed();
                        metrics.move_seconds.observe(took.as_secs_f64());
                        metrics
                            .reconnects
                            .with_label_values(&["server_shutdown"])
                            .inc();
                        tracing::info!(
                            slot,
                            from = %old_addr,
                            to = %n.addr,
                            move_ms = took.as_millis() as u64,
                            "moved to a new session; leaving the old one"
                        );
                        backoff.reset();
                        tokio::spawn(session.retire("moved", grace));
                        next = Some(n);
                    }
                    Err(Stopped::Yes) => {
                        session.retire("agent stopping", grace).await;
                        return;
                    }
                }
            }
            Some(Event::Dead(why)) => {
                tracing::warn!(slot, server = %session.addr, reason = why.label(), "session lost: {why}");
                metrics.reconnects.with_label_values(&[why.label()]).inc();
                if session.since.elapsed() >= STABLE_AFTER {
                    backoff.reset();
                }
                session.abort();
                let delay = backoff.next_jittered();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}
