//! The agent's Prometheus metrics (`tunnox_agent_*`), on its own registry served by the admin
//! server. Labels come from `label()` functions, never from peer input.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    /// Sessions up (authenticated, control stream open).
    pub sessions: IntGauge,
    /// Sessions replaced, by why the previous one ended.
    pub reconnects: IntCounterVec,
    /// Dial attempts that failed, by what failed.
    pub dial_failures: IntCounterVec,
    /// Forwarded streams by outcome.
    pub streams: IntCounterVec,
    /// Body and upgraded-stream bytes: `in` proxy → local service, `out` back.
    pub bytes: IntCounterVec,
    /// `ServerShutdown` received → replacement session up.
    pub move_seconds: Histogram,
    /// Configuration pushes by outcome: `applied`, `unchanged`, `invalid`.
    pub config_pushes: IntCounterVec,
    /// Tunnels of the configuration applied: `carried` or `rejected` (not in the allow-list).
    pub config_tunnels: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let vec = |name: &str, help: &str, label: &str| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            )
        };
        Self {
            sessions: reg(
                &r,
                IntGauge::new("tunnox_agent_sessions", "Tunnel sessions up").expect("valid"),
            ),
            reconnects: vec(
                "tunnox_agent_reconnects_total",
                "Sessions replaced, by why the previous one ended",
                "reason",
            ),
            dial_failures: vec(
                "tunnox_agent_dial_failures_total",
                "Failed attempts to open a session, by what failed",
                "error",
            ),
            streams: vec(
                "tunnox_agent_streams_total",
                "Forwarded streams by outcome",
                "outcome",
            ),
            bytes: vec(
                "tunnox_agent_bytes_total",
                "Bytes forwarded: in = towards the local service, out = back",
                "direction",
            ),
            move_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tunnox_agent_move_seconds",
                        "ServerShutdown received until the replacement session is up",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
                    ]),
                )
                .expect("valid"),
            ),
            config_pushes: vec(
                "tunnox_agent_config_pushes_total",
                "Configurations pushed by proxies, by outcome (applied, unchanged, invalid)",
                "outcome",
            ),
            config_tunnels: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "tunnox_agent_config_tunnels",
                        "Tunnels of the configuration applied: carried, or rejected (not in the allow list)",
                    ),
                    &["state"],
                )
                .expect("valid"),
            ),
            registry: r,
        }
    }
}
