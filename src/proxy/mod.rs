//! Moving requests to the backend: the pooled client, header rewriting, the streaming
//! HTTP forwarder and the WebSocket relay.

pub mod client;
pub mod forward;
pub mod headers;
pub mod websocket;
