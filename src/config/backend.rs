//! Settings of the backend leg: where the backend is, how long its exchanges may take.

use std::time::Duration;

use clap::Args;
use http::{HeaderValue, Uri};

use super::values::{Line, Problems, duration_line, invalid, positive_seconds, seconds};

#[derive(Debug, Clone, Args)]
pub struct BackendSettings {
    /// Backend base URL (http:// or https://); a comma-separated list for several workers
    /// started elsewhere, each visitor kept on one of them.
    #[arg(
        long,
        env = "CHATGATE_BACKEND",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub backend: String,
    /// Rewrite the Host header sent to the backend (default: keep the client's).
    #[arg(long, env = "CHATGATE_BACKEND_HOST", global = true)]
    pub backend_host: Option<String>,
    /// Seconds to connect to the backend.
    #[arg(
        long,
        env = "CHATGATE_CONNECT_TIMEOUT",
        default_value = "5",
        global = true
    )]
    pub connect_timeout: String,
    /// Seconds to wait for the backend's response headers once the request is sent.
    #[arg(
        long,
        env = "CHATGATE_RESPONSE_TIMEOUT",
        default_value = "60",
        global = true
    )]
    pub response_timeout: String,
    /// Seconds a body (either way) may stay idle before the exchange is cut.
    #[arg(
        long,
        env = "CHATGATE_BODY_IDLE_TIMEOUT",
        default_value = "120",
        global = true
    )]
    pub body_idle_timeout: String,
    /// Seconds an idle backend connection is kept for reuse (keep below the backend's own: uvicorn 5).
    #[arg(
        long,
        env = "CHATGATE_POOL_IDLE_TIMEOUT",
        default_value = "4",
        global = true
    )]
    pub pool_idle_timeout: String,
    /// Seconds to hold requests while the backend is starting (0 = off).
    #[arg(
        long,
        env = "CHATGATE_BACKEND_WAIT",
        default_value = "0",
        global = true
    )]
    pub backend_wait: String,
}

/// The backend's URL, split once so the hot path never parses a URL.
#[derive(Debug, Clone)]
pub struct BackendUrl {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// `scheme://host:port` without credentials, for logs and the health document.
    pub display: String,
    pub host: String,
    pub port: u16,
}

impl BackendUrl {
    pub fn is_https(&self) -> bool {
        self.scheme == http::uri::Scheme::HTTPS
    }
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// The backend (the first of `--backend`'s list). Each worker has a copy of this config
    /// with its own URL here.
    pub url: BackendUrl,
    /// Every URL of `--backend`, in order (one, unless several workers run elsewhere).
    pub urls: Vec<BackendUrl>,
    /// `--backend-host`: the Host sent to the backend instead of the client's.
    pub host_override: Option<HeaderValue>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// `--backend-wait`; `None` when off.
    pub wait: Option<Duration>,
}

impl BackendConfig {
    pub(super) fn validate(s: &BackendSettings, p: &mut Problems) -> Option<BackendConfig> {
        let urls = p.check(parse_backend_list(&s.backend));
        let host_override = p.check(
            s.backend_host
                .as_deref()
                .filter(|h| !h.trim().is_empty())
                .map(|h| {
                    h.trim()
                        .parse::<http::uri::Authority>()
                        .ok()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                        .ok_or_else(|| invalid("backend-host", h, "expected a host[:port]"))
                })
                .transpose(),
        );
        let connect_timeout = p.check(positive_seconds("connect-timeout", &s.connect_timeout));
        let response_timeout = p.check(positive_seconds("response-timeout", &s.response_timeout));
        let body_idle_timeout =
            p.check(positive_seconds("body-idle-timeout", &s.body_idle_timeout));
        let pool_idle_timeout =
            p.check(positive_seconds("pool-idle-timeout", &s.pool_idle_timeout));
        let wait = p.check(seconds("backend-wait", &s.backend_wait));
        let urls = urls?;
        Some(BackendConfig {
            url: urls[0].clone(),
            urls,
            host_override: host_override?,
            connect_timeout: connect_timeout?,
            response_timeout: response_timeout?,
            body_idle_timeout: body_idle_timeout?,
            pool_idle_timeout: pool_idle_timeout?,
            wait: wait.map(|w| (!w.is_zero()).then_some(w))?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        let urls: Vec<&str> = self.urls.iter().map(|u| u.display.as_str()).collect();
        lines.extend([
            ("backend", urls.join(",")),
            (
                "backend_host",
                self.host_override
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("(client's Host)")
                    .to_owned(),
            ),
            ("connect_timeout", duration_line(self.connect_timeout)),
            ("response_timeout", duration_line(self.response_timeout)),
            ("body_idle_timeout", duration_line(self.body_idle_timeout)),
            ("pool_idle_timeout", duration_line(self.pool_idle_timeout)),
            (
                "backend_wait",
                self.wait.map_or("off".to_owned(), duration_line),
            ),
        ]);
    }
}

/// Parses `--backend`: one URL, or several separated by commas (never empty, no duplicate).
pub fn parse_backend_list(value: &str) -> Result<Vec<BackendUrl>, super::ConfigError> {
    let mut urls: Vec<BackendUrl> = Vec::new();
    for item in value.split(',') {
        if item.trim().is_empty() {
            return Err(invalid(
                "backend",
                &value
                    .split(',')
                    .map(redact_userinfo)
                    .collect::<Vec<_>>()
                    .join(","),
                "empty entry in the list",
            ));
        }
        let url = parse_backend(item)?;
        if urls.iter().any(|u| u.display == url.display) {
            return Err(invalid(
                "backend",
                &url.display,
                "listed twice: each worker once",
            ));
        }
        urls.push(url);
    }
    if urls.len() > super::workers::MAX_WORKERS {
        return Err(invalid(
            "backend",
            &format!("({} URLs)", urls.len()),
            format!("at most {} workers", super::workers::MAX_WORKERS),
        ));
    }
    Ok(urls)
}

/// Parses the backend URL: http or https, a host, no path beyond `/`, no query. Errors
/// never repeat the credentials a URL may carry.
pub fn parse_backend(value: &str) -> Result<BackendUrl, super::ConfigError> {
    parse_backend_unredacted(value).map_err(|mut e| {
        e.value = redact_userinfo(&e.value);
        e
    })
}

/// `scheme://user:pass@host/...` with the `user:pass@` replaced by `***@`.
fn redact_userinfo(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => value.to_owned(),
    }
}

fn parse_backend_unredacted(value: &str) -> Result<BackendUrl, super::ConfigError> {
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|e| invalid("backend", value, format!("not a URL ({e})")))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| invalid("backend", value, "needs http:// or https://"))?;
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(invalid("backend", value, "scheme must be http or https")),
    };
    let full_authority = uri
        .authority()
        .ok_or_else(|| invalid("backend", value, "needs a host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("backend", value, "must not have a path or query"));
    }
    // Credentials (user:pass@) are dropped: they would otherwise be logged and probed with.
    let host_port = full_authority
        .as_str()
        .rsplit_once('@')
        .map_or(full_authority.as_str(), |(_, rest)| rest);
    let authority: http::uri::Authority = host_port
        .parse()
        .map_err(|_| invalid("backend", value, "bad host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid("backend", value, "needs a host"));
    }
    let port = authority.port_u16().unwrap_or(default_port);
    Ok(BackendUrl {
        display: format!("{scheme}://{authority}"),
        host: host.to_owned(),
        port,
        scheme,
        authority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_never_repeat_credentials() {
        let err = parse_backend("https://u:secret@host/app")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("secret") && err.contains("***@host/app"),
            "{err}"
        );
    }

    #[test]
    fn backend_ports_default_by_scheme_and_ipv6_hosts_work() {
        assert_eq!(parse_backend("http://example").unwrap().port, 80);
        assert_eq!(parse_backend("https://example").unwrap().port, 443);
        let b = parse_backend("http://[::1]:8080/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 8080));
    }
}
