//! Production limits and abuse controls over real sockets: body size, connection cap, rate
//! limits, the Origin allow-list, cookie hardening, and the metrics on the admin port.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use support::ws::{WsBackend, close_received, connect, try_connect, ws_request};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn metrics(proxy: &Proxy) -> String {
    get(proxy.admin, "/monitor/metrics").await.unwrap().text()
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_port_and_never_on_the_public_one() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    proxy.wait_ready().await;
    assert_eq!(
        get(proxy.addr, "/project/settings").await.unwrap().status,
        StatusCode::OK
    );
    let _ = get(proxy.addr, "/chat").await.unwrap();
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"chatgate_requests_total{route="backend",method="GET",status="2xx"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"chatgate_requests_total{route="chat_redirect",method="GET",status="3xx"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("chatgate_backend_up 1"), "{text}");
    assert!(
        text.contains("chatgate_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("chatgate_client_connections"), "{text}");
    // No raw paths or addresses as labels.
    assert!(
        !text.contains("/project/settings") && !text.contains("127.0.0.1"),
        "{text}"
    );
    // The public port passes /monitor/metrics to the backend like any other path.
    let public = get(proxy.addr, "/monitor/metrics").await.unwrap();
    assert_eq!(public.header("x-echo-uri"), "/monitor/metrics");
    assert!(!public.text().contains("chatgate_requests_total"));
    // The admin port has the health routes too.
    assert_eq!(
        get(proxy.admin, "/monitor/health").await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        get(proxy.admin, "/monitor/live").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn websocket_messages_and_closes_are_counted() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, "/ws/socket.io/?EIO=4&transport=websocket").await;
    for i in 0..3 {
        client.send(Message::text(format!("m{i}"))).await.unwrap();
        let _ = support::ws::next_data(&mut client).await;
    }
    client.send(Message::text("close:4001:bye")).await.unwrap();
    assert_eq!(close_received(&mut client).await.map(|c| c.0), Some(4001));
    // Keep reading so the client's close answer goes out (a browser answers at once).
    let _ = tokio::time::timeout(Duration::from_secs(1), client.next()).await;
    eventually("the relay ends and is counted", async || {
        metrics(&proxy)
            .await
            .contains(r#"chatgate_websocket_closes_total{code="4xxx"} 1"#)
    })
    .await;
    let text = metrics(&proxy).await;
    assert!(
        text.contains(r#"chatgate_websocket_messages_total{direction="to_backend"} 4"#),
        "{text}"
    );
    assert!(
        text.contains(r#"chatgate_websocket_messages_total{direction="to_client"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"chatgate_requests_total{route="websocket",method="GET",status="1xx"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn http_rate_limit_answers_429_with_retry_after_and_exempts_assets() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--rate-limit-http", "2/minute"]).await;
    assert_eq!(get(proxy.addr, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(
        get(proxy.addr, "/project/settings").await.unwrap().status,
        StatusCode::OK
    );
    let limited = get(proxy.addr, "/").await.unwrap();
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.header("retry-after").parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    for exempt in [
        "/assets/index-abc.js",
        "/favicon",
        "/monitor/health",
        "/monitor/live",
    ] {
        assert_ne!(
            get(proxy.addr, exempt).await.unwrap().status,
            StatusCode::TOO_MANY_REQUESTS,
            "{exempt}"
        );
    }
    assert!(
        metrics(&proxy)
            .await
            .contains(r#"chatgate_rate_limited_total{class="http"} 1"#)
    );
}

#[tokio::test]
async fn rate_limits_key_on_the_client_behind_trusted_proxies() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(
        backend.addr,
        &[
            "--rate-limit-http",
            "1/minute",
            "--trusted-proxies",
            "127.0.0.1",
        ],
    )
    .await;
    let from = |client: &'static str| {
        request("GET", proxy.addr, "/")
            .header("x-forwarded-for", client)
            .body(full(""))
            .unwrap()
    };
    assert_eq!(
        send(proxy.addr, from("198.51.100.1")).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        send(proxy.addr, from("198.51.100.2")).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        send(proxy.addr, from("198.51.100.1")).await.unwrap().status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn engineio_handshakes_are_limited_but_session_polling_is_not() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--rate-limit-engineio", "1/minute"]).await;
    let handshake = "/ws/socket.io/?EIO=4&transport=polling&t=a";
    assert_eq!(
        get(proxy.addr, handshake).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        get(proxy.addr, "/socket.io/?EIO=4&transport=polling&t=b")
            .await
            .unwrap()
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    for _ in 0..5 {
        let polling = get(proxy.addr, "/ws/socket.io/?EIO=4&transport=polling&sid=s1")
            .await
            .unwrap();
        assert_eq!(polling.status, StatusCode::OK);
    }
    assert_eq!(
        get(proxy.addr, "/").await.unwrap().status,
        StatusCode::OK,
        "other classes unaffected"
    );
}

#[tokio::test]
async fn websocket_upgrades_are_rate_limited() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &["--rate-limit-websocket", "1/minute"]).await;
    let _first = connect(proxy.addr, "/ws/socket.io/?EIO=4&transport=websocket").await;
    match try_connect(ws_request(
        proxy.addr,
        "/ws/socket.io/?EIO=4&transport=websocket",
    ))
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(r.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(backend.contacted(), 1);
}

#[tokio::test]
async fn foreign_origins_cannot_open_websockets_or_engineio_sessions() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &["--allowed-origins", "https://chat.example"]).await;
    let path = "/ws/socket.io/?EIO=4&transport=websocket";
    let mut foreign = ws_request(proxy.addr, path);
    foreign
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match try_connect(foreign).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::FORBIDDEN)
        }
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(
        backend.contacted(),
        0,
        "a refused origin never reaches the backend"
    );
    let mut own = ws_request(proxy.addr, path);
    own.headers_mut()
        .insert("origin", "https://chat.example".parse().unwrap());
    assert!(try_connect(own).await.is_ok());
    let polling = request("GET", proxy.addr, "/ws/socket.io/?EIO=4&transport=polling")
        .header("origin", "https://evil.example")
        .body(full(""))
        .unwrap();
    assert_eq!(
        send(proxy.addr, polling).await.unwrap().status,
        StatusCode::FORBIDDEN
    );
    // Ordinary pages are not subject to the list.
    let page = request("GET", proxy.addr, "/")
        .header("origin", "https://evil.example")
        .body(full(""))
        .unwrap();
    assert_ne!(
        send(proxy.addr, page).await.unwrap().status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn cookies_are_hardened_only_when_enabled() {
    let backend = Backend::start(handler(|_req: Request<Incoming>| async {
        Response::builder()
            .header("set-cookie", "session=abc; Path=/")
            .header(
                "set-cookie",
                "theme=dark; Path=/; Secure; HttpOnly; SameSite=Strict",
            )
            .body(full("ok"))
            .unwrap()
    }))
    .await;
    let plain = Proxy::start(backend.addr, &[]).await;
    let r = get(plain.addr, "/").await.unwrap();
    assert_eq!(
        r.headers.get_all("set-cookie").iter().next().unwrap(),
        "session=abc; Path=/"
    );
    let hardened = Proxy::start(backend.addr, &["--harden-cookies", "on"]).await;
    let r = get(hardened.addr, "/").await.unwrap();
    let cookies: Vec<_> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cookies[0],
        "session=abc; Path=/; Secure; HttpOnly; SameSite=Lax"
    );
    assert_eq!(
        cookies[1],
        "theme=dark; Path=/; Secure; HttpOnly; SameSite=Strict"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--max-body-bytes", "1000"]).await;
    let declared = request("POST", proxy.addr, "/project/file")
        .body(full(vec![b'x'; 2000]))
        .unwrap();
    assert_eq!(
        send(proxy.addr, declared).await.unwrap().status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "refused before the backend"
    );
    let chunks = (0..20)
        .map(|_| bytes::Bytes::from(vec![b'y'; 100]))
        .collect();
    let streamed = request("POST", proxy.addr, "/project/file")
        .body(slow_body(chunks, Duration::from_millis(2)))
        .unwrap();
    let r = send(proxy.addr, streamed).await;
    // Past the limit mid-stream: 413 when the head is still ours to send, else a cut.
    assert!(
        r.as_ref()
            .map_or(true, |r| r.status == StatusCode::PAYLOAD_TOO_LARGE),
        "{r:?}"
    );
    let small = request("POST", proxy.addr, "/project/file")
        .body(full(vec![b'z'; 900]))
        .unwrap();
    assert_eq!(
        send(proxy.addr, small).await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_fast() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--max-connections", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let reply = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        reply.starts_with("HTTP/1.1 503") && reply.contains("too many connections"),
        "{reply}"
    );
    drop(held);
    eventually("a slot frees up", async || {
        get(proxy.addr, "/").await.map(|r| r.status) == Ok(StatusCode::OK)
    })
    .await;
    assert!(
        metrics(&proxy)
            .await
            .contains("chatgate_refused_connections_total 1")
    );
}

#[tokio::test]
async fn websocket_relays_hold_a_connection_slot_after_the_upgrade() {
    let backend = WsBackend::echo().await;
    let proxy = Proxy::start(backend.addr, &["--max-connections", "2"]).await;
    let mut relay = connect(proxy.addr, "/ws/socket.io/?EIO=4&transport=websocket").await;
    relay.send(Message::text("hi")).await.unwrap();
    let _ = support::ws::next_data(&mut relay).await;
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"GET /monitor/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    held.read_exact(&mut buf).await.unwrap();
    let reply = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        reply.starts_with("HTTP/1.1 503"),
        "the relay and one connection fill 2 slots: {reply}"
    );
    relay.close(None).await.unwrap();
    eventually("the relay's slot frees up", async || {
        get(proxy.addr, "/monitor/live").await.map(|r| r.status) == Ok(StatusCode::OK)
    })
    .await;
}

#[tokio::test]
async fn an_encoded_socketio_path_does_not_dodge_the_origin_check() {
    // uvicorn routes on the decoded path: /ws/socket%2Eio/ reaches Chainlit's Socket.IO.
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--allowed-origins", "https://chat.example"]).await;
    for path in [
        "/ws/socket%2Eio/?transport=polling",
        "/anything?EIO=4&transport=polling",
    ] {
        let req = request("GET", proxy.addr, path)
            .header("origin", "https://evil.example")
            .body(full(""))
            .unwrap();
        assert_eq!(
            send(proxy.addr, req).await.unwrap().status,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
