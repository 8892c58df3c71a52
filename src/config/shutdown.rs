//! Settings of the drain on SIGTERM.

use std::time::Duration;

use clap::Args;

use super::values::{Line, Problems, duration_line, positive_seconds, seconds};

#[derive(Debug, Clone, Args)]
pub struct ShutdownSettings {
    /// Seconds to keep accepting connections after SIGTERM (readiness already 503).
    #[arg(
        long,
        env = "CHATGATE_SHUTDOWN_DELAY",
        default_value = "0",
        global = true
    )]
    pub shutdown_delay: String,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(
        long,
        env = "CHATGATE_SHUTDOWN_GRACE",
        default_value = "20",
        global = true
    )]
    pub shutdown_grace: String,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub delay: Duration,
    pub grace: Duration,
}

impl ShutdownConfig {
    pub(super) fn validate(s: &ShutdownSettings, p: &mut Problems) -> Option<ShutdownConfig> {
        let delay = p.check(seconds("shutdown-delay", &s.shutdown_delay));
        // Zero would exit before an open relay's 1001 went out.
        let grace = p.check(positive_seconds("shutdown-grace", &s.shutdown_grace));
        Some(ShutdownConfig {
            delay: delay?,
            grace: grace?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        lines.extend([
            ("shutdown_delay", duration_line(self.delay)),
            ("shutdown_grace", duration_line(self.grace)),
        ]);
    }
}
