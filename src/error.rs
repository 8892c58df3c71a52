//! Errors of a proxied exchange. Each keeps where it came from ([`ErrorSource`], as
//! pingora's errors do) and its cause, so that its status and whether it is logged follow
//! from the error itself, in one place.
//!
//! The backend refusing is 503 (it is starting or restarting: come back soon), a backend
//! that fails mid-way is 502, one that is too slow is 504, a client's malformed request is
//! 400.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;
use crate::responses;

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The backend: refused, reset, too slow, malformed. Worth a log line: an operator acts.
    Upstream,
    /// The client: a bad or oversized request, a stalled upload. Its own answer says why.
    Downstream,
    /// chatgate's own policy: draining, at a limit, an origin not allowed.
    Policy,
}

/// The underlying error of an upstream failure, shown with its whole source chain.
#[derive(Debug)]
pub struct Cause(Box<dyn StdError + Send + Sync>);

impl Cause {
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Cause {
        Cause(Box::new(error))
    }

    /// A cause that is only a description (a malformed handshake answer, say).
    pub fn msg(text: impl Into<String>) -> Cause {
        Cause(text.into().into())
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&chain(self.0.as_ref()))
    }
}

/// An error and its sources on one line.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("backend refused the connection")]
    BackendRefused,
    #[error("backend connect timed out")]
    BackendConnectTimeout,
    #[error("backend connect failed: {0}")]
    BackendConnect(Cause),
    #[error("backend failed before responding: {0}")]
    BackendReset(Cause),
    #[error("backend sent no response headers within {0:?}")]
    BackendTimeout(Duration),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(u64),
    #[error("the request body stalled for {0:?}")]
    RequestBodyTimeout(Duration),
    #[error("shutting down")]
    Draining,
    #[error("too many connections")]
    Overloaded,
    #[error("too many requests; retry in {0:?}")]
    RateLimited(Duration),
    #[error("origin not allowed")]
    ForbiddenOrigin,
}

/// Seconds a browser is asked to wait before retrying while the backend is down.
pub const RETRY_AFTER_SECS: u64 = 5;

impl ProxyError {
    pub fn source_kind(&self) -> ErrorSource {
        match self {
            ProxyError::BackendRefused
            | ProxyError::BackendConnectTimeout
            | ProxyError::BackendConnect(_)
            | ProxyError::BackendReset(_)
            | ProxyError::BackendTimeout(_) => ErrorSource::Upstream,
            ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed
            | ProxyError::PayloadTooLarge(_)
            | ProxyError::RequestBodyTimeout(_) => ErrorSource::Downstream,
            ProxyError::Draining
            | ProxyError::Overloaded
            | ProxyError::RateLimited(_)
            | ProxyError::ForbiddenOrigin => ErrorSource::Policy,
        }
    }

    /// Whether the error earns a warning in the log: only the backend's failures. A
    /// client's mistakes and chatgate's refusals are answered and counted, and a flood of
    /// them must not flood the log.
    pub fn is_logged(&self) -> bool {
        self.source_kind() == ErrorSource::Upstream
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BackendRefused | ProxyError::Draining | ProxyError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BackendConnectTimeout
            | ProxyError::BackendConnect(_)
            | ProxyError::BackendReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ForbiddenOrigin => StatusCode::FORBIDDEN,
            ProxyError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// A short answer: an auto-refreshing HTML page for a browser navigation while the
    /// backend is down, JSON otherwise.
    pub fn into_response(self, browser_navigation: bool) -> Response<ProxyBody> {
        let status = self.status();
        let retry = status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = if browser_navigation && retry {
            responses::with_type(
                status,
                "text/html; charset=utf-8",
                Bytes::from(format!(
                    "<!doctype html><html><head><meta charset=\"utf-8\">\
                     <meta http-equiv=\"refresh\" content=\"{RETRY_AFTER_SECS}\">\
                     <title>Starting…</title></head><body><p>The chat is starting or \
                     restarting. This page reloads in {RETRY_AFTER_SECS} seconds.</p></body></html>\n"
                )),
            )
        } else {
            let body = serde_json::json!({ "error": status.canonical_reason(), "detail": self.to_string() });
            responses::json(status, Bytes::from(format!("{body}\n")))
        };
        let headers = response.headers_mut();
        if retry {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if let ProxyError::RateLimited(wait) = &self {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(
            status,
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE
        ) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        assert_eq!(
            ProxyError::BackendRefused.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::BackendConnectTimeout.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ProxyError::BackendReset(Cause::msg("x")).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ProxyError::BackendTimeout(Duration::from_secs(1)).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            ProxyError::BadRequest("x").status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn only_the_backends_failures_are_logged() {
        let logged = [
            ProxyError::BackendRefused,
            ProxyError::BackendConnectTimeout,
            ProxyError::BackendConnect(Cause::msg("x")),
            ProxyError::BackendReset(Cause::msg("x")),
            ProxyError::BackendTimeout(Duration::from_secs(1)),
        ];
        let quiet = [
            ProxyError::BadRequest("x"),
            ProxyError::MethodNotAllowed,
            ProxyError::PayloadTooLarge(1),
            ProxyError::RequestBodyTimeout(Duration::from_secs(1)),
            ProxyError::Draining,
            ProxyError::Overloaded,
            ProxyError::RateLimited(Duration::from_secs(1)),
            ProxyError::ForbiddenOrigin,
        ];
        assert!(logged.iter().all(ProxyError::is_logged));
        assert!(!quiet.iter().any(ProxyError::is_logged));
    }

    #[test]
    fn causes_show_their_whole_chain() {
        let io = std::io::Error::other("inner");
        let error = ProxyError::BackendConnect(Cause::new(io));
        assert_eq!(error.to_string(), "backend connect failed: inner");
    }

    #[test]
    fn refusal_asks_to_retry_and_browsers_get_a_refreshing_page() {
        let html = ProxyError::BackendRefused.into_response(true);
        assert_eq!(html.headers()[header::RETRY_AFTER], "5");
        assert!(
            html.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let json = ProxyError::BackendRefused.into_response(false);
        assert_eq!(json.headers()[header::CONTENT_TYPE], "application/json");
        let gateway = ProxyError::BackendReset(Cause::msg("reset")).into_response(true);
        assert!(gateway.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(gateway.headers()[header::CONTENT_TYPE], "application/json");
    }
}
