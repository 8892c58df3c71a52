//! WebSocket hardening, end to end on loopback (issue 13): a client that stops reading cannot
//! pin its relay, its connection slot or its buffers; only what a client sends answers a
//! ping; the backend's handshake may carry 1xx answers before its 101, and a refusal's body
//! reaches the client whole however it is framed.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use support::ws::{Behaviour, RawClient, RawFrame, WsBackend, connect};
use support::{Backend, DEADLINE, Proxy, eventually, get, handler, raw_backend, read_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

const WS_PATH: &str = "/ws/socket.io/?EIO=4&transport=websocket";

/// Short keep-alive settings, so that a relay's fate is decided within a second or two.
const FAST_KEEPALIVE: [&str; 4] = ["--ws-ping-interval", "0.5", "--ws-pong-timeout", "0.5"];

/// `connections.websockets` from `/monitor/health`; `None` while it cannot be had.
async fn relays_open(proxy: &Proxy) -> Option<u64> {
    let reply = get(proxy.addr, "/monitor/health").await.ok()?;
    let doc: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    doc["connections"]["websockets"].as_u64()
}

/// Takes a connection slot with a kept-alive HTTP connection (answered, so it is counted).
async fn hold_a_slot(proxy: &Proxy) -> TcpStream {
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"GET /monitor/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut status = [0u8; 12];
    held.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    held
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_relay_and_slot_within_the_pong_timeout() {
    let mut backend = WsBackend::builder()
        .behaviour(Behaviour::Flood)
        .start()
        .await;
    let mut args = FAST_KEEPALIVE.to_vec();
    args.extend(["--max-connections", "2"]);
    let proxy = Proxy::start(backend.addr, &args).await;
    // Upgrades, then never reads again: the backend's flood piles up in the socket buffers
    // until the client's window is shut.
    let client = connect(proxy.addr, WS_PATH).await;
    let started = Instant::now();
    let _held = hold_a_slot(&proxy).await;
    let refused = support::raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        refused.starts_with("HTTP/1.1 503"),
        "the relay and one connection fill 2 slots: {refused}"
    );
    // A non-probe request: the probe routes would be served from the probe reserve even
    // while every slot is taken.
    eventually("the stuck relay's slot frees up", async || {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let answer = support::raw_exchange(proxy.addr, request).await;
        !answer.is_empty() && !answer.starts_with("HTTP/1.1 503")
    })
    .await;
    eprintln!(
        "relay of a non-reading client ended after {:?}",
        started.elapsed()
    );
    eventually("the relay is no longer counted", async || {
        relays_open(&proxy).await == Some(0)
    })
    .await;
    let (code, reason) = backend.close_received().await.expect("a close code");
    assert_eq!((code, reason.as_str()), (1001, "client stopped reading"));
    drop(client);
}

#[tokio::test]
async fn a_zero_window_client_loses_its_relay_too() {
    let mut backend = WsBackend::builder()
        .behaviour(Behaviour::Flood)
        .start()
        .await;
    let proxy = Proxy::start(backend.addr, &FAST_KEEPALIVE).await;
    // A 1 KiB receive buffer, never read after the 101: the window is zero at once.
    let client = RawClient::connect_with_recv_buffer(proxy.addr, WS_PATH, 1024).await;
    assert!(
        client.response_head.starts_with("HTTP/1.1 101"),
        "{}",
        client.response_head
    );
    let (code, reason) = backend.close_received().await.expect("a close code");
    assert_eq!((code, reason.as_str()), (1001, "client stopped reading"));
    eventually("the relay is no longer counted", async || {
        relays_open(&proxy).await == Some(0)
    })
    .await;
    drop(client);
}

#[tokio::test]
async fn a_client_that_only_receives_and_answers_pings_stays_past_several_intervals() {
    // The backend talks more often than the ping interval; the client never sends a message
    // but reads, and its WebSocket library answers the pings.
    let backend = WsBackend::builder()
        .behaviour(Behaviour::Tick(Duration::from_millis(100)))
        .start()
        .await;
    let proxy = Proxy::start(
        backend.addr,
        &["--ws-ping-interval", "0.3", "--ws-pong-timeout", "0.5"],
    )
    .await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    let started = Instant::now();
    let (mut pings, mut ticks) = (0, 0);
    while started.elapsed() < Duration::from_millis(2000) {
        match tokio::time::timeout(Duration::from_secs(2), client.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "tick" => ticks += 1,
            other => panic!("expected ticks and pings, got {other:?}"),
        }
    }
    // Messages *to* the client are no sign of life: it is asked, and its answers keep it.
    assert!(pings >= 2, "{pings} pings in {:?}", started.elapsed());
    assert!(ticks >= 5, "{ticks} ticks");
    assert_eq!(relays_open(&proxy).await, Some(1));
    client.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(message)) = client.next().await {
            if message == Message::text("still here") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(echoed, Ok(true));
}

#[tokio::test]
async fn a_client_that_reads_but_never_answers_a_ping_is_closed_while_messages_flow() {
    let mut backend = WsBackend::builder()
        .behaviour(Behaviour::Tick(Duration::from_millis(100)))
        .start()
        .await;
    let proxy = Proxy::start(
        backend.addr,
        &["--ws-ping-interval", "0.3", "--ws-pong-timeout", "0.5"],
    )
    .await;
    // Reads every frame, writes nothing: the ticks it receives must not keep it.
    let mut client = RawClient::connect(proxy.addr, WS_PATH).await;
    assert!(client.response_head.starts_with("HTTP/1.1 101"));
    let mut pinged = false;
    let close = tokio::time::timeout(DEADLINE, async {
        loop {
            let frame = client.next_frame().await.expect("a close before the end");
            match frame.opcode {
                RawFrame::PING => pinged = true,
                RawFrame::CLOSE => return frame,
                _ => {}
            }
        }
    })
    .await
    .expect("closed within the deadline");
    assert!(pinged, "closed without a ping first");
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(
        backend.close_received().await.map(|(code, _)| code),
        Some(1001)
    );
}

/// A raw backend: `interim` (1xx answers, each written on its own) before a valid 101, then
/// a WebSocket echo. Health probes get 200.
async fn backend_with_interim_answers(
    interim: &'static [&'static [u8]],
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    raw_backend(move |mut stream| async move {
        let head = read_head(&mut stream).await;
        if !head.to_ascii_lowercase().contains("upgrade: websocket") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-key: "))
            .unwrap_or("")
            .trim()
            .to_owned();
        for answer in interim {
            if stream.write_all(answer).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_backend_answering_100_continue_before_its_101_is_relayed() {
    let (addr, _task) = backend_with_interim_answers(&[
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </public/app.js>; rel=preload\r\n\r\n",
    ])
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    client.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        support::ws::next_data(&mut client).await,
        Message::text("hello")
    );
}

/// Sends a WebSocket upgrade with hyper's client, so that a refusal is read exactly as its
/// framing says (whatever its size or pace).
async fn upgrade_refused(proxy: &Proxy) -> support::Reply {
    let request = support::request("GET", proxy.addr, WS_PATH)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(support::full(""))
        .unwrap();
    support::send(proxy.addr, request).await.expect("an answer")
}

#[tokio::test]
async fn a_chunked_refusal_reaches_the_client_with_its_whole_body() {
    let chunks = [
        "{\"detail\":\"",
        "not authorised",
        &"-".repeat(20_000),
        "\"}",
    ];
    let expected: String = chunks.concat();
    let parts: Vec<Bytes> = chunks.iter().map(|c| Bytes::from(c.to_string())).collect();
    // hyper sends a streamed body without a length as chunked.
    let backend = Backend::start(handler(move |_req| {
        let parts = parts.clone();
        async move {
            http::Response::builder()
                .status(403)
                .header("content-type", "application/json")
                .body(support::slow_body(parts, Duration::from_millis(20)))
                .unwrap()
        }
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let reply = upgrade_refused(&proxy).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.text(), expected);
}

#[tokio::test]
async fn a_refusal_without_a_length_is_read_until_the_backend_closes() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let head = read_head(&mut stream).await;
        if !head.to_ascii_lowercase().contains("upgrade: websocket") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
        for piece in [
            &b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\r\n"[..],
            b"part one, ",
            b"part two",
        ] {
            if stream.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // Closing ends the body.
    })
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    let reply = upgrade_refused(&proxy).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.text(), "part one, part two");
}
