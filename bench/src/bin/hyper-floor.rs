//! The floor of a proxy built on hyper: the least a hyper HTTP/1.1 server plus a hyper
//! client can do per proxied request (no routing, headers, limits, metrics or logs), to
//! measure chatgate's per-request CPU against (`bench/NOTES.md`, issue 12).
//!
//! hyper-floor --listen 127.0.0.1:18090 --backend 127.0.0.1:18080 [--pool] [--threads N]
//!
//! Default: each client connection owns one backend connection, driven in the same task
//! (chatgate's design). `--pool`: hyper-util's pooled client instead (chatgate before it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:18080")]
    backend: SocketAddr,
    /// hyper-util's pooled client instead of a backend connection per client connection.
    #[arg(long)]
    pool: bool,
    /// Runtime threads (1: current-thread runtime; 0: multi-thread with one per CPU).
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
    let runtime = if args.threads == 0 {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        chatgate_bench::runtime(args.threads)?
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
                        Ok::<_, hyper_util::client::legacy::Error>(pool.request(req).await?)
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
            if let Some(pq) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = Uri::from(pq);
            }
            let response = sender
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send_request(req);
            Ok::<Response<Incoming>, hyper::Error>(response.await?)
        }
    });
    let connection = server::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            biased;
            _ = connection.as_mut() => return,
            _ = conn.as_mut() => return,
        }
    }
}
