//! Leader election on a coordination.k8s.io Lease: one controller writes, the others wait.
//! Optimistic concurrency (resourceVersion) makes acquiring and renewing a single winner's act.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// What to do with the lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStep {
    /// No lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Its holder stopped renewing (or released it): take it over.
    TakeOver,
    /// Someone else holds it and is alive.
    Wait { holder: String },
}

/// Pure: decides from the lease's holder and last renewal.
pub fn step(
    spec: Option<&LeaseSpec>,
    me: &str,
    now_ms: i64,
    default_duration: Duration,
) -> LeaseStep {
    let Some(spec) = spec else {
        return LeaseStep::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return LeaseStep::Renew;
    }
    if holder.is_empty() {
        return LeaseStep::TakeOver;
    }
    let duration_ms = spec
        .lease_duration_seconds
        .map(|s| i64::from(s) * 1000)
        .unwrap_or(default_duration.as_millis() as i64);
    let renewed_ms = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0.as_millisecond())
        .unwrap_or(0);
    if now_ms > renewed_ms + duration_ms {
        LeaseStep::TakeOver
    } else {
        LeaseStep::Wait { holder }
    }
}

fn micro_now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// The election, on a thread of its own with its own runtime and its own connection to the API
/// server: nothing the controller does on its runtime (a page of thousands of objects decoded,
/// hundreds of reconciles, a request queue) can delay a renewal. CI once saw a 10 000-mapping
/// restart lose its lease three seconds in, with the renewals on the shared runtime.
pub struct Election {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Election {
    /// Starts the election; `leading` follows whether we hold the lease. The sender is dropped
    /// (so `leading` reports closed) when the election cannot run at all.
    pub fn spawn(cfg: LeaseConfig, leading: watch::Sender<bool>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let client = match Client::try_default().await {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reach the API server for the lease");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = run(client.clone(), cfg.clone(), leading) => {}
                        _ = stopped => release(client, &cfg).await,
                    }
                })
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Ends the election and gives the lease up if we still hold it (see [`release`]).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Runs the election until the process ends; publishes whether we lead.
async fn run(client: Client, cfg: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed = tokio::time::Instant::now();
    // Keep leading only well inside the lease (two thirds of it, like client-go's renew deadline),
    // so we stop before a contender may take over.
    let deadline = cfg.duration * 2 / 3;
    loop {
        // A hung request must not keep us "leading", yet a slow API server must not cost the lease
        // while the renew deadline still allows: a leader's attempt may take until that deadline.
        let budget = if *leading.borrow() {
            deadline
                .saturating_sub(last_renewed.elapsed())
                .max(cfg.renew)
        } else {
            cfg.renew
        };
        let result = match tokio::time::timeout(budget, attempt(&api, &cfg)).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service("lease request timed out".into())),
        };
        let was = *leading.borrow();
        let now = match result {
            Ok(leads) => {
                if leads {
                    last_renewed = tokio::time::Instant::now();
                }
                leads
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease update failed");
                was && last_renewed.elapsed() < deadline
            }
        };
        if now != was {
            tracing::info!(identity = %cfg.identity, lease = %cfg.name, leading = now, "leadership changed");
            let _ = leading.send(now);
        }
        tokio::time::sleep(cfg.renew).await;
    }
}

/// Gives the lease up on a clean shutdown, if we still hold it, so a successor (the restarted
/// process, or a standby) takes over at its next attempt instead of after `lease_duration`.
/// Best effort, with the renew interval as its budget: an unreleased lease simply expires.
async fn release(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let released = async {
        let Some(mut lease) = api.get_opt(&cfg.name).await? else {
            return Ok::<bool, kube::Error>(false);
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        lease.spec = Some(spec);
        // resourceVersion from our read: a contender that took over meanwhile keeps it.
        api.replace(&cfg.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    };
    match tokio::time::timeout(cfg.renew, released).await {
        Ok(Ok(true)) => tracing::info!(lease = %cfg.name, "lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the lease; it expires"),
        Err(_) => tracing::warn!("releasing the lease timed out; it expires"),
    }
}

async fn attempt(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let current = api.get_opt(&cfg.name).await?;
    let now_ms = jiff::Timestamp::now().as_millisecond();
    // A Lease object without a spec is held by nobody: take it over (creating would conflict).
    let existing_spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
    let decision = step(existing_spec.as_ref(), &cfg.identity, now_ms, cfg.duration);
    let spec = |acquired: Option<MicroTime>, transitions: i32| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs().max(1) as i32),
        acquire_time: acquired.or_else(|| Some(micro_now())),
        renew_time: Some(micro_now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
    match decision {
        LeaseStep::Wait { .. } => Ok(false),
        LeaseStep::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec(None, 0)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            }
        }
        LeaseStep::Renew | LeaseStep::TakeOver => {
            let mut lease = current.expect("a lease to renew or take over exists");
            let old = lease.spec.clone().unwrap_or_default();
            let (acquired, transitions) = if decision == LeaseStep::Renew {
                (old.acquire_time.clone(), old.lease_transitions.unwrap_or(0))
            } else {
                (None, old.lease_transitions.unwrap_or(0) + 1)
            };
            lease.spec = Some(spec(acquired, transitions));
            // resourceVersion from our read: a concurrent writer makes this a 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_ms: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(
                jiff::Timestamp::from_millisecond(renewed_ms).unwrap(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn lease_steps() {
        let d = Duration::from_secs(15);
        let now = 1_000_000;
        assert_eq!(step(None, "a", now, d), LeaseStep::Create);
        assert_eq!(
            step(Some(&lease("a", now - 1000, 15)), "a", now, d),
            LeaseStep::Renew
        );
        assert_eq!(
            step(Some(&lease("b", now - 1000, 15)), "a", now, d),
            LeaseStep::Wait { holder: "b".into() }
        );
        assert_eq!(
            step(Some(&lease("b", now - 15_001, 15)), "a", now, d),
            LeaseStep::TakeOver
        );
        assert_eq!(
            step(Some(&lease("", now, 15)), "a", now, d),
            LeaseStep::TakeOver
        );
        // A Lease object without a spec (holder unset) is free.
        assert_eq!(
            step(Some(&LeaseSpec::default()), "a", now, d),
            LeaseStep::TakeOver
        );
        // Expired on our own lease is still ours to renew.
        assert_eq!(
            step(Some(&lease("a", now - 60_000, 15)), "a", now, d),
            LeaseStep::Renew
        );
    }
}
