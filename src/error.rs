//! Errors of a proxied exchange, each mapped to its status in one place.
//!
//! Where an error came from decides its status (as in pingora): the backend refusing is 503
//! (it is starting or restarting: come back soon), a backend that fails mid-way is 502, one
//! that is too slow is 504, a client's malformed request is 400.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("backend refused the connection")]
    BackendRefused,
    #[error("backend connect timed out")]
    BackendConnectTimeout,
    #[error("backend connect failed: {0}")]
    BackendConnect(String),
    #[error("backend failed before responding: {0}")]
    BackendReset(String),
    #[error("backend sent no response headers within {0:?}")]
    BackendTimeout(Duration),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("shutting down")]
    Draining,
    #[error("too many connections")]
    Overloaded,
    #[error("too many requests; retry in {0:?}")]
    RateLimited(Duration),
    #[error("origin not allowed")]
    ForbiddenOrigin,
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(u64),
    #[error("the request body stalled for {0:?}")]
    RequestBodyTimeout(Duration),
}

/// Seconds a browser is asked to wait before retrying while the backend is down.
pub const RETRY_AFTER_SECS: u64 = 5;

impl ProxyError {
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
        let mut builder = Response::builder().status(status);
        let body = if browser_navigation && retry {
            builder = builder.header(header::CONTENT_TYPE, "text/html; charset=utf-8");
            Bytes::from(format!(
                "<!doctype html><html><head><meta charset=\"utf-8\">\
                 <meta http-equiv=\"refresh\" content=\"{RETRY_AFTER_SECS}\">\
                 <title>Starting…</title></head><body><p>The chat is starting or \
                 restarting. This page reloads in {RETRY_AFTER_SECS} seconds.</p></body></html>\n"
            ))
        } else {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            let body = serde_json::json!({ "error": status.canonical_reason(), "detail": self.to_string() });
            Bytes::from(format!("{body}\n"))
        };
        if retry {
            builder = builder.header(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if let ProxyError::RateLimited(wait) = &self {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            builder = builder.header(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(
            status,
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE
        ) {
            builder = builder.header(header::CONNECTION, "close");
        }
        builder
            .body(ProxyBody::full(body))
            .unwrap_or_else(|_| Response::new(ProxyBody::empty()))
    }
}

/// Whether a request is a browser loading a page (and so gets HTML rather than JSON).
pub fn is_browser_navigation(method: &http::Method, headers: &http::HeaderMap) -> bool {
    if method != http::Method::GET {
        return false;
    }
    let navigate = headers
        .get("sec-fetch-mode")
        .is_some_and(|v| v.as_bytes() == b"navigate");
    navigate
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"))
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
            ProxyError::BackendReset("x".into()).status(),
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
        let gateway = ProxyError::BackendReset("reset".into()).into_response(true);
        assert!(gateway.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(gateway.headers()[header::CONTENT_TYPE], "application/json");
    }
}
