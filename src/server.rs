//! The serve loop: accept connections, serve HTTP/1.1 with upgrades, and shut down
//! gracefully: readiness 503 at once, accept for `shutdown_delay` more, then let in-flight
//! requests finish and relays close with 1001, all within `shutdown_grace`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::responses::TOO_MANY_CONNECTIONS;
use crate::state::Gateway;

/// Serves on `listener` (and the metrics on `admin`) until `stop` resolves, then drains.
/// Returns when every connection and relay has finished or the grace period is over.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    stop: impl Future<Output = ()>,
) {
    let grace = config.shutdown.grace;
    let delay = config.shutdown.delay;
    let gateway = Arc::new(Gateway::new(config));
    let backends = gateway.start_backends();
    let probe_stop = CancellationToken::new();
    tokio::spawn(housekeeping(Arc::clone(&gateway), probe_stop.clone()));
    if let Some(admin) = admin {
        tokio::spawn(crate::admin::serve(
            admin,
            Arc::clone(&gateway),
            probe_stop.clone(),
        ));
    }
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gateway.config.server.header_read_timeout)
        .max_headers(gateway.config.server.max_headers)
        .max_header_size(gateway.config.server.max_header_bytes)
        .keep_alive(true);
    let http = Arc::new(http);
    tracing::info!(
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        backend = gateway.config.backend.url.display.as_str(),
        workers = gateway.workers.len(),
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

    gateway.set_draining();
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
    // The workers chatgate started go last: what was in flight to them has drained.
    backends.stop().await;
    probe_stop.cancel();
    tracing::info!("stopped");
}

/// Periodic upkeep off the request path: fold metric samples into histograms and forget
/// rate-limit state of clients that went quiet.
async fn housekeeping(gateway: Arc<Gateway>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        gateway.metrics.upkeep();
        gateway.limits.forget_idle_clients();
    }
}

async fn accept(
    gateway: &Arc<Gateway>,
    http: &Arc<http1::Builder>,
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
) {
    match accepted {
        Ok((stream, peer)) => {
            let Ok(slot) = Arc::clone(&gateway.connection_slots).try_acquire_owned() else {
                gateway.metrics.refused_connection();
                // Counted in the metrics; a line per refusal would turn a flood into a log flood.
                tracing::debug!(client = %peer, limit = gateway.config.limits.max_connections, "connection limit reached");
                tokio::spawn(refuse(stream));
                return;
            };
            let _ = stream.set_nodelay(true);
            gateway.tasks.spawn(serve_connection(
                Arc::clone(gateway),
                Arc::clone(http),
                stream,
                peer,
                slot,
            ));
        }
        Err(e) => {
            // Out of file descriptors or a transient network error: back off, don't spin.
            tracing::error!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(TOO_MANY_CONNECTIONS),
    )
    .await;
}

async fn serve_connection(
    gateway: Arc<Gateway>,
    http: Arc<http1::Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    // Held for the connection's life: the connection limit.
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let counted = gateway.load.client_connection();
    let shutdown = gateway.shutdown.clone();
    let service = service_fn(move |req| crate::gateway::handle(Arc::clone(&gateway), req, peer));
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
    drop(counted);
}
