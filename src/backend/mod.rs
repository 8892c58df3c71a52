//! The backend: how chatgate reaches it (the pooled HTTP client and the WebSocket leg's
//! transport) and what it knows of its health (the probe and its verdict).

pub mod client;
pub mod health;
