//! The WebSocket relay, end to end on loopback: a real client, chatgate in-process (and once
//! the real binary), and tokio-tungstenite fixture backends.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, StatusCode};
use support::ws::{
    Behaviour, Client, RawClient, RawFrame, WsBackend, close_received, connect, next_data,
    next_message, refusing_backend, stalling_backend, try_connect, ws_request,
};
use support::{DEADLINE, Proxy, dead_addr, eventually, get, raw_exchange};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// A Chainlit-shaped path: the backend mounts Socket.IO at /ws/socket.io/.
const WS_PATH: &str = "/ws/socket.io/?EIO=4&transport=websocket";

async fn websockets_open(proxy: &Proxy) -> u64 {
    let reply = get(proxy.addr, "/monitor/health")
        .await
        .expect("health answers");
    reply.json()["connections"]["websockets"]
        .as_u64()
        .expect("connections.websockets")
}

/// Keeps reading a client (so it answers the proxy's Close) and hands back the Close frame.
fn await_close(mut client: Client) -> tokio::task::JoinHandle<Option<(u16, String)>> {
    tokio::spawn(async move { close_received(&mut client).await })
}

#[tokio::test]
async fn text_and_binary_echo_through_the_relay() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;

    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("hello"));
    assert_eq!(backend.received().await, Message::text("hello"));

    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    client.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::binary(blob.clone()));
    assert_eq!(backend.received().await, Message::binary(blob));

    // Many small messages in a burst arrive complete and in order.
    for i in 0..200 {
        client.feed(Message::text(format!("m{i}"))).await.unwrap();
    }
    client.flush().await.unwrap();
    for i in 0..200 {
        assert_eq!(next_data(&mut client).await, Message::text(format!("m{i}")));
    }
}

#[tokio::test]
async fn client_ping_is_answered_with_its_payload() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;

    client
        .send(Message::Ping(Bytes::from_static(b"are-you-there")))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut client).await,
        Message::Pong(Bytes::from_static(b"are-you-there"))
    );
    // The ping travelled to the backend (whose tungstenite answered it).
    match backend.next_event().await {
        support::ws::BackendEvent::Received(Message::Ping(p)) => {
            assert_eq!(&p[..], b"are-you-there")
        }
        other => panic!("backend saw {other:?} instead of the ping"),
    }
}

#[tokio::test]
async fn close_code_travels_backend_to_client() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;

    client.send(Message::text("close:4001:bye")).await.unwrap();
    assert_eq!(
        close_received(&mut client).await,
        Some((4001, "bye".into()))
    );
    // The backend's Close is answered at once, before the client (not read yet) answers.
    assert_eq!(backend.close_received().await, Some((4001, "bye".into())));
    let end = tokio::time::timeout(DEADLINE, client.next())
        .await
        .expect("client stream ends");
    assert!(
        end.is_none() || matches!(end, Some(Err(WsError::ConnectionClosed))),
        "{end:?}"
    );
}

#[tokio::test]
async fn close_code_travels_client_to_backend() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;

    let frame = CloseFrame {
        code: CloseCode::from(4002),
        reason: "done here".into(),
    };
    client.close(Some(frame)).await.unwrap();
    assert_eq!(
        backend.close_received().await,
        Some((4002, "done here".into()))
    );
    assert_eq!(
        close_received(&mut client).await,
        Some((4002, "done here".into()))
    );
    eventually("the relay is no longer counted", async || {
        websockets_open(&proxy).await == 0
    })
    .await;
}

#[tokio::test]
async fn messages_sent_before_a_close_arrive_before_it() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    for i in 0..50 {
        client.feed(Message::text(format!("m{i}"))).await.unwrap();
    }
    let frame = CloseFrame {
        code: CloseCode::from(4003),
        reason: "last".into(),
    };
    client.send(Message::Close(Some(frame))).await.unwrap();
    for i in 0..50 {
        assert_eq!(backend.received().await, Message::text(format!("m{i}")));
    }
    assert_eq!(backend.close_received().await, Some((4003, "last".into())));
}

#[tokio::test]
async fn subprotocol_chosen_by_the_backend_reaches_the_client() {
    let backend = WsBackend::builder().subprotocol("superchat").start().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut request = ws_request(proxy.addr, WS_PATH);
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("chat, superchat"),
    );
    // tungstenite's client fails the handshake if the 101 names no (or another) protocol.
    let (mut client, response) = try_connect(request).await.expect("handshake");
    assert_eq!(response.headers()["sec-websocket-protocol"], "superchat");
    assert_eq!(
        backend.last_handshake().header("sec-websocket-protocol"),
        Some("chat, superchat")
    );
    client
        .send(Message::text("after negotiation"))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut client).await,
        Message::text("after negotiation")
    );
}

#[tokio::test]
async fn extensions_are_never_forwarded() {
    // The client offers permessage-deflate (Chromium does): the relay must neither offer it
    // to the backend nor grant it to the client.
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut request = ws_request(proxy.addr, WS_PATH);
    request.headers_mut().insert(
        "sec-websocket-extensions",
        HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
    );
    let (mut client, response) = try_connect(request).await.expect("handshake");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(
        response.headers().get("sec-websocket-extensions").is_none(),
        "101 granted an extension: {:?}",
        response.headers()
    );
    let seen = backend.last_handshake();
    assert!(
        seen.headers.get("sec-websocket-extensions").is_none(),
        "{:?}",
        seen.headers
    );
    client.send(Message::text("uncompressed")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("uncompressed"));
}

#[tokio::test]
async fn backend_enabling_an_unoffered_extension_is_refused_with_502() {
    // RFC 6455 §4.1: the client leg must fail a 101 that enables an extension it did not
    // offer; the relay could not read the compressed frames that would follow.
    let backend = WsBackend::builder().announce_extension().start().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    match try_connect(ws_request(proxy.addr, WS_PATH)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::BAD_GATEWAY)
        }
        other => panic!("expected 502, got {:?}", other.map(|(_, r)| r.status())),
    }
}

#[tokio::test]
async fn handshake_headers_and_target_reach_the_backend() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut request = ws_request(proxy.addr, "/ws/socket.io/?EIO=4&transport=websocket&t=abc");
    let headers = request.headers_mut();
    headers.insert("origin", HeaderValue::from_static("https://chat.example"));
    headers.insert(
        "cookie",
        HeaderValue::from_static("session=s3cr3t; theme=dark"),
    );
    headers.insert("authorization", HeaderValue::from_static("Bearer t0ken"));
    let (_client, _) = try_connect(request).await.expect("handshake");

    let seen = backend.last_handshake();
    assert_eq!(
        seen.target,
        "/ws/socket.io/?EIO=4&transport=websocket&t=abc"
    );
    assert_eq!(seen.header("origin"), Some("https://chat.example"));
    assert_eq!(seen.header("cookie"), Some("session=s3cr3t; theme=dark"));
    assert_eq!(seen.header("authorization"), Some("Bearer t0ken"));
    // The backend leg has its own key (the client's is answered by chatgate).
    assert_ne!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
}

#[tokio::test]
async fn socketio_path_is_mapped_onto_the_backend_mount() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, "/socket.io/?EIO=4&transport=websocket").await;
    assert_eq!(
        backend.last_handshake().target,
        "/ws/socket.io/?EIO=4&transport=websocket"
    );
    client.send(Message::text("40")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("40"));

    // A custom mount is honoured too.
    let custom = Proxy::start(backend.addr, &["--socketio-path", "/api/sio/"]).await;
    let _client = connect(custom.addr, "/socket.io/?EIO=4&transport=websocket").await;
    assert_eq!(
        backend.last_handshake().target,
        "/api/sio/?EIO=4&transport=websocket"
    );
}

#[tokio::test]
async fn backend_refusing_the_upgrade_passes_its_status_to_the_client() {
    let backend = refusing_backend(403, "no").await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    match try_connect(ws_request(proxy.addr, WS_PATH)).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(response.headers()["x-refused-by"], "backend");
            assert_eq!(response.body().as_deref(), Some(&b"no"[..]));
        }
        Err(e) => panic!("expected the backend's 403, got {e}"),
        Ok(_) => panic!("expected the backend's 403, got a WebSocket"),
    }
}

#[tokio::test]
async fn backend_down_is_502() {
    let proxy = Proxy::start(dead_addr().await, &[]).await;
    match try_connect(ws_request(proxy.addr, WS_PATH)).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::BAD_GATEWAY),
        Err(e) => panic!("expected 502, got {e}"),
        Ok(_) => panic!("expected 502, got a WebSocket"),
    }
}

#[tokio::test]
async fn backend_stalling_the_handshake_is_504_after_the_handshake_timeout() {
    let (addr, requests, _task) = stalling_backend().await;
    let proxy = Proxy::start(addr, &["--ws-handshake-timeout", "0.5"]).await;
    let started = Instant::now();
    match try_connect(ws_request(proxy.addr, WS_PATH)).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT)
        }
        Err(e) => panic!("expected 504, got {e}"),
        Ok(_) => panic!("expected 504, got a WebSocket"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    assert!(
        requests.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "backend was asked"
    );
}

#[tokio::test]
async fn backend_killed_mid_relay_closes_the_client_with_1011() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    client.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("before"));
    assert_eq!(backend.received().await, Message::text("before"));

    backend.kill_connections();
    let (code, _) = close_received(&mut client).await.expect("a close code");
    assert_eq!(code, 1011);
    eventually("the relay is no longer counted", async || {
        websockets_open(&proxy).await == 0
    })
    .await;
}

#[tokio::test]
async fn oversized_message_closes_the_sender_with_1009() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(
        backend.addr,
        &["--ws-max-message", "4096", "--ws-max-frame", "4096"],
    )
    .await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    client.send(Message::text("x".repeat(4000))).await.unwrap();
    assert_eq!(
        next_data(&mut client).await,
        Message::text("x".repeat(4000))
    );
    assert_eq!(backend.received().await, Message::text("x".repeat(4000)));

    client
        .send(Message::text("y".repeat(20_000)))
        .await
        .unwrap();
    let (code, _) = close_received(&mut client).await.expect("a close code");
    assert_eq!(code, 1009);
    let (code, _) = backend
        .close_received()
        .await
        .expect("a close code at the backend");
    assert!(code == 1001 || code == 1011, "backend got {code}");
}

#[tokio::test]
async fn oversized_message_from_the_backend_closes_it_with_1009() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(
        backend.addr,
        &["--ws-max-message", "4096", "--ws-max-frame", "4096"],
    )
    .await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    // The limit holds on the backend leg too: the backend is the offender here.
    client.send(Message::text("big:20000")).await.unwrap();
    let (code, _) = close_received(&mut client).await.expect("a close code");
    assert!(code == 1001 || code == 1011, "client got {code}");
    let (code, _) = backend
        .close_received()
        .await
        .expect("a close code at the backend");
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn idle_client_gets_pings_and_stays_open_while_it_answers() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(
        backend.addr,
        &["--ws-ping-interval", "0.3", "--ws-pong-timeout", "0.3"],
    )
    .await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    let started = Instant::now();
    let mut pings = 0;
    // Several ping intervals and pong timeouts: a client that answers is never closed.
    while started.elapsed() < Duration::from_millis(1500) {
        match tokio::time::timeout(Duration::from_secs(2), client.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            other => panic!("expected only pings on an idle relay, got {other:?}"),
        }
    }
    assert!(pings >= 2, "{pings} pings in {:?}", started.elapsed());
    client.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("still here"));
}

#[tokio::test]
async fn client_that_never_answers_pings_is_closed_after_the_pong_timeout() {
    let mut backend = WsBackend::echo().await;
    let proxy = Proxy::start(
        backend.addr,
        &["--ws-ping-interval", "0.3", "--ws-pong-timeout", "0.5"],
    )
    .await;
    let mut client = RawClient::connect(proxy.addr, WS_PATH).await;
    assert!(
        client.response_head.starts_with("HTTP/1.1 101"),
        "{}",
        client.response_head
    );
    let started = Instant::now();
    let ping = client.next_frame().await.expect("a ping");
    assert_eq!(ping.opcode, RawFrame::PING);
    let pinged = started.elapsed();
    let close = loop {
        let frame = client.next_frame().await.expect("a close before the end");
        if frame.opcode == RawFrame::CLOSE {
            break frame;
        }
    };
    let closed = started.elapsed();
    assert_eq!(close.close_code(), Some(1001));
    assert!(
        closed - pinged >= Duration::from_millis(400),
        "closed {:?} after the ping",
        closed - pinged
    );
    assert_eq!(
        backend.close_received().await.map(|(code, _)| code),
        Some(1001)
    );
}

#[tokio::test]
async fn bad_handshakes_are_400_and_never_reach_the_backend() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let head = |method: &str, extra: &str| {
        format!(
            "{method} {WS_PATH} HTTP/1.1\r\nhost: chat.example\r\nconnection: Upgrade\r\n\
             upgrade: websocket\r\n{extra}content-length: 0\r\n\r\n"
        )
    };
    let cases = [
        ("no key", head("GET", "sec-websocket-version: 13\r\n")),
        (
            "version 8",
            head(
                "GET",
                "sec-websocket-version: 8\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            ),
        ),
        (
            "POST",
            head(
                "POST",
                "sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            ),
        ),
        (
            "short key",
            head(
                "GET",
                "sec-websocket-version: 13\r\nsec-websocket-key: abc\r\n",
            ),
        ),
    ];
    for (what, request) in cases {
        let response = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{what}: {response}");
    }
    assert_eq!(
        backend.contacted(),
        0,
        "a bad handshake reached the backend"
    );
    // The same backend is reachable: the count above could have moved.
    let _client = connect(proxy.addr, WS_PATH).await;
    assert_eq!(backend.contacted(), 1);
}

#[tokio::test]
async fn health_counts_open_relays() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    assert_eq!(websockets_open(&proxy).await, 0);
    let mut first = connect(proxy.addr, WS_PATH).await;
    let mut second = connect(proxy.addr, WS_PATH).await;
    assert_eq!(websockets_open(&proxy).await, 2);

    first.close(None).await.unwrap();
    eventually("one relay left", async || {
        websockets_open(&proxy).await == 1
    })
    .await;
    // A client that vanishes without a Close is uncounted too.
    second.get_mut().shutdown().await.ok();
    drop(second);
    eventually("no relay left", async || websockets_open(&proxy).await == 0).await;
    drop(first);
}

#[tokio::test]
async fn shutdown_closes_open_relays_with_1001_within_the_grace() {
    let mut backend = WsBackend::echo().await;
    let mut proxy = Proxy::start(backend.addr, &["--shutdown-grace", "5"]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("hi"));
    let client_close = await_close(client);

    let started = Instant::now();
    proxy.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(7), proxy.handle())
        .await
        .expect("server returns within the grace")
        .expect("server task");
    let took = started.elapsed();
    // Returning well inside the 5 s grace means the relay finished, not the timer.
    // (A stuck close handshake would take relay::CLOSE_TIMEOUT, 3 s.)
    assert!(took < Duration::from_millis(2500), "server took {took:?}");
    let frame = tokio::time::timeout(DEADLINE, client_close)
        .await
        .expect("client closed")
        .unwrap();
    assert_eq!(frame.map(|(code, _)| code), Some(1001));
    assert_eq!(
        backend.close_received().await.map(|(code, _)| code),
        Some(1001)
    );
}

/// SIGTERM to the real binary: the open relay's client gets 1001, and the process exits 0.
#[tokio::test]
async fn sigterm_closes_relays_with_1001_and_the_binary_exits_zero() {
    let mut backend = WsBackend::echo().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args([
            "--listen",
            &addr.to_string(),
            "--backend",
            &format!("http://{}", backend.addr),
            "--shutdown-grace",
            "5",
            "--log-format",
            "text",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn chatgate");
    let pid = child.id().expect("child pid");
    eventually("the binary is live", async || {
        get(addr, "/monitor/live")
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;

    let mut client = connect(addr, WS_PATH).await;
    client.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut client).await, Message::text("hi"));
    let client_close = await_close(client);

    let started = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let frame = tokio::time::timeout(DEADLINE, client_close)
        .await
        .expect("client closed")
        .unwrap();
    assert_eq!(frame.map(|(code, _)| code), Some(1001));
    assert_eq!(
        backend.close_received().await.map(|(code, _)| code),
        Some(1001)
    );
    let status = tokio::time::timeout(Duration::from_secs(7), child.wait())
        .await
        .expect("the binary exits within its grace")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "exited after {:?}",
        started.elapsed()
    );
}

/// A backend that stops reading makes the client's sends pend: chatgate holds at most one
/// message per direction (plus socket buffers), never the whole stream.
#[tokio::test]
async fn slow_reading_backend_pushes_back_on_the_client() {
    const MESSAGE: usize = 64 * 1024;
    const TRIED: usize = 2000; // 125 MiB
    let backend = WsBackend::builder()
        .behaviour(Behaviour::NeverRead)
        .recv_buffer(64 * 1024)
        .start()
        .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    let payload = Bytes::from(vec![7u8; MESSAGE]);
    let started = Instant::now();
    let mut pushed = 0;
    while pushed < TRIED && started.elapsed() < Duration::from_secs(8) {
        let send = client.send(Message::binary(payload.clone()));
        match tokio::time::timeout(Duration::from_millis(500), send).await {
            Ok(Ok(())) => pushed += 1,
            Ok(Err(e)) => panic!("send failed after {pushed} messages: {e}"),
            Err(_) => break,
        }
    }
    eprintln!(
        "pushed {pushed} x 64 KiB before the sends pended ({:?})",
        started.elapsed()
    );
    assert!(
        pushed < TRIED / 5,
        "pushed {pushed} of {TRIED} messages: nothing pushed back"
    );
}

#[tokio::test]
async fn frames_sent_right_after_the_101_are_not_lost() {
    // Engine.IO sends its open packet as soon as a WebSocket-only session is accepted, often
    // in the same TCP segment as the 101.
    let (addr, _task) = support::raw_backend(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        let head = support::read_head(&mut stream).await;
        if !head.to_ascii_lowercase().contains("upgrade: websocket") {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
            return;
        }
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-key: "))
            .unwrap_or("")
            .trim()
            .to_owned();
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        reply.extend_from_slice(&[0x81, 5]); // FIN + text, unmasked, 5 bytes
        reply.extend_from_slice(b"0open");
        let _ = stream.write_all(&reply).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    assert_eq!(next_data(&mut client).await, Message::text("0open"));
}
