//! The configuration proxies push to this agent (docs/agent.md "Pushed configuration"): judged
//! against the allow-list, answered with a `ConfigAck` naming the tunnels refused, kept in memory
//! and, with `agent.config_cache`, on disk — so an agent restarted while its servers are
//! unreachable still knows (and shows) the last good configuration.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::allow::{AllowList, Refusal};
use super::health::{Down, Planned};
use super::metrics::AgentMetrics;
use crate::tunnel::config::{ConfigAck, ConfigPush, Rejected};

/// Largest cache file read back (a push is at most one 64 KiB frame).
const MAX_CACHE: u64 = 1 << 20;

/// The agent's answer to `push`: every tunnel whose target its allow-list does not hold is
/// refused with the reason (the allow-list stays the guard: a pushed configuration never
/// widens what the agent reaches).
pub fn judge(push: &ConfigPush, allow: &AllowList) -> ConfigAck {
    let rejected = push
        .tunnels
        .iter()
        .filter_map(|t| {
            match allow.check(Some(&t.target)) {
                Ok(_) => None,
                Err(Refusal::BadTarget) => Some(format!("target {:?} is not host:port", t.target)),
                Err(Refusal::NotAllowed) => Some(format!(
                    "local target {} is not in this agent's allow list (--allow)",
                    t.target
                )),
            }
            .map(|reason| Rejected {
                name: t.name.clone(),
                reason,
            })
        })
        .collect();
    ConfigAck {
        hash: push.hash.clone(),
        rejected,
    }
}
/// The cache file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    client_id: String,
    config: ConfigPush,
}

/// What this agent applied last.
pub struct Pushed {
    client_id: String,
    allow: AllowList,
    cache: Option<PathBuf>,
    current: Mutex<Option<ConfigAck>>,
    metrics: AgentMetrics,
    /// The health checks of the tunnels carried.
    checks: super::health::Checks,
}

impl Pushed {
    /// With the cache's configuration when `cache` holds a good one of this client.
    pub fn new(
        client_id: &str,
        allow: AllowList,
        cache: Option<PathBuf>,
        metrics: AgentMetrics,
    ) -> Self {
        let p = Self {
            client_id: client_id.to_string(),
            allow,
            cache,
            current: Mutex::new(None),
            metrics,
            checks: super::health::Checks::default(),
        };
        if let Some(path) = &p.cache {
            match read_cache(path, client_id) {
                Ok(Some(push)) => {
                    let ack = judge(&push, &p.allow);
                    tracing::info!(path = %path.display(), hash = %push.hash, tunnels = push.tunnels.len(), rejected = ack.rejected.len(), "last configuration read from the cache");
                    p.show(&push, &ack);
                    p.check(&push, &ack);
                    *p.current.lock().expect("not poisoned") = Some(ack);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "configuration cache ignored")
                }
            }
        }
        p
    }

    /// The hash applied last (from a push or the cache).
    pub fn hash(&self) -> Option<String> {
        self.current
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|a| a.hash.clone())
    }

    /// Applies a push: the answer to send back, or why the push is not believed.
    pub fn apply(&self, push: &ConfigPush) -> Result<ConfigAck, String> {
        if !push.consistent() {
            self.metrics
                .config_pushes
                .with_label_values(&["invalid"])
                .inc();
            return Err(format!(
                "ConfigPush with hash {:?} and {} tunnels: the hash is not the tunnels'",
                push.hash.chars().take(40).collect::<String>(),
                push.tunnels.len()
            ));
        }
        let ack = judge(push, &self.allow);
        let mut current = self.current.lock().expect("not poisoned");
        if current.as_ref() == Some(&ack) {
            self.metrics
                .config_pushes
                .with_label_values(&["unchanged"])
                .inc();
            return Ok(ack);
        }
        self.metrics
            .config_pushes
            .with_label_values(&["applied"])
            .inc();
        tracing::info!(hash = %push.hash, tunnels = push.tunnels.len(), rejected = ack.rejected.len(), "configuration applied");
        for r in &ack.rejected {
            tracing::warn!(tunnel = %r.name, reason = %r.reason, "tunnel refused");
        }
        self.show(push, &ack);
        self.check(push, &ack);
        if let Some(path) = &self.cache
            && let Err(e) = write_cache(path, &self.client_id, push)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the configuration cache");
        }
        *current = Some(ack.clone());
        Ok(ack)
    }

    /// What the health checks found down, for a session to report.
    pub fn health(
        &self,
    ) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<super::health::Down>> {
        self.checks.subscribe()
    }

    /// Runs the checks of the tunnels carried (not those refused).
    fn check(&self, push: &ConfigPush, ack: &ConfigAck) {
        self.checks.replace(planned_checks(push, ack, &self.allow));
    }

    fn show(&self, push: &ConfigPush, ack: &ConfigAck) {
        let rejected = ack.rejected.len();
        let g = &self.metrics.config_tunnels;
        g.with_label_values(&["carried"])
            .set((push.tunnels.len() - rejected.min(push.tunnels.len())) as i64);
        g.with_label_values(&["rejected"]).set(rejected as i64);
    }
}

/// The health checks to run for `push`: only tunnels the allow-list admits (a refused one is
/// never probed, whatever its name), each probing the allow-list entry its target matched.
pub fn planned_checks(push: &ConfigPush, ack: &ConfigAck, allow: &AllowList) -> Vec<Planned> {
    push.tunnels
        .iter()
        .filter(|t| !ack.rejected.iter().any(|r| r.name == t.name))
        .filter_map(|t| {
            let check = t.health_check.clone()?;
            if let Some((field, why)) = check.problem() {
                tracing::warn!(tunnel = %t.name, field, %why, "health check not run");
                return None;
            }
            let dial = allow.check(Some(&t.target)).ok()?.to_string();
            Some(Planned {
                down: Down {
                    name: t.name.clone(),
                    target: t.target.clone(),
                },
                dial,
                check,
            })
        })
        .collect()
}

fn read_cache(path: &Path, client_id: &str) -> Result<Option<ConfigPush>, String> {
    use std::io::Read as _;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut raw = String::new();
    f.take(MAX_CACHE + 1)
        .read_to_string(&mut raw)
        .map_err(|e| e.to_string())?;
    if raw.len() as u64 > MAX_CACHE {
        return Err(format!("larger than {MAX_CACHE} bytes"));
    }
    let cached: Cached = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
    if cached.client_id != client_id {
        return Err(format!(
            "it is client {:?}'s, this agent is {client_id:?}",
            cached.client_id
        ));
    }
    if !cached.config.consistent() {
        return Err("its hash is not its tunnels'".into());
    }
    Ok(Some(cached.config))
}

/// Written whole and atomically (the store's `write_atomic`: temp file, fsync, rename): a crash
/// leaves the old cache or the new one, never half of one.
fn write_cache(path: &Path, client_id: &str, push: &ConfigPush) -> Result<(), String> {
    let body = serde_json::to_vec_pretty(&Cached {
        client_id: client_id.to_string(),
        config: push.clone(),
    })
    .map_err(|e| e.to_string())?;
    crate::store::persist::write_atomic(path, &body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::config::PushedTunnel;

    fn t(name: &str, target: &str) -> PushedTunnel {
        PushedTunnel::tcp(name, target)
    }

    #[test]
    fn the_agent_refuses_what_its_allow_list_does_not_hold() {
        let allow = AllowList::new(&["localhost:22"]);
        let push = ConfigPush::new(vec![
            t("ssh", "localhost:22"),
            t("db", "localhost:5432"),
            t("odd", "nowhere"),
        ]);
        let ack = judge(&push, &allow);
        assert_eq!(ack.hash, push.hash);
        assert_eq!(
            ack.rejected,
            vec![
                Rejected {
                    name: "db".into(),
                    reason:
                        "local target localhost:5432 is not in this agent's allow list (--allow)"
                            .into()
                },
                Rejected {
                    name: "odd".into(),
                    reason: "target \"nowhere\" is not host:port".into()
                },
            ]
        );
        assert!(ack.clone().bounded().is_ok());
    }
    #[test]
    fn a_push_is_kept_on_disk_and_read_back_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let allow = || AllowList::new(&["localhost:22"]);
        let m = AgentMetrics::new();
        let p = Pushed::new("laptop", allow(), Some(path.clone()), m.clone());
        assert_eq!(p.hash(), None);
        let push = ConfigPush::new(vec![t("ssh", "localhost:22"), t("db", "localhost:5432")]);
        let ack = p.apply(&push).unwrap();
        assert_eq!(ack.rejected.len(), 1);
        assert_eq!(p.apply(&push).unwrap(), ack, "the same push again");
        let pushes = |o: &str| m.config_pushes.with_label_values(&[o]).get();
        assert_eq!((pushes("applied"), pushes("unchanged")), (1, 1));
        assert_eq!(m.config_tunnels.with_label_values(&["rejected"]).get(), 1);

        let restarted = Pushed::new("laptop", allow(), Some(path.clone()), AgentMetrics::new());
        assert_eq!(restarted.hash(), Some(push.hash.clone()));
        let other = Pushed::new("desk", allow(), Some(path.clone()), AgentMetrics::new());
        assert_eq!(other.hash(), None, "another client's cache is not used");

        let mut forged = push.clone();
        forged.tunnels[0].target = "evil:1".into();
        assert!(p.apply(&forged).unwrap_err().contains("not the tunnels'"));
        assert_eq!(pushes("invalid"), 1);

        std::fs::write(&path, "{not json").unwrap();
        let broken = Pushed::new("laptop", allow(), Some(path), AgentMetrics::new());
        assert_eq!(broken.hash(), None, "a broken cache is ignored, not fatal");
    }

    #[test]
    fn only_admitted_tunnels_are_health_checked_at_their_allowed_address() {
        use crate::domain::{CheckKind, HealthCheck};
        let check = HealthCheck {
            kind: CheckKind::Tcp,
            path: None,
            interval_ms: 1000,
            timeout_ms: 500,
            max_failed: 2,
        };
        let checked = |name: &str, target: &str| PushedTunnel {
            health_check: Some(check.clone()),
            ..t(name, target)
        };
        let allow = AllowList::new(&["LocalHost:22", "127.0.0.1:80"]);
        let push = ConfigPush::new(vec![
            checked("ssh", "localhost:22"),
            checked("evil", "10.0.0.1:22"),
            // The same name twice, once refused: neither is probed.
            checked("dup", "127.0.0.1:80"),
            checked("dup", "10.0.0.2:80"),
            t("plain", "127.0.0.1:80"),
        ]);
        let ack = judge(&push, &allow);
        let planned = planned_checks(&push, &ack, &allow);
        let got: Vec<(&str, &str, &str)> = planned
            .iter()
            .map(|p| {
                (
                    p.down.name.as_str(),
                    p.down.target.as_str(),
                    p.dial.as_str(),
                )
            })
            .collect();
        assert_eq!(got, [("ssh", "localhost:22", "LocalHost:22")]);
    }
}
