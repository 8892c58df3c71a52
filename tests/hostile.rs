//! Hostile clients over real sockets against chatgate in-process: slowloris on heads and
//! bodies, too many headers, request-smuggling shapes written byte by byte, invalid WebSocket
//! frames through a live relay, path tricks on `/chat` and `/auth`, forged forwarding chains
//! and odd request targets. What a test does not find in `tests/http.rs` and
//! `tests/websocket.rs` it adds here.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::ws::{BackendEvent, RawClient, RawFrame, WsBackend};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const WS_PATH: &str = "/ws/socket.io/?EIO=4&transport=websocket";

/// The status code of a raw reply, if it has a status line.
fn status_of(reply: &str) -> Option<u16> {
    reply
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)
        .and_then(|code| code.parse().ok())
}

/// A header of a raw reply's head (names come lower-case from hyper).
fn raw_header<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let head = reply.split("\r\n\r\n").next()?;
    head.lines()
        .skip(1)
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
}

/// Reads until the peer closes (or `limit`), returning what arrived and how long it took.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// Writes `head`, then an endless header value, a byte per 100 ms, `bytes` in all (or until
/// the proxy closes): a head that never ends, each byte well inside any per-read timeout.
fn trickle_endless_head(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    head: &'static [u8],
    bytes: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let endless = head.iter().copied().chain(std::iter::repeat(b'a'));
        for byte in endless.take(bytes) {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test]
async fn headers_trickled_a_byte_per_100ms_are_still_cut_at_the_header_timeout() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--header-read-timeout", "1"]).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, writer) = stream.into_split();
    // Every byte arrives well inside any per-read timeout; the head as a whole never ends.
    let trickle = trickle_endless_head(writer, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", 200);
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), reader.read_to_end(&mut out)).await;
    let held = started.elapsed();
    trickle.abort();
    assert!(
        held >= Duration::from_millis(800) && held < Duration::from_secs(3),
        "connection cut after {held:?}, want about the 1 s header timeout"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
}

/// Reads a raw reply until it holds `answers` complete `HTTP/1.1 200` answers (each ends
/// with `body`), or 5 s.
async fn read_answers(stream: &mut TcpStream, answers: usize, body: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while String::from_utf8_lossy(&out).matches(body).count() < answers {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_second_head_trickled_after_an_answer_is_cut_within_two_header_timeouts() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--header-read-timeout", "1"]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_answers(&mut stream, 1, "x-echo-uri: /first").await;
    assert_eq!(status_of(&first), Some(200), "{first}");
    let answered = Instant::now();
    let (mut reader, writer) = stream.into_split();
    let trickle = trickle_endless_head(writer, b"GET /second HTTP/1.1\r\nHost: x\r\nX-Slow: ", 100);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), reader.read_to_end(&mut rest)).await;
    let held = answered.elapsed();
    trickle.abort();
    // The wait counts from the answer: one header timeout, two at most when the answer's
    // own writes came after the clock's last look.
    assert!(
        held >= Duration::from_millis(800) && held < Duration::from_millis(3500),
        "second head cut {held:?} after the first answer, want 1-2 s"
    );
    assert_eq!(backend.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_before_the_idle_limit_closes() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--header-read-timeout", "0.5"]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /two HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (text, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let held = started.elapsed();
    for uri in ["/one", "/two", "/three"] {
        assert!(
            text.contains(&format!("x-echo-uri: {uri}")),
            "{uri} unanswered: {text}"
        );
    }
    assert_eq!(text.matches("HTTP/1.1 200").count(), 3, "{text}");
    assert!(
        held < Duration::from_secs(4),
        "idle connection held {held:?}"
    );
}

/// What a fixture backend saw of an upload's body.
#[derive(Debug, PartialEq, Eq)]
enum Upload {
    Complete(usize),
    Aborted(usize),
}

#[tokio::test]
async fn body_trickled_then_stalled_is_cut_after_the_idle_timeout_and_others_are_served() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let backend = Backend::start(handler(move |req: Request<Incoming>| {
        let seen_tx = seen_tx.clone();
        async move {
            if req.uri().path() != "/upload" {
                return text(200, "other");
            }
            let mut body = req.into_body();
            let mut received = 0;
            let outcome = loop {
                match body.frame().await {
                    Some(Ok(frame)) => received += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(_)) => break Upload::Aborted(received),
                    None => break Upload::Complete(received),
                }
            };
            let _ = seen_tx.send(outcome);
            text(200, "uploaded")
        }
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &["--body-idle-timeout", "0.5"]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    // 12 bytes over 1.2 s: longer than the idle timeout in total, never idle that long.
    for _ in 0..12 {
        stream.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Now stall. Meanwhile, other clients are served as usual.
    let stalled = Instant::now();
    let other = get(proxy.addr, "/other").await.expect("another client");
    assert_eq!(
        (other.status, other.text().as_str()),
        (StatusCode::OK, "other")
    );

    let outcome = tokio::time::timeout(DEADLINE, seen.recv())
        .await
        .expect("the backend saw the upload end")
        .unwrap();
    assert_eq!(
        outcome,
        Upload::Aborted(12),
        "the backend must see a cut body"
    );
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let cut_after = stalled.elapsed();
    assert!(
        cut_after >= Duration::from_millis(400) && cut_after < Duration::from_secs(4),
        "exchange cut {cut_after:?} after the stall, want about the 0.5 s idle timeout"
    );
    assert!(
        !reply.starts_with("HTTP/1.1 2"),
        "a cut upload must not look successful: {reply:?}"
    );
    assert_eq!(
        get(proxy.addr, "/other").await.unwrap().status,
        StatusCode::OK
    );
}

/// A client that stops sending its upload is the client's failure (downstream, in pingora's
/// terms): 408, not a 502 that blames, logs and counts a healthy backend.
#[tokio::test]
async fn stalled_upload_is_answered_408_not_502() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--body-idle-timeout", "0.3"]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), Some(408), "{reply}");
}

#[tokio::test]
async fn more_headers_than_max_headers_get_431() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--max-headers", "8"]).await;
    let mut request = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..20 {
        request.push_str(&format!("X-Many-{i}: {i}\r\n"));
    }
    request.push_str("\r\n");
    let reply = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert_eq!(status_of(&reply), Some(431), "{reply}");
    // Just under the limit passes.
    let reply = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-B: 2\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), Some(200), "{reply}");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 1);
}

/// Request shapes whose framing or syntax a proxy and a backend could read differently
/// (RFC 9112 §2.2, §5.2, §6.1, §6.3). chatgate must refuse each one, never forward it.
#[tokio::test]
async fn ambiguous_request_framing_and_syntax_are_refused_and_never_forwarded() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "obs-fold (space) continuing a header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n",
        ),
        (
            "obs-fold (tab) continuing a header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\nConnection: close\r\n\r\n",
        ),
        (
            "first header line starting with a space",
            b"GET / HTTP/1.1\r\n Host: x\r\nConnection: close\r\n\r\n",
        ),
        (
            "bare CR inside the request line",
            b"GET /a\rb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ),
        (
            "bare CR ending the request line",
            b"GET / HTTP/1.1\rHost: x\r\nConnection: close\r\n\r\n",
        ),
        (
            "bare CR inside a header value",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\nConnection: close\r\n\r\n",
        ),
        (
            "bare LF splitting the request line",
            b"GET /a\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ),
        (
            "transfer coding chunked, identity (final coding not chunked)",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "transfer coding gzip only",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "chunked then identity on separate lines",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "Content-Length with a plus sign",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        ),
        (
            "negative Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello",
        ),
        (
            "Content-Length with a space inside",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 0\r\n\r\nhelloworld",
        ),
        (
            "hexadecimal Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello",
        ),
        (
            "differing Content-Length list in one line",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ),
    ];
    for (what, bytes) in cases {
        let before = backend.requests.load(Ordering::SeqCst);
        let reply = raw_exchange(proxy.addr, bytes).await;
        let status = status_of(&reply);
        assert!(
            status == Some(400) || (status.is_none() && reply.is_empty()),
            "{what}: want 400 or a closed connection, got {reply:?}"
        );
        assert_eq!(
            backend.requests.load(Ordering::SeqCst),
            before,
            "{what}: reached the backend"
        );
    }
    assert_eq!(get(proxy.addr, "/").await.unwrap().status, StatusCode::OK);
}

/// RFC 9112 §2.2 lets a recipient read a bare LF as a line end. If chatgate does, the backend
/// must get exactly the request chatgate read (re-framed with CRLF), never another one.
#[tokio::test]
async fn bare_lf_line_ends_are_refused_or_forwarded_as_exactly_the_same_request() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let reply = raw_exchange(
        proxy.addr,
        b"GET /lf?q=1 HTTP/1.1\nHost: x\nX-A: a\nX-B: b\r\nConnection: close\n\n",
    )
    .await;
    match status_of(&reply) {
        Some(400) => {}
        Some(200) => {
            assert_eq!(raw_header(&reply, "x-echo-uri"), Some("/lf?q=1"), "{reply}");
            assert_eq!(raw_header(&reply, "x-echo-x-a"), Some("a"), "{reply}");
            assert_eq!(raw_header(&reply, "x-echo-x-b"), Some("b"), "{reply}");
            assert_eq!(raw_header(&reply, "x-echo-method"), Some("GET"), "{reply}");
            assert_eq!(backend.requests.load(Ordering::SeqCst), 1);
        }
        other => panic!("want 400 or the same request forwarded, got {other:?}: {reply}"),
    }
}

/// A client frame, masked as RFC 6455 §5.3 requires (unless `masked` is false).
fn client_frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![first_byte];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => frame.push(mask_bit | n as u8),
        n => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    } else {
        frame.extend_from_slice(payload);
    }
    frame
}

const FIN_TEXT: u8 = 0x81;

/// Opens a relay by hand, proves it works with one good message, sends `bad`, and checks that
/// the client is closed with `want` and that the backend gets nothing but a Close.
async fn invalid_frame_closes_the_client_and_never_reaches_the_backend(bad: Vec<u8>, want: u16) {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = RawClient::connect(proxy.addr, WS_PATH).await;
    assert!(
        client.response_head.starts_with("HTTP/1.1 101"),
        "{}",
        client.response_head
    );
    client
        .stream
        .write_all(&client_frame(FIN_TEXT, b"ok", true))
        .await
        .unwrap();
    let echo = client.next_frame().await.expect("the echo");
    assert_eq!((echo.opcode, echo.payload.as_slice()), (0x1, &b"ok"[..]));
    assert_eq!(backend.received().await, Message::text("ok"));

    client.stream.write_all(&bad).await.unwrap();
    let close = loop {
        match client.next_frame().await {
            Some(frame) if frame.opcode == RawFrame::CLOSE => break frame,
            Some(_) => continue,
            None => panic!("the connection ended without a Close frame"),
        }
    };
    assert_eq!(close.close_code(), Some(want), "{close:?}");
    // The backend's side of the story, to its end: a Close, never the bad frame.
    loop {
        match backend.next_event().await {
            BackendEvent::Received(message) => panic!("the backend got {message:?}"),
            BackendEvent::Closed(_) => continue,
            BackendEvent::Failed(_) | BackendEvent::Ended => break,
        }
    }
}

#[tokio::test]
async fn unmasked_client_frame_closes_the_client_with_1002() {
    invalid_frame_closes_the_client_and_never_reaches_the_backend(
        client_frame(FIN_TEXT, b"unmasked", false),
        1002,
    )
    .await;
}

#[tokio::test]
async fn frame_with_reserved_bits_closes_the_client_with_1002() {
    // RSV1 set without a negotiated extension (RFC 6455 §5.2).
    invalid_frame_closes_the_client_and_never_reaches_the_backend(
        client_frame(FIN_TEXT | 0x40, b"compressed?", true),
        1002,
    )
    .await;
}

#[tokio::test]
async fn control_frame_over_125_bytes_closes_the_client_with_1002() {
    // A Ping with a 200-byte payload (RFC 6455 §5.5: control payloads are at most 125).
    invalid_frame_closes_the_client_and_never_reaches_the_backend(
        client_frame(0x89, &[b'p'; 200], true),
        1002,
    )
    .await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_the_client_with_1007() {
    invalid_frame_closes_the_client_and_never_reaches_the_backend(
        client_frame(FIN_TEXT, &[b'o', b'k', 0xff, 0xfe], true),
        1007,
    )
    .await;
}

/// Whether a browser following `location` stays on this site (see `tests/properties.rs`).
fn stays_on_site(location: &str) -> bool {
    let cleaned: String = location
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .map(|c| if c == '\\' { '/' } else { c })
        .collect();
    let cleaned = cleaned.trim_start_matches(|c: char| c <= ' ');
    cleaned.starts_with('/') && !cleaned.starts_with("//")
}

async fn raw_get(addr: std::net::SocketAddr, target: &str) -> String {
    raw_exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: chat.example\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
}

#[tokio::test]
async fn dot_segments_and_encodings_under_chat_redirect_on_site_and_reach_no_backend() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    for (target, want) in [
        // Never decoded, never normalised: the browser resolves the dots on this site.
        ("/chat/../auth/config", "/../auth/config"),
        ("/chat/..%2F..%2Fevil.example", "/..%2F..%2Fevil.example"),
        ("/chat/.%2E/%2F%2Fevil.example", "/.%2E/%2F%2Fevil.example"),
        ("/chat/\\/evil.example", "/%5C/evil.example"),
        ("/chat/..\\..\\evil.example", "/..%5C..%5Cevil.example"),
        // A header injection attempt stays a literal percent sequence.
        (
            "/chat/%0D%0ALocation:%20http://evil.example",
            "/%0D%0ALocation:%20http://evil.example",
        ),
        ("/chat?next=//evil.example", "/?next=//evil.example"),
    ] {
        let reply = raw_get(proxy.addr, target).await;
        assert_eq!(status_of(&reply), Some(307), "{target}: {reply}");
        let location = raw_header(&reply, "location").unwrap_or_default();
        assert_eq!(location, want, "{target}");
        assert!(stays_on_site(location), "{target} -> {location}");
        let head = reply.split("\r\n\r\n").next().unwrap_or("");
        assert_eq!(head.matches("location:").count(), 1, "{target}: {head}");
    }
    // A tab in the request target: refused, or redirected on site.
    let reply = raw_get(proxy.addr, "/chat/\t/evil.example").await;
    match status_of(&reply) {
        Some(400) => {}
        Some(307) => assert!(stays_on_site(
            raw_header(&reply, "location").unwrap_or_default()
        )),
        other => panic!("tab in target: {other:?}: {reply}"),
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn auth_config_look_alikes_reach_the_backend_verbatim_and_only_the_exact_path_is_stubbed() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    for target in [
        "/auth/config/..",
        "/%61uth/config",
        "/auth%2Fconfig",
        "/auth//config",
        "/AUTH/config",
        "/auth\\config",
        "/auth/config/",
        "/auth/./config",
    ] {
        let reply = raw_get(proxy.addr, target).await;
        assert_eq!(status_of(&reply), Some(200), "{target}: {reply}");
        assert_eq!(
            raw_header(&reply, "x-echo-uri"),
            Some(target),
            "{target} must reach the backend as sent"
        );
    }
    let stubbed = raw_get(proxy.addr, "/auth/config?x=/../y").await;
    assert_eq!(status_of(&stubbed), Some(200), "{stubbed}");
    assert!(stubbed.contains("\"requireLogin\":false"), "{stubbed}");
    assert_eq!(raw_header(&stubbed, "x-echo-uri"), None);
    assert_eq!(backend.requests.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn trusted_peer_with_a_long_garbage_forwarded_chain_is_served_and_appended_to() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--trusted-proxies", "127.0.0.1"]).await;
    let garbage: Vec<String> = (0..3000)
        .map(|i| match i % 4 {
            0 => format!("junk-{i}"),
            1 => "[::1".to_owned(),
            2 => "999.1.1.1:99999".to_owned(),
            _ => "unknown".to_owned(),
        })
        .collect();
    let chain = garbage.join(", ");
    assert!(chain.len() > 20_000);
    let mut request = format!(
        "GET /xff HTTP/1.1\r\nHost: chat.example\r\nX-Forwarded-For: {chain}\r\n\
         X-Forwarded-For: 1.2.3.4,,, ,\r\nX-Forwarded-For: "
    )
    .into_bytes();
    // A line with obs-text bytes (not UTF-8) as well.
    request.extend_from_slice(b"\xff\xfe5.6.7.8\r\nConnection: close\r\n\r\n");
    let reply = raw_exchange(proxy.addr, &request).await;
    assert_eq!(
        status_of(&reply),
        Some(200),
        "{}",
        &reply[..reply.len().min(300)]
    );
    let forwarded = raw_header(&reply, "x-echo-x-forwarded-for").expect("an X-Forwarded-For");
    assert!(
        forwarded.starts_with("junk-0, [::1") && forwarded.ends_with(", 127.0.0.1"),
        "the chain is kept and the peer appended: ...{}",
        &forwarded[forwarded.len().saturating_sub(80)..]
    );
    // The proxy still serves.
    assert_eq!(get(proxy.addr, "/").await.unwrap().status, StatusCode::OK);
}

/// RFC 9112 §3.2.4: the asterisk-form is only for server-wide OPTIONS; a proxy forwards it
/// as it came, never as a path of its own.
#[tokio::test]
async fn options_asterisk_is_forwarded_in_asterisk_form() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let reply = raw_exchange(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: chat.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), Some(200), "OPTIONS *: {reply}");
    assert_eq!(raw_header(&reply, "x-echo-uri"), Some("*"), "{reply}");
    assert_eq!(
        raw_header(&reply, "x-echo-method"),
        Some("OPTIONS"),
        "{reply}"
    );
    assert_eq!(get(proxy.addr, "/").await.unwrap().status, StatusCode::OK);
}

#[tokio::test]
async fn absolute_form_for_the_proxys_own_host_is_proxied_in_origin_form() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let own = proxy.addr;
    let reply = raw_exchange(
        proxy.addr,
        format!("GET http://{own}/x?y=1 HTTP/1.1\r\nHost: {own}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&reply), Some(200), "{reply}");
    assert_eq!(raw_header(&reply, "x-echo-uri"), Some("/x?y=1"), "{reply}");
    assert_eq!(
        raw_header(&reply, "x-echo-host"),
        Some(own.to_string().as_str())
    );
    assert_eq!(backend.requests.load(Ordering::SeqCst), 1);
}

/// RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
/// HTTP/1.1 request message that lacks a Host header field and to any that contains more
/// than one Host header field line". Forwarded, two Hosts let chatgate and the backend
/// each pick a different one.
#[tokio::test]
async fn request_with_two_host_lines_is_refused() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let reply = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: chat.example\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&reply), Some(400), "{reply}");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn http11_request_without_host_is_refused() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let reply = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&reply), Some(400), "{reply}");
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
}
