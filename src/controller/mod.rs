//! `tunnox controller`: reconciles HTTPDomainMapping resources into the mapping store and
//! TunnelSet credentials into the tunnel registry, with their status; elects one leader among
//! replicas, repairs drift, and serves `/metrics`, `/healthz`, `/readyz`.

pub mod access;
pub mod certificate;
pub mod cluster;
pub mod decide;
pub mod fleet;
pub mod issuer;
pub mod leader;
mod metrics;
mod reconcile;
pub mod restore;
pub mod resync;
pub mod served;
mod tunnelset;
pub mod tunnelset_decide;
pub mod tunnelset_ports;
mod waiters;

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::runtime::{Controller, reflector::ObjectRef};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};

use crate::config::Settings;
use crate::crd::{HTTPDomainMapping, TunnelSet};
use crate::observe::admin::{self, Health};
pub use metrics::Metrics;
pub use reconcile::{Ctx, FIELD_MANAGER, FINALIZER};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("mapping store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    ClusterIdentity(#[from] cluster::IdentityError),
    #[error("leader election stopped")]
    Election,
    #[error("cannot start the lease thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("api.listen {addr}: {source}")]
    ApiListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Publishes one Event about `about` (failures only logged: an Event is never worth a retry).
pub(crate) async fn publish_event(
    recorder: &Recorder,
    about: &k8s_openapi::api::core::v1::ObjectReference,
    action: &str,
    type_: kube::runtime::events::EventType,
    reason: &str,
    note: String,
) {
    let event = kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, about).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

fn identity(settings: &Settings) -> String {
    settings
        .config
        .controller
        .identity
        .clone()
        .unwrap_or_else(crate::observe::default_identity)
}

/// The egress policy targets are admitted under: the configured one, with the listeners the
/// configuration names as the proxies' own (their pod addresses are not known here; the proxy
/// checks its own again before it connects) and the controller's admin listener.
fn egress_policy(settings: &Settings) -> crate::domain::EgressPolicy {
    let c = &settings.config;
    let advertised = c
        .proxy
        .advertise_address
        .as_deref()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok());
    settings.egress.clone().with_own_listeners(
        [
            c.proxy.listen,
            c.proxy.admin_listen,
            c.controller.admin_listen,
        ]
        .into_iter()
        .chain(advertised)
        .chain(c.api.listen),
        [],
    )
}

/// How often the leader reads the node registry for the serving sets in status.
/// Objects per page of the initial list: no reconcile starts before the whole list is in, and
/// pages are fetched one after another (kube's default of 500 made 21 round trips for 10 401
/// mappings, each a read from etcd).
const LIST_PAGE: u32 = 5_000;
const FLEET_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Spawns a task the leader cannot do without (resync, the restorer): its end, a panic
/// included, stops the controller (which exits 1 and is restarted) rather than leaving it
/// leading without it.
fn essential(
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
    broken: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    use futures::FutureExt;
    tokio::spawn(async move {
        let ended = std::panic::AssertUnwindSafe(task).catch_unwind().await;
        tracing::error!(
            task = name,
            panicked = ended.is_err(),
            "essential task ended"
        );
        broken.notify_one();
    })
}

/// What the management API needs from the controller.
struct ApiParts<'a> {
    client: Client,
    cluster_id: String,
    store: Arc<dyn crate::store::MappingStore>,
    nodes: Arc<dyn crate::store::NodeRegistry>,
    cache: kube::runtime::reflector::Store<HTTPDomainMapping>,
    registry: &'a prometheus::Registry,
}

/// Binds `api.listen` and serves the management API on it (every replica, leading or not:
/// reads come from the store and the cache, writes go to the API server) until `stop`.
async fn serve_api(
    settings: &Settings,
    addr: std::net::SocketAddr,
    parts: ApiParts<'_>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    let api_cfg = &settings.config.api;
    let tls = api_cfg
        .tls
        .as_ref()
        .map(crate::api::tls_config)
        .transpose()
        .map_err(|e| RunError::Config(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::ApiListen { addr, source })?;
    let namespace = api_cfg
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into());
    tracing::info!(namespace = %namespace, "management API: mappings are created as HTTPDomainMapping resources here");
    let api = crate::api::Api {
        store: parts.store.clone(),
        nodes: parts.nodes,
        intent: Arc::new(crate::api::cluster::ClusterIntent::new(
            parts.client,
            namespace,
            parts.cluster_id,
            parts.cache,
            parts.store,
            api_cfg.wait.get(),
        )),
        tokens: Arc::new(crate::api::Tokens::new(settings.api_tokens.clone())),
        rules: Arc::new(crate::api::Rules {
            base_domains: settings.config.http_domain.base_domains.clone(),
            egress: egress_policy(settings),
            max_per_user: api_cfg.max_mappings_per_user,
        }),
        cache: None,
    };
    let router = crate::api::router(
        api,
        crate::api::ApiMetrics::new(parts.registry, "api_requests_total"),
    );
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        crate::api::serve(listener, router, tls, stop).await
    }))
}

/// Runs until SIGTERM/SIGINT. Standby replicas wait for the lease; the leader reconciles.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    let cfg = settings.config.controller.clone();
    let me = identity(&settings);
    let store_key = crate::cert::StoreKey::from_config(
        settings.config.http_domain.tls_store_key_file.as_deref(),
    )
    .map_err(RunError::Config)?;
    let client = Client::try_default().await?;
    let cluster_id = cluster::identity(&client, cfg.cluster_id.as_deref()).await?;
    tracing::info!(cluster_id = %cluster_id, "cluster identity (record sources are k8s:<cluster>/<namespace>/<name>)");
    let crate::store::Stores {
        mappings: store,
        sessions: registry,
        ports,
        challenges,
        nodes,
    } = crate::store::open_all(settings.store_backend(&me)).await?;
    let metrics = Metrics::new();
    let health = Health::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let admin = admin::serve(
        cfg.admin_listen,
        metrics.registry.clone(),
        health.clone(),
        shutdown,
    )
    .await
    .map_err(|source| RunError::Admin {
        addr: cfg.admin_listen,
        source,
    })?;

    // The mappings' cache runs on every replica, leading or not: a standby takes over with a
    // warm cache (no first list of every mapping), and the management API reads it on any
    // replica. While this replica leads, every change to a mapping is a reconcile request.
    let broken = Arc::new(tokio::sync::Notify::new());
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<ObjectRef<HTTPDomainMapping>>();
    let waiters = Arc::new(waiters::Waiters::default());
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reader, writer) = kube::runtime::reflector::store();
    let mapping_cache = {
        use kube::runtime::WatchStreamExt;
        let waiters = waiters.clone();
        let (leading, wake) = (leading.clone(), wake_tx.clone());
        let events = kube::runtime::reflector(
            writer,
            watcher(
                Api::<HTTPDomainMapping>::all(client.clone()),
                watcher::Config::default().page_size(LIST_PAGE),
            )
            .default_backoff()
            // Nothing here reads managedFields: not kept for every mapping on every replica.
            .modify(|m| kube::ResourceExt::managed_fields_mut(m).clear()),
        )
        .inspect(move |event| {
            if let Ok(event) = event {
                waiters.observe(event);
            }
        })
        .applied_objects();
        essential(
            "mapping cache",
            events.for_each(move |obj| {
                match obj {
                    Ok(obj) if leading.load(std::sync::atomic::Ordering::SeqCst) => {
                        let _ = wake.send(ObjectRef::from_obj(&obj));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "watching HTTPDomainMappings"),
                }
                futures::future::ready(())
            }),
            broken.clone(),
        )
    };
    // Ready once the cache holds every mapping: the API answers from it, and a standby is then
    // one that can take over at once.
    {
        let (reader, health) = (reader.clone(), health.clone());
        tokio::spawn(async move {
            if reader.wait_until_ready().await.is_ok() {
                health.set_ready(true);
            }
        });
    }
    let api_server = match &settings.config.api.listen {
        None => None,
        Some(addr) => Some(
            serve_api(
                &settings,
                *addr,
                ApiParts {
                    client: client.clone(),
                    cluster_id: cluster_id.clone(),
                    store: store.clone(),
                    nodes: nodes.clone(),
                    cache: reader.clone(),
                    registry: &metrics.registry,
                },
                stop_rx.clone(),
            )
            .await?,
        ),
    };

    let (lead_tx, mut lead_rx) = watch::channel(false);
    let lease = leader::LeaseConfig {
        namespace: cfg
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into()),
        name: cfg.lease_name.clone(),
        identity: me.clone(),
        duration: cfg.lease_duration.get(),
        renew: cfg.renew_interval.get(),
    };
    tracing::info!(identity = %me, lease = %lease.name, namespace = %lease.namespace, "waiting for leadership");
    let election = leader::Election::spawn(lease.clone(), lead_tx).map_err(RunError::Thread)?;

    let mut signal = Box::pin(crate::observe::shutdown_signal());
    // Standby until we lead (or are told to stop).
    tokio::select! {
        led = lead_rx.wait_for(|l| *l) => {
            if led.is_err() {
                let _ = stop_tx.send(true);
                let _ = admin.await;
                return Err(RunError::Election);
            }
        }
        _ = &mut signal => {
            election.stop().await;
            let _ = stop_tx.send(true);
            let _ = admin.await;
            if let Some(api) = api_server {
                let _ = api.await;
            }
            return Ok(());
        }
        _ = broken.notified() => {
            tracing::error!("the mappings' cache stopped while standing by; stopping");
            election.stop().await;
            let _ = stop_tx.send(true);
            let _ = admin.await;
            std::process::exit(1);
        }
    }
    metrics.leader.set(1);
    tracing::info!(identity = %me, "leading: reconciling HTTPDomainMapping and TunnelSet");

    // Every mapping once (the cache complete), then each change as the cache sees it. Set
    // before the snapshot: a change in between is requested twice, never missed.
    leading.store(true, std::sync::atomic::Ordering::SeqCst);
    {
        let (reader, wake) = (reader.clone(), wake_tx.clone());
        tokio::spawn(async move {
            if reader.wait_until_ready().await.is_ok() {
                for m in reader.state() {
                    let _ = wake.send(ObjectRef::from_obj(&*m));
                }
            }
        });
    }
    let controller = Controller::for_stream(
        futures::stream::pending::<Result<HTTPDomainMapping, watcher::Error>>(),
        reader,
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(cfg.concurrency.max(1)));
    let ts_controller = Controller::new(
        Api::<TunnelSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(cfg.concurrency.max(1)));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tunnox-controller".into(),
            instance: Some(me.clone()),
        },
    );
    let (ts_wake_tx, mut ts_wake_rx) = mpsc::unbounded_channel::<ObjectRef<TunnelSet>>();
    let fleet_view = Arc::new(fleet::Fleet::default());
    let ts_ctx = Arc::new(tunnelset::TsCtx {
        fleet: fleet_view.clone(),
        client: client.clone(),
        registry: registry.clone(),
        cache: ts_controller.store(),
        mappings: controller.store(),
        wake_mappings: wake_tx.clone(),
        wake: ts_wake_tx,
        cluster_id: cluster_id.clone(),
        metrics: metrics.clone(),
        recorder: recorder.clone(),
        recheck: cfg.resync_interval.get(),
        ports,
        port_range: (cfg.remote_port_range[0], cfg.remote_port_range[1]),
        service: cfg.tunnel_service.enabled.then(|| {
            (
                cfg.tunnel_service.clone(),
                std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into()),
            )
        }),
        groups_seen: Default::default(),
    });
    let issuer = cfg.acme.clone().map(|acme| {
        let namespace = acme
            .namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        tracing::info!(directory = %acme.directory_url, namespace = %namespace, "ACME: certificates for spec.tls.mode acme are ordered here");
        Arc::new(issuer::Issuer::new(issuer::IssuerParts {
            cfg: acme,
            namespace,
            client: client.clone(),
            challenges: challenges.clone(),
            mappings: store.clone(),
            wake: wake_tx.clone(),
            recorder: recorder.clone(),
            metrics: metrics.clone(),
        }))
    });
    let served = Arc::new(served::Served::new(wake_tx.clone(), &metrics.registry));
    // Proxies announce each version they apply: `Ready` follows within milliseconds.
    let applied_watch = nodes.applied_events().map(|mut events| {
        let served = served.clone();
        tokio::spawn(async move {
            while let Some(a) = events.recv().await {
                served.observe(&a);
            }
        })
    });
    let ctx = Arc::new(Ctx {
        issuer,
        client: client.clone(),
        store,
        registry,
        cache: controller.store(),
        tunnelsets: ts_ctx.cache.clone(),
        store_key: store_key.clone(),
        tls_recheck: cfg.tls_recheck_interval.get(),
        policy: decide::Policy {
            base_domains: settings.config.http_domain.base_domains.clone(),
            per_namespace: cfg.quota.per_namespace,
            per_owner: cfg.quota.per_owner,
            egress: egress_policy(&settings),
            cluster_id,
        },
        metrics: metrics.clone(),
        recorder,
        wake: wake_tx,
        resync_interval: cfg.resync_interval.get(),
        conflict_retry: cfg.conflict_retry.get(),
        legacy_orphans: Default::default(),
        fleet: fleet_view,
        served: served.clone(),
        restorer: Default::default(),
        waiters,
    });
    let resync = essential(
        "resync",
        resync::run(ctx.clone(), me.clone()),
        broken.clone(),
    );
    let restorer = essential(
        "restorer",
        ctx.restorer.clone().run(
            ctx.store.clone(),
            ctx.cache.clone(),
            ctx.wake.clone(),
            metrics.clone(),
        ),
        broken.clone(),
    );
    // A set gaining or losing its last healthy proxy shows in the placed mappings' status.
    let fleet_watch = tokio::spawn(fleet::follow(
        ctx.fleet.clone(),
        nodes,
        ctx.store.clone(),
        served,
        FLEET_EVERY,
        {
            let (ctx, ts_ctx) = (ctx.clone(), ts_ctx.clone());
            // Only the resources whose serving set moved.
            move |before: Option<&[crate::domain::SetName]>, after: &[crate::domain::SetName]| {
                for m in ctx.cache.state() {
                    let set = m.status.as_ref().and_then(|s| s.set.as_deref());
                    if fleet::serving_changed(set, before, after) {
                        let _ = ctx.wake.send(ObjectRef::from_obj(&*m));
                    }
                }
                for ts in ts_ctx.cache.state() {
                    let set = ts.status.as_ref().and_then(|s| s.set.as_deref());
                    if fleet::serving_changed(set, before, after) {
                        let _ = ts_ctx.wake.send(ObjectRef::from_obj(&*ts));
                    }
                }
            }
        },
        stop_rx.clone(),
    ));
    let wake = futures::stream::poll_fn(move |cx| wake_rx.poll_recv(cx));
    // An agent connecting or leaving (announced by its proxy) shows in its TunnelSet's status
    // at once, not at the next resync.
    let session_watch = ts_ctx.registry.session_events().map(|mut events| {
        let cache = ts_ctx.cache.clone();
        let wake = ts_ctx.wake.clone();
        tokio::spawn(async move {
            while let Some(client) = events.recv().await {
                for ts in cache.state() {
                    if ts.spec.client_id == client {
                        let _ = wake.send(ObjectRef::from_obj(&*ts));
                    }
                }
            }
        })
    });
    let ts_wake = futures::stream::poll_fn(move |cx| ts_wake_rx.poll_recv(cx));
    // Both controllers stop together, on a signal or when leadership is lost.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    // Set when the process must exit 1: the lease lost, or an essential task ended.
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let graceful = {
        let mut lead = lead_rx.clone();
        let failed = failed.clone();
        async move {
            tokio::select! {
                _ = signal => tracing::info!("shutting down"),
                _ = lead.wait_for(|l| !*l) => {
                    tracing::warn!("lost leadership; stopping");
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                _ = broken.notified() => {
                    tracing::error!("an essential task stopped; stopping");
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _ = stopping_tx.send(true);
        }
    };
    // In-flight reconciles may finish within a third of the lease (what a leader keeps in hand
    // before a contender may take over); then they are dropped. kube-runtime's graceful stop
    // alone can wait forever: reconciles are held until the first list is complete, and the
    // stop ends that list (seen in CI: a controller that neither led nor exited).
    let grace = (lease.duration / 3).max(std::time::Duration::from_secs(1));
    let overdue = {
        let mut rx = stopping_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        }
    };
    let ts_graceful = {
        let mut rx = stopping_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mappings = controller
        .reconcile_on(wake)
        .graceful_shutdown_on(graceful)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let tunnelsets = ts_controller
        .reconcile_on(ts_wake)
        .graceful_shutdown_on(ts_graceful)
        .run(tunnelset::reconcile, tunnelset::error_policy, ts_ctx)
        .for_each(|_| futures::future::ready(()));
    tokio::select! {
        _ = futures::future::join(mappings, tunnelsets) => {}
        _ = overdue => tracing::warn!(?grace, "reconciles still running after the grace period: dropped"),
    }
    resync.abort();
    restorer.abort();
    mapping_cache.abort();
    fleet_watch.abort();
    for watch in [session_watch, applied_watch].into_iter().flatten() {
        watch.abort();
    }
    // The lease is given up if held (also when it was won back during the stop): the successor
    // need not wait for it to expire.
    election.stop().await;
    metrics.leader.set(0);
    let _ = stop_tx.send(true);
    let _ = admin.await;
    // The API's requests in flight finish (bounded by its stop grace): a create settling its
    // resource is not cut off halfway.
    if let Some(api) = api_server {
        let _ = api.await;
    }
    if failed.load(std::sync::atomic::Ordering::Relaxed) {
        // Exiting lets the orchestrator restart us as a standby.
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod essential_tests {
    use super::*;
    use futures::FutureExt;

    /// An essential task that panics or returns is reported; one that runs is not.
    #[tokio::test]
    async fn the_end_of_an_essential_task_is_reported() {
        for task in [
            futures::future::ready(()).boxed(),
            async { panic!("broken") }.boxed(),
        ] {
            let broken = Arc::new(tokio::sync::Notify::new());
            let handle = essential("t", task, broken.clone());
            tokio::time::timeout(std::time::Duration::from_secs(5), broken.notified())
                .await
                .expect("reported");
            handle.await.expect("the wrapper itself never panics");
        }
        let broken = Arc::new(tokio::sync::Notify::new());
        let handle = essential("t", futures::future::pending(), broken.clone());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), broken.notified())
                .await
                .is_err()
        );
        handle.abort();
    }
}
