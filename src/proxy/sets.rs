//! Forwarding a request to the proxy set that serves it (docs/sets.md): to a node of another set
//! of the same business, found in the node registry, over the fleet's node-to-node client with
//! the node token. The node that receives it serves it without deciding again, so a request
//! moves between sets at most once.

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::{Request, Response};

use super::forward::{ClientInfo, rewrite_request_headers, upgrade_protocol};
use super::policy::{Admitted, Ctx};
use super::tunnel::FROM_SET_HEADER;
use super::{ProxyBody, ProxyError};
use crate::domain::SetName;

/// Nodes of the serving set one request is offered to, at most.
const MAX_TRIES: usize = 4;

/// Sends `req` (for `admitted`, whose route another set serves) to a node of `set`: the next
/// (at most [`MAX_TRIES`]) while one cannot be reached and the request can be sent again (no
/// body, no upgrade).
pub async fn forward(
    ctx: &Ctx,
    mut req: Request<ProxyBody>,
    admitted: &Admitted,
    set: &SetName,
    info: ClientInfo<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let set_label = set.to_string();
    let count = |outcome: &str| {
        ctx.metrics
            .set_forwards
            .with_label_values(&[set_label.as_str(), outcome])
            .inc();
    };
    let host = admitted.route.host();
    let failed = |reason: String| ProxyError::SetForward {
        host: host.to_string(),
        set: set.clone(),
        reason,
    };
    let nodes = ctx.healthy.rotation(set, &ctx.tunnels.node_id);
    if nodes.is_empty() {
        // The registry named the set healthy a heartbeat ago and has no node of it now.
        count("no_node");
        return Err(failed("no active node of the set in the registry".into()));
    }
    let upgrade = upgrade_protocol(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The receiving node adds the mapping's own headers; this one only says who asked.
    rewrite_request_headers(&mut parts.headers, &info, upgrade.as_ref(), &[]);
    let me = HeaderValue::from_str(&ctx.set.to_string())
        .map_err(|_| failed("set name is not a header value".into()))?;
    parts.headers.insert(FROM_SET_HEADER, me);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let replayable = upgrade.is_none() && hyper::body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let no_token = || failed("proxy.tunnel.node_token_file is not set".into());
    let mut last = None;
    for node in nodes.iter().take(MAX_TRIES) {
        let sent_body = match body.take() {
            Some(b) => b,
            None => super::empty_body(),
        };
        let out = Request::from_parts(parts.clone(), sent_body);
        let fail = |reason: String| failed(format!("node {}: {reason}", node.node_id));
        let sent = ctx
            .tunnels
            .send_to_node(out, &node.address, &path, &count, &fail, &no_token)
            .await;
        match sent {
            Ok(resp) => {
                count("ok");
                let mut hold = None;
                return Ok(ctx.tunnels.node_answer(
                    resp,
                    client_upgrade,
                    upgrade,
                    &ctx.metrics,
                    &mut hold,
                ));
            }
            Err((e, true)) if replayable => {
                // Per request while the registry still names it: counted, logged at debug.
                tracing::debug!(set = %set, node = %node.node_id, error = %e, "a node of the serving set is unreachable; trying the next");
                last = Some(e);
            }
            Err((e, _)) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| failed("no node could be reached".into())))
}
