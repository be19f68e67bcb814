//! Remote ports: TCP listeners on the proxy whose connections reach a client's local service
//! through its session, each connection one CONNECT stream (no `:protocol`: the agent dials
//! the target and joins the stream to it). The set of listeners follows what is declared:
//! [`RemotePorts::apply`] opens, retargets and closes them without touching connections in
//! flight.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A token bucket (async-speed-limit): bytes wait for their share of the rate.
type Limiter = async_speed_limit::Limiter;

use super::Tunnels;
use super::choose::{self, Pick};
use super::session::{StreamError, StreamSlot};
pub use super::spread::Backend;
use super::spread::Spread;
use crate::domain::{Balance, Decision, SetName, decide};
use crate::store::PortClaim;
use crate::tunnel::udp::{self, Datagrams, TRANSPORT_HEADER};
use crate::tunnel::{ERROR_HEADER, TARGET_HEADER};

/// One published TCP or UDP service as the proxy serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTunnel {
    /// The tunnel's name, or its group's (`<namespace>/<group>`).
    pub name: String,
    /// Who carries its connections: one client's tunnel, or a group's members (at least one).
    pub backends: Vec<Backend>,
    /// How a group spreads connections over `backends`.
    pub balance: Balance,
    pub port: u16,
    pub max_connections: Option<u32>,
    /// Bytes per second on this proxy, both directions and all connections together.
    pub max_bytes_per_second: Option<u64>,
    /// `Some(idle time of a flow)`: a UDP tunnel; `None`: TCP.
    pub udp_idle: Option<Duration>,
    /// What the agents carrying it probe (pushed to them with their configuration).
    pub health_check: Option<crate::domain::HealthCheck>,
}

impl RemoteTunnel {
    /// The clients carrying it, for logs (`laptop` or `a,b`).
    pub fn clients(&self) -> String {
        let ids: Vec<&str> = self.backends.iter().map(|b| b.client_id.as_str()).collect();
        ids.join(",")
    }
}

/// What [`plan`] decided: listeners to close, to open, and open ones whose tunnel changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub close: Vec<u16>,
    pub open: Vec<RemoteTunnel>,
    pub retarget: Vec<RemoteTunnel>,
}

/// From the listeners open now (by port) to `desired` (ports unique, checked by the caller).
pub fn plan(current: &HashMap<u16, RemoteTunnel>, desired: &[RemoteTunnel]) -> Plan {
    let mut p = Plan::default();
    for d in desired {
        match current.get(&d.port) {
            None => p.open.push(d.clone()),
            Some(c) if c != d => p.retarget.push(d.clone()),
            Some(_) => {}
        }
    }
    let mut close: Vec<u16> = current
        .keys()
        .filter(|port| !desired.iter().any(|d| d.port == **port))
        .copied()
        .collect();
    close.sort_unstable();
    p.close = close;
    p
}

/// Why a connection to a remote port was not carried (a bounded metric label each).
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    #[error("tunnel client {0} has no session on this proxy")]
    Offline(String),
    #[error("tunnel {0} is at its max_connections")]
    Full(String),
    #[error("the health check of {target} fails on tunnel client {client}'s agent")]
    Unhealthy { client: String, target: String },
    #[error("tunnel client {client} refused the connection: {label}")]
    Agent { client: String, label: &'static str },
    #[error("tunnel client {client}: {reason}")]
    Stream { client: String, reason: String },
}

impl CarryError {
    fn label(&self) -> &'static str {
        match self {
            Self::Offline(_) => "offline",
            Self::Full(_) => "max_connections",
            Self::Unhealthy { .. } => "unhealthy",
            Self::Agent { .. } => "agent_error",
            Self::Stream { .. } => "stream",
        }
    }
}

struct Listening {
    tunnel: watch::Sender<Arc<RemoteTunnel>>,
    task: JoinHandle<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The remote-port listeners of this proxy.
pub struct RemotePorts {
    bind: IpAddr,
    tunnels: Arc<Tunnels>,
    open: Mutex<HashMap<u16, Listening>>,
}

impl RemotePorts {
    pub fn new(bind: IpAddr, tunnels: Arc<Tunnels>) -> Self {
        Self {
            bind,
            tunnels,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the listeners match `desired`: closes those no longer wanted (their connections
    /// go on), points kept ones at their new tunnel, binds new ones. Returns the ports that
    /// could not be bound, with why.
    pub async fn apply(&self, desired: &[RemoteTunnel]) -> Vec<(u16, std::io::Error)> {
        let current: HashMap<u16, RemoteTunnel> = self
            .open
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(p, l)| (*p, (**l.tunnel.borrow()).clone()))
            .collect();
        let plan = plan(&current, desired);
        *self.tunnels.carried.write().expect("not poisoned") = desired
            .iter()
            .flat_map(|t| {
                let udp = t.udp_idle.is_some();
                t.backends
                    .iter()
                    .map(move |b| (b.client_id.clone(), b.target.clone(), udp))
            })
            .collect();
        self.tunnels.set_configs(desired);
        let mut failed = Vec::new();
        {
            let mut open = self.open.lock().expect("not poisoned");
            for port in &plan.close {
                open.remove(port);
                tracing::info!(port, "remote port closed");
            }
            for t in &plan.retarget {
                if let Some(l) = open.get(&t.port) {
                    let _ = l.tunnel.send(Arc::new(t.clone()));
                    tracing::info!(port = t.port, clients = %t.clients(), tunnel = %t.name, "remote port retargeted");
                }
            }
        }
        for t in plan.open {
            let addr = SocketAddr::new(self.bind, t.port);
            if self.tunnels.own.iter().any(|a| a.port() == t.port) {
                tracing::warn!(%addr, clients = %t.clients(), tunnel = %t.name, "remote port refused: it is one of this proxy's own ports");
                failed.push((
                    t.port,
                    std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "one of this proxy's own listener ports",
                    ),
                ));
                continue;
            }
            let (tx, rx) = watch::channel(Arc::new(t.clone()));
            let bound = match t.udp_idle {
                None => TcpListener::bind(addr)
                    .await
                    .map(|l| tokio::spawn(accept(l, rx, self.tunnels.clone()))),
                Some(_) => UdpSocket::bind(addr)
                    .await
                    .map(|s| tokio::spawn(serve_udp(Arc::new(s), rx, self.tunnels.clone()))),
            };
            match bound {
                Ok(task) => {
                    tracing::info!(%addr, udp = t.udp_idle.is_some(), clients = %t.clients(), tunnel = %t.name, "remote port listening");
                    self.open
                        .lock()
                        .expect("not poisoned")
                        .insert(t.port, Listening { tunnel: tx, task });
                }
                Err(e) => {
                    self.tunnels
                        .metrics
                        .remote_connections
                        .with_label_values(&["bind_failed"])
                        .inc();
                    tracing::warn!(%addr, clients = %t.clients(), tunnel = %t.name, error = %e, "remote port cannot be bound");
                    failed.push((t.port, e));
                }
            }
        }
        failed
    }

    /// Closes every listener (connections in flight go on until they end).
    pub fn close_all(&self) {
        self.open.lock().expect("not poisoned").clear();
    }
}

/// How often a proxy looks at its set's port table version (a change shows within this).
const PORTS_POLL: Duration = Duration::from_secs(1);

/// What a proxy serves for one claimed port: the claim's tunnel, or its group's members.
fn remote_of(port: u16, c: &crate::store::PortClaim) -> RemoteTunnel {
    let backends = if c.members.is_empty() {
        vec![Backend {
            client_id: c.client_id.clone(),
            name: c.name.clone(),
            target: c.target.clone(),
        }]
    } else {
        c.members
            .iter()
            .map(|m| Backend {
                client_id: m.client_id.clone(),
                name: m.name.clone(),
                target: m.target.clone(),
            })
            .collect()
    };
    RemoteTunnel {
        name: c.group.clone().unwrap_or_else(|| c.name.clone()),
        backends,
        balance: c.balance.unwrap_or_default(),
        port,
        max_connections: c.max_connections,
        // Bounded again: a record in the store is input too.
        max_bytes_per_second: c.max_bytes_per_second.map(|b| {
            b.clamp(
                crate::config::MIN_BYTES_PER_SECOND,
                crate::config::MAX_BYTES_PER_SECOND,
            )
        }),
        health_check: c.health_check.clone(),
        udp_idle: c.udp.then(|| {
            Duration::from_millis(
                c.udp_idle_ms
                    .unwrap_or(crate::config::DEFAULT_UDP_SESSION_TIMEOUT.get().as_millis() as u64),
            )
        }),
    }
}

/// The claims of a business's table that proxies of set `me` listen on now: those whose home
/// set it is, and, while a home set has no healthy node, those of the business's DR set — the
/// placement rule every request and agent follows (`domain::set::decide`).
pub fn served<'a>(
    claims: &'a [(u16, PortClaim)],
    me: &SetName,
    healthy: &'a [SetName],
) -> impl Iterator<Item = &'a (u16, PortClaim)> {
    claims
        .iter()
        .filter(move |(_, c)| decide(c.set.as_ref(), me, healthy, false) == Decision::Here)
}

/// Cluster mode: keeps this proxy's remote ports equal to the claims of its business's table in
/// the store that its set serves now ([`served`]; the table read whole when its version moves,
/// both looked at every [`PORTS_POLL`]), and reports the ports it cannot listen on so the
/// TunnelSet's status shows them. Until `stop`.
pub async fn follow_ports(
    registry: Arc<dyn crate::store::PortRegistry>,
    set: SetName,
    node_id: String,
    ports: Arc<RemotePorts>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = ports.tunnels.traffic.set((registry.clone(), set.clone()));
    let mut table: Option<crate::store::PortTable> = None;
    // The table's version and the ports served, as last applied.
    let mut applied: Option<(u64, Vec<u16>)> = None;
    let mut failing: Vec<u16> = Vec::new();
    loop {
        match registry.port_version(&set).await {
            Ok(v) if table.as_ref().is_some_and(|t| t.version == v) => {}
            Ok(_) => match registry.port_table(&set).await {
                Ok(t) => table = Some(t),
                Err(e) => tracing::warn!(error = %e, "cannot read the business's remote ports"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot read the remote ports' version"),
        }
        if let Some(t) = &table {
            let healthy = ports.tunnels.healthy.get();
            let desired: Vec<RemoteTunnel> = served(&t.ports, &set, &healthy)
                .map(|(p, c)| remote_of(*p, c))
                .collect();
            let now = (t.version, desired.iter().map(|d| d.port).collect());
            if applied.as_ref() != Some(&now) || !failing.is_empty() {
                if applied.as_ref().is_some_and(|(_, was)| was != &now.1) {
                    tracing::info!(ports = ?now.1, "the remote ports this set serves changed");
                }
                let failed = ports.apply(&desired).await;
                let now_failing: Vec<u16> = failed.iter().map(|(p, _)| *p).collect();
                for (port, e) in &failed {
                    let _ = registry
                        .report_port(&set, *port, &node_id, Some(&e.to_string()))
                        .await;
                }
                for port in failing.iter().filter(|p| !now_failing.contains(p)) {
                    let _ = registry.report_port(&set, *port, &node_id, None).await;
                }
                failing = now_failing;
                applied = Some(now);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PORTS_POLL) => {}
            _ = crate::proxy::stopped(&mut stop) => return,
        }
    }
}

async fn accept(
    listener: TcpListener,
    tunnel: watch::Receiver<Arc<RemoteTunnel>>,
    tunnels: Arc<Tunnels>,
) {
    // Counts this listener's open connections across retargets.
    let open = Arc::new(AtomicUsize::new(0));
    let mut shaper = Shaper::default();
    let spread = Arc::new(Spread::default());
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "remote port: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let t = tunnel.borrow().clone();
        let guard = match Admitted::enter(&open, t.max_connections) {
            Some(g) => g,
            None => {
                let e = CarryError::Full(if t.backends.len() > 1 {
                    format!("group {}", t.name)
                } else {
                    format!("{}/{}", t.clients(), t.name)
                });
                count(&tunnels, e.label());
                tracing::warn!(%peer, port = t.port, error = %e, "remote connection refused");
                continue;
            }
        };
        let tunnels = tunnels.clone();
        let limiter = shaper.limiter(t.max_bytes_per_second);
        let spread = spread.clone();
        tokio::spawn(async move {
            let _guard = guard;
            carry(&tunnels, &t, tcp, peer, limiter, &spread).await;
        });
    }
}

fn count(t: &Tunnels, outcome: &str) {
    t.metrics
        .remote_connections
        .with_label_values(&[outcome])
        .inc();
}

/// A bandwidth limit's bucket holds this long's worth of bytes (the largest burst).
const SHAPER_REFILL: Duration = Duration::from_millis(100);
/// Least wait once the bucket is empty: short, so small reads are not held for a whole refill.
const SHAPER_MIN_WAIT: Duration = Duration::from_millis(5);

/// A remote port's bandwidth limit: one token bucket shared by all its connections (or flows)
/// on this proxy, kept across retargets while the limit stays the same.
#[derive(Default)]
struct Shaper(Option<(u64, Limiter)>);

impl Shaper {
    fn limiter(&mut self, limit: Option<u64>) -> Option<Limiter> {
        let Some(limit) = limit else {
            self.0 = None;
            return None;
        };
        match &self.0 {
            Some((l, limiter)) if *l == limit => Some(limiter.clone()),
            _ => {
                let limiter = Limiter::builder(limit as f64)
                    .refill(SHAPER_REFILL)
                    .min_wait(SHAPER_MIN_WAIT)
                    .build();
                self.0 = Some((limit, limiter.clone()));
                Some(limiter)
            }
        }
    }
}

/// One open connection of a listener, counted until dropped.
struct Admitted(Arc<AtomicUsize>);

impl Admitted {
    fn enter(open: &Arc<AtomicUsize>, max: Option<u32>) -> Option<Self> {
        let max = max.map_or(usize::MAX, |m| m as usize);
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(open.clone()))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn carry(
    tunnels: &Tunnels,
    t: &RemoteTunnel,
    tcp: TcpStream,
    peer: SocketAddr,
    limiter: Option<Limiter>,
    spread: &Arc<Spread>,
) {
    let _ = tcp.set_nodelay(true);
    let (stream, _slot, _carrying) = match spread.open(tunnels, t, false).await {
        Ok(o) => (o.stream, o.slot, o.carrying),
        Err(e) => {
            count(tunnels, e.label());
            tracing::warn!(%peer, port = t.port, tunnel = %t.name, error = %e, "remote connection not carried");
            return;
        }
    };
    count(tunnels, "ok");
    tunnels.metrics.remote_open.inc();
    let mut stream = TokioIo::new(stream);
    // Shaped on the client's side: both directions draw on the tunnel's one bucket. Each half
    // is its own limited resource (one resource for both would let a busy direction keep
    // re-arming the wait the other one is blocked on).
    let mut client: Box<dyn ClientIo> = match &limiter {
        Some(l) => {
            let (r, w) = tcp.into_split();
            Box::new(tokio::io::join(l.clone().limit(r), l.clone().limit(w)))
        }
        None => Box::new(tcp),
    };
    let (up, down) = match crate::tunnel::pipe(&mut *client, &mut stream).await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(%peer, port = t.port, error = %e, "remote connection ended with an error");
            (0, 0)
        }
    };
    tunnels.metrics.remote_open.dec();
    if limiter.is_some() {
        tunnels.metrics.remote_shaped_bytes.inc_by(up + down);
    }
    tunnels.carried(t.port, up, down);
}

trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}

/// Datagrams of one flow: what the remote port's socket received from the flow's client, and
/// the socket to answer it from.
struct Flow {
    rx: mpsc::Receiver<Bytes>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    /// The port's bandwidth limit: a datagram waits for its bytes either way.
    limiter: Option<Limiter>,
}

impl Datagrams for Flow {
    async fn recv(&mut self) -> Option<Bytes> {
        let d = self.rx.recv().await?;
        if let Some(l) = &self.limiter {
            l.consume(d.len()).await;
        }
        Some(d)
    }

    async fn send(&mut self, datagram: Bytes) {
        if let Some(l) = &self.limiter {
            l.consume(datagram.len()).await;
        }
        let _ = self.socket.send_to(&datagram, self.client).await;
    }
}

/// Datagrams queued for one flow while its stream opens or is busy; beyond, they are dropped.
const FLOW_QUEUE: usize = 256;

/// Open flows of a UDP remote port by client address.
type Flows = HashMap<SocketAddr, mpsc::Sender<Bytes>>;

/// A UDP remote port: each client address is a flow with its own stream, opened on its first
/// datagram and closed after the tunnel's idle time.
async fn serve_udp(
    socket: Arc<UdpSocket>,
    tunnel: watch::Receiver<Arc<RemoteTunnel>>,
    tunnels: Arc<Tunnels>,
) {
    let mut flows = Flows::new();
    let mut shaper = Shaper::default();
    let spread = Arc::new(Spread::default());
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; udp::MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "remote UDP port: receive failed");
                    continue;
                }
            },
            Some(gone) = ended_rx.recv() => {
                if flows.get(&gone).is_some_and(mpsc::Sender::is_closed) {
                    flows.remove(&gone);
                }
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let datagram = match flows.get(&from).map(|tx| tx.try_send(datagram)) {
            Some(Ok(())) => continue,
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                count(&tunnels, "udp_dropped");
                continue;
            }
            Some(Err(mpsc::error::TrySendError::Closed(d))) => {
                flows.remove(&from);
                d
            }
            None => Bytes::copy_from_slice(&buf[..n]),
        };
        let t = tunnel.borrow().clone();
        let limiter = shaper.limiter(t.max_bytes_per_second);
        let flow = NewFlow {
            from,
            first: datagram,
            socket: &socket,
            limiter,
            spread: spread.clone(),
        };
        open_flow(&mut flows, flow, t, &tunnels, &ended_tx);
    }
}

/// A flow's first datagram and where it came in.
struct NewFlow<'a> {
    from: SocketAddr,
    first: Bytes,
    socket: &'a Arc<UdpSocket>,
    limiter: Option<Limiter>,
    spread: Arc<Spread>,
}

fn open_flow(
    flows: &mut Flows,
    new: NewFlow<'_>,
    t: Arc<RemoteTunnel>,
    tunnels: &Arc<Tunnels>,
    ended: &mpsc::UnboundedSender<SocketAddr>,
) {
    let NewFlow {
        from,
        first,
        socket,
        limiter,
        spread,
    } = new;
    let max = t
        .max_connections
        .unwrap_or(crate::config::DEFAULT_UDP_FLOWS) as usize;
    if flows.len() >= max {
        count(tunnels, "max_connections");
        tracing::debug!(%from, port = t.port, "UDP flow refused: max_connections");
        return;
    }
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let _ = tx.try_send(first);
    flows.insert(from, tx);
    let idle = t.udp_idle.unwrap_or(Duration::from_secs(60));
    let shaped = limiter.is_some();
    let mut flow = Flow {
        rx,
        socket: socket.clone(),
        client: from,
        limiter,
    };
    let tunnels = tunnels.clone();
    let ended = ended.clone();
    tokio::spawn(async move {
        match spread.open(&tunnels, &t, true).await {
            Ok(opened) => {
                let super::spread::Opened {
                    stream,
                    slot: _slot,
                    carrying: _carrying,
                    ..
                } = opened;
                count(&tunnels, "ok");
                tunnels.metrics.remote_open.inc();
                let (end, carried) = udp::pump(TokioIo::new(stream), &mut flow, idle).await;
                tunnels.metrics.remote_open.dec();
                if end == udp::End::Idle {
                    count(&tunnels, "udp_idle_closed");
                }
                if shaped {
                    let n = carried.to_tunnel + carried.from_tunnel;
                    tunnels.metrics.remote_shaped_bytes.inc_by(n);
                }
                tunnels.carried(t.port, carried.to_tunnel, carried.from_tunnel);
                tracing::debug!(%from, port = t.port, ?end, "UDP flow ended");
            }
            Err(e) => {
                count(&tunnels, e.label());
                tracing::warn!(%from, port = t.port, tunnel = %t.name, error = %e, "UDP flow not carried");
            }
        }
        // Closing the receiver marks the flow gone; the next datagram from `from` opens anew.
        drop(flow);
        let _ = ended.send(from);
    });
}

impl Tunnels {
    /// Counts what one connection or flow through remote port `port` carried, in the metrics
    /// and (cluster) in the set's traffic in the store, which the TunnelSet's status shows.
    fn carried(&self, port: u16, bytes_in: u64, bytes_out: u64) {
        let bytes = &self.metrics.remote_bytes;
        bytes.with_label_values(&["in"]).inc_by(bytes_in);
        bytes.with_label_values(&["out"]).inc_by(bytes_out);
        if let Some((registry, set)) = self.traffic.get() {
            let (registry, set) = (registry.clone(), set.clone());
            tokio::spawn(async move {
                let traffic = crate::store::PortTraffic {
                    connections: 1,
                    bytes_in,
                    bytes_out,
                };
                if let Err(e) = registry.add_port_traffic(&set, port, traffic).await {
                    tracing::debug!(port, error = %e, "cannot add a remote port's traffic");
                }
            });
        }
    }

    /// Opens a raw stream to `target` through one of this node's sessions of `client_id` (least
    /// open streams first; a session that refuses the stream unprocessed gives way to the
    /// next): TCP bytes, or with `udp` framed datagrams.
    pub async fn open_stream(
        &self,
        client_id: &str,
        target: &str,
        udp: bool,
        local_only: bool,
    ) -> Result<(hyper::upgrade::Upgraded, Option<StreamSlot>), CarryError> {
        let stream_err = |reason: String| CarryError::Stream {
            client: client_id.to_string(),
            reason,
        };
        // Sessions whose agent reports the target down are not tried; when every session here
        // is such, the connection goes to another member of the group (or is refused).
        let here = self.local.of(client_id);
        let mut tried: Vec<String> = here
            .iter()
            .filter(|s| s.is_down(target))
            .map(|s| s.id.clone())
            .collect();
        if !here.is_empty() && tried.len() == here.len() {
            return Err(CarryError::Unhealthy {
                client: client_id.to_string(),
                target: target.to_string(),
            });
        }
        for _attempt in 0..3 {
            let (local, views) = self.local_views(client_id, &tried);
            let Pick::Local(i) =
                choose::choose(&views, &[], &self.node_id, chrono::Utc::now(), true)
            else {
                if local_only {
                    return Err(CarryError::Offline(client_id.to_string()));
                }
                // No session here: through the node holding one.
                let up = self.open_via_peer(client_id, target, udp).await?;
                return Ok((up, None));
            };
            let session = local[i].clone();
            tried.push(session.id.clone());
            let Some(slot) = session.enter() else {
                continue;
            };
            let mut req = Request::new(crate::proxy::empty_body());
            *req.method_mut() = Method::CONNECT;
            *req.version_mut() = Version::HTTP_2;
            *req.uri_mut() = target
                .parse()
                .map_err(|e: http::uri::InvalidUri| stream_err(e.to_string()))?;
            let value = HeaderValue::from_str(target).map_err(|e| stream_err(e.to_string()))?;
            req.headers_mut().insert(TARGET_HEADER, value);
            if udp {
                req.headers_mut()
                    .insert(TRANSPORT_HEADER, HeaderValue::from_static("udp"));
            }
            let sent =
                tokio::time::timeout(self.settings.response_timeout, session.transport.open(req))
                    .await;
            let mut resp = match sent {
                Err(_) => return Err(stream_err("no answer in time".into())),
                Ok(Ok(resp)) => resp,
                Ok(Err(StreamError::NotSent(_) | StreamError::Refused(_))) => continue,
                Ok(Err(StreamError::Failed(reason))) => return Err(stream_err(reason)),
            };
            if let Some(v) = resp.headers().get(ERROR_HEADER) {
                return Err(CarryError::Agent {
                    client: client_id.to_string(),
                    label: super::send::agent_label(v),
                });
            }
            if resp.status() != StatusCode::OK {
                return Err(stream_err(format!("answered {}", resp.status())));
            }
            let upgraded = hyper::upgrade::on(&mut resp)
                .await
                .map_err(|e| stream_err(super::session::chain(&e)))?;
            return Ok((upgraded, Some(slot)));
        }
        Err(stream_err("no session took the stream".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(port: u16, target: &str) -> RemoteTunnel {
        RemoteTunnel {
            name: format!("t{port}"),
            backends: vec![Backend {
                client_id: "laptop".into(),
                name: format!("t{port}"),
                target: target.into(),
            }],
            balance: Balance::RoundRobin,
            port,
            max_connections: None,
            max_bytes_per_second: None,
            health_check: None,
            udp_idle: None,
        }
    }

    #[test]
    fn plans_opens_retargets_and_closes() {
        let current: HashMap<u16, RemoteTunnel> = [t(2000, "a:1"), t(2001, "b:1"), t(2002, "c:1")]
            .into_iter()
            .map(|t| (t.port, t))
            .collect();
        let desired = [t(2001, "b:1"), t(2002, "c:2"), t(2003, "d:1")];
        let p = plan(&current, &desired);
        assert_eq!(p.close, vec![2000]);
        assert_eq!(p.open, vec![t(2003, "d:1")]);
        assert_eq!(p.retarget, vec![t(2002, "c:2")]);
        assert_eq!(plan(&current, &[]).close, vec![2000, 2001, 2002]);
        assert_eq!(plan(&HashMap::new(), &desired).open.len(), 3);
        let same: Vec<RemoteTunnel> = current.values().cloned().collect();
        assert_eq!(plan(&current, &same), Plan::default());
    }

    #[test]
    fn a_set_serves_its_own_ports_and_its_business_dr_sets_ports_while_they_are_down() {
        let set = |s: &str| SetName::parse(s).unwrap();
        let claim = |home: Option<&str>| PortClaim {
            holder: "k8s:c/ns/x".into(),
            set: home.map(set),
            client_id: "x".into(),
            name: "t".into(),
            target: "127.0.0.1:22".into(),
            udp: false,
            max_connections: None,
            max_bytes_per_second: None,
            udp_idle_ms: None,
            group: None,
            balance: None,
            health_check: None,
            members: Vec::new(),
        };
        let table = vec![
            (2000, claim(Some("novel.sh"))),
            (2001, claim(Some("novel.sz"))),
            (2002, claim(Some("novel.*"))),
            (2003, claim(None)),
        ];
        let ports = |me: &str, healthy: &[&str]| {
            let healthy: Vec<SetName> = healthy.iter().map(|h| set(h)).collect();
            served(&table, &set(me), &healthy)
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
        };
        let all = ["novel.sh", "novel.sz", "novel.*"];
        // Each set its own (and the unplaced ones everywhere).
        assert_eq!(ports("novel.sh", &all), [2000, 2003]);
        assert_eq!(ports("novel.sz", &all), [2001, 2003]);
        assert_eq!(ports("novel.*", &all), [2002, 2003]);
        // novel.sh has no healthy node: the DR set takes its ports over, novel.sz does not.
        let sh_down = ["novel.sz", "novel.*"];
        assert_eq!(ports("novel.*", &sh_down), [2000, 2002, 2003]);
        assert_eq!(ports("novel.sz", &sh_down), [2001, 2003]);
        // A home set's own proxies keep listening whatever their view of the registry.
        assert_eq!(ports("novel.sh", &[]), [2000, 2003]);
        // Nobody else's business.
        assert_eq!(ports("ams.sh", &all), [2003]);
    }

    #[test]
    fn counts_connections_up_to_the_limit() {
        let open = Arc::new(AtomicUsize::new(0));
        let a = Admitted::enter(&open, Some(2)).unwrap();
        let b = Admitted::enter(&open, Some(2)).unwrap();
        assert!(Admitted::enter(&open, Some(2)).is_none());
        drop(a);
        let _c = Admitted::enter(&open, Some(2)).unwrap();
        drop(b);
        assert_eq!(open.load(Ordering::Acquire), 1);
        assert!(Admitted::enter(&open, None).is_some());
    }
}
