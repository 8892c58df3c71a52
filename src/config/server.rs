//! Settings of the listeners: addresses, HTTP/1 parsing limits, logging.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::values::{Line, Problems, count, duration_line, invalid, positive_seconds};

#[derive(Debug, Clone, Args)]
pub struct ServerSettings {
    /// Address to listen on.
    #[arg(
        long,
        env = "CHATGATE_LISTEN",
        default_value = "0.0.0.0:8000",
        global = true
    )]
    pub listen: String,
    /// Seconds a client has to send a request's headers (slowloris guard). An idle
    /// keep-alive connection is closed after this long too (at most twice this after its
    /// last answer went out): waiting for the next request's headers is the same wait.
    #[arg(
        long,
        env = "CHATGATE_HEADER_READ_TIMEOUT",
        default_value = "10",
        global = true
    )]
    pub header_read_timeout: String,
    /// Largest request head (request line and headers) in bytes.
    #[arg(
        long,
        env = "CHATGATE_MAX_HEADER_BYTES",
        default_value = "65536",
        global = true
    )]
    pub max_header_bytes: String,
    /// Most headers in one request.
    #[arg(
        long,
        env = "CHATGATE_MAX_HEADERS",
        default_value = "100",
        global = true
    )]
    pub max_headers: String,
    /// Admin listener for /monitor/metrics (Prometheus) and the health routes; "off" to disable.
    #[arg(
        long,
        env = "CHATGATE_ADMIN_LISTEN",
        default_value = "0.0.0.0:9100",
        global = true
    )]
    pub admin_listen: String,
    /// Log format: auto (JSON unless stdout is a terminal), json or text. Filter with RUST_LOG.
    #[arg(
        long,
        env = "CHATGATE_LOG_FORMAT",
        default_value = "auto",
        global = true
    )]
    pub log_format: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where `/monitor/metrics` is served; never on the public port.
    pub admin_listen: Option<SocketAddr>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub log_format: LogFormat,
}

impl ServerConfig {
    pub(super) fn validate(s: &ServerSettings, p: &mut Problems) -> Option<ServerConfig> {
        let listen =
            p.check(s.listen.trim().parse().map_err(|_| {
                invalid("listen", &s.listen, "expected host:port, e.g. 0.0.0.0:8000")
            }));
        let admin_listen = p.check(match s.admin_listen.trim() {
            "" | "off" => Ok(None),
            addr => addr
                .parse()
                .map(Some)
                .map_err(|_| invalid("admin-listen", &s.admin_listen, "expected host:port or off")),
        });
        let header_read_timeout = p.check(positive_seconds(
            "header-read-timeout",
            &s.header_read_timeout,
        ));
        let max_header_bytes = p.check(count(
            "max-header-bytes",
            &s.max_header_bytes,
            1024,
            1 << 20,
        ));
        let max_headers = p.check(count("max-headers", &s.max_headers, 8, 1000));
        let log_format = p.check(match s.log_format.trim() {
            "auto" => Ok(LogFormat::Auto),
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            _ => Err(invalid(
                "log-format",
                &s.log_format,
                "expected auto, json or text",
            )),
        });
        Some(ServerConfig {
            listen: listen?,
            admin_listen: admin_listen?,
            header_read_timeout: header_read_timeout?,
            max_header_bytes: max_header_bytes?,
            max_headers: max_headers?,
            log_format: log_format?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        lines.extend([
            ("listen", self.listen.to_string()),
            (
                "header_read_timeout",
                duration_line(self.header_read_timeout),
            ),
            ("max_header_bytes", self.max_header_bytes.to_string()),
            ("max_headers", self.max_headers.to_string()),
            (
                "admin_listen",
                self.admin_listen
                    .map_or("off".to_owned(), |a| a.to_string()),
            ),
            (
                "log_format",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
        ]);
    }
}
