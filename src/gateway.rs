//! The gateway: shared state, and one request's way through the route table to its handler.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::config::{AuthStubMode, Config};
use crate::error::{ProxyError, is_browser_navigation};
use crate::health::BackendState;
use crate::limits::{RateLimits, limit_class, origin_allowed};
use crate::metrics::{Metrics, RouteClass};
use crate::proxy::client::{BackendClient, backend_client};
use crate::proxy::headers::{
    X_REQUEST_ID, client_addr, harden_cookies, is_sane_request_id, is_trusted, new_request_id,
};
use crate::proxy::{forward, websocket};
use crate::routes::{Route, chat_redirect_location, classify, is_probe, socketio_backend_path};
use crate::telemetry::AccessLog;

/// Everything a request handler needs, shared by all connections.
pub struct Gateway {
    pub config: Config,
    pub client: BackendClient,
    /// TLS for the WebSocket leg to an `https://` backend.
    pub tls: Arc<rustls::ClientConfig>,
    pub backend: Arc<BackendState>,
    /// Cancelled on shutdown: connections drain, relays close with 1001.
    pub shutdown: CancellationToken,
    /// Client connections and WebSocket relays, waited for on shutdown.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    pub limits: RateLimits,
    /// One permit per open client connection (`--max-connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
}

/// Per-request facts computed once at the door.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub peer: IpAddr,
    pub trusted_peer: bool,
    pub client: IpAddr,
    pub request_id: HeaderValue,
    pub uri: http::Uri,
}

impl RequestContext {
    pub fn path(&self) -> &str {
        self.uri.path()
    }
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        let limits = RateLimits::new(
            config.rate_limit_http,
            config.rate_limit_websocket,
            config.rate_limit_engineio,
        );
        let connection_slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
        Gateway {
            client: backend_client(&config),
            tls: Arc::new(crate::proxy::client::tls_config()),
            config,
            backend: Arc::new(BackendState::default()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            metrics: Arc::new(Metrics::new()),
            limits,
            connection_slots,
        }
    }

    /// Answers one request. Never fails: every error becomes a response here, and every
    /// response carries the request id and its access line.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let peer_ip = peer.ip();
        let trusted_peer = is_trusted(peer_ip, &self.config.trusted_proxies);
        let request_id = req
            .headers()
            .get(&X_REQUEST_ID)
            .filter(|v| is_sane_request_id(v))
            .cloned()
            .unwrap_or_else(new_request_id);
        let ctx = RequestContext {
            peer: peer_ip,
            trusted_peer,
            client: client_addr(peer_ip, req.headers(), &self.config.trusted_proxies),
            request_id,
            uri: req.uri().clone(),
        };
        let method = req.method().clone();
        let route = classify(req.uri().path());
        let probe = is_probe(route);
        let upgrade = websocket::is_upgrade_request(&req);
        let class = route_class(route, upgrade);
        let browser = is_browser_navigation(req.method(), req.headers());
        let result = match self.admit(&req, &ctx, route, upgrade) {
            Ok(()) => self.dispatch(req, &ctx).await,
            Err(refusal) => Err(refusal),
        };
        let mut response = match result {
            Ok(response) => response,
            Err(error) => {
                if let ProxyError::RateLimited(_) = error {
                    // Counted in admit(); a flood must not flood the log too.
                } else if !matches!(
                    error,
                    ProxyError::BadRequest(_)
                        | ProxyError::MethodNotAllowed
                        | ProxyError::Draining
                        | ProxyError::Overloaded
                        | ProxyError::ForbiddenOrigin
                        | ProxyError::PayloadTooLarge(_)
                        | ProxyError::RequestBodyTimeout(_)
                ) {
                    tracing::warn!(error = %error, path = ctx.path(), request_id = ctx.request_id.to_str().unwrap_or("-"), "backend exchange failed");
                }
                error.into_response(browser)
            }
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
        if self.config.harden_cookies {
            harden_cookies(response.headers_mut());
        }
        let status = response.status().as_u16();
        if status == 101 {
            // The relay writes its own line when it ends.
            let seconds = started.elapsed().as_secs_f64();
            self.metrics.request(class, &method, status, seconds, 0);
        } else {
            response.body_mut().set_log(AccessLog {
                metrics: Arc::clone(&self.metrics),
                route: class,
                method,
                uri: ctx.uri,
                status,
                started,
                request_id: ctx.request_id,
                client: ctx.client,
                bytes_out: 0,
                probe,
                completed: false,
                error: None,
            });
        }
        Ok(response)
    }

    /// The checks before any work: the client's rate, the request's origin, its size.
    fn admit(
        &self,
        req: &Request<Incoming>,
        ctx: &RequestContext,
        route: Route<'_>,
        upgrade: bool,
    ) -> Result<(), ProxyError> {
        let path = req.uri().path();
        let engineio = matches!(route, Route::SocketIo { .. })
            || is_engineio(path, req.uri().query(), &self.config.socketio_path);
        if self.limits.is_enabled() {
            let probe = is_probe(route);
            if let Some(class) = limit_class(path, req.uri().query(), upgrade, engineio, probe) {
                if let Err(wait) = self.limits.check(class, ctx.client) {
                    self.metrics.rate_limited(class);
                    return Err(ProxyError::RateLimited(wait));
                }
            }
        }
        if (upgrade || engineio) && !origin_allowed(req.headers(), &self.config.allowed_origins) {
            return Err(ProxyError::ForbiddenOrigin);
        }
        Ok(())
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        ctx: &RequestContext,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        check_request_target(&req)?;
        match classify(req.uri().path()) {
            Route::Live => {
                only_get_or_head(req.method())?;
                Ok(json_response(
                    StatusCode::OK,
                    Bytes::from_static(b"{\"status\":\"alive\"}\n"),
                ))
            }
            Route::Health => {
                only_get_or_head(req.method())?;
                let (status, doc) = self.backend.document(&self.config.backend.display);
                Ok(json_response(status, Bytes::from(format!("{doc}\n"))))
            }
            Route::ChatRedirect { rest } => {
                let location = chat_redirect_location(rest, req.uri().query());
                Response::builder()
                    .status(self.config.chat_redirect_status)
                    .header(header::LOCATION, location)
                    .header(header::CACHE_CONTROL, "no-store")
                    .body(ProxyBody::empty())
                    .map_err(|_| ProxyError::BadRequest("unusable redirect target"))
            }
            Route::AuthConfig => self.auth_config(req, ctx).await,
            Route::SocketIo { rest } => {
                let mut path = socketio_backend_path(&self.config.socketio_path, rest);
                if let Some(query) = req.uri().query() {
                    path.push('?');
                    path.push_str(query);
                }
                let pq = PathAndQuery::try_from(path)
                    .map_err(|_| ProxyError::BadRequest("unusable request target"))?;
                self.to_backend(req, ctx, Some(pq)).await
            }
            Route::Backend => self.to_backend(req, ctx, None).await,
        }
    }

    async fn to_backend(
        &self,
        req: Request<Incoming>,
        ctx: &RequestContext,
        path_and_query: Option<PathAndQuery>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if websocket::is_upgrade_request(&req) {
            return websocket::relay(self, req, ctx, path_and_query).await;
        }
        forward::forward(self, req, ctx, path_and_query).await
    }

    async fn auth_config(
        &self,
        req: Request<Incoming>,
        ctx: &RequestContext,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let stub = || json_response(StatusCode::OK, self.config.auth_stub_body.clone());
        match self.config.auth_stub {
            AuthStubMode::Off => self.to_backend(req, ctx, None).await,
            AuthStubMode::On => {
                only_get_or_head(req.method())?;
                Ok(stub())
            }
            AuthStubMode::Auto => {
                let get = req.method() == Method::GET;
                match self.to_backend(req, ctx, None).await {
                    Ok(r)
                        if get
                            && (r.status().is_server_error()
                                || r.status() == StatusCode::NOT_FOUND) =>
                    {
                        Ok(stub())
                    }
                    Err(_) if get => Ok(stub()),
                    other => other,
                }
            }
        }
    }
}

/// Refuses what a reverse proxy must not serve: `CONNECT` (a tunnel to anywhere) and
/// absolute-form requests for another host than the one named in `Host`.
fn check_request_target<B>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    // RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    // HTTP/1.1 request message that lacks a Host header field and to any request message
    // that contains more than one Host header field".
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if first.is_none() && req.version() == http::Version::HTTP_11 {
        return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
    }
    if let Some(authority) = req.uri().authority() {
        let host = req.headers().get(header::HOST).map(HeaderValue::as_bytes);
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes())) {
            return Err(ProxyError::BadRequest(
                "absolute-form request for another host",
            ));
        }
    }
    Ok(())
}

/// Whether a request is for the backend's Engine.IO endpoint. The backend (uvicorn) routes on
/// the percent-decoded path, so `/ws/socket%2Eio/` must count as `/ws/socket.io/`; and any
/// request carrying Engine.IO's `EIO` parameter is treated as one.
fn is_engineio(path: &str, query: Option<&str>, mount: &str) -> bool {
    let eio_query = query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("EIO=")));
    if eio_query || path.starts_with(mount) {
        return true;
    }
    path.contains('%')
        && percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .starts_with(mount)
}

fn route_class(route: Route<'_>, upgrade: bool) -> RouteClass {
    match route {
        _ if upgrade => RouteClass::WebSocket,
        Route::Live => RouteClass::Live,
        Route::Health => RouteClass::Health,
        Route::ChatRedirect { .. } => RouteClass::ChatRedirect,
        Route::AuthConfig => RouteClass::AuthConfig,
        Route::SocketIo { .. } => RouteClass::SocketIo,
        Route::Backend => RouteClass::Backend,
    }
}

fn only_get_or_head(method: &Method) -> Result<(), ProxyError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(ProxyError::MethodNotAllowed)
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engineio_is_recognised_however_the_path_is_spelled() {
        let mount = "/ws/socket.io/";
        assert!(is_engineio(
            "/ws/socket.io/",
            Some("EIO=4&transport=polling"),
            mount
        ));
        assert!(is_engineio("/ws/socket%2Eio/", None, mount));
        assert!(is_engineio("/ws/socket%2eio/", None, mount));
        assert!(is_engineio(
            "/elsewhere",
            Some("transport=polling&EIO=4"),
            mount
        ));
        assert!(!is_engineio("/", None, mount));
        assert!(!is_engineio("/assets/socket.io.js", Some("v=1"), mount));
    }

    #[test]
    fn connect_and_foreign_absolute_form_are_refused() {
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("evil.example:443")
            .body(())
            .unwrap();
        assert!(matches!(
            check_request_target(&connect),
            Err(ProxyError::MethodNotAllowed)
        ));
        let foreign = Request::builder()
            .uri("http://evil.example/")
            .header(header::HOST, "chat.example")
            .body(())
            .unwrap();
        assert!(matches!(
            check_request_target(&foreign),
            Err(ProxyError::BadRequest(_))
        ));
        let own = Request::builder()
            .uri("http://chat.example/x")
            .header(header::HOST, "chat.example")
            .body(())
            .unwrap();
        assert!(check_request_target(&own).is_ok());
    }
}
