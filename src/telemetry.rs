//! Logging: JSON lines (or text on a terminal) through a non-blocking writer, and the one
//! access line per request, written when its response body is finished or dropped.

use std::io::IsTerminal;
use std::net::IpAddr;

use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines the log writer holds before it drops new ones rather than block a request.
const BUFFERED_LINES: usize = 16_384;

/// Installs the global subscriber. The returned guard flushes buffered lines when dropped:
/// keep it alive in `main`. The writer drops lines rather than block a request when full.
pub fn init(format: LogFormat) -> WorkerGuard {
    // The writer thread flushes whenever its queue runs dry, so a buffer batches the lines
    // of a busy moment into one write without delaying a quiet one (stdout alone is line
    // buffered: one write syscall per request).
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(true)
        .finish(stdout);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).init();
    }
    guard
}

/// What one request's access line says. The path is logged without its query string, which
/// carries Engine.IO session ids and OAuth codes.
pub struct AccessLog {
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub route: crate::metrics::RouteClass,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    pub started: Instant,
    pub request_id: HeaderValue,
    pub client: IpAddr,
    pub bytes_out: u64,
    pub probe: bool,
    pub completed: bool,
    pub error: Option<String>,
}

impl AccessLog {
    pub fn note_error(&mut self, error: String) {
        self.error.get_or_insert(error);
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.request(
            self.route,
            &self.method,
            self.status,
            seconds,
            self.bytes_out,
        );
        let duration_ms = seconds * 1000.0;
        let request_id = self.request_id.to_str().unwrap_or("-");
        let error = self.error.as_deref().unwrap_or("");
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    method = %self.method,
                    path = self.uri.path(),
                    status = self.status,
                    duration_ms = (duration_ms * 1000.0).round() / 1000.0,
                    bytes = self.bytes_out,
                    request_id,
                    client = %self.client,
                    completed = self.completed,
                    error,
                    "request"
                )
            };
        }
        if self.probe {
            line!(debug);
        } else {
            line!(info);
        }
    }
}
