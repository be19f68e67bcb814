//! Tunnel metrics (`tunnox_tunnel_*`), on the proxy's registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct TunnelMetrics {
    pub sessions: IntGauge,
    /// Session events: `opened`, `closed`, `dead`, `replaced`, `refused` (with a reason).
    pub session_events: IntCounterVec,
    /// Streams by outcome: `ok`, `agent_error`, `failed`, `retried`, `busy`.
    pub streams: IntCounterVec,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    /// Requests sent to the node holding the client's session.
    pub forwarded_to_peer: IntCounterVec,
    /// Connections to remote ports by outcome: `ok`, `offline`, `max_connections`,
    /// `agent_error`, `stream`; `bind_failed` counts listeners that could not be bound.
    pub remote_connections: IntCounterVec,
    /// Remote-port connections being carried now.
    pub remote_open: IntGauge,
    /// Bytes carried on remote-port connections: `in` towards the agent, `out` back.
    pub remote_bytes: IntCounterVec,
    /// Bytes carried through remote ports with a bandwidth limit (`max_bytes_per_second`).
    pub remote_shaped_bytes: IntCounter,
    /// HTTP group targets: `chosen` per request, `offline_skipped` per member passed over,
    /// `next_after_failure` per member that could not take a request it was sent.
    pub group_members: IntCounterVec,
    /// Raw streams the HTTP/1.1 fast path sent requests on: `opened`, or `reused` (parked
    /// after an earlier response).
    pub fast_streams: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl TunnelMetrics {
    pub fn new(r: &Registry) -> Self {
        Self {
            fast_streams: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_fast_streams_total",
                        "Raw streams the HTTP/1.1 fast path sent requests to tunnel clients on, opened or reused",
                    ),
                    &["how"],
                )
                .expect("valid"),
            ),
            group_members: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_group_members_total",
                        "Members of HTTP group targets: chosen for a request, or skipped as offline",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            sessions: reg(
                r,
                IntGauge::new(
                    "tunnox_tunnel_sessions",
                    "Agent sessions held by this proxy",
                )
                .expect("valid"),
            ),
            session_events: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_session_events_total",
                        "Agent session events by outcome (refused ones by reason)",
                    ),
                    &["outcome", "reason"],
                )
                .expect("valid"),
            ),
            streams: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_streams_total",
                        "Streams opened on agent sessions, by outcome",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            bytes_in: reg(
                r,
                IntCounter::new(
                    "tunnox_tunnel_received_bytes_total",
                    "Response body bytes received from agents",
                )
                .expect("valid"),
            ),
            bytes_out: reg(
                r,
                IntCounter::new(
                    "tunnox_tunnel_sent_bytes_total",
                    "Request body bytes sent to agents",
                )
                .expect("valid"),
            ),
            forwarded_to_peer: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_forwarded_to_peer_total",
                        "Requests forwarded to the node holding the client's session, by outcome",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            remote_connections: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_remote_connections_total",
                        "Connections to tunnels' remote ports, by outcome",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            remote_open: reg(
                r,
                IntGauge::new(
                    "tunnox_tunnel_remote_connections_open",
                    "Remote-port connections being carried",
                )
                .expect("valid"),
            ),
            remote_bytes: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_tunnel_remote_bytes_total",
                        "Bytes carried on remote-port connections (in = towards the agent), counted when a connection ends",
                    ),
                    &["direction"],
                )
                .expect("valid"),
            ),
            remote_shaped_bytes: reg(
                r,
                IntCounter::new(
                    "tunnox_tunnel_remote_shaped_bytes_total",
                    "Bytes carried through remote ports with a bandwidth limit (max_bytes_per_second), counted when a connection ends",
                )
                .expect("valid"),
            ),
        }
    }

    pub fn event(&self, outcome: &str, reason: &str) {
        self.session_events
            .with_label_values(&[outcome, reason])
            .inc();
    }
}
