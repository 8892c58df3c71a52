//! Logging: JSON lines (or text on a terminal) through a non-blocking writer, and the one
//! access line per request, written when its response body is finished or dropped.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::IpAddr;
use std::sync::OnceLock;

use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
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
    let access_writer = writer.clone();
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
        // Access lines skip tracing's generic JSON layer (a tenth of the CPU of a small
        // proxied request went there): same fields, written directly to the same writer.
        let _ = ACCESS_WRITER.set(access_writer);
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

/// Set when logs are JSON lines: where the access lines go directly.
static ACCESS_WRITER: OnceLock<NonBlocking> = OnceLock::new();

/// Appends `value` to `line` as a JSON string (quoted and escaped).
fn push_json_str(line: &mut String, value: &str) {
    line.push('"');
    // Almost every value (paths, request ids, methods) needs no escaping at all.
    if !value.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        line.push_str(value);
        line.push('"');
        return;
    }
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(line, "\\u{:04x}", c as u32);
            }
            c => line.push(c),
        }
    }
    line.push('"');
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

impl AccessLog {
    /// The access line as tracing's JSON layer would write it, built in one buffer.
    fn write_json(&self, writer: &NonBlocking, duration_ms: f64, request_id: &str, error: &str) {
        let line = self.json_line(duration_ms, request_id, error);
        let _ = writer.clone().write_all(line.as_bytes());
    }

    fn json_line(&self, duration_ms: f64, request_id: &str, error: &str) -> String {
        let mut line = String::with_capacity(320);
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let level = if self.probe { "DEBUG" } else { "INFO" };
        let _ = write!(
            line,
            "{{\"timestamp\":\"{now}\",\"level\":\"{level}\",\"message\":\"request\",\"method\":"
        );
        push_json_str(&mut line, self.method.as_str());
        line.push_str(",\"path\":");
        push_json_str(&mut line, self.uri.path());
        // Milliseconds with three decimals, from whole microseconds: integer formatting,
        // where an `f64` would go through the shortest-float algorithm for every line.
        let micros = (duration_ms * 1000.0).round() as u64;
        let _ = write!(
            line,
            ",\"status\":{},\"duration_ms\":{}.{:03},\"bytes\":{},\"request_id\":",
            self.status,
            micros / 1000,
            micros % 1000,
            self.bytes_out
        );
        push_json_str(&mut line, request_id);
        let _ = write!(
            line,
            ",\"client\":\"{}\",\"completed\":{},\"error\":",
            self.client, self.completed
        );
        push_json_str(&mut line, error);
        line.push_str("}\n");
        line
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
        let level_enabled = if self.probe {
            tracing::enabled!(tracing::Level::DEBUG)
        } else {
            tracing::enabled!(tracing::Level::INFO)
        };
        if let (true, Some(writer)) = (level_enabled, ACCESS_WRITER.get()) {
            self.write_json(writer, duration_ms, request_id, error);
        } else if self.probe {
            line!(debug);
        } else {
            line!(info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_line_is_one_json_object() {
        let log = AccessLog {
            metrics: std::sync::Arc::new(crate::metrics::Metrics::new()),
            route: crate::metrics::RouteClass::Backend,
            method: Method::GET,
            uri: Uri::from_static("/a%22b?sid=secret"),
            status: 200,
            started: Instant::now(),
            request_id: HeaderValue::from_static("abc"),
            client: IpAddr::from([127, 0, 0, 1]),
            bytes_out: 2048,
            probe: false,
            completed: true,
            error: None,
        };
        let line = log.json_line(1.2344, "abc", "");
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).expect("JSON");
        assert_eq!(v["duration_ms"].as_f64(), Some(1.234));
        assert_eq!(v["path"], "/a%22b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 2048);
        assert_eq!(v["client"], "127.0.0.1");
        assert!(!line.contains("secret"));
        let slow = log.json_line(12_345.000_6, "abc", "reset \"x\"");
        let v: serde_json::Value = serde_json::from_str(slow.trim_end()).expect("JSON");
        assert_eq!(v["duration_ms"].as_f64(), Some(12_345.001));
        assert_eq!(v["error"], "reset \"x\"");
    }

    #[test]
    fn json_strings_are_escaped_like_serde_json() {
        for value in ["/plain", "/a\"b\\c", "/tab\there", "\u{1}\u{1f}", "/ünï/€"] {
            let mut line = String::new();
            push_json_str(&mut line, value);
            let parsed: String = serde_json::from_str(&line).expect("valid JSON string");
            assert_eq!(parsed, value);
        }
    }
}
