//! Logging: JSON lines (or text on a terminal) through a batching writer (`writer.rs`), and
//! the one access line per request, written when its response body is finished or dropped.

mod writer;

use std::io::IsTerminal;
use std::io::Write as _;
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
    /// The buffer each thread formats its access lines in, kept between requests. Bytes,
    /// not a `String`: every piece written is whole UTF-8 (a `&str`, or ASCII), so nothing
    /// needs checking on the way in.
    static ACCESS_LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
    /// Each thread's timestamp text up to the second.
    static CLOCK: std::cell::RefCell<ascii::Rfc3339Clock> = std::cell::RefCell::default();
}

/// Appends `value` to `line` as a JSON string (quoted and escaped). Bytes of 0x80 and above
/// are UTF-8 sequences of `value` and go through unchanged, as JSON allows.
fn push_json_str(line: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    // Almost every value (paths, request ids) needs no escaping at all.
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        line.reserve(bytes.len() + 2);
        line.push(b'"');
        line.extend_from_slice(bytes);
        line.push(b'"');
        return;
    }
    line.push(b'"');
    for &b in bytes {
        match b {
            b'"' => line.extend_from_slice(b"\\\""),
            b'\\' => line.extend_from_slice(b"\\\\"),
            b if b < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                line.extend_from_slice(b"\\u00");
                line.push(HEX[usize::from(b >> 4)]);
                line.push(HEX[usize::from(b & 0xf)]);
            }
            b => line.push(b),
        }
    }
    line.push(b'"');
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
        let write = |line: &mut Vec<u8>| {
            line.clear();
            self.json_line(line, duration_ms, request_id, error);
            writer.append(line);
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
            write(&mut Vec::new());
        }
    }

    fn json_line(&self, line: &mut Vec<u8>, duration_ms: f64, request_id: &str, error: &str) {
        // Room for the whole line at once (the fixed text and the widest numbers and
        // address take under 300 bytes; escaping can double a string), so no write below
        // normally grows the buffer.
        let strings = self.uri.path().len() + request_id.len() + error.len();
        line.reserve(320 + self.method.as_str().len() + 2 * strings);
        line.extend_from_slice(b"{\"timestamp\":\"");
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
        line.extend_from_slice(if self.probe {
            b"\",\"level\":\"DEBUG\",\"message\":\"request\",\"method\":\""
        } else {
            b"\",\"level\":\"INFO\",\"message\":\"request\",\"method\":\""
        });
        // A method is a token (RFC 9110 §9.1, which `http` holds it to): no quote, backslash
        // or control byte to escape.
        line.extend_from_slice(self.method.as_str().as_bytes());
        line.extend_from_slice(b"\",\"path\":");
        push_json_str(line, self.uri.path());
        line.extend_from_slice(b",\"status\":");
        ascii::push_int(line, self.status);
        // Milliseconds with three decimals, from whole microseconds: integer formatting,
        // where an `f64` would go through the shortest-float algorithm for every line.
        let micros = (duration_ms * 1000.0).round() as u64;
        line.extend_from_slice(b",\"duration_ms\":");
        ascii::push_int(line, micros / 1000);
        line.push(b'.');
        ascii::push_padded(line, (micros % 1000) as u32, 3);
        line.extend_from_slice(b",\"bytes\":");
        ascii::push_int(line, self.bytes_out);
        line.extend_from_slice(b",\"request_id\":");
        push_json_str(line, request_id);
        line.extend_from_slice(b",\"client\":\"");
        match self.client {
            IpAddr::V4(v4) => {
                let mut text = [0u8; 15];
                let len = ascii::ipv4(v4, &mut text);
                line.extend_from_slice(&text[..len]);
            }
            IpAddr::V6(v6) => {
                let _ = write!(line, "{v6}");
            }
        }
        line.extend_from_slice(if self.completed {
            b"\",\"completed\":true,\"error\":"
        } else {
            b"\",\"completed\":false,\"error\":"
        });
        if error.is_empty() {
            line.extend_from_slice(b"\"\"}\n");
        } else {
            push_json_str(line, error);
            line.extend_from_slice(b"}\n");
        }
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

    /// A finished request's line, for the tests to change a field or two of.
    fn sample() -> AccessLog {
        AccessLog {
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
        }
    }

    /// `log`'s JSON line, as text and parsed.
    fn line_of(
        log: &AccessLog,
        duration_ms: f64,
        request_id: &str,
        error: &str,
    ) -> (String, serde_json::Value) {
        let mut line = Vec::new();
        log.json_line(&mut line, duration_ms, request_id, error);
        let line = String::from_utf8(line).expect("UTF-8");
        let v = serde_json::from_str(line.trim_end()).expect("JSON");
        (line, v)
    }

    #[test]
    fn an_access_line_is_one_json_object() {
        let log = sample();
        let (line, v) = line_of(&log, 1.2344, "abc", "");
        assert_eq!(v["duration_ms"].as_f64(), Some(1.234));
        assert_eq!(v["path"], "/a%22b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 2048);
        assert_eq!(v["client"], "127.0.0.1");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["completed"], true);
        assert_eq!(v["error"], "");
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
        assert!(!line.contains("secret"));
        // A probe's line, an extension method, a path with a raw quote (which `http`
        // lets through) and an IPv6 client.
        let mut probe = sample();
        probe.route = crate::metrics::RouteClass::Health;
        probe.method = Method::from_bytes(b"PURGE").unwrap();
        probe.uri = Uri::from_static("/q\"uote");
        probe.status = 204;
        probe.request_id = HeaderValue::from_static("id\\1");
        probe.client = "2001:db8::1".parse().unwrap();
        probe.bytes_out = 0;
        probe.probe = true;
        probe.completed = false;
        let (_, v) = line_of(&probe, 0.0004, "id\\1", "");
        assert_eq!(v["level"], "DEBUG");
        assert_eq!(v["method"], "PURGE");
        assert_eq!(v["path"], "/q\"uote");
        assert_eq!(v["client"], "2001:db8::1");
        assert_eq!(v["request_id"], "id\\1");
        assert_eq!(v["completed"], false);
        assert_eq!(v["duration_ms"].as_f64(), Some(0.0));
        let (_, v) = line_of(&log, 12_345.000_6, "abc", "reset \"x\"");
        assert_eq!(v["duration_ms"].as_f64(), Some(12_345.001));
        assert_eq!(v["error"], "reset \"x\"");
    }

    #[test]
    fn a_line_with_unusual_text_is_still_one_json_object() {
        let mut log = sample();
        log.method = Method::POST;
        log.uri = Uri::try_from("/ünï/a\\b/€").unwrap();
        log.status = 502;
        log.request_id = HeaderValue::from_static("r");
        log.client = IpAddr::from([10, 0, 0, 1]);
        log.bytes_out = 0;
        log.completed = false;
        let error = "reset\tby \u{1} peer: ünï \"x\" \\ €";
        let (_, v) = line_of(&log, 3.0, "id\"q", error);
        assert_eq!(v["path"], "/ünï/a\\b/€");
        assert_eq!(v["request_id"], "id\"q");
        assert_eq!(v["error"], error);
        assert_eq!(v["method"], "POST");
    }

    #[test]
    fn a_method_never_needs_escaping() {
        // `json_line` writes the method unescaped: `http` must keep refusing methods that
        // are not tokens (RFC 9110 §9.1).
        for bad in [
            &b"A\"B"[..],
            b"A\\B",
            b"A\tB",
            b"A B",
            "Ä".as_bytes(),
            b"A\x01",
        ] {
            assert!(Method::from_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_strings_are_escaped_like_serde_json() {
        for value in ["/plain", "/a\"b\\c", "/tab\there", "\u{1}\u{1f}", "/ünï/€"] {
            let mut line = Vec::new();
            push_json_str(&mut line, value);
            let parsed: String = serde_json::from_slice(&line).expect("valid JSON string");
            assert_eq!(parsed, value);
        }
    }
}
