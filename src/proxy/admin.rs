//! The proxy's routes on the admin port, besides `/metrics`, `/healthz`, `/readyz`:
//! `POST /drain` (the preStop hook's `tunnox drain`; a loopback client or the bearer token,
//! see [`AdminGuard`]) and `/status` (the cache and sync state; read-only like `/metrics`; the
//! management API's `/api/v1/stats/system` needs a token).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};

use crate::observe::guard::AdminGuard;

use super::cache::RouteCache;
use super::drain::Drain;
use super::metrics::ProxyMetrics;
use super::sync::SyncState;

#[derive(Clone)]
pub struct AdminContext {
    pub drain: Arc<Drain>,
    pub metrics: Arc<ProxyMetrics>,
    pub cache: Arc<RouteCache>,
    pub sync: Arc<SyncState>,
    pub propagation_delay: Duration,
    /// `memory` or `redis`: where mappings are shared.
    pub cache_type: &'static str,
    pub max_entries: usize,
    pub guard: AdminGuard,
}

#[derive(Clone)]
struct Admin {
    ctx: AdminContext,
    /// `tunnox_proxy_admin_refused_total{reason}`.
    refused: IntCounterVec,
    /// Unix second of the last refusal logged: a flood of refused requests logs once a second.
    last_logged: Arc<AtomicU64>,
}

pub fn routes(ctx: AdminContext) -> Router {
    let refused = IntCounterVec::new(
        prometheus::Opts::new(
            "tunnox_proxy_admin_refused_total",
            "State-changing admin requests refused, by reason",
        ),
        &["reason"],
    )
    .expect("valid metric");
    // The registry is new per process; a second registration would be a programming error.
    let _ = ctx.metrics.registry.register(Box::new(refused.clone()));
    let admin = Admin {
        ctx,
        refused,
        last_logged: Arc::new(AtomicU64::new(0)),
    };
    Router::new()
        // GET (a probe, a crawler, a link) must never change state: only POST drains.
        .route("/drain", post(drain).fallback(post_only))
        .route("/status", get(stats))
        .with_state(admin)
}

async fn post_only() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST")],
        "use POST /drain (tunnox drain); other methods change nothing\n",
    )
        .into_response()
}

#[derive(Deserialize)]
struct DrainQuery {
    wait: Option<String>,
}

async fn drain(
    State(admin): State<Admin>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<DrainQuery>,
) -> Response {
    if let Err(refusal) = admin.ctx.guard.check(peer, &headers) {
        admin.refused.with_label_values(&[refusal.label()]).inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if admin.last_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(%peer, reason = refusal.label(), "drain refused");
        }
        let mut resp = (refusal.status(), refusal.body()).into_response();
        if refusal.status() == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        return resp;
    }
    let ctx = &admin.ctx;
    let wait = match q.wait.as_deref().map(parse_wait).transpose() {
        Ok(w) => w.unwrap_or(ctx.propagation_delay),
        Err(msg) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("query parameter wait={msg}\n"),
            )
                .into_response();
        }
    };
    tracing::info!(%peer, wait = %humantime::format_duration(wait), "drain requested");
    ctx.drain.start();
    // Load balancers need this long to stop sending new connections here.
    tokio::time::sleep(wait).await;
    (
        StatusCode::OK,
        format!("drained (waited {})\n", humantime::format_duration(wait)),
    )
        .into_response()
}

/// The longest drain wait accepted (a preStop hook beyond this is a mistake).
pub const MAX_DRAIN_WAIT: Duration = Duration::from_secs(600);

/// A drain wait (`15s`, `500ms`, `1m`), at most [`MAX_DRAIN_WAIT`]; the one rule for `/drain`'s
/// `wait` and `tunnox drain --wait`. The error quotes the value.
pub fn parse_wait(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw).map_err(|e| format!("{raw:?}: {e} (use e.g. 15s)"))?;
    if d > MAX_DRAIN_WAIT {
        return Err(format!("{raw:?}: at most 10m"));
    }
    Ok(d)
}

#[derive(Serialize)]
struct SystemStats {
    cache: CacheStats,
    sync: SyncStats,
    draining: bool,
}

#[derive(Serialize)]
struct CacheStats {
    #[serde(rename = "type")]
    kind: &'static str,
    hit_rate: f64,
    total_hits: u64,
    total_misses: u64,
    entries: usize,
    max_entries: usize,
}

#[derive(Serialize)]
struct SyncStats {
    warm: bool,
    version: u64,
    connected: bool,
    staleness_seconds: i64,
    /// True while the proxy serves its last good table because the store lost history.
    stale: bool,
    /// Why (`epoch_changed`, `went_backwards`, `shrank`, `not_rebuilt`), when stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    stale_reason: Option<&'static str>,
    /// The store epoch followed.
    epoch: Option<String>,
}

/// hits / (hits + misses); 0 before any lookup.
fn hit_rate(hits: u64, misses: u64) -> f64 {
    match hits + misses {
        0 => 0.0,
        total => hits as f64 / total as f64,
    }
}

/// The route cache's numbers for the management API's system statistics.
pub fn cache_report(
    metrics: Arc<ProxyMetrics>,
    cache: Arc<RouteCache>,
    kind: &'static str,
    max_entries: usize,
) -> crate::api::CacheReport {
    Arc::new(move || {
        let (hits, misses) = (metrics.cache_hits.get(), metrics.cache_misses.get());
        crate::api::model::CacheView {
            kind: kind.into(),
            entries: cache.len() as u64,
            max_entries: max_entries as u64,
            hits,
            misses,
            hit_rate: hit_rate(hits, misses),
        }
    })
}

async fn stats(State(admin): State<Admin>) -> axum::Json<SystemStats> {
    let ctx = &admin.ctx;
    let m = &ctx.metrics;
    let hits = m.cache_hits.get();
    let misses = m.cache_misses.get();
    let detail = ctx.sync.detail();
    axum::Json(SystemStats {
        cache: CacheStats {
            kind: ctx.cache_type,
            hit_rate: hit_rate(hits, misses),
            total_hits: hits,
            total_misses: misses,
            entries: ctx.cache.len(),
            max_entries: ctx.max_entries,
        },
        sync: SyncStats {
            stale: detail.stale_reason.is_some(),
            stale_reason: detail.stale_reason,
            epoch: detail.epoch,
            warm: ctx.sync.is_warm(),
            version: ctx.sync.applied(),
            connected: m.sync_connected.get() == 1,
            staleness_seconds: m.sync_staleness_seconds.get(),
        },
        draining: ctx.drain.is_draining(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wait() {
        assert_eq!(parse_wait("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_wait("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_wait("soon").unwrap_err().contains("\"soon\""));
        assert!(parse_wait("1h").unwrap_err().contains("at most"));
    }
}
