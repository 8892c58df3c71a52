//! What the asset cache may answer and keep: content-hashed names, the requests it looks up,
//! the backend answers it stores, and conditional requests. Pure functions of names and
//! headers.

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};

/// Whether a file name carries a content hash the way bundlers write them: Vite/Rollup's
/// `index-DkR3x9aB.js` or `Dataframe-C3BiVi2-.js` (8 base64url characters after `-` or `.`),
/// webpack's `main.3f2a1b9c8d7e6f5a.js` (8 to 64 alphanumerics). A source map
/// (`index-DkR3x9aB.js.map`) counts too. Only such names are promised `immutable`.
pub fn is_hashed_name(file: &str) -> bool {
    let Some(stem) = strip_extension(file) else {
        return false;
    };
    let stem = if file.ends_with(".map") {
        strip_extension(stem).unwrap_or(stem)
    } else {
        stem
    };
    rollup_hash(stem) || webpack_hash(stem)
}

/// `name.ext` → `name`, for an extension of 1 to 10 alphanumerics and a non-empty name.
fn strip_extension(file: &str) -> Option<&str> {
    let (stem, ext) = file.rsplit_once('.')?;
    let plain_ext = (1..=10).contains(&ext.len()) && ext.bytes().all(|b| b.is_ascii_alphanumeric());
    (plain_ext && !stem.is_empty()).then_some(stem)
}

/// The last 8 characters, after a `-` or `.`, are base64url (Rollup may put `-` and `_` in
/// the hash itself, so the separator is found by position, not by splitting).
fn rollup_hash(stem: &str) -> bool {
    const LEN: usize = 8;
    let bytes = stem.as_bytes();
    if bytes.len() < LEN + 2 {
        return false;
    }
    let hash = &bytes[bytes.len() - LEN..];
    let separator = bytes[bytes.len() - LEN - 1];
    matches!(separator, b'-' | b'.')
        && hash
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        && looks_random(hash)
}

fn webpack_hash(stem: &str) -> bool {
    let Some((name, hash)) = stem.rsplit_once(['.', '-']) else {
        return false;
    };
    !name.is_empty()
        && (8..=64).contains(&hash.len())
        && hash.bytes().all(|b| b.is_ascii_alphanumeric())
        && looks_random(hash.as_bytes())
}

/// At least two of lower case, upper case and digits: `DkR3x9aB` and `3f2a1b9c` are hashes,
/// `fallback` and `20240101` (a date is not a content hash) are not. About 0.2% of real
/// 8-character hashes fail this and are simply not cached.
fn looks_random(hash: &[u8]) -> bool {
    let lower = hash.iter().any(u8::is_ascii_lowercase);
    let upper = hash.iter().any(u8::is_ascii_uppercase);
    let digit = hash.iter().any(u8::is_ascii_digit);
    usize::from(lower) + usize::from(upper) + usize::from(digit) >= 2
}

/// Whether `path` is a content-hashed file under one of `prefixes`, spelled plainly: only
/// `[A-Za-z0-9._-]` segments, no empty or dot segments, no percent-encoding. Every other
/// spelling of the same file goes to the backend, so the set of cache keys is the set of
/// real files and cannot be multiplied by re-encoding a name.
pub fn is_cacheable_path(path: &str, prefixes: &[String]) -> bool {
    let Some(rest) = prefixes.iter().find_map(|p| path.strip_prefix(p.as_str())) else {
        return false;
    };
    let plain_segments = rest.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    });
    plain_segments && rest.rsplit('/').next().is_some_and(is_hashed_name)
}

/// Why a request is not looked up in the cache (it goes to the backend as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    Method,
    Path,
    Query,
    /// RFC 9111 §3.5: a shared cache must not answer a request that carries `Authorization`
    /// with a stored response. Cookies, by contrast, are ignored: Chainlit serves `/assets/`
    /// to anyone, and browsers send its session cookie with every request.
    Authorization,
    /// A cross-origin CORS request: the backend's CORS policy answers it (Chainlit reflects
    /// `Origin` in `Access-Control-Allow-Origin` and says `Vary: Origin`).
    Origin,
    /// Ranges and `If-Range` are the backend's to answer.
    Range,
    /// `If-Match` / `If-Unmodified-Since` (412 semantics) are the backend's to answer.
    Precondition,
    Upgrade,
    Body,
}

/// Whether a request may be answered from the cache.
pub fn lookup_allowed(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    prefixes: &[String],
) -> Result<(), Bypass> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Bypass::Method);
    }
    if uri.query().is_some() {
        return Err(Bypass::Query);
    }
    if !is_cacheable_path(uri.path(), prefixes) {
        return Err(Bypass::Path);
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return Err(Bypass::Authorization);
    }
    if !is_same_origin(headers) {
        return Err(Bypass::Origin);
    }
    if headers.contains_key(header::RANGE) || headers.contains_key(header::IF_RANGE) {
        return Err(Bypass::Range);
    }
    if headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_UNMODIFIED_SINCE) {
        return Err(Bypass::Precondition);
    }
    if headers.contains_key(header::UPGRADE) {
        return Err(Bypass::Upgrade);
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return Err(Bypass::Body);
    }
    Ok(())
}

/// Whether a request is not a cross-origin one: no `Origin`, or the browser says
/// `Sec-Fetch-Site: same-origin`, or `Origin` names the request's own `Host`. Chromium sends
/// `Origin` with a page's own `crossorigin` module scripts and stylesheets (Vite marks them
/// so); a same-origin answer needs no `Access-Control-*`, so the stored, origin-neutral one
/// does. Only browsers enforce CORS, and they never call a cross-origin request same-origin.
pub fn is_same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"same-origin"))
    {
        return true;
    }
    let origin = origin.as_bytes();
    let authority = origin
        .strip_prefix(b"https://")
        .or_else(|| origin.strip_prefix(b"http://"));
    let host = headers.get(header::HOST).map(HeaderValue::as_bytes);
    matches!((authority, host), (Some(a), Some(h)) if !a.is_empty() && a.eq_ignore_ascii_case(h))
}

/// Why a backend answer is not stored (it is passed to the client as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Status,
    /// `no-store`, `private` or `no-cache` (RFC 9111 §5.2.2): the backend wants every
    /// request, or this one only for this client.
    CacheControl,
    SetCookie,
    /// `Vary` on anything but `Accept-Encoding` (which the cache handles itself) and
    /// `Origin` (the cache fetches without one and answers only same-origin requests, which
    /// need no CORS headers).
    Vary,
    /// The backend compressed despite `Accept-Encoding: identity`.
    Encoded,
    /// No `Content-Length`: the size is unknown until the end, so it streams through.
    NoLength,
    TooLarge,
}

/// Whether a backend answer to the cache's fetch may be stored; `Ok` carries its length.
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    max_file: usize,
) -> Result<usize, NotStored> {
    if status != StatusCode::OK {
        return Err(NotStored::Status);
    }
    let forbidden = tokens(headers, header::CACHE_CONTROL).any(|directive| {
        let name = directive.split('=').next().unwrap_or("").trim();
        ["no-store", "private", "no-cache"]
            .iter()
            .any(|d| name.eq_ignore_ascii_case(d))
    });
    if forbidden {
        return Err(NotStored::CacheControl);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    let handled =
        |v: &str| v.eq_ignore_ascii_case("accept-encoding") || v.eq_ignore_ascii_case("origin");
    if !tokens(headers, header::VARY).all(handled) {
        return Err(NotStored::Vary);
    }
    if tokens(headers, header::CONTENT_ENCODING).any(|c| !c.eq_ignore_ascii_case("identity")) {
        return Err(NotStored::Encoded);
    }
    if headers.contains_key(header::CONTENT_RANGE) {
        return Err(NotStored::Status);
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(NotStored::NoLength)?;
    match usize::try_from(length) {
        Ok(length) if length <= max_file => Ok(length),
        _ => Err(NotStored::TooLarge),
    }
}

/// The comma-separated elements of every line of a list header, trimmed, empty ones skipped.
pub fn tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a conditional GET/HEAD is answered 304 (RFC 9110 §13.1.2, §13.1.3, §13.2.2):
/// `If-None-Match` names `etag` (weak comparison) or is `*`; only without `If-None-Match`,
/// `If-Modified-Since` is at or after `last_modified`.
pub fn not_modified(
    headers: &HeaderMap,
    etag: &HeaderValue,
    last_modified: Option<SystemTime>,
) -> bool {
    let mut lines = headers
        .get_all(header::IF_NONE_MATCH)
        .into_iter()
        .peekable();
    if lines.peek().is_some() {
        return lines.any(|line| etag_list_matches(line.as_bytes(), etag.as_bytes()));
    }
    let (Some(since), Some(modified)) = (headers.get(header::IF_MODIFIED_SINCE), last_modified)
    else {
        return false;
    };
    since
        .to_str()
        .ok()
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .is_some_and(|since| modified <= since)
}

/// Whether an `If-None-Match` line (`*`, or entity-tags like `W/"a", "b"`) matches `etag`.
/// Entity-tags may contain commas, so the list is scanned tag by tag, not split.
fn etag_list_matches(list: &[u8], etag: &[u8]) -> bool {
    fn opaque(tag: &[u8]) -> &[u8] {
        tag.strip_prefix(b"W/").unwrap_or(tag)
    }
    let want = opaque(etag);
    let mut rest = list;
    loop {
        while let [b' ' | b'\t' | b',', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            return false;
        }
        if rest[0] == b'*' {
            return true;
        }
        let tag_start = if rest.starts_with(b"W/") { 2 } else { 0 };
        if rest.get(tag_start) != Some(&b'"') {
            return false; // malformed: no match rather than a guess
        }
        let Some(close) = rest[tag_start + 1..].iter().position(|b| *b == b'"') else {
            return false;
        };
        let end = tag_start + 1 + close + 1;
        if opaque(&rest[..end]) == want {
            return true;
        }
        rest = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_names_are_recognised() {
        for name in [
            "index-DkR3x9aB.js",
            "index-B2u6IBgX.js",
            "index-BtjwbfYI.css",
            "Dataframe-C3BiVi2-.js",
            "Streamable-CbU_6q7f.js",
            "pdf.worker.min-qwK7q_zL.mjs",
            "react-plotly-DAV-S7j1.js",
            "index-B2u6IBgX.js.map",
            "KaTeX_Main-Regular-B22Nviop.woff2",
            "main.3f2a1b9c8d7e6f5a4b3c.js",
            "logo-a1b2c3d4.svg",
        ] {
            assert!(is_hashed_name(name), "{name}");
        }
        for name in [
            "index.js",
            "index-fallback.js",
            "app-20240101.js",
            "index-DkR3x9aB",
            "-DkR3x9aB.js",
            "DkR3x9aB.js",
            "index-DkR3x9a.js",
            "index_DkR3x9aB.js",
            "index-DkR3x9aB.j$",
            ".js",
            "",
            "favicon.ico",
            "index-DkR3x9aB.verylongextension",
        ] {
            assert!(!is_hashed_name(name), "{name}");
        }
    }

    #[test]
    fn only_plain_spellings_under_a_prefix_are_cacheable() {
        let prefixes = vec!["/assets/".to_owned(), "/static/".to_owned()];
        for path in [
            "/assets/index-DkR3x9aB.js",
            "/static/js/main.3f2a1b9c8d7e6f5a.js",
        ] {
            assert!(is_cacheable_path(path, &prefixes), "{path}");
        }
        for path in [
            "/assets/index.js",
            "/public/index-DkR3x9aB.js",
            "/assets/",
            "/assets//index-DkR3x9aB.js",
            "/assets/./index-DkR3x9aB.js",
            "/assets/../assets/index-DkR3x9aB.js",
            "/assets/index-DkR3x9a%42.js",
            "/assets/index-DkR3x9aB.js/",
            "/Assets/index-DkR3x9aB.js",
            "//assets/index-DkR3x9aB.js",
        ] {
            assert!(!is_cacheable_path(path, &prefixes), "{path}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn lookup_decision_table() {
        let prefixes = vec!["/assets/".to_owned()];
        let asset = "/assets/index-DkR3x9aB.js";
        let check = |method: Method, uri: &str, pairs: &[(&str, &str)]| {
            lookup_allowed(&method, &uri.parse().unwrap(), &headers(pairs), &prefixes)
        };
        assert_eq!(check(Method::GET, asset, &[]), Ok(()));
        assert_eq!(check(Method::HEAD, asset, &[]), Ok(()));
        assert_eq!(check(Method::GET, asset, &[("cookie", "s=1")]), Ok(()));
        let own = [("host", "chat.example"), ("origin", "https://chat.example")];
        assert_eq!(check(Method::GET, asset, &own), Ok(()));
        let fetch_site = [
            ("origin", "http://127.0.0.1:8000"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(check(Method::GET, asset, &fetch_site), Ok(()));
        assert_eq!(
            check(Method::GET, asset, &[("content-length", "0")]),
            Ok(())
        );
        assert_eq!(
            check(Method::GET, asset, &[("if-none-match", "\"x\"")]),
            Ok(())
        );
        type Case<'a> = (Method, &'a str, &'a [(&'a str, &'a str)], Bypass);
        let cases: &[Case<'_>] = &[
            (Method::POST, asset, &[], Bypass::Method),
            (Method::DELETE, asset, &[], Bypass::Method),
            (
                Method::GET,
                "/assets/index-DkR3x9aB.js?v=2",
                &[],
                Bypass::Query,
            ),
            (Method::GET, "/assets/index.js", &[], Bypass::Path),
            (Method::GET, "/", &[], Bypass::Path),
            (
                Method::GET,
                asset,
                &[("authorization", "Bearer x")],
                Bypass::Authorization,
            ),
            (
                Method::GET,
                asset,
                &[("origin", "https://other.example")],
                Bypass::Origin,
            ),
            (
                Method::GET,
                asset,
                &[("host", "chat.example"), ("origin", "https://evil.example")],
                Bypass::Origin,
            ),
            (
                Method::GET,
                asset,
                &[("host", "chat.example"), ("origin", "null")],
                Bypass::Origin,
            ),
            (
                Method::GET,
                asset,
                &[
                    ("host", "chat.example"),
                    ("origin", "https://evil.example"),
                    ("sec-fetch-site", "cross-site"),
                ],
                Bypass::Origin,
            ),
            (Method::GET, asset, &[("range", "bytes=0-9")], Bypass::Range),
            (Method::GET, asset, &[("if-range", "\"x\"")], Bypass::Range),
            (
                Method::GET,
                asset,
                &[("if-match", "\"x\"")],
                Bypass::Precondition,
            ),
            (
                Method::GET,
                asset,
                &[("upgrade", "websocket")],
                Bypass::Upgrade,
            ),
            (Method::GET, asset, &[("content-length", "5")], Bypass::Body),
            (
                Method::GET,
                asset,
                &[("transfer-encoding", "chunked")],
                Bypass::Body,
            ),
        ];
        for (method, uri, pairs, expected) in cases {
            assert_eq!(
                check(method.clone(), uri, pairs),
                Err(*expected),
                "{method} {uri} {pairs:?}"
            );
        }
    }

    #[test]
    fn storable_decision_table() {
        let max = 1000;
        let ok = [
            ("content-length", "10"),
            ("content-type", "text/javascript"),
        ];
        assert_eq!(storable(StatusCode::OK, &headers(&ok), max), Ok(10));
        let public = [
            ("content-length", "10"),
            ("cache-control", "public, max-age=60"),
        ];
        assert_eq!(storable(StatusCode::OK, &headers(&public), max), Ok(10));
        let vary = [("content-length", "10"), ("vary", "Accept-Encoding")];
        assert_eq!(storable(StatusCode::OK, &headers(&vary), max), Ok(10));
        // What Chainlit sends (its CORS middleware adds Origin).
        let chainlit = [
            ("content-length", "10"),
            ("vary", "Origin, Accept-Encoding"),
        ];
        assert_eq!(storable(StatusCode::OK, &headers(&chainlit), max), Ok(10));
        let identity = [("content-length", "10"), ("content-encoding", "identity")];
        assert_eq!(storable(StatusCode::OK, &headers(&identity), max), Ok(10));
        assert_eq!(
            storable(StatusCode::OK, &headers(&[("content-length", "1000")]), max),
            Ok(1000)
        );
        type Case<'a> = (StatusCode, &'a [(&'a str, &'a str)], NotStored);
        let cases: &[Case<'_>] = &[
            (
                StatusCode::NOT_FOUND,
                &[("content-length", "10")],
                NotStored::Status,
            ),
            (
                StatusCode::PARTIAL_CONTENT,
                &[("content-length", "10")],
                NotStored::Status,
            ),
            (StatusCode::NOT_MODIFIED, &[], NotStored::Status),
            (
                StatusCode::FOUND,
                &[("content-length", "0")],
                NotStored::Status,
            ),
            (
                StatusCode::OK,
                &[("content-length", "10"), ("cache-control", "no-store")],
                NotStored::CacheControl,
            ),
            (
                StatusCode::OK,
                &[
                    ("content-length", "10"),
                    ("cache-control", "max-age=60, Private"),
                ],
                NotStored::CacheControl,
            ),
            (
                StatusCode::OK,
                &[
                    ("content-length", "10"),
                    ("cache-control", "no-cache=\"x\""),
                ],
                NotStored::CacheControl,
            ),
            (
                StatusCode::OK,
                &[("content-length", "10"), ("set-cookie", "a=b")],
                NotStored::SetCookie,
            ),
            (
                StatusCode::OK,
                &[
                    ("content-length", "10"),
                    ("vary", "Accept-Encoding, Cookie"),
                ],
                NotStored::Vary,
            ),
            (
                StatusCode::OK,
                &[("content-length", "10"), ("vary", "*")],
                NotStored::Vary,
            ),
            (
                StatusCode::OK,
                &[("content-length", "10"), ("content-encoding", "gzip")],
                NotStored::Encoded,
            ),
            (
                StatusCode::OK,
                &[("content-length", "10"), ("content-range", "bytes 0-9/20")],
                NotStored::Status,
            ),
            (StatusCode::OK, &[], NotStored::NoLength),
            (
                StatusCode::OK,
                &[("content-length", "ten")],
                NotStored::NoLength,
            ),
            (
                StatusCode::OK,
                &[("content-length", "1001")],
                NotStored::TooLarge,
            ),
            (
                StatusCode::OK,
                &[("content-length", "99999999999999999999")],
                NotStored::NoLength,
            ),
        ];
        for (status, pairs, expected) in cases {
            assert_eq!(
                storable(*status, &headers(pairs), max),
                Err(*expected),
                "{status} {pairs:?}"
            );
        }
    }

    #[test]
    fn conditional_requests_follow_rfc_9110() {
        let etag = HeaderValue::from_static("\"abc-gzip\"");
        let modified = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").ok();
        let check = |pairs: &[(&str, &str)]| not_modified(&headers(pairs), &etag, modified);
        assert!(check(&[("if-none-match", "\"abc-gzip\"")]));
        assert!(check(&[("if-none-match", "W/\"abc-gzip\"")]));
        assert!(check(&[("if-none-match", "\"x\", \"abc-gzip\"")]));
        assert!(check(&[
            ("if-none-match", "\"x\""),
            ("if-none-match", "\"abc-gzip\"")
        ]));
        assert!(check(&[("if-none-match", "\"a,b\", \"abc-gzip\"")]));
        assert!(check(&[("if-none-match", "*")]));
        assert!(!check(&[("if-none-match", "\"abc\"")]));
        assert!(!check(&[("if-none-match", "\"abc-br\"")]));
        assert!(!check(&[("if-none-match", "abc-gzip")]));
        assert!(!check(&[("if-none-match", "\"abc-gzip")]));
        assert!(!check(&[("if-none-match", "")]));
        assert!(!check(&[]));
        // If-Modified-Since only counts without If-None-Match.
        assert!(check(&[(
            "if-modified-since",
            "Wed, 21 Oct 2015 07:28:00 GMT"
        )]));
        assert!(check(&[(
            "if-modified-since",
            "Thu, 22 Oct 2015 07:28:00 GMT"
        )]));
        assert!(!check(&[(
            "if-modified-since",
            "Tue, 20 Oct 2015 07:28:00 GMT"
        )]));
        assert!(!check(&[("if-modified-since", "yesterday")]));
        assert!(!check(&[
            ("if-none-match", "\"other\""),
            ("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT")
        ]));
        let no_date = not_modified(
            &headers(&[("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT")]),
            &etag,
            None,
        );
        assert!(!no_date);
    }
}
