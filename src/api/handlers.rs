//! The API's handlers: one set, over the store (reads) and an [`Intent`] (writes) — the memory
//! store in single-node mode, `HTTPDomainMapping` resources in a cluster.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::de::DeserializeOwned;

use super::auth::owns;
use super::error::{ApiError, ErrorBody};
use super::model::*;
use super::{Api, Created, Deleted, Rules};
use crate::config::{ApiRole, check_user_id};
use crate::domain::{
    Declarer, Hostname, Mapping, MappingId, MappingSpec, Scheme, SetName, check_client_id,
};
use crate::store::{ListFilter, PageRequest, Quota};

/// Items per page when `limit` is not given, and at most.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 500;
/// Records a page examines at most for its filters: a filter that matches little returns a
/// short page with a cursor, never a scan of the whole store.
pub const SCAN_PER_PAGE: usize = 5_000;
/// The largest request body (a mapping is well under 8 KiB).
pub const MAX_BODY: usize = 64 * 1024;
/// A request body must arrive within this (a trickled body holds a connection no longer).
const BODY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_DESCRIPTION: usize = 1024;
const MAX_HEADERS: usize = 32;
const MAX_HEADER_VALUE: usize = 4096;
const MAX_PREFIX: usize = crate::domain::MAX_HOSTNAME_LEN;
/// The `source` of mappings created through the API.
pub const API_SOURCE: &str = "api";

/// Query parameters into `T`: an unknown or repeated parameter, or a value of the wrong type, is
/// a 400 naming it.
fn query<T: DeserializeOwned>(raw: Option<&str>, known: &[&str]) -> Result<T, ApiError> {
    let raw = raw.unwrap_or("");
    let mut seen = Vec::new();
    for (k, _) in form_urlencoded::parse(raw.as_bytes()) {
        if !known.contains(&k.as_ref()) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_parameter",
                format!("unknown query parameter {k:?}; known: {}", known.join(", ")),
            )
            .at(k.as_ref()));
        }
        if seen.contains(&k) {
            return Err(ApiError::invalid(
                &k,
                format!("query parameter {k:?} is given twice"),
            ));
        }
        seen.push(k);
    }
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw.as_bytes()));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = named_field(&e.path().to_string(), &e.inner().to_string());
        ApiError::invalid(&field, format!("query parameter {field}: {}", e.inner()))
    })
}

/// The field an input error is about: its path, else the name serde quotes (`missing field
/// `x``, `unknown field `x``).
fn named_field(path: &str, message: &str) -> String {
    if !path.is_empty() && path != "." {
        return path.to_string();
    }
    message
        .split('`')
        .nth(1)
        .filter(|f| f.len() <= 64)
        .unwrap_or("body")
        .to_string()
}

/// A JSON body into `T`: at most [`MAX_BODY`] bytes (413), malformed or mistyped: 400 naming
/// the field.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let read = tokio::time::timeout(BODY_WITHIN, axum::body::to_bytes(body, MAX_BODY));
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is larger than {MAX_BODY} bytes"),
            )
            .at("body"));
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("the request body did not arrive within {BODY_WITHIN:?}"),
            )
            .at("body"));
        }
    };
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // Not JSON at all: the body is at fault, whatever field the parser was in.
        let field = match e.inner().classify() {
            serde_json::error::Category::Data => {
                named_field(&e.path().to_string(), &e.inner().to_string())
            }
            _ => "body".to_string(),
        };
        ApiError::invalid(&field, format!("body: {}", e.inner()))
    })
}

fn mapping_id(raw: &str) -> Result<MappingId, ApiError> {
    MappingId::parse(raw).map_err(|e| ApiError::invalid("id", e.to_string()))
}

/// The mapping `id` if the caller may see it; another user's is "not found".
async fn visible(api: &Api, role: &ApiRole, id: &str) -> Result<Mapping, ApiError> {
    let id = mapping_id(id)?;
    match api.store.get(&id).await? {
        Some(m) if owns(role, &m) => Ok(m),
        _ => Err(ApiError::not_found(format!("no mapping {id}"))),
    }
}

#[utoipa::path(get, path = "/api/v1/mappings", params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page, in creation order", body = MappingPage),
        (status = 400, description = "A bad or unknown parameter", body = ErrorBody),
        (status = 401, description = "No token or a wrong one", body = ErrorBody),
        (status = 403, description = "Another user's mappings", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<MappingPage>, ApiError> {
    let role = api.tokens.check(&headers)?;
    let q: ListQuery = query(
        raw.as_deref(),
        &[
            "user",
            "client",
            "set",
            "phase",
            "domain_prefix",
            "cursor",
            "limit",
        ],
    )?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit {limit}: 1 to {MAX_LIMIT}"),
        ));
    }
    let user = acting_user(&role, q.user, "user", "lists only its own mappings")?;
    if let Some(u) = &user {
        check_user_id(u).map_err(|e| ApiError::invalid("user", format!("user {u:?}: {e}")))?;
    }
    if let Some(c) = &q.client {
        check_client_id(c).map_err(|e| ApiError::invalid("client", e))?;
    }
    let set = q
        .set
        .as_deref()
        .map(|s| SetName::parse(s).map_err(|e| ApiError::invalid("set", e.to_string())))
        .transpose()?;
    if let Some(p) = &q.domain_prefix {
        let ok = p.len() <= MAX_PREFIX
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !ok {
            return Err(ApiError::invalid(
                "domain_prefix",
                format!(
                    "domain_prefix {p:?}: lower-case letters, digits, dots and hyphens, at most {MAX_PREFIX}"
                ),
            ));
        }
    }
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| MappingId::parse(c).map_err(|e| ApiError::invalid("cursor", e.to_string())))
        .transpose()?;
    let filter = match (user, q.client.clone()) {
        (Some(u), _) => ListFilter::User(u),
        (None, Some(c)) => ListFilter::Client(c),
        (None, None) => ListFilter::All,
    };
    let now = Utc::now();
    let wanted = |m: &Mapping| {
        q.client
            .as_deref()
            .is_none_or(|c| m.target_client_id.as_deref() == Some(c))
            && set.as_ref().is_none_or(|s| m.placement.as_ref() == Some(s))
            && q.phase.is_none_or(|p| Phase::of(m, now) == p)
            && q.domain_prefix
                .as_deref()
                .is_none_or(|p| m.full_domain.as_str().starts_with(p))
    };
    let limit = limit as usize;
    let mut items = Vec::new();
    let mut after = cursor;
    let mut scanned = 0;
    loop {
        let chunk = limit.max(100).min(SCAN_PER_PAGE - scanned);
        let page = api
            .store
            .list(
                &filter,
                PageRequest {
                    after: after.clone(),
                    limit: chunk,
                },
            )
            .await?;
        for m in &page.items {
            scanned += 1;
            after = Some(m.mapping_id.clone());
            if wanted(m) {
                items.push(MappingView::of(m, now));
                if items.len() == limit {
                    return Ok(axum::Json(MappingPage {
                        items,
                        next_cursor: after.map(|a| a.to_string()),
                    }));
                }
            }
        }
        let Some(next) = page.next else {
            return Ok(axum::Json(MappingPage {
                items,
                next_cursor: None,
            }));
        };
        after = Some(next);
        if scanned >= SCAN_PER_PAGE {
            return Ok(axum::Json(MappingPage {
                items,
                next_cursor: after.map(|a| a.to_string()),
            }));
        }
    }
}

#[utoipa::path(get, path = "/api/v1/mappings/{id}",
    params(("id" = String, Path, description = "The mapping's id (`hdm_…`)", pattern = r"^hdm_[0-7][0-9A-HJKMNP-TV-Z]{25}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = MappingView),
        (status = 400, description = "Not a mapping id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such mapping, or another user's", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn get(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<MappingView>, ApiError> {
    let role = api.tokens.check(&headers)?;
    let m = visible(&api, &role, &id).await?;
    Ok(axum::Json(MappingView::of(&m, Utc::now())))
}

#[utoipa::path(get, path = "/api/v1/mappings/{id}/stats",
    params(("id" = String, Path, description = "The mapping's id (`hdm_…`)", pattern = r"^hdm_[0-7][0-9A-HJKMNP-TV-Z]{25}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = MappingStats),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn stats(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<MappingStats>, ApiError> {
    let role = api.tokens.check(&headers)?;
    let m = visible(&api, &role, &id).await?;
    let s = api.store.access_stats(&m.mapping_id).await?;
    Ok(axum::Json(MappingStats {
        id: m.mapping_id.to_string(),
        domain: m.full_domain.to_string(),
        requests: s.access_count,
        bytes_in: s.bytes_in,
        bytes_out: s.bytes_out,
        last_access_at: s.last_access_at.or(m.last_access_at),
    }))
}

/// The full domain of `subdomain.base_domain` if this deployment serves it; else why not.
/// A user token claims one label under a base domain exactly (no names below another tenant's
/// domain, no base domain of its own); an administrator may claim deeper names.
fn allowed_domain(
    rules: &Rules,
    role: &ApiRole,
    subdomain: &str,
    base_domain: &str,
) -> Result<Hostname, ApiError> {
    let base = Hostname::parse(base_domain).map_err(|e| {
        ApiError::refused("base_domain", format!("base_domain {base_domain:?}: {e}"))
    })?;
    if !rules.base_domains.is_empty() && !rules.base_domains.contains(&base) {
        return Err(ApiError::refused(
            "base_domain",
            format!(
                "base_domain {base_domain:?} is not served here; base domains: {}",
                rules
                    .base_domains
                    .iter()
                    .map(|b| b.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let sub = Hostname::parse(subdomain)
        .map_err(|e| ApiError::refused("subdomain", format!("subdomain {subdomain:?}: {e}")))?;
    if matches!(role, ApiRole::User(_)) && sub.as_str().contains('.') {
        return Err(ApiError::refused(
            "subdomain",
            format!("subdomain {subdomain:?}: a user token claims a single label"),
        ));
    }
    let full = Hostname::join(sub.as_str(), base.as_str())
        .map_err(|e| ApiError::refused("subdomain", format!("subdomain {subdomain:?}: {e}")))?;
    if rules.base_domains.iter().any(|b| b.is_within(&full)) {
        return Err(ApiError::refused(
            "subdomain",
            format!("{full} is a base domain or above one"),
        ));
    }
    Ok(full)
}

#[utoipa::path(get, path = "/api/v1/availability", params(AvailabilityQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Free, taken (by whom) or not allowed (why)", body = Availability),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn availability(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<axum::Json<Availability>, ApiError> {
    let role = api.tokens.check(&headers)?;
    let q: AvailabilityQuery = query(raw.as_deref(), &["subdomain", "base_domain"])?;
    let domain = match allowed_domain(&api.rules, &role, &q.subdomain, &q.base_domain) {
        Ok(d) => d,
        Err(e) => {
            return Ok(axum::Json(Availability {
                domain: None,
                available: false,
                verdict: Verdict::NotAllowed,
                message: e.body.message,
                held_by: None,
            }));
        }
    };
    let a = match api.store.get_by_domain(&domain).await? {
        None => Availability {
            domain: Some(domain.to_string()),
            available: true,
            verdict: Verdict::Free,
            message: format!("{domain} is free"),
            held_by: None,
        },
        Some(m) => {
            let shown = owns(&role, &m);
            Availability {
                domain: Some(domain.to_string()),
                available: false,
                verdict: Verdict::Taken,
                message: format!("{domain} is taken"),
                held_by: Some(Holder {
                    mapping_id: shown.then(|| m.mapping_id.to_string()),
                    owner_user_id: m.owner_user_id.clone().filter(|_| shown),
                    source: m.source.clone().filter(|_| shown),
                    yours: matches!(&role, ApiRole::User(me) if m.owner_user_id.as_deref() == Some(me.as_str())),
                }),
            }
        }
    };
    Ok(axum::Json(a))
}

/// The user a request acts for: an administrator's choice (`asked`, or none), a user token's
/// own id; another user named by a user token is refused, naming `field`.
fn acting_user(
    role: &ApiRole,
    asked: Option<String>,
    field: &str,
    only: &str,
) -> Result<Option<String>, ApiError> {
    match (role, asked) {
        (ApiRole::Admin, asked) => Ok(asked),
        (ApiRole::User(me), None) => Ok(Some(me.clone())),
        (ApiRole::User(me), Some(u)) if &u == me => Ok(Some(u)),
        (ApiRole::User(_), Some(u)) => {
            Err(ApiError::forbidden(format!("{field} {u:?}: a user token {only}")).at(field))
        }
    }
}

/// A create request as a spec and the domain it claims: every field checked, the owner decided
/// by the role.
fn spec_of(
    rules: &Rules,
    role: &ApiRole,
    req: CreateMapping,
) -> Result<(MappingSpec, Hostname), ApiError> {
    let domain = allowed_domain(rules, role, &req.subdomain, &req.base_domain)?;
    let owner = acting_user(
        role,
        req.owner_user_id,
        "owner_user_id",
        "creates only its own mappings",
    )?;
    if let Some(o) = &owner {
        check_user_id(o)
            .map_err(|e| ApiError::refused("owner_user_id", format!("owner_user_id {o:?}: {e}")))?;
    }
    let scheme = match req.target_scheme {
        None | Some(TargetScheme::Http) => Scheme::Http,
        Some(TargetScheme::Https) => Scheme::Https,
    };
    if let Some(c) = &req.target_client_id {
        // Tunnel clients are the operator's (single-node: `tunnel_clients`), not a user's.
        if *role != ApiRole::Admin {
            return Err(ApiError::forbidden(format!(
                "target_client_id {c:?}: only an administrator routes through a tunnel client"
            ))
            .at("target_client_id"));
        }
        check_client_id(c).map_err(|e| ApiError::refused("target_client_id", e))?;
    }
    let description = req.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(ApiError::refused(
            "description",
            format!("description: at most {MAX_DESCRIPTION} characters"),
        ));
    }
    let headers = req.custom_headers.unwrap_or_default();
    if headers.len() > MAX_HEADERS || headers.values().any(|v| v.len() > MAX_HEADER_VALUE) {
        return Err(ApiError::refused(
            "custom_headers",
            format!(
                "custom_headers: at most {MAX_HEADERS}, each value at most {MAX_HEADER_VALUE} bytes"
            ),
        ));
    }
    if let Some(at) = req.expires_at
        && at <= Utc::now()
    {
        return Err(ApiError::refused(
            "expires_at",
            format!("expires_at {at} has passed"),
        ));
    }
    let base = Hostname::parse(&req.base_domain)
        .map_err(|e| ApiError::refused("base_domain", e.to_string()))?;
    let mut spec = MappingSpec::new("x", base.as_str(), "127.0.0.1", 1);
    // As stored and shown: the normalised label(s), which with the base make `domain`.
    spec.subdomain = domain
        .as_str()
        .strip_suffix(base.as_str())
        .and_then(|s| s.strip_suffix('.'))
        .unwrap_or(&req.subdomain)
        .to_string();
    spec.target_host = req.target_host;
    spec.target_port = req.target_port;
    spec.target_scheme = scheme;
    spec.target_client_id = req.target_client_id;
    spec.owner_user_id = owner;
    spec.description = description;
    spec.expires_at = req.expires_at;
    spec.custom_headers = headers;
    spec.source = Some(API_SOURCE.into());
    let domain = spec
        .validate()
        .map_err(|e| ApiError::from(crate::store::StoreError::Invalid(e)))?;
    // A tunnel's target is judged by its agent's allow-list; a direct one by the egress policy.
    if spec.target_client_id.is_none() {
        rules
            .egress
            .check_declared(&spec.target_host, spec.target_port, None, Declarer::Tenant)
            .map_err(|r| ApiError::refused("target_host", r.to_string()))?;
    }
    Ok((spec, domain))
}

#[utoipa::path(post, path = "/api/v1/mappings", request_body = CreateMapping, params(CreateQuery),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created and served (cluster: its resource is `Active`)", body = MappingView),
        (status = 202, description = "Cluster: declared, not `Active` (with `wait=ready`: not `Ready`) within `api.wait`", body = InProgress),
        (status = 400, description = "Malformed JSON or a mistyped field", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Another user as owner", body = ErrorBody),
        (status = 409, description = "The domain is taken, or a quota is reached", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 422, description = "Not allowed here (the field is named)", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn create(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let role = api.tokens.check(&headers)?;
    let q: CreateQuery = query(raw.as_deref(), &["wait"])?;
    let req: CreateMapping = json_body(body).await?;
    let (spec, domain) = spec_of(&api.rules, &role, req)?;
    let quota = match &role {
        ApiRole::Admin => Quota::UNLIMITED,
        ApiRole::User(_) => Quota {
            per_group: 0,
            per_owner: api.rules.max_per_user,
        },
    };
    let ready = q.wait == Some(WaitFor::Ready);
    let m = match api.intent.create(spec, quota, ready).await {
        Ok(Created::Served(m)) => m,
        Ok(Created::Pending { resource, message }) => {
            return Ok((
                StatusCode::ACCEPTED,
                axum::Json(InProgress { resource, message }),
            )
                .into_response());
        }
        // Another owner's holder is not named to a user (availability shows it the same way).
        Err(e) if e.body.code == "domain_taken" && role != ApiRole::Admin => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "domain_taken",
                format!("{domain} is taken"),
            )
            .at("subdomain"));
        }
        Err(e) => return Err(e),
    };
    let location = format!("/api/v1/mappings/{}", m.mapping_id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(MappingView::of(&m, Utc::now())),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/mappings/{id}",
    params(("id" = String, Path, description = "The mapping's id (`hdm_…`)", pattern = r"^hdm_[0-7][0-9A-HJKMNP-TV-Z]{25}$"), DeleteQuery),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted; its domain is free"),
        (status = 202, description = "Cluster: its resource is being deleted, the domain not yet released within `api.wait`", body = InProgress),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "`force` without the admin role", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Declared elsewhere (use force), or changed meanwhile", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn delete(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let role = api.tokens.check(&headers)?;
    let q: DeleteQuery = query(raw.as_deref(), &["force"])?;
    let force = q.force.unwrap_or(false);
    if force && role != ApiRole::Admin {
        return Err(ApiError::forbidden("force-delete needs the admin role").at("force"));
    }
    let m = visible(&api, &role, &id).await?;
    if !force && !api.intent.declared_here(&m).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "mapping {} was declared by {}, not through the API: delete it there, or as an administrator with force=true",
                m.mapping_id,
                m.source.as_deref().unwrap_or("an unknown source")
            ),
        ));
    }
    let deleted = api.intent.delete(&m, force).await?;
    tracing::info!(mapping = %m.mapping_id, domain = %m.full_domain, force, ?deleted, "deleted through the API");
    Ok(match deleted {
        Deleted::Gone => StatusCode::NO_CONTENT.into_response(),
        Deleted::InProgress { resource } => (
            StatusCode::ACCEPTED,
            axum::Json(InProgress {
                message: format!(
                    "{resource} is being deleted; {} is released when its finalizer has run",
                    m.full_domain
                ),
                resource,
            }),
        )
            .into_response(),
    })
}

#[utoipa::path(get, path = "/api/v1/stats/system",
    security(("bearer" = [])),
    responses(
        (status = 200, body = SystemStats),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Administrators only", body = ErrorBody),
        (status = 503, description = "The store cannot be reached", body = ErrorBody),
    ))]
pub async fn system(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<axum::Json<SystemStats>, ApiError> {
    if api.tokens.check(&headers)? != ApiRole::Admin {
        return Err(ApiError::forbidden("system statistics need the admin role"));
    }
    let nodes = api.nodes.list_nodes().await?;
    let mappings: BTreeMap<String, u64> = api
        .intent
        .phases()
        .await?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(p, n)| (p.as_str().to_string(), n))
        .collect();
    Ok(axum::Json(SystemStats {
        cache: api.cache.as_ref().map(|c| c()),
        mappings,
        store_version: api.store.current_version().await?,
        proxies: nodes
            .into_iter()
            .map(|n| ProxyView {
                node_id: n.node_id,
                set: n.set.to_string(),
                state: n.state.as_str().to_string(),
                applied_version: n.applied_version,
                heartbeat_at: n.heartbeat_at,
            })
            .collect(),
    }))
}

/// `GET /api/v1/openapi.json`: this API's OpenAPI document (no token: it holds no data).
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
        .into_response()
}

pub async fn no_route() -> ApiError {
    ApiError::not_found("no such API route")
}

pub async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_errors_name_the_field() {
        assert_eq!(named_field("target_port", "invalid type"), "target_port");
        assert_eq!(named_field("", "missing field `subdomain`"), "subdomain");
        assert_eq!(
            named_field(".", "unknown field `bogus`, expected one of"),
            "bogus"
        );
        assert_eq!(named_field("", "EOF while parsing a value"), "body");
        let e = query::<ListQuery>(Some("limit=10&limit=20"), &["limit"]).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("limit"));
        let e = query::<ListQuery>(Some("colour=red"), &["limit"]).unwrap_err();
        assert_eq!(
            (e.body.code.as_str(), e.body.field.as_deref()),
            ("unknown_parameter", Some("colour"))
        );
        let e = query::<ListQuery>(Some("limit=many"), &["limit"]).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("limit"));
        let e = query::<ListQuery>(Some("phase=Sleeping"), &["phase"]).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("phase"));
        let q = query::<ListQuery>(
            Some("phase=Active&limit=5&user=u%201"),
            &["phase", "limit", "user"],
        )
        .unwrap();
        assert_eq!(
            (q.phase, q.limit, q.user.as_deref()),
            (Some(Phase::Active), Some(5), Some("u 1"))
        );
    }
}
