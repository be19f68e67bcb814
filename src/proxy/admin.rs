//! The proxy's routes on the admin port, besides `/metrics`, `/healthz`, `/readyz`:
//! `/drain` (a Kubernetes preStop hook) and `/api/v1/stats/system` (seed 001's shape).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

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
}

pub fn routes(ctx: AdminContext) -> Router {
    Router::new()
        .route("/drain", get(drain).post(drain))
        .route("/api/v1/stats/system", get(stats))
        .with_state(ctx)
}

#[derive(Deserialize)]
struct DrainQuery {
    wait: Option<String>,
}

async fn drain(State(ctx): State<AdminContext>, Query(q): Query<DrainQuery>) -> Response {
    let wait = match q.wait.as_deref().map(parse_wait).transpose() {
        Ok(w) => w.unwrap_or(ctx.propagation_delay),
        Err(msg) => return (StatusCode::BAD_REQUEST, msg).into_response(),
    };
    ctx.drain.start();
    // Load balancers need this long to stop sending new connections here.
    tokio::time::sleep(wait).await;
    (
        StatusCode::OK,
        format!("drained (waited {})\n", humantime::format_duration(wait)),
    )
        .into_response()
}

fn parse_wait(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw)
        .map_err(|e| format!("query parameter wait={raw:?}: {e} (use e.g. 15s)\n"))?;
    if d > Duration::from_secs(600) {
        return Err(format!("query parameter wait={raw:?}: at most 10m\n"));
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

async fn stats(State(ctx): State<AdminContext>) -> axum::Json<SystemStats> {
    let m = &ctx.metrics;
    let hits = m.cache_hits.get();
    let misses = m.cache_misses.get();
    let total = hits + misses;
    let detail = ctx.sync.detail();
    axum::Json(SystemStats {
        cache: CacheStats {
            kind: ctx.cache_type,
            hit_rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
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
        assert!(parse_wait("soon").unwrap_err().contains("wait=\"soon\""));
        assert!(parse_wait("1h").unwrap_err().contains("at most"));
    }
}
