//! Which agent carries a connection to a remote port: the tunnel's one client, or for a
//! load-balancing group each member in the group's order (round robin or least connections,
//! `crate::domain::balance`), the next one tried when a member is offline or refuses. Nothing
//! has been sent to any member before one accepts, so trying the next is always safe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::Tunnels;
use super::remote::{CarryError, RemoteTunnel};
use super::session::StreamSlot;
use crate::domain::balance;

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
/// connections (or flows) each backend carries now through this proxy.
#[derive(Default)]
pub struct Spread {
    turn: AtomicUsize,
    open: Mutex<HashMap<Backend, usize>>,
}

/// Counts one connection on a backend until dropped.
pub struct Carrying {
    spread: Arc<Spread>,
    backend: Backend,
}

impl Drop for Carrying {
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

impl Spread {
    fn order(&self, t: &RemoteTunnel) -> Vec<usize> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let open = self.open.lock().expect("not poisoned");
        let counts: Vec<usize> = t
            .backends
            .iter()
            .map(|b| open.get(b).copied().unwrap_or(0))
            .collect();
        balance::order(t.balance, turn, &counts)
    }

    fn enter(self: &Arc<Self>, b: &Backend) -> Carrying {
        *self.spread_open().entry(b.clone()).or_insert(0) += 1;
        Carrying {
            spread: self.clone(),
            backend: b.clone(),
        }
    }

    fn spread_open(&self) -> std::sync::MutexGuard<'_, HashMap<Backend, usize>> {
        self.open.lock().expect("not poisoned")
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
