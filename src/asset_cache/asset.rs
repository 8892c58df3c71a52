//! One cached file: its bytes and compressed variants, each with the response headers it is
//! served with, the backend's validators for revalidation, and when it was last checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::compress;
use super::negotiate::{self, Coding};
use super::policy;
use crate::body::ProxyBody;

/// Content-hashed names never change content: browsers may keep them a year without asking
/// again (RFC 8246 `immutable`).
pub const IMMUTABLE: HeaderValue = HeaderValue::from_static("public, max-age=31536000, immutable");

/// What an entry costs beyond its bodies (header maps, key, bookkeeping), counted against the
/// memory bound so that many tiny files cannot exceed it.
pub const ENTRY_OVERHEAD: usize = 2048;

/// Backend headers not repeated from the cache: framing and coding (the cache sets its own),
/// validators and freshness (replaced), and per-exchange ones (`Date` comes fresh from hyper,
/// the request id from the gateway).
const NOT_REPEATED: [HeaderName; 13] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::CONTENT_RANGE,
    header::ACCEPT_RANGES,
    header::ETAG,
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::PRAGMA,
    header::AGE,
    header::VARY,
    header::DATE,
    header::SET_COOKIE,
];

/// One stored representation.
pub struct Variant {
    pub body: Bytes,
    pub etag: HeaderValue,
    headers: HeaderMap,
}

/// The backend's own validators, sent back to it when the entry is revalidated.
#[derive(Clone, Default)]
pub struct Validators {
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<HeaderValue>,
}

/// When an entry was last known to match the backend, and whether a request is checking it
/// now. Shared by an entry and its brotli-upgraded copy.
#[derive(Default)]
pub struct Freshness {
    checked_ms: AtomicU64,
    checking: AtomicBool,
}

impl Freshness {
    fn new(now_ms: u64) -> Self {
        Freshness {
            checked_ms: AtomicU64::new(now_ms),
            checking: AtomicBool::new(false),
        }
    }

    pub fn is_due(&self, now_ms: u64, interval_ms: u64) -> bool {
        now_ms.saturating_sub(self.checked_ms.load(Ordering::Relaxed)) >= interval_ms
    }
}

/// The one check of an entry in progress; dropping it (even when the request is cancelled)
/// lets the next request check instead.
pub struct Check {
    freshness: Arc<Freshness>,
}

impl Check {
    /// `None` when another request is checking the entry already.
    pub fn begin(freshness: &Arc<Freshness>) -> Option<Check> {
        freshness
            .checking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| Check {
                freshness: Arc::clone(freshness),
            })
    }

    /// The backend was asked (whatever it said): the next check is an interval away.
    pub fn done(self, now_ms: u64) {
        self.freshness.checked_ms.store(now_ms, Ordering::Relaxed);
    }
}

impl Drop for Check {
    fn drop(&mut self) {
        self.freshness.checking.store(false, Ordering::Release);
    }
}

/// A cached file.
pub struct Asset {
    /// The backend's headers repeated on every answer (`Content-Type`, `Last-Modified`, ...).
    base: HeaderMap,
    pub identity: Variant,
    pub gzip: Option<Variant>,
    pub br: Option<Variant>,
    pub digest: u64,
    pub last_modified: Option<SystemTime>,
    pub validators: Validators,
    pub freshness: Arc<Freshness>,
    /// Whether compressed variants are (or will be) offered.
    pub compressible: bool,
    /// The `Vary` of every answer: the backend's (`Origin` for Chainlit), plus
    /// `accept-encoding` when compressed variants are offered (identity included).
    vary: Option<HeaderValue>,
    weight: usize,
}

impl Asset {
    /// Builds an entry from the backend's answer: its digest and gzip variant are computed
    /// here, so call it on a blocking thread. Brotli comes later ([`Asset::with_brotli`]).
    pub fn build(backend: &HeaderMap, body: Bytes, digest: u64, now_ms: u64) -> Asset {
        let mut base = backend.clone();
        for name in &NOT_REPEATED {
            base.remove(name);
        }
        let compressible = compress::is_compressible(base.get(header::CONTENT_TYPE));
        let vary = vary(backend, compressible);
        let gzip = if compressible {
            compress::gzip(&body)
        } else {
            None
        };
        let mut asset = Asset {
            identity: variant(&base, Coding::Identity, body, digest, vary.as_ref()),
            gzip: gzip.map(|gz| variant(&base, Coding::Gzip, gz, digest, vary.as_ref())),
            br: None,
            digest,
            last_modified: backend
                .get(header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok()),
            validators: Validators {
                etag: backend.get(header::ETAG).cloned(),
                last_modified: backend.get(header::LAST_MODIFIED).cloned(),
            },
            freshness: Arc::new(Freshness::new(now_ms)),
            compressible,
            vary,
            base,
            weight: 0,
        };
        asset.weight = asset.bodies() + ENTRY_OVERHEAD;
        asset
    }

    /// The same entry with a brotli variant added.
    pub fn with_brotli(&self, br: Bytes) -> Asset {
        let br = variant(
            &self.base,
            Coding::Brotli,
            br,
            self.digest,
            self.vary.as_ref(),
        );
        let mut upgraded = Asset {
            base: self.base.clone(),
            identity: self.identity.clone(),
            gzip: self.gzip.clone(),
            br: Some(br),
            digest: self.digest,
            last_modified: self.last_modified,
            validators: self.validators.clone(),
            freshness: Arc::clone(&self.freshness),
            compressible: self.compressible,
            vary: self.vary.clone(),
            weight: 0,
        };
        upgraded.weight = upgraded.bodies() + ENTRY_OVERHEAD;
        upgraded
    }

    fn bodies(&self) -> usize {
        self.identity.body.len()
            + self.gzip.as_ref().map_or(0, |v| v.body.len())
            + self.br.as_ref().map_or(0, |v| v.body.len())
    }

    /// Bytes counted against the memory bound.
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// The variant a request gets: negotiated from its `Accept-Encoding`.
    pub fn variant_for(&self, request: &HeaderMap) -> &Variant {
        let accept = request.get_all(header::ACCEPT_ENCODING);
        match negotiate::choose(accept, self.br.is_some(), self.gzip.is_some()) {
            Coding::Brotli => self.br.as_ref().unwrap_or(&self.identity),
            Coding::Gzip => self.gzip.as_ref().unwrap_or(&self.identity),
            Coding::Identity => &self.identity,
        }
    }

    /// The answer to a GET or HEAD from memory: 304 when the request's validators match the
    /// chosen variant, else 200 with its bytes (none for HEAD). Returns the body bytes sent.
    pub fn respond(&self, request: &HeaderMap, head: bool) -> (Response<ProxyBody>, usize) {
        let variant = self.variant_for(request);
        if policy::not_modified(request, &variant.etag, self.last_modified) {
            // RFC 9110 §15.4.5: the fields a 200 would carry for caches to update, no content
            // metadata.
            let mut response = Response::new(ProxyBody::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            let headers = response.headers_mut();
            headers.insert(header::ETAG, variant.etag.clone());
            headers.insert(header::CACHE_CONTROL, IMMUTABLE);
            if let Some(vary) = &self.vary {
                headers.insert(header::VARY, vary.clone());
            }
            return (response, 0);
        }
        let (body, sent) = if head {
            (ProxyBody::empty(), 0)
        } else {
            (ProxyBody::full(variant.body.clone()), variant.body.len())
        };
        let mut response = Response::new(body);
        *response.headers_mut() = variant.headers.clone();
        (response, sent)
    }
}

impl Clone for Variant {
    fn clone(&self) -> Self {
        Variant {
            body: self.body.clone(),
            etag: self.etag.clone(),
            headers: self.headers.clone(),
        }
    }
}

/// The backend's `Vary` elements other than `Accept-Encoding` (only `Origin` is storable),
/// then `accept-encoding` if the cache offers codings; `None` when that leaves nothing.
fn vary(backend: &HeaderMap, compressible: bool) -> Option<HeaderValue> {
    let mut elements: Vec<String> = Vec::new();
    for element in policy::tokens(backend, header::VARY) {
        let element = element.to_ascii_lowercase();
        if element != "accept-encoding" && !elements.contains(&element) {
            elements.push(element);
        }
    }
    if compressible {
        elements.push("accept-encoding".to_owned());
    }
    HeaderValue::from_str(&elements.join(", "))
        .ok()
        .filter(|v| !v.is_empty())
}

/// A variant with its headers: the backend's base headers plus length, coding, a strong
/// `ETag` per variant (`"<digest>"`, `"<digest>-gzip"`, `"<digest>-br"`: RFC 9110 §8.8.3
/// wants a different tag for each coding), `Cache-Control` and `Vary`.
fn variant(
    base: &HeaderMap,
    coding: Coding,
    body: Bytes,
    digest: u64,
    vary: Option<&HeaderValue>,
) -> Variant {
    let etag = match coding.header() {
        Some(name) => format!("\"{digest:016x}-{name}\""),
        None => format!("\"{digest:016x}\""),
    };
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    let mut headers = base.clone();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(name) = coding.header() {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(name));
    }
    headers.insert(header::ETAG, etag.clone());
    headers.insert(header::CACHE_CONTROL, IMMUTABLE);
    if let Some(vary) = vary {
        headers.insert(header::VARY, vary.clone());
    }
    Variant {
        body,
        etag,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(header::ETAG, HeaderValue::from_static("\"backend\""));
        h.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(
            header::VARY,
            HeaderValue::from_static("Origin, Accept-Encoding"),
        );
        h.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        h
    }

    fn js() -> Bytes {
        Bytes::from("console.log('hello, world');\n".repeat(200))
    }

    #[test]
    fn variants_carry_their_own_headers() {
        let asset = Asset::build(&backend_headers(), js(), 0xabc, 0);
        let asset = asset.with_brotli(compress::brotli(&asset.identity.body).unwrap());
        let mut request = HeaderMap::new();
        request.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        let (response, sent) = asset.respond(&request, false);
        let h = response.headers();
        assert_eq!(h[header::CONTENT_ENCODING], "br");
        assert_eq!(h[header::ETAG], "\"0000000000000abc-br\"");
        assert_eq!(
            h[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(h[header::VARY], "origin, accept-encoding");
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h[header::LAST_MODIFIED], "Wed, 21 Oct 2015 07:28:00 GMT");
        assert!(!h.contains_key(header::ACCEPT_RANGES));
        assert_eq!(h[header::CONTENT_LENGTH], sent.to_string().as_str());
        assert_eq!(asset.validators.etag.as_ref().unwrap(), "\"backend\"");

        let (plain, sent) = asset.respond(&HeaderMap::new(), false);
        assert_eq!(plain.headers()[header::ETAG], "\"0000000000000abc\"");
        assert!(!plain.headers().contains_key(header::CONTENT_ENCODING));
        assert_eq!(plain.headers()[header::VARY], "origin, accept-encoding");
        assert_eq!(sent, js().len());
        assert_eq!(asset.weight(), asset.bodies() + ENTRY_OVERHEAD);
    }

    #[test]
    fn matching_validators_get_304_and_head_gets_no_body() {
        let asset = Asset::build(&backend_headers(), js(), 7, 0);
        let mut request = HeaderMap::new();
        request.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        request.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"0000000000000007-gzip\""),
        );
        let (response, sent) = asset.respond(&request, false);
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(sent, 0);
        assert_eq!(
            response.headers()[header::ETAG],
            "\"0000000000000007-gzip\""
        );
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(response.headers()[header::VARY], "origin, accept-encoding");
        // The identity tag does not validate the gzip variant.
        request.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"0000000000000007\""),
        );
        assert_eq!(asset.respond(&request, false).0.status(), StatusCode::OK);
        let (head, sent) = asset.respond(&HeaderMap::new(), true);
        assert_eq!(sent, 0);
        assert_eq!(
            head.headers()[header::CONTENT_LENGTH],
            js().len().to_string().as_str()
        );
    }

    #[test]
    fn images_get_no_compressed_variant_and_no_vary() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        let asset = Asset::build(&h, js(), 1, 0);
        assert!(asset.gzip.is_none() && !asset.compressible);
        let mut request = HeaderMap::new();
        request.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        let (response, _) = asset.respond(&request, false);
        assert!(!response.headers().contains_key(header::CONTENT_ENCODING));
        assert!(!response.headers().contains_key(header::VARY));
    }

    #[test]
    fn one_check_at_a_time_and_only_when_due() {
        let freshness = Arc::new(Freshness::new(1_000));
        assert!(!freshness.is_due(1_500, 1_000));
        assert!(freshness.is_due(2_000, 1_000));
        let check = Check::begin(&freshness).unwrap();
        assert!(Check::begin(&freshness).is_none());
        check.done(2_000);
        assert!(!freshness.is_due(2_500, 1_000));
        assert!(
            Check::begin(&freshness).is_some(),
            "a finished check frees the slot"
        );
    }
}
