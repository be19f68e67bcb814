//! The proxy's side of tunnels (ARCHITECTURE §6, §8; docs/tunnels.md): the TLS listener agents
//! dial (`listener`), the sessions it holds (`session`), which session carries a request
//! (`choose`), sending a request down a session or to the node holding one (`send`), and
//! draining sessions make-before-break.

mod body;
mod choose;
mod fast;
pub mod group;
mod listener;
mod metrics;
pub(crate) mod peer_stream;
mod push;
mod remote;
mod send;
mod session;
mod spread;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderName;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use body::{Hold, Holding};
pub use fast::{FastStream, NoStream};
pub use listener::serve;
pub use metrics::TunnelMetrics;
pub use remote::{Backend, RemotePorts, RemoteTunnel, follow_ports};

use super::ProxyBody;
use crate::config::AdminToken;
use crate::domain::SetName;
use crate::store::{NodeRegistry, NodeState, TunnelRegistry};
use crate::tunnel::msg::{Message, ServerShutdown};
use session::LocalSessions;

/// Carries the node token on a request one proxy forwards to the node holding the client's
/// session. Checked in constant time; never passed to an upstream or an agent.
pub const NODE_HEADER: HeaderName = HeaderName::from_static("tunnox-node");

/// On a node's answer to a request another node forwarded: this node holds no usable session
/// of the client and sent nothing on, so the forwarding node may try the client's other
/// sessions. Removed from every agent's answer, so only a node can set it.
pub const NOT_HELD_HEADER: HeaderName = HeaderName::from_static("tunnox-not-held");

/// On a request a node of another set of the business forwarded here (with the node token): the
/// sender's set. Served here, never forwarded again (docs/sets.md).
pub const FROM_SET_HEADER: HeaderName = HeaderName::from_static("tunnox-from-set");

/// Headers only this proxy sets: any a client sent is removed before forwarding.
pub const INTERNAL_HEADERS: [HeaderName; 7] = [
    crate::tunnel::TARGET_HEADER,
    crate::tunnel::CONTROL_HEADER,
    crate::tunnel::ERROR_HEADER,
    NODE_HEADER,
    crate::tunnel::udp::TRANSPORT_HEADER,
    peer_stream::CLIENT_HEADER,
    FROM_SET_HEADER,
];

#[derive(Debug, Clone)]
pub struct TunnelSettings {
    pub heartbeat: Duration,
    pub handshake_timeout: Duration,
    pub max_streams: u32,
    pub per_client: usize,
    pub max_sessions: usize,
    /// How long sessions keep serving after `ServerShutdown` (`proxy.drain.grace_period`).
    pub grace: Duration,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
    pub websocket_idle: Duration,
}

/// Everything about tunnels one proxy process holds.
pub struct Tunnels {
    local: LocalSessions,
    pub registry: Arc<dyn TunnelRegistry>,
    nodes: Arc<dyn NodeRegistry>,
    pub node_id: String,
    /// This node's HTTP address as peers reach it (`SessionRecord::node_address`).
    pub node_address: String,
    set: SetName,
    pub settings: TunnelSettings,
    pub metrics: TunnelMetrics,
    /// The fleet's node token; `None` in cluster mode without `node_token_file`: no forwarding
    /// to peers and forwarded requests refused.
    node_token: Option<AdminToken>,
    /// This process's own listeners: a peer address among them is never dialled.
    own: Vec<SocketAddr>,
    peers: Client<HttpConnector, ProxyBody>,
    draining: AtomicBool,
    warned_no_token: AtomicBool,
    /// (client, target, udp) of every tunnel in this node's remote-port table: what a peer's
    /// CONNECT may ask this node to carry.
    carried: std::sync::RwLock<std::collections::HashSet<(String, String, bool)>>,
    /// Each client's configuration from the same table: what its agents are pushed.
    configs: std::sync::RwLock<
        std::collections::HashMap<String, Arc<crate::tunnel::config::ConfigPush>>,
    >,
    /// Session tasks still running, including sessions already out of the table that wait for
    /// their streams (a retired session's long-lived connections): shutdown waits for them.
    live_sessions: std::sync::atomic::AtomicUsize,
    /// Cluster: where what remote ports carried is added up (the set's traffic in the store).
    traffic: std::sync::OnceLock<(Arc<dyn crate::store::PortRegistry>, SetName)>,
    /// Requests in flight through this node per member of HTTP group targets (least
    /// connections).
    group_load: Arc<spread::Spread<String>>,
    /// Whether group members have sessions on other nodes, as the store said a moment ago.
    presence: group::Presence,
    /// The fleet as the last heartbeat saw it: where agents of other sets belong.
    healthy: Arc<crate::proxy::registry::HealthySets>,
}

/// How long the addresses an agent could not reach are not offered to its session again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(300);

/// Whether a node's tunnel address may be given to an agent: `host:port`, of sane length, not an
/// unspecified, link-local or multicast IP.
fn tunnel_address_ok(addr: &str) -> bool {
    let Some((host, port)) = crate::config::agent::split_host_port(addr) else {
        return false;
    };
    addr.len() <= 255 && port != 0 && !host.parse().is_ok_and(never_a_node)
}

/// An address no node of the fleet listens on: unspecified, link-local (cloud metadata),
/// multicast or broadcast. Node records come from the store: such an address in one is never
/// dialled by a proxy nor handed to an agent.
fn never_a_node(ip: std::net::IpAddr) -> bool {
    let link_local = match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    ip.is_unspecified() || ip.is_multicast() || link_local
}

/// Calls [`Tunnels::send_home`] every `every` (the registry's heartbeat) until `stop`.
pub async fn send_home_every(
    t: Arc<Tunnels>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => t.send_home(),
            _ = crate::proxy::stopped(&mut stop) => return,
        }
    }
}

/// Counts one running session task until dropped.
pub(super) struct LiveSession(Arc<Tunnels>);

impl LiveSession {
    pub(super) fn enter(t: &Arc<Tunnels>) -> Self {
        t.live_sessions
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(t.clone())
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0
            .live_sessions
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

pub struct TunnelDeps {
    pub healthy: Arc<crate::proxy::registry::HealthySets>,
    pub registry: Arc<dyn TunnelRegistry>,
    pub nodes: Arc<dyn NodeRegistry>,
    pub node_id: String,
    pub node_address: String,
    pub set: SetName,
    pub settings: TunnelSettings,
    pub metrics: TunnelMetrics,
    pub node_token: Option<AdminToken>,
    pub own: Vec<SocketAddr>,
    pub pool_max_idle: usize,
    pub pool_idle: Duration,
}

impl Tunnels {
    pub fn new(d: TunnelDeps) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(d.settings.connect_timeout));
        let peers = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(d.pool_idle)
            .pool_max_idle_per_host(d.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(http);
        Self {
            local: LocalSessions::default(),
            registry: d.registry,
            nodes: d.nodes,
            node_id: d.node_id,
            node_address: d.node_address,
            set: d.set,
            settings: d.settings,
            metrics: d.metrics,
            node_token: d.node_token,
            own: d.own,
            peers,
            draining: AtomicBool::new(false),
            warned_no_token: AtomicBool::new(false),
            carried: std::sync::RwLock::default(),
            configs: std::sync::RwLock::default(),
            live_sessions: std::sync::atomic::AtomicUsize::new(0),
            traffic: std::sync::OnceLock::new(),
            group_load: Arc::default(),
            presence: Default::default(),
            healthy: d.healthy,
        }
    }

    /// Whether this node's remote-port table has a tunnel of `client_id` to `target`.
    pub fn carries(&self, client_id: &str, target: &str, udp: bool) -> bool {
        self.carried.read().expect("not poisoned").contains(&(
            client_id.to_string(),
            target.to_string(),
            udp,
        ))
    }

    /// Whether a `tunnox-node` value is this fleet's node token (constant time).
    pub fn node_token_matches(&self, presented: &[u8]) -> bool {
        self.node_token
            .as_ref()
            .is_some_and(|t| t.matches(presented))
    }

    /// Tunnel addresses of the other active nodes of this set (`AuthOk.peers`,
    /// `ServerShutdown.reconnect_to`).
    async fn peer_tunnels(&self) -> Vec<String> {
        match self.nodes.list_nodes().await {
            Ok(nodes) => nodes
                .into_iter()
                .filter(|n| {
                    n.node_id != self.node_id
                        && n.state == NodeState::Active
                        && n.set == self.set
                        && !n.tunnel_address.is_empty()
                })
                .map(|n| n.tunnel_address)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node registry for tunnel peers");
                Vec::new()
            }
        }
    }

    /// Whether an agent placed on `placement` belongs on this node (`domain::decide`): its
    /// home set, else its business's DR set while home has no healthy node. An agent of a set
    /// that nobody serves now is kept here, in its business, until one does. Refused: why, and
    /// a tunnel listener of the serving set when one is known.
    /// `unreachable`: addresses of the serving set the agent could not reach (the registry
    /// may name a node that is gone, or one the agent cannot route to): another is offered, and
    /// when there is none a proxy of its business takes the agent.
    pub fn placed(
        &self,
        placement: Option<&SetName>,
        unreachable: &[String],
    ) -> Result<(), (String, Option<String>)> {
        use crate::domain::{Decision, decide};
        match decide(placement, &self.set, &self.healthy.get(), false) {
            Decision::Here | Decision::Unserved => Ok(()),
            Decision::Forward(set) => match self.tunnel_of(&set, unreachable) {
                None if !unreachable.is_empty() => Ok(()),
                to => Err((
                    format!(
                        "the client is placed on {}: set {set} serves it, not {}",
                        placement.map(ToString::to_string).unwrap_or_default(),
                        self.set
                    ),
                    to,
                )),
            },
            Decision::OtherBusiness => Err((
                format!(
                    "the client is placed on {}, another business than this proxy's {}",
                    placement.map(ToString::to_string).unwrap_or_default(),
                    self.set
                ),
                None,
            )),
        }
    }

    /// A tunnel listener of an active node of `set` (round robin) whose address an agent may
    /// be sent to, other than `unreachable`.
    fn tunnel_of(&self, set: &SetName, unreachable: &[String]) -> Option<String> {
        self.healthy
            .rotation(set, &self.node_id)
            .into_iter()
            .find(|n| {
                tunnel_address_ok(&n.tunnel_address) && !unreachable.contains(&n.tunnel_address)
            })
            .map(|n| n.tunnel_address)
    }

    /// Tells each agent whose session is here but belongs to another set now (its home set came
    /// back, or home is down and this node is not of the DR set) to move there: `ServerShutdown`
    /// naming a node of that set; the agent opens its new session before it leaves this one
    /// (make-before-break). Called after every heartbeat.
    pub fn send_home(&self) {
        if self.is_draining() {
            return;
        }
        for s in self.local.all() {
            let Some(placement) = s.placement() else {
                continue;
            };
            if s.is_leaving() {
                continue;
            }
            // What its agent could not reach is not offered again for a while; with nothing
            // else to offer, the session stays.
            let unreachable = if s.since.elapsed() < UNREACHABLE_FOR {
                s.unreachable()
            } else {
                &[]
            };
            let Err((why, Some(to))) = self.placed(Some(placement), unreachable) else {
                continue;
            };
            let frame = ServerShutdown {
                reason: why.clone(),
                reconnect_to: Some(to.clone()),
                grace_period: self.settings.grace.as_secs(),
            }
            .to_frame()
            .to_bytes();
            // Leaving only once the agent is told (a full control channel: next heartbeat).
            if s.control.try_send(frame).is_ok() {
                tracing::info!(client_id = %s.client_id, session = %s.id, reconnect_to = %to, "moving an agent to its serving set: {why}");
                s.set_leaving();
                self.metrics.event("sent_home", "");
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Draining starts: no new sessions; every agent is told to move (to another active node of
    /// this set when there is one) and its session keeps serving until the agent leaves or
    /// `grace` ends.
    pub async fn drain(self: &Arc<Self>, reason: &'static str) {
        if self.draining.swap(true, Ordering::AcqRel) {
            return;
        }
        let reconnect_to = self.peer_tunnels().await.into_iter().next();
        let sessions = self.local.all();
        tracing::info!(
            sessions = sessions.len(),
            reason,
            reconnect_to = reconnect_to.as_deref().unwrap_or("-"),
            "draining tunnel sessions: ServerShutdown sent"
        );
        let frame = ServerShutdown {
            reason: reason.into(),
            reconnect_to,
            grace_period: self.settings.grace.as_secs(),
        }
        .to_frame()
        .to_bytes();
        for s in &sessions {
            // New requests prefer the agent's replacement session (on another node) once it
            // is registered; until then this one still serves them.
            s.set_leaving();
            let _ = s.control.try_send(frame.clone());
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.settings.grace).await;
            for s in me.local.all() {
                s.set_leaving();
                s.retire.notify_one();
            }
        });
    }

    /// SIGTERM: drains (if not yet) and waits, at most `grace`, for every session to end.
    pub async fn shutdown(self: &Arc<Self>, grace: Duration) {
        self.drain("shutdown").await;
        let deadline = tokio::time::Instant::now() + grace;
        // Sessions in the table, and retired ones whose streams (long-lived connections through
        // a remote port) are still open: each ends by itself within the grace period.
        while (!self.local.is_empty()
            || self
                .live_sessions
                .load(std::sync::atomic::Ordering::Acquire)
                > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.local.all();
        if !left.is_empty() {
            tracing::warn!(
                sessions = left.len(),
                "grace period over; closing tunnel sessions"
            );
        }
        for s in left {
            s.set_leaving();
            s.retire.notify_one();
        }
        // Give the session tasks a moment to deregister.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.local.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod placement_tests {
    use super::tunnel_address_ok;

    #[test]
    fn only_plausible_tunnel_listeners_are_handed_to_agents() {
        for ok in [
            "10.0.0.7:7000",
            "tunnel-0.tunnox.example:443",
            "[fd00::7]:7000",
            "127.0.0.1:7000",
        ] {
            assert!(tunnel_address_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.7",
            "0.0.0.0:7000",
            "169.254.169.254:80",
            "[fe80::1]:7000",
            "224.0.0.1:7000",
            "10.0.0.7:0",
            &format!("{}:7000", "a".repeat(300)),
        ] {
            assert!(!tunnel_address_ok(bad), "{bad}");
        }
    }
}
