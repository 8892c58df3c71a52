//! Test fixtures: chatgate in-process on a port chosen by the OS, fixture backends (HTTP
//! with a handler, raw TCP for misbehaviour, WebSocket echo), and small clients. Every
//! socket is on 127.0.0.1; every wait has a deadline.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chatgate::config::{Cli, Config};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type TestBody = BoxBody<Bytes, std::io::Error>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// Builds a validated config from flags (no environment), listening on port 0.
pub fn config(backend: SocketAddr, extra: &[&str]) -> Config {
    let backend_url = format!("http://{backend}");
    let mut args = vec![
        "chatgate",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend_url.as_str(),
    ];
    args.extend_from_slice(&["--health-interval", "0.2", "--log-format", "text"]);
    args.extend_from_slice(extra);
    let cli = Cli::parse_with(args, |_| None).expect("flags parse");
    Config::from_settings(&cli.settings).expect("config validates")
}

/// Like [`config`], in front of several backends (`--backend` as a list).
pub fn config_for_workers(backends: &[SocketAddr], extra: &[&str]) -> Config {
    let list: Vec<String> = backends.iter().map(|a| format!("http://{a}")).collect();
    let list = list.join(",");
    let mut args = vec!["chatgate", "--listen", "127.0.0.1:0", "--backend", &list];
    if !extra.contains(&"--health-interval") {
        args.extend_from_slice(&["--health-interval", "0.2"]);
    }
    args.extend_from_slice(&["--log-format", "text"]);
    args.extend_from_slice(extra);
    let cli = Cli::parse_with(args, |_| None).expect("flags parse");
    Config::from_settings(&cli.settings).expect("config validates")
}

/// chatgate running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener (metrics), also on a port chosen by the OS.
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(backend: SocketAddr, extra: &[&str]) -> Proxy {
        Proxy::start_with(config(backend, extra)).await
    }

    pub async fn start_with(config: Config) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Proxy::start_on(listener, config).await
    }

    /// Like `start_with`, serving on a listener the caller bound (another address family,
    /// say); the admin listener stays on 127.0.0.1.
    pub async fn start_on(listener: TcpListener, config: Config) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin = admin_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let stop_signal = async {
            let _ = stopped.await;
        };
        let handle = tokio::spawn(chatgate::server::run(
            config,
            listener,
            Some(admin_listener),
            stop_signal,
        ));
        Proxy {
            addr,
            admin,
            stop: Some(stop),
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until `/monitor/health` says 200 (the probe has seen the backend).
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = get(self.addr, "/monitor/health").await {
                if r.status == StatusCode::OK {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the graceful shutdown (as SIGTERM would) and returns the server task.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and waits (bounded) for the server to return.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(30), &mut self.handle)
            .await
            .expect("server stops within its grace")
            .expect("server task");
    }

    pub fn handle(&mut self) -> &mut JoinHandle<()> {
        &mut self.handle
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// An HTTP/1.1 fixture backend serving `handler` on 127.0.0.1:0, counting connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// Requests other than the proxy's health probes (`GET /health`).
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(listener, handler, None)
    }

    /// Like `start`, on a listener the caller bound (to restart on the same port).
    pub fn serve(listener: TcpListener, handler: Handler, idle_close: Option<Duration>) -> Backend {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let requests = Arc::new(AtomicUsize::new(0));
        let request_counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = Arc::clone(&handler);
                let request_counter = Arc::clone(&request_counter);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        if req.uri().path() != "/health" {
                            request_counter.fetch_add(1, Ordering::SeqCst);
                        }
                        let handler = Arc::clone(&handler);
                        async move { Ok::<_, Infallible>(handler(req).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.timer(hyper_util::rt::TokioTimer::new());
                    if let Some(idle) = idle_close {
                        // Like uvicorn's keep-alive timeout: close connections idle this long.
                        builder.header_read_timeout(idle);
                    }
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend {
            addr,
            connections,
            requests,
            task,
        }
    }

    pub async fn start_closing_idle(handler: Handler, idle: Duration) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(listener, handler, Some(idle))
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn text(status: u16, body: &'static str) -> Response<TestBody> {
    Response::builder().status(status).body(full(body)).unwrap()
}

/// A body sent as `chunks`, with `gap` between them.
pub fn slow_body(chunks: Vec<Bytes>, gap: Duration) -> TestBody {
    let stream = futures_util::stream::unfold(chunks.into_iter(), move |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(gap).await;
        Some((Ok::<_, std::io::Error>(Frame::data(next)), it))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A backend answering every request with `200 hello` and echoing the request head as
/// `x-echo-*` response headers (so tests can see what reached the backend).
pub async fn echo_backend() -> Backend {
    Backend::start(handler(|req: Request<Incoming>| async move {
        let mut response = Response::builder().status(200);
        for (name, value) in req.headers() {
            response = response.header(format!("x-echo-{name}"), value);
        }
        response = response.header("x-echo-uri", req.uri().to_string());
        response = response.header("x-echo-method", req.method().as_str());
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        response.body(full(body)).unwrap()
    }))
    .await
}

/// A raw TCP backend: `script` gets each accepted connection.
pub async fn raw_backend<F, Fut>(script: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let script = Arc::clone(&script);
            tokio::spawn(async move { script(stream).await });
        }
    });
    (addr, task)
}

/// Reads an HTTP request head from a raw socket (up to the blank line).
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(DEADLINE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An address on which nothing listens (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Sends `req` on a fresh connection (no pooling, no redirects followed).
pub async fn send(addr: SocketAddr, req: Request<TestBody>) -> Result<Reply, String> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

pub fn request(method: &str, addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, String> {
    send(addr, request("GET", addr, path).body(full("")).unwrap()).await
}

/// A pooled client, for tests about connection reuse.
pub fn pooled_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>
{
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Writes raw bytes and reads until the peer closes or `DEADLINE`.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `check` until it holds or the deadline passes.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub mod ws;
