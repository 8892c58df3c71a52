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
    // Interim answers skipped so far: they count against the head limit too.
    let mut skipped = 0;
    let (status, headers, head_len) = loop {
        if let Some((status, headers, len)) = parse_answer_head(&buf).map_err(failed)? {
            // RFC 9110 §15.2: a client must be able to parse 1xx answers before the final
            // one. `100 Continue` and `103 Early Hints` mean nothing to a WebSocket client,
            // and hyper's server cannot pass an interim answer on: skip them.
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                skipped += len;
                buf.drain(..len);
                continue;
            }
            break (status, headers, len);
        }
        if skipped + buf.len() >= MAX_HANDSHAKE_HEAD {
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
    };
    let rest = buf.split_off(head_len);

    if status != StatusCode::SWITCHING_PROTOCOLS {
        // A refusal: pass its body on, framed as RFC 9112 §6.3 says, bounded.
        let body = read_refusal_body(stream, refusal_framing(status, &headers), rest).await;
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

/// Parses an answer head from the start of `buf`: `None` while it is incomplete.
fn parse_answer_head(buf: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut slots);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("malformed answer: {e}")),
        Ok(httparse::Status::Complete(len)) => {
            let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
                .map_err(|_| "bad status".to_owned())?;
            let mut headers = HeaderMap::with_capacity(parsed.headers.len());
            for h in parsed.headers.iter() {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_bytes(h.value),
                ) {
                    headers.append(name, value);
                }
            }
            Ok(Some((status, headers, len)))
        }
    }
}

/// How a refusal's body ends (RFC 9112 §6.3).
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// 204 and 304 have none.
    Empty,
    /// `Transfer-Encoding` with `chunked` last.
    Chunked,
    /// `Content-Length` (only when there is no `Transfer-Encoding`).
    Length(usize),
    /// Neither: the body runs until the backend closes.
    UntilClose,
}

fn refusal_framing(status: StatusCode, headers: &HeaderMap) -> Framing {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Framing::Empty;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The last coding of the last line decides; anything but chunked runs until close.
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return if last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
    }
    match headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<usize>().ok())
    {
        Some(length) => Framing::Length(length),
        None => Framing::UntilClose,
    }
}

/// Bytes of chunk framing read beyond the body limit before giving up on a chunked body
/// (tiny chunks or long chunk extensions cost framing, not body).
const MAX_CHUNK_OVERHEAD: usize = 64 * 1024;

/// Reads a refusal's body after its head (`rest` is what came with the head), at most
/// `MAX_REFUSAL_BODY` of it. The caller's handshake timeout bounds the time. A body cut short
/// (the backend closed early, or broke the chunked framing) is passed on as far as it came:
/// the refusal's status is what the client needs.
async fn read_refusal_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    framing: Framing,
    rest: Vec<u8>,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    match framing {
        Framing::Empty => Vec::new(),
        Framing::Length(_) | Framing::UntilClose => {
            let wanted = match framing {
                Framing::Length(length) => length.min(MAX_REFUSAL_BODY),
                _ => MAX_REFUSAL_BODY,
            };
            let mut body = rest;
            while body.len() < wanted {
                body.reserve(wanted - body.len());
                match stream.read_buf(&mut body).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            body.truncate(wanted);
            body
        }
        Framing::Chunked => {
            let mut raw = rest;
            let mut body = Vec::new();
            let mut read = raw.len();
            // Done, or framing broken: either way the body ends here.
            while let Ok(Chunks::More) = decode_chunks(&mut raw, &mut body, MAX_REFUSAL_BODY) {
                if read >= MAX_REFUSAL_BODY + MAX_CHUNK_OVERHEAD {
                    break;
                }
                raw.reserve(4096);
                match stream.read_buf(&mut raw).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
            body
        }
    }
}

/// What `decode_chunks` made of its input.
#[derive(Debug, PartialEq, Eq)]
enum Chunks {
    /// The body goes on: read more.
    More,
    /// The last chunk arrived, or the body reached its limit.
    Done,
}

/// Decodes the complete chunks at the start of `raw` (RFC 9112 §7.1) into `body`, up to
/// `limit` bytes of body, and removes what it used from `raw`. httparse reads each chunk's
/// size line; the rest is this loop. Trailers are not read: the leg closes after a refusal.
fn decode_chunks(
    raw: &mut Vec<u8>,
    body: &mut Vec<u8>,
    limit: usize,
) -> Result<Chunks, &'static str> {
    let mut used = 0;
    let result = loop {
        let (size_line, size) = match httparse::parse_chunk_size(&raw[used..]) {
            Ok(httparse::Status::Complete(parsed)) => parsed,
            Ok(httparse::Status::Partial) => break Ok(Chunks::More),
            Err(_) => break Err("malformed chunk size"),
        };
        if size == 0 {
            used += size_line;
            break Ok(Chunks::Done);
        }
        let start = used + size_line;
        let available = raw.len() - start;
        let room = limit - body.len();
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > room {
            // Past the limit: keep what fits, then stop.
            if available >= room {
                body.extend_from_slice(&raw[start..start + room]);
                used = start + room;
                break Ok(Chunks::Done);
            }
            break Ok(Chunks::More);
        }
        if available < size + 2 {
            break Ok(Chunks::More);
        }
        if &raw[start + size..start + size + 2] != b"\r\n" {
            break Err("chunk not followed by CRLF");
        }
        body.extend_from_slice(&raw[start..start + size]);
        used = start + size + 2;
        if body.len() == limit {
            break Ok(Chunks::Done);
        }
    };
    raw.drain(..used);
    result
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
        // `Connection` is matched by token: `keep-alive, Upgrade` is common.
        let is_upgrade = |fields| {
            let req = upgrade(fields);
            crate::proxy::headers::HeadFacts::of(req.method(), req.headers()).websocket
        };
        assert!(is_upgrade(GOOD));
        assert!(!is_upgrade(&[("upgrade", "websocket")]));
        assert!(!is_upgrade(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ]));
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

    fn head(lines: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn refusal_framing_follows_rfc_9112() {
        let framing = |status: u16, lines: &[(&str, &str)]| {
            refusal_framing(StatusCode::from_u16(status).unwrap(), &head(lines))
        };
        assert_eq!(
            framing(403, &[("content-length", "12")]),
            Framing::Length(12)
        );
        assert_eq!(
            framing(403, &[("transfer-encoding", "chunked")]),
            Framing::Chunked
        );
        assert_eq!(
            framing(403, &[("transfer-encoding", "gzip, Chunked")]),
            Framing::Chunked
        );
        // Transfer-Encoding wins over Content-Length (§6.3 item 3).
        assert_eq!(
            framing(
                403,
                &[("content-length", "3"), ("transfer-encoding", "chunked")]
            ),
            Framing::Chunked
        );
        assert_eq!(
            framing(403, &[("transfer-encoding", "chunked, gzip")]),
            Framing::UntilClose
        );
        assert_eq!(framing(403, &[]), Framing::UntilClose);
        assert_eq!(
            framing(403, &[("content-length", "lots")]),
            Framing::UntilClose
        );
        assert_eq!(framing(204, &[("content-length", "5")]), Framing::Empty);
        assert_eq!(framing(304, &[]), Framing::Empty);
    }

    #[test]
    fn chunks_decode_whole_or_byte_by_byte() {
        let wire: &[u8] = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nx-trailer: 1\r\n\r\n";
        let mut raw = wire.to_vec();
        let mut body = Vec::new();
        assert_eq!(decode_chunks(&mut raw, &mut body, 1024), Ok(Chunks::Done));
        assert_eq!(body, b"hello world!");

        // Arriving a byte at a time, the result is the same.
        let mut raw = Vec::new();
        let mut body = Vec::new();
        let mut done = false;
        for byte in wire {
            raw.push(*byte);
            if decode_chunks(&mut raw, &mut body, 1024) == Ok(Chunks::Done) {
                done = true;
                break;
            }
        }
        assert!(done);
        assert_eq!(body, b"hello world!");
    }

    #[test]
    fn chunks_stop_at_the_limit_and_on_bad_framing() {
        let mut raw = b"a\r\n0123456789\r\n5\r\nabcde\r\n".to_vec();
        let mut body = Vec::new();
        assert_eq!(decode_chunks(&mut raw, &mut body, 12), Ok(Chunks::Done));
        assert_eq!(body, b"0123456789ab");

        // A huge declared chunk does not make the decoder wait for (or hold) all of it.
        let mut raw = b"ffffffff\r\nxyz".to_vec();
        let mut body = Vec::new();
        assert_eq!(decode_chunks(&mut raw, &mut body, 3), Ok(Chunks::Done));
        assert_eq!(body, b"xyz");

        let mut body = Vec::new();
        assert!(decode_chunks(&mut b"zz\r\n".to_vec(), &mut body, 64).is_err());
        assert!(decode_chunks(&mut b"2\r\nabX\r\n".to_vec(), &mut body, 64).is_err());
        // Incomplete: asks for more, keeps what it could not use yet.
        let mut raw = b"5\r\nhel".to_vec();
        let mut body = Vec::new();
        assert_eq!(decode_chunks(&mut raw, &mut body, 64), Ok(Chunks::More));
        assert_eq!(raw, b"5\r\nhel");
    }

    /// Runs `backend_handshake` against a scripted backend that writes `answer` in pieces.
    async fn handshake_against(answer: Vec<&'static [u8]>) -> Result<BackendAnswer, ProxyError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let request = backend_handshake_request(
            "ws://127.0.0.1:1/ws/".parse().unwrap(),
            head(&[("host", "chat.example")]),
        );
        let key = request.headers()["sec-websocket-key"].clone();
        let backend = tokio::spawn(async move {
            let mut seen = Vec::new();
            while !seen.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                theirs.read_exact(&mut byte).await.unwrap();
                seen.push(byte[0]);
            }
            let accept = derive_accept_key(key.as_bytes());
            for piece in answer {
                let mut bytes = piece.to_vec();
                if let Some(at) = piece.windows(8).position(|w| w == b"{accept}") {
                    bytes.splice(at..at + 8, accept.bytes());
                }
                theirs.write_all(&bytes).await.unwrap();
                tokio::task::yield_now().await;
            }
            // Closing ends a body that runs until close; what was written is still read.
        });
        let result = backend_handshake(&mut ours, &request).await;
        backend.await.unwrap();
        result
    }

    const ACCEPTED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
        connection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n\x81\x020x";

    #[tokio::test]
    async fn informational_answers_before_the_101_are_skipped() {
        let answer = handshake_against(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </app.js>\r\n\r\n",
            ACCEPTED,
        ])
        .await;
        match answer {
            Ok(BackendAnswer::Accepted { leftover, .. }) => assert_eq!(leftover, b"\x81\x020x"),
            Ok(BackendAnswer::Refused(r)) => panic!("refused with {}", r.status()),
            Err(e) => panic!("failed: {e}"),
        }
        // All in one piece too.
        let answer = handshake_against(vec![b"HTTP/1.1 100 Continue\r\n\r\n", ACCEPTED]).await;
        assert!(matches!(answer, Ok(BackendAnswer::Accepted { .. })));
    }

    #[tokio::test]
    async fn endless_informational_answers_hit_the_head_limit() {
        let answer = handshake_against(vec![
            b"HTTP/1.1 100 Continue\r\n\r\n";
            MAX_HANDSHAKE_HEAD / 20
        ])
        .await;
        match answer {
            Err(e) => assert!(e.to_string().contains("too large"), "{e}"),
            Ok(_) => panic!("expected the head limit"),
        }
    }

    async fn refusal_body(answer: Vec<&'static [u8]>) -> (StatusCode, Vec<u8>) {
        use http_body_util::BodyExt;
        match handshake_against(answer).await {
            Ok(BackendAnswer::Refused(r)) => {
                let status = r.status();
                assert!(r.headers().get("transfer-encoding").is_none());
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, body.to_vec())
            }
            Ok(BackendAnswer::Accepted { .. }) => panic!("accepted"),
            Err(e) => panic!("failed: {e}"),
        }
    }

    #[tokio::test]
    async fn a_chunked_refusal_arrives_decoded_and_whole() {
        let (status, body) = refusal_body(vec![
            b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n7\r\nnot you",
            b"\r\n",
            b"1\r\n,\r\n6\r\n sorr",
            b"y\r\n0\r\n\r\n",
        ])
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body, b"not you, sorry");
    }

    #[tokio::test]
    async fn a_refusal_without_a_length_is_read_until_close() {
        let (status, body) = refusal_body(vec![
            b"HTTP/1.1 401 Unauthorized\r\n\r\nlog",
            b" in ",
            b"first",
        ])
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, b"log in first");
    }
}
