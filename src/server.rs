//! The serve loop: accept connections, serve HTTP/1.1 with upgrades, and shut down
//! gracefully: readiness 503 at once, accept for `shutdown_delay` more, then let in-flight
//! requests finish and relays close with 1001, all within `shutdown_grace`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::health::BackendProbe;

/// Serves on `listener` until `stop` resolves, then drains. Returns when every connection
/// and relay has finished or the grace period is over.
pub async fn run(config: Config, listener: TcpListener, stop: impl Future<Output = ()>) {
    let grace = config.shutdown_grace;
    let delay = config.shutdown_delay;
    let probe = BackendProbe::new(&config);
    let gateway = Arc::new(Gateway::new(config));
    let probe_stop = CancellationToken::new();
    tokio::spawn(probe.run(Arc::clone(&gateway.backend), probe_stop.clone()));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gateway.config.header_read_timeout)
        .max_headers(gateway.config.max_headers)
        .max_header_size(gateway.config.max_header_bytes)
        .keep_alive(true);
    let http = Arc::new(http);
    tracing::info!(
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        backend = gateway.config.backend.display.as_str(),
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );

    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accept(&gateway, &http, accepted).await,
        }
    }

    gateway.backend.set_draining();
    tracing::info!(
        delay_s = delay.as_secs_f64(),
        grace_s = grace.as_secs_f64(),
        "draining: readiness is 503"
    );
    if !delay.is_zero() {
        let until = tokio::time::sleep(delay);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = &mut until => break,
                accepted = listener.accept() => accept(&gateway, &http, accepted).await,
            }
        }
    }
    drop(listener);
    gateway.shutdown.cancel();
    gateway.tasks.close();
    if tokio::time::timeout(grace, gateway.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = gateway.tasks.len(),
            "grace period over; closing what is left"
        );
    }
    probe_stop.cancel();
    tracing::info!("stopped");
}

async fn accept(
    gateway: &Arc<Gateway>,
    http: &Arc<http1::Builder>,
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
) {
    match accepted {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            gateway.tasks.spawn(serve_connection(
                Arc::clone(gateway),
                Arc::clone(http),
                stream,
                peer,
            ));
        }
        Err(e) => {
            // Out of file descriptors or a transient network error: back off, don't spin.
            tracing::error!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Counts an open client connection for the health document while alive.
struct ConnectionGuard(Arc<Gateway>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0
            .backend
            .client_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    gateway: Arc<Gateway>,
    http: Arc<http1::Builder>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    gateway
        .backend
        .client_connections
        .fetch_add(1, Ordering::Relaxed);
    let guard = ConnectionGuard(Arc::clone(&gateway));
    let shutdown = gateway.shutdown.clone();
    let service = service_fn(move |req| Arc::clone(&gateway).handle(req, peer));
    let connection = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, client = %peer, "client connection ended with an error");
    }
    drop(guard);
}
