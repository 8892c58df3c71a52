//! The backend probe and its verdict.
//!
//! A background task probes the backend (`GET /health`, which Chainlit ≥ 2.10 answers; a TCP
//! connect when HTTP fails for another reason than a refused connection) and caches the
//! verdict: down only after 3 failures in a row, up after one success. Real requests feed the
//! same verdict passively: any answer the backend produced itself counts as a success, a
//! refused connection as a failure. Nothing probes per request.
//!
//! The probe runs every `--health-interval` while the backend is up and settled; while it is
//! down, unknown or has just failed, every 0.5 s for the first 30 s (a Chainlit cold start),
//! then backing off to the interval, so that readiness follows a backend that starts late
//! (or dies) within about a second.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::backend::client::{Connector, connector, is_refused};
use crate::config::{BackendConfig, HealthConfig};

/// Failures in a row before the backend counts as down.
pub const FAILURES_TO_DOWN: u32 = 3;
/// The probe's quickest pace, while the backend is down or unknown.
pub const QUICK_PROBE: Duration = Duration::from_millis(500);
/// Quick probes before backing off: 30 s of them, a slow Chainlit cold start.
const QUICK_PROBES: u32 = 60;
/// Probes that a burst of refused requests (or a worker's exit) triggers are at least this
/// far apart: those requests already count as failures, the probe only has to notice the
/// backend's return at the quick pace.
const WAKE_SPACING: Duration = QUICK_PROBE;

#[derive(Debug, Clone, Default)]
struct ProbeRecord {
    latency_ms: Option<f64>,
    last_checked: Option<SystemTime>,
    last_error: Option<String>,
}

/// The cached verdict on one backend and what the last probes saw.
///
/// The request path reads and feeds it through atomics only: a success on a healthy backend
/// costs two loads, no lock.
#[derive(Debug)]
pub struct BackendHealth {
    /// The verdict: `true` once something succeeded, `false` after 3 failures in a row.
    reachable: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Failures ever (probe or request): an answer to a request sent before the latest
    /// failure proves nothing about now (a dying backend still answers its last requests).
    failures_seen: AtomicU64,
    /// The last real connection attempt was refused: nothing listens right now. Routing
    /// avoids the backend at once, without waiting for the verdict.
    refusing: AtomicBool,
    /// The verdict again, for `--backend-wait` to wait on.
    verdict: watch::Sender<bool>,
    record: Mutex<ProbeRecord>,
    /// Wakes the probe for a quick look (after a refused request, or a worker's exit).
    wake: Notify,
    /// `chatgate_worker_up` of this backend, when it is one of several.
    up_gauge: Option<metrics::Gauge>,
    /// The worker index, for log lines, when it is one of several.
    worker: Option<usize>,
}

impl Default for BackendHealth {
    fn default() -> Self {
        BackendHealth::new(None, None)
    }
}

impl BackendHealth {
    pub fn new(worker: Option<usize>, up_gauge: Option<metrics::Gauge>) -> BackendHealth {
        BackendHealth {
            reachable: AtomicBool::new(false),
            consecutive_failures: AtomicU32::new(0),
            failures_seen: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            verdict: watch::Sender::new(false),
            record: Mutex::new(ProbeRecord::default()),
            wake: Notify::new(),
            up_gauge,
            worker,
        }
    }

    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Whether new work should go here: reachable, and the last attempt was not refused.
    pub fn is_usable(&self) -> bool {
        self.is_reachable() && !self.refusing.load(Ordering::Relaxed)
    }

    /// Whether the last real attempt found nothing listening.
    pub fn is_refusing(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Latency of the last successful probe, while the backend counts as reachable.
    pub fn latency_ms(&self) -> Option<f64> {
        self.lock().latency_ms
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.verdict.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProbeRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_verdict(&self, up: bool) {
        if self.reachable.swap(up, Ordering::SeqCst) != up {
            if let Some(gauge) = &self.up_gauge {
                gauge.set(if up { 1.0 } else { 0.0 });
            }
            if up {
                tracing::info!(worker = self.worker, "backend reachable");
            } else {
                tracing::warn!(worker = self.worker, "backend down");
            }
        }
        self.verdict
            .send_if_modified(|v| std::mem::replace(v, up) != up);
    }

    /// Folds one probe's outcome into the verdict.
    pub fn record(&self, outcome: Result<Duration, String>) {
        let mut record = self.lock();
        record.last_checked = Some(SystemTime::now());
        match outcome {
            Ok(latency) => {
                record.latency_ms = Some((latency.as_secs_f64() * 1e6).round() / 1e3);
                record.last_error = None;
                drop(record);
                self.succeeded();
            }
            Err(error) => {
                let failures = self.failed();
                if failures >= FAILURES_TO_DOWN {
                    record.latency_ms = None;
                }
                if record.last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(
                        worker = self.worker,
                        error,
                        failures,
                        "backend probe failed"
                    );
                }
                record.last_error = Some(error);
            }
        }
    }

    fn succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.refusing.store(false, Ordering::Relaxed);
        self.set_verdict(true);
    }

    /// One more failure in a row; the backend is down from the third. Returns the count.
    fn failed(&self) -> u32 {
        self.failures_seen.fetch_add(1, Ordering::SeqCst);
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= FAILURES_TO_DOWN {
            self.set_verdict(false);
        }
        failures
    }

    /// Where the failures stand, read before a request is sent: see [`Self::passive_success`].
    pub fn epoch(&self) -> u64 {
        self.failures_seen.load(Ordering::SeqCst)
    }

    /// A real request sent at `epoch` got an answer the backend produced itself (any
    /// status): it is there, unless something failed since the request went out.
    pub fn passive_success(&self, epoch: u64) {
        // The usual case, a healthy backend, costs two loads.
        if self.consecutive_failures.load(Ordering::Relaxed) == 0 && self.is_usable() {
            return;
        }
        if self.epoch() != epoch {
            return;
        }
        let recovered = !self.is_reachable();
        self.succeeded();
        if recovered {
            let mut record = self.lock();
            record.last_error = None;
            tracing::info!(worker = self.worker, "backend answers a request: reachable");
        }
    }

    /// A real request's connection was refused: nothing listens. Counts as a failure of the
    /// verdict (down after 3 in a row, before the next probe tick) and takes the backend out
    /// of routing at once; the probe is woken to look again soon.
    pub fn passive_refused(&self) {
        let first = !self.refusing.swap(true, Ordering::Relaxed);
        let failures = self.failed();
        if first {
            tracing::warn!(
                worker = self.worker,
                failures,
                "backend refused a request's connection"
            );
            let mut record = self.lock();
            record.last_error = Some("connection refused (request)".into());
        }
        self.wake.notify_one();
    }

    /// The supervised process behind this backend exited: down at once.
    pub fn mark_exited(&self, why: String) {
        self.failures_seen.fetch_add(1, Ordering::SeqCst);
        self.refusing.store(true, Ordering::Relaxed);
        self.consecutive_failures
            .fetch_max(FAILURES_TO_DOWN, Ordering::Relaxed);
        self.set_verdict(false);
        let mut record = self.lock();
        record.latency_ms = None;
        record.last_error = Some(why);
        drop(record);
        self.wake.notify_one();
    }

    /// Whether the probe may relax to its full interval: up, and nothing failed since.
    fn settled(&self) -> bool {
        self.is_usable() && self.consecutive_failures() == 0
    }

    /// The `backend` object of the health document.
    pub fn report(&self, backend_url: &str) -> serde_json::Value {
        let record = self.lock().clone();
        let last_checked = record
            .last_checked
            .map(|t| humantime::format_rfc3339_millis(t).to_string());
        json!({
            "url": backend_url,
            "reachable": self.is_reachable(),
            "latency_ms": record.latency_ms,
            "last_checked": last_checked,
            "consecutive_failures": self.consecutive_failures(),
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

    /// Probes at once, then on the pace [`next_probe_delay`] sets, folding each outcome into
    /// `health`, until `stop`. A wake (a refused request, a worker's exit) probes early.
    pub async fn watch(
        self,
        health: std::sync::Arc<BackendHealth>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut pace = QuickPace::default();
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.probe_once() => outcome,
            };
            health.record(outcome);
            let probed = Instant::now();
            let delay = next_probe_delay(health.settled(), &mut pace, self.interval);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = health.wake.notified() => {
                    // Look again soon, from the quick pace.
                    pace = QuickPace::default();
                    tokio::time::sleep_until(probed + WAKE_SPACING).await;
                }
            }
        }
    }
}

/// The pace of a backend that is not settled: how many probes found it so in a row, and the
/// last delay once backing off.
#[derive(Debug, Default)]
pub struct QuickPace {
    probes: u32,
    backoff: Option<Duration>,
}

/// How long until the next probe: the full `interval` while the backend is settled; else
/// 0.5 s for [`QUICK_PROBES`] probes, then doubling up to `interval`.
pub fn next_probe_delay(settled: bool, pace: &mut QuickPace, interval: Duration) -> Duration {
    if settled {
        *pace = QuickPace::default();
        return interval;
    }
    pace.probes = pace.probes.saturating_add(1);
    let delay = if pace.probes <= QUICK_PROBES {
        QUICK_PROBE
    } else {
        pace.backoff.map_or(QUICK_PROBE, |d| d.saturating_mul(2))
    };
    let delay = delay.min(interval);
    if pace.probes > QUICK_PROBES {
        pace.backoff = Some(delay);
    }
    delay
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

    #[test]
    fn real_answers_and_refusals_feed_the_verdict() {
        let health = BackendHealth::default();
        health.passive_success(health.epoch());
        assert!(health.is_reachable(), "an answer proves it is there");
        health.passive_refused();
        assert!(health.is_reachable(), "one refusal is not down");
        assert!(!health.is_usable(), "but routing avoids it at once");
        health.passive_refused();
        health.passive_refused();
        assert!(!health.is_reachable(), "three refusals in a row are down");
        let sent = health.epoch() - 1;
        health.passive_success(sent);
        assert!(
            !health.is_reachable(),
            "an answer to a request sent before the last failure proves nothing"
        );
        health.passive_success(health.epoch());
        assert!(health.is_usable());
        assert_eq!(health.consecutive_failures(), 0);
    }

    #[test]
    fn an_exited_worker_is_down_at_once() {
        let health = BackendHealth::default();
        health.record(Ok(Duration::from_millis(1)));
        health.mark_exited("exited with status 9".into());
        assert!(!health.is_reachable());
        assert_eq!(
            health.report("x")["last_error"],
            "exited with status 9",
            "the report says why"
        );
    }

    #[test]
    fn probes_are_quick_while_unsettled_and_back_off_to_the_interval() {
        let interval = Duration::from_secs(5);
        let mut pace = QuickPace::default();
        let delays: Vec<_> = (0..QUICK_PROBES + 5)
            .map(|_| next_probe_delay(false, &mut pace, interval))
            .collect();
        let quick = QUICK_PROBES as usize;
        assert!(
            delays[..quick].iter().all(|d| *d == QUICK_PROBE),
            "every 0.5 s through a cold start"
        );
        assert_eq!(
            delays[quick..],
            [0.5, 1.0, 2.0, 4.0, 5.0].map(Duration::from_secs_f64),
            "then backing off to the interval"
        );
        assert_eq!(next_probe_delay(true, &mut pace, interval), interval);
        assert_eq!(
            next_probe_delay(false, &mut pace, interval),
            QUICK_PROBE,
            "quick again after it settled once"
        );
        let mut pace = QuickPace::default();
        let short = Duration::from_millis(200);
        assert_eq!(next_probe_delay(false, &mut pace, short), short);
    }
}
