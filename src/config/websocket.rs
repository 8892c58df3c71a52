//! Settings of the WebSocket relay: message limits, keep-alive, the backend handshake.

use std::time::Duration;

use clap::Args;

use super::values::{Line, Problems, count, duration_line, positive_seconds};

#[derive(Debug, Clone, Args)]
pub struct WebSocketSettings {
    /// Largest WebSocket message in bytes (close 1009 beyond it).
    #[arg(
        long,
        env = "CHATGATE_WS_MAX_MESSAGE",
        default_value = "1048576",
        global = true
    )]
    pub ws_max_message: String,
    /// Largest WebSocket frame in bytes.
    #[arg(
        long,
        env = "CHATGATE_WS_MAX_FRAME",
        default_value = "1048576",
        global = true
    )]
    pub ws_max_frame: String,
    /// Seconds without a frame from a relayed WebSocket's client before chatgate pings it.
    #[arg(
        long,
        env = "CHATGATE_WS_PING_INTERVAL",
        default_value = "30",
        global = true
    )]
    pub ws_ping_interval: String,
    /// Seconds to wait for a frame from the client after a ping, and the longest a client's
    /// socket may take no byte of what waits for it, before closing the relay (1001).
    #[arg(
        long,
        env = "CHATGATE_WS_PONG_TIMEOUT",
        default_value = "20",
        global = true
    )]
    pub ws_pong_timeout: String,
    /// Seconds for the backend's WebSocket handshake.
    #[arg(
        long,
        env = "CHATGATE_WS_HANDSHAKE_TIMEOUT",
        default_value = "10",
        global = true
    )]
    pub ws_handshake_timeout: String,
}

#[derive(Debug, Clone)]
pub struct WebSocketConfig {
    pub max_message: usize,
    pub max_frame: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub handshake_timeout: Duration,
}

impl WebSocketConfig {
    pub(super) fn validate(s: &WebSocketSettings, p: &mut Problems) -> Option<WebSocketConfig> {
        let max_message = p.check(count("ws-max-message", &s.ws_max_message, 1024, 1 << 30));
        let max_frame = p.check(count("ws-max-frame", &s.ws_max_frame, 1024, 1 << 30));
        let ping_interval = p.check(positive_seconds("ws-ping-interval", &s.ws_ping_interval));
        let pong_timeout = p.check(positive_seconds("ws-pong-timeout", &s.ws_pong_timeout));
        let handshake_timeout = p.check(positive_seconds(
            "ws-handshake-timeout",
            &s.ws_handshake_timeout,
        ));
        Some(WebSocketConfig {
            max_message: max_message?,
            max_frame: max_frame?,
            ping_interval: ping_interval?,
            pong_timeout: pong_timeout?,
            handshake_timeout: handshake_timeout?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        lines.extend([
            ("ws_max_message", self.max_message.to_string()),
            ("ws_max_frame", self.max_frame.to_string()),
            ("ws_ping_interval", duration_line(self.ping_interval)),
            ("ws_pong_timeout", duration_line(self.pong_timeout)),
            (
                "ws_handshake_timeout",
                duration_line(self.handshake_timeout),
            ),
        ]);
    }
}
