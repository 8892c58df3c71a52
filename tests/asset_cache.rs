//! The asset cache over real sockets: Chainlit-like static files from a fixture backend that
//! counts what reaches it, through chatgate, with real HTTP clients.

mod support;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;
use tokio::sync::watch;

const BUNDLE: &str = "/assets/index-DkR3x9aB.js";
const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";

/// One file the fixture serves.
#[derive(Clone)]
struct File {
    status: u16,
    body: Bytes,
    content_type: &'static str,
    extra: Vec<(&'static str, &'static str)>,
    /// Sent without `Content-Length` (chunked).
    chunked: bool,
    /// Held until the test releases the gate.
    held: bool,
}

impl File {
    fn new(body: impl Into<Bytes>, content_type: &'static str) -> File {
        File {
            status: 200,
            body: body.into(),
            content_type,
            extra: Vec::new(),
            chunked: false,
            held: false,
        }
    }

    fn js(body: impl Into<Bytes>) -> File {
        File::new(body, "text/javascript; charset=utf-8")
    }

    fn with(mut self, name: &'static str, value: &'static str) -> File {
        self.extra.push((name, value));
        self
    }

    /// The fixture's own validator: changes with the bytes, like a real one would.
    fn etag(&self) -> String {
        format!(
            "\"fixture-{:x}-{}\"",
            self.body.len(),
            self.body.first().copied().unwrap_or(0)
        )
    }
}

/// A static-file backend like Chainlit's: files by path, `ETag` and `Last-Modified`,
/// 304 for a matching `If-None-Match`, ranges, 404 otherwise. It counts requests per path
/// and keeps every request's headers.
#[derive(Default)]
struct Files {
    files: Mutex<HashMap<String, File>>,
    counts: Mutex<HashMap<String, usize>>,
    seen: Mutex<Vec<(String, HeaderMap)>>,
}

impl Files {
    fn set(&self, path: &str, file: File) {
        self.files.lock().unwrap().insert(path.to_owned(), file);
    }

    fn remove(&self, path: &str) {
        self.files.lock().unwrap().remove(path);
    }

    fn count(&self, path: &str) -> usize {
        self.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn last_headers(&self, path: &str) -> HeaderMap {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .rev()
            .find(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
            .unwrap_or_default()
    }
}

struct Fixture {
    files: Arc<Files>,
    release: watch::Sender<bool>,
    backend: Backend,
}

async fn fixture() -> Fixture {
    let files = Arc::new(Files::default());
    let (release, gate) = watch::channel(false);
    let state = Arc::clone(&files);
    let backend = Backend::start(handler(move |req: Request<Incoming>| {
        let files = Arc::clone(&state);
        let mut gate = gate.clone();
        async move {
            let path = req.uri().path().to_owned();
            *files
                .counts
                .lock()
                .unwrap()
                .entry(path.clone())
                .or_default() += 1;
            files
                .seen
                .lock()
                .unwrap()
                .push((path.clone(), req.headers().clone()));
            let file = files.files.lock().unwrap().get(&path).cloned();
            let Some(file) = file else {
                return text(404, "not found");
            };
            if file.held {
                let _ = gate.wait_for(|open| *open).await;
            }
            serve_file(&req, &file)
        }
    }))
    .await;
    Fixture {
        files,
        release,
        backend,
    }
}

fn serve_file(req: &Request<Incoming>, file: &File) -> Response<TestBody> {
    let etag = file.etag();
    let mut response = Response::builder()
        .status(file.status)
        .header("content-type", file.content_type)
        .header("etag", &etag)
        .header("last-modified", LAST_MODIFIED)
        // As Chainlit's CORS and gzip middlewares say on every answer.
        .header("vary", "Origin, Accept-Encoding");
    for (name, value) in &file.extra {
        response = response.header(*name, *value);
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if file.status == 200 && header("if-none-match") == Some(etag.as_str()) {
        return response.status(304).body(full("")).unwrap();
    }
    if let Some(range) = header("range").and_then(|r| r.strip_prefix("bytes=")) {
        let (from, to) = range.split_once('-').unwrap();
        let (from, to): (usize, usize) = (from.parse().unwrap(), to.parse().unwrap());
        let part = file.body.slice(from..=to);
        return response
            .status(206)
            .header(
                "content-range",
                format!("bytes {from}-{to}/{}", file.body.len()),
            )
            .body(full(part))
            .unwrap();
    }
    if file.chunked {
        let chunks = file.body.chunks(1024).map(Bytes::copy_from_slice).collect();
        return response.body(slow_body(chunks, Duration::ZERO)).unwrap();
    }
    response.body(full(file.body.clone())).unwrap()
}

/// A JavaScript file of `lines` distinct lines: compressible, like a bundle.
fn script(lines: usize, seed: &str) -> Bytes {
    Bytes::from(
        (0..lines)
            .map(|i| {
                format!(
                    "export function {seed}{i}(x) {{ return x * {i} + {}; }}\n",
                    i % 7
                )
            })
            .collect::<String>(),
    )
}

/// Bytes that don't compress (an image, say).
fn noise(len: usize, seed: u32) -> Bytes {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn fetch(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = request(method, addr, path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(addr, req.body(full("")).unwrap())
        .await
        .expect("a response")
}

fn decoded(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    match reply.header("content-encoding") {
        "" => out.extend_from_slice(&reply.body),
        "gzip" => {
            flate2::read::GzDecoder::new(&reply.body[..])
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        "br" => {
            brotli::Decompressor::new(&reply.body[..], 4096)
                .read_to_end(&mut out)
                .expect("valid brotli");
        }
        other => panic!("unexpected content-encoding {other}"),
    }
    out
}

async fn metric(proxy: &Proxy, name: &str) -> f64 {
    let text = get(proxy.admin, "/monitor/metrics").await.unwrap().text();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Waits until the background brotli variant of `path` is served.
async fn wait_for_brotli(proxy: &Proxy, path: &str) {
    eventually("the brotli variant", async || {
        fetch(proxy.addr, "GET", path, &[("accept-encoding", "br")])
            .await
            .header("content-encoding")
            == "br"
    })
    .await;
}

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

#[tokio::test]
async fn concurrent_first_requests_make_one_backend_fetch() {
    let fx = fixture().await;
    let original = script(3000, "f");
    fx.files.set(
        BUNDLE,
        File {
            held: true,
            ..File::js(original.clone())
        },
    );
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                fetch(
                    addr,
                    "GET",
                    BUNDLE,
                    &[("accept-encoding", "gzip, deflate, br")],
                )
                .await
            })
        })
        .collect();
    // Held at the backend until the other 19 are waiting for that one fetch.
    eventually("the first fetch", async || fx.files.count(BUNDLE) == 1).await;
    eventually("19 requests coalesced", async || {
        metric(&proxy, "chatgate_asset_cache_coalesced_total").await == 19.0
    })
    .await;
    fx.release.send_replace(true);
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("content-encoding"),
            "gzip",
            "brotli comes later"
        );
        assert_eq!(decoded(&reply), original);
    }
    assert_eq!(fx.files.count(BUNDLE), 1);
    let fetched = fx.files.last_headers(BUNDLE);
    assert_eq!(
        fetched["accept-encoding"], "identity",
        "fetched uncompressed"
    );
}

#[tokio::test]
async fn a_failed_first_fetch_sends_each_waiter_to_the_backend() {
    let fx = fixture().await;
    let file = File {
        status: 503,
        held: true,
        ..File::js("busy")
    };
    fx.files.set(BUNDLE, file);
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(
                async move { fetch(addr, "GET", BUNDLE, &[("accept-encoding", "gzip")]).await },
            )
        })
        .collect();
    eventually("the first fetch", async || fx.files.count(BUNDLE) == 1).await;
    eventually("4 requests coalesced", async || {
        metric(&proxy, "chatgate_asset_cache_coalesced_total").await == 4.0
    })
    .await;
    fx.release.send_replace(true);
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.text(), "busy");
    }
    assert_eq!(
        fx.files.count(BUNDLE),
        5,
        "every waiter asked the backend itself"
    );
    // Each waiter's own request went as it came: its Accept-Encoding, not the cache's.
    assert_eq!(fx.files.last_headers(BUNDLE)["accept-encoding"], "gzip");
}

#[tokio::test]
async fn cached_files_carry_immutable_validators_and_the_backends_type() {
    let fx = fixture().await;
    let original = script(2000, "g");
    fx.files.set(
        BUNDLE,
        File::js(original.clone()).with("x-content-type-options", "nosniff"),
    );
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    let first = fetch(proxy.addr, "GET", BUNDLE, &[("accept-encoding", "gzip")]).await;
    let second = fetch(proxy.addr, "GET", BUNDLE, &[("accept-encoding", "gzip")]).await;
    for reply in [&first, &second] {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("cache-control"), IMMUTABLE);
        assert_eq!(reply.header("vary"), "origin, accept-encoding");
        assert_eq!(
            reply.header("content-type"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(reply.header("x-content-type-options"), "nosniff");
        assert_eq!(reply.header("last-modified"), LAST_MODIFIED);
        assert_eq!(reply.header("content-length"), reply.body.len().to_string());
        assert!(reply.header("etag").starts_with('"') && reply.header("etag").ends_with("-gzip\""));
        assert!(!reply.header("x-request-id").is_empty());
        assert_eq!(decoded(reply), original);
    }
    assert_eq!(first.header("etag"), second.header("etag"));
    assert_eq!(fx.files.count(BUNDLE), 1);
    assert_eq!(metric(&proxy, "chatgate_asset_cache_hits_total").await, 1.0);
    assert_eq!(
        metric(&proxy, "chatgate_asset_cache_misses_total").await,
        1.0
    );
    assert_eq!(metric(&proxy, "chatgate_asset_cache_entries").await, 1.0);
    let memory = metric(&proxy, "chatgate_asset_cache_memory_bytes").await;
    assert!(memory > original.len() as f64, "{memory}");
    let served = metric(&proxy, "chatgate_asset_cache_bytes_served_total").await;
    assert_eq!(served, (first.body.len() + second.body.len()) as f64);
}

#[tokio::test]
async fn conditional_requests_get_304_from_the_cache() {
    let fx = fixture().await;
    fx.files.set(BUNDLE, File::js(script(500, "h")));
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    let gz = [("accept-encoding", "gzip")];
    let first = fetch(proxy.addr, "GET", BUNDLE, &gz).await;
    let etag = first.header("etag").to_owned();
    let revalidated = fetch(
        proxy.addr,
        "GET",
        BUNDLE,
        &[gz[0], ("if-none-match", etag.as_str())],
    )
    .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert!(revalidated.body.is_empty());
    assert_eq!(revalidated.header("etag"), etag);
    assert_eq!(revalidated.header("cache-control"), IMMUTABLE);
    assert_eq!(revalidated.header("vary"), "origin, accept-encoding");
    let listed = format!("\"other\", W/{etag}");
    let weak = fetch(
        proxy.addr,
        "GET",
        BUNDLE,
        &[gz[0], ("if-none-match", listed.as_str())],
    )
    .await;
    assert_eq!(
        weak.status,
        StatusCode::NOT_MODIFIED,
        "weak comparison, any tag in the list"
    );
    // The identity variant's tag does not validate the gzip variant.
    let plain = fetch(proxy.addr, "GET", BUNDLE, &[]).await;
    let other = fetch(
        proxy.addr,
        "GET",
        BUNDLE,
        &[gz[0], ("if-none-match", plain.header("etag"))],
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    let since = fetch(
        proxy.addr,
        "GET",
        BUNDLE,
        &[gz[0], ("if-modified-since", LAST_MODIFIED)],
    )
    .await;
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    let before = "Tue, 20 Oct 2015 07:28:00 GMT";
    let older = fetch(
        proxy.addr,
        "GET",
        BUNDLE,
        &[gz[0], ("if-modified-since", before)],
    )
    .await;
    assert_eq!(older.status, StatusCode::OK);
    assert_eq!(fx.files.count(BUNDLE), 1, "all answered from memory");
}

#[tokio::test]
async fn head_is_answered_from_the_cache_once_it_holds_the_file() {
    let fx = fixture().await;
    let original = script(500, "i");
    fx.files.set(BUNDLE, File::js(original.clone()));
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    // A HEAD cannot fill the cache (no body to keep): it goes to the backend.
    let miss = fetch(proxy.addr, "HEAD", BUNDLE, &[]).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_ne!(miss.header("cache-control"), IMMUTABLE);
    assert_eq!(fx.files.count(BUNDLE), 1);
    let get = fetch(proxy.addr, "GET", BUNDLE, &[("accept-encoding", "gzip")]).await;
    let head = fetch(proxy.addr, "HEAD", BUNDLE, &[("accept-encoding", "gzip")]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert_eq!(head.header("etag"), get.header("etag"));
    assert_eq!(head.header("content-encoding"), "gzip");
    assert_eq!(head.header("cache-control"), IMMUTABLE);
    assert_eq!(fx.files.count(BUNDLE), 2);
}

#[tokio::test]
async fn uncacheable_answers_are_never_cached() {
    let fx = fixture().await;
    let big = script(400, "big"); // ~18 KB, over the 10,000-byte file limit below
    let cases = [
        (
            "/assets/nostore-Ab3dEf9h.js",
            File::js("a").with("cache-control", "no-store"),
        ),
        (
            "/assets/private-Ab3dEf9h.js",
            File::js("b").with("cache-control", "private, max-age=60"),
        ),
        (
            "/assets/cookie-Ab3dEf9h.js",
            File::js("c").with("set-cookie", "s=1; HttpOnly"),
        ),
        (
            "/assets/vary-Ab3dEf9h.js",
            File::js("d").with("vary", "Cookie"),
        ),
        (
            "/assets/chunked-Ab3dEf9h.js",
            File {
                chunked: true,
                ..File::js(script(300, "c"))
            },
        ),
        ("/assets/large-Ab3dEf9h.js", File::js(big.clone())),
        (
            "/assets/teapot-Ab3dEf9h.js",
            File {
                status: 418,
                ..File::js("e")
            },
        ),
    ];
    for (path, file) in &cases {
        fx.files.set(path, file.clone());
    }
    let proxy = Proxy::start(fx.backend.addr, &["--asset-cache-max-file", "10000"]).await;
    let missing = "/assets/missing-Ab3dEf9h.js";
    for round in 0..2 {
        for (path, file) in &cases {
            let reply = fetch(proxy.addr, "GET", path, &[("accept-encoding", "gzip")]).await;
            assert_eq!(reply.status.as_u16(), file.status, "{path}");
            assert_eq!(reply.body, file.body, "{path}: passed through whole");
            assert_ne!(reply.header("cache-control"), IMMUTABLE, "{path}");
            assert_eq!(
                fx.files.count(path),
                round + 1,
                "{path}: reached the backend"
            );
        }
        let reply = fetch(proxy.addr, "GET", missing, &[]).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(fx.files.count(missing), round + 1);
    }
    // After the first answer, later requests pass through untouched (the client's own
    // Accept-Encoding), not re-fetched uncompressed.
    let seen = fx.files.last_headers("/assets/large-Ab3dEf9h.js");
    assert_eq!(seen["accept-encoding"], "gzip");
    assert_eq!(metric(&proxy, "chatgate_asset_cache_entries").await, 0.0);
}

#[tokio::test]
async fn requests_with_authorization_or_origin_bypass_the_cache_and_cookies_do_not() {
    let fx = fixture().await;
    fx.files.set(BUNDLE, File::js(script(200, "j")));
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    let bypass = [
        ("authorization", "Bearer t"),
        ("origin", "https://other.example"),
    ];
    for header in bypass {
        for _ in 0..2 {
            let reply = fetch(proxy.addr, "GET", BUNDLE, &[header]).await;
            assert_ne!(reply.header("cache-control"), IMMUTABLE, "{header:?}");
        }
        assert_eq!(fx.files.last_headers(BUNDLE)[header.0], header.1);
    }
    assert_eq!(fx.files.count(BUNDLE), 4);
    // A page's own crossorigin script: same-origin, from the cache, fetched without Origin.
    let own = format!("http://{}", proxy.addr);
    let same_origin = [
        vec![("origin", own.as_str())],
        vec![
            ("origin", "https://chat.example"),
            ("sec-fetch-site", "same-origin"),
        ],
    ];
    for headers in &same_origin {
        let reply = fetch(proxy.addr, "GET", BUNDLE, headers).await;
        assert_eq!(reply.header("cache-control"), IMMUTABLE, "{headers:?}");
    }
    assert_eq!(fx.files.count(BUNDLE), 5);
    assert!(!fx.files.last_headers(BUNDLE).contains_key("origin"));
    for _ in 0..2 {
        let reply = fetch(
            proxy.addr,
            "GET",
            BUNDLE,
            &[("cookie", "X-Chainlit-Session-id=s")],
        )
        .await;
        assert_eq!(reply.header("cache-control"), IMMUTABLE);
    }
    assert_eq!(fx.files.count(BUNDLE), 5);
}

#[tokio::test]
async fn the_memory_bound_holds_by_evicting_the_least_recently_used() {
    let fx = fixture().await;
    let limit = 300_000;
    let paths: Vec<String> = (0..24)
        .map(|i| format!("/assets/image{i}-Ab3dEf9h.png"))
        .collect();
    for (i, path) in paths.iter().enumerate() {
        fx.files
            .set(path, File::new(noise(40_000, i as u32 + 1), "image/png"));
    }
    let limit_flag = limit.to_string();
    let proxy = Proxy::start(fx.backend.addr, &["--asset-cache-bytes", &limit_flag]).await;
    for path in &paths {
        let reply = fetch(proxy.addr, "GET", path, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 40_000);
        let memory = metric(&proxy, "chatgate_asset_cache_memory_bytes").await;
        assert!(memory <= limit as f64, "{memory} > {limit}");
    }
    let entries = metric(&proxy, "chatgate_asset_cache_entries").await;
    assert!((1.0..=7.0).contains(&entries), "{entries} entries");
    // The newest is still held, the oldest was evicted.
    let last = paths.last().unwrap();
    fetch(proxy.addr, "GET", last, &[]).await;
    assert_eq!(fx.files.count(last), 1);
    fetch(proxy.addr, "GET", &paths[0], &[]).await;
    assert_eq!(fx.files.count(&paths[0]), 2);
}

#[tokio::test]
async fn encodings_are_negotiated_and_decompress_to_the_original() {
    let fx = fixture().await;
    let original = script(2000, "k");
    fx.files.set(BUNDLE, File::js(original.clone()));
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    fetch(proxy.addr, "GET", BUNDLE, &[("accept-encoding", "gzip")]).await;
    wait_for_brotli(&proxy, BUNDLE).await;
    let cases: &[(Option<&str>, &str)] = &[
        (Some("gzip, deflate, br, zstd"), "br"),
        (Some("br"), "br"),
        (Some("gzip"), "gzip"),
        (Some("gzip;q=1.0, br;q=0.5"), "gzip"),
        (Some("br;q=0, gzip"), "gzip"),
        (Some("*"), "br"),
        (Some("deflate"), ""),
        (Some(""), ""),
        (None, ""),
        (Some("identity;q=0"), ""), // nothing acceptable: identity anyway
        (Some("identity;q=0, gzip;q=0.1"), "gzip"),
    ];
    let mut etags = HashMap::new();
    for (accept, expected) in cases {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept-encoding", *a)).collect();
        let reply = fetch(proxy.addr, "GET", BUNDLE, &headers).await;
        assert_eq!(reply.header("content-encoding"), *expected, "{accept:?}");
        assert_eq!(
            reply.header("vary"),
            "origin, accept-encoding",
            "{accept:?}"
        );
        assert_eq!(decoded(&reply), original, "{accept:?}");
        etags
            .entry(expected.to_string())
            .or_insert_with(|| reply.header("etag").to_owned());
        assert_eq!(
            etags[*expected],
            reply.header("etag"),
            "one tag per variant"
        );
    }
    let (br, gz, id) = (&etags["br"], &etags["gzip"], &etags[""]);
    assert!(br != id && gz != id && br != gz, "{etags:?}");
    assert_eq!(fx.files.count(BUNDLE), 1);
}

#[tokio::test]
async fn range_requests_pass_through_to_the_backend() {
    let fx = fixture().await;
    let original = script(200, "l");
    fx.files.set(BUNDLE, File::js(original.clone()));
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    fetch(proxy.addr, "GET", BUNDLE, &[]).await;
    let part = fetch(proxy.addr, "GET", BUNDLE, &[("range", "bytes=0-9")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, original.slice(0..10));
    assert_eq!(fx.files.count(BUNDLE), 2);
}

#[tokio::test]
async fn other_paths_and_spellings_are_untouched() {
    let fx = fixture().await;
    let paths = [
        "/public/index-DkR3x9aB.js",
        "/assets/index.js",
        "/assets/index-DkR3x9aB.js?v=2",
        "/assets/index-DkR3x9a%42.js",
        "/",
    ];
    for path in paths {
        let plain = path.split('?').next().unwrap();
        fx.files.set(plain, File::js(script(100, "m")));
    }
    let proxy = Proxy::start(fx.backend.addr, &[]).await;
    for round in 1..=2 {
        for path in paths {
            let reply = fetch(proxy.addr, "GET", path, &[("accept-encoding", "gzip")]).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}");
            assert_ne!(reply.header("cache-control"), IMMUTABLE, "{path}");
            let plain = path.split('?').next().unwrap();
            assert_eq!(fx.files.count(plain), round, "{path}");
            assert_eq!(
                fx.files.last_headers(plain)["accept-encoding"],
                "gzip",
                "{path}"
            );
        }
    }
    assert_eq!(
        metric(&proxy, "chatgate_asset_cache_misses_total").await,
        0.0
    );
}

#[tokio::test]
async fn the_cache_follows_the_configured_prefixes_and_turns_off() {
    let fx = fixture().await;
    let static_file = "/static/js/main.3f2a1b9c8d7e6f5a.js";
    fx.files.set(static_file, File::js(script(100, "n")));
    fx.files.set(BUNDLE, File::js(script(100, "o")));
    let proxy = Proxy::start(fx.backend.addr, &["--asset-cache-paths", "/static/"]).await;
    for _ in 0..2 {
        fetch(proxy.addr, "GET", static_file, &[]).await;
        fetch(proxy.addr, "GET", BUNDLE, &[]).await;
    }
    assert_eq!(
        (fx.files.count(static_file), fx.files.count(BUNDLE)),
        (1, 2)
    );
    let off = Proxy::start(fx.backend.addr, &["--asset-cache-bytes", "0"]).await;
    for _ in 0..2 {
        let reply = fetch(off.addr, "GET", BUNDLE, &[]).await;
        assert_ne!(reply.header("cache-control"), IMMUTABLE);
    }
    assert_eq!(fx.files.count(BUNDLE), 4);
}

#[tokio::test]
async fn new_bytes_under_the_same_name_are_served_after_revalidation() {
    let fx = fixture().await;
    let old = script(300, "old");
    let new = script(320, "new");
    fx.files.set(BUNDLE, File::js(old.clone()));
    let stable = "/assets/stable-Ab3dEf9h.js";
    fx.files.set(stable, File::js(script(300, "stable")));
    let gone = "/assets/gone-Ab3dEf9h.js";
    fx.files.set(gone, File::js(script(300, "gone")));
    let proxy = Proxy::start(fx.backend.addr, &["--asset-cache-revalidate", "0.3"]).await;
    let gz = [("accept-encoding", "gzip")];
    for path in [BUNDLE, stable, gone] {
        assert_eq!(
            fetch(proxy.addr, "GET", path, &gz).await.status,
            StatusCode::OK
        );
    }
    let first_etag = fetch(proxy.addr, "GET", BUNDLE, &gz)
        .await
        .header("etag")
        .to_owned();

    // The backend restarts with other bytes under the same name, and drops a file.
    fx.files.set(BUNDLE, File::js(new.clone()));
    fx.files.remove(gone);
    eventually("the new bytes", async || {
        decoded(&fetch(proxy.addr, "GET", BUNDLE, &gz).await) == new
    })
    .await;
    let after = fetch(proxy.addr, "GET", BUNDLE, &gz).await;
    assert_eq!(decoded(&after), new);
    assert_ne!(after.header("etag"), first_etag);
    assert_eq!(after.header("cache-control"), IMMUTABLE);
    eventually("the dropped file's 404", async || {
        fetch(proxy.addr, "GET", gone, &gz).await.status == StatusCode::NOT_FOUND
    })
    .await;

    // An unchanged file is checked with the backend's own validator and kept (304).
    eventually("a conditional check of the unchanged file", async || {
        fetch(proxy.addr, "GET", stable, &gz).await;
        fx.files.last_headers(stable).contains_key("if-none-match")
    })
    .await;
    let checked = fx.files.last_headers(stable);
    assert_eq!(checked["accept-encoding"], "identity");
    assert_eq!(checked["if-modified-since"], LAST_MODIFIED);
    let reply = fetch(proxy.addr, "GET", stable, &gz).await;
    assert_eq!(reply.header("cache-control"), IMMUTABLE);
    assert_eq!(decoded(&reply), script(300, "stable"));
    // Checks are spaced by the interval, not made per request.
    let before = fx.files.count(stable);
    for _ in 0..5 {
        fetch(proxy.addr, "GET", stable, &gz).await;
    }
    assert!(fx.files.count(stable) <= before + 1);
}
