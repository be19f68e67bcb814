//! This cluster's identity in record sources (`k8s:<cluster>/<namespace>/<name>`): the
//! configured `controller.cluster_id`, else the uid of the `kube-system` namespace, which is
//! stable for the life of a cluster and differs between clusters.

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};

/// The namespace whose uid names the cluster when `controller.cluster_id` is not set.
pub const IDENTITY_NAMESPACE: &str = "kube-system";

#[derive(Debug, thiserror::Error)]
#[error(
    "controller.cluster_id is not set and the uid of namespace {IDENTITY_NAMESPACE} could not be \
     read ({detail}); grant the controller get on namespaces/{IDENTITY_NAMESPACE} or set \
     controller.cluster_id"
)]
pub struct IdentityError {
    detail: String,
}

/// The configured identity, else the `kube-system` namespace's uid (one API call at start).
pub async fn identity(client: &Client, configured: Option<&str>) -> Result<String, IdentityError> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = api
        .get(IDENTITY_NAMESPACE)
        .await
        .map_err(|e| IdentityError {
            detail: e.to_string(),
        })?;
    ns.metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| IdentityError {
            detail: "it has no uid".into(),
        })
}
