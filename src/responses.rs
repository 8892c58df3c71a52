//! Canned responses, built in one place: chatgate's own JSON and text answers (probes, the
//! stub, errors, redirects) and the raw refusal written before any HTTP parsing.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;

/// A JSON answer that no cache keeps.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, "application/json", body)
}

/// A plain-text answer that no cache keeps.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    with_type(status, "text/plain; charset=utf-8", body)
}

/// An answer of `content_type` that no cache keeps.
pub fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A redirect to a same-site `location` (already made safe by the route).
pub fn redirect(status: StatusCode, location: HeaderValue) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, location);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What an over-limit connection gets before it is closed: no parsing, no queueing.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nconnection: close\r\n\r\ntoo many connections\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_answers_are_never_cached() {
        for response in [
            json(StatusCode::OK, "{}"),
            text(StatusCode::NOT_FOUND, "not found\n"),
            redirect(StatusCode::FOUND, HeaderValue::from_static("/")),
        ] {
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        }
        assert_eq!(
            json(StatusCode::OK, "{}").headers()[header::CONTENT_TYPE],
            "application/json"
        );
    }

    #[test]
    fn the_raw_refusal_is_a_complete_http_message() {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut headers);
        let head = parsed.parse(TOO_MANY_CONNECTIONS).unwrap();
        let httparse::Status::Complete(len) = head else {
            panic!("partial head")
        };
        assert_eq!(parsed.code, Some(503));
        let declared: usize = parsed
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(TOO_MANY_CONNECTIONS.len() - len, declared);
    }
}
