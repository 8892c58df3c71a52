//! The admin listener: `/monitor/metrics` (Prometheus text) and the health routes, on a
//! port the public ingress does not expose. The public port never serves metrics.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::gateway::Gateway;

/// Serves the admin routes until `stop` is cancelled.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>, stop: CancellationToken) {
    tracing::info!(
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        "admin listening"
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(gateway.config.header_read_timeout);
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
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"method not allowed\n"),
        );
    }
    match req.uri().path() {
        "/monitor/metrics" => plain(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(gateway.metrics.render(&gateway.backend)),
        ),
        "/monitor/health" => {
            let (status, doc) = gateway.backend.document(&gateway.config.backend.display);
            plain(status, "application/json", Bytes::from(format!("{doc}\n")))
        }
        "/monitor/live" => plain(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"{\"status\":\"alive\"}\n"),
        ),
        _ => plain(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    }
}

fn plain(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
