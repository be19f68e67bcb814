//! Single-node mode: the `mappings:` list of the configuration file is the declaration; the
//! memory store (and its JSON file) is brought in line with it at start.

use std::path::Path;

use crate::config::{MappingCert, MappingEntry, TunnelClientEntry, group_members};
use crate::domain::{CertSource, Mapping, MappingSpec, MappingTls, TargetGroup};
use crate::store::{MappingStore, StoreError};

/// `source` of mappings declared in the file: only these are updated or removed here.
pub const SOURCE: &str = "config";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Create(MappingSpec),
    Update(Box<Mapping>, MappingSpec),
    Delete(Box<Mapping>),
}

/// The record a file entry declares; a group target lists the `clients` serving the group; a
/// certificate ordered through ACME is served from its files in `acme_dir`.
pub fn spec_of(
    e: &MappingEntry,
    clients: &[TunnelClientEntry],
    acme_dir: Option<&Path>,
) -> MappingSpec {
    let mut spec = MappingSpec {
        enable_https: e.tls.is_some(),
        target_group: e.target_group.as_ref().map(|g| TargetGroup {
            name: g.clone(),
            clients: group_members(clients, g),
            balance: e.balance.unwrap_or_default(),
        }),
        target_scheme: e.target_scheme,
        upstream: e.upstream(),
        description: e.description.clone(),
        custom_headers: e.custom_headers.clone(),
        source: Some(SOURCE.into()),
        target_client_id: e.target_client_id.clone(),
        ..MappingSpec::new(
            &e.subdomain,
            e.base_domain.as_str(),
            &e.target_host,
            e.target_port,
        )
    };
    spec.tls = e.tls.as_ref().and_then(|t| {
        let (cert_file, key_file) = match t.cert().ok()? {
            MappingCert::Files {
                cert_file,
                key_file,
            } => (cert_file.to_path_buf(), key_file.to_path_buf()),
            MappingCert::Acme => {
                // Only here: `plan` validates every entry's domain anyway, and a second parse
                // of each of 100 000 hostnames at start is not needed for the others.
                let domain = spec.validate().ok()?;
                let files = crate::acme::files::CertPaths::new(acme_dir?, &domain);
                (files.cert, files.key)
            }
        };
        Some(MappingTls {
            redirect_http: t.redirect_http,
            cert: CertSource::Files {
                cert_file: cert_file.display().to_string(),
                key_file: key_file.display().to_string(),
            },
        })
    });
    spec
}

/// The domains of the entries whose certificate is ordered through ACME (`tls: {acme: true}`).
pub fn acme_domains(
    entries: &[MappingEntry],
    clients: &[TunnelClientEntry],
) -> Vec<crate::domain::Hostname> {
    entries
        .iter()
        .filter(|e| {
            e.tls
                .as_ref()
                .is_some_and(|t| t.cert() == Ok(MappingCert::Acme))
        })
        .filter_map(|e| spec_of(e, clients, None).validate().ok())
        .collect()
}

/// What to do so the store holds exactly the declared mappings. Mappings from other sources are
/// left alone; a declared domain held by one is reported, not taken.
pub fn plan(declared: &[MappingSpec], existing: &[Mapping]) -> (Vec<Action>, Vec<String>) {
    let mut actions = Vec::new();
    let mut refused = Vec::new();
    let mut wanted = std::collections::HashSet::new();
    // By domain: a restart with 100 000 mappings in the file and the same in the store looked
    // each one up in a list (15 s).
    let by_domain: std::collections::HashMap<&crate::domain::Hostname, &Mapping> =
        existing.iter().map(|m| (&m.full_domain, m)).collect();
    for spec in declared {
        let Ok(domain) = spec.validate() else {
            refused.push(format!("{}.{}: invalid", spec.subdomain, spec.base_domain));
            continue;
        };
        wanted.insert(domain.clone());
        match by_domain.get(&domain).copied() {
            None => actions.push(Action::Create(spec.clone())),
            Some(m) if m.source.as_deref() != Some(SOURCE) => refused.push(format!(
                "{domain}: already held by mapping {} (source {})",
                m.mapping_id,
                m.source.as_deref().unwrap_or("unknown")
            )),
            Some(m) if &m.spec() != spec => {
                actions.push(Action::Update(Box::new(m.clone()), spec.clone()))
            }
            Some(_) => {}
        }
    }
    for m in existing {
        if m.source.as_deref() == Some(SOURCE) && !wanted.contains(&m.full_domain) {
            actions.push(Action::Delete(Box::new(m.clone())));
        }
    }
    (actions, refused)
}

/// Applies the file's mappings to `store`; returns how many changes were made.
pub async fn apply(
    store: &dyn MappingStore,
    entries: &[MappingEntry],
    clients: &[TunnelClientEntry],
    acme_dir: Option<&Path>,
) -> Result<usize, StoreError> {
    let declared: Vec<MappingSpec> = entries
        .iter()
        .map(|e| spec_of(e, clients, acme_dir))
        .collect();
    let existing = store.list_all().await?;
    let (actions, refused) = plan(&declared, &existing);
    for r in refused {
        tracing::error!("mappings: {r}; not applied");
    }
    let n = actions.len();
    for a in actions {
        match a {
            Action::Create(spec) => {
                store.create(spec).await?;
            }
            Action::Update(m, spec) => {
                store.update(&m.mapping_id, spec, m.version).await?;
            }
            Action::Delete(m) => {
                store.delete(&m.mapping_id, Some(m.version)).await?;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MappingId;

    fn declared(sub: &str, port: u16) -> MappingSpec {
        MappingSpec {
            source: Some(SOURCE.into()),
            ..MappingSpec::new(sub, "tunnox.net", "127.0.0.1", port)
        }
    }

    fn stored(spec: MappingSpec) -> Mapping {
        let full = spec.validate().unwrap();
        Mapping::from_spec(MappingId::generate(), spec, full, "n", chrono::Utc::now())
    }

    #[test]
    fn plans_the_difference() {
        let api_owned = stored(MappingSpec {
            source: Some("api".into()),
            ..MappingSpec::new("taken", "tunnox.net", "127.0.0.1", 1)
        });
        let existing = vec![
            stored(declared("same", 1)),
            stored(declared("changed", 1)),
            stored(declared("gone", 1)),
            api_owned,
        ];
        let want = vec![
            declared("same", 1),
            declared("changed", 2),
            declared("new", 3),
            declared("taken", 4),
        ];
        let (actions, refused) = plan(&want, &existing);
        let summary: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Create(s) => format!("create {}", s.subdomain),
                Action::Update(m, s) => format!("update {} {}", m.subdomain, s.target_port),
                Action::Delete(m) => format!("delete {}", m.subdomain),
            })
            .collect();
        assert_eq!(
            summary,
            vec!["update changed 2", "create new", "delete gone"]
        );
        assert_eq!(refused.len(), 1);
        assert!(
            refused[0].contains("taken.tunnox.net") && refused[0].contains("source api"),
            "{refused:?}"
        );
    }
}
