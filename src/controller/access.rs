//! The Kubernetes API calls the controller makes, each with the code that makes it: the one
//! list the chart's RBAC (`charts/tunnox/templates/controller-rbac.yaml`) grants, no more.
//! The e2e suite checks the chart against this list and this list against the calls the API
//! server's audit log records while the controller works (`controller_rbac_is_what_it_calls`).
//! A new API call starts here.

/// Where a grant applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every namespace (ClusterRole + ClusterRoleBinding).
    Cluster,
    /// The controller's own namespace (`$POD_NAMESPACE`; Role + RoleBinding).
    OwnNamespace,
}

/// One RBAC rule's worth of calls.
#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub scope: Scope,
    /// API group; `""` is the core group.
    pub group: &'static str,
    /// Resource, or `resource/subresource`.
    pub resource: &'static str,
    /// Object names the calls are limited to; empty means any.
    pub names: &'static [&'static str],
    pub verbs: &'static [&'static str],
    /// The code that makes these calls.
    pub made_by: &'static str,
}

/// Everything the controller calls. Leader election's Lease name is `controller.lease_name`'s
/// default, as the chart renders no other.
pub const GRANTS: &[Grant] = &[
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "httpdomainmappings",
        names: &[],
        verbs: &["list", "watch"],
        made_by: "controller/mod.rs: kube-runtime Controller over Api::all (reflector list + watch)",
    },
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "httpdomainmappings",
        names: &[],
        verbs: &["patch"],
        made_by: "reconcile.rs: kube-runtime finalizer() adds and removes tunnox.net/release-domain (JSON patch)",
    },
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "httpdomainmappings/status",
        names: &[],
        verbs: &["patch"],
        made_by: "reconcile.rs write_status: server-side apply on the status subresource",
    },
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "tunnelsets",
        names: &[],
        verbs: &["list", "watch"],
        made_by: "controller/mod.rs: kube-runtime Controller over Api::<TunnelSet>::all (reflector list + watch)",
    },
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "tunnelsets",
        names: &[],
        verbs: &["patch"],
        made_by: "tunnelset.rs: kube-runtime finalizer() adds and removes tunnox.net/release-credential (JSON patch)",
    },
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "tunnelsets/status",
        names: &[],
        verbs: &["patch"],
        made_by: "tunnelset.rs write_status: server-side apply on the status subresource",
    },
    Grant {
        scope: Scope::Cluster,
        group: "",
        resource: "secrets",
        names: &[],
        verbs: &["get"],
        made_by: "tunnelset.rs decide: reads the Secret a TunnelSet's spec.auth.secretRef names, in the TunnelSet's namespace; reconcile.rs certificate: the Secret an HTTPDomainMapping's spec.tls.secretName names, in its namespace; reconcile.rs target_ca: the Secret spec.target.tls.caSecretName names; issuer.rs: the ACME account and issued certificates' Secrets (get only: no list or watch, so no Secret is read that no resource names)",
    },
    Grant {
        scope: Scope::Cluster,
        group: "events.k8s.io",
        resource: "events",
        names: &[],
        verbs: &["create", "patch"],
        made_by: "reconcile.rs publish: kube-runtime Recorder (create; patch when an event repeats)",
    },
    Grant {
        scope: Scope::Cluster,
        group: "",
        resource: "namespaces",
        names: &["kube-system"],
        verbs: &["get"],
        made_by: "cluster.rs identity: the kube-system namespace's uid names this cluster in record sources (unless controller.cluster_id is set)",
    },
    Grant {
        scope: Scope::OwnNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        names: &[],
        verbs: &["create"],
        made_by: "leader.rs attempt: creates the Lease when there is none (create cannot be limited by name)",
    },
    Grant {
        scope: Scope::OwnNamespace,
        group: "coordination.k8s.io",
        resource: "leases",
        names: &["tunnox-controller"],
        verbs: &["get", "update"],
        made_by: "leader.rs attempt: reads the Lease, renews or takes it over (replace)",
    },
    Grant {
        scope: Scope::OwnNamespace,
        group: "",
        resource: "services",
        names: &[],
        verbs: &["create", "patch", "delete"],
        made_by: "tunnelset.rs publish_service / delete_service: a TunnelSet's Service (server-side apply, which needs create for a new one; deleted with the TunnelSet or when it holds no port); with the chart's tunnel.remotePorts.service.enabled (the default)",
    },
];

/// What the controller calls in addition with ACME configured (the chart's
/// `https.acme.directoryUrl`, which renders `controller.acme`).
pub const ACME_GRANTS: &[Grant] = &[Grant {
    scope: Scope::OwnNamespace,
    group: "",
    resource: "secrets",
    names: &[],
    verbs: &["create", "patch"],
    made_by: "issuer.rs apply_secret: the ACME account's credentials and each issued certificate, by server-side apply (create for a new one, patch to renew); read by the ClusterRole's get",
}];

/// What the controller calls in addition with the management API on (the chart's `api.enabled`).
/// Its Role is in `api.namespace`, the release namespace unless set.
pub const API_GRANTS: &[Grant] = &[
    Grant {
        scope: Scope::OwnNamespace,
        group: "tunnox.net",
        resource: "httpdomainmappings",
        names: &[],
        verbs: &["create"],
        made_by: "api/cluster.rs create: a mapping created through the API is a resource in api.namespace",
    },
    Grant {
        scope: Scope::Cluster,
        group: "tunnox.net",
        resource: "httpdomainmappings",
        names: &[],
        verbs: &["delete"],
        made_by: "api/cluster.rs: a refused create withdrawn and an owner's delete (in api.namespace); an administrator's force-delete: the resource of any namespace that declares the mapping",
    },
];

/// One permission: (scope, group, resource, object name or "" for any, verb).
pub type Permission = (Scope, String, String, String, String);

/// The grants as single permissions, sorted: the form the e2e suite compares.
pub fn permissions(grants: &[Grant]) -> Vec<Permission> {
    let mut out = Vec::new();
    for g in grants {
        let names: Vec<&str> = if g.names.is_empty() {
            vec![""]
        } else {
            g.names.to_vec()
        };
        for name in names {
            for verb in g.verbs {
                out.push((
                    g.scope,
                    g.group.to_string(),
                    g.resource.to_string(),
                    name.to_string(),
                    verb.to_string(),
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_expand_names_and_verbs() {
        let p = permissions(GRANTS);
        assert!(p.contains(&(
            Scope::OwnNamespace,
            "coordination.k8s.io".into(),
            "leases".into(),
            "tunnox-controller".into(),
            "update".into()
        )));
        assert!(
            !p.iter()
                .any(|(_, _, r, _, v)| (r == "secrets" && v != "get")
                    || (v == "delete" && r != "services")),
            "nothing the code does not call; Secrets only read by name"
        );
        assert!(
            p.iter()
                .filter(|(_, _, r, _, _)| r == "services")
                .all(|(s, _, _, _, v)| *s == Scope::OwnNamespace
                    && matches!(v.as_str(), "create" | "patch" | "delete")),
            "Services only in the controller's own namespace"
        );
        assert_eq!(p.len(), 18);
    }
}
