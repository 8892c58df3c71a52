//! Logging: JSON lines (or text on a terminal) through a batching writer (`writer.rs`), and
//! the one access line per request, written when its response body is finished or dropped.

mod writer;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::sync::OnceLock;

use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

use crate::ascii;
use crate::config::LogFormat;
pub use writer::FlushGuard;
use writer::LogWriter;

/// Installs the global subscriber. The returned guard writes what is buffered when dropped:
/// keep it alive in `main`. The writer drops lines rather than block a request when stdout
/// stalls.
pub fn init(format: LogFormat) -> std::io::Result<FlushGuard> {
    let (writer, guard) = writer::spawn(std::io::stdout())?;
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
    Ok(guard)
}

/// Set when logs are JSON lines: where the access lines go directly.
static ACCESS_WRITER: OnceLock<LogWriter> = OnceLock::new();

thread_local! {
    /// The buffer each thread formats its access lines in, kept between requests.
    static ACCESS_LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(512));
    /// Each thread's timestamp text up to the second.
    static CLOCK: std::cell::RefCell<ascii::Rfc3339Clock> = std::cell::RefCell::default();
}

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
    pub metrics: crate::metrics::MetricsHandle,
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
    fn write_json(&self, writer: &LogWriter, duration_ms: f64, request_id: &str, error: &str) {
        let write = |line: &mut String| {
            line.clear();
            self.json_line(line, duration_ms, request_id, error);
            writer.append(line.as_bytes());
            // One odd line (a huge error text) should not keep its size for the thread's life.
            line.shrink_to(4096);
        };
        // A body dropped while its thread is being torn down finds the buffer gone: a
        // panic in a drop there would abort the process, so it gets a buffer of its own.
        let reused = ACCESS_LINE
            .try_with(|cell| {
                cell.try_borrow_mut()
                    .map(|mut line| write(&mut line))
                    .is_ok()
            })
            .unwrap_or(false);
        if !reused {
            write(&mut String::new());
        }
    }

    fn json_line(&self, line: &mut String, duration_ms: f64, request_id: &str, error: &str) {
        line.push_str("{\"timestamp\":\"");
        let now = std::time::SystemTime::now();
        let cached = CLOCK
            .try_with(|cell| {
                cell.try_borrow_mut()
                    .map(|mut clock| clock.push(line, now))
                    .is_ok()
            })
            .unwrap_or(false);
        if !cached {
            ascii::Rfc3339Clock::default().push(line, now);
        }
        line.push_str(if self.probe {
            "\",\"level\":\"DEBUG\""
        } else {
            "\",\"level\":\"INFO\""
        });
        line.push_str(",\"message\":\"request\",\"method\":");
        push_json_str(line, self.method.as_str());
        line.push_str(",\"path\":");
        push_json_str(line, self.uri.path());
        line.push_str(",\"status\":");
        ascii::push_int(line, self.status);
        // Milliseconds with three decimals, from whole microseconds: integer formatting,
        // where an `f64` would go through the shortest-float algorithm for every line.
        let micros = (duration_ms * 1000.0).round() as u64;
        line.push_str(",\"duration_ms\":");
        ascii::push_int(line, micros / 1000);
        line.push('.');
        ascii::push_padded(line, (micros % 1000) as u32, 3);
        line.push_str(",\"bytes\":");
        ascii::push_int(line, self.bytes_out);
        line.push_str(",\"request_id\":");
        push_json_str(line, request_id);
        line.push_str(",\"client\":\"");
        match self.client {
            IpAddr::V4(v4) => {
                let mut text = [0u8; 15];
                let len = ascii::ipv4(v4, &mut text);
                line.push_str(std::str::from_utf8(&text[..len]).unwrap_or("?"));
            }
            IpAddr::V6(v6) => {
                let _ = write!(line, "{v6}");
            }
        }
        line.push_str(if self.completed {
            "\",\"completed\":true,\"error\":"
        } else {
            "\",\"completed\":false,\"error\":"
        });
        push_json_str(line, error);
        line.push_str("}\n");
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let now = Instant::now();
        self.metrics.response_finished(now);
        let seconds = now.saturating_duration_since(self.started).as_secs_f64();
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
            metrics: crate::metrics::MetricsHandle::new(std::sync::Arc::new(
                crate::metrics::Metrics::new(),
            )),
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
        let mut line = String::new();
        log.json_line(&mut line, 1.2344, "abc", "");
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).expect("JSON");
        assert_eq!(v["duration_ms"].as_f64(), Some(1.234));
        assert_eq!(v["path"], "/a%22b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 2048);
        assert_eq!(v["client"], "127.0.0.1");
        assert!(!line.contains("secret"));
        let mut slow = String::new();
        log.json_line(&mut slow, 12_345.000_6, "abc", "reset \"x\"");
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
