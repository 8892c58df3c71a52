//! Header rewriting, as pure functions: the backend request's head, hop-by-hop stripping,
//! `X-Forwarded-*`, request ids, cookie hardening.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use ipnet::IpNet;

use super::RequestContext;
use crate::config::BackendConfig;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Forwarding claims other than X-Forwarded-For/-Proto, dropped from untrusted peers (their
/// X-Forwarded-Host too: chatgate writes its own).
fn is_forwarding_claim(name: &str) -> bool {
    matches!(
        name,
        "x-forwarded-host" | "forwarded" | "x-real-ip" | "x-forwarded-port" | "x-forwarded-prefix"
    )
}

/// Fields that are hop-by-hop by definition, RFC 9110 §7.6.1 (Connection itself aside).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-connection"
    )
}

/// Rewrites a client's request head for the backend: the URI in origin form
/// (`path_and_query` or the client's own), HTTP/1.1, hop-by-hop headers stripped,
/// forwarded headers set from `ctx`, the request id, and `Host` (`--backend-host`, else the
/// client's, else the backend's authority).
pub fn backend_request_head(
    parts: &mut Parts,
    ctx: &RequestContext,
    backend: &BackendConfig,
    path_and_query: Option<PathAndQuery>,
) {
    let path_and_query = match path_and_query {
        Some(pq) => pq,
        None => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    // Origin form (RFC 9112 §3.2.1): what goes on the wire to an origin server; the
    // connection already names the worker.
    parts.uri = Uri::from(path_and_query);
    parts.version = http::Version::HTTP_11;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    let has_host = set_forwarded(headers, &ctx.peer_value, ctx.trusted_peer);
    headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
    if let Some(host) = &backend.host_override {
        headers.insert(header::HOST, host.clone());
    } else if !has_host {
        if let Ok(host) = HeaderValue::from_str(backend.url.authority.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
}

/// Removes hop-by-hop fields, RFC 9110 §7.6.1: "Intermediaries MUST parse a received
/// Connection header field before a message is forwarded and, for each connection-option in
/// this field, remove any header or trailer field(s) from the message with the same name as
/// the connection-option, and then remove the Connection header field itself", plus the
/// fields that are hop-by-hop by definition (Keep-Alive, TE, Trailer, Transfer-Encoding,
/// Upgrade, Proxy-Authorization, Proxy-Connection).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One walk over the names: a request rarely carries any of these, and a removal per
    // name would hash and probe the map for each one (bench/NOTES.md, issue 12). Empty, so
    // unallocated, unless it does.
    let mut doomed: Vec<HeaderName> = Vec::new();
    let mut connection = false;
    for name in headers.keys() {
        let text = name.as_str();
        if text == "connection" {
            connection = true;
        } else if is_hop_by_hop(text) {
            doomed.push(name.clone());
        }
    }
    if connection {
        // Split the raw bytes: a value with one non-ASCII (obs-text) byte still names its
        // other options, and skipping it whole would forward the headers it names.
        doomed.extend(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok()),
        );
        doomed.push(header::CONNECTION);
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// What the pipeline reads from a request's fields, gathered at the door in one walk over
/// them. A lookup by name hashes the name and probes the map, absent or not; the seven
/// lookups this replaces (bench/NOTES.md, issue 12) cost more than one walk over a request's
/// fields, whose names compare cheaply (a standard name is a tag). Each fact means what
/// the lookup it replaces meant; the property test below holds them to it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeadFacts {
    /// A `Transfer-Encoding` field is present.
    pub transfer_encoding: bool,
    /// An `Upgrade` field is present.
    pub upgrade_field: bool,
    /// A WebSocket upgrade (RFC 6455 §4.2.1): `Connection` names `upgrade` and `Upgrade`
    /// names `websocket`, in any of their values.
    pub websocket: bool,
    /// The first `X-Request-Id`, when it is sane ([`is_sane_request_id`]).
    pub request_id: Option<HeaderValue>,
    /// A browser loading a page, so an error answers with HTML rather than JSON: a GET
    /// whose first `Sec-Fetch-Mode` is `navigate` or whose first `Accept` names `text/html`.
    pub browser_navigation: bool,
    /// How many `Host` fields there are, counted up to 2 (RFC 9112 §3.2 wants exactly one).
    pub hosts: u8,
}

impl HeadFacts {
    pub fn of(method: &http::Method, headers: &HeaderMap) -> HeadFacts {
        let mut facts = HeadFacts::default();
        let (mut connection_upgrade, mut upgrade_websocket) = (false, false);
        // `get` reads a name's first value: later ones of the same name are skipped.
        let (mut id_seen, mut mode_seen, mut accept_seen) = (false, false, false);
        let (mut navigate, mut html) = (false, false);
        // The values of one name come one after another, first value first.
        for (name, value) in headers {
            if name == header::HOST {
                facts.hosts = (facts.hosts + 1).min(2);
            } else if name == header::TRANSFER_ENCODING {
                facts.transfer_encoding = true;
            } else if name == header::CONNECTION {
                connection_upgrade = connection_upgrade || names_token(value, "upgrade");
            } else if name == header::UPGRADE {
                facts.upgrade_field = true;
                upgrade_websocket = upgrade_websocket || names_token(value, "websocket");
            } else if name == header::ACCEPT {
                if !accept_seen {
                    accept_seen = true;
                    html = value.to_str().is_ok_and(|v| v.contains("text/html"));
                }
            } else if name == X_REQUEST_ID {
                if !id_seen {
                    id_seen = true;
                    facts.request_id = is_sane_request_id(value).then(|| value.clone());
                }
            } else if name.as_str() == "sec-fetch-mode" && !mode_seen {
                mode_seen = true;
                navigate = value.as_bytes() == b"navigate";
            }
        }
        facts.websocket = connection_upgrade && upgrade_websocket;
        facts.browser_navigation = method == http::Method::GET && (navigate || html);
        facts
    }
}

/// Whether one value of a `Connection`-style header names `token`.
fn names_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a `Connection`-style header names `token` (comma-separated, case-insensitive).
pub fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| names_token(v, token))
}

/// Whether `addr` falls in one of the trusted proxy networks.
pub fn is_trusted(addr: IpAddr, trusted: &[IpNet]) -> bool {
    let addr = canonical(addr);
    trusted.iter().any(|net| net.contains(&addr))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack listener reports) is
/// the IPv4 address it carries.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// The client's address: the peer itself, unless the peer is a trusted proxy, in which case
/// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its
/// left were written by parties we cannot vouch for).
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return canonical(peer);
    }
    let mut client = canonical(peer);
    // Header lines come first to last; the walk goes right to left across all of them.
    let lines: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for line in lines.iter().rev() {
        for entry in line.rsplit(',') {
            match parse_forwarded_ip(entry) {
                Some(addr) => {
                    client = addr;
                    if !is_trusted(addr, trusted) {
                        return client;
                    }
                }
                // An unparsable entry ends the chain of trust: stop at what we have.
                None => return client,
            }
        }
    }
    client
}

/// Parses one `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]:80`.
pub fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(addr) = entry.parse::<IpAddr>() {
        return Some(canonical(addr));
    }
    if let Ok(sock) = entry.parse::<std::net::SocketAddr>() {
        return Some(canonical(sock.ip()));
    }
    let inner = entry.strip_prefix('[')?.split(']').next()?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host` on a request bound for the backend.
///
/// From a trusted proxy, its `X-Forwarded-For` is appended to and its `-Proto`/`-Host` kept;
/// from anyone else all three are overwritten with what chatgate itself saw, so a client
/// cannot spoof its address or make the backend believe it was reached over https, and the
/// other spellings of the same claims (`Forwarded`, `X-Real-IP`, ...) are removed. `peer` is
/// the TCP peer as [`peer_value`] writes it. Returns whether the request has a `Host` field.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &HeaderValue, trusted_peer: bool) -> bool {
    // One walk over the fields finds the client's `Host` and what the peer said before
    // (trusted) or may not say (not trusted): a lookup by name per field hashes the name
    // and probes the map, and `X-Forwarded-*` are custom names, hashed byte by byte
    // (bench/NOTES.md, issue 12).
    let mut host: Option<HeaderValue> = None;
    if trusted_peer {
        // The chain so far, each entry followed by ", ": empty, so unallocated, unless
        // there is one.
        let mut chain = String::new();
        let (mut proto, mut forwarded_host) = (false, false);
        for (name, value) in headers.iter() {
            if name == header::HOST {
                host = host.or_else(|| Some(value.clone()));
            } else if name == X_FORWARDED_FOR {
                if let Ok(entry) = value.to_str() {
                    chain.push_str(entry);
                    chain.push_str(", ");
                }
            } else if name == X_FORWARDED_PROTO {
                proto = true;
            } else if name == X_FORWARDED_HOST {
                forwarded_host = true;
            }
        }
        if chain.is_empty() {
            headers.insert(X_FORWARDED_FOR.clone(), peer.clone());
        } else {
            chain.push_str(peer.to_str().unwrap_or("unknown"));
            set(headers, &X_FORWARDED_FOR, &chain);
        }
        if !proto {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        }
        if let Some(host) = host.clone().filter(|_| !forwarded_host) {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    } else {
        // Empty, so unallocated, unless the request carries a claim.
        let mut doomed: Vec<HeaderName> = Vec::new();
        for (name, value) in headers.iter() {
            if name == header::HOST {
                host = host.or_else(|| Some(value.clone()));
            } else if is_forwarding_claim(name.as_str()) {
                doomed.push(name.clone());
            }
        }
        for name in doomed {
            headers.remove(name);
        }
        headers.insert(X_FORWARDED_FOR.clone(), peer.clone());
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        if let Some(host) = host.clone() {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    }
    host.is_some()
}

/// A TCP peer's address as the `X-Forwarded-For` entry chatgate adds (an IPv4-mapped IPv6
/// address as IPv4). Made once per client connection, since the peer is the same for all
/// its requests: each request then clones it (a reference count) instead of writing,
/// checking and allocating it (bench/NOTES.md, issue 12). IPv4 is written digit by digit:
/// `Display` for an address goes through `core::fmt` and a padding pass.
pub fn peer_value(addr: IpAddr) -> HeaderValue {
    let addr = canonical(addr);
    let mut text = [0u8; 15];
    let len = match addr {
        IpAddr::V4(v4) => crate::ascii::ipv4(v4, &mut text),
        IpAddr::V6(_) => 0,
    };
    let value = if len == 0 {
        HeaderValue::from_str(&addr.to_string())
    } else {
        HeaderValue::from_bytes(&text[..len])
    };
    // Digits, dots, hex and colons are always a valid value.
    value.unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Longest client-supplied request id that is kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A client's `X-Request-Id` is kept when it is a sane token: 1 to 128 visible ASCII bytes.
pub fn is_sane_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=MAX_REQUEST_ID_LEN).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// A fresh request id: 16 hex digits from a fast non-cryptographic generator (ids correlate
/// log lines; they are not secrets).
///
/// The digits are the buffer's owner: one allocation, and each clone (the backend's copy,
/// the response's) counts a reference. Copied into a `Bytes`, they were
/// two allocations: the copy, then a shared header at the first clone (bench/NOTES.md,
/// issue 12).
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 16];
    let mut n = fastrand::u64(..);
    for slot in buf.iter_mut().rev() {
        *slot = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// `value` in a buffer of its own. A value hyper parsed is a slice of the connection's read
/// buffer, and every clone keeps that whole buffer alive: for what outlives its request (a
/// WebSocket relay's access line holding the client's `X-Request-Id`), not per request.
pub fn detached(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(value.as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static("-"));
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// Adds `Secure`, `HttpOnly` and `SameSite=Lax` to a `Set-Cookie` value where missing (the
/// edge applying seed 002's cookie advice for apps that forgot). `None` when nothing changes.
pub fn harden_set_cookie(value: &HeaderValue) -> Option<HeaderValue> {
    let text = value.to_str().ok()?;
    let mut attributes = text.split(';').skip(1).map(|a| {
        let name = a.split('=').next().unwrap_or("").trim();
        name.to_ascii_lowercase()
    });
    let (mut secure, mut http_only, mut same_site) = (false, false, false);
    for name in attributes.by_ref() {
        match name.as_str() {
            "secure" => secure = true,
            "httponly" => http_only = true,
            "samesite" => same_site = true,
            _ => {}
        }
    }
    if secure && http_only && same_site {
        return None;
    }
    let mut hardened = text.trim_end().trim_end_matches(';').to_owned();
    if !secure {
        hardened.push_str("; Secure");
    }
    if !http_only {
        hardened.push_str("; HttpOnly");
    }
    if !same_site {
        hardened.push_str("; SameSite=Lax");
    }
    HeaderValue::from_str(&hardened).ok()
}

/// Applies [`harden_set_cookie`] to every `Set-Cookie` of a response.
pub fn harden_cookies(headers: &mut HeaderMap) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let hardened: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| harden_set_cookie(v).unwrap_or_else(|| v.clone()))
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in hardened {
        headers.append(header::SET_COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn nets(s: &str) -> Vec<IpNet> {
        crate::config::parse_trusted_proxies(s).unwrap()
    }

    pub(super) fn backend(args: &[&str]) -> BackendConfig {
        let argv = std::iter::once("chatgate").chain(args.iter().copied());
        let cli = crate::config::Cli::parse_with(argv, |_| None).unwrap();
        crate::config::Config::from_settings(&cli.settings)
            .unwrap()
            .backend
    }

    /// One row of the backend head table: the client's request, who sent it, chatgate's
    /// settings, and what the backend must receive.
    struct HeadCase {
        name: &'static str,
        target: &'static str,
        headers: &'static [(&'static str, &'static str)],
        peer: &'static str,
        trusted: bool,
        settings: &'static [&'static str],
        mapped: Option<&'static str>,
        uri: &'static str,
        expect: &'static [(&'static str, Option<&'static str>)],
    }

    #[test]
    fn backend_request_head_table() {
        let cases = [
            HeadCase {
                name: "untrusted peer: forwarded headers are ours, Host is kept",
                target: "/a?b=1",
                headers: &[
                    ("host", "chat.example"),
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "evil.example"),
                    ("forwarded", "for=6.6.6.6"),
                    ("x-real-ip", "6.6.6.6"),
                    ("connection", "x-hop"),
                    ("x-hop", "1"),
                ],
                peer: "192.0.2.7",
                trusted: false,
                settings: &[],
                mapped: None,
                uri: "/a?b=1",
                expect: &[
                    ("host", Some("chat.example")),
                    ("x-forwarded-for", Some("192.0.2.7")),
                    ("x-forwarded-proto", Some("http")),
                    ("x-forwarded-host", Some("chat.example")),
                    ("forwarded", None),
                    ("x-real-ip", None),
                    ("connection", None),
                    ("x-hop", None),
                    ("x-request-id", Some("req-1")),
                ],
            },
            HeadCase {
                name: "trusted proxy: its chain is appended to and its proto kept",
                target: "/",
                headers: &[
                    ("host", "chat.example"),
                    ("x-forwarded-for", "203.0.113.9"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "chat.example"),
                ],
                peer: "10.0.0.2",
                trusted: true,
                settings: &[],
                mapped: None,
                uri: "/",
                expect: &[
                    ("x-forwarded-for", Some("203.0.113.9, 10.0.0.2")),
                    ("x-forwarded-proto", Some("https")),
                    ("x-forwarded-host", Some("chat.example")),
                ],
            },
            HeadCase {
                name: "--backend-host replaces Host; the mapped path replaces the client's",
                target: "/socket.io/?EIO=4",
                headers: &[("host", "chat.example")],
                peer: "192.0.2.7",
                trusted: false,
                settings: &[
                    "--backend",
                    "https://app.internal:8443",
                    "--backend-host",
                    "app.internal",
                ],
                mapped: Some("/ws/socket.io/?EIO=4"),
                uri: "/ws/socket.io/?EIO=4",
                expect: &[("host", Some("app.internal"))],
            },
            HeadCase {
                name: "no Host (HTTP/1.0): the backend's authority",
                target: "/",
                headers: &[],
                peer: "192.0.2.7",
                trusted: false,
                settings: &[],
                mapped: None,
                uri: "/",
                expect: &[("host", Some("127.0.0.1:8080"))],
            },
        ];
        for case in cases {
            let mut builder = http::Request::builder().uri(case.target);
            for (k, v) in case.headers {
                builder = builder.header(*k, *v);
            }
            let (mut parts, ()) = builder.body(()).unwrap().into_parts();
            let peer: IpAddr = case.peer.parse().unwrap();
            let ctx = RequestContext {
                peer_value: peer_value(peer),
                trusted_peer: case.trusted,
                client: peer,
                request_id: HeaderValue::from_static("req-1"),
                uri: parts.uri.clone(),
                upgrade: false,
            };
            let mapped = case.mapped.map(|m| PathAndQuery::try_from(m).unwrap());
            backend_request_head(&mut parts, &ctx, &backend(case.settings), mapped);
            assert_eq!(parts.uri, case.uri, "{}", case.name);
            assert_eq!(parts.version, http::Version::HTTP_11, "{}", case.name);
            for (name, value) in case.expect {
                let got = parts.headers.get(*name).map(|v| v.to_str().unwrap());
                assert_eq!(got, *value, "{}: {name}", case.name);
            }
        }
    }

    #[test]
    fn hop_by_hop_headers_and_connection_options_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "close"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("cookie", "a=b"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "cookie"]);
    }

    #[test]
    fn connection_options_are_removed_even_beside_non_ascii_bytes() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xe9, X-Secret-Hop").unwrap(),
        );
        h.append("x-secret-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn connection_tokens_match_case_insensitively() {
        let h = map(&[("connection", "keep-alive, Upgrade")]);
        assert!(has_token(&h, &header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, &header::CONNECTION, "close"));
    }

    #[test]
    fn peer_value_is_the_canonical_address() {
        let value = |ip: &str| peer_value(ip.parse().unwrap());
        assert_eq!(value("203.0.113.9"), "203.0.113.9");
        assert_eq!(value("0.0.0.0"), "0.0.0.0");
        assert_eq!(value("255.255.255.255"), "255.255.255.255");
        assert_eq!(
            value("::ffff:192.0.2.1"),
            "192.0.2.1",
            "IPv4-mapped is IPv4"
        );
        assert_eq!(value("2001:db8::1"), "2001:db8::1");
        assert_eq!(value("::1"), "::1");
    }

    #[test]
    fn untrusted_peer_cannot_spoof_forwarded_headers() {
        let mut h = map(&[
            ("host", "chat.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        set_forwarded(&mut h, &peer_value("203.0.113.9".parse().unwrap()), false);
        assert!(h.get("forwarded").is_none() && h.get("x-real-ip").is_none());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "chat.example");
    }

    #[test]
    fn trusted_peer_forwarded_headers_are_appended_and_kept() {
        let mut h = map(&[
            ("host", "internal:8000"),
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "10.0.0.3"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "chat.example"),
        ]);
        set_forwarded(&mut h, &peer_value("10.0.0.2".parse().unwrap()), true);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.0.0.3, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "chat.example");
    }

    #[test]
    fn client_address_walks_forwarded_for_from_the_right() {
        let trusted = nets("10.0.0.0/8");
        let h = map(&[("x-forwarded-for", "1.1.1.1, 2.2.2.2, 10.0.0.5")]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_addr(peer, &h, &trusted),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        // An untrusted peer's header is ignored.
        let outsider: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_addr(outsider, &h, &trusted), outsider);
        // Garbage stops the walk at the last trusted hop.
        let g = map(&[("x-forwarded-for", "1.1.1.1, junk, 10.0.0.5")]);
        assert_eq!(
            client_addr(peer, &g, &trusted),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        // No header: the peer.
        assert_eq!(client_addr(peer, &HeaderMap::new(), &trusted), peer);
    }

    #[test]
    fn forwarded_entries_parse_with_ports_and_brackets() {
        for (entry, want) in [
            ("1.2.3.4", Some("1.2.3.4")),
            (" 1.2.3.4:80 ", Some("1.2.3.4")),
            ("::1", Some("::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("::ffff:10.1.2.3", Some("10.1.2.3")),
            ("unknown", None),
            ("", None),
        ] {
            assert_eq!(
                parse_forwarded_ip(entry),
                want.map(|w| w.parse().unwrap()),
                "{entry:?}"
            );
        }
    }

    #[test]
    fn mapped_ipv4_peers_match_ipv4_networks() {
        assert!(is_trusted(
            "::ffff:10.0.0.1".parse().unwrap(),
            &nets("10.0.0.0/8")
        ));
    }

    #[test]
    fn cookies_gain_missing_security_attributes() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            harden_set_cookie(&v("sid=1; Path=/")).unwrap(),
            "sid=1; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            harden_set_cookie(&v("sid=1; path=/; SameSite=Strict; httponly")).unwrap(),
            "sid=1; path=/; SameSite=Strict; httponly; Secure"
        );
        assert!(harden_set_cookie(&v("a=b; Secure; HttpOnly; SameSite=None")).is_none());
        // A cookie *named* secure is not the attribute.
        assert_eq!(
            harden_set_cookie(&v("secure=1")).unwrap(),
            "secure=1; Secure; HttpOnly; SameSite=Lax"
        );
        let mut h = map(&[
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2; Secure; HttpOnly; SameSite=Lax"),
        ]);
        harden_cookies(&mut h);
        let all: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], "a=1; Secure; HttpOnly; SameSite=Lax");
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        assert!(is_sane_request_id(&HeaderValue::from_static(
            "abc-123_XYZ.9"
        )));
        assert!(!is_sane_request_id(&HeaderValue::from_static("")));
        assert!(!is_sane_request_id(&HeaderValue::from_static("has space")));
        assert!(!is_sane_request_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        let id = new_request_id();
        assert!(is_sane_request_id(&id));
        assert_eq!(id.len(), 16);
    }

    #[test]
    fn a_detached_value_does_not_share_its_source_buffer() {
        // As hyper parses a head: the value is a slice of a larger read buffer.
        let buffer =
            bytes::Bytes::from(b"GET / HTTP/1.1\r\nx-request-id: abc-123\r\n\r\n".to_vec());
        let start = buffer.windows(7).position(|w| w == b"abc-123").unwrap();
        let parsed = HeaderValue::from_maybe_shared(buffer.slice(start..start + 7)).unwrap();
        assert_eq!(parsed.as_bytes().as_ptr(), buffer[start..].as_ptr());
        let copy = detached(&parsed);
        assert_eq!(copy, parsed);
        let range = buffer.as_ptr_range();
        assert!(
            !range.contains(&copy.as_bytes().as_ptr()),
            "the copy points into the read buffer"
        );
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        assert!(detached(&secret).is_sensitive());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The model's `X-Forwarded-Host`: a copy of the first `Host`, looked up by name.
    fn copy_host(headers: &mut HeaderMap) {
        if let Some(host) = headers.get(header::HOST).cloned() {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
    }

    /// The head as it was built before the one-walk rewrite: every removal by name, in
    /// order. The model the property holds `backend_request_head` to.
    fn by_name(headers: &mut HeaderMap, peer: IpAddr, trusted: bool, request_id: &HeaderValue) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        for name in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
        ] {
            headers.remove(name);
        }
        let peer = canonical(peer);
        if trusted {
            let prior: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let joined = if prior.is_empty() {
                peer.to_string()
            } else {
                format!("{}, {peer}", prior.join(", "))
            };
            set(headers, &X_FORWARDED_FOR, &joined);
            if !headers.contains_key(&X_FORWARDED_PROTO) {
                headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
            }
            if !headers.contains_key(&X_FORWARDED_HOST) {
                copy_host(headers);
            }
        } else {
            set(headers, &X_FORWARDED_FOR, &peer.to_string());
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
            for name in [
                "x-forwarded-host",
                "forwarded",
                "x-real-ip",
                "x-forwarded-port",
                "x-forwarded-prefix",
            ] {
                headers.remove(name);
            }
            copy_host(headers);
        }
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        }
    }

    /// Names a request may carry: every one the rewrite treats specially, in any case, and
    /// ordinary ones.
    fn name() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-connection",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-request-id",
            "host",
            "cookie",
            "x-custom",
        ]);
        prop_oneof![
            special.clone().prop_map(str::to_owned),
            "[a-z][a-z0-9-]{0,12}",
            special.prop_map(|s| s.to_ascii_uppercase()),
        ]
    }

    fn value(names: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,20}",
            prop::collection::vec(names, 1..4).prop_map(|n| n.join(", ")),
        ]
    }

    /// The generated fields as a request's map, in order; a name or value `http` refuses is
    /// left out, as a parser would never hand it on.
    fn header_map(fields: &[(String, String)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (n, v) in fields {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(n.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.append(n, v);
            }
        }
        headers
    }

    /// The facts by name, one lookup each: the model the property holds `HeadFacts` to.
    fn facts_by_name(method: &http::Method, headers: &HeaderMap) -> HeadFacts {
        let navigate = headers
            .get("sec-fetch-mode")
            .is_some_and(|v| v.as_bytes() == b"navigate");
        let html = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"));
        HeadFacts {
            transfer_encoding: headers.contains_key(header::TRANSFER_ENCODING),
            upgrade_field: headers.contains_key(header::UPGRADE),
            websocket: has_token(headers, &header::CONNECTION, "upgrade")
                && has_token(headers, &header::UPGRADE, "websocket"),
            request_id: headers
                .get(&X_REQUEST_ID)
                .filter(|v| is_sane_request_id(v))
                .cloned(),
            browser_navigation: method == http::Method::GET && (navigate || html),
            hosts: headers.get_all(header::HOST).iter().count().min(2) as u8,
        }
    }

    /// Names and values for the door's facts: the names it reads, in any case, and others.
    fn fact_field() -> impl Strategy<Value = (String, String)> {
        let names = prop::sample::select(vec![
            "transfer-encoding",
            "connection",
            "upgrade",
            "accept",
            "x-request-id",
            "sec-fetch-mode",
            "host",
            "x-custom",
        ]);
        let name = prop_oneof![
            names.clone().prop_map(str::to_owned),
            names.prop_map(|s| s.to_ascii_uppercase()),
            "[a-z][a-z0-9-]{0,12}",
        ];
        let words = prop::sample::select(vec![
            "upgrade",
            "Upgrade",
            "websocket",
            "WebSocket",
            "keep-alive",
            "navigate",
            "text/html",
            "application/json",
            "chunked",
            "",
            " ",
            "req-42",
        ]);
        let value = prop_oneof![
            prop::collection::vec(words, 1..4).prop_map(|w| w.join(", ")),
            "[ -~]{0,20}",
            // Longer than a sane request id may be.
            "[a-z]{120,140}",
        ];
        (name, value)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever the request carries, the facts gathered in one walk are the facts the
        /// lookups by name give.
        #[test]
        fn door_facts_equal_the_lookups(
            fields in prop::collection::vec(fact_field(), 0..12),
            get in any::<bool>(),
        ) {
            let headers = header_map(&fields);
            let method = if get { http::Method::GET } else { http::Method::POST };
            prop_assert_eq!(HeadFacts::of(&method, &headers), facts_by_name(&method, &headers));
        }

        /// Whatever the request carries, from a trusted peer or not, the one-walk rewrite
        /// leaves exactly the fields the by-name rewrite left.
        #[test]
        fn one_walk_head_equals_the_by_name_head(
            fields in prop::collection::vec((name(), value(name())), 0..14),
            peer in prop_oneof![Just("192.0.2.7"), Just("::ffff:10.1.2.3"), Just("2001:db8::1")],
            trusted in any::<bool>(),
        ) {
            let headers = header_map(&fields);
            let peer: IpAddr = peer.parse().unwrap();
            let request_id = HeaderValue::from_static("req-1");
            let mut expected = headers.clone();
            by_name(&mut expected, peer, trusted, &request_id);

            let mut parts = http::Request::new(()).into_parts().0;
            parts.headers = headers;
            let ctx = RequestContext {
                peer_value: peer_value(peer),
                trusted_peer: trusted,
                client: peer,
                request_id,
                uri: parts.uri.clone(),
                upgrade: false,
            };
            let backend = tests::backend(&[]);
            backend_request_head(&mut parts, &ctx, &backend, None);
            let sorted = |h: &HeaderMap| {
                let mut all: Vec<(String, Vec<u8>)> = h
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                // Order within a name matters (X-Forwarded-For chains); across names it
                // does not: sort stably by name only.
                all.sort_by(|a, b| a.0.cmp(&b.0));
                all
            };
            prop_assert_eq!(sorted(&parts.headers), sorted(&expected));
        }
    }
}
