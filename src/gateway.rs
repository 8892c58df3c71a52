//! The request pipeline: one request's way from the door (what the connection knows about
//! it, context, admission) through the route table to its handler, and its answer's
//! way back (request id, cookies, access line, and what it means for the connection: a 101
//! hands the socket over, an answer to a chunked request closes it).
//! The shared state it reads is in `state.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::backend::affinity::{engineio_request, unknown_session};
use crate::backend::owned::OwnedBackend;
use crate::backend::pool::{Routing, Target};
use crate::body::ProxyBody;
use crate::client_io::ConnectionWatch;
use crate::config::AuthStubMode;
use crate::error::ProxyError;
use crate::limits::{limit_class, origin_allowed};
use crate::metrics::{MetricsHandle, RouteClass};
use crate::monitor::{self, Probe};
use crate::proxy::headers::{
    HeadFacts, X_FORWARDED_PROTO, X_REQUEST_ID, client_addr, harden_cookies, is_trusted,
    new_request_id,
};
use crate::proxy::{RequestContext, forward, websocket};
use crate::responses;
use crate::routes::{Route, chat_redirect_location, classify, is_probe, socketio_backend_path};
use crate::state::Gateway;
use crate::telemetry::AccessLog;

/// What a client connection's requests share, borrowed by each request's future from the
/// connection's task: a request writes no count on the shared `Gateway` or `Metrics` (the
/// access line's [`MetricsHandle`] counts in the connection's own allocation).
pub struct Connection<'a> {
    pub gw: &'a Gateway,
    pub peer: SocketAddr,
    /// `peer` as its `X-Forwarded-For` entry ([`crate::proxy::headers::peer_value`]), made
    /// once.
    pub peer_value: HeaderValue,
    /// The backend connection this client connection's requests go out on.
    pub owned: &'a OwnedBackend,
    pub metrics: &'a MetricsHandle,
    /// What the connection's socket wrapper and its requests tell each other.
    pub watch: &'a Arc<ConnectionWatch>,
    /// Admitted beyond `--max-connections`, for the probes only.
    pub reserve: bool,
}

/// A request's answer, or the error that becomes it.
type Answer = Result<Response<ProxyBody>, ProxyError>;

/// The one future a request waits on, whatever serves it: the forwarder for an ordinary
/// request, a small wrapper for the rare routes, an answer already made for the rest. It
/// hands the request's context back with the answer, for the epilogue (the request id, the
/// access line).
type Work<'a> = Pin<Box<dyn Future<Output = (Answer, RequestContext)> + Send + 'a>>;

/// Answers one request. Never fails: every error becomes a response, and every response
/// carries the request id and its access line.
///
/// The route, the admission checks and the worker are decided here without waiting, and
/// what is left to wait for is one boxed future. A pipeline of nested `async fn`s (the
/// dispatch, the asset cache, the backend leg, each awaiting the next) copied each layer's
/// future into its parent on every request, and hyper moved the outermost into place
/// (bench/NOTES.md, issue 12).
pub fn handle<'a>(conn: &Connection<'a>, mut req: Request<Incoming>) -> Answering<'a> {
    let Connection {
        gw,
        peer,
        owned,
        metrics,
        watch,
        reserve,
        ..
    } = *conn;
    let facts = HeadFacts::of(req.method(), req.headers());
    let chunked = facts.transfer_encoding;
    // The socket's framing check found a head with both lengths, or lost the stream.
    let framing_conflict = chunked && watch.refuses_chunked();
    // A WebSocket relay tells the watch once it holds the socket (`proxy::websocket`): the
    // one thing the connection knows that leaves this module, so it rides on the request,
    // and only on an upgrade (an ordinary request allocates no extensions).
    if facts.upgrade_field {
        req.extensions_mut().insert(Arc::clone(watch));
    }
    let started = Instant::now();
    let browser = facts.browser_navigation;
    let hosts = facts.hosts;
    let ctx = context(gw, &req, peer, &conn.peer_value, facts);
    // The route borrows the context's URI, so it is computed once and handed down.
    let route = classify(ctx.uri.path());
    let probe = is_probe(route);
    let class = route_class(route, ctx.upgrade);
    let method = req.method().clone();
    let engineio = matches!(route, Route::SocketIo { .. })
        || is_engineio(ctx.path(), ctx.uri.query(), &gw.config.routes.socketio_path);
    let checked = admit(gw, &req, &ctx, probe, engineio, reserve)
        .and_then(|()| check_request_target(&req, hosts, framing_conflict));
    let work = match checked {
        Err(refusal) => answered(Err(refusal), ctx),
        Ok(()) => match route {
            Route::Live => answered(monitor::answer(Probe::Live, req.method(), gw), ctx),
            Route::Health => answered(monitor::answer(Probe::Health, req.method(), gw), ctx),
            Route::ChatRedirect { rest } => {
                let location = chat_redirect_location(rest, ctx.uri.query());
                let answer = HeaderValue::try_from(location)
                    .map_err(|_| ProxyError::BadRequest("unusable redirect target"))
                    .map(|location| {
                        responses::redirect(gw.config.routes.chat_redirect_status, location)
                    });
                answered(answer, ctx)
            }
            Route::AuthConfig => Box::pin(async move {
                let answer = auth_config(gw, owned, req, &ctx, engineio).await;
                (answer, ctx)
            }),
            Route::SocketIo { rest } => {
                let mut path = socketio_backend_path(&gw.config.routes.socketio_path, rest);
                if let Some(query) = ctx.uri.query() {
                    path.push('?');
                    path.push_str(query);
                }
                match PathAndQuery::try_from(path) {
                    Ok(pq) => backend(gw, owned, req, ctx, Some(pq), engineio),
                    Err(_) => answered(Err(ProxyError::BadRequest("unusable request target")), ctx),
                }
            }
            Route::Backend if gw.asset_cache.may_serve(&req) => Box::pin(async move {
                let fetch = |req| to_backend(gw, owned, req, &ctx, None, engineio);
                let answer = gw.asset_cache.serve(req, fetch).await;
                (answer, ctx)
            }),
            Route::Backend => backend(gw, owned, req, ctx, None, engineio),
        },
    };
    Answering {
        gw,
        metrics,
        watch,
        chunked,
        started,
        browser,
        probe,
        class,
        method,
        work,
    }
}

/// A request being answered (see [`handle`]): the future hyper holds per request, small
/// because all it waits on is behind one pointer.
pub struct Answering<'a> {
    gw: &'a Gateway,
    metrics: &'a MetricsHandle,
    watch: &'a Arc<ConnectionWatch>,
    /// The request's body is chunked: no request may follow it on this connection.
    chunked: bool,
    started: Instant,
    /// A browser loading a page: an error answers with HTML.
    browser: bool,
    probe: bool,
    class: RouteClass,
    method: Method,
    work: Work<'a>,
}

impl Future for Answering<'_> {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (answer, ctx) = ready!(this.work.as_mut().poll(cx));
        Poll::Ready(Ok(this.finish(answer, ctx)))
    }
}

impl Answering<'_> {
    /// The answer as it leaves: an error made a response, the request id, hardened
    /// cookies, what it means for the connection (a 101 hands the socket over; an answer to
    /// a chunked request closes it), and the access line riding on the body.
    fn finish(&mut self, answer: Answer, ctx: RequestContext) -> Response<ProxyBody> {
        let gw = self.gw;
        let mut response = answer.unwrap_or_else(|error| {
            if error.is_logged() {
                tracing::warn!(error = %error, path = ctx.path(), request_id = ctx.request_id.to_str().unwrap_or("-"), "backend exchange failed");
            }
            error.into_response(self.browser)
        });
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
        if gw.config.limits.harden_cookies {
            harden_cookies(response.headers_mut());
        }
        let status = response.status().as_u16();
        let method = std::mem::replace(&mut self.method, Method::GET);
        if status == 101 {
            self.watch.set_upgraded();
            // The relay writes its own line when it ends.
            let seconds = self.started.elapsed().as_secs_f64();
            gw.metrics.request(self.class, &method, status, seconds, 0);
        } else {
            if self.chunked {
                // The framing check does not follow chunked bodies (`client_io/framing.rs`):
                // no request may follow one on this connection.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response.body_mut().set_log(AccessLog {
                metrics: self.metrics.clone(),
                route: self.class,
                method,
                uri: ctx.uri,
                status,
                started: self.started,
                request_id: ctx.request_id,
                client: ctx.client,
                bytes_out: 0,
                probe: self.probe,
                completed: false,
                error: None,
            });
        }
        response
    }
}

/// An answer made at once, as the one future to wait on.
fn answered<'a>(answer: Answer, ctx: RequestContext) -> Work<'a> {
    Box::pin(std::future::ready((answer, ctx)))
}

/// The per-request facts every phase reads, computed once.
fn context(
    gw: &Gateway,
    req: &Request<Incoming>,
    peer: SocketAddr,
    peer_value: &HeaderValue,
    facts: HeadFacts,
) -> RequestContext {
    let peer = peer.ip();
    let trusted = &gw.config.limits.trusted_proxies;
    let request_id = facts.request_id.unwrap_or_else(new_request_id);
    RequestContext {
        peer_value: peer_value.clone(),
        trusted_peer: is_trusted(peer, trusted),
        client: client_addr(peer, req.headers(), trusted),
        request_id,
        uri: req.uri().clone(),
        upgrade: facts.websocket,
    }
}

/// The checks before any work: the connection's standing, the client's rate, the
/// request's origin.
fn admit(
    gw: &Gateway,
    req: &Request<Incoming>,
    ctx: &RequestContext,
    probe: bool,
    engineio: bool,
    reserve: bool,
) -> Result<(), ProxyError> {
    if !probe && reserve {
        // Admitted beyond --max-connections for the probes only.
        gw.metrics.refused_connection();
        return Err(ProxyError::Overloaded);
    }
    let path = ctx.path();
    let query = ctx.uri.query();
    if gw.limits.is_enabled() {
        if let Some(class) = limit_class(path, query, ctx.upgrade, engineio, probe) {
            if let Err(wait) = gw.limits.check(class, ctx.client) {
                gw.metrics.rate_limited(class.label());
                return Err(ProxyError::RateLimited(wait));
            }
        }
    }
    if (ctx.upgrade || engineio)
        && !origin_allowed(req.headers(), &gw.config.limits.allowed_origins)
    {
        return Err(ProxyError::ForbiddenOrigin);
    }
    Ok(())
}

/// Where a request for the backend goes, decided without waiting: its worker (see
/// `backend::pool` for how it is chosen), or an answer for an Engine.IO session whose
/// worker is gone.
enum Leg {
    DeadSession(String),
    Forward(Target, bool),
    Relay(Target, bool),
}

fn backend_leg(gw: &Gateway, req: &Request<Incoming>, ctx: &RequestContext, engineio: bool) -> Leg {
    let session = engineio_request(engineio, ctx.uri.query());
    let target = match gw.workers.route(req.headers(), session) {
        Routing::To(target) => target,
        Routing::DeadSession(sid) => return Leg::DeadSession(sid),
    };
    // Also when the cookie is only re-pointed later (the worker refused).
    let secure = gw.workers.several() && came_over_https(req.headers(), ctx);
    if ctx.upgrade {
        Leg::Relay(target, secure)
    } else {
        Leg::Forward(target, secure)
    }
}

/// A request for the backend, as the one future its answer waits on: the forwarder
/// itself (owning the context, so no layer sits between it and hyper), or the relay.
fn backend<'a>(
    gw: &'a Gateway,
    owned: &'a OwnedBackend,
    req: Request<Incoming>,
    ctx: RequestContext,
    path_and_query: Option<PathAndQuery>,
    engineio: bool,
) -> Work<'a> {
    match backend_leg(gw, &req, &ctx, engineio) {
        Leg::DeadSession(sid) => answered(Ok(unknown_session(&sid)), ctx),
        Leg::Forward(target, secure) => Box::pin(forward::forward(
            gw,
            owned,
            req,
            ctx,
            path_and_query,
            target,
            secure,
        )),
        Leg::Relay(target, secure) => Box::pin(async move {
            let answer = websocket::relay(gw, req, &ctx, path_and_query, target, secure).await;
            (answer, ctx)
        }),
    }
}

/// The backend leg awaited inside another step (the asset cache's fetch, the auth stub's
/// fallback), which keeps its own context: the forwarder gets a copy.
async fn to_backend(
    gw: &Gateway,
    owned: &OwnedBackend,
    req: Request<Incoming>,
    ctx: &RequestContext,
    path_and_query: Option<PathAndQuery>,
    engineio: bool,
) -> Answer {
    match backend_leg(gw, &req, ctx, engineio) {
        Leg::DeadSession(sid) => Ok(unknown_session(&sid)),
        // Boxed: the forwarder's and the relay's futures are large, and this one is
        // inlined into its callers'.
        Leg::Forward(target, secure) => {
            let forwarded =
                forward::forward(gw, owned, req, ctx.clone(), path_and_query, target, secure);
            Box::pin(forwarded).await.0
        }
        Leg::Relay(target, secure) => {
            Box::pin(websocket::relay(
                gw,
                req,
                ctx,
                path_and_query,
                target,
                secure,
            ))
            .await
        }
    }
}

/// Whether the client reached us over https: chatgate itself speaks plain HTTP, so only a
/// trusted proxy's `X-Forwarded-Proto` (its first entry: the client's side) can say so.
fn came_over_https(headers: &http::HeaderMap, ctx: &RequestContext) -> bool {
    ctx.trusted_peer
        && headers
            .get(&X_FORWARDED_PROTO)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

async fn auth_config(
    gw: &Gateway,
    owned: &OwnedBackend,
    req: Request<Incoming>,
    ctx: &RequestContext,
    engineio: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let routes = &gw.config.routes;
    let stub = || responses::json(StatusCode::OK, routes.auth_stub_body.clone());
    match routes.auth_stub {
        AuthStubMode::Off => to_backend(gw, owned, req, ctx, None, engineio).await,
        AuthStubMode::On => {
            only_get_or_head(req.method())?;
            Ok(stub())
        }
        AuthStubMode::Auto => {
            let get = req.method() == Method::GET;
            match to_backend(gw, owned, req, ctx, None, engineio).await {
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

/// Refuses what a reverse proxy must not serve: a request whose length is ambiguous,
/// `CONNECT` (a tunnel to anywhere) and absolute-form requests for another host than the
/// one named in `Host` (`hosts`: how many `Host` fields the request has, up to 2, counted
/// at the door; `framing_conflict`: the socket's framing check refuses the request's head).
fn check_request_target<B>(
    req: &Request<B>,
    hosts: u8,
    framing_conflict: bool,
) -> Result<(), ProxyError> {
    // RFC 9112 §6.1: a request with both Content-Length and Transfer-Encoding "MAY" be
    // rejected; it is how requests are smuggled past a proxy that reads the other length.
    // hyper drops the Content-Length before we see the request, so the socket's framing
    // check (`client_io`) reports it.
    if framing_conflict {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    // RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    // HTTP/1.1 request message that lacks a Host header field and to any request message
    // that contains more than one Host header field".
    if hosts > 1 {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if hosts == 0 && req.version() == http::Version::HTTP_11 {
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
            check_request_target(&connect, 0, false),
            Err(ProxyError::MethodNotAllowed)
        ));
        let foreign = Request::builder()
            .uri("http://evil.example/")
            .header(header::HOST, "chat.example")
            .body(())
            .unwrap();
        assert!(matches!(
            check_request_target(&foreign, 1, false),
            Err(ProxyError::BadRequest(_))
        ));
        let own = Request::builder()
            .uri("http://chat.example/x")
            .header(header::HOST, "chat.example")
            .body(())
            .unwrap();
        assert!(check_request_target(&own, 1, false).is_ok());
    }

    #[test]
    fn a_request_of_ambiguous_length_is_refused() {
        let req = Request::builder()
            .method(Method::POST)
            .uri("/upload")
            .header(header::HOST, "chat.example")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(())
            .unwrap();
        assert!(check_request_target(&req, 1, false).is_ok());
        assert!(matches!(
            check_request_target(&req, 1, true),
            Err(ProxyError::BadRequest(_))
        ));
    }

    #[test]
    fn a_websocket_upgrade_is_its_own_route_class() {
        assert_eq!(route_class(Route::Backend, true), RouteClass::WebSocket);
        assert_eq!(
            route_class(Route::SocketIo { rest: "" }, true),
            RouteClass::WebSocket
        );
        assert_eq!(route_class(Route::Backend, false), RouteClass::Backend);
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, R>(_f: impl Fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_request_future_stays_small() {
        // hyper moves each request's future into its dispatcher, and each layer's future
        // is copied into its caller's: a large one inline costs a large memcpy per
        // request (bench/NOTES.md). It was 8,400 bytes with every step inline, 2,544 with
        // the forwarder boxed under three nested layers; now all it waits on is boxed.
        let size = returned_size(handle);
        assert!(size <= 128, "handle's future is {size} bytes");
    }
}
