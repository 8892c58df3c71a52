//! What a relay moved, and its access line, written once when it ends.

use std::net::IpAddr;

use http::HeaderValue;
use tokio::time::Instant;

/// Data messages and their payload bytes, one direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub messages: u64,
    pub bytes: u64,
}

impl Counts {
    pub fn add(&mut self, len: usize) {
        self.messages += 1;
        self.bytes += len as u64;
    }
}

/// How a relay went: counts both ways, who closed, with which code, and why if it failed.
#[derive(Debug, Default, Clone)]
pub struct RelayStats {
    pub client_to_backend: Counts,
    pub backend_to_client: Counts,
    /// `client`, `backend` or `proxy`.
    pub closed_by: &'static str,
    pub close_code: Option<u16>,
    pub error: Option<String>,
}

/// The relay's access line, written when it ends.
pub struct RelayLine {
    pub path: String,
    pub request_id: HeaderValue,
    pub client: IpAddr,
    pub started: Instant,
    pub stats: RelayStats,
}

impl RelayLine {
    pub fn emit(&self) {
        let s = &self.stats;
        tracing::info!(
            path = self.path.as_str(),
            duration_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            messages_in = s.client_to_backend.messages,
            bytes_in = s.client_to_backend.bytes,
            messages_out = s.backend_to_client.messages,
            bytes_out = s.backend_to_client.bytes,
            closed_by = s.closed_by,
            close_code = s.close_code,
            error = s.error.as_deref().unwrap_or(""),
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %self.client,
            "websocket relay"
        );
    }
}
