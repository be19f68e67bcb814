//! Controller metrics. Labels are bounded (`Outcome::label`, fixed words), never object names.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub outcomes: IntCounterVec,
    /// Rejections by reason (a fixed set of words from `decide`, e.g. `EgressDenied`).
    pub rejections: IntCounterVec,
    pub reconcile_seconds: HistogramVec,
    /// How long reconciles waited for the proxies to apply a version they programmed.
    pub served_wait_seconds: prometheus::Histogram,
    /// How long a mapping's status write (server-side apply) took.
    pub status_write_seconds: prometheus::Histogram,
    pub mappings: IntGaugeVec,
    pub conflicts: IntCounter,
    pub resync_repairs: IntCounterVec,
    /// Lost records written again by outcome (`restored`, `given_up`, or the store's error label).
    pub restores: IntCounterVec,
    pub leader: prometheus::IntGauge,
    /// TunnelSet reconciles by result, and by what they decided (`accepted`, `refused`).
    pub tunnelset_reconciles: IntCounterVec,
    pub tunnelset_outcomes: IntCounterVec,
    /// ACME orders by result (`issued`, `failed`, `rate_limited`, `timeout`, `store`).
    pub acme: crate::acme::AcmeMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("tunnox_controller".into()), None).expect("valid prefix");
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciles by result"),
            &["result"],
        )
        .expect("valid");
        let outcomes = IntCounterVec::new(
            Opts::new("outcomes_total", "Reconciles by the phase they decided"),
            &["outcome"],
        )
        .expect("valid");
        let rejections = IntCounterVec::new(
            Opts::new(
                "rejections_total",
                "Reconciles that rejected a mapping, by reason",
            ),
            &["reason"],
        )
        .expect("valid");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Time to reconcile one mapping",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["result"],
        )
        .expect("valid");
        let served_wait_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "served_wait_seconds",
                "Time a reconcile waited for every proxy to apply the version it programmed",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("valid");
        let status_write_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "status_write_seconds",
                "Time one mapping status write (server-side apply through the API server) took",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid");
        let mappings = IntGaugeVec::new(
            Opts::new("mappings", "Mappings by phase, as of the last resync"),
            &["phase"],
        )
        .expect("valid");
        let conflicts = IntCounter::new(
            "conflicts_total",
            "Reconciles that found the domain claimed by another mapping",
        )
        .expect("valid");
        let resync_repairs = IntCounterVec::new(
            Opts::new(
                "resync_repairs_total",
                "Differences between cluster and Redis repaired by resync",
            ),
            &["kind"],
        )
        .expect("valid");
        let restores = IntCounterVec::new(
            Opts::new(
                "restores_total",
                "Records lost with the store written again with the id and version their status names, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid");
        let leader =
            prometheus::IntGauge::new("leader", "1 while this process holds the leader lease")
                .expect("valid");
        let tunnelset_reconciles = IntCounterVec::new(
            Opts::new(
                "tunnelset_reconciles_total",
                "TunnelSet reconciles by result",
            ),
            &["result"],
        )
        .expect("valid");
        let tunnelset_outcomes = IntCounterVec::new(
            Opts::new(
                "tunnelset_outcomes_total",
                "TunnelSet reconciles by what they decided (accepted: credential in the store)",
            ),
            &["outcome"],
        )
        .expect("valid");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(outcomes.clone()),
            Box::new(rejections.clone()),
            Box::new(reconcile_seconds.clone()),
            Box::new(served_wait_seconds.clone()),
            Box::new(status_write_seconds.clone()),
            Box::new(mappings.clone()),
            Box::new(conflicts.clone()),
            Box::new(resync_repairs.clone()),
            Box::new(restores.clone()),
            Box::new(leader.clone()),
            Box::new(tunnelset_reconciles.clone()),
            Box::new(tunnelset_outcomes.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        let acme = crate::acme::AcmeMetrics::register(&registry, "");
        Self {
            registry,
            outcomes,
            rejections,
            reconciles,
            reconcile_seconds,
            served_wait_seconds,
            status_write_seconds,
            mappings,
            conflicts,
            resync_repairs,
            restores,
            leader,
            tunnelset_reconciles,
            tunnelset_outcomes,
            acme,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
