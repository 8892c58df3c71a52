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
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::backend::owned::OwnedBackend;
use crate::client_io::{ClientIo, ConnectionWatch, FramingCheck, HeadClock};
use crate::config::Config;
use crate::gateway::Connection;
use crate::metrics::MetricsHandle;
use crate::proxy::headers::peer_value;
use crate::responses::TOO_MANY_CONNECTIONS;
use crate::state::{Gateway, PROBE_RESERVE};

/// The two ways of serving a connection: keep-alive for ordinary ones; one request, then
/// close, for one admitted from the probe reserve (so that a reserve slot is never held
/// by an idle connection for longer than one exchange).
struct Builders {
    normal: http1::Builder,
    reserve: http1::Builder,
}

/// The connection slot a connection holds for its life, and where it came from.
struct Slot {
    _permit: OwnedSemaphorePermit,
    /// From the probe reserve, beyond `--max-connections`.
    reserve: bool,
}

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
    let builder = |keep_alive: bool| {
        let mut http = http1::Builder::new();
        // The header read timeout is the socket's own (`client_io`'s head clock): hyper's
        // boxes and registers a timer per request.
        http.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_headers(gateway.config.server.max_headers)
            .max_header_size(gateway.config.server.max_header_bytes)
            .keep_alive(keep_alive);
        http
    };
    let http = Arc::new(Builders {
        normal: builder(true),
        reserve: builder(false),
    });
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
        gateway.chat.limits.forget_idle_clients();
        gateway.chat.polling.expire(tokio::time::Instant::now());
        for worker in gateway.workers.all() {
            worker.idle.expire();
        }
    }
}

async fn accept(
    gateway: &Arc<Gateway>,
    http: &Arc<Builders>,
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
) {
    match accepted {
        Ok((stream, peer)) => {
            let slot = match Arc::clone(&gateway.connection_slots).try_acquire_owned() {
                Ok(permit) => Slot {
                    _permit: permit,
                    reserve: false,
                },
                Err(_) => match Arc::clone(&gateway.probe_slots).try_acquire_owned() {
                    Ok(permit) => {
                        gateway.metrics.probe_reserve_connection();
                        Slot {
                            _permit: permit,
                            reserve: true,
                        }
                    }
                    Err(_) => {
                        gateway.metrics.refused_connection();
                        // Counted in the metrics; a line per refusal would turn a flood into a log flood.
                        tracing::debug!(client = %peer, limit = gateway.config.limits.max_connections, reserve = PROBE_RESERVE, "connection limit reached");
                        tokio::spawn(refuse(stream));
                        return;
                    }
                },
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
    http: Arc<Builders>,
    stream: TcpStream,
    peer: SocketAddr,
    // Held for the connection's life: the connection limit.
    slot: Slot,
) {
    let counted = gateway.load.client_connection();
    let metrics = Arc::clone(&gateway.metrics);
    let server = &gateway.config.server;
    let watch = Arc::new(ConnectionWatch::default());
    let log_metrics = MetricsHandle::new(Arc::clone(&gateway.metrics));
    let io = ClientIo::new(
        stream,
        Arc::clone(&watch),
        FramingCheck::new(server.max_header_bytes, server.max_headers),
        gateway.config.backend.body_idle_timeout,
    );
    let mut head_clock = HeadClock::new(
        server.header_read_timeout,
        Arc::clone(&watch),
        log_metrics.clone(),
    );
    let reserve = slot.reserve;
    let http = if reserve { &http.reserve } else { &http.normal };
    // The backend connection this client connection's requests go out on, run in this
    // task beside the client connection (see `backend/owned.rs`).
    let owned = OwnedBackend::default();
    // Each request's future borrows what the connection shares from this task, so a
    // request writes no reference count on the shared `Gateway` (a cache line that would
    // pass between cores with every request).
    let conn = Connection {
        gw: &gateway,
        peer,
        peer_value: peer_value(peer.ip()),
        owned: &owned,
        metrics: &log_metrics,
        watch: &watch,
        reserve,
    };
    let service = {
        let conn = &conn;
        service_fn(move |req| crate::gateway::handle(conn, req))
    };
    let connection = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let backend = owned.drive();
    tokio::pin!(backend);
    // Made once: a `cancelled()` made in the loop would join and leave the token's waiter
    // list on every wake-up of the connection (two locks per request).
    let cancelled = gateway.shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut draining = false;
    let result = loop {
        tokio::select! {
            // The client connection first: a request it hands to the backend connection is
            // then written in the same wake-up.
            biased;
            result = connection.as_mut() => break result,
            never = backend.as_mut() => match never {},
            () = cancelled.as_mut(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
            timeout = std::future::poll_fn(|cx| head_clock.poll(cx)) => {
                // Dropping the connection closes the socket, as hyper's own timeout did.
                tracing::debug!(client = %peer, timeout = ?timeout, "no request head within the header read timeout: closing");
                break Ok(());
            }
        }
    };
    if watch.was_stalled() {
        metrics.stalled_client();
    }
    if let Err(e) = result {
        tracing::debug!(error = %e, client = %peer, "client connection ended with an error");
    }
    drop(counted);
    drop(slot);
}
