//! The backend probe and its verdict.
//!
//! A background task probes the backend on an interval (`GET /health`, which Chainlit ≥ 2.10
//! answers; a TCP connect when HTTP fails for another reason than a refused connection) and
//! caches the verdict: down only after 3 failures in a row, up after one success. Requests
//! read the cache; nothing probes per request.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::client::{Connector, connector, is_refused};
use crate::config::{BackendConfig, HealthConfig};

/// Failures in a row before the backend counts as down.
pub const FAILURES_TO_DOWN: u32 = 3;

#[derive(Debug, Clone, Default)]
struct ProbeRecord {
    latency_ms: Option<f64>,
    last_checked: Option<SystemTime>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// The cached verdict on the backend and what the last probes saw.
#[derive(Debug)]
pub struct BackendHealth {
    /// `true` once a probe succeeded, `false` after 3 failures in a row; `watch` so that
    /// `--backend-wait` can wait for it.
    reachable: watch::Sender<bool>,
    record: Mutex<ProbeRecord>,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth {
            reachable: watch::Sender::new(false),
            record: Mutex::new(ProbeRecord::default()),
        }
    }
}

impl BackendHealth {
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

    /// The `backend` object of the health document.
    pub fn report(&self, backend_url: &str) -> serde_json::Value {
        let record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let last_checked = record
            .last_checked
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        json!({
            "url": backend_url,
            "reachable": self.is_reachable(),
            "latency_ms": record.latency_ms,
            "last_checked": last_checked,
            "consecutive_failures": record.consecutive_failures,
            "last_error": record.last_error,
        })
    }
}

/// Probes the backend until told to stop.
pub struct BackendProbe {
    client: Client<Connector, Empty<Bytes>>,
    url: http::Uri,
    host: String,
    port: u16,
    timeout: Duration,
    interval: Duration,
}

impl BackendProbe {
    pub fn new(backend: &BackendConfig, health: &HealthConfig) -> Self {
        // No pooling: each probe should prove that a new connection can be made.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector(backend));
        let url = http::Uri::builder()
            .scheme(backend.url.scheme.clone())
            .authority(backend.url.authority.clone())
            .path_and_query(health.path.as_str())
            .build()
            .unwrap_or_default();
        BackendProbe {
            client,
            url,
            host: backend.url.host.clone(),
            port: backend.url.port,
            timeout: health.timeout,
            interval: health.interval,
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
            Ok(Err(e)) if is_refused(&e) => Err("connection refused".into()),
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

    /// Probes on the interval, folding each outcome into `health`, until `stop`.
    pub async fn watch(
        self,
        health: std::sync::Arc<BackendHealth>,
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
            health.record(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_three_failures_up_after_one_success() {
        let health = BackendHealth::default();
        assert!(!health.is_reachable());
        health.record(Ok(Duration::from_millis(2)));
        assert!(health.is_reachable());
        health.record(Err("refused".into()));
        health.record(Err("refused".into()));
        assert!(health.is_reachable(), "two failures are not enough");
        health.record(Err("refused".into()));
        assert!(!health.is_reachable());
        health.record(Ok(Duration::from_millis(1)));
        assert!(health.is_reachable());
    }

    #[test]
    fn report_shows_the_last_probe() {
        let health = BackendHealth::default();
        assert_eq!(health.report("http://127.0.0.1:8080")["reachable"], false);
        health.record(Ok(Duration::from_micros(1500)));
        let report = health.report("http://127.0.0.1:8080");
        assert_eq!(report["reachable"], true);
        assert_eq!(report["latency_ms"], 1.5);
        assert!(report["last_checked"].is_string());
        assert_eq!(report["url"], "http://127.0.0.1:8080");
    }
}
