//! The management API (`/api/v1/…`): list and filter mappings, availability, create, delete and
//! force-delete, statistics; bearer tokens with roles; one error shape; an OpenAPI document
//! generated from the handlers' types (docs/api.md).
//!
//! One set of handlers over two sources of intent ([`Intent`]): the memory store in single-node
//! mode (`tunnox proxy` without Redis), `HTTPDomainMapping` resources in a cluster.

pub mod auth;
pub mod cluster;
pub mod error;
pub mod handlers;
pub mod model;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use prometheus::{IntCounterVec, Registry};
use utoipa::OpenApi;

pub use auth::Tokens;
pub use error::{ApiError, ErrorBody};
use model::Phase;

use crate::domain::{EgressPolicy, Hostname, Mapping, MappingSpec};
use crate::store::{MappingStore, NodeRegistry, Quota};

/// What a create came to.
#[derive(Debug)]
pub enum Created {
    /// Claimed and in the store: served.
    Served(Box<Mapping>),
    /// Declared, not yet served within the wait (e.g. a tunnel whose TunnelSet is not there
    /// yet): `resource` is what was declared, `message` why it waits.
    Pending { resource: String, message: String },
}

/// What a delete came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Gone, its domain released.
    Gone,
    /// Being deleted (`resource`'s finalizer has not released the domain within the wait).
    InProgress { resource: String },
}

/// Where mappings are declared: the writes of the API go here.
#[async_trait]
pub trait Intent: Send + Sync + 'static {
    /// Declares a new mapping (already validated against the [`Rules`]), counted against
    /// `quota` with its domain claim. A domain held by another is `domain_taken`, naming the
    /// holder (the handler hides it from users).
    /// `ready`: answer once every proxy serves it, not only once it is in the store.
    async fn create(
        &self,
        spec: MappingSpec,
        quota: Quota,
        ready: bool,
    ) -> Result<Created, ApiError>;
    /// True when `m` was declared through this API (its owner may delete it without force).
    async fn declared_here(&self, m: &Mapping) -> Result<bool, ApiError>;
    /// Removes `m`, as it was just read; `force`: whoever declared it.
    async fn delete(&self, m: &Mapping, force: bool) -> Result<Deleted, ApiError>;
    /// How many mappings are in each phase.
    async fn phases(&self) -> Result<Vec<(Phase, u64)>, ApiError>;
}

/// Single-node: the memory store (and its JSON file) is the declaration.
pub struct LocalIntent {
    pub store: Arc<dyn MappingStore>,
}

#[async_trait]
impl Intent for LocalIntent {
    async fn create(
        &self,
        spec: MappingSpec,
        quota: Quota,
        _ready: bool,
    ) -> Result<Created, ApiError> {
        // The proxy serving the API applies it before it answers.
        let m = self.store.create_within(spec, quota).await?;
        Ok(Created::Served(Box::new(m)))
    }

    async fn declared_here(&self, m: &Mapping) -> Result<bool, ApiError> {
        Ok(m.source.as_deref() == Some(handlers::API_SOURCE))
    }

    async fn delete(&self, m: &Mapping, _force: bool) -> Result<Deleted, ApiError> {
        self.store.delete(&m.mapping_id, Some(m.version)).await?;
        Ok(Deleted::Gone)
    }

    async fn phases(&self) -> Result<Vec<(Phase, u64)>, ApiError> {
        // Records are served as soon as they are written; expired ones are released by the
        // expiry sweep within its interval.
        Ok(vec![(Phase::Active, self.store.count().await?)])
    }
}

/// What the rules of this deployment allow a tenant to declare.
#[derive(Debug, Clone)]
pub struct Rules {
    /// A mapping's base domain must be one of these; empty: any.
    pub base_domains: Vec<Hostname>,
    pub egress: EgressPolicy,
    /// Mappings a `user:<id>` token's owner may hold (0: unlimited).
    pub max_per_user: usize,
}

/// The route cache's numbers, from the process serving the API.
pub type CacheReport = Arc<dyn Fn() -> model::CacheView + Send + Sync>;

/// The handlers' state.
#[derive(Clone)]
pub struct Api {
    pub store: Arc<dyn MappingStore>,
    pub nodes: Arc<dyn NodeRegistry>,
    pub intent: Arc<dyn Intent>,
    pub tokens: Arc<Tokens>,
    pub rules: Arc<Rules>,
    pub cache: Option<CacheReport>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tunnox management API", description = "Mappings of external domains to services: list, filter, availability, create, delete, statistics. Every operation but this document needs `Authorization: Bearer <token>`; a token's role is `admin` or `user:<id>`."),
    paths(
        handlers::list,
        handlers::get,
        handlers::stats,
        handlers::availability,
        handlers::create,
        handlers::delete,
        handlers::system,
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The OpenAPI document (`tunnox openapi`, `/api/v1/openapi.json`, `docs/openapi.json`).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json().expect("the document serialises") + "\n"
}

/// `<name>{route, method, status}`: `tunnox_api_requests_total` on a proxy,
/// `tunnox_controller_api_requests_total` on a controller (whose registry adds its prefix).
#[derive(Clone)]
pub struct ApiMetrics {
    requests: IntCounterVec,
}

impl ApiMetrics {
    pub fn new(registry: &Registry, name: &str) -> Self {
        let requests = IntCounterVec::new(
            prometheus::Opts::new(name, "Management API requests by route and status"),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        // The registry is new per process; a second registration would be a programming error.
        let _ = registry.register(Box::new(requests.clone()));
        Self { requests }
    }
}

async fn count(State(m): State<ApiMetrics>, req: Request, next: Next) -> Response {
    // The route's template, never the raw path: ids and junk paths do not make new series.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        _ => "other",
    };
    let resp = next.run(req).await;
    m.requests
        .with_label_values(&[route.as_str(), method, resp.status().as_str()])
        .inc();
    resp
}

/// The API's routes.
pub fn router(api: Api, metrics: ApiMetrics) -> Router {
    Router::new()
        .route(
            "/api/v1/mappings",
            get(handlers::list).post(handlers::create),
        )
        .route(
            "/api/v1/mappings/{id}",
            get(handlers::get).delete(handlers::delete),
        )
        .route("/api/v1/mappings/{id}/stats", get(handlers::stats))
        .route("/api/v1/availability", get(handlers::availability))
        .route("/api/v1/stats/system", get(handlers::system))
        .route("/api/v1/openapi.json", get(handlers::openapi))
        .method_not_allowed_fallback(handlers::wrong_method)
        .fallback(handlers::no_route)
        .with_state(api)
        .layer(axum::middleware::from_fn_with_state(metrics, count))
}

/// The API listener's TLS configuration from `api.tls` (errors name the field and the file).
pub fn tls_config(
    tls: &crate::config::ApiTls,
) -> Result<Arc<rustls::ServerConfig>, crate::tunnel::tls::TlsError> {
    use crate::tunnel::tls::{TlsError, load_certs, load_key, provider};
    let certs = load_certs(&tls.cert_file, "api.tls.cert_file")?;
    let key = load_key(&tls.key_file, "api.tls.key_file")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "api.tls.key_file {}: does not match the certificate or is unusable: {e}",
                tls.key_file.display()
            ))
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves the API on `listener` until `stop` resolves (bounded connections, header deadline:
/// `observe::serve`), over TLS with `tls`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, tls = tls.is_some(), "management API listening");
    crate::observe::serve::serve(listener, router, tls, stop).await
}
