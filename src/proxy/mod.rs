//! Moving requests to the backend: header rewriting, the streaming HTTP forwarder and the
//! WebSocket relay. The pipeline (`gateway.rs`) builds a [`RequestContext`] once at the door
//! and hands it to whichever of them serves the request.

pub(crate) mod forward;
pub mod headers;
pub(crate) mod websocket;

use std::net::IpAddr;

use http::HeaderValue;

/// Per-request facts computed once at the door and read by every phase.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The TCP peer as its `X-Forwarded-For` entry, made once per connection
    /// ([`headers::peer_value`]).
    pub peer_value: HeaderValue,
    /// Whether the peer is one of `--trusted-proxies` (its `X-Forwarded-*` count).
    pub trusted_peer: bool,
    /// The client as the trusted-proxy logic sees it (for limits and logs).
    pub client: IpAddr,
    /// The request id: the client's when sane, else a new one.
    pub request_id: HeaderValue,
    pub uri: http::Uri,
    /// Whether the request asks for a WebSocket upgrade.
    pub upgrade: bool,
}

impl RequestContext {
    pub fn path(&self) -> &str {
        self.uri.path()
    }
}
