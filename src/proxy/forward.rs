//! The streaming HTTP forwarder: one client request to the backend and its response back,
//! bodies streamed frame by frame both ways, no redirect followed.

use std::future::Future as _;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::backend::affinity::{is_sane_sid, query_param, unknown_session};
use crate::backend::client::LegError;
use crate::backend::owned::{BackendConn, OwnedBackend, Sent};
use crate::backend::pool::{Pin, ResponseTap, Target, Worker};
use crate::body::{BodyError, BodyTap, ProxyBody, RequestBody, Watched};
use crate::chat::polling::{MAX_SCREENED_BODY, PollingTap};
use crate::error::{Cause, ProxyError};
use crate::proxy::RequestContext;
use crate::proxy::headers::{backend_request_head, strip_hop_by_hop};
use crate::state::Gateway;

/// Whether a request may be sent again after a connection failed before any response byte:
/// an idempotent method (RFC 9110 §9.2.2) without a body.
fn is_retryable(method: &Method, body: &RequestBody) -> bool {
    matches!(body, RequestBody::Empty)
        && matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        )
}

/// Forwards `req` to its worker and returns the response with a streamed body.
///
/// A bodyless idempotent request whose worker refuses the connection goes to another
/// worker (and its client is re-pointed there); one that belongs to an Engine.IO session of
/// that worker gets Engine.IO's "unknown session" answer, which makes the client reconnect.
///
/// Owns the request's context and hands it back with the answer: the pipeline waits on
/// this future itself, boxed, with no layer around it (`gateway::handle`).
pub async fn forward(
    gw: &Gateway,
    owned: &OwnedBackend,
    req: Request<Incoming>,
    ctx: RequestContext,
    path_and_query: Option<PathAndQuery>,
    target: Target,
    secure: bool,
) -> (Result<Response<ProxyBody>, ProxyError>, RequestContext) {
    let answer = 'answer: {
        let ctx = &ctx;
        let (mut parts, incoming) = req.into_parts();
        // A polling GET's answer is the server's packets (a POST's is just "ok").
        let is_get = parts.method == Method::GET;
        let declared = incoming.size_hint().exact().unwrap_or(0);
        let max_body = gw.config.limits.max_body_bytes;
        if declared > max_body {
            break 'answer Err(ProxyError::PayloadTooLarge(max_body));
        }
        let Target {
            mut worker,
            pin,
            mut set_cookie,
            learn_sid,
        } = target;
        backend_request_head(&mut parts, ctx, &worker.backend, path_and_query);
        let idle = gw.config.backend.body_idle_timeout;
        // An Engine.IO polling request of a known session: the chat reader sees its packets.
        let chat_sid = gw
            .chat
            .observe
            .then(|| polling_sid(ctx.uri.query()))
            .flatten();
        let (body, body_sent) = if incoming.is_end_stream() {
            (RequestBody::Empty, None)
        } else if let Some(sid) = chat_sid.filter(|_| {
            parts.method == Method::POST && declared > 0 && declared <= MAX_SCREENED_BODY as u64
        }) {
            let data = match Box::pin(screen_polling_post(gw, sid, incoming, idle, max_body)).await
            {
                Ok(data) => data,
                Err(error) => break 'answer Err(error),
            };
            if let Ok(length) = HeaderValue::try_from(data.len().to_string()) {
                parts.headers.insert(header::CONTENT_LENGTH, length);
            }
            (RequestBody::Full { data: Some(data) }, None)
        } else {
            let (body, sent) =
                Watched::request(incoming, idle, max_body, gw.metrics.request_bytes.clone());
            (RequestBody::Stream { body }, Some(sent))
        };
        // A bodyless idempotent request keeps a copy of its head, so that a connection the
        // backend closed after the request was written (a keep-alive timer firing, a worker
        // recycled or dying) never surfaces as an error: it is sent once more, and moves to
        // another worker if this one is gone. A request handed back unsent needs no copy.
        let retryable = is_retryable(&parts.method, &body);
        let retry_head = retryable.then(|| copy_head(&parts));
        let deadline = gw.config.backend.wait.map(|wait| Instant::now() + wait);
        let several = gw.workers.several();
        // With several workers, the request counts towards its worker's load until its
        // response body is done.
        let mut load = several.then(|| worker.hold_request());

        let mut epoch = worker.health.epoch();
        let mut body_sent = body_sent;
        let mut req = Request::from_parts(parts, body);
        let mut fresh = false;
        let mut retried = false;
        let mut resent = false;
        // One call of `send` for the first try and every retry: each call site of an
        // awaited future is its own slot in this future, which is boxed per request.
        let result = loop {
            let mut result = send(gw, owned, &worker, req, &mut body_sent, fresh).await;
            let Err(error) = &mut result else {
                break result;
            };
            let refused = error.is_refused();
            let again = if refused {
                worker.health.passive_refused();
                if pin == Pin::Session {
                    let sid = query_param(ctx.uri.query(), "sid").unwrap_or_default();
                    gw.workers.sessions.forget(sid);
                    break 'answer Ok(unknown_session(sid));
                }
                if !retryable {
                    break result;
                }
                if let Some(other) = gw.workers.fallback(&worker) {
                    tracing::debug!(
                        from = worker.index,
                        to = other.index,
                        "worker refused: trying another"
                    );
                    worker = Arc::clone(other);
                    set_cookie = true;
                    load = Some(worker.hold_request());
                } else {
                    // --backend-wait: hold the request while a worker starts.
                    match deadline {
                        Some(deadline) if Box::pin(wait_for_backend(&worker, deadline)).await => {}
                        _ => break result,
                    }
                    let next = gw.workers.least_loaded(None);
                    if next.index != worker.index {
                        worker = Arc::clone(next);
                        set_cookie = true;
                        load = several.then(|| worker.hold_request());
                    }
                }
                // A refused connection never saw the request.
                error.take_unsent().map(|req| *req)
            } else if let Some(req) = error.take_backend_unsent().filter(|_| !resent) {
                // The connection closed before the request was written (hyper hands it back):
                // no byte reached the backend, so it goes out on a new connection, any method.
                resent = true;
                Some(*req)
            } else if !retried && !error.is_connect() {
                retried = true;
                tracing::debug!(error = %error, "retrying on a fresh connection");
                retry_head.as_ref().map(resend)
            } else {
                None
            };
            let Some(again) = again else {
                break result;
            };
            req = again;
            fresh = !refused;
            epoch = worker.health.epoch();
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => break 'answer Err(classify_send(error)),
        };
        // Whatever it answered, the backend is there.
        worker.health.passive_success(epoch);
        let (mut parts, incoming) = response.into_parts();
        // An HTTP/1.0 backend must not make the client's connection HTTP/1.0 (and closed).
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::CONTENT_TYPE) && parts.status.is_success() {
            if let Some(mime) = guess_content_type(ctx.path()) {
                parts
                    .headers
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
            }
        }
        let body = Watched::new(incoming, idle);
        // A polling answer of a chat session: its records are read on the way, and notices
        // chatgate owes the session (refused messages) go ahead of it.
        let chat_answer = chat_sid.filter(|_| {
            is_get
                && parts.status == http::StatusCode::OK
                && !parts.headers.contains_key(header::CONTENT_ENCODING)
        });
        if let Some(sid) = chat_answer {
            let chat_tap = PollingTap::new(Arc::clone(&gw.chat), sid.to_owned(), worker.index);
            let prefix = polling_notices(gw, sid, &mut parts.headers);
            let tap: Box<dyn BodyTap> = if several {
                if set_cookie {
                    parts
                        .headers
                        .append(header::SET_COOKIE, worker.set_cookie(secure));
                }
                Box::new((ResponseTap::new(load, None), chat_tap))
            } else {
                Box::new(chat_tap)
            };
            break 'answer Ok(Response::from_parts(
                parts,
                ProxyBody::tapped(body, tap).with_prefix(prefix),
            ));
        }
        if !several {
            break 'answer Ok(Response::from_parts(parts, ProxyBody::stream(body)));
        }
        if set_cookie {
            parts
                .headers
                .append(header::SET_COOKIE, worker.set_cookie(secure));
        }
        // The open packet is never compressed (too small); anything else is not a handshake.
        let sniff = learn_sid
            && parts.status == http::StatusCode::OK
            && !parts.headers.contains_key(header::CONTENT_ENCODING);
        let tap = ResponseTap::new(
            load,
            sniff.then(|| (Arc::clone(&gw.workers), Arc::clone(&worker))),
        );
        Ok(Response::from_parts(
            parts,
            ProxyBody::tapped(body, Box::new(tap)),
        ))
    };
    (answer, ctx)
}

/// The session of an Engine.IO v4 polling request (`EIO=4&transport=polling&sid=...`).
fn polling_sid(query: Option<&str>) -> Option<&str> {
    let polling = query_param(query, "transport") == Some("polling")
        && query_param(query, "EIO") == Some("4");
    polling
        .then(|| query_param(query, "sid"))
        .flatten()
        .filter(|sid| is_sane_sid(sid))
}

/// Reads a polling POST whole (bounded: `MAX_SCREENED_BODY`, and the body idle timeout),
/// lets the chat reader screen its packets, and returns what goes to the backend.
async fn screen_polling_post(
    gw: &Gateway,
    sid: &str,
    incoming: Incoming,
    idle: Duration,
    max_body: u64,
) -> Result<bytes::Bytes, ProxyError> {
    use http_body_util::BodyExt as _;
    let (body, _sent) =
        Watched::request(incoming, idle, max_body, gw.metrics.request_bytes.clone());
    let data = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(BodyError::TooLarge(limit)) => return Err(ProxyError::PayloadTooLarge(limit)),
        Err(BodyError::IdleTimeout(t)) => return Err(ProxyError::RequestBodyTimeout(t)),
        Err(BodyError::Hyper(_)) => {
            return Err(ProxyError::BadRequest("the request body broke off"));
        }
    };
    let Ok(text) = std::str::from_utf8(&data) else {
        return Ok(data);
    };
    Ok(
        match gw.chat.polling.screen_post(sid, text, gw.is_draining()) {
            Some(screened) => bytes::Bytes::from(screened),
            None => data,
        },
    )
}

/// The notices owed to polling session `sid`, as the first records of its answer (with
/// `Content-Length` grown to match); empty when there are none.
fn polling_notices(gw: &Gateway, sid: &str, headers: &mut http::HeaderMap) -> bytes::Bytes {
    let notices = gw.chat.polling.take_notices(sid);
    if notices.is_empty() {
        return bytes::Bytes::new();
    }
    let mut prefix = notices.join("\x1e");
    prefix.push('\x1e');
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(length) = length {
        if let Ok(value) = HeaderValue::try_from((length + prefix.len() as u64).to_string()) {
            headers.insert(header::CONTENT_LENGTH, value);
        }
    }
    bytes::Bytes::from(prefix)
}

/// A copy of a bodyless request's head, kept for a retry.
fn copy_head(parts: &http::request::Parts) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.headers_mut() = parts.headers.clone();
    copy
}

/// `head` again, to send (bodyless; its URI is in origin form, so any worker takes it).
fn resend(head: &Request<()>) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = head.uri().clone();
    *req.headers_mut() = head.headers().clone();
    req
}

/// Waits until the probe says `worker` is up, or `deadline`; true if there is time left.
async fn wait_for_backend(worker: &Worker, deadline: Instant) -> bool {
    let mut up = worker.health.subscribe();
    // Re-check often even without a probe verdict: the backend may be up before the probe.
    // A verdict that is still "up" (the probe has not noticed a restart yet) must not turn
    // this into a busy loop of refused connects: then just wait out the interval.
    let poll = Duration::from_millis(250);
    let until = (Instant::now() + poll).min(deadline);
    if *up.borrow_and_update() {
        tokio::time::sleep_until(until).await;
    } else {
        let _ = tokio::time::timeout_at(until, up.changed()).await;
    }
    Instant::now() < deadline
}

/// Sends one request on the client connection's own backend connection to `worker`
/// (connecting one when it has none; `fresh`: a new one in any case). The response-header
/// timeout starts once the request body has been sent: an upload may take as long as it
/// keeps moving.
async fn send(
    gw: &Gateway,
    owned: &OwnedBackend,
    worker: &Worker,
    req: Request<RequestBody>,
    body_sent: &mut Option<oneshot::Receiver<()>>,
    fresh: bool,
) -> Result<Response<Incoming>, SendError> {
    let response = match owned.send(&worker.idle, req, fresh, None) {
        Sent::Sent(response) => response,
        Sent::NeedsConnection(req) => {
            // Boxed, like the other rare steps below: inline, their large futures would
            // grow every request's future, which hyper moves into place per request.
            let conn = match Box::pin(BackendConn::connect(&worker.backend, &gw.tls)).await {
                Ok(conn) => conn,
                Err(error) => {
                    return Err(SendError::Connect {
                        error,
                        unsent: Some(req),
                    });
                }
            };
            match owned.send(&worker.idle, *req, fresh, Some(conn)) {
                Sent::Sent(response) => response,
                // `send` always takes a connection it is given; this arm only keeps the
                // types honest.
                Sent::NeedsConnection(req) => {
                    let error = LegError::Failed(ProxyError::BackendConnect(Cause::msg(
                        "no backend connection",
                    )));
                    return Err(SendError::Connect {
                        error,
                        unsent: Some(req),
                    });
                }
            }
        }
    };
    tokio::pin!(response);
    if let Some(sent) = body_sent.as_mut() {
        tokio::select! {
            result = &mut response => return result.map_err(SendError::backend),
            _ = sent => {}
        }
        *body_sent = None;
    }
    let timeout = gw.config.backend.response_timeout;
    let mut timer = owned.timer(Instant::now() + timeout);
    let mut gate = TimerGate::default();
    let result = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = response.as_mut().poll(cx) {
            return Poll::Ready(result.map_err(SendError::backend));
        }
        if gate.poll(timer.as_mut(), cx).is_ready() {
            return Poll::Ready(Err(SendError::Timeout(timeout)));
        }
        Poll::Pending
    })
    .await;
    owned.put_timer(timer);
    result
}

/// The response timer, polled to arm it and then only once it has fired (or the task's
/// waker changed). In a `select!` it was polled on every wake-up of the connection's task,
/// some three times per request, each an update of its registration and a budget check
/// (bench/NOTES.md, issue 12).
///
/// Armed only by a poll that had cooperative budget left: without budget, tokio's `Sleep`
/// returns `Pending` before it registers anything (it only reschedules the task), and
/// counting that poll as arming would leave a hung backend without a timeout.
#[derive(Default)]
struct TimerGate {
    armed: Option<Waker>,
}

impl TimerGate {
    fn poll(&mut self, timer: std::pin::Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<()> {
        let same_task = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_task && !timer.is_elapsed() {
            return Poll::Pending;
        }
        let budget = tokio::task::coop::has_budget_remaining();
        let polled = timer.poll(cx);
        if polled.is_pending() && budget {
            self.armed = Some(cx.waker().clone());
        }
        polled
    }
}

/// A failed send: no connection, the connection failed (with the request back when none
/// of it was written), or no response headers in time.
///
/// The unsent request is boxed: a failed send is rare, and inline it made every send's
/// result 368 bytes, moved several times per request (bench/NOTES.md, issue 12).
pub enum SendError {
    Connect {
        error: LegError,
        unsent: Option<Box<Request<RequestBody>>>,
    },
    Backend {
        error: hyper::Error,
        unsent: Option<Box<Request<RequestBody>>>,
    },
    Timeout(Duration),
}

impl SendError {
    fn backend(mut error: TrySendError<Request<RequestBody>>) -> SendError {
        let unsent = error.take_message().map(Box::new);
        SendError::Backend {
            error: error.into_error(),
            unsent,
        }
    }

    /// Nothing listens at the worker.
    fn is_refused(&self) -> bool {
        matches!(
            self,
            SendError::Connect {
                error: LegError::Refused(_),
                ..
            }
        )
    }

    /// Failed before a connection carried the request, or timed out (never retried: the
    /// backend may be working on it).
    fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::Timeout(_))
    }

    /// The request, when a connection was there and handed it back unwritten (it had
    /// been closed): worth sending again. A failed connect is not (see `is_connect`).
    fn take_backend_unsent(&mut self) -> Option<Box<Request<RequestBody>>> {
        match self {
            SendError::Backend { unsent, .. } => unsent.take(),
            _ => None,
        }
    }

    /// The request, when no byte of it reached the backend.
    fn take_unsent(&mut self) -> Option<Box<Request<RequestBody>>> {
        match self {
            SendError::Connect { unsent, .. } | SendError::Backend { unsent, .. } => unsent.take(),
            SendError::Timeout(_) => None,
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect {
                error: LegError::Refused(e),
                ..
            } => write!(f, "connection refused: {e}"),
            SendError::Connect {
                error: LegError::Failed(e),
                ..
            } => write!(f, "{e}"),
            SendError::Backend { error, .. } => f.write_str(&crate::error::chain(error)),
            SendError::Timeout(t) => write!(f, "no response headers within {t:?}"),
        }
    }
}

fn classify_send(err: SendError) -> ProxyError {
    match err {
        SendError::Connect {
            error: LegError::Refused(_),
            ..
        } => ProxyError::BackendRefused,
        SendError::Connect {
            error: LegError::Failed(e),
            ..
        } => e,
        SendError::Backend { error, .. } => {
            // The client's own body failing is the client's fault, not the backend's.
            match request_body_error(&error) {
                Some(BodyError::TooLarge(limit)) => ProxyError::PayloadTooLarge(*limit),
                Some(BodyError::IdleTimeout(idle)) => ProxyError::RequestBodyTimeout(*idle),
                _ => ProxyError::BackendReset(Cause::new(error)),
            }
        }
        SendError::Timeout(t) => ProxyError::BackendTimeout(t),
    }
}

/// The request body's own error, when that is why sending failed.
fn request_body_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(body_error) = e.downcast_ref::<BodyError>() {
            return Some(body_error);
        }
        source = e.source();
    }
    None
}

/// A `Content-Type` for a static asset that came back without one, from its extension.
pub fn guess_content_type(path: &str) -> Option<&'static str> {
    let file = path.rsplit('/').next()?;
    if !file.contains('.') {
        return None;
    }
    mime_guess::from_path(file).first_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_come_from_extensions() {
        assert_eq!(
            guess_content_type("/assets/index-abc.js"),
            Some("text/javascript")
        );
        assert_eq!(guess_content_type("/assets/index.css"), Some("text/css"));
        assert_eq!(
            guess_content_type("/public/logo.svg"),
            Some("image/svg+xml")
        );
        assert_eq!(guess_content_type("/project/settings"), None);
        assert_eq!(guess_content_type("/"), None);
        assert_eq!(guess_content_type("/a.b/c"), None);
    }

    #[tokio::test]
    async fn a_response_timer_first_polled_without_budget_still_fires() {
        let timer = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(timer);
        let mut gate = TimerGate::default();
        let mut first = true;
        let fired = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| {
                if std::mem::take(&mut first) {
                    // The task's budget used up before the timer's first poll, as the
                    // last frames of a large upload can leave it.
                    loop {
                        let spend = std::pin::pin!(tokio::task::consume_budget());
                        if spend.poll(cx).is_pending() {
                            break;
                        }
                    }
                }
                gate.poll(timer.as_mut(), cx)
            }),
        )
        .await;
        assert!(fired.is_ok(), "the response timer never fired");
    }

    #[test]
    fn only_bodyless_idempotent_requests_are_retried() {
        assert!(is_retryable(&Method::GET, &RequestBody::Empty));
        assert!(is_retryable(&Method::DELETE, &RequestBody::Empty));
        assert!(!is_retryable(&Method::POST, &RequestBody::Empty));
        assert!(!is_retryable(&Method::PATCH, &RequestBody::Empty));
    }
}
