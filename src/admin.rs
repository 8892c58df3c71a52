//! The admin listener: `/monitor/metrics` (Prometheus text) and the probe routes, on a port
//! the public ingress does not expose. The public port never serves metrics.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::monitor::{self, Probe};
use crate::responses;
use crate::state::Gateway;

/// Serves the admin routes until `stop` is cancelled.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, stop: CancellationToken) {
    tracing::info!(
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        "admin listening"
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gateway.config.server.header_read_timeout);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let gateway = Arc::clone(&gateway);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, Infallible>(answer(&gateway, &req)) }
            }),
        );
        tokio::spawn(connection);
    }
}

fn answer(gateway: &Gateway, req: &Request<Incoming>) -> Response<ProxyBody> {
    let result = match req.uri().path() {
        "/monitor/live" => monitor::answer(Probe::Live, req.method(), gateway),
        "/monitor/health" => monitor::answer(Probe::Health, req.method(), gateway),
        "/monitor/metrics" if req.method() == Method::GET || req.method() == Method::HEAD => {
            Ok(responses::with_type(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(gateway.metrics.render(gateway.gauges())),
            ))
        }
        "/monitor/metrics" => Err(ProxyError::MethodNotAllowed),
        _ => Ok(responses::text(StatusCode::NOT_FOUND, "not found\n")),
    };
    result.unwrap_or_else(|error| error.into_response(false))
}
