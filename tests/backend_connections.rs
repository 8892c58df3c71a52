//! Each client connection's own backend connection (`src/backend/owned.rs`), over real
//! sockets: one backend connection per keep-alive client connection, handed on to the next
//! client connection when its client leaves, and no request lost or wrongly repeated when
//! the backend closes a connection under it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a scripted backend connection behaves after answering `answered` requests.
#[derive(Clone, Copy)]
enum Then {
    /// Keep answering.
    KeepAlive,
    /// Close right after the last answer (FIN while chatgate holds it idle).
    Close,
    /// Read the next request whole, then close without answering.
    ReadAndClose,
    /// Take this long over each later answer.
    Slow(Duration),
}

/// A keep-alive backend that counts its connections. Its first connection answers
/// `answered` requests and then does `then`; every later connection keeps answering. Each
/// answer names the connection (`conn-<n>`).
async fn counting_backend(answered: usize, then: Then) -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let (addr, task) = raw_backend(move |mut stream| {
        let count = Arc::clone(&count);
        async move {
            let mut head = read_head(&mut stream).await;
            // The health probe's connections are not counted.
            let n = if head.starts_with("GET /health ") {
                0
            } else {
                count.fetch_add(1, Ordering::SeqCst) + 1
            };
            let mut served = 0;
            loop {
                if head.is_empty() {
                    return;
                }
                drain_body(&mut stream, &head).await;
                if let (1, Then::Slow(pause)) = (n, then) {
                    if served >= answered {
                        tokio::time::sleep(pause).await;
                    }
                }
                let body = format!("conn-{n}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                served += 1;
                if n == 1 && served >= answered {
                    match then {
                        Then::KeepAlive => {}
                        Then::Slow(_) => {}
                        Then::Close => return,
                        Then::ReadAndClose => {
                            let head = read_head(&mut stream).await;
                            drain_body(&mut stream, &head).await;
                            return;
                        }
                    }
                }
                head = read_head(&mut stream).await;
            }
        }
    })
    .await;
    drop(task);
    (addr, accepted)
}

/// Reads the body a request head announces with `content-length`.
async fn drain_body(stream: &mut TcpStream, head: &str) {
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    let _ = tokio::time::timeout(DEADLINE, stream.read_exact(&mut body)).await;
}

/// A keep-alive client connection to chatgate.
async fn client(addr: SocketAddr) -> SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// One request on `sender`: status and body text.
async fn exchange(
    sender: &mut SendRequest<TestBody>,
    addr: SocketAddr,
    method: &str,
    body: &'static str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = request(method, addr, "/page").body(full(body)).unwrap();
    let response = tokio::time::timeout(DEADLINE, async {
        sender.ready().await.unwrap();
        sender.send_request(req).await.unwrap()
    })
    .await
    .expect("answered in time");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_keep_alive_client_connection_keeps_one_backend_connection() {
    let (backend, accepted) = counting_backend(usize::MAX, Then::KeepAlive).await;
    let proxy = Proxy::start(backend, &[]).await;
    let mut a = client(proxy.addr).await;
    for _ in 0..5 {
        assert_eq!(
            exchange(&mut a, proxy.addr, "GET", "").await,
            (200, "conn-1".into())
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one backend connection for 5 requests"
    );
    // A second client connection at the same time gets its own.
    let mut b = client(proxy.addr).await;
    assert_eq!(
        exchange(&mut b, proxy.addr, "GET", "").await,
        (200, "conn-2".into())
    );
    assert_eq!(
        exchange(&mut a, proxy.addr, "GET", "").await,
        (200, "conn-1".into())
    );
    // When a client leaves, its idle backend connection serves the next client connection.
    drop(a);
    let mut reused = false;
    eventually(
        "a new client connection reuses the idle backend connection",
        async || {
            let mut c = client(proxy.addr).await;
            let (status, body) = exchange(&mut c, proxy.addr, "GET", "").await;
            assert_eq!(status, 200);
            reused = body == "conn-1";
            reused || accepted.load(Ordering::SeqCst) > 8
        },
    )
    .await;
    assert!(reused, "the idle connection was handed on");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_post_is_not_lost_when_the_backend_closed_the_idle_connection() {
    // The backend closes its connection right after the first answer, without saying so:
    // the next request finds it closed (or hyper hands the request back unsent) and goes
    // out on a new connection, body and all.
    let (backend, accepted) = counting_backend(1, Then::Close).await;
    let proxy = Proxy::start(backend, &[]).await;
    let mut c = client(proxy.addr).await;
    assert_eq!(
        exchange(&mut c, proxy.addr, "GET", "").await,
        (200, "conn-1".into())
    );
    eventually("the backend closed its first connection", async || {
        accepted.load(Ordering::SeqCst) >= 1
    })
    .await;
    let (status, body) = exchange(&mut c, proxy.addr, "POST", "payload").await;
    assert_eq!((status, body.as_str()), (200, "conn-2"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_get_on_a_stale_connection_is_retried_and_a_post_is_not() {
    // The backend reads the second request of its first connection and closes without an
    // answer: what a keep-alive timer firing just as a request arrives looks like. The
    // request was written, so only an idempotent, bodyless one may go again.
    for (method, body, expected) in [("GET", "", 200), ("POST", "payload", 502)] {
        let (backend, accepted) = counting_backend(1, Then::ReadAndClose).await;
        let proxy = Proxy::start(backend, &[]).await;
        let mut c = client(proxy.addr).await;
        assert_eq!(
            exchange(&mut c, proxy.addr, "GET", "").await,
            (200, "conn-1".into())
        );
        // Idle for longer than `backend::owned::HOT`: a connection that may be stale.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (status, text) = exchange(&mut c, proxy.addr, method, body).await;
        assert_eq!(status, expected, "{method}: {text}");
        if expected == 200 {
            assert_eq!(text, "conn-2");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        } else {
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                1,
                "the POST was not sent again"
            );
        }
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn a_connection_stays_fresh_after_an_answer_slower_than_the_idle_timeout() {
    // Idle time counts from the end of an exchange: a long-poll or a streamed answer must
    // not make the connection look stale (and open a new one per poll).
    let (backend, accepted) = counting_backend(1, Then::Slow(Duration::from_millis(1500))).await;
    let proxy = Proxy::start(backend, &["--pool-idle-timeout", "1"]).await;
    let mut c = client(proxy.addr).await;
    assert_eq!(
        exchange(&mut c, proxy.addr, "GET", "").await,
        (200, "conn-1".into())
    );
    assert_eq!(
        exchange(&mut c, proxy.addr, "GET", "").await,
        (200, "conn-1".into())
    );
    assert_eq!(
        exchange(&mut c, proxy.addr, "GET", "").await,
        (200, "conn-1".into())
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_connect_is_tried_once() {
    // An https:// backend that drops every connection: the TLS handshake fails. That is
    // a 502 after one attempt, not two (a struggling backend gets no extra connects).
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let (addr, task) = raw_backend(move |stream| {
        count.fetch_add(1, Ordering::SeqCst);
        async move { drop(stream) }
    })
    .await;
    drop(task);
    let url = format!("https://{addr}");
    let cli = chatgate::config::Cli::parse_with(
        [
            "chatgate",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            url.as_str(),
            "--health-interval",
            "3600",
            "--log-format",
            "text",
        ],
        |_| None,
    )
    .unwrap();
    let config = chatgate::config::Config::from_settings(&cli.settings).unwrap();
    let proxy = Proxy::start_with(config).await;
    // The first health probe may still be connecting: count from when it is done.
    eventually("the first probe has connected", async || {
        accepted.load(Ordering::SeqCst) >= 1
    })
    .await;
    let before = accepted.load(Ordering::SeqCst);
    for method in ["GET", "POST"] {
        let mut c = client(proxy.addr).await;
        let (status, _) = exchange(&mut c, proxy.addr, method, "").await;
        assert_eq!(status, 502, "{method}");
    }
    // Two requests, one connect each; a quick health probe (the backend looks down) may
    // land in between. Tried twice each would be four.
    let connects = accepted.load(Ordering::SeqCst) - before;
    assert!(
        (2..=3).contains(&connects),
        "{connects} connects for 2 requests"
    );
    proxy.shutdown().await;
}
