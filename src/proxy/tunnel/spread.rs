//! Which agent carries a connection to a remote port: the tunnel's one client, or for a
//! load-balancing group each member in the group's order (round robin or least connections,
//! `crate::domain::balance`), the next one tried when a member is offline or refuses. Nothing
//! has been sent to any member before one accepts, so trying the next is always safe.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::Tunnels;
use super::remote::{CarryError, RemoteTunnel};
use super::session::StreamSlot;
use crate::domain::{Balance, balance};

/// One agent-side service a remote port reaches: a tunnel of one client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    pub client_id: String,
    /// The tunnel's name in its client's configuration.
    pub name: String,
    /// `host:port` as the agent dials it.
    pub target: String,
}

/// One listener's balancing state, kept across retargets: the turn counter and the
/// connections (or flows) each backend carries now through this proxy. Keyed by [`Backend`]
/// for remote ports, by client id for HTTP group targets.
pub struct Spread<K: Eq + Hash = Backend> {
    turn: AtomicUsize,
    open: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash> Default for Spread<K> {
    fn default() -> Self {
        Self {
            turn: AtomicUsize::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }
}

/// Counts one connection on a backend until dropped.
pub struct Carrying<K: Eq + Hash = Backend> {
    spread: Arc<Spread<K>>,
    backend: K,
}

impl<K: Eq + Hash> Drop for Carrying<K> {
    fn drop(&mut self) {
        let mut open = self.spread.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.backend) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.backend);
            }
        }
    }
}

/// A stream opened to one backend.
pub struct Opened {
    pub stream: hyper::upgrade::Upgraded,
    pub slot: Option<StreamSlot>,
    pub carrying: Carrying,
}

impl<K: Eq + Hash + Clone> Spread<K> {
    /// The order in which one connection tries `keys`: `turn` moves once per connection.
    pub fn order_of(&self, balance: Balance, turn: &AtomicUsize, keys: &[K]) -> Vec<usize> {
        let turn = turn.fetch_add(1, Ordering::Relaxed);
        let open = self.spread_open();
        let counts: Vec<usize> = keys
            .iter()
            .map(|k| open.get(k).copied().unwrap_or(0))
            .collect();
        balance::order(balance, turn, &counts)
    }

    /// Counts one connection on `k` until the guard drops.
    pub fn enter(self: &Arc<Self>, k: &K) -> Carrying<K> {
        *self.spread_open().entry(k.clone()).or_insert(0) += 1;
        Carrying {
            spread: self.clone(),
            backend: k.clone(),
        }
    }

    fn spread_open(&self) -> std::sync::MutexGuard<'_, HashMap<K, usize>> {
        self.open.lock().expect("not poisoned")
    }
}

impl Spread {
    fn order(&self, t: &RemoteTunnel) -> Vec<usize> {
        self.order_of(t.balance, &self.turn, &t.backends)
    }

    /// Opens a stream (TCP bytes, or with `udp` framed datagrams) to the first backend of `t`
    /// that takes it, in the group's order; the error of the last one tried otherwise.
    pub async fn open(
        self: &Arc<Self>,
        tunnels: &Tunnels,
        t: &RemoteTunnel,
        udp: bool,
    ) -> Result<Opened, CarryError> {
        let mut last = None;
        for i in self.order(t) {
            let b = &t.backends[i];
            match tunnels
                .open_stream(&b.client_id, &b.target, udp, false)
                .await
            {
                Ok((stream, slot)) => {
                    return Ok(Opened {
                        stream,
                        slot,
                        carrying: self.enter(b),
                    });
                }
                Err(e) => {
                    if t.backends.len() > 1 {
                        tunnels
                            .metrics
                            .remote_connections
                            .with_label_values(&["group_next"])
                            .inc();
                        tracing::debug!(port = t.port, client_id = %b.client_id, error = %e, "group member did not take the connection; next one");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| CarryError::Offline(t.name.clone())))
    }
}
