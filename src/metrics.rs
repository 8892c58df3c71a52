//! Prometheus metrics, served on the admin listener only.
//!
//! Handles are registered once with a recorder owned by the gateway (no global state), so
//! the request path only touches atomics. Labels are of low cardinality: route class,
//! method, status class, direction, close code; never raw paths or addresses.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// What a request was, for its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    Live,
    Health,
    ChatRedirect,
    AuthConfig,
    SocketIo,
    Backend,
    WebSocket,
}

impl RouteClass {
    const ALL: [RouteClass; 7] = [
        RouteClass::Live,
        RouteClass::Health,
        RouteClass::ChatRedirect,
        RouteClass::AuthConfig,
        RouteClass::SocketIo,
        RouteClass::Backend,
        RouteClass::WebSocket,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RouteClass::Live => "live",
            RouteClass::Health => "health",
            RouteClass::ChatRedirect => "chat_redirect",
            RouteClass::AuthConfig => "auth_config",
            RouteClass::SocketIo => "socketio",
            RouteClass::Backend => "backend",
            RouteClass::WebSocket => "websocket",
        }
    }
}

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &http::Method) -> usize {
    METHODS[..7]
        .iter()
        .position(|m| *m == method.as_str())
        .unwrap_or(7)
}

/// The live values behind the gauges, read by the caller when the metrics are scraped:
/// this module knows no other part of chatgate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub client_connections: usize,
    pub websocket_relays: usize,
    pub backend_up: bool,
    /// Latency of the last successful probe, while the backend is up.
    pub probe_latency_ms: Option<f64>,
}

/// The asset cache's handles, cloned into it once (each is an `Arc` to an atomic). The gauges
/// are set by the cache whenever it changes, under its own lock, so they are never stale.
#[derive(Clone)]
pub struct AssetCacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub coalesced: Counter,
    pub bytes_served: Counter,
    pub entries: Gauge,
    pub memory_bytes: Gauge,
}

/// One worker's chat metrics (or the only set, with one worker).
struct ChatHandles {
    messages: Counter,
    answers_in_progress: Gauge,
    first_token: Histogram,
    answer_duration: Histogram,
}

impl ChatHandles {
    fn register(recorder: &PrometheusRecorder, worker: Option<usize>) -> ChatHandles {
        let labels = || worker.map_or_else(Vec::new, |i| vec![Label::new("worker", i.to_string())]);
        ChatHandles {
            messages: recorder
                .register_counter(&key("chatgate_chat_messages_total", labels()), &META),
            answers_in_progress: recorder
                .register_gauge(&key("chatgate_chat_answers_in_progress", labels()), &META),
            first_token: recorder.register_histogram(
                &key("chatgate_chat_time_to_first_token_seconds", labels()),
                &META,
            ),
            answer_duration: recorder.register_histogram(
                &key("chatgate_chat_answer_duration_seconds", labels()),
                &META,
            ),
        }
    }
}

/// One worker's metric handles, updated where its state changes.
pub struct WorkerHandles {
    pub up: Gauge,
    pub relays: Gauge,
    pub requests: Counter,
    pub restarts: Counter,
}

/// Every metric chatgate exports.
pub struct Metrics {
    recorder: PrometheusRecorder,
    /// The rate-limit counters by class label, registered once.
    rate_limited: OnceLock<Vec<(&'static str, Counter)>>,
    handle: PrometheusHandle,
    // Registered on first use, then read without a lock.
    requests: Vec<OnceLock<Counter>>,
    durations: Vec<Histogram>,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
    pub ws_messages_to_backend: Counter,
    pub ws_messages_to_client: Counter,
    refused_connections: Counter,
    probe_reserve_connections: Counter,
    stalled_clients: Counter,
    client_connections: Gauge,
    websocket_relays: Gauge,
    backend_up: Gauge,
    probe_latency: Gauge,
    /// The chat metrics, one set per worker (index 0 alone, unlabelled, with one worker).
    chat: Vec<ChatHandles>,
    pub asset_cache: AssetCacheMetrics,
}

/// A client connection's own handle on the process's [`Metrics`], for what outlives a
/// request's future: its access line, recorded when the response body ends. Cloning it per
/// request writes a count in the connection's own allocation; an `Arc<Metrics>` clone would
/// write the shared one, a cache line every core's requests then pass between them.
///
/// It also counts the connection's finished responses and notes when the last one ended,
/// which tells the head clock (`client_io::HeadClock`) how long the connection has waited.
#[derive(Clone)]
pub struct MetricsHandle(std::sync::Arc<ConnectionLog>);

struct ConnectionLog {
    metrics: std::sync::Arc<Metrics>,
    /// When the connection opened: what `finished_at` counts from.
    opened: tokio::time::Instant,
    /// Responses whose access line was written (wrapping).
    finished: std::sync::atomic::AtomicU32,
    /// Nanoseconds from `opened` to the end of the last of them (0: none yet).
    finished_at: std::sync::atomic::AtomicU64,
}

impl MetricsHandle {
    pub fn new(metrics: std::sync::Arc<Metrics>) -> MetricsHandle {
        MetricsHandle(std::sync::Arc::new(ConnectionLog {
            metrics,
            opened: tokio::time::Instant::now(),
            finished: std::sync::atomic::AtomicU32::new(0),
            finished_at: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// One more response of this connection ended (its body ended or was dropped) at `at`.
    pub fn response_finished(&self, at: tokio::time::Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        let log = &self.0;
        // Written and read in the connection's own task: loads and stores, no ordering.
        log.finished
            .store(log.finished.load(Relaxed).wrapping_add(1), Relaxed);
        let nanos = at.saturating_duration_since(log.opened).as_nanos();
        log.finished_at
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Relaxed);
    }

    /// How many of this connection's responses ended (wrapping), and when the last did
    /// (the connection's opening when none has).
    pub fn responses_finished(&self) -> (u32, tokio::time::Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        let log = &self.0;
        let at = log.opened + std::time::Duration::from_nanos(log.finished_at.load(Relaxed));
        (log.finished.load(Relaxed), at)
    }
}

impl std::ops::Deref for MetricsHandle {
    type Target = Metrics;

    fn deref(&self) -> &Metrics {
        &self.0.metrics
    }
}

fn key(name: &'static str, labels: Vec<Label>) -> Key {
    Key::from_parts(name, labels)
}

const META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let buckets = [
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(
                KeyName::from_const_str(name),
                unit,
                SharedString::const_str(help),
            );
        };
        describe(
            "chatgate_requests_total",
            None,
            "HTTP requests answered, by route class, method and status class.",
        );
        describe(
            "chatgate_request_duration_seconds",
            Some(Unit::Seconds),
            "Time from request head to the end of the response body, by route class.",
        );
        describe(
            "chatgate_request_body_bytes_total",
            Some(Unit::Bytes),
            "Request body bytes sent to the backend.",
        );
        describe(
            "chatgate_response_body_bytes_total",
            Some(Unit::Bytes),
            "Response body bytes sent to clients.",
        );
        describe(
            "chatgate_client_connections",
            None,
            "Open client connections.",
        );
        describe("chatgate_websocket_relays", None, "Open WebSocket relays.");
        describe(
            "chatgate_websocket_messages_total",
            None,
            "WebSocket data messages relayed, by direction.",
        );
        describe(
            "chatgate_websocket_closes_total",
            None,
            "Ended WebSocket relays, by close code.",
        );
        describe(
            "chatgate_backend_up",
            None,
            "1 when the backend probe says it is reachable, else 0.",
        );
        describe(
            "chatgate_backend_probe_latency_seconds",
            Some(Unit::Seconds),
            "Latency of the last successful backend probe.",
        );
        describe(
            "chatgate_rate_limited_total",
            None,
            "Requests refused with 429, by limit class.",
        );
        describe(
            "chatgate_refused_connections_total",
            None,
            "Connections refused at the connection limit.",
        );
        describe(
            "chatgate_chat_messages_total",
            None,
            "Chat messages from users (Chainlit client_message, edit_message) passed to the backend.",
        );
        describe(
            "chatgate_chat_answers_in_progress",
            None,
            "Answers Chainlit is working on (task_start seen, task_end not yet).",
        );
        describe(
            "chatgate_chat_time_to_first_token_seconds",
            Some(Unit::Seconds),
            "Time from a user's message to the first part of the answer (stream_start, stream_token or new_message).",
        );
        describe(
            "chatgate_chat_answer_duration_seconds",
            Some(Unit::Seconds),
            "Time from task_start to task_end.",
        );
        describe(
            "chatgate_chat_refused_total",
            None,
            "Chat messages not passed to the backend, by reason (rate, session_answers, answers, draining).",
        );
        describe(
            "chatgate_probe_reserve_connections_total",
            None,
            "Connections admitted beyond the connection limit from the probe reserve.",
        );
        describe(
            "chatgate_stalled_client_connections_total",
            None,
            "Client connections cut because a write waited --body-idle-timeout for the client to read.",
        );
        describe(
            "chatgate_asset_cache_hits_total",
            None,
            "Asset requests answered from memory (200, 304 or HEAD).",
        );
        describe(
            "chatgate_asset_cache_misses_total",
            None,
            "Cacheable-looking asset requests that went to the backend.",
        );
        describe(
            "chatgate_asset_cache_coalesced_total",
            None,
            "Asset requests that waited for another request's fetch of the same file.",
        );
        describe(
            "chatgate_asset_cache_bytes_served_total",
            Some(Unit::Bytes),
            "Response body bytes served from the asset cache.",
        );
        describe(
            "chatgate_asset_cache_entries",
            None,
            "Files held by the asset cache.",
        );
        describe(
            "chatgate_asset_cache_memory_bytes",
            Some(Unit::Bytes),
            "Bytes held by the asset cache (every variant, plus a fixed overhead per entry).",
        );
        describe(
            "chatgate_worker_up",
            None,
            "1 when the worker is reachable, by worker index (several workers only).",
        );
        describe(
            "chatgate_worker_relays",
            None,
            "Open WebSocket relays to the worker, by worker index.",
        );
        describe(
            "chatgate_worker_requests_total",
            None,
            "Requests and relays sent to the worker, by worker index.",
        );
        describe(
            "chatgate_worker_restarts_total",
            None,
            "Times a supervised worker exited and was started again, by worker index.",
        );

        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&key(name, labels), &META)
        };
        let gauge = |name: &'static str| recorder.register_gauge(&key(name, vec![]), &META);
        let durations = RouteClass::ALL
            .iter()
            .map(|r| {
                recorder.register_histogram(
                    &key(
                        "chatgate_request_duration_seconds",
                        vec![Label::from_static_parts("route", r.label())],
                    ),
                    &META,
                )
            })
            .collect();
        let direction = |d: &'static str| vec![Label::from_static_parts("direction", d)];
        Metrics {
            requests: (0..RouteClass::ALL.len() * METHODS.len() * STATUS_CLASSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            durations,
            request_bytes: counter("chatgate_request_body_bytes_total", vec![]),
            response_bytes: counter("chatgate_response_body_bytes_total", vec![]),
            ws_messages_to_backend: counter(
                "chatgate_websocket_messages_total",
                direction("to_backend"),
            ),
            ws_messages_to_client: counter(
                "chatgate_websocket_messages_total",
                direction("to_client"),
            ),
            refused_connections: counter("chatgate_refused_connections_total", vec![]),
            probe_reserve_connections: counter("chatgate_probe_reserve_connections_total", vec![]),
            stalled_clients: counter("chatgate_stalled_client_connections_total", vec![]),
            client_connections: gauge("chatgate_client_connections"),
            websocket_relays: gauge("chatgate_websocket_relays"),
            backend_up: gauge("chatgate_backend_up"),
            probe_latency: gauge("chatgate_backend_probe_latency_seconds"),
            chat: vec![ChatHandles::register(&recorder, None)],
            asset_cache: AssetCacheMetrics {
                hits: counter("chatgate_asset_cache_hits_total", vec![]),
                misses: counter("chatgate_asset_cache_misses_total", vec![]),
                coalesced: counter("chatgate_asset_cache_coalesced_total", vec![]),
                bytes_served: counter("chatgate_asset_cache_bytes_served_total", vec![]),
                entries: gauge("chatgate_asset_cache_entries"),
                memory_bytes: gauge("chatgate_asset_cache_memory_bytes"),
            },
            rate_limited: OnceLock::new(),
            handle,
            recorder,
        }
    }

    /// Counts one answered request.
    pub fn request(
        &self,
        route: RouteClass,
        method: &http::Method,
        status: u16,
        seconds: f64,
        body_bytes: u64,
    ) {
        let route_index = RouteClass::ALL
            .iter()
            .position(|r| *r == route)
            .unwrap_or(0);
        let status_index = usize::from(status / 100).clamp(1, 5) - 1;
        let m = method_index(method);
        let index = (route_index * METHODS.len() + m) * STATUS_CLASSES.len() + status_index;
        if let Some(slot) = self.requests.get(index) {
            slot.get_or_init(|| {
                let labels = vec![
                    Label::from_static_parts("route", route.label()),
                    Label::from_static_parts("method", METHODS[m]),
                    Label::from_static_parts("status", STATUS_CLASSES[status_index]),
                ];
                self.recorder
                    .register_counter(&key("chatgate_requests_total", labels), &META)
            })
            .increment(1);
        }
        if let Some(histogram) = self.durations.get(route_index) {
            histogram.record(seconds);
        }
        self.response_bytes.increment(body_bytes);
    }

    /// With `workers` > 1 the chat metrics carry a `worker` label (the index); call before
    /// the metrics are shared.
    pub fn with_chat_workers(mut self, workers: usize) -> Metrics {
        if workers > 1 {
            self.chat = (0..workers)
                .map(|i| ChatHandles::register(&self.recorder, Some(i)))
                .collect();
        }
        self
    }

    fn chat(&self, worker: usize) -> &ChatHandles {
        // Index 0 always exists; an index past the workers (none) falls back to it.
        self.chat.get(worker).unwrap_or(&self.chat[0])
    }

    pub fn chat_message(&self, worker: usize) {
        self.chat(worker).messages.increment(1);
    }

    pub fn chat_first_token(&self, worker: usize, took: std::time::Duration) {
        self.chat(worker).first_token.record(took.as_secs_f64());
    }

    pub fn chat_answer_started(&self, worker: usize) {
        self.chat(worker).answers_in_progress.increment(1.0);
    }

    pub fn chat_answer_ended(&self, worker: usize, took: std::time::Duration) {
        let chat = self.chat(worker);
        chat.answers_in_progress.decrement(1.0);
        chat.answer_duration.record(took.as_secs_f64());
    }

    /// Answers still open when their session ended: no longer in progress, never timed.
    pub fn chat_answers_abandoned(&self, worker: usize, count: usize) {
        self.chat(worker)
            .answers_in_progress
            .decrement(count as f64);
    }

    /// Counts a chat message refused for `reason` (a fixed set of labels).
    pub fn chat_refused(&self, reason: &'static str) {
        let labels = vec![Label::from_static_parts("reason", reason)];
        self.recorder
            .register_counter(&key("chatgate_chat_refused_total", labels), &META)
            .increment(1);
    }

    /// Shows the chat refusal counters at 0 before any refusal.
    pub fn declare_chat_refusal_reasons(&self, reasons: &[&'static str]) {
        for &reason in reasons {
            let labels = vec![Label::from_static_parts("reason", reason)];
            self.recorder
                .register_counter(&key("chatgate_chat_refused_total", labels), &META)
                .increment(0);
        }
    }

    /// Shows the rate-limit counters at 0 before any refusal, so that `rate()` works from
    /// the first scrape.
    pub fn declare_rate_limit_classes(&self, classes: &[&'static str]) {
        let handles = classes
            .iter()
            .map(|&class| {
                let labels = vec![Label::from_static_parts("class", class)];
                let counter = self
                    .recorder
                    .register_counter(&key("chatgate_rate_limited_total", labels), &META);
                counter.increment(0);
                (class, counter)
            })
            .collect();
        let _ = self.rate_limited.set(handles);
    }

    /// Counts a request refused by the rate limit of `class` (one of the declared labels).
    /// Under a 429 flood this is the hot path: the handles are registered once, so a
    /// refusal only touches an atomic.
    pub fn rate_limited(&self, class: &'static str) {
        let declared = self.rate_limited.get().and_then(|handles| {
            handles
                .iter()
                .find(|(label, _)| *label == class)
                .map(|(_, counter)| counter)
        });
        match declared {
            Some(counter) => counter.increment(1),
            None => {
                let labels = vec![Label::from_static_parts("class", class)];
                self.recorder
                    .register_counter(&key("chatgate_rate_limited_total", labels), &META)
                    .increment(1);
            }
        }
    }

    /// The handles of worker `index` (labelled `worker="<index>"`: bounded by the worker
    /// count), registered once at start-up and shown at 0 from the first scrape.
    pub fn worker(&self, index: usize) -> WorkerHandles {
        let labels = || vec![Label::new("worker", index.to_string())];
        let up = self
            .recorder
            .register_gauge(&key("chatgate_worker_up", labels()), &META);
        up.set(0.0);
        let relays = self
            .recorder
            .register_gauge(&key("chatgate_worker_relays", labels()), &META);
        relays.set(0.0);
        let requests = self
            .recorder
            .register_counter(&key("chatgate_worker_requests_total", labels()), &META);
        requests.increment(0);
        let restarts = self
            .recorder
            .register_counter(&key("chatgate_worker_restarts_total", labels()), &META);
        restarts.increment(0);
        WorkerHandles {
            up,
            relays,
            requests,
            restarts,
        }
    }

    pub fn refused_connection(&self) {
        self.refused_connections.increment(1);
    }

    pub fn probe_reserve_connection(&self) {
        self.probe_reserve_connections.increment(1);
    }

    pub fn stalled_client(&self) {
        self.stalled_clients.increment(1);
    }

    /// Counts an ended relay by its close code (a fixed set of labels).
    pub fn websocket_closed(&self, code: Option<u16>) {
        let label = match code {
            None => "none",
            Some(c @ (1000..=1003 | 1007..=1014)) => close_code_label(c),
            Some(3000..=3999) => "3xxx",
            Some(4000..=4999) => "4xxx",
            Some(_) => "other",
        };
        let labels = vec![Label::from_static_parts("code", label)];
        self.recorder
            .register_counter(&key("chatgate_websocket_closes_total", labels), &META)
            .increment(1);
    }

    /// The exposition text, with the gauges set from `gauges` first.
    pub fn render(&self, gauges: Gauges) -> String {
        self.client_connections
            .set(gauges.client_connections as f64);
        self.websocket_relays.set(gauges.websocket_relays as f64);
        self.backend_up
            .set(if gauges.backend_up { 1.0 } else { 0.0 });
        if let Some(ms) = gauges.probe_latency_ms {
            self.probe_latency.set(ms / 1000.0);
        }
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets; call periodically so memory
    /// stays bounded even when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn close_code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1010 => "1010",
        1011 => "1011",
        1012 => "1012",
        1013 => "1013",
        _ => "1014",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_with_low_cardinality_labels() {
        let m = Metrics::new();
        m.request(RouteClass::Backend, &http::Method::GET, 200, 0.01, 10);
        m.request(RouteClass::Backend, &http::Method::GET, 204, 0.01, 0);
        m.request(
            RouteClass::Health,
            &http::Method::from_bytes(b"PURGE").unwrap(),
            503,
            0.001,
            5,
        );
        m.websocket_closed(Some(4001));
        m.rate_limited("websocket");
        let text = m.render(Gauges {
            client_connections: 3,
            ..Gauges::default()
        });
        assert!(
            text.contains(
                r#"chatgate_requests_total{route="backend",method="GET",status="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"chatgate_requests_total{route="health",method="other",status="5xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"chatgate_websocket_closes_total{code="4xxx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"chatgate_rate_limited_total{class="websocket"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("chatgate_response_body_bytes_total 15"),
            "{text}"
        );
        assert!(text.contains("chatgate_backend_up 0"), "{text}");
        assert!(text.contains("chatgate_client_connections 3"), "{text}");
        assert!(text.contains("# HELP chatgate_requests_total"), "{text}");
        assert!(
            text.contains("chatgate_request_duration_seconds_bucket"),
            "{text}"
        );
    }

    #[test]
    fn workers_have_their_own_labelled_series_from_the_start() {
        let m = Metrics::new();
        let w0 = m.worker(0);
        let w1 = m.worker(1);
        w1.up.set(1.0);
        w1.relays.increment(1.0);
        w1.requests.increment(3);
        w0.restarts.increment(1);
        let text = m.render(Gauges::default());
        for line in [
            r#"chatgate_worker_up{worker="0"} 0"#,
            r#"chatgate_worker_up{worker="1"} 1"#,
            r#"chatgate_worker_relays{worker="1"} 1"#,
            r#"chatgate_worker_requests_total{worker="1"} 3"#,
            r#"chatgate_worker_requests_total{worker="0"} 0"#,
            r#"chatgate_worker_restarts_total{worker="0"} 1"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
