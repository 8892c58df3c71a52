//! The floor of a proxy built on hyper and tokio-tungstenite: the least a hyper HTTP/1.1
//! server plus a hyper client can do per proxied request, and the least a tokio-tungstenite
//! relay can do per relayed message (no routing, headers, limits, metrics, logs, chat reader
//! or keep-alive), to measure chatgate's CPU against (`bench/NOTES.md`, issue 12).
//!
//! hyper-floor --listen 127.0.0.1:18090 --backend 127.0.0.1:18080 [--pool] [--threads N]
//!
//! Default: each client connection owns one backend connection, driven in the same task
//! (chatgate's design). `--pool`: hyper-util's pooled client instead (chatgate before it).
//! A WebSocket upgrade (owned mode) gets its 101 from hyper and is relayed message by
//! message to a backend leg opened with tokio-tungstenite's client handshake, both legs with
//! chatgate's buffer sizes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:18080")]
    backend: SocketAddr,
    /// hyper-util's pooled client instead of a backend connection per client connection.
    #[arg(long)]
    pool: bool,
    /// Runtime threads (1: current-thread runtime; 0: as chatgate picks, current-thread on
    /// one CPU, else multi-thread with one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// One current-thread runtime per CPU, each with its own SO_REUSEPORT listener and
    /// accept loop (thread per core), instead of one runtime.
    #[arg(long)]
    per_core: bool,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    if args.per_core {
        return per_core(args);
    }
    // As chatgate picks (src/main.rs): current-thread only when one CPU is known.
    let one_cpu = matches!(std::thread::available_parallelism(), Ok(n) if n.get() == 1);
    let runtime = if args.threads == 0 && !one_cpu {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        chatgate_bench::runtime(args.threads.max(1))?
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let pool: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let backend = args.backend;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        if args.pool {
            let pool = pool.clone();
            tokio::spawn(async move {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let pool = pool.clone();
                    async move {
                        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        if let Ok(uri) = format!("http://{backend}{pq}").parse::<Uri>() {
                            *req.uri_mut() = uri;
                        }
                        pool.request(req).await
                    }
                });
                let _ = server::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        } else {
            tokio::spawn(owned(stream, backend));
        }
    }
}

/// Thread per core: each thread accepts on its own `SO_REUSEPORT` socket (the kernel spreads
/// new connections over them) and serves its connections on a current-thread runtime.
fn per_core(args: Args) -> std::io::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cpus)
        .map(|_| {
            let (listen, backend) = (args.listen, args.backend);
            std::thread::spawn(move || -> std::io::Result<()> {
                chatgate_bench::runtime(1)?.block_on(async move {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.set_reuseport(true)?;
                    socket.bind(listen)?;
                    let listener = socket.listen(1024)?;
                    loop {
                        let (stream, _) = listener.accept().await?;
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(owned(stream, backend));
                    }
                })
            })
        })
        .collect();
    for thread in threads {
        if let Ok(Err(e)) = thread.join() {
            return Err(e);
        }
    }
    Ok(())
}

/// One client connection with its own backend connection, both driven by this task.
async fn owned(stream: TcpStream, backend: SocketAddr) {
    let Ok(upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let Ok((sender, conn)) = client::handshake::<_, Incoming>(TokioIo::new(upstream)).await else {
        return;
    };
    let sender = Arc::new(Mutex::new(sender));
    let service = service_fn(move |mut req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        async move {
            if req.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
                return Ok(upgrade(req, backend).map(|b| Either::Right(b.map_err(|e| match e {}))));
            }
            if let Some(pq) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = Uri::from(pq);
            }
            let response = sender
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send_request(req);
            Ok::<_, hyper::Error>(response.await?.map(Either::Left))
        }
    });
    let connection = server::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::pin!(conn);
    tokio::select! {
        biased;
        _ = connection.as_mut() => {}
        // The backend closed (a client's `Connection: close` reaches it unchanged): the
        // answer it sent is still to be written to the client.
        _ = conn.as_mut() => {
            let _ = connection.await;
        }
    }
}

/// chatgate's relay buffers (`src/proxy/websocket/mod.rs`): 512-byte reads, 8 KiB of writes
/// gathered.
fn relay_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(8 * 1024)
}

/// Answers a WebSocket upgrade with 101 and relays it, once hyper hands the connection over,
/// to a backend leg at the same path.
fn upgrade(mut req: Request<Incoming>, backend: SocketAddr) -> Response<Empty<Bytes>> {
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY);
    let Some(accept) =
        key.and_then(|k| HeaderValue::from_str(&derive_accept_key(k.as_bytes())).ok())
    else {
        let mut refused = Response::new(Empty::new());
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return refused;
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (Ok(upgraded), Ok(tcp)) = (on_upgrade.await, TcpStream::connect(backend).await) else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let url = format!("ws://{backend}{path}");
        let Ok((backend_leg, _)) =
            tokio_tungstenite::client_async_with_config(url, tcp, Some(relay_config())).await
        else {
            return;
        };
        let client_leg = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(relay_config()),
        )
        .await;
        relay(client_leg, backend_leg).await;
    });
    let mut response = Response::new(Empty::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// Each message read on one leg is sent on the other, until either ends.
async fn relay<A, B>(mut client: WebSocketStream<A>, mut backend: WebSocketStream<B>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let sent = tokio::select! {
            message = client.next() => match message {
                Some(Ok(message)) => backend.send(message).await,
                _ => return,
            },
            message = backend.next() => match message {
                Some(Ok(message)) => client.send(message).await,
                _ => return,
            },
        };
        if sent.is_err() {
            return;
        }
    }
}
