//! Settings of the backend probe.

use std::time::Duration;

use clap::Args;

use super::values::{Line, Problems, duration_line, invalid, positive_seconds};

#[derive(Debug, Clone, Args)]
pub struct HealthSettings {
    /// Seconds between background probes of the backend.
    #[arg(
        long,
        env = "CHATGATE_HEALTH_INTERVAL",
        default_value = "5",
        global = true
    )]
    pub health_interval: String,
    /// Seconds a backend probe may take.
    #[arg(
        long,
        env = "CHATGATE_HEALTH_TIMEOUT",
        default_value = "2",
        global = true
    )]
    pub health_timeout: String,
    /// Backend path probed with GET (falls back to a TCP connect).
    #[arg(
        long,
        env = "CHATGATE_HEALTH_PATH",
        default_value = "/health",
        global = true
    )]
    pub health_path: String,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub path: String,
}

impl HealthConfig {
    pub(super) fn validate(s: &HealthSettings, p: &mut Problems) -> Option<HealthConfig> {
        let interval = p.check(positive_seconds("health-interval", &s.health_interval));
        let timeout = p.check(positive_seconds("health-timeout", &s.health_timeout));
        let path = s.health_path.trim().to_owned();
        let path = p.check(
            if path.starts_with('/') && path.parse::<http::uri::PathAndQuery>().is_ok() {
                Ok(path)
            } else {
                Err(invalid(
                    "health-path",
                    &s.health_path,
                    "must be a path starting with /",
                ))
            },
        );
        Some(HealthConfig {
            interval: interval?,
            timeout: timeout?,
            path: path?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        lines.extend([
            ("health_interval", duration_line(self.interval)),
            ("health_timeout", duration_line(self.timeout)),
            ("health_path", self.path.clone()),
        ]);
    }
}
