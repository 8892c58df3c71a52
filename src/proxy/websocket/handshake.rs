//! The WebSocket opening handshake, RFC 6455 §4, on both legs: the client's request is
//! checked before anything reaches the backend (§4.2.1), the backend leg's request is built
//! and its answer read and checked (§4.1), and the client's 101 is built from it.
//!
//! The backend leg is written and read by hand with httparse into a small buffer: hyper's
//! client would hand back a connection with its own read buffer, and tungstenite's client
//! handshake leaves a 4 KiB buffer behind; either would double a relay's idle memory.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::body::ProxyBody;
use crate::error::{Cause, ProxyError};
use crate::proxy::headers::{has_token, strip_hop_by_hop};

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");
static SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
static SEC_WEBSOCKET_EXTENSIONS: HeaderName = HeaderName::from_static("sec-websocket-extensions");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// Whether a request asks for a WebSocket upgrade (`Connection` is matched by token:
/// `keep-alive, Upgrade` is common).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), &header::CONNECTION, "upgrade")
        && has_token(req.headers(), &header::UPGRADE, "websocket")
}

/// Checks the client's handshake (RFC 6455 §4.2.1) and returns its key. A bad one is
/// refused here and never reaches the backend.
pub fn validate_handshake<B>(req: &Request<B>) -> Result<HeaderValue, ProxyError> {
    if req.method() != Method::GET {
        return Err(ProxyError::BadRequest("WebSocket handshake must be GET"));
    }
    if req
        .headers()
        .get(&SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ProxyError::BadRequest("Sec-WebSocket-Version must be 13"));
    }
    let key = req
        .headers()
        .get(&SEC_WEBSOCKET_KEY)
        .ok_or(ProxyError::BadRequest("missing Sec-WebSocket-Key"))?;
    // A base64-encoded 16-byte nonce is exactly 24 characters ending in "==".
    let bytes = key.as_bytes();
    let base64ish = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/');
    if bytes.len() != 24 || !bytes[..22].iter().all(base64ish) || &bytes[22..] != b"==" {
        return Err(ProxyError::BadRequest("malformed Sec-WebSocket-Key"));
    }
    Ok(key.clone())
}

/// The backend leg's handshake request: the client's end-to-end headers (cookies, origin,
/// authorization, subprotocols, user agent, forwarded headers), a fresh key, and never
/// `Sec-WebSocket-Extensions`: tungstenite has no permessage-deflate, and compressed frames
/// would break the relay.
pub fn backend_handshake_request(uri: Uri, mut headers: HeaderMap) -> Request<()> {
    strip_hop_by_hop(&mut headers);
    for name in [
        &SEC_WEBSOCKET_KEY,
        &SEC_WEBSOCKET_VERSION,
        &SEC_WEBSOCKET_EXTENSIONS,
        &SEC_WEBSOCKET_ACCEPT,
        &header::CONTENT_LENGTH,
    ] {
        headers.remove(name);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        SEC_WEBSOCKET_VERSION.clone(),
        HeaderValue::from_static("13"),
    );
    if let Ok(key) = HeaderValue::from_str(&generate_key()) {
        headers.insert(SEC_WEBSOCKET_KEY.clone(), key);
    }
    let mut request = Request::new(());
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// The 101 for the client: built here (the forwarder's hop-by-hop stripping would eat
/// `Upgrade`/`Connection`), with the accept key derived from the client's key, the
/// subprotocol the backend chose, and the backend's other end-to-end headers (cookies).
pub fn switching_protocols(
    client_key: &HeaderValue,
    backend_headers: &HeaderMap,
) -> Response<ProxyBody> {
    let mut headers = backend_headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(&SEC_WEBSOCKET_ACCEPT);
    headers.remove(&SEC_WEBSOCKET_EXTENSIONS);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(client_key.as_bytes())) {
        headers.insert(SEC_WEBSOCKET_ACCEPT.clone(), accept);
    }
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}

/// Largest handshake answer head read from the backend.
const MAX_HANDSHAKE_HEAD: usize = 16 * 1024;
/// Largest refusal body passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// What the backend said to the upgrade.
pub enum BackendAnswer {
    /// 101: its headers, and any bytes that came after them (the first frames).
    Accepted {
        headers: HeaderMap,
        leftover: Vec<u8>,
    },
    /// Anything else, as the client's answer: status, end-to-end headers, body.
    Refused(Box<Response<ProxyBody>>),
}

/// The backend leg's opening handshake (RFC 6455 §4.1), read into a small buffer. The caller
/// bounds it in time.
pub async fn backend_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &Request<()>,
) -> Result<BackendAnswer, ProxyError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed =
        |what: String| ProxyError::BackendReset(Cause::msg(format!("WebSocket handshake: {what}")));
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream
        .write_all(&head)
        .await
        .map_err(|e| failed(e.to_string()))?;
    stream.flush().await.map_err(|e| failed(e.to_string()))?;

    let mut buf = head;
    buf.clear();
    let (status, headers, head_len) = loop {
        if buf.len() >= MAX_HANDSHAKE_HEAD {
            return Err(failed("answer head too large".into()));
        }
        buf.reserve(1024);
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| failed(e.to_string()))?
            == 0
        {
            return Err(failed("connection closed before an answer".into()));
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut slots);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(failed(format!("malformed answer: {e}"))),
            Ok(httparse::Status::Complete(len)) => {
                let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
                    .map_err(|_| failed("bad status".into()))?;
                let mut headers = HeaderMap::with_capacity(parsed.headers.len());
                for h in parsed.headers.iter() {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(h.name.as_bytes()),
                        HeaderValue::from_bytes(h.value),
                    ) {
                        headers.append(name, value);
                    }
                }
                break (status, headers, len);
            }
        }
    };
    let rest = buf.split_off(head_len);

    if status != StatusCode::SWITCHING_PROTOCOLS {
        // A refusal: pass its body on, as much as it declared (bounded).
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(rest.len())
            .min(MAX_REFUSAL_BODY);
        let mut body = rest;
        while body.len() < declared {
            body.reserve(declared - body.len());
            match stream.read_buf(&mut body).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        body.truncate(declared);
        let mut refusal = Response::new(ProxyBody::full(Bytes::from(body)));
        *refusal.status_mut() = status;
        let mut headers = headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        *refusal.headers_mut() = headers;
        return Ok(BackendAnswer::Refused(Box::new(refusal)));
    }

    let key = request
        .headers()
        .get(&SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let accept_ok = headers
        .get(&SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|a| a.as_bytes() == derive_accept_key(key).as_bytes());
    if !accept_ok || !has_token(&headers, &header::UPGRADE, "websocket") {
        return Err(failed(
            "101 without a valid Sec-WebSocket-Accept and Upgrade".into(),
        ));
    }
    // RFC 6455 §4.1: a subprotocol the client did not offer fails the connection.
    if let Some(chosen) = headers.get(&SEC_WEBSOCKET_PROTOCOL) {
        let offered = has_token(
            request.headers(),
            &SEC_WEBSOCKET_PROTOCOL,
            chosen.to_str().unwrap_or("\0"),
        );
        if !offered {
            return Err(failed(
                "backend chose a subprotocol that was not offered".into(),
            ));
        }
    }
    if headers.contains_key(&SEC_WEBSOCKET_EXTENSIONS) {
        return Err(failed(
            "backend enabled an extension that was not offered".into(),
        ));
    }
    Ok(BackendAnswer::Accepted {
        headers,
        leftover: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/ws/socket.io/?EIO=4&transport=websocket");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn upgrade_requests_are_recognised_by_token() {
        assert!(is_upgrade_request(&upgrade(GOOD)));
        assert!(!is_upgrade_request(&upgrade(&[("upgrade", "websocket")])));
        assert!(!is_upgrade_request(&upgrade(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
    }

    #[test]
    fn bad_handshakes_are_refused() {
        assert!(validate_handshake(&upgrade(GOOD)).is_ok());
        let no_key: Vec<_> = GOOD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "sec-websocket-key")
            .collect();
        assert!(validate_handshake(&upgrade(&no_key)).is_err());
        let mut v8 = GOOD.to_vec();
        v8[2] = ("sec-websocket-version", "8");
        assert!(validate_handshake(&upgrade(&v8)).is_err());
        let mut short = GOOD.to_vec();
        short[3] = ("sec-websocket-key", "abc");
        assert!(validate_handshake(&upgrade(&short)).is_err());
        let mut post = upgrade(GOOD);
        *post.method_mut() = Method::POST;
        assert!(validate_handshake(&post).is_err());
    }

    #[test]
    fn backend_handshake_carries_end_to_end_headers_but_never_extensions() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("sec-websocket-protocol", "chat, superchat"),
            ("cookie", "session=1"),
            ("origin", "https://chat.example"),
            ("authorization", "Bearer t"),
            ("user-agent", "test"),
            ("host", "chat.example"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let req = backend_handshake_request("ws://127.0.0.1:1/ws/".parse().unwrap(), h);
        let h = req.headers();
        assert!(h.get("sec-websocket-extensions").is_none());
        assert_ne!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        for name in [
            "cookie",
            "origin",
            "authorization",
            "user-agent",
            "sec-websocket-protocol",
            "host",
        ] {
            assert!(h.contains_key(name), "{name}");
        }
        assert_eq!(h.get_all("connection").iter().count(), 1);
    }

    #[test]
    fn switching_protocols_derives_accept_and_keeps_subprotocol() {
        let mut backend = HeaderMap::new();
        backend.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        backend.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("backend-accept"),
        );
        backend.insert("set-cookie", HeaderValue::from_static("a=b"));
        let r = switching_protocols(
            &HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
            &backend,
        );
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455 §1.3's worked example.
        assert_eq!(
            r.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(r.headers()["sec-websocket-protocol"], "chat");
        assert_eq!(r.headers()["set-cookie"], "a=b");
        assert_eq!(r.headers()["upgrade"], "websocket");
    }
}
