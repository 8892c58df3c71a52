//! The backend probe and the `/monitor/health` document.
//!
//! A background task probes the backend on an interval (`GET /health`, which Chainlit ≥ 2.10
//! answers; a TCP connect when HTTP fails for another reason than a refused connection) and
//! caches the verdict: down only after 3 failures in a row, up after one success. Requests
//! read the cache; nothing probes per request.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::proxy::client::{Connector, connector};

/// Failures in a row before the backend counts as down.
pub const FAILURES_TO_DOWN: u32 = 3;

#[derive(Debug, Clone, Default)]
struct ProbeRecord {
    latency_ms: Option<f64>,
    last_checked: Option<SystemTime>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// The cached verdict, plus live counters for the health document.
#[derive(Debug)]
pub struct BackendState {
    /// `true` once a probe succeeded, `false` after 3 failures in a row; `watch` so that
    /// `--backend-wait` can wait for it.
    reachable: watch::Sender<bool>,
    record: Mutex<ProbeRecord>,
    started: Instant,
    draining: AtomicBool,
    pub client_connections: AtomicUsize,
    pub websocket_relays: AtomicUsize,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            reachable: watch::Sender::new(false),
            record: Mutex::new(ProbeRecord::default()),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            client_connections: AtomicUsize::new(0),
            websocket_relays: AtomicUsize::new(0),
        }
    }
}

impl BackendState {
    pub fn is_reachable(&self) -> bool {
        *self.reachable.borrow()
    }

    /// Latency of the last successful probe, while the backend counts as reachable.
    pub fn latency_ms(&self) -> Option<f64> {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latency_ms
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Folds one probe's outcome into the verdict.
    pub fn record(&self, outcome: Result<Duration, String>) {
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        record.last_checked = Some(SystemTime::now());
        match outcome {
            Ok(latency) => {
                record.latency_ms = Some((latency.as_secs_f64() * 1e6).round() / 1e3);
                record.consecutive_failures = 0;
                record.last_error = None;
                self.reachable
                    .send_if_modified(|up| !std::mem::replace(up, true));
            }
            Err(error) => {
                record.consecutive_failures = record.consecutive_failures.saturating_add(1);
                if record.consecutive_failures >= FAILURES_TO_DOWN {
                    record.latency_ms = None;
                    self.reachable
                        .send_if_modified(|up| std::mem::replace(up, false));
                }
                if record.last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(
                        error,
                        failures = record.consecutive_failures,
                        "backend probe failed"
                    );
                }
                record.last_error = Some(error);
            }
        }
    }

    /// The health document and its status: 200 when the backend is reachable and we are not
    /// draining, 503 otherwise.
    pub fn document(&self, backend_url: &str) -> (StatusCode, serde_json::Value) {
        let record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let reachable = self.is_reachable();
        let draining = self.is_draining();
        let (status, code) = match (draining, reachable) {
            (true, _) => ("draining", StatusCode::SERVICE_UNAVAILABLE),
            (false, true) => ("ok", StatusCode::OK),
            (false, false) => ("unavailable", StatusCode::SERVICE_UNAVAILABLE),
        };
        let last_checked = record
            .last_checked
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        let doc = json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "backend": {
                "url": backend_url,
                "reachable": reachable,
                "latency_ms": record.latency_ms,
                "last_checked": last_checked,
                "consecutive_failures": record.consecutive_failures,
                "last_error": record.last_error,
            },
            "connections": {
                "clients": self.client_connections.load(Ordering::Relaxed),
                "websockets": self.websocket_relays.load(Ordering::Relaxed),
            },
        });
        (code, doc)
    }
}

/// Probes the backend until `stop` resolves.
pub struct BackendProbe {
    client: Client<Connector, Empty<Bytes>>,
    url: http::Uri,
    host: String,
    port: u16,
    timeout: Duration,
    interval: Duration,
}

impl BackendProbe {
    pub fn new(config: &Config) -> Self {
        // No pooling: each probe should prove that a new connection can be made.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector(config));
        let url = http::Uri::builder()
            .scheme(config.backend.scheme.clone())
            .authority(config.backend.authority.clone())
            .path_and_query(config.health_path.as_str())
            .build()
            .unwrap_or_default();
        BackendProbe {
            client,
            url,
            host: config.backend.host.clone(),
            port: config.backend.port,
            timeout: config.health_timeout,
            interval: config.health_interval,
        }
    }

    /// Runs one probe: `Ok(latency)` when the backend answered.
    pub async fn probe_once(&self) -> Result<Duration, String> {
        let started = Instant::now();
        let request = Request::get(self.url.clone())
            .header(http::header::USER_AGENT, "chatgate-probe")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) if response.status().is_server_error() => {
                Err(format!("backend health answered {}", response.status()))
            }
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) if crate::proxy::client::is_refused(&e) => Err("connection refused".into()),
            // No answer in time: a wedged backend still completes TCP handshakes from its
            // listen backlog, so a timeout is a failure, never a reason to try TCP.
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            // Not HTTP: a TCP connect still tells whether it is there.
            Ok(Err(_)) => self.tcp_probe(started).await,
        }
    }

    async fn tcp_probe(&self, started: Instant) -> Result<Duration, String> {
        let remaining = self.timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(
            remaining.max(Duration::from_millis(100)),
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(format!("tcp connect: {e}")),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    pub async fn run(
        self,
        state: std::sync::Arc<BackendState>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let outcome = self.probe_once().await;
            state.record(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_three_failures_up_after_one_success() {
        let state = BackendState::default();
        assert!(!state.is_reachable());
        state.record(Ok(Duration::from_millis(2)));
        assert!(state.is_reachable());
        state.record(Err("refused".into()));
        state.record(Err("refused".into()));
        assert!(state.is_reachable(), "two failures are not enough");
        state.record(Err("refused".into()));
        assert!(!state.is_reachable());
        state.record(Ok(Duration::from_millis(1)));
        assert!(state.is_reachable());
    }

    #[test]
    fn document_reports_state_and_draining() {
        let state = BackendState::default();
        let (code, doc) = state.document("http://127.0.0.1:8080");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(doc["status"], "unavailable");
        state.record(Ok(Duration::from_micros(1500)));
        let (code, doc) = state.document("http://127.0.0.1:8080");
        assert_eq!(code, StatusCode::OK);
        assert_eq!(doc["backend"]["reachable"], true);
        assert_eq!(doc["backend"]["latency_ms"], 1.5);
        assert!(doc["backend"]["last_checked"].is_string());
        state.set_draining();
        let (code, doc) = state.document("http://127.0.0.1:8080");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(doc["status"], "draining");
    }
}
