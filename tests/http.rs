//! The gateway core over real sockets: routes, streaming, headers, backend trouble, health,
//! auth stub modes and graceful shutdown.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn root_and_other_paths_reach_the_backend() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    for path in ["/", "/assets/index.js?v=1", "/project/settings"] {
        let r = get(proxy.addr, path).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("x-echo-uri"), path);
    }
}

#[tokio::test]
async fn response_pieces_arrive_before_the_backend_sends_the_last() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let backend = Backend::start(handler(move |_req| {
        let release = release_rx.clone();
        async move {
            let stream = futures_util::stream::unfold(0u8, move |n| {
                let mut release = release.clone();
                async move {
                    match n {
                        0 => Some((
                            Ok(hyper::body::Frame::data(Bytes::from_static(b"first;"))),
                            1,
                        )),
                        1 => {
                            // The last piece waits until the test has seen the first.
                            let _ = release.wait_for(|r| *r).await;
                            Some((Ok(hyper::body::Frame::data(Bytes::from_static(b"last"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
        }
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            request("GET", proxy.addr, "/stream")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first;");
    release_tx.send(true).unwrap();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "last");
}

#[tokio::test]
async fn request_body_streams_to_the_backend_and_uploads_arrive_whole() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let chunks: Vec<Bytes> = (0..64)
        .map(|i| Bytes::from(vec![i as u8; 16 * 1024]))
        .collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let req = request("POST", proxy.addr, "/project/file")
        .body(slow_body(chunks, Duration::from_millis(1)))
        .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), expected.len());
    assert!(r.body == expected);
    assert_eq!(r.header("x-echo-transfer-encoding"), "chunked");
}

#[tokio::test]
async fn chat_redirects_to_root_keeping_rest_and_query() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    for (path, location) in [
        ("/chat", "/"),
        ("/chat/", "/"),
        ("/chat?x=1", "/?x=1"),
        ("/chat/thread/42?tab=a", "/thread/42?tab=a"),
    ] {
        let r = get(proxy.addr, path).await.unwrap();
        assert_eq!(r.status, StatusCode::TEMPORARY_REDIRECT, "{path}");
        assert_eq!(r.header("location"), location, "{path}");
    }
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let permanent = Proxy::start(backend.addr, &["--chat-redirect-status", "308"]).await;
    assert_eq!(
        get(permanent.addr, "/chat").await.unwrap().status,
        StatusCode::PERMANENT_REDIRECT
    );
}

#[tokio::test]
async fn chat_redirect_never_leaves_the_site() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    // Raw request lines: some of these are not valid URIs for an HTTP client library.
    for target in [
        "/chat//evil.example",
        "/chat/\\evil.example",
        "/chat/%2F%2Fevil.example",
        "/chat/%09/evil.example",
        "/chat/%5C%5Cevil.example",
        "/chat/./%2F/evil.example",
        "/chat///evil.example/x?y=//z",
    ] {
        let reply = raw_exchange(
            proxy.addr,
            format!("GET {target} HTTP/1.1\r\nHost: chat.example\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let status_line = reply.lines().next().unwrap_or("");
        if status_line.contains(" 400 ") {
            continue; // refused outright: also safe
        }
        let location = reply
            .lines()
            .find_map(|l| l.strip_prefix("location: "))
            .unwrap_or_else(|| panic!("{target}: no location in {reply:?}"));
        let cleaned: String = location
            .chars()
            .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
            .map(|c| if c == '\\' { '/' } else { c })
            .collect();
        assert!(
            cleaned.starts_with('/') && !cleaned.starts_with("//"),
            "{target} -> {location}"
        );
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let backend = Backend::start(handler(|req: Request<Incoming>| async move {
        let seen: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
        Response::builder()
            .header("connection", "x-backend-hop")
            .header("x-backend-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-seen", seen.join(","))
            .body(full("ok"))
            .unwrap()
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let req = request("GET", proxy.addr, "/")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "secret")
        .header("keep-alive", "300")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eA==")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "kept")
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    let seen = r.header("x-seen");
    for hop in [
        "x-client-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !seen.split(',').any(|h| h == hop),
            "{hop} reached the backend: {seen}"
        );
    }
    assert!(seen.split(',').any(|h| h == "x-end-to-end"));
    assert!(r.headers.get("x-backend-hop").is_none());
    assert!(r.headers.get("keep-alive").is_none());
}

#[tokio::test]
async fn forwarded_headers_from_untrusted_peers_are_overwritten() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let req = request("GET", proxy.addr, "/")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    assert_eq!(r.header("x-echo-x-forwarded-for"), "127.0.0.1");
    assert_eq!(r.header("x-echo-x-forwarded-proto"), "http");
    assert_eq!(r.header("x-echo-x-forwarded-host"), proxy.addr.to_string());
}

#[tokio::test]
async fn forwarded_headers_from_trusted_proxies_are_appended_and_kept() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--trusted-proxies", "127.0.0.0/8"]).await;
    let req = request("GET", proxy.addr, "/")
        .header("x-forwarded-for", "203.0.113.5")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "chat.example")
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    assert_eq!(r.header("x-echo-x-forwarded-for"), "203.0.113.5, 127.0.0.1");
    assert_eq!(r.header("x-echo-x-forwarded-proto"), "https");
    assert_eq!(r.header("x-echo-x-forwarded-host"), "chat.example");
}

#[tokio::test]
async fn host_is_kept_unless_backend_host_is_set() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let req = Request::get("/")
        .header("host", "chat.example")
        .body(full(""))
        .unwrap();
    assert_eq!(
        send(proxy.addr, req).await.unwrap().header("x-echo-host"),
        "chat.example"
    );
    let rewriting = Proxy::start(backend.addr, &["--backend-host", "app.internal:8080"]).await;
    let req = request("GET", rewriting.addr, "/").body(full("")).unwrap();
    assert_eq!(
        send(rewriting.addr, req)
            .await
            .unwrap()
            .header("x-echo-host"),
        "app.internal:8080"
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_generated_otherwise() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let req = request("GET", proxy.addr, "/")
        .header("x-request-id", "abc-123")
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    assert_eq!(r.header("x-request-id"), "abc-123");
    assert_eq!(r.header("x-echo-x-request-id"), "abc-123");
    let long = "x".repeat(500);
    let req = request("GET", proxy.addr, "/")
        .header("x-request-id", long.as_str())
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    assert_eq!(r.header("x-request-id").len(), 16);
    assert_eq!(r.header("x-request-id"), r.header("x-echo-x-request-id"));
}

#[tokio::test]
async fn redirects_from_the_backend_are_passed_not_followed() {
    let backend = Backend::start(handler(|_req| async {
        Response::builder()
            .status(302)
            .header("location", "/elsewhere")
            .body(full(""))
            .unwrap()
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let r = get(proxy.addr, "/login").await.unwrap();
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.header("location"), "/elsewhere");
}

#[tokio::test]
async fn compressed_bodies_pass_untouched_and_assets_get_a_content_type() {
    let gz: &'static [u8] = &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4, 5];
    let backend = Backend::start(handler(move |req: Request<Incoming>| async move {
        let mut r = Response::builder().status(200);
        if req.uri().path() == "/assets/app.js" {
            r = r.header("content-encoding", "gzip");
        }
        r.body(full(gz)).unwrap()
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let r = get(proxy.addr, "/assets/app.js").await.unwrap();
    assert_eq!(r.header("content-encoding"), "gzip");
    assert_eq!(&r.body[..], gz);
    assert_eq!(r.header("content-type"), "text/javascript");
    assert_eq!(
        get(proxy.addr, "/assets/site.css")
            .await
            .unwrap()
            .header("content-type"),
        "text/css"
    );
    assert_eq!(
        get(proxy.addr, "/project/settings")
            .await
            .unwrap()
            .header("content-type"),
        ""
    );
}

#[tokio::test]
async fn refused_backend_gets_503_with_retry_after_html_for_browsers_json_otherwise() {
    let proxy = Proxy::start(dead_addr().await, &[]).await;
    let browser = request("GET", proxy.addr, "/")
        .header("accept", "text/html,application/xhtml+xml")
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, browser).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), "5");
    assert!(r.header("content-type").starts_with("text/html"));
    assert!(r.text().contains("http-equiv=\"refresh\""));
    let api = get(proxy.addr, "/project/settings").await.unwrap();
    assert_eq!(api.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.header("content-type"), "application/json");
    assert!(api.json()["error"].is_string());
}

#[tokio::test]
async fn backend_that_resets_before_answering_is_a_502() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        // Close without a byte of response (SO_LINGER 0 would be a RST; a FIN is as bad).
        drop(stream);
    })
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    let r = get(proxy.addr, "/").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn backend_without_response_headers_in_time_is_a_504() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let proxy = Proxy::start(addr, &["--response-timeout", "0.5"]).await;
    let started = std::time::Instant::now();
    let r = get(proxy.addr, "/").await.unwrap();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn backend_killed_mid_response_cuts_the_client_response() {
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stream);
    })
    .await;
    let proxy = Proxy::start(addr, &[]).await;
    // The client sees the 200 head, then a body that ends short: an error, never a
    // silently truncated success.
    let result = get(proxy.addr, "/").await;
    assert!(
        result.is_err(),
        "a cut body must not look complete: {result:?}"
    );
    // And the proxy keeps serving.
    assert_eq!(
        get(proxy.addr, "/monitor/live").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn backend_down_then_up_recovers_without_restart() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = Proxy::start(addr, &[]).await;
    assert_eq!(
        get(proxy.addr, "/").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _backend = Backend::serve(listener, handler(|_req| async { text(200, "back") }), None);
    let r = get(proxy.addr, "/").await.unwrap();
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "back"));
    proxy.wait_ready().await;
}

#[tokio::test]
async fn pooled_connections_closed_by_the_backend_never_surface_as_errors() {
    // The backend closes idle keep-alive connections after 0.3 s (uvicorn does after 5 s);
    // the proxy's pool keeps them 4 s. Requests spaced around that must all succeed.
    let backend = Backend::start_closing_idle(
        handler(|_req| async { text(200, "ok") }),
        Duration::from_millis(300),
    )
    .await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let client = pooled_client();
    for gap_ms in [0, 350, 290, 310, 400, 0, 305] {
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        let req = Request::get(proxy.url("/")).body(full("")).unwrap();
        let r = client.request(req).await.expect("request");
        assert_eq!(r.status(), StatusCode::OK, "after {gap_ms} ms idle");
    }
}

#[tokio::test]
async fn health_reports_backend_state_and_live_ignores_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = Proxy::start(addr, &[]).await;
    let r = get(proxy.addr, "/monitor/health").await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let doc = r.json();
    assert_eq!(doc["status"], "unavailable");
    assert_eq!(doc["backend"]["reachable"], false);
    assert_eq!(doc["backend"]["url"], format!("http://{addr}"));
    assert_eq!(
        get(proxy.addr, "/monitor/live").await.unwrap().status,
        StatusCode::OK
    );

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let backend = Backend::serve(
        listener,
        handler(|req: Request<Incoming>| async move {
            if req.uri().path() == "/health" {
                text(200, "{\"status\":\"ok\"}")
            } else {
                text(200, "x")
            }
        }),
        None,
    );
    proxy.wait_ready().await;
    let doc = get(proxy.addr, "/monitor/health").await.unwrap().json();
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["backend"]["reachable"], true);
    assert!(doc["backend"]["latency_ms"].as_f64().is_some());
    assert!(doc["backend"]["last_checked"].is_string());
    assert!(doc["uptime_seconds"].is_u64());
    assert!(doc["version"].is_string());
    assert!(doc["connections"]["clients"].as_u64().unwrap() >= 1);

    // Down again: counted down only after 3 failed probes (interval 0.2 s here).
    backend.stop();
    drop(backend);
    eventually("health turns 503", async || {
        get(proxy.addr, "/monitor/health").await.map(|r| r.status)
            == Ok(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert_eq!(
        get(proxy.addr, "/monitor/live").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_probe_falls_back_to_tcp_for_backends_without_a_health_route() {
    // An old Chainlit (no /health) still answers HTTP: 404 is "reachable".
    let backend = Backend::start(handler(|_req| async { text(404, "not found") })).await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    proxy.wait_ready().await;
    // A backend that speaks no HTTP at all but accepts connections is reachable by TCP.
    let (addr, _task) = raw_backend(|stream| async move {
        drop(stream);
    })
    .await;
    let tcp_only = Proxy::start(addr, &[]).await;
    tcp_only.wait_ready().await;
}

#[tokio::test]
async fn auth_config_stub_on_by_default() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let r = get(proxy.addr, "/auth/config").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "application/json");
    let doc = r.json();
    assert_eq!(doc["requireLogin"], false);
    assert_eq!(doc["default_theme"], "dark");
    assert!(doc["oauthProviders"].as_array().unwrap().is_empty());
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn auth_config_stub_file_replaces_the_body() {
    let backend = echo_backend().await;
    let path = std::env::temp_dir().join(format!("chatgate-stub-{}.json", std::process::id()));
    std::fs::write(
        &path,
        "{\"requireLogin\":false,\"default_theme\":\"light\"}",
    )
    .unwrap();
    let proxy = Proxy::start(backend.addr, &["--auth-stub-file", path.to_str().unwrap()]).await;
    let doc = get(proxy.addr, "/auth/config").await.unwrap().json();
    assert_eq!(doc["default_theme"], "light");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn auth_config_auto_proxies_and_stubs_only_on_backend_failure() {
    let backend = Backend::start(handler(|_req| async {
        text(200, "{\"requireLogin\":true}")
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &["--auth-stub", "auto"]).await;
    assert_eq!(
        get(proxy.addr, "/auth/config").await.unwrap().json()["requireLogin"],
        true
    );
    let failing = Backend::start(handler(|_req| async { text(500, "boom") })).await;
    let proxy = Proxy::start(failing.addr, &["--auth-stub", "auto"]).await;
    assert_eq!(
        get(proxy.addr, "/auth/config").await.unwrap().json()["requireLogin"],
        false
    );
    let proxy = Proxy::start(dead_addr().await, &["--auth-stub", "auto"]).await;
    let r = get(proxy.addr, "/auth/config").await.unwrap();
    assert_eq!(
        (r.status, r.json()["default_theme"].clone()),
        (StatusCode::OK, "dark".into())
    );
}

#[tokio::test]
async fn auth_config_off_always_proxies() {
    let failing = Backend::start(handler(|_req| async { text(500, "boom") })).await;
    let proxy = Proxy::start(failing.addr, &["--auth-stub", "off"]).await;
    let r = get(proxy.addr, "/auth/config").await.unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "boom")
    );
}

#[tokio::test]
async fn socketio_polling_is_mapped_onto_the_backend_mount() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let r = get(proxy.addr, "/socket.io/?EIO=4&transport=polling&t=abc")
        .await
        .unwrap();
    assert_eq!(
        r.header("x-echo-uri"),
        "/ws/socket.io/?EIO=4&transport=polling&t=abc"
    );
    let body = "40{\"clientType\":\"webapp\"}";
    let req = request(
        "POST",
        proxy.addr,
        "/ws/socket.io/?EIO=4&transport=polling&sid=xyz",
    )
    .header("content-type", "text/plain;charset=UTF-8")
    .body(full(body))
    .unwrap();
    let r = send(proxy.addr, req).await.unwrap();
    assert_eq!(r.text(), body);
    assert_eq!(
        r.header("x-echo-uri"),
        "/ws/socket.io/?EIO=4&transport=polling&sid=xyz"
    );
    let custom = Proxy::start(backend.addr, &["--socketio-path", "/sio/"]).await;
    let r = get(custom.addr, "/socket.io/?EIO=4").await.unwrap();
    assert_eq!(r.header("x-echo-uri"), "/sio/?EIO=4");
}

#[tokio::test]
async fn long_poll_held_by_the_backend_is_not_cut() {
    let backend = Backend::start(handler(|_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        text(200, "6")
    }))
    .await;
    // Body idle 1 s would cut a *body*; a slow head is governed by the response timeout.
    let proxy = Proxy::start(backend.addr, &["--body-idle-timeout", "1"]).await;
    let r = get(proxy.addr, "/ws/socket.io/?EIO=4&transport=polling&sid=s")
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "6"));
}

#[tokio::test]
async fn stalled_body_is_cut_after_the_idle_timeout() {
    let backend = Backend::start(handler(|_req| async {
        Response::new(slow_body(
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            Duration::from_secs(3),
        ))
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &["--body-idle-timeout", "0.5"]).await;
    let started = std::time::Instant::now();
    assert!(get(proxy.addr, "/").await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn backend_wait_holds_requests_while_the_backend_starts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let proxy = Proxy::start(addr, &["--backend-wait", "10"]).await;
    let pending = tokio::spawn(async move { get(proxy.addr, "/").await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _backend = Backend::serve(listener, handler(|_req| async { text(200, "warm") }), None);
    let r = pending.await.unwrap().unwrap();
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "warm"));
}

#[tokio::test]
async fn connect_and_foreign_absolute_form_are_refused() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let reply = raw_exchange(
        proxy.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    let reply = raw_exchange(
        proxy.addr,
        b"GET http://evil.example/ HTTP/1.1\r\nHost: chat.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// RFC 9112 §6.1: with both Content-Length and Transfer-Encoding, chunked wins and "the
/// server MUST close the connection after responding". hyper does exactly that, and the
/// backend gets a re-framed request, so proxy and backend can never disagree on where a
/// request ends.
#[tokio::test]
async fn conflicting_framing_never_smuggles_a_second_request() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    // Content-Length says the body is the whole rest; chunked says it ends at "0".
    let smuggle = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let reply = raw_exchange(proxy.addr, smuggle).await;
    assert!(
        !reply.contains("x-echo-uri: /smuggled"),
        "smuggled request reached the backend: {reply}"
    );
    // Duplicate, differing Content-Length: refused.
    let reply = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}

#[tokio::test]
async fn slow_headers_are_cut_by_the_header_read_timeout() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--header-read-timeout", "0.5"]).await;
    let (text, open_for) =
        send_and_wait_for_close(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(open_for < Duration::from_secs(4), "connection held open");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--max-header-bytes", "4096"]).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    let reply = raw_exchange(proxy.addr, big.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_turns_readiness_503() {
    let backend = Backend::start(handler(|req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        text(200, "done")
    }))
    .await;
    let mut proxy = Proxy::start(backend.addr, &["--shutdown-delay", "0.4"]).await;
    proxy.wait_ready().await;
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.begin_shutdown();
    // During the shutdown delay new connections are still accepted, and readiness is 503.
    eventually("readiness turns 503", async || {
        get(addr, "/monitor/health").await.map(|r| r.status) == Ok(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert_eq!(
        get(addr, "/monitor/health").await.unwrap().json()["status"],
        "draining"
    );
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "done"));
    tokio::time::timeout(Duration::from_secs(10), proxy.handle())
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

// ---- the binary ----

fn chatgate() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
}

#[test]
fn bad_settings_stop_startup_with_one_line_and_exit_2() {
    for (args, env, needle) in [
        (vec!["--backend", "not a url"], vec![], "CHATGATE_BACKEND"),
        (
            vec![],
            vec![("CHATGATE_LISTEN", "nowhere")],
            "CHATGATE_LISTEN",
        ),
        (
            vec!["--auth-stub-file", "/nonexistent/stub.json"],
            vec![],
            "CHATGATE_AUTH_STUB_FILE",
        ),
    ] {
        let out = chatgate().args(&args).envs(env).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = chatgate().args(["--listen", &addr]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CHATGATE_LISTEN") && err.contains(&addr),
        "{err}"
    );
}

#[test]
fn check_config_prints_settings_with_secrets_redacted() {
    let out = chatgate()
        .args([
            "check-config",
            "--backend",
            "http://user:hunter2@127.0.0.1:9",
        ])
        .env("CHATGATE_TRUSTED_PROXIES", "10.0.0.0/8")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backend = http://127.0.0.1:9"), "{text}");
    assert!(text.contains("trusted_proxies = 10.0.0.0/8"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[test]
fn help_lists_every_setting_with_its_variable() {
    let out = chatgate().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CHATGATE_LISTEN",
        "CHATGATE_BACKEND",
        "CHATGATE_TRUSTED_PROXIES",
        "CHATGATE_SHUTDOWN_GRACE",
    ] {
        assert!(text.contains(var), "{var} missing from --help");
    }
}

#[tokio::test]
async fn healthcheck_subcommand_exits_0_when_ready_and_1_otherwise() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    proxy.wait_ready().await;
    let listen = proxy.addr.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        chatgate()
            .args(["healthcheck", "--listen", &listen])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(ok.status.code(), Some(0));
    let nobody = dead_addr().await.to_string();
    let down = tokio::task::spawn_blocking(move || {
        chatgate()
            .args(["healthcheck", "--listen", &nobody])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(down.status.code(), Some(1));
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let backend = echo_backend().await;
    let proxy = Proxy::start(backend.addr, &["--header-read-timeout", "0.5"]).await;
    let (text, open_for) =
        send_and_wait_for_close(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        open_for < Duration::from_secs(4),
        "idle connection held open"
    );
}

#[tokio::test]
async fn a_request_slower_than_the_header_timeout_is_answered_then_the_idle_limit_applies() {
    // The head clock stops while a request is outstanding (the backend takes three header
    // timeouts here), and starts again from the answer.
    let backend = Backend::start(handler(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        text(200, "slow but sure")
    }))
    .await;
    let proxy = Proxy::start(backend.addr, &["--header-read-timeout", "0.5"]).await;
    let (text, open_for) =
        send_and_wait_for_close(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("slow but sure"),
        "{text}"
    );
    // Closed once idle: between one and two timeouts after the answer.
    assert!(
        open_for >= Duration::from_millis(1900) && open_for < Duration::from_millis(4500),
        "closed after {open_for:?}"
    );
}

/// Writes `bytes`, then reads until the proxy closes the connection (at most 5 s): what came
/// back and how long the connection stayed open.
async fn send_and_wait_for_close(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    (
        String::from_utf8_lossy(&buf).into_owned(),
        started.elapsed(),
    )
}

/// Peak resident memory of a process, from /proc (Linux).
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn large_bodies_pass_both_ways_in_bounded_memory() {
    const SIZE: u64 = 256 << 20;
    const CHUNK: usize = 256 << 10;
    let backend = Backend::start(handler(|req: Request<Incoming>| async move {
        if req.method() == http::Method::POST {
            // Count the upload as it streams; never hold it.
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                total += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            return text_owned(200, total.to_string());
        }
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let stream = futures_util::stream::iter(
            (0..SIZE / CHUNK as u64)
                .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
        );
        Response::builder()
            .header("content-length", SIZE.to_string())
            .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
            .unwrap()
    }))
    .await;
    let port = dead_addr().await.port();
    let mut child = chatgate()
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--backend", &format!("http://{}", backend.addr)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("chatgate listens", async || {
        get(addr, "/monitor/live").await.is_ok()
    })
    .await;
    let baseline = vm_hwm_kib(child.id());

    // Download: count bytes as they arrive.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(request("GET", addr, "/big").body(full("")).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut downloaded = 0u64;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), body.frame())
        .await
        .unwrap()
    {
        downloaded += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(downloaded, SIZE);

    // Upload: a generated stream, never held whole by anyone.
    let chunk = Bytes::from(vec![b'y'; CHUNK]);
    let stream = futures_util::stream::iter(
        (0..SIZE / CHUNK as u64)
            .map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let upload = request("POST", addr, "/upload")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(120), send(addr, upload))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.text(), SIZE.to_string());

    let peak = vm_hwm_kib(child.id());
    eprintln!("chatgate peak RSS {peak} KiB, baseline {baseline} KiB");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // 512 MiB moved; the proxy's peak memory grew by far less than one copy of it.
    assert!(
        peak.saturating_sub(baseline) < 64 * 1024,
        "peak grew {} KiB (baseline {baseline} KiB)",
        peak - baseline
    );
}

fn text_owned(status: u16, body: String) -> Response<TestBody> {
    Response::builder().status(status).body(full(body)).unwrap()
}

#[tokio::test]
async fn a_backend_that_accepts_but_never_answers_is_not_reachable() {
    // A wedged event loop still completes TCP handshakes from the listen backlog.
    let (addr, _task) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let proxy = Proxy::start(addr, &["--health-timeout", "0.2"]).await;
    eventually("the probe has failed three times", async || {
        let doc = get(proxy.addr, "/monitor/health").await.unwrap().json();
        doc["backend"]["consecutive_failures"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let r = get(proxy.addr, "/monitor/health").await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.json()["backend"]["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer")
    );
}
