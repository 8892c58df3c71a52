//! Several workers behind one chatgate: each visitor kept on its worker (affinity cookie,
//! Engine.IO sid), a dying worker costing only its own chats, readiness following the
//! workers (and one backend: passive signals, quick probes); then the workers chatgate
//! starts itself: started, restarted, stopped with it, never orphaned.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use support::ws::{try_connect, ws_request};
use support::{
    DEADLINE, Proxy, Reply, TestBody, config_for_workers, dead_addr, eventually, full, get,
    request, send, slow_body,
};

const COOKIE: &str = "chatgate_worker";

// ------------------------------------------------------------------ the worker fixture

/// A worker: plain HTTP, Engine.IO polling with its own sessions, a WebSocket echo, every
/// answer naming the worker; killed like a process that dies (listener and every connection
/// gone at once) and restartable on the same port (with no sessions: a new process).
struct WorkerBackend {
    name: &'static str,
    addr: SocketAddr,
    /// Requests other than health probes.
    served: Arc<AtomicUsize>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl WorkerBackend {
    async fn start(name: &'static str) -> WorkerBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        WorkerBackend::serve(name, listener)
    }

    fn serve(name: &'static str, listener: TcpListener) -> WorkerBackend {
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let sessions: Arc<Mutex<HashSet<String>>> = Arc::default();
        let accept = {
            let (served, connections) = (Arc::clone(&served), Arc::clone(&connections));
            tokio::spawn(async move {
                let next_sid = Arc::new(AtomicUsize::new(0));
                while let Ok((stream, _)) = listener.accept().await {
                    let (served, sessions, next_sid) = (
                        Arc::clone(&served),
                        Arc::clone(&sessions),
                        Arc::clone(&next_sid),
                    );
                    let upgrades = Arc::clone(&connections);
                    let connection = tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (served, sessions, next_sid, upgrades) = (
                                Arc::clone(&served),
                                Arc::clone(&sessions),
                                Arc::clone(&next_sid),
                                Arc::clone(&upgrades),
                            );
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    answer(name, req, &served, &sessions, &next_sid, &upgrades)
                                        .await,
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    });
                    let mut open = connections.lock().unwrap();
                    open.retain(|c| !c.is_finished());
                    open.push(connection);
                }
            })
        };
        WorkerBackend {
            name,
            addr,
            served,
            accept: Some(accept),
            connections,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Dies: the port refuses from now on, open connections are dropped mid-way.
    fn kill(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Starts again on the same port, as a new process: no sessions.
    async fn restart(&mut self) {
        self.kill();
        let listener = bind_again(self.addr).await;
        *self = WorkerBackend::serve(self.name, listener);
    }
}

impl Drop for WorkerBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binds `addr` again once the aborted listener has let go of it.
async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

async fn answer(
    name: &'static str,
    req: Request<Incoming>,
    served: &AtomicUsize,
    sessions: &Mutex<HashSet<String>>,
    next_sid: &AtomicUsize,
    upgrades: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> Response<TestBody> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if path == "/health" {
        return support::text(200, "{\"status\":\"ok\"}");
    }
    served.fetch_add(1, Ordering::SeqCst);
    let engineio = query.contains("EIO=4");
    let sid = param(&query, "sid").map(str::to_owned);
    if let Some(sid) = &sid {
        if engineio && !sessions.lock().unwrap().contains(sid) {
            // What python-engineio answers for a session it does not have.
            return text_owned(400, format!("\"Invalid session {sid}\""));
        }
    }
    if req.headers().get(header::UPGRADE).is_some() {
        return websocket(name, req, upgrades);
    }
    if engineio {
        return match sid {
            None => {
                let sid = format!("{name}s{}", next_sid.fetch_add(1, Ordering::SeqCst));
                sessions.lock().unwrap().insert(sid.clone());
                let open = format!(
                    "0{{\"sid\":\"{sid}\",\"upgrades\":[\"websocket\"],\"pingTimeout\":20000,\"pingInterval\":25000,\"maxPayload\":1000000}}"
                );
                text_owned(200, open)
            }
            Some(_) => {
                let _ = req.into_body().collect().await;
                text_owned(200, format!("ok:{name}"))
            }
        };
    }
    let mut response = if path == "/slow" {
        let chunks = (0..100).map(|_| Bytes::from_static(b"chunk")).collect();
        Response::new(slow_body(chunks, Duration::from_millis(50)))
    } else {
        Response::new(full(name))
    };
    response
        .headers_mut()
        .insert("x-worker", HeaderValue::from_static(name));
    response
}

fn text_owned(status: u16, body: String) -> Response<TestBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(body))
        .unwrap()
}

/// Accepts the upgrade and echoes every text message as `<worker>:<text>`.
fn websocket(
    name: &'static str,
    req: Request<Incoming>,
    upgrades: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) -> Response<TestBody> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(req);
    let task = tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Text(text) => {
                    let reply = format!("{name}:{text}");
                    if ws.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    });
    upgrades.lock().unwrap().push(task);
    Response::builder()
        .status(101)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", key)
        .body(full(""))
        .unwrap()
}

// ------------------------------------------------------------------ clients

/// `GET path` carrying `cookie` (a `name=value` pair) when given.
async fn get_with(addr: SocketAddr, path: &str, cookie: Option<&str>) -> Reply {
    let mut builder = request("GET", addr, path);
    if let Some(cookie) = cookie {
        builder = builder.header(header::COOKIE, cookie);
    }
    send(addr, builder.body(full("")).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The affinity cookie a response sets, as the `name=value` pair a client sends back.
fn affinity_cookie(reply: &Reply) -> Option<String> {
    reply
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{COOKIE}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// Which worker answered (`x-worker`, or the body of an Engine.IO answer).
fn worker_of(reply: &Reply) -> String {
    match reply.header("x-worker") {
        "" => reply.text(),
        name => name.to_owned(),
    }
}

async fn two_workers(extra: &[&str]) -> (Proxy, WorkerBackend, WorkerBackend) {
    let w0 = WorkerBackend::start("w0").await;
    let w1 = WorkerBackend::start("w1").await;
    let proxy = Proxy::start_with(config_for_workers(&[w0.addr, w1.addr], extra)).await;
    wait_workers_up(&proxy, 2).await;
    (proxy, w0, w1)
}

async fn health(proxy: &Proxy) -> (StatusCode, serde_json::Value) {
    let r = get(proxy.addr, "/monitor/health").await.unwrap();
    (r.status, r.json())
}

async fn wait_workers_up(proxy: &Proxy, n: u64) {
    eventually("the workers are reachable", async || {
        health(proxy).await.1["backend"]["workers_up"] == n
    })
    .await;
}

/// A new visitor: its first answer, its cookie and its worker.
async fn visit(proxy: &Proxy) -> (String, String) {
    let r = get_with(proxy.addr, "/", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let cookie = affinity_cookie(&r).expect("a new visitor gets the affinity cookie");
    (cookie, worker_of(&r))
}

/// A polling handshake: the new session's id and the worker that holds it.
async fn handshake(proxy: &Proxy, cookie: Option<&str>) -> (String, Reply) {
    let r = get_with(
        proxy.addr,
        "/ws/socket.io/?EIO=4&transport=polling&t=1",
        cookie,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let text = r.text();
    let sid = text
        .split("\"sid\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no sid in {text}"))
        .to_owned();
    (sid, r)
}

fn polling(sid: &str) -> String {
    format!("/ws/socket.io/?EIO=4&transport=polling&sid={sid}")
}

// ------------------------------------------------------------------ affinity

#[tokio::test]
async fn new_visitors_spread_over_the_workers_and_each_gets_a_cookie() {
    let (proxy, w0, w1) = two_workers(&[]).await;
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (cookie, worker) = visit(&proxy).await;
        assert!(cookie.starts_with(&format!("{COOKIE}=")));
        seen.push(worker);
    }
    for name in ["w0", "w1"] {
        assert!(
            seen.iter().filter(|w| *w == name).count() >= 2,
            "{name}: {seen:?}"
        );
    }
    assert!(w0.served() >= 2 && w1.served() >= 2);
    let r = get_with(proxy.addr, "/", None).await;
    let set = r.header("set-cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "plain http: not Secure: {set}");
    assert!(!set.contains("Max-Age"), "a session cookie: {set}");
}

#[tokio::test]
async fn the_cookie_keeps_http_and_websocket_on_its_worker_and_is_not_set_again() {
    let (proxy, _w0, _w1) = two_workers(&[]).await;
    for _ in 0..2 {
        let (cookie, worker) = visit(&proxy).await;
        for _ in 0..6 {
            let r = get_with(proxy.addr, "/page", Some(&cookie)).await;
            assert_eq!(worker_of(&r), worker);
            assert!(
                affinity_cookie(&r).is_none(),
                "set only when missing or re-pointed"
            );
        }
        let mut req = ws_request(proxy.addr, "/ws/socket.io/?EIO=4&transport=websocket");
        req.headers_mut()
            .insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        let (mut client, response) = try_connect(req).await.expect("upgrade");
        assert!(response.headers().get(header::SET_COOKIE).is_none());
        client.send(Message::text("hi")).await.unwrap();
        let reply = support::ws::next_data(&mut client).await;
        assert_eq!(reply.into_text().unwrap().as_str(), format!("{worker}:hi"));
    }
}

#[tokio::test]
async fn a_websocket_of_a_new_visitor_gets_the_cookie_in_its_101() {
    let (proxy, _w0, _w1) = two_workers(&[]).await;
    let (mut client, response) = try_connect(ws_request(proxy.addr, "/ws")).await.unwrap();
    let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
    let cookie = set.split(';').next().unwrap().to_owned();
    client.send(Message::text("x")).await.unwrap();
    let worker = support::ws::next_data(&mut client)
        .await
        .into_text()
        .unwrap()
        .as_str()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let r = get_with(proxy.addr, "/", Some(&cookie)).await;
    assert_eq!(
        worker_of(&r),
        worker,
        "the HTTP requests follow the WebSocket"
    );
}

#[tokio::test]
async fn the_cookie_is_secure_behind_a_trusted_https_proxy_and_samesite_is_configurable() {
    let (proxy, _w0, _w1) = two_workers(&[
        "--trusted-proxies",
        "127.0.0.0/8",
        "--affinity-cookie",
        "pin",
        "--affinity-samesite",
        "None",
    ])
    .await;
    let via_https = request("GET", proxy.addr, "/")
        .header("x-forwarded-proto", "https")
        .body(full(""))
        .unwrap();
    let r = send(proxy.addr, via_https).await.unwrap();
    let set = r.header("set-cookie");
    assert!(set.starts_with("pin="), "{set}");
    assert!(
        set.contains("SameSite=None") && set.contains("Secure"),
        "{set}"
    );
}

#[tokio::test]
async fn a_cookie_re_pointed_behind_a_trusted_https_proxy_stays_secure() {
    // No probe tick during the test: the refusal itself re-points the cookie.
    let (proxy, mut w0, mut w1) = two_workers(&[
        "--trusted-proxies",
        "127.0.0.0/8",
        "--health-interval",
        "30",
    ])
    .await;
    let via_https = |cookie: Option<&str>| {
        let mut builder = request("GET", proxy.addr, "/").header("x-forwarded-proto", "https");
        if let Some(cookie) = cookie {
            builder = builder.header(header::COOKIE, cookie);
        }
        builder.body(full("")).unwrap()
    };
    let first = send(proxy.addr, via_https(None)).await.unwrap();
    assert!(first.header("set-cookie").contains("Secure"));
    let cookie = affinity_cookie(&first).unwrap();
    if worker_of(&first) == "w0" {
        w0.kill();
    } else {
        w1.kill();
    }
    let repointed = send(proxy.addr, via_https(Some(&cookie))).await.unwrap();
    assert_eq!(repointed.status, StatusCode::OK);
    let set = repointed.header("set-cookie");
    assert!(set.contains("Secure"), "re-pointed after a refusal: {set}");
    let plain = get_with(proxy.addr, "/", None).await;
    assert!(
        !plain.header("set-cookie").contains("Secure"),
        "plain http from a trusted peer: not Secure"
    );
}

#[tokio::test]
async fn a_cookieless_engineio_client_keeps_its_session_by_sid() {
    let (proxy, _w0, _w1) = two_workers(&[]).await;
    for _ in 0..4 {
        let (sid, r) = handshake(&proxy, None).await;
        let home = &sid[..2];
        assert!(
            affinity_cookie(&r).is_some(),
            "the cookie is offered all the same"
        );
        for _ in 0..5 {
            // No cookie at all, as python-socketio without a cookie jar.
            let r = get_with(proxy.addr, &polling(&sid), None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert_eq!(r.text(), format!("ok:{home}"));
            let post = request("POST", proxy.addr, &polling(&sid))
                .body(full("42[\"client_message\",{}]"))
                .unwrap();
            let r = send(proxy.addr, post).await.unwrap();
            assert_eq!(r.text(), format!("ok:{home}"));
        }
    }
}

#[tokio::test]
async fn the_sid_wins_over_a_cookie_naming_another_worker() {
    let (proxy, _w0, _w1) = two_workers(&[]).await;
    let (cookie0, worker0) = visit(&proxy).await;
    let (cookie1, worker1) = loop {
        let v = visit(&proxy).await;
        if v.1 != worker0 {
            break v;
        }
    };
    let (sid, _) = handshake(&proxy, Some(&cookie0)).await;
    assert!(sid.starts_with(&worker0));
    let r = get_with(proxy.addr, &polling(&sid), Some(&cookie1)).await;
    assert_eq!(r.text(), format!("ok:{worker0}"), "not {worker1}");
}

#[tokio::test]
async fn forged_garbled_or_foreign_cookies_mean_no_affinity() {
    let (proxy, _w0, _w1) = two_workers(&[]).await;
    let (good, _) = visit(&proxy).await;
    let value = good.split_once('=').unwrap().1;
    let (index, tag) = value.split_once('.').unwrap();
    let wrong_tag = format!("{index}.{}", "0".repeat(16));
    let out_of_range = format!("7.{tag}");
    let too_long = format!("{value}{}", "a".repeat(4000));
    for forged in [
        "garbage",
        "1",
        "",
        wrong_tag.as_str(),
        out_of_range.as_str(),
        "0.zzzzzzzzzzzzzzzz",
        too_long.as_str(),
        "-1.0000000000000000",
    ] {
        let r = get_with(proxy.addr, "/", Some(&format!("{COOKIE}={forged}"))).await;
        assert_eq!(r.status, StatusCode::OK, "{forged:?}");
        let fresh = affinity_cookie(&r).expect("treated as a new visitor");
        assert!(
            fresh.len() < 64 && fresh != format!("{COOKIE}={forged}"),
            "{fresh}"
        );
    }
}

// ------------------------------------------------------------------ a worker dies

#[tokio::test]
async fn a_refusing_worker_hands_its_visitors_to_another_with_a_new_cookie() {
    let (proxy, mut w0, mut w1) = two_workers(&[]).await;
    let (cookie, worker) = visit(&proxy).await;
    let (dying, other) = if worker == "w0" {
        (&mut w0, "w1")
    } else {
        (&mut w1, "w0")
    };
    dying.kill();
    let r = get_with(proxy.addr, "/page", Some(&cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "no error for the visitor");
    assert_eq!(worker_of(&r), other);
    let repointed = affinity_cookie(&r).expect("re-pointed with a new cookie");
    assert_ne!(repointed, cookie);
    // The stale cookie is re-pointed at once now that the worker is known to refuse...
    let r = get_with(proxy.addr, "/page", Some(&cookie)).await;
    assert_eq!(worker_of(&r), other);
    assert!(affinity_cookie(&r).is_some());
    // ...and the new one holds.
    for _ in 0..3 {
        let r = get_with(proxy.addr, "/page", Some(&repointed)).await;
        assert_eq!(worker_of(&r), other);
        assert!(affinity_cookie(&r).is_none());
    }
    // New visitors go to the live worker only.
    for _ in 0..4 {
        assert_eq!(visit(&proxy).await.1, other);
    }
    let mut req = ws_request(proxy.addr, "/ws");
    req.headers_mut()
        .insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
    let (mut client, response) = try_connect(req).await.expect("upgrade re-pointed");
    assert!(response.headers().get(header::SET_COOKIE).is_some());
    client.send(Message::text("hi")).await.unwrap();
    let reply = support::ws::next_data(&mut client).await;
    assert_eq!(reply.into_text().unwrap().as_str(), format!("{other}:hi"));
}

#[tokio::test]
async fn a_worker_dying_mid_stream_cuts_only_its_own_responses() {
    let (proxy, mut w0, _w1) = two_workers(&[]).await;
    let cookie0 = loop {
        let (cookie, worker) = visit(&proxy).await;
        if worker == "w0" {
            break cookie;
        }
    };
    let cookie1 = loop {
        let (cookie, worker) = visit(&proxy).await;
        if worker == "w1" {
            break cookie;
        }
    };
    let streaming = |cookie: String| {
        let addr = proxy.addr;
        tokio::spawn(async move {
            let req = request("GET", addr, "/slow")
                .header(header::COOKIE, cookie)
                .body(full(""))
                .unwrap();
            send(addr, req).await
        })
    };
    let on_w0 = streaming(cookie0.clone());
    let on_w1 = streaming(cookie1);
    let mut req = ws_request(proxy.addr, "/ws");
    req.headers_mut()
        .insert(header::COOKIE, HeaderValue::from_str(&cookie0).unwrap());
    let (mut relayed, _) = try_connect(req).await.unwrap();
    eventually("both streams are under way", async || {
        health(&proxy).await.1["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["requests_in_flight"].as_u64() >= Some(1))
    })
    .await;
    w0.kill();
    let cut = tokio::time::timeout(DEADLINE, on_w0)
        .await
        .unwrap()
        .unwrap();
    assert!(
        cut.is_err(),
        "the dying worker's body ends in an error, not a hang"
    );
    // Its relay ends too: the client sees the connection close, and reconnects.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match relayed.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the relay of the dead worker closes");
    let whole = tokio::time::timeout(DEADLINE * 2, on_w1)
        .await
        .unwrap()
        .unwrap()
        .expect("the other worker's stream completes");
    assert_eq!(whole.body.len(), 500);
    let r = get_with(proxy.addr, "/page", Some(&cookie0)).await;
    assert_eq!(worker_of(&r), "w1");
    assert!(affinity_cookie(&r).is_some());
}

#[tokio::test]
async fn a_session_of_a_dead_worker_gets_engineios_unknown_session_answer() {
    let (proxy, mut w0, mut w1) = two_workers(&[]).await;
    let (sid, _) = handshake(&proxy, None).await;
    let (dying, live) = if sid.starts_with("w0") {
        (&mut w0, "w1")
    } else {
        (&mut w1, "w0")
    };
    dying.kill();
    for method in ["GET", "POST"] {
        let r = send(
            proxy.addr,
            request(method, proxy.addr, &polling(&sid))
                .body(full(if method == "POST" { "3" } else { "" }))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{method}");
        assert_eq!(r.header("content-type"), "text/plain");
        assert_eq!(r.text(), format!("\"Invalid session {sid}\""), "{method}");
    }
    let upgrade = ws_request(
        proxy.addr,
        &format!("/ws/socket.io/?EIO=4&transport=websocket&sid={sid}"),
    );
    match try_connect(upgrade).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::BAD_REQUEST)
        }
        other => panic!("expected 400, got {:?}", other.map(|(_, r)| r.status())),
    }
    // The client reconnects: a new handshake lands on the live worker.
    let (fresh, _) = handshake(&proxy, None).await;
    assert!(fresh.starts_with(live), "{fresh}");
}

#[tokio::test]
async fn a_restarted_worker_is_used_again_and_its_old_sessions_are_unknown() {
    let (proxy, mut w0, mut w1) = two_workers(&[]).await;
    let (sid, _) = handshake(&proxy, None).await;
    let (dying, live) = if sid.starts_with("w0") {
        (&mut w0, &w1)
    } else {
        (&mut w1, &w0)
    };
    dying.kill();
    eventually("the dead worker is down", async || {
        health(&proxy).await.1["backend"]["workers_up"] == 1
    })
    .await;
    let before = live.served();
    for _ in 0..4 {
        visit(&proxy).await;
    }
    assert_eq!(
        live.served() - before,
        4,
        "new visitors all to the live worker"
    );
    dying.restart().await;
    wait_workers_up(&proxy, 2).await;
    let before = dying.served();
    for _ in 0..6 {
        visit(&proxy).await;
    }
    assert!(
        dying.served() > before,
        "the worker that came back gets visitors"
    );
    let r = get_with(proxy.addr, &polling(&sid), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "its old session is gone");
}

// ------------------------------------------------------------------ readiness

/// One backend, probed every `interval` seconds while it is up.
fn one_backend(addr: SocketAddr, interval: &str, extra: &[&str]) -> chatgate::config::Config {
    let backend = format!("http://{addr}");
    let mut args = vec![
        "chatgate",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend,
        "--health-interval",
        interval,
        "--log-format",
        "text",
    ];
    args.extend_from_slice(extra);
    let cli = chatgate::config::Cli::parse_with(args, |_| None).unwrap();
    chatgate::config::Config::from_settings(&cli.settings).unwrap()
}

#[tokio::test]
async fn readiness_with_one_of_two_workers_down_is_200_and_lists_both() {
    let (proxy, mut w0, w1) = two_workers(&[]).await;
    let (status, doc) = health(&proxy).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["backend"]["workers"], 2);
    w0.kill();
    eventually("worker 0 counts as down", async || {
        health(&proxy).await.1["workers"][0]["reachable"] == false
    })
    .await;
    let (status, doc) = health(&proxy).await;
    assert_eq!(status, StatusCode::OK, "one worker is enough: {doc}");
    assert_eq!(doc["status"], "ok");
    let workers = doc["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert_eq!(workers[0]["url"], format!("http://{}", w0.addr));
    assert_eq!(workers[1]["url"], format!("http://{}", w1.addr));
    assert_eq!(workers[1]["reachable"], true);
    for w in workers {
        for field in [
            "index",
            "relays",
            "requests_in_flight",
            "restarts",
            "last_error",
        ] {
            assert!(w.get(field).is_some(), "{field}: {w}");
        }
    }
    drop(w1);
    eventually("no worker left: not ready", async || {
        health(&proxy).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
}

#[tokio::test]
async fn metrics_carry_the_worker_label() {
    let (proxy, _w0, _w1) = two_workers(&[]).await;
    visit(&proxy).await;
    let _ws = try_connect(ws_request(proxy.addr, "/ws")).await.unwrap();
    let text = get(proxy.admin, "/monitor/metrics").await.unwrap().text();
    for line in [
        r#"chatgate_worker_up{worker="0"} 1"#,
        r#"chatgate_worker_up{worker="1"} 1"#,
        "chatgate_backend_up 1",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let relays: f64 = text
        .lines()
        .filter(|l| l.starts_with("chatgate_worker_relays{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(relays, 1.0, "{text}");
    assert!(
        text.contains("chatgate_worker_requests_total{worker="),
        "{text}"
    );
}

#[tokio::test]
async fn readiness_follows_a_backend_that_starts_late_within_about_a_second() {
    let addr = dead_addr().await;
    // The full interval is long: only the quick probing of an unknown backend can make it.
    let proxy = Proxy::start_with(one_backend(addr, "5", &[])).await;
    // Let the first probes fail and the quick pace back off a little.
    eventually("the first probe failed", async || {
        health(&proxy).await.1["backend"]["consecutive_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    })
    .await;
    assert_eq!(health(&proxy).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let _backend = WorkerBackend::serve("late", bind_again(addr).await);
    let answering = Instant::now();
    let within = Duration::from_millis(1500);
    loop {
        if health(&proxy).await.0 == StatusCode::OK {
            break;
        }
        assert!(
            answering.elapsed() < within,
            "readiness still 503 {within:?} after the backend answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_real_answer_makes_the_backend_ready_before_the_probe_does() {
    let addr = dead_addr().await;
    let proxy = Proxy::start_with(one_backend(addr, "30", &[])).await;
    eventually("the first probe failed", async || {
        health(&proxy).await.1["backend"]["consecutive_failures"] == 1
    })
    .await;
    let _backend = WorkerBackend::serve("late", bind_again(addr).await);
    // The next quick probe is up to 0.5 s away; a request's answer is proof enough now.
    let r = get(proxy.addr, "/").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(health(&proxy).await.0, StatusCode::OK);
}

#[tokio::test]
async fn readiness_goes_503_after_consecutive_refused_requests_before_the_next_tick() {
    let mut backend = WorkerBackend::start("b").await;
    let proxy = Proxy::start_with(one_backend(backend.addr, "30", &[])).await;
    proxy.wait_ready().await;
    backend.kill();
    for _ in 0..3 {
        let r = get(proxy.addr, "/").await.unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let (status, doc) = health(&proxy).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "three refused requests in a row are down, long before the 30 s tick: {doc}"
    );
}

#[tokio::test]
async fn one_refused_request_is_not_down_and_draining_still_wins() {
    let mut backend = WorkerBackend::start("b").await;
    let config = one_backend(backend.addr, "30", &["--shutdown-delay", "5"]);
    let mut proxy = Proxy::start_with(config).await;
    proxy.wait_ready().await;
    let addr = backend.addr;
    backend.kill();
    assert_eq!(
        get(proxy.addr, "/").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let _back = WorkerBackend::serve("b", bind_again(addr).await);
    assert_eq!(
        health(&proxy).await.0,
        StatusCode::OK,
        "one failure is not down"
    );
    proxy.begin_shutdown();
    eventually("draining", async || {
        health(&proxy).await.1["status"] == "draining"
    })
    .await;
}

// ------------------------------------------------------------------ supervised workers

/// A tiny worker: serves /health and / (its pid, port, app root, working directory and
/// index as JSON) on 127.0.0.1:<argv[1]>; prints a line when it listens.
const WORKER_PY: &str = r#"
import http.server, json, os, sys
port = int(sys.argv[1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({
            "pid": os.getpid(), "port": port, "cwd": os.getcwd(),
            "root": os.environ.get("CHAINLIT_APP_ROOT"),
            "index": os.environ.get("CHATGATE_WORKER_INDEX"),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print(f"worker listening on {port}", flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

/// chatgate as a process, supervising two workers of [`WORKER_PY`].
struct Supervising {
    child: tokio::process::Child,
    addr: SocketAddr,
    app: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

/// Two consecutive free ports (bound, then released).
async fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65535 && TcpListener::bind(("127.0.0.1", port + 1)).await.is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports");
}

impl Supervising {
    async fn start(name: &str) -> Supervising {
        let app = std::env::temp_dir().join(format!("chatgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&app);
        std::fs::create_dir_all(app.join(".files")).unwrap();
        std::fs::write(app.join("worker.py"), WORKER_PY).unwrap();
        let base = free_port_pair().await;
        let listen = dead_addr().await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["--listen", &listen.to_string(), "--admin-listen", "off"])
            .args(["--workers", "2", "--worker-port-base", &base.to_string()])
            .args(["--worker-app-dir", app.to_str().unwrap()])
            .args(["--health-interval", "0.2", "--shutdown-grace", "2"])
            .args(["--worker-stop-timeout", "3", "--log-format", "json"])
            .args(["--", "python3", "worker.py", "{port}"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("chatgate starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&log);
        let stdout = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
        let supervising = Supervising {
            child,
            addr: listen,
            app,
            log,
        };
        eventually("both supervised workers are ready", async || {
            let workers = supervising.workers().await;
            workers.len() == 2 && workers.iter().all(|w| w["reachable"] == true)
        })
        .await;
        supervising
    }

    async fn workers(&self) -> Vec<serde_json::Value> {
        match get(self.addr, "/monitor/health").await {
            Ok(r) => r.json()["workers"].as_array().cloned().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    async fn pids(&self) -> Vec<u32> {
        self.workers()
            .await
            .iter()
            .map(|w| w["pid"].as_u64().expect("a running worker has a pid") as u32)
            .collect()
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("chatgate runs")
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

impl Drop for Supervising {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.app);
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet: it runs no more).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                == Some("Z")
        }
    }
}

async fn all_gone(pids: &[u32]) {
    eventually("the workers are gone", async || {
        pids.iter().all(|p| gone(*p))
    })
    .await;
}

#[tokio::test]
async fn supervised_workers_start_each_in_its_own_app_root_with_their_output_logged() {
    if !has_python() {
        return;
    }
    let mut chatgate = Supervising::start("roots").await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let r = get(chatgate.addr, "/").await.unwrap();
        seen.push(r.json());
    }
    let roots: HashSet<String> = seen
        .iter()
        .map(|d| d["root"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(roots.len(), 2, "each worker its own APP_ROOT: {seen:?}");
    for doc in &seen {
        let root = Path::new(doc["root"].as_str().unwrap());
        let index = doc["index"].as_str().unwrap();
        assert!(root.ends_with(format!(".chatgate/worker-{index}")), "{doc}");
        assert_eq!(doc["cwd"].as_str().map(Path::new), Some(root));
        assert!(root.join("worker.py").is_symlink(), "the app is linked in");
        assert!(!root.join(".files").exists(), "but not the app's uploads");
    }
    eventually("the workers' output is in chatgate's log", async || {
        chatgate.logged(r#""worker":0"#) && chatgate.logged("worker listening on")
    })
    .await;
    signal(chatgate.pid(), "TERM");
    let _ = tokio::time::timeout(DEADLINE, chatgate.child.wait()).await;
}

#[tokio::test]
async fn a_supervised_worker_killed_is_restarted_and_counted_then_all_stop_with_chatgate() {
    if !has_python() {
        return;
    }
    let mut chatgate = Supervising::start("restart").await;
    let pids = chatgate.pids().await;
    signal(pids[0], "KILL");
    eventually("worker 0 is back, its restart counted", async || {
        let workers = chatgate.workers().await;
        workers.len() == 2
            && workers[0]["restarts"] == 1
            && workers[0]["reachable"] == true
            && workers[0]["pid"]
                .as_u64()
                .is_some_and(|p| p as u32 != pids[0])
    })
    .await;
    assert_eq!(chatgate.workers().await[1]["restarts"], 0);
    assert!(chatgate.logged("worker exited; restarting it"));
    let pids = chatgate.pids().await;
    signal(chatgate.pid(), "TERM");
    let status = tokio::time::timeout(DEADLINE, chatgate.child.wait())
        .await
        .expect("chatgate stops after its drain and its workers")
        .unwrap();
    assert!(status.success(), "{status}");
    for pid in &pids {
        assert!(gone(*pid), "worker {pid} stopped with chatgate");
    }
    assert!(chatgate.logged("workers stopped"));
}

#[tokio::test]
async fn a_chatgate_killed_with_sigkill_leaves_no_worker_behind() {
    if !has_python() || !has_setpriv() {
        return;
    }
    let mut chatgate = Supervising::start("orphans").await;
    let pids = chatgate.pids().await;
    signal(chatgate.pid(), "KILL");
    let _ = chatgate.child.wait().await;
    all_gone(&pids).await;
}

fn has_python() -> bool {
    let found = std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("python3 not found: supervised-worker test skipped");
    }
    found
}

fn has_setpriv() -> bool {
    let found = std::process::Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("setpriv not found: parent-death test skipped");
    }
    found
}
