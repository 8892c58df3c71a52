//! Affinity, as pure functions: the cookie that names a visitor's worker, the Engine.IO
//! session id of a request and of a handshake answer, and the answer for a session whose
//! worker is gone.
//!
//! The cookie's value is `<index>.<tag>`, the tag a hash of the worker's index and URL: a
//! forged, garbled or outdated value (another worker list, an index out of range) does not
//! match and simply means "no affinity". A client that writes a valid value for another
//! worker only moves itself, which grants nothing: every worker serves the same app.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;
use crate::config::SameSite;
use crate::responses;

/// Longest Engine.IO session id learned or looked up (python-engineio's are 20 characters).
pub const MAX_SID_LEN: usize = 64;

/// The tag that makes a cookie value valid for worker `index` at `url`.
///
/// FNV-1a, written out: the tag is no secret (a valid value only says which worker), it only
/// has to tell a value chatgate wrote from anything else, and stay the same across restarts
/// and replicas with the same worker list, so no keyed hash or crate is needed.
pub fn cookie_tag(index: usize, url: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(b"chatgate-affinity\0");
    eat(index.to_string().as_bytes());
    eat(b"\0");
    eat(url.as_bytes());
    hash
}

/// The cookie value naming worker `index`.
pub fn cookie_value(index: usize, tag: u64) -> String {
    format!("{index}.{tag:016x}")
}

/// Reads a cookie value back: the worker index, when the value is exactly one that
/// [`cookie_value`] writes for a worker of `tags` (indexed by worker). Anything else: `None`.
pub fn parse_cookie_value(value: &str, tags: &[u64]) -> Option<usize> {
    let (index, tag) = value.split_once('.')?;
    if index.is_empty()
        || index.len() > 2
        || !index.bytes().all(|b| b.is_ascii_digit())
        || (index.len() > 1 && index.starts_with('0'))
        || tag.len() != 16
        || !tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let index: usize = index.parse().ok()?;
    let tag = u64::from_str_radix(tag, 16).ok()?;
    (tags.get(index) == Some(&tag)).then_some(index)
}

/// The value of cookie `name` in the request's `Cookie` headers (the first one so named),
/// RFC 6265 §5.4: pairs separated by `;`, optional whitespace around them.
pub fn find_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
}

/// The `Set-Cookie` value for worker `value`: a session cookie for the whole site, never
/// readable by scripts; `Secure` when the client came over https or SameSite is None (which
/// browsers accept only with Secure).
pub fn set_cookie(name: &str, value: &str, same_site: SameSite, secure: bool) -> HeaderValue {
    let secure = secure || same_site == SameSite::None;
    let text = format!(
        "{name}={value}; Path=/; HttpOnly; SameSite={}{}",
        same_site.as_str(),
        if secure { "; Secure" } else { "" }
    );
    // Name and value are tokens (validated, generated): always a valid header value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The value of query parameter `name` (not decoded: the values read here are tokens).
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// Whether `sid` looks like an Engine.IO session id: 1 to 64 URL-safe base64 characters
/// (what python-engineio generates). Others are never learned nor looked up.
pub fn is_sane_sid(sid: &str) -> bool {
    (1..=MAX_SID_LEN).contains(&sid.len())
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What an Engine.IO request says about its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineIo<'q> {
    /// Not an Engine.IO request.
    No,
    /// A handshake over polling: the answer carries the new session's id.
    PollingHandshake,
    /// A handshake straight over WebSocket: the session lives on that one connection.
    WebSocketHandshake,
    /// A request of session `sid` (polling GET/POST, or the upgrade).
    Session(&'q str),
}

/// Reads an Engine.IO request's query (Engine.IO v4: `EIO=4&transport=...&sid=...`).
pub fn engineio_request(engineio: bool, query: Option<&str>) -> EngineIo<'_> {
    if !engineio {
        return EngineIo::No;
    }
    match query_param(query, "sid") {
        Some(sid) if is_sane_sid(sid) => EngineIo::Session(sid),
        // A garbled sid: the worker that gets it answers for it.
        Some(_) => EngineIo::No,
        None => match query_param(query, "transport") {
            Some("websocket") => EngineIo::WebSocketHandshake,
            _ => EngineIo::PollingHandshake,
        },
    }
}

/// Longest start of a handshake answer kept to find its session id (python-engineio's open
/// packet is about 110 bytes).
pub const OPEN_PACKET_MAX: usize = 512;

/// What the start of a polling handshake answer says.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenPacket<'b> {
    /// The open packet's session id.
    Sid(&'b str),
    /// Not complete yet: more bytes may finish it.
    Partial,
    /// Not an open packet (or an unusable one): stop looking.
    Not,
}

/// Parses the start of a polling handshake answer, Engine.IO v4: the open packet is `0`
/// followed by JSON (`0{"sid":"...","upgrades":[...],...}`), then the end of the payload or
/// the record separator 0x1E before the next packet.
pub fn open_packet_sid(bytes: &[u8]) -> OpenPacket<'_> {
    #[derive(serde::Deserialize)]
    struct Open<'a> {
        #[serde(borrow)]
        sid: &'a str,
    }
    let Some(rest) = bytes.strip_prefix(b"0") else {
        return if bytes.is_empty() {
            OpenPacket::Partial
        } else {
            OpenPacket::Not
        };
    };
    let json = rest.split(|b| *b == 0x1e).next().unwrap_or(rest);
    let mut values = serde_json::Deserializer::from_slice(json).into_iter::<Open<'_>>();
    match values.next() {
        Some(Ok(open)) if is_sane_sid(open.sid) => OpenPacket::Sid(open.sid),
        Some(Err(e)) if e.is_eof() => OpenPacket::Partial,
        None => OpenPacket::Partial,
        _ => OpenPacket::Not,
    }
}

/// The answer for a request of an Engine.IO session whose worker died (or restarted): what
/// python-engineio itself answers for a session it does not know (400, `text/plain`, the
/// JSON string `"Invalid session <sid>"`). The Socket.IO client takes it as a transport
/// error and reconnects at once, with a new handshake that goes to a live worker.
pub fn unknown_session(sid: &str) -> Response<ProxyBody> {
    // `sid` passed `is_sane_sid`: nothing in it needs escaping.
    let body = Bytes::from(format!("\"Invalid session {sid}\""));
    responses::with_type(StatusCode::BAD_REQUEST, "text/plain", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Vec<u64> {
        ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
            .iter()
            .enumerate()
            .map(|(i, u)| cookie_tag(i, u))
            .collect()
    }

    #[test]
    fn a_cookie_value_names_its_worker_and_nothing_else_does() {
        let tags = tags();
        for (i, tag) in tags.iter().enumerate() {
            assert_eq!(parse_cookie_value(&cookie_value(i, *tag), &tags), Some(i));
        }
        let good = cookie_value(1, tags[1]);
        let wrong_tag = cookie_value(1, tags[0]);
        let out_of_range = cookie_value(2, cookie_tag(2, "http://127.0.0.1:8083"));
        for bad in [
            "",
            "1",
            "1.",
            ".abc",
            "garbage",
            &wrong_tag,
            &out_of_range,
            &format!("01.{:016x}", tags[1]),
            &format!("+1.{:016x}", tags[1]),
            &format!("1.{:016X}", tags[1]),
            &format!("{good}0"),
            &good[..good.len() - 1],
            "99999999999999999999.0000000000000000",
            "1.zzzzzzzzzzzzzzzz",
        ] {
            assert_eq!(parse_cookie_value(bad, &tags), None, "{bad:?}");
        }
    }

    #[test]
    fn tags_differ_by_worker_and_by_url() {
        assert_ne!(cookie_tag(0, "http://a:1"), cookie_tag(1, "http://a:1"));
        assert_ne!(cookie_tag(0, "http://a:1"), cookie_tag(0, "http://a:2"));
        assert_eq!(cookie_tag(0, "http://a:1"), cookie_tag(0, "http://a:1"));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("chatgate_worker=0.x ;c=3"),
        );
        assert_eq!(find_cookie(&headers, "chatgate_worker"), Some("0.x"));
        assert_eq!(find_cookie(&headers, "b"), Some("2"));
        assert_eq!(find_cookie(&headers, "chatgate"), None);
        assert_eq!(find_cookie(&HeaderMap::new(), "a"), None);
    }

    #[test]
    fn set_cookie_is_http_only_and_secure_when_it_must_be() {
        let lax = set_cookie("w", "0.ab", SameSite::Lax, false);
        assert_eq!(lax, "w=0.ab; Path=/; HttpOnly; SameSite=Lax");
        let https = set_cookie("w", "0.ab", SameSite::Strict, true);
        assert_eq!(https, "w=0.ab; Path=/; HttpOnly; SameSite=Strict; Secure");
        let embedded = set_cookie("w", "0.ab", SameSite::None, false);
        assert_eq!(embedded, "w=0.ab; Path=/; HttpOnly; SameSite=None; Secure");
    }

    #[test]
    fn engineio_requests_are_told_apart() {
        let q = |s: &'static str| engineio_request(true, Some(s));
        assert_eq!(q("EIO=4&transport=polling&t=x"), EngineIo::PollingHandshake);
        assert_eq!(q("EIO=4&transport=websocket"), EngineIo::WebSocketHandshake);
        assert_eq!(
            q("EIO=4&transport=polling&sid=abc_DEF-1"),
            EngineIo::Session("abc_DEF-1")
        );
        assert_eq!(q("EIO=4&sid=a%20b"), EngineIo::No, "a garbled sid");
        assert_eq!(q("EIO=4&sid="), EngineIo::No);
        assert_eq!(engineio_request(false, Some("sid=abc")), EngineIo::No);
        assert_eq!(query_param(Some("a=1&sid=x&b"), "sid"), Some("x"));
        assert_eq!(query_param(Some("a=1&b"), "b"), Some(""));
        assert_eq!(query_param(None, "b"), None);
    }

    #[test]
    fn the_open_packet_gives_its_sid() {
        let open = br#"0{"sid":"Zx1_-abc","upgrades":["websocket"],"pingTimeout":20000,"pingInterval":25000,"maxPayload":1000000}"#;
        assert_eq!(open_packet_sid(open), OpenPacket::Sid("Zx1_-abc"));
        let mut two = open.to_vec();
        two.extend_from_slice(b"\x1e40{\"sid\":\"other\"}");
        assert_eq!(open_packet_sid(&two), OpenPacket::Sid("Zx1_-abc"));
        assert_eq!(open_packet_sid(&open[..20]), OpenPacket::Partial);
        assert_eq!(open_packet_sid(b""), OpenPacket::Partial);
        assert_eq!(open_packet_sid(b"0"), OpenPacket::Partial);
        assert_eq!(open_packet_sid(b"4hello"), OpenPacket::Not);
        assert_eq!(open_packet_sid(b"0{\"sid\":\"a b\"}"), OpenPacket::Not);
        assert_eq!(open_packet_sid(b"0{\"sid\":17}"), OpenPacket::Not);
        assert_eq!(open_packet_sid(b"0[1,2]"), OpenPacket::Not);
    }

    #[test]
    fn a_dead_session_gets_engineios_own_answer() {
        let r = unknown_session("abc");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
    }
}
