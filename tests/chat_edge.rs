//! The chat-aware edge over real sockets: a fixture backend that answers Socket.IO chat
//! messages the way Chainlit 2.12 does (`task_start`, `stream_start`, `stream_token`...,
//! `task_end`), chatgate in front of it, a WebSocket client playing the browser.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::ws::{Client, close_received, connect, next_data};
use support::{DEADLINE, Proxy, get};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const PATH: &str = "/ws/socket.io/?EIO=4&transport=websocket";
const MESSAGE: &str = r#"42["client_message",{"message":{"output":"hi"},"fileReferences":[]}]"#;

/// A Chainlit-shaped backend: every `client_message` is answered with a task of `tokens`
/// streamed tokens, `gap` apart; everything else it receives is counted and echoed back.
struct ChatBackend {
    addr: SocketAddr,
    messages: Arc<AtomicUsize>,
    binaries: Arc<AtomicUsize>,
}

async fn chat_backend(tokens: usize, gap: Duration) -> ChatBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let messages = Arc::new(AtomicUsize::new(0));
    let binaries = Arc::new(AtomicUsize::new(0));
    let (seen, seen_binary) = (Arc::clone(&messages), Arc::clone(&binaries));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, seen_binary) = (Arc::clone(&seen), Arc::clone(&seen_binary));
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    match message {
                        Message::Text(text) if text.contains("\"client_message\"") => {
                            seen.fetch_add(1, Ordering::SeqCst);
                            let _ = ws.send(Message::text(r#"42["task_start",{}]"#)).await;
                            for i in 0..tokens {
                                tokio::time::sleep(gap).await;
                                let frame = if i == 0 {
                                    r#"42["stream_start",{"id":"m1","output":""}]"#.to_owned()
                                } else {
                                    format!(r#"42["stream_token",{{"id":"m1","token":"t{i} "}}]"#)
                                };
                                let _ = ws.send(Message::text(frame)).await;
                            }
                            let _ = ws.send(Message::text(r#"42["task_end",{}]"#)).await;
                        }
                        Message::Binary(_) => {
                            seen_binary.fetch_add(1, Ordering::SeqCst);
                        }
                        Message::Text(text) => {
                            let _ = ws.send(Message::Text(text)).await;
                        }
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            });
        }
    });
    ChatBackend {
        addr,
        messages,
        binaries,
    }
}

/// Reads text frames until one contains `needle`; returns every frame read.
async fn read_until(client: &mut Client, needle: &str) -> Vec<String> {
    let mut frames = Vec::new();
    loop {
        match next_data(client).await {
            Message::Text(t) => {
                let done = t.contains(needle);
                frames.push(t.to_string());
                if done {
                    return frames;
                }
            }
            Message::Close(frame) => panic!("closed while waiting for {needle}: {frame:?}"),
            _ => {}
        }
    }
}

async fn metric(proxy: &Proxy, series: &str) -> f64 {
    let text = get(proxy.admin, "/monitor/metrics").await.unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_metric(proxy: &Proxy, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = metric(proxy, series).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn chat_messages_and_answers_are_counted_and_timed() {
    let backend = chat_backend(3, Duration::from_millis(5)).await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    let mut client = connect(proxy.addr, PATH).await;
    for _ in 0..4 {
        client.send(Message::text(MESSAGE)).await.unwrap();
        read_until(&mut client, "task_end").await;
    }
    wait_metric(&proxy, "chatgate_chat_answer_duration_seconds_count", 4.0).await;
    assert_eq!(metric(&proxy, "chatgate_chat_messages_total").await, 4.0);
    assert_eq!(
        metric(&proxy, "chatgate_chat_time_to_first_token_seconds_count").await,
        4.0
    );
    assert_eq!(
        metric(&proxy, "chatgate_chat_answers_in_progress").await,
        0.0
    );
    // Other traffic is relayed as it is and not counted.
    client
        .send(Message::text(r#"42["fetch_favorites",{}]"#))
        .await
        .unwrap();
    read_until(&mut client, "fetch_favorites").await;
    assert_eq!(metric(&proxy, "chatgate_chat_messages_total").await, 4.0);
}

#[tokio::test]
async fn a_message_over_the_rate_gets_a_toast_and_never_reaches_the_backend() {
    let backend = chat_backend(1, Duration::from_millis(1)).await;
    let proxy = Proxy::start(backend.addr, &["--chat-rate-limit", "2/minute"]).await;
    let mut client = connect(proxy.addr, PATH).await;
    for _ in 0..2 {
        client.send(Message::text(MESSAGE)).await.unwrap();
        read_until(&mut client, "task_end").await;
    }
    client.send(Message::text(MESSAGE)).await.unwrap();
    let frames = read_until(&mut client, "toast").await;
    let toast = frames.last().unwrap();
    assert!(toast.starts_with(r#"42["toast","#), "{toast}");
    assert!(
        toast.contains("too fast") && toast.contains("warning"),
        "{toast}"
    );
    // The chat goes on: a non-message event still round-trips, and the backend saw only two.
    client
        .send(Message::text(r#"42["ping_me",1]"#))
        .await
        .unwrap();
    read_until(&mut client, "ping_me").await;
    assert_eq!(backend.messages.load(Ordering::SeqCst), 2);
    assert_eq!(
        metric(&proxy, r#"chatgate_chat_refused_total{reason="rate"}"#).await,
        1.0
    );
}

#[tokio::test]
async fn a_refused_binary_message_takes_its_attachments_along() {
    let backend = chat_backend(1, Duration::from_millis(1)).await;
    let proxy = Proxy::start(backend.addr, &["--chat-rate-limit", "1/minute"]).await;
    let mut client = connect(proxy.addr, PATH).await;
    client.send(Message::text(MESSAGE)).await.unwrap();
    read_until(&mut client, "task_end").await;
    let binary_message = r#"451-["client_message",{"file":{"_placeholder":true,"num":0}}]"#;
    client.send(Message::text(binary_message)).await.unwrap();
    client.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    read_until(&mut client, "toast").await;
    // A binary frame of its own (not an attachment of a refused message) still passes.
    client.send(Message::binary(vec![9u8])).await.unwrap();
    client.send(Message::text(r#"42["sync",1]"#)).await.unwrap();
    read_until(&mut client, "sync").await;
    assert_eq!(backend.binaries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn answers_in_progress_are_capped_per_session() {
    let backend = chat_backend(20, Duration::from_millis(50)).await;
    let proxy = Proxy::start(backend.addr, &["--max-answers-per-session", "1"]).await;
    let mut client = connect(proxy.addr, PATH).await;
    client.send(Message::text(MESSAGE)).await.unwrap();
    read_until(&mut client, "task_start").await;
    client.send(Message::text(MESSAGE)).await.unwrap();
    let frames = read_until(&mut client, "toast").await;
    assert!(
        frames.last().unwrap().contains("still on its way"),
        "{frames:?}"
    );
    read_until(&mut client, "task_end").await;
    assert_eq!(backend.messages.load(Ordering::SeqCst), 1);
    assert_eq!(
        metric(
            &proxy,
            r#"chatgate_chat_refused_total{reason="session_answers"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn garbage_and_unknown_frames_pass_through_untouched() {
    let backend = chat_backend(1, Duration::from_millis(1)).await;
    let proxy = Proxy::start(backend.addr, &["--max-answers", "1"]).await;
    let mut client = connect(proxy.addr, PATH).await;
    for frame in [
        "not socket.io at all",
        "42[\"esc\\\"aped\",1]",
        "42[",
        "4",
        "\u{1f600} emoji",
    ] {
        client.send(Message::text(frame)).await.unwrap();
        match next_data(&mut client).await {
            Message::Text(echo) => assert_eq!(echo.as_str(), frame),
            other => panic!("{frame:?}: got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_drain_lets_the_answer_finish_then_closes_with_1001() {
    // An answer of 10 tokens, 100 ms apart: about a second still to go at SIGTERM.
    let backend = chat_backend(10, Duration::from_millis(100)).await;
    let mut proxy = Proxy::start(backend.addr, &["--shutdown-grace", "10"]).await;
    let mut client = connect(proxy.addr, PATH).await;
    client.send(Message::text(MESSAGE)).await.unwrap();
    read_until(&mut client, "stream_start").await;
    proxy.begin_shutdown();
    // A message during the drain gets the notice, not the backend.
    client.send(Message::text(MESSAGE)).await.unwrap();
    let frames = read_until(&mut client, "task_end").await;
    assert!(
        frames
            .iter()
            .any(|f| f.contains("toast") && f.contains("restarting")),
        "{frames:?}"
    );
    assert_eq!(
        frames.iter().filter(|f| f.contains("stream_token")).count(),
        9,
        "every token of the answer arrived"
    );
    assert_eq!(close_received(&mut client).await.map(|c| c.0), Some(1001));
    tokio::time::timeout(DEADLINE, proxy.handle())
        .await
        .expect("chatgate stops once the answer is done")
        .unwrap();
    assert_eq!(backend.messages.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idle_relay_still_closes_at_once_on_a_drain() {
    let backend = chat_backend(1, Duration::from_millis(1)).await;
    let mut proxy = Proxy::start(backend.addr, &["--shutdown-grace", "10"]).await;
    let mut client = connect(proxy.addr, PATH).await;
    let started = tokio::time::Instant::now();
    proxy.begin_shutdown();
    assert_eq!(close_received(&mut client).await.map(|c| c.0), Some(1001));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle relay waited for nothing"
    );
}

#[tokio::test]
async fn with_the_reader_off_nothing_is_counted_or_refused() {
    let backend = chat_backend(1, Duration::from_millis(1)).await;
    let proxy = Proxy::start(
        backend.addr,
        &["--chat-observe", "off", "--chat-rate-limit", "1/minute"],
    )
    .await;
    let mut client = connect(proxy.addr, PATH).await;
    for _ in 0..3 {
        client.send(Message::text(MESSAGE)).await.unwrap();
        read_until(&mut client, "task_end").await;
    }
    assert_eq!(backend.messages.load(Ordering::SeqCst), 3);
    assert_eq!(metric(&proxy, "chatgate_chat_messages_total").await, 0.0);
}

/// Every query of the shipped Grafana dashboard names a metric chatgate really exports.
#[tokio::test]
async fn the_grafana_dashboard_only_queries_exported_metrics() {
    // Two workers, so the per-worker families are exported too.
    let backend = chat_backend(1, Duration::from_millis(1)).await;
    let second = chat_backend(1, Duration::from_millis(1)).await;
    let config = support::config_for_workers(&[backend.addr, second.addr], &[]);
    let proxy = Proxy::start_with(config).await;
    proxy.wait_ready().await;
    // Histograms show up once they hold a sample: one chat round trip and one request.
    let mut client = connect(proxy.addr, PATH).await;
    client.send(Message::text(MESSAGE)).await.unwrap();
    read_until(&mut client, "task_end").await;
    // With several workers the series carry a `worker` label: sum them.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = get(proxy.admin, "/monitor/metrics").await.unwrap().text();
        let answered: f64 = text
            .lines()
            .filter(|l| l.starts_with("chatgate_chat_answer_duration_seconds_count{worker="))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if answered == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "answer not counted per worker: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.close(None).await.unwrap();
    wait_metric(&proxy, "chatgate_websocket_relays", 0.0).await;
    let _ = get(proxy.addr, "/monitor/live").await.unwrap();
    let exported = get(proxy.admin, "/monitor/metrics").await.unwrap().text();
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/chatgate-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    collect_exprs(&dashboard, &mut queries);
    assert!(
        queries.len() >= 10,
        "dashboard has {} queries",
        queries.len()
    );
    let mut named = 0;
    for query in &queries {
        for name in metric_names(query) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| families.contains(base))
                .unwrap_or(&name);
            assert!(
                families.contains(&family),
                "dashboard query {query:?} names {name}, which chatgate does not export \
                 (exported: {families:?})"
            );
            named += 1;
        }
    }
    assert!(
        named >= queries.len(),
        "some query names no chatgate metric"
    );
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(at) = query[i..].find("chatgate_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.push(query[start..end].to_owned());
        i = end;
    }
    names
}

/// An Engine.IO polling backend: POST bodies are recorded; a GET of session `s1` answers
/// one whole Chainlit answer (task_start, a token, task_end) in one payload.
async fn polling_backend() -> (support::Backend, Arc<std::sync::Mutex<Vec<String>>>) {
    use http_body_util::BodyExt;
    let posts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&posts);
    let backend = support::Backend::start(support::handler(move |req: http::Request<hyper::body::Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            if req.uri().path() == "/health" {
                return support::text(200, "ok");
            }
            if req.method() == http::Method::POST {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                return support::text(200, "ok");
            }
            support::text(
                200,
                "42[\"task_start\",{}]\x1e42[\"stream_start\",{\"id\":\"m\"}]\x1e42[\"task_end\",{}]",
            )
        }
    }))
    .await;
    (backend, posts)
}

const POLL: &str = "/ws/socket.io/?EIO=4&transport=polling&sid=s1";

async fn post(proxy: &Proxy, body: &'static str) -> support::Reply {
    let req = support::request("POST", proxy.addr, POLL)
        .header("content-type", "text/plain;charset=UTF-8")
        .body(support::full(body))
        .unwrap();
    support::send(proxy.addr, req).await.unwrap()
}

#[tokio::test]
async fn polling_messages_over_the_rate_become_noops_and_the_notice_comes_with_the_next_poll() {
    let (backend, posts) = polling_backend().await;
    let proxy = Proxy::start(backend.addr, &["--chat-rate-limit", "1/minute"]).await;
    // A forged session the backend never answered for is passed on unscreened (and not kept).
    let forged = support::request(
        "POST",
        proxy.addr,
        "/ws/socket.io/?EIO=4&transport=polling&sid=forged",
    )
    .body(support::full(
        "42[\"client_message\",{}]\x1e42[\"client_message\",{}]",
    ))
    .unwrap();
    support::send(proxy.addr, forged).await.unwrap();
    assert_eq!(
        posts.lock().unwrap().pop().as_deref(),
        Some("42[\"client_message\",{}]\x1e42[\"client_message\",{}]")
    );
    // The session's first poll answer (here a whole answer) makes it known.
    let _ = get(proxy.addr, POLL).await.unwrap().text();
    let two = "42[\"client_message\",{\"message\":{\"output\":\"a\"}}]\x1e42[\"client_message\",{\"message\":{\"output\":\"b\"}}]";
    let posted = post(&proxy, two).await;
    assert_eq!(posted.status, http::StatusCode::OK);
    assert_eq!(
        posted.text(),
        "ok",
        "a POST's answer stays as the backend gave it"
    );
    let forwarded = posts.lock().unwrap().clone();
    assert_eq!(
        forwarded,
        ["42[\"client_message\",{\"message\":{\"output\":\"a\"}}]\x1e6"],
        "the second message became a noop"
    );
    let answer = get(proxy.addr, POLL).await.unwrap();
    let text = answer.text();
    let records: Vec<&str> = text.split('\x1e').collect();
    assert!(
        records[0].starts_with("42[\"toast\"") && records[0].contains("too fast"),
        "{text}"
    );
    assert_eq!(
        records[1], "42[\"task_start\",{}]",
        "the backend's answer follows whole"
    );
    assert_eq!(answer.header("content-length"), text.len().to_string());
    // Taken once: the next poll carries only the backend's answer.
    let again = get(proxy.addr, POLL).await.unwrap().text();
    assert!(again.starts_with("42[\"task_start\""), "{again}");
    assert_eq!(
        metric(&proxy, r#"chatgate_chat_refused_total{reason="rate"}"#).await,
        1.0
    );
}

#[tokio::test]
async fn polling_answers_are_counted_and_timed() {
    let (backend, _posts) = polling_backend().await;
    let proxy = Proxy::start(backend.addr, &[]).await;
    // The first poll answer makes the session known (it carries an answer of its own here).
    let _ = get(proxy.addr, POLL).await.unwrap().text();
    wait_metric(&proxy, "chatgate_chat_answer_duration_seconds_count", 1.0).await;
    post(
        &proxy,
        "42[\"client_message\",{\"message\":{\"output\":\"a\"}}]",
    )
    .await;
    let _ = get(proxy.addr, POLL).await.unwrap().text();
    wait_metric(&proxy, "chatgate_chat_answer_duration_seconds_count", 2.0).await;
    assert_eq!(metric(&proxy, "chatgate_chat_messages_total").await, 1.0);
    assert_eq!(
        metric(&proxy, "chatgate_chat_time_to_first_token_seconds_count").await,
        1.0,
        "only the answer after the message has a first token"
    );
    assert_eq!(
        metric(&proxy, "chatgate_chat_answers_in_progress").await,
        0.0
    );
}
