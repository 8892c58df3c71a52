//! The shared state: handles built once at start-up and read by every connection. No
//! request logic lives here; the pipeline is in `gateway.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::asset_cache::AssetCache;
use crate::backend::client::tls_config;
use crate::backend::health::BackendProbe;
use crate::backend::pool::{WorkerMetrics, Workers};
use crate::backend::supervisor::Supervisor;
use crate::chat::Chat;
use crate::chat::limits::{ChatLimits, Refusal};
use crate::config::Config;
use crate::limits::{LimitClass, RateLimits};
use crate::metrics::{Gauges, Metrics};
use crate::shutdown::Shutdown;

/// Everything a request handler needs, shared by all connections.
pub struct Gateway {
    pub config: Config,
    /// TLS for the WebSocket leg to an `https://` backend.
    pub tls: Arc<rustls::ClientConfig>,
    /// The backend's workers (one, unless several run): their health, load and affinity.
    pub workers: Arc<Workers>,
    /// What chatgate carries right now.
    pub load: Arc<ProxyLoad>,
    /// Cancelled on shutdown: connections drain, relays close with 1001.
    pub shutdown: Shutdown,
    /// Client connections and WebSocket relays, waited for on shutdown.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    pub limits: RateLimits,
    /// The chat-aware edge's limits and counts, shared by every relay.
    pub chat: Arc<Chat>,
    /// One permit per open client connection or relay (`--max-connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// [`PROBE_RESERVE`] more, for connections that may only ask the probe routes.
    pub probe_slots: Arc<tokio::sync::Semaphore>,
    /// Content-hashed static files served from memory (`--asset-cache-*`).
    pub asset_cache: AssetCache,
    started: Instant,
    draining: AtomicBool,
}

/// Connection slots beyond `--max-connections` that serve only `/monitor/live` and
/// `/monitor/health` (anything else gets 503 and the connection closes): a replica busy
/// at its limit still answers its platform's probes truly, instead of failing them and
/// being restarted for being busy. Each such connection serves one request. Sixteen
/// covers the probes of any platform (a few per period) with room for retries; it is not
/// a defence against a flood aimed at the probe routes, which the platform's ingress sees
/// first.
pub const PROBE_RESERVE: usize = 16;

/// Live counts of what chatgate carries, for the health document and the gauges.
#[derive(Debug, Default)]
pub struct ProxyLoad {
    pub client_connections: AtomicUsize,
    pub websocket_relays: AtomicUsize,
}

impl ProxyLoad {
    /// Counts an open client connection until the returned guard is dropped.
    pub fn client_connection(self: &Arc<Self>) -> LoadGuard {
        LoadGuard::new(Arc::clone(self), |load| &load.client_connections)
    }

    /// Counts an open WebSocket relay until the returned guard is dropped.
    pub fn websocket_relay(self: &Arc<Self>) -> LoadGuard {
        LoadGuard::new(Arc::clone(self), |load| &load.websocket_relays)
    }
}

/// One unit of [`ProxyLoad`], given back when dropped.
pub struct LoadGuard {
    load: Arc<ProxyLoad>,
    counter: fn(&ProxyLoad) -> &AtomicUsize,
}

impl LoadGuard {
    fn new(load: Arc<ProxyLoad>, counter: fn(&ProxyLoad) -> &AtomicUsize) -> LoadGuard {
        counter(&load).fetch_add(1, Ordering::Relaxed);
        LoadGuard { load, counter }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        (self.counter)(&self.load).fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        let limits = RateLimits::new(
            config.limits.rate_http,
            config.limits.rate_websocket,
            config.limits.rate_engineio,
            config.limits.rate_ipv6_prefix,
        );
        let metrics = Arc::new(Metrics::new().with_chat_workers(config.worker_urls().len()));
        metrics.declare_rate_limit_classes(&LimitClass::ALL.map(LimitClass::label));
        metrics.declare_chat_refusal_reasons(&Refusal::LABELS);
        let chat = Arc::new(Chat {
            observe: config.chat.observe,
            limits: ChatLimits::new(
                config.chat.rate_limit,
                config.chat.max_answers_per_session,
                config.chat.max_answers,
            ),
            metrics: Arc::clone(&metrics),
            polling: Default::default(),
        });
        let connection_slots = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
        let workers = Workers::new(
            &config.backend,
            config.worker_urls(),
            config.workers.affinity.clone(),
            |index| {
                let handles = metrics.worker(index);
                let worker = WorkerMetrics {
                    relays: Some(handles.relays),
                    requests: Some(handles.requests),
                    restarts: Some(handles.restarts),
                };
                (worker, Some(handles.up))
            },
        );
        Gateway {
            asset_cache: AssetCache::new(&config.asset_cache, metrics.asset_cache.clone()),
            tls: Arc::new(tls_config()),
            config,
            workers: Arc::new(workers),
            load: Arc::new(ProxyLoad::default()),
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
            metrics,
            limits,
            chat,
            connection_slots,
            probe_slots: Arc::new(tokio::sync::Semaphore::new(PROBE_RESERVE)),
            started: Instant::now(),
            draining: AtomicBool::new(false),
        }
    }

    /// From now on readiness answers 503 and new WebSockets are refused.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The gauges' values right now.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            client_connections: self.load.client_connections.load(Ordering::Relaxed),
            websocket_relays: self.load.websocket_relays.load(Ordering::Relaxed),
            backend_up: self.workers.any_reachable(),
            probe_latency_ms: self.workers.first().health.latency_ms(),
        }
    }

    /// Starts what runs beside the requests: a probe per worker, the supervised workers
    /// (when chatgate starts them), the sweep of the session table.
    pub fn start_backends(&self) -> BackendTasks {
        let stop = CancellationToken::new();
        for worker in self.workers.all() {
            let probe = BackendProbe::new(&worker.backend, &self.config.health);
            tokio::spawn(probe.watch(Arc::clone(&worker.health), stop.clone()));
        }
        let supervisor = self.config.workers.supervised.as_ref().and_then(|config| {
            Supervisor::start(config, self.workers.all())
                .map_err(|e| tracing::error!(error = %e, "cannot start the workers"))
                .ok()
        });
        if self.workers.several() {
            let workers = Arc::clone(&self.workers);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(std::time::Duration::from_secs(15));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = ticker.tick() => workers.sessions.sweep(),
                    }
                }
            });
        }
        BackendTasks { stop, supervisor }
    }
}

/// The background work of [`Gateway::start_backends`].
pub struct BackendTasks {
    stop: CancellationToken,
    supervisor: Option<Supervisor>,
}

impl BackendTasks {
    /// Stops the supervised workers (after chatgate's own drain) and the probes.
    pub async fn stop(self) {
        if let Some(supervisor) = self.supervisor {
            supervisor.stop().await;
        }
        self.stop.cancel();
    }
}
