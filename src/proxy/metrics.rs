//! The proxy's Prometheus metrics (`tunnox_proxy_*`), served on the admin port.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct ProxyMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    /// `requests` resolved per class once, so the request path skips the label lookup.
    classes: [IntCounter; 5],
    pub errors: IntCounterVec,
    /// Targets the egress policy refused, by the refusal's label.
    pub egress_refused: IntCounterVec,
    /// Connections closed at a deadline, by which one.
    pub timeouts: IntCounterVec,
    /// Connections refused at `proxy.limits.max_connections`.
    pub connections_refused: IntCounter,
    /// Requests the HTTP/1.1 fast path handed to the general path, by reason.
    pub handovers: IntCounterVec,
    /// Requests forwarded to a node of the set serving them, by that set and outcome.
    pub set_forwards: IntCounterVec,
    /// Requests refused over an isolation limit, by limit.
    pub limited: IntCounterVec,
    /// TLS handshakes on the HTTPS listener by outcome: `ok`, `no_certificate`,
    /// `client_hello`, `handshake`, `timeout`.
    pub tls_handshakes: IntCounterVec,
    pub request_seconds: Histogram,
    pub upstream_seconds: Histogram,
    pub lookup_seconds: HistogramVec,
    /// `lookup_seconds` for answers from the cache and from the store, resolved once.
    pub lookup_cache: Histogram,
    pub lookup_store: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_stale_served: IntCounter,
    /// Lookups that waited for another request's store read of the same host (single-flight).
    pub cache_coalesced: IntCounter,
    /// Hosts outside `http_domain.base_domains`: answered 404 without a lookup.
    pub cache_outside_base: IntCounter,
    pub cache_entries: IntGauge,
    /// 1 while the proxy serves its own table because the store's history broke or shrank.
    pub sync_stale: IntGauge,
    /// Times the proxy went stale, by reason (`StaleReason::label`).
    pub sync_stale_episodes: IntCounterVec,
    pub sync_version: IntGauge,
    pub sync_connected: IntGauge,
    pub sync_staleness_seconds: IntGauge,
    pub sync_catch_ups: IntCounter,
    pub sync_reloads: IntCounter,
    pub sync_errors: IntCounter,
    pub active_connections: IntGauge,
    pub active_requests: IntGauge,
    pub draining: IntGauge,
    pub stats_flush_errors: IntCounter,
    /// Single-node ACME orders (`proxy.acme`).
    pub acme: crate::acme::AcmeMetrics,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str| {
            reg(
                &r,
                IntCounter::new(format!("tunnox_proxy_{name}"), help).expect("valid"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &r,
                IntGauge::new(format!("tunnox_proxy_{name}"), help).expect("valid"),
            )
        };
        // Microsecond lookups to minute-long uploads.
        let latency = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let lookup = vec![
            0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005,
            0.01, 0.05, 0.1,
        ];
        let requests = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "tunnox_proxy_requests_total",
                    "Requests by response status class",
                ),
                &["class"],
            )
            .expect("valid"),
        );
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| requests.with_label_values(&[c]));
        let lookup_seconds = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "tunnox_proxy_lookup_duration_seconds",
                    "Host lookup time, by where the answer came from (cache, store)",
                )
                .buckets(lookup),
                &["source"],
            )
            .expect("valid"),
        );
        let acme = crate::acme::AcmeMetrics::register(&r, "tunnox_proxy_");
        Self {
            acme,
            requests,
            classes,
            errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_errors_total",
                        "Requests the proxy answered itself, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            egress_refused: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_egress_refused_total",
                        "Requests whose target the egress policy refused, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            timeouts: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_timeouts_total",
                        "Connections closed at a deadline, by kind",
                    ),
                    &["kind"],
                )
                .expect("valid"),
            ),
            connections_refused: counter(
                "connections_refused_total",
                "Client connections closed at once because proxy.limits.max_connections were open",
            ),
            tls_handshakes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_tls_handshakes_total",
                        "TLS handshakes on the HTTPS listener, by outcome",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            handovers: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_handovers_total",
                        "Connections the HTTP/1.1 fast path handed to the general path, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            limited: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_limited_total",
                        "Requests answered 503 over an isolation limit, by limit (mapping_concurrency, mapping_rate, upstream_requests)",
                    ),
                    &["limit"],
                )
                .expect("valid"),
            ),
            set_forwards: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_set_forwards_total",
                        "Requests forwarded to a node of the proxy set serving them, by set and outcome (ok, failed, timeout, no_token, own_address, bad_address, no_node)",
                    ),
                    &["set", "outcome"],
                )
                .expect("valid"),
            ),
            request_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tunnox_proxy_request_duration_seconds",
                        "Time from request received to response headers sent",
                    )
                    .buckets(latency.clone()),
                )
                .expect("valid"),
            ),
            upstream_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tunnox_proxy_upstream_duration_seconds",
                        "Time an upstream took to send response headers",
                    )
                    .buckets(latency),
                )
                .expect("valid"),
            ),
            lookup_seconds: lookup_seconds.clone(),
            lookup_cache: lookup_seconds.with_label_values(&["cache"]),
            lookup_store: lookup_seconds.with_label_values(&["store"]),
            cache_hits: counter("cache_hits_total", "Lookups answered by the local cache"),
            cache_misses: counter("cache_misses_total", "Lookups that read the store"),
            cache_stale_served: counter(
                "cache_stale_served_total",
                "Expired entries served because the store was unreachable",
            ),
            cache_coalesced: counter(
                "cache_coalesced_total",
                "Lookups that waited for a store read of the same host already in flight",
            ),
            cache_outside_base: counter(
                "cache_outside_base_domains_total",
                "Hosts outside the configured base domains (404 without a store lookup)",
            ),
            cache_entries: gauge("cache_entries", "Entries in the local cache"),
            sync_stale: gauge(
                "sync_stale",
                "1 while the proxy serves its last good table because the store lost history",
            ),
            sync_stale_episodes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "tunnox_proxy_sync_stale_total",
                        "Times the proxy kept its table rather than the store's, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid"),
            ),
            sync_version: gauge("sync_version", "Last store version applied to the cache"),
            sync_connected: gauge("sync_connected", "1 while the change feed is connected"),
            sync_staleness_seconds: gauge(
                "sync_staleness_seconds",
                "Seconds since the cache was last confirmed up to date with the store",
            ),
            sync_catch_ups: counter("sync_catch_ups_total", "Catch-ups from the change log"),
            sync_reloads: counter("sync_reloads_total", "Full reloads of every mapping"),
            sync_errors: counter(
                "sync_errors_total",
                "Failed sync attempts (store unreachable)",
            ),
            active_connections: gauge("active_connections", "Open client connections"),
            active_requests: gauge("active_requests", "Requests in flight"),
            draining: gauge("draining", "1 once the node is draining"),
            stats_flush_errors: counter(
                "stats_flush_errors_total",
                "Failed writes of access statistics (kept and retried)",
            ),
            registry: r,
        }
    }

    pub fn count_status(&self, status: http::StatusCode) {
        let i = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.classes[i].inc();
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
