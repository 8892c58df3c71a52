//! Backend faults over real sockets: refusals and resets (RST as well as FIN), stalls after an
//! upload, bytes that are not HTTP, broken chunked framing, WebSocket backends that break the
//! protocol or vanish, and a backend restarted under load. What `tests/http.rs` and
//! `tests/websocket.rs` already pin (a FIN before answering, a stall without a body, a
//! content-length body cut short, a relay whose backend dies) is not repeated here.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use support::ws::{close_received, connect};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const WS_PATH: &str = "/ws/socket.io/?EIO=4&transport=websocket";

/// A raw backend that answers each request with `bytes`, then holds the connection for a
/// while (so the fault is in the bytes, not in a close) unless `then_close`.
async fn answering_backend(bytes: &'static [u8], then_close: bool) -> SocketAddr {
    let (addr, task) = raw_backend(move |mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream.write_all(bytes).await;
        if !then_close {
            let mut sink = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
    })
    .await;
    // The accept loop lives as long as the test's runtime.
    drop(task);
    addr
}

/// A POST with a small body, so that nothing is retried.
fn post(addr: SocketAddr, path: &str) -> http::Request<TestBody> {
    request("POST", addr, path).body(full("payload")).unwrap()
}

#[tokio::test]
async fn refused_backend_is_503_for_uploads_and_socketio_polling_too() {
    let proxy = Proxy::start(dead_addr().await, &[]).await;
    let upload = send(proxy.addr, post(proxy.addr, "/project/file"))
        .await
        .unwrap();
    assert_eq!(upload.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upload.header("retry-after"), "5");
    let polling = get(proxy.addr, "/socket.io/?EIO=4&transport=polling")
        .await
        .unwrap();
    assert_eq!(polling.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(polling.header("content-type"), "application/json");
}

#[tokio::test]
async fn backend_reset_with_rst_before_answering_is_a_502_for_get_and_post() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        // SO_LINGER 0: the close is a TCP RST, as from a crashed worker.
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    assert_eq!(
        get(proxy.addr, "/").await.unwrap().status,
        StatusCode::BAD_GATEWAY
    );
    let r = send(proxy.addr, post(proxy.addr, "/upload")).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        get(proxy.addr, "/monitor/live").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn backend_reset_with_rst_mid_chunked_response_is_an_error_for_the_client() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    let started = Instant::now();
    let result = get(proxy.addr, "/").await;
    assert!(
        result.is_err(),
        "a reset body must not look complete: {result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        get(proxy.addr, "/monitor/live").await.unwrap().status,
        StatusCode::OK
    );
}

/// The response timeout runs from the end of the upload: a slow upload that keeps moving is
/// not cut, and a backend silent after it is a 504 one timeout later.
#[tokio::test]
async fn backend_stalling_after_a_slow_upload_is_504_counted_from_the_end_of_the_body() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        // Read the chunked body to its last chunk, then answer nothing.
        let mut body = Vec::new();
        let mut buf = [0u8; 256];
        while !body.ends_with(b"0\r\n\r\n") {
            match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let proxy = Proxy::start(addr, &["--response-timeout", "0.5"]).await;
    // Four pieces, 300 ms apart: 1.2 s of upload, longer than the response timeout.
    let pieces = (0..4).map(|i| Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("p{i}")))));
    let body = StreamBody::new(futures_util::StreamExt::then(
        futures_util::stream::iter(pieces),
        |piece| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            piece
        },
    ));
    let req = request("POST", proxy.addr, "/upload")
        .body(BodyExt::boxed(body))
        .unwrap();
    let started = Instant::now();
    let r = send(proxy.addr, req).await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "504 after {took:?}: want the 1.2 s upload plus the 0.5 s timeout"
    );
}

#[tokio::test]
async fn backend_answering_bytes_that_are_not_http_is_a_502() {
    let cases: &[(&str, &[u8])] = &[
        ("an SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n"),
        (
            "TLS bytes",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ),
        ("a status that is not a number", b"HTTP/1.1 abc OK\r\n\r\n"),
        (
            "a header line without a colon",
            b"HTTP/1.1 200 OK\r\nBad Header\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "differing Content-Lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        ),
        ("a bare LF soup", b"\n\n\n\x00\x00\x00garbage\n\n"),
    ];
    for (what, bytes) in cases {
        let addr = answering_backend(bytes, false).await;
        let proxy = Proxy::start(addr, &["--response-timeout", "3"]).await;
        let started = Instant::now();
        let r = get(proxy.addr, "/").await;
        let r = r.unwrap_or_else(|e| panic!("{what}: the client got no answer: {e}"));
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{what}: {}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: answered only after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn malformed_chunked_response_is_an_error_for_the_client_never_a_short_success() {
    let cases: &[(&str, &[u8], bool)] = &[
        (
            "a chunk size that is not hex",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nmore\r\n0\r\n\r\n",
            false,
        ),
        (
            "a chunk size that overflows",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nFFFFFFFFFFFFFFFFFFFF\r\nx\r\n",
            false,
        ),
        (
            "more data than the chunk size",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
            false,
        ),
        (
            "a stream ending before the last chunk",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            true,
        ),
    ];
    for (what, bytes, then_close) in cases {
        let addr = answering_backend(bytes, *then_close).await;
        let proxy = Proxy::start(addr, &[]).await;
        let started = Instant::now();
        let result = get(proxy.addr, "/").await;
        assert!(
            result.is_err(),
            "{what}: the client must see an error, got {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        assert_eq!(
            get(proxy.addr, "/monitor/live").await.unwrap().status,
            StatusCode::OK,
            "{what}"
        );
    }
}

/// A WebSocket backend written by hand: answers health probes, accepts the upgrade, then
/// runs `after` on the socket. Reports the close code it receives from chatgate, if any.
async fn raw_ws_backend(
    after: &'static [u8],
    close_tcp: bool,
) -> (SocketAddr, mpsc::UnboundedReceiver<Option<u16>>) {
    let (codes_tx, codes) = mpsc::unbounded_channel();
    let (addr, task) = raw_backend(move |mut stream| {
        let codes_tx = codes_tx.clone();
        async move {
            let head = read_head(&mut stream).await;
            let key = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            });
            let Some(key) = key else {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return;
            };
            let accept = derive_accept_key(key.as_bytes());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                 sec-websocket-accept: {accept}\r\n\r\n"
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.write_all(after).await;
            if close_tcp {
                return;
            }
            let _ = codes_tx.send(read_close_code(&mut stream).await);
        }
    })
    .await;
    drop(task);
    (addr, codes)
}

/// Reads (masked, client-role) frames until a Close and returns its code; `None` when the
/// connection ends first. Bounded by `DEADLINE`.
async fn read_close_code(stream: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.ok()?;
            let len = match head[1] & 0x7f {
                126 => u64::from(stream.read_u16().await.ok()?),
                127 => stream.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if head[1] & 0x80 != 0 {
                stream.read_exact(&mut mask).await.ok()?;
            }
            let mut payload = vec![0u8; usize::try_from(len).ok()?];
            stream.read_exact(&mut payload).await.ok()?;
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            if head[0] & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    };
    tokio::time::timeout(DEADLINE, read).await.ok().flatten()
}

#[tokio::test]
async fn backend_sending_a_masked_frame_closes_the_client_with_1011_and_the_backend_with_1002() {
    // RFC 6455 §5.1: "A client MUST close a connection if it detects a masked frame."
    let (addr, mut codes) = raw_ws_backend(b"\x81\x82\x01\x02\x03\x04ik", false).await;
    let proxy = Proxy::start(addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    let (code, _) = close_received(&mut client).await.expect("a close code");
    assert_eq!(code, 1011);
    let backend_code = tokio::time::timeout(DEADLINE, codes.recv()).await.unwrap();
    assert_eq!(backend_code, Some(Some(1002)));
}

#[tokio::test]
async fn backend_sending_invalid_utf8_closes_the_client_with_1011_and_the_backend_with_1007() {
    let (addr, mut codes) = raw_ws_backend(b"\x81\x03ok\xff", false).await;
    let proxy = Proxy::start(addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    let (code, _) = close_received(&mut client).await.expect("a close code");
    assert_eq!(code, 1011);
    let backend_code = tokio::time::timeout(DEADLINE, codes.recv()).await.unwrap();
    assert_eq!(backend_code, Some(Some(1007)));
}

#[tokio::test]
async fn backend_closing_tcp_right_after_the_handshake_closes_the_client_with_1011() {
    let (addr, _codes) = raw_ws_backend(b"", true).await;
    let proxy = Proxy::start(addr, &[]).await;
    let mut client = connect(proxy.addr, WS_PATH).await;
    let (code, _) = close_received(&mut client).await.expect("a close code");
    assert_eq!(code, 1011);
}

/// A backend whose death takes its open connections with it, as a process's does (the
/// fixture `Backend::stop` only stops accepting).
fn killable_backend(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    // A little work, so that some requests are in flight at the kill.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    })
}

#[tokio::test]
async fn backend_restarted_under_load_costs_only_502_or_503_and_then_recovers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = killable_backend(listener);
    let mut proxy =
        Proxy::start(addr, &["--connect-timeout", "1", "--response-timeout", "2"]).await;
    proxy.wait_ready().await;

    let load_for = Duration::from_secs(2);
    let started = Instant::now();
    let clients: Vec<JoinHandle<Vec<Result<u16, String>>>> = (0..8)
        .map(|_| {
            let proxy_addr = proxy.addr;
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while started.elapsed() < load_for {
                    let outcome =
                        match tokio::time::timeout(Duration::from_secs(3), get(proxy_addr, "/"))
                            .await
                        {
                            Ok(Ok(reply)) => Ok(reply.status.as_u16()),
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err("hung for 3 s".to_owned()),
                        };
                    outcomes.push(outcome);
                }
                outcomes
            })
        })
        .collect();

    // Kill at 0.5 s, back on the same port at 1.0 s.
    tokio::time::sleep_until((started + Duration::from_millis(500)).into()).await;
    backend.abort();
    let _ = backend.await;
    tokio::time::sleep_until((started + Duration::from_millis(1000)).into()).await;
    let listener = TcpListener::bind(addr)
        .await
        .expect("rebind the backend port");
    let _backend = killable_backend(listener);

    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for client in clients {
        let outcomes = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("a load client finished")
            .expect("a load client did not panic");
        for outcome in outcomes {
            let key = match outcome {
                Ok(status) => status.to_string(),
                Err(e) => format!("error: {e}"),
            };
            *counts.entry(key).or_default() += 1;
        }
    }
    let unexpected: Vec<_> = counts
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "200" | "502" | "503"))
        .collect();
    assert!(unexpected.is_empty(), "unexpected outcomes: {counts:?}");
    assert!(
        counts.get("503").copied().unwrap_or(0) > 0,
        "the outage was never seen: {counts:?}"
    );
    assert!(
        counts.get("200").copied().unwrap_or(0) > 16,
        "too little load: {counts:?}"
    );
    assert!(!proxy.handle().is_finished(), "the proxy stopped");

    // After the restart, everything succeeds again.
    let after: Vec<_> = (0..16)
        .map(|_| {
            let proxy_addr = proxy.addr;
            tokio::spawn(async move { get(proxy_addr, "/").await })
        })
        .collect();
    for request in after {
        let reply = request.await.unwrap().expect("an answer after the restart");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
}
