//! The asset cache: Chainlit's content-hashed static files (`/assets/index-DkR3x9aB.js`)
//! fetched once from the backend uncompressed, compressed once off the async threads, kept
//! in a memory-bounded LRU and served from memory with `Cache-Control: immutable`. Chainlit
//! gzips its 4.6 MB bundle on every request in its event loop (0.4–0.6 s of Python per page
//! load, stalling every chat meanwhile); from here it costs the backend nothing.
//!
//! The pipeline hands [`AssetCache::serve`] the request and a closure doing the ordinary
//! backend exchange. Whatever the cache does not answer goes through that closure as it
//! came; every backend fetch the cache makes is carried by a client's request, so no
//! request is invented and no task outlives its client. What is looked up and what is
//! stored is decided in [`policy`], from the name *and* the backend's answer; which
//! variant a client gets in [`negotiate`].
//!
//! - **One fetch per file**: concurrent first requests wait (at most [`FILL_WAIT`]) for the
//!   first one's fetch; if it fails or is not storable, each goes to the backend itself.
//! - **Compression**: gzip while the first request waits (~0.2 s for the bundle), brotli
//!   at its best quality in the background, one file at a time (seconds of one core);
//!   clients accepting br get gzip until it is ready.
//! - **Revalidation**: an entry older than `--asset-cache-revalidate` is checked by its next
//!   GET, which goes to the backend with the backend's own validators (`If-None-Match`,
//!   `If-Modified-Since`). Same bytes (a 304, or a 200 with the same digest) keep the entry;
//!   new bytes replace it; a 404 or an answer that is no longer storable drops it; backend
//!   trouble keeps the stored copy until the next check. Meanwhile other requests are
//!   answered from memory. So a backend restarted with other bytes under the same names is
//!   served its new bytes within one interval of the first request after it.

// Only the pure functions are public (for tests/properties.rs), as `proxy::headers` is;
// the cache itself is the pipeline's.
mod asset;
mod compress;
pub mod negotiate;
pub mod policy;

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use lru::LruCache;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use self::asset::{Asset, Check, Validators};
use crate::body::ProxyBody;
use crate::config::AssetCacheConfig;
use crate::error::{Cause, ProxyError, chain};
use crate::metrics::AssetCacheMetrics;

/// How long a request waits for another request's fetch of the same file before going to
/// the backend itself. Covers reading a large file from a busy backend and gzipping it.
pub(crate) const FILL_WAIT: Duration = Duration::from_secs(10);

/// Names remembered as "the backend's answer was not storable" (404, `no-store`, too
/// large...), so their next requests pass through untouched instead of being fetched
/// uncompressed again. Forgotten after the revalidation interval, or when full.
const UNSTORABLE_MEMO: usize = 1024;

/// The asset cache; off (every request straight to the backend) when configured so.
pub(crate) struct AssetCache {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    prefixes: Vec<String>,
    max_file: usize,
    revalidate_ms: u64,
    epoch: Instant,
    store: Mutex<Store>,
    metrics: AssetCacheMetrics,
    /// Brotli at quality 11 takes seconds of a core per large file: one at a time, so at
    /// least one core stays with the proxy and the backend.
    brotli_slot: Semaphore,
}

/// What one lookup found; decided under the store's lock, acted on outside it.
enum Lookup {
    /// Stored and fresh: answer from memory.
    Fresh(Arc<Asset>),
    /// Stored, due for a check, and this request does it.
    Check(Arc<Asset>, Check),
    /// Another request is fetching it: wait for that.
    Wait(watch::Receiver<Flight>),
    /// Nobody has it: this request fetches it for everyone.
    Fill(FlightGuard),
    /// Known not storable, or a HEAD that cannot fill: to the backend as it is.
    Pass,
}

/// A fetch in progress, as its waiters see it.
#[derive(Clone)]
enum Flight {
    Pending,
    Ready(Arc<Asset>),
    Failed,
}

/// The fetching request's side of a flight. Dropped without [`FlightGuard::ready`] (an
/// error, an answer that was not storable, the client gone), it tells the waiters to go to
/// the backend themselves.
struct FlightGuard {
    key: Box<str>,
    tx: watch::Sender<Flight>,
    shared: Arc<Shared>,
}

impl FlightGuard {
    fn ready(self, asset: Arc<Asset>) {
        self.tx.send_replace(Flight::Ready(asset));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.shared.store().flights.remove(&self.key);
        self.tx.send_if_modified(|state| {
            let pending = matches!(state, Flight::Pending);
            if pending {
                *state = Flight::Failed;
            }
            pending
        });
    }
}

/// The entries in LRU order within the memory bound, the fetches in flight, and the memo of
/// names that were not storable. One mutex, held for map operations only (never across an
/// await or a copy of a body).
struct Store {
    // `lru` rather than quick_cache or moka: the bound is in bytes and must hold exactly
    // (quick_cache splits a weight budget across shards, so a 6 MB bundle could be refused by
    // a shard while the cache is empty; moka brings a runtime of its own), and one short
    // lock per asset request is nothing next to the request.
    entries: LruCache<Box<str>, Arc<Asset>>,
    bytes: usize,
    limit: usize,
    flights: HashMap<Box<str>, watch::Receiver<Flight>>,
    unstorable: LruCache<Box<str>, u64>,
    metrics: AssetCacheMetrics,
}

impl Store {
    /// Stores `asset` under `key`, evicting least recently used entries to stay within the
    /// bound; false (and nothing stored) when it alone is over the bound.
    fn insert(&mut self, key: &str, asset: Arc<Asset>) -> bool {
        let weight = asset.weight();
        if weight > self.limit {
            self.remove(key);
            return false;
        }
        if let Some(old) = self.entries.put(key.into(), asset) {
            self.bytes -= old.weight();
        }
        self.bytes += weight;
        while self.bytes > self.limit {
            let Some((_, evicted)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes -= evicted.weight();
        }
        self.publish();
        true
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.pop(key) {
            self.bytes -= old.weight();
            self.publish();
        }
    }

    /// Replaces the entry with its brotli-upgraded copy, if it is still the same content.
    fn upgrade(&mut self, key: &str, upgraded: Arc<Asset>) {
        let current = self.entries.peek(key);
        if current.is_some_and(|c| c.digest == upgraded.digest && c.br.is_none()) {
            self.insert(key, upgraded);
        }
    }

    fn holds(&self, key: &str, digest: u64) -> bool {
        self.entries.peek(key).is_some_and(|c| c.digest == digest)
    }

    fn publish(&self) {
        self.metrics.entries.set(self.entries.len() as f64);
        self.metrics.memory_bytes.set(self.bytes as f64);
    }
}

/// What the cache made of a backend answer to its fetch.
#[allow(clippy::large_enum_variant)] // made and matched once per fetch, never stored
enum Taken {
    /// The file, ready to store; the entry being revalidated itself when the bytes are the
    /// same.
    Asset(Arc<Asset>),
    /// Not storable: the answer itself, for the client.
    Pass(Response<ProxyBody>),
}

impl AssetCache {
    pub fn new(config: &AssetCacheConfig, metrics: AssetCacheMetrics) -> AssetCache {
        if !config.is_enabled() {
            return AssetCache { shared: None };
        }
        let store = Store {
            entries: LruCache::unbounded(),
            bytes: 0,
            limit: config.max_bytes,
            flights: HashMap::new(),
            unstorable: LruCache::new(
                NonZeroUsize::new(UNSTORABLE_MEMO).unwrap_or(NonZeroUsize::MIN),
            ),
            metrics: metrics.clone(),
        };
        store.publish();
        AssetCache {
            shared: Some(Arc::new(Shared {
                prefixes: config.paths.clone(),
                // A file that could never fit is never read whole.
                max_file: config
                    .max_file
                    .min(config.max_bytes.saturating_sub(asset::ENTRY_OVERHEAD)),
                revalidate_ms: u64::try_from(config.revalidate.as_millis()).unwrap_or(u64::MAX),
                epoch: Instant::now(),
                store: Mutex::new(store),
                metrics,
                brotli_slot: Semaphore::new(1),
            })),
        }
    }

    /// Whether [`serve`](Self::serve) may answer `req` from memory or store its answer; for
    /// any other request it would only call its fetch, so the pipeline skips it.
    pub fn may_serve<B>(&self, req: &Request<B>) -> bool {
        self.shared.as_ref().is_some_and(|shared| {
            policy::lookup_allowed(req.method(), req.uri(), req.headers(), &shared.prefixes).is_ok()
        })
    }

    /// Answers `req` from memory when it can; otherwise calls `fetch` (the ordinary backend
    /// exchange) at most once, with the request as it came or, when the answer is to be
    /// stored, asking for the uncompressed file.
    pub async fn serve<B, F, Fut>(
        &self,
        req: Request<B>,
        fetch: F,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        F: FnOnce(Request<B>) -> Fut,
        Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    {
        let Some(shared) = &self.shared else {
            return fetch(req).await;
        };
        if policy::lookup_allowed(req.method(), req.uri(), req.headers(), &shared.prefixes).is_err()
        {
            return fetch(req).await;
        }
        let head = req.method() == Method::HEAD;
        match shared.lookup(req.uri().path(), head) {
            Lookup::Fresh(asset) => Ok(shared.answer(&asset, req.headers(), head)),
            // Boxed (rare: a miss or a re-check): inline, these futures would make every
            // proxied request's future larger, and hyper moves it into place per request.
            Lookup::Check(asset, check) => {
                Box::pin(shared.revalidate(req, asset, check, fetch)).await
            }
            Lookup::Wait(flight) => {
                shared.metrics.coalesced.increment(1);
                match wait(flight).await {
                    Some(asset) => Ok(shared.answer(&asset, req.headers(), head)),
                    None => {
                        shared.metrics.misses.increment(1);
                        fetch(req).await
                    }
                }
            }
            Lookup::Fill(flight) => Box::pin(shared.fill(req, flight, fetch)).await,
            Lookup::Pass => {
                shared.metrics.misses.increment(1);
                fetch(req).await
            }
        }
    }
}

/// Waits for another request's fetch; `None` when it failed, was not storable, or took
/// longer than [`FILL_WAIT`].
async fn wait(mut flight: watch::Receiver<Flight>) -> Option<Arc<Asset>> {
    let settled = flight.wait_for(|state| !matches!(state, Flight::Pending));
    let state = tokio::time::timeout(FILL_WAIT, settled).await.ok()?.ok()?;
    match &*state {
        Flight::Ready(asset) => Some(Arc::clone(asset)),
        Flight::Pending | Flight::Failed => None,
    }
}

/// The request head for the cache's own fetch: the whole file, uncompressed (it is
/// compressed here, once), without `Origin` (the stored answer is the origin-neutral one),
/// revalidated with the backend's validators when there are some. The client's own
/// conditionals are answered by the cache afterwards.
fn fetch_head(headers: &mut HeaderMap, validators: Option<&Validators>) {
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    headers.remove(header::ORIGIN);
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
    let Some(validators) = validators else { return };
    if let Some(etag) = &validators.etag {
        headers.insert(header::IF_NONE_MATCH, etag.clone());
    }
    if let Some(modified) = &validators.last_modified {
        headers.insert(header::IF_MODIFIED_SINCE, modified.clone());
    }
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves plain maps behind: still usable.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lookup(self: &Arc<Self>, path: &str, head: bool) -> Lookup {
        let now = self.now_ms();
        let mut store = self.store();
        if let Some(asset) = store.entries.get(path) {
            let asset = Arc::clone(asset);
            if !head && asset.freshness.is_due(now, self.revalidate_ms) {
                if let Some(check) = Check::begin(&asset.freshness) {
                    return Lookup::Check(asset, check);
                }
            }
            return Lookup::Fresh(asset);
        }
        if let Some(&since) = store.unstorable.get(path) {
            if now.saturating_sub(since) < self.revalidate_ms {
                return Lookup::Pass;
            }
            store.unstorable.pop(path);
        }
        if let Some(flight) = store.flights.get(path) {
            return Lookup::Wait(flight.clone());
        }
        if head {
            return Lookup::Pass;
        }
        let (tx, rx) = watch::channel(Flight::Pending);
        store.flights.insert(path.into(), rx);
        Lookup::Fill(FlightGuard {
            key: path.into(),
            tx,
            shared: Arc::clone(self),
        })
    }

    fn answer(&self, asset: &Asset, request: &HeaderMap, head: bool) -> Response<ProxyBody> {
        let (response, sent) = asset.respond(request, head);
        self.metrics.hits.increment(1);
        self.metrics.bytes_served.increment(sent as u64);
        response
    }

    fn remember_unstorable(&self, key: &str) {
        let now = self.now_ms();
        let mut store = self.store();
        store.remove(key);
        store.unstorable.put(key.into(), now);
    }

    /// The first request for a file: fetch it, store it, answer it and every waiter.
    async fn fill<B, F, Fut>(
        self: &Arc<Self>,
        mut req: Request<B>,
        flight: FlightGuard,
        fetch: F,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        F: FnOnce(Request<B>) -> Fut,
        Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    {
        self.metrics.misses.increment(1);
        let client = req.headers().clone();
        fetch_head(req.headers_mut(), None);
        let response = fetch(req).await?;
        match self.take(response, None).await? {
            Taken::Asset(asset) => {
                let key = flight.key.clone();
                let stored = self.store().insert(&key, Arc::clone(&asset));
                flight.ready(Arc::clone(&asset));
                if stored {
                    self.compress_later(key, Arc::clone(&asset));
                } else {
                    self.remember_unstorable(&key);
                }
                let (response, sent) = asset.respond(&client, false);
                self.metrics.bytes_served.increment(sent as u64);
                Ok(response)
            }
            Taken::Pass(response) => {
                self.remember_unstorable(&flight.key);
                Ok(response)
            }
        }
    }

    /// A stored entry's check against the backend, carried by this GET.
    async fn revalidate<B, F, Fut>(
        self: &Arc<Self>,
        mut req: Request<B>,
        asset: Arc<Asset>,
        check: Check,
        fetch: F,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        F: FnOnce(Request<B>) -> Fut,
        Fut: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
    {
        let key: Box<str> = req.uri().path().into();
        let client = req.headers().clone();
        fetch_head(req.headers_mut(), Some(&asset.validators));
        let outcome = match fetch(req).await {
            Ok(response) => match response.status() {
                StatusCode::NOT_MODIFIED => Ok(Taken::Asset(Arc::clone(&asset))),
                StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Taken::Pass(response)),
                StatusCode::OK => self.take(response, Some(&asset)).await,
                // Backend trouble (5xx, an odd redirect) says nothing about the file.
                status => Err(ProxyError::BackendReset(Cause::msg(format!(
                    "revalidation answered {status}"
                )))),
            },
            Err(error) => Err(error),
        };
        let now = self.now_ms();
        match outcome {
            Ok(Taken::Asset(same)) if Arc::ptr_eq(&same, &asset) => {
                check.done(now);
                Ok(self.answer(&asset, &client, false))
            }
            Ok(Taken::Asset(fresh)) => {
                tracing::info!(
                    path = &*key,
                    "asset changed on the backend; cached copy replaced"
                );
                if self.store().insert(&key, Arc::clone(&fresh)) {
                    self.compress_later(key, Arc::clone(&fresh));
                } else {
                    self.remember_unstorable(&key);
                }
                self.metrics.misses.increment(1);
                let (response, sent) = fresh.respond(&client, false);
                self.metrics.bytes_served.increment(sent as u64);
                Ok(response)
            }
            Ok(Taken::Pass(response)) => {
                tracing::info!(
                    path = &*key,
                    status = response.status().as_u16(),
                    "asset no longer cacheable; dropped"
                );
                self.remember_unstorable(&key);
                self.metrics.misses.increment(1);
                Ok(response)
            }
            Err(error) => {
                // Stale-if-error: the stored copy is still the best answer there is.
                tracing::debug!(path = &*key, error = %error, "asset revalidation failed; serving the cached copy");
                check.done(now);
                Ok(self.answer(&asset, &client, false))
            }
        }
    }

    /// Reads a backend answer whole (it is storable, so its length is known and bounded)
    /// and builds the entry on a blocking thread. `known`: the entry being revalidated,
    /// returned as it is when the bytes are the same (never compressed again).
    async fn take(
        &self,
        response: Response<ProxyBody>,
        known: Option<&Arc<Asset>>,
    ) -> Result<Taken, ProxyError> {
        if let Err(reason) = policy::storable(response.status(), response.headers(), self.max_file)
        {
            tracing::debug!(?reason, "asset not stored");
            return Ok(Taken::Pass(response));
        }
        let (parts, body) = response.into_parts();
        let body: Bytes = Limited::new(body, self.max_file)
            .collect()
            .await
            .map_err(|e| {
                ProxyError::BackendReset(Cause::msg(format!("asset body: {}", chain(&*e))))
            })?
            .to_bytes();
        let now = self.now_ms();
        let known = known.cloned();
        let asset = tokio::task::spawn_blocking(move || {
            let digest = compress::digest(&body);
            match known {
                Some(known) if known.digest == digest => known,
                _ => Arc::new(Asset::build(&parts.headers, body, digest, now)),
            }
        })
        .await
        .map_err(|e| ProxyError::BackendReset(Cause::msg(format!("asset compression: {e}"))))?;
        Ok(Taken::Asset(asset))
    }

    /// Adds the brotli variant in the background, one file at a time.
    fn compress_later(self: &Arc<Self>, key: Box<str>, asset: Arc<Asset>) {
        if !asset.compressible || asset.br.is_some() {
            return;
        }
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(_slot) = shared.brotli_slot.acquire().await else {
                return;
            };
            // Evicted or replaced while queued: not worth seconds of a core.
            if !shared.store().holds(&key, asset.digest) {
                return;
            }
            let data = asset.identity.body.clone();
            let started = Instant::now();
            let Ok(Some(br)) = tokio::task::spawn_blocking(move || compress::brotli(&data)).await
            else {
                return;
            };
            tracing::debug!(
                path = &*key,
                bytes = br.len(),
                seconds = started.elapsed().as_secs_f64(),
                "asset brotli variant ready"
            );
            let upgraded = Arc::new(asset.with_brotli(br));
            shared.store().upgrade(&key, upgraded);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache(max_bytes: usize, revalidate: Duration) -> AssetCache {
        let config = AssetCacheConfig {
            max_bytes,
            max_file: 1 << 20,
            paths: vec!["/assets/".to_owned()],
            revalidate,
        };
        AssetCache::new(&config, crate::metrics::Metrics::new().asset_cache)
    }

    fn get(path: &str) -> Request<()> {
        Request::builder()
            .uri(path)
            .header(header::ACCEPT_ENCODING, "gzip")
            .body(())
            .unwrap()
    }

    fn file(body: &'static str) -> Result<Response<ProxyBody>, ProxyError> {
        Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/javascript")
            .header(header::CONTENT_LENGTH, body.len())
            .body(ProxyBody::full(body))
            .unwrap())
    }

    async fn body(response: Response<ProxyBody>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_stored_file_is_served_without_the_backend() {
        let cache = cache(1 << 20, Duration::from_secs(60));
        let fetches = AtomicUsize::new(0);
        let fetch = |req: Request<()>| {
            fetches.fetch_add(1, Ordering::SeqCst);
            assert_eq!(req.headers()[header::ACCEPT_ENCODING], "identity");
            async { file("let x = 1;") }
        };
        let first = cache
            .serve(get("/assets/index-DkR3x9aB.js"), fetch)
            .await
            .unwrap();
        assert_eq!(body(first).await, "let x = 1;");
        let second = cache
            .serve(get("/assets/index-DkR3x9aB.js"), |_| async {
                file("other")
            })
            .await
            .unwrap();
        assert_eq!(second.headers()[header::CACHE_CONTROL], asset::IMMUTABLE);
        assert_eq!(body(second).await, "let x = 1;");
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_is_not_remembered_and_a_cancelled_one_frees_the_name() {
        let cache = cache(1 << 20, Duration::from_secs(60));
        let failed = cache
            .serve(get("/assets/index-DkR3x9aB.js"), |_| async {
                Err(ProxyError::BackendRefused)
            })
            .await;
        assert!(matches!(failed, Err(ProxyError::BackendRefused)));
        // A fill whose client went away (its future dropped) leaves no flight behind.
        let never = cache.serve(get("/assets/index-DkR3x9aB.js"), |_| std::future::pending());
        assert!(
            tokio::time::timeout(Duration::from_millis(10), never)
                .await
                .is_err()
        );
        let ok = cache
            .serve(get("/assets/index-DkR3x9aB.js"), |_| async { file("ok") })
            .await
            .unwrap();
        assert_eq!(body(ok).await, "ok");
    }

    #[tokio::test]
    async fn off_means_every_request_goes_to_the_backend() {
        let cache = cache(0, Duration::from_secs(60));
        for _ in 0..2 {
            let r = cache
                .serve(
                    get("/assets/index-DkR3x9aB.js"),
                    |req: Request<()>| async move {
                        assert_eq!(req.headers()[header::ACCEPT_ENCODING], "gzip");
                        file("passed")
                    },
                )
                .await
                .unwrap();
            assert!(!r.headers().contains_key(header::CACHE_CONTROL));
        }
    }
}
