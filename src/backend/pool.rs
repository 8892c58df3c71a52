//! The workers: one backend each (its URL, health, load), and the routing decision that keeps
//! every request of a chat on the worker that holds it.
//!
//! Precedence: a known Engine.IO `sid` (the session's worker), then the affinity cookie,
//! then the least-loaded usable worker (in-flight requests plus open relays; ties go round
//! the list). A session whose worker died gets Engine.IO's "unknown session" answer; a
//! cookie naming a worker that is down is re-pointed to a live one. With one worker there is
//! nothing to decide: no cookie, no session table, no counting beyond the relays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use http::HeaderMap;
use http::header::HeaderValue;
use serde_json::json;

use bytes::Bytes;

use crate::backend::affinity::{self, EngineIo, OpenPacket};
use crate::backend::health::BackendHealth;
use crate::backend::owned::IdleConnections;
use crate::backend::sessions::{self, SessionHome, SessionTable};
use crate::body::BodyTap;
use crate::config::{AffinityConfig, BackendConfig, BackendUrl};

/// Per-worker metric handles (the `worker` label is the index: bounded).
#[derive(Clone, Default)]
pub struct WorkerMetrics {
    pub relays: Option<metrics::Gauge>,
    pub requests: Option<metrics::Counter>,
    pub restarts: Option<metrics::Counter>,
}

/// Idle keep-alive connections kept per worker, at most.
const MAX_IDLE_PER_WORKER: usize = 1024;

/// One backend process (or URL) behind chatgate.
pub struct Worker {
    pub index: usize,
    /// The backend settings, with this worker's URL.
    pub backend: BackendConfig,
    pub health: Arc<BackendHealth>,
    /// Keep-alive connections to it that no client connection holds right now.
    pub idle: Arc<IdleConnections>,
    in_flight: AtomicUsize,
    relays: AtomicUsize,
    restarts: AtomicU64,
    /// Bumped each time a supervised worker is started again: sessions learned before
    /// belong to a process that is gone.
    generation: AtomicU64,
    /// The supervised process's id, 0 when not running (or not supervised).
    pid: AtomicU32,
    /// `Set-Cookie` values naming this worker: plain and `Secure`.
    cookie: [HeaderValue; 2],
    metrics: WorkerMetrics,
}

impl Worker {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn relays(&self) -> usize {
        self.relays.load(Ordering::Relaxed)
    }

    fn load(&self) -> usize {
        self.in_flight() + self.relays()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    /// The supervisor started the process `pid` (a new generation of sessions).
    pub fn started(&self, pid: u32) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.pid.store(pid, Ordering::SeqCst);
    }

    /// The supervised process exited on its own: counted, and down at once.
    pub fn exited(&self, why: String) {
        self.pid.store(0, Ordering::SeqCst);
        self.restarts.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.metrics.restarts {
            c.increment(1);
        }
        self.health.mark_exited(why);
    }

    /// The supervised process was stopped by chatgate.
    pub fn stopped(&self) {
        self.pid.store(0, Ordering::SeqCst);
    }

    /// Counts a request sent here until the guard is dropped (with its response body).
    pub fn hold_request(self: &Arc<Self>) -> WorkerLoad {
        if let Some(c) = &self.metrics.requests {
            c.increment(1);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        WorkerLoad {
            worker: Arc::clone(self),
            relay: false,
        }
    }

    /// Counts an open relay to this worker until the guard is dropped.
    pub fn hold_relay(self: &Arc<Self>) -> WorkerLoad {
        if let Some(c) = &self.metrics.requests {
            c.increment(1);
        }
        if let Some(g) = &self.metrics.relays {
            g.increment(1.0);
        }
        self.relays.fetch_add(1, Ordering::Relaxed);
        WorkerLoad {
            worker: Arc::clone(self),
            relay: true,
        }
    }

    /// The `Set-Cookie` value that points a client here.
    pub fn set_cookie(&self, secure: bool) -> HeaderValue {
        self.cookie[usize::from(secure)].clone()
    }

    /// This worker's entry in the health document.
    pub fn report(&self) -> serde_json::Value {
        let mut doc = self.health.report(&self.backend.url.display);
        if let Some(object) = doc.as_object_mut() {
            object.insert("index".into(), json!(self.index));
            object.insert("relays".into(), json!(self.relays()));
            object.insert("requests_in_flight".into(), json!(self.in_flight()));
            object.insert("restarts".into(), json!(self.restarts()));
            object.insert("pid".into(), json!(self.pid()));
        }
        doc
    }
}

/// One unit of a worker's load, given back when dropped.
pub struct WorkerLoad {
    worker: Arc<Worker>,
    relay: bool,
}

impl Drop for WorkerLoad {
    fn drop(&mut self) {
        if self.relay {
            self.worker.relays.fetch_sub(1, Ordering::Relaxed);
            if let Some(g) = &self.worker.metrics.relays {
                g.decrement(1.0);
            }
        } else {
            self.worker.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a request goes to its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Its Engine.IO session lives there: no other worker could answer it.
    Session,
    /// The affinity cookie names it.
    Cookie,
    /// A new visitor (or one re-pointed): the least-loaded worker.
    Chosen,
}

/// Where one request goes.
pub struct Target {
    pub worker: Arc<Worker>,
    pub pin: Pin,
    /// The answer should carry a cookie naming the worker (missing or re-pointed).
    pub set_cookie: bool,
    /// The answer is a polling handshake whose session id should be learned.
    pub learn_sid: bool,
}

/// The routing decision.
pub enum Routing {
    To(Target),
    /// The request's session lived on a worker that is gone: answer Engine.IO's "unknown
    /// session" so that the client reconnects at once.
    DeadSession(String),
}

/// All workers and the affinity state.
pub struct Workers {
    list: Vec<Arc<Worker>>,
    tags: Vec<u64>,
    /// Where the next tie-break starts, so that equal loads spread round the list.
    next: AtomicUsize,
    pub sessions: SessionTable,
    pub affinity: AffinityConfig,
}

impl Workers {
    /// One worker per URL (at least one), each with a copy of `backend` pointing at it.
    pub fn new(
        backend: &BackendConfig,
        urls: Vec<BackendUrl>,
        affinity: AffinityConfig,
        metrics: impl Fn(usize) -> (WorkerMetrics, Option<metrics::Gauge>),
    ) -> Workers {
        let urls = if urls.is_empty() {
            vec![backend.url.clone()]
        } else {
            urls
        };
        let several = urls.len() > 1;
        let mut tags = Vec::with_capacity(urls.len());
        let list = urls
            .into_iter()
            .enumerate()
            .map(|(index, url)| {
                let tag = affinity::cookie_tag(index, &url.display);
                tags.push(tag);
                let value = affinity::cookie_value(index, tag);
                let cookie = [false, true].map(|secure| {
                    affinity::set_cookie(&affinity.cookie, &value, affinity.same_site, secure)
                });
                let (worker_metrics, up_gauge) = if several {
                    metrics(index)
                } else {
                    (WorkerMetrics::default(), None)
                };
                let mut backend = backend.clone();
                backend.url = url;
                let idle = IdleConnections::new(backend.pool_idle_timeout, MAX_IDLE_PER_WORKER);
                Arc::new(Worker {
                    index,
                    backend,
                    idle: Arc::new(idle),
                    health: Arc::new(BackendHealth::new(several.then_some(index), up_gauge)),
                    in_flight: AtomicUsize::new(0),
                    relays: AtomicUsize::new(0),
                    restarts: AtomicU64::new(0),
                    generation: AtomicU64::new(0),
                    pid: AtomicU32::new(0),
                    cookie,
                    metrics: worker_metrics,
                })
            })
            .collect();
        Workers {
            list,
            tags,
            next: AtomicUsize::new(0),
            sessions: SessionTable::new(sessions::DEFAULT_CAPACITY, sessions::DEFAULT_IDLE),
            affinity,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there is anything to keep affinity for.
    pub fn several(&self) -> bool {
        self.list.len() > 1
    }

    pub fn all(&self) -> &[Arc<Worker>] {
        &self.list
    }

    pub fn first(&self) -> &Arc<Worker> {
        &self.list[0]
    }

    pub fn any_reachable(&self) -> bool {
        self.list.iter().any(|w| w.health.is_reachable())
    }

    /// Decides where a request goes: from its headers (the cookie) and, for an Engine.IO
    /// request, its session.
    pub fn route(&self, headers: &HeaderMap, engineio: EngineIo<'_>) -> Routing {
        if !self.several() {
            return Routing::To(Target {
                worker: Arc::clone(self.first()),
                pin: Pin::Chosen,
                set_cookie: false,
                learn_sid: false,
            });
        }
        let cookie = affinity::find_cookie(headers, &self.affinity.cookie)
            .and_then(|value| affinity::parse_cookie_value(value, &self.tags));
        let learn_sid = engineio == EngineIo::PollingHandshake;
        if let EngineIo::Session(sid) = engineio {
            if let Some(home) = self.sessions.lookup(sid) {
                let worker = &self.list[home.worker];
                if !self.session_alive(worker, home) {
                    self.sessions.forget(sid);
                    return Routing::DeadSession(sid.to_owned());
                }
                return Routing::To(Target {
                    worker: Arc::clone(worker),
                    pin: Pin::Session,
                    set_cookie: cookie.is_none(),
                    learn_sid: false,
                });
            }
        }
        if let Some(index) = cookie {
            let worker = &self.list[index];
            if worker.health.is_usable() || !self.any_usable() {
                return Routing::To(Target {
                    worker: Arc::clone(worker),
                    pin: Pin::Cookie,
                    set_cookie: false,
                    learn_sid,
                });
            }
            // Down: re-pointed rather than pinned to a dead worker.
        }
        Routing::To(Target {
            worker: Arc::clone(self.least_loaded(None)),
            pin: Pin::Chosen,
            set_cookie: true,
            learn_sid,
        })
    }

    /// A session is alive while its worker is the same process and not known to be gone.
    fn session_alive(&self, worker: &Worker, home: SessionHome) -> bool {
        worker.generation() == home.generation
            && !worker.health.is_refusing()
            && worker.health.is_reachable()
    }

    fn any_usable(&self) -> bool {
        self.list.iter().any(|w| w.health.is_usable())
    }

    /// The usable worker with the least load (ties round the list), other than `except`;
    /// when none is usable, the least loaded of all (it will answer for itself: refuse, or
    /// be waited for).
    pub fn least_loaded(&self, except: Option<usize>) -> &Arc<Worker> {
        let n = self.list.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let candidates = || {
            (0..n)
                .map(move |k| &self.list[(start + k) % n])
                .filter(move |w| Some(w.index) != except)
        };
        candidates()
            .filter(|w| w.health.is_usable())
            .min_by_key(|w| w.load())
            .or_else(|| candidates().min_by_key(|w| w.load()))
            .unwrap_or(&self.list[start])
    }

    /// Another usable worker for a request whose worker refused its connection.
    pub fn fallback(&self, refused: &Worker) -> Option<&Arc<Worker>> {
        if !self.several() {
            return None;
        }
        let other = self.least_loaded(Some(refused.index));
        other.health.is_usable().then_some(other)
    }

    /// Remembers the session `sid` that `worker` just opened.
    pub fn learn_session(&self, sid: &str, worker: &Worker) {
        let home = SessionHome {
            worker: worker.index,
            generation: worker.generation(),
        };
        if !self.sessions.learn(sid, home) {
            tracing::debug!(
                sessions = self.sessions.len(),
                "session table full: a session routed by cookie only"
            );
        }
    }

    /// The workers' entries for the health document.
    pub fn report(&self) -> Vec<serde_json::Value> {
        self.list.iter().map(|w| w.report()).collect()
    }
}

/// What rides along a worker's response body to the client: the request's load (given
/// back when the body is done) and, for a polling handshake, the reader of its session id.
pub struct ResponseTap {
    _load: Option<WorkerLoad>,
    sniff: Option<SidSniff>,
}

/// Reads the session id from the first bytes of a polling handshake's answer, keeping at
/// most [`affinity::OPEN_PACKET_MAX`] bytes when the open packet comes in pieces.
pub struct SidSniff {
    workers: Arc<Workers>,
    worker: Arc<Worker>,
    seen: Vec<u8>,
}

impl ResponseTap {
    pub fn new(load: Option<WorkerLoad>, sniff: Option<(Arc<Workers>, Arc<Worker>)>) -> Self {
        ResponseTap {
            _load: load,
            sniff: sniff.map(|(workers, worker)| SidSniff {
                workers,
                worker,
                seen: Vec::new(),
            }),
        }
    }
}

impl BodyTap for ResponseTap {
    fn frame(&mut self, data: &Bytes) {
        let Some(sniff) = self.sniff.as_mut() else {
            return;
        };
        // The open packet usually arrives whole in the first frame: read it in place.
        let bytes: &[u8] = if sniff.seen.is_empty() {
            data
        } else {
            let room = affinity::OPEN_PACKET_MAX.saturating_sub(sniff.seen.len());
            sniff.seen.extend_from_slice(&data[..data.len().min(room)]);
            &sniff.seen
        };
        match affinity::open_packet_sid(bytes) {
            OpenPacket::Sid(sid) => {
                sniff.workers.learn_session(sid, &sniff.worker);
            }
            OpenPacket::Partial if bytes.len() < affinity::OPEN_PACKET_MAX => {
                if sniff.seen.is_empty() {
                    sniff.seen.extend_from_slice(data);
                }
                return;
            }
            _ => {}
        }
        self.sniff = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Config, SameSite};
    use http::header;
    use std::time::Duration;

    fn workers(n: usize) -> Workers {
        let cli = Cli::parse_with(["chatgate"], |_| None).unwrap();
        let config = Config::from_settings(&cli.settings).unwrap();
        let urls = (0..n)
            .map(|i| {
                crate::config::parse_backend(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap()
            })
            .collect();
        let affinity = AffinityConfig {
            cookie: "w".into(),
            same_site: SameSite::Lax,
        };
        let workers = Workers::new(&config.backend, urls, affinity, |_| Default::default());
        for w in workers.all() {
            w.health.record(Ok(Duration::from_millis(1)));
        }
        workers
    }

    fn cookie_for(workers: &Workers, index: usize) -> HeaderMap {
        let set = workers.all()[index].set_cookie(false);
        let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(&pair).unwrap());
        headers
    }

    fn target(routing: Routing) -> Target {
        match routing {
            Routing::To(t) => t,
            Routing::DeadSession(sid) => panic!("dead session {sid}"),
        }
    }

    #[test]
    fn one_worker_means_no_affinity_at_all() {
        let workers = workers(1);
        let t = target(workers.route(&HeaderMap::new(), EngineIo::PollingHandshake));
        assert_eq!(t.worker.index, 0);
        assert!(!t.set_cookie && !t.learn_sid);
    }

    #[test]
    fn new_visitors_spread_and_get_a_cookie() {
        let workers = workers(2);
        let seen: Vec<usize> = (0..4)
            .map(|_| {
                let t = target(workers.route(&HeaderMap::new(), EngineIo::No));
                assert!(t.set_cookie);
                assert_eq!(t.pin, Pin::Chosen);
                t.worker.index
            })
            .collect();
        assert!(seen.contains(&0) && seen.contains(&1), "{seen:?}");
    }

    #[test]
    fn the_least_loaded_worker_gets_the_new_visitor() {
        let workers = workers(2);
        let _busy = workers.all()[0].hold_request();
        for _ in 0..4 {
            let t = target(workers.route(&HeaderMap::new(), EngineIo::No));
            assert_eq!(t.worker.index, 1);
        }
    }

    #[test]
    fn a_cookie_holds_and_is_not_set_again() {
        let workers = workers(2);
        let headers = cookie_for(&workers, 1);
        for _ in 0..4 {
            let t = target(workers.route(&headers, EngineIo::No));
            assert_eq!(
                (t.worker.index, t.pin, t.set_cookie),
                (1, Pin::Cookie, false)
            );
        }
    }

    #[test]
    fn a_cookie_of_a_worker_that_is_down_is_re_pointed() {
        let workers = workers(2);
        workers.all()[1].health.passive_refused();
        let t = target(workers.route(&cookie_for(&workers, 1), EngineIo::No));
        assert_eq!((t.worker.index, t.set_cookie), (0, true));
    }

    #[test]
    fn a_known_session_wins_over_the_cookie_and_dies_with_its_worker() {
        let workers = workers(2);
        workers.learn_session("s1", &workers.all()[0]);
        let t = target(workers.route(&cookie_for(&workers, 1), EngineIo::Session("s1")));
        assert_eq!(
            (t.worker.index, t.pin, t.set_cookie),
            (0, Pin::Session, false)
        );
        let t = target(workers.route(&HeaderMap::new(), EngineIo::Session("s1")));
        assert!(
            t.set_cookie,
            "no cookie yet: set one for the session's worker"
        );
        workers.all()[0].started(42);
        assert!(matches!(
            workers.route(&HeaderMap::new(), EngineIo::Session("s1")),
            Routing::DeadSession(sid) if sid == "s1"
        ));
        let t = target(workers.route(&HeaderMap::new(), EngineIo::Session("s1")));
        assert_eq!(t.pin, Pin::Chosen, "forgotten: no longer a session we know");
    }

    #[test]
    fn a_handshake_answer_teaches_its_session_even_in_pieces() {
        let workers = Arc::new(workers(2));
        let w1 = Arc::clone(&workers.all()[1]);
        let open = br#"0{"sid":"abcDEF123","upgrades":["websocket"],"pingInterval":25000}"#;
        let mut tap = ResponseTap::new(
            Some(w1.hold_request()),
            Some((Arc::clone(&workers), Arc::clone(&w1))),
        );
        assert_eq!(w1.in_flight(), 1);
        tap.frame(&Bytes::copy_from_slice(&open[..7]));
        assert!(workers.sessions.lookup("abcDEF123").is_none());
        tap.frame(&Bytes::copy_from_slice(&open[7..30]));
        tap.frame(&Bytes::copy_from_slice(&open[30..]));
        assert_eq!(
            workers.sessions.lookup("abcDEF123").map(|h| h.worker),
            Some(1)
        );
        drop(tap);
        assert_eq!(w1.in_flight(), 0, "the load goes with the body");
        let mut other = ResponseTap::new(None, Some((Arc::clone(&workers), w1)));
        other.frame(&Bytes::from_static(b"not engine.io"));
        assert!(other.sniff.is_none(), "gave up at once");
    }

    #[test]
    fn fallback_finds_another_usable_worker_or_none() {
        let workers = workers(2);
        let w0 = Arc::clone(&workers.all()[0]);
        w0.health.passive_refused();
        assert_eq!(workers.fallback(&w0).map(|w| w.index), Some(1));
        workers.all()[1].health.passive_refused();
        assert!(workers.fallback(&w0).is_none());
    }
}
