//! Configuration: flags and `CHATGATE_*` variables parsed once by clap into [`Settings`]
//! (all strings), then validated into the typed [`Config`] the rest of the code uses.
//!
//! Parsing takes the environment as a lookup function, so tests pass a map instead of
//! mutating the process environment (which races between tests and is `unsafe` in 2024).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use http::{HeaderValue, StatusCode, Uri};
use ipnet::IpNet;

use crate::limits::{Rate, parse_origin, parse_rate};

/// The command line: `chatgate [serve flags]`, `chatgate check-config`, `chatgate healthcheck`.
#[derive(Debug, Parser)]
#[command(
    name = "chatgate",
    version,
    about = "A reverse proxy for Chainlit apps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
    /// Ask a running chatgate's /monitor/health; exit 0 when it answers 200, else 1.
    Healthcheck,
}

/// Every setting, as the user wrote it. Each is a flag and a `CHATGATE_*` variable.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Address to listen on.
    #[arg(
        long,
        env = "CHATGATE_LISTEN",
        default_value = "0.0.0.0:8000",
        global = true
    )]
    pub listen: String,
    /// Backend base URL (http:// or https://).
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
    /// Comma-separated CIDRs whose X-Forwarded-* headers are trusted.
    #[arg(
        long,
        env = "CHATGATE_TRUSTED_PROXIES",
        default_value = "",
        global = true
    )]
    pub trusted_proxies: String,
    /// Status of the /chat redirect: 301, 302, 303, 307 or 308.
    #[arg(
        long,
        env = "CHATGATE_CHAT_REDIRECT_STATUS",
        default_value = "307",
        global = true
    )]
    pub chat_redirect_status: String,
    /// /auth/config: on (always the stub), auto (backend, stub when it fails), off (backend).
    #[arg(long, env = "CHATGATE_AUTH_STUB", default_value = "on", global = true)]
    pub auth_stub: String,
    /// File whose contents replace the built-in /auth/config stub body.
    #[arg(long, env = "CHATGATE_AUTH_STUB_FILE", global = true)]
    pub auth_stub_file: Option<PathBuf>,
    /// The backend's Socket.IO mount; /socket.io/... is mapped onto it.
    #[arg(
        long,
        env = "CHATGATE_SOCKETIO_PATH",
        default_value = "/ws/socket.io/",
        global = true
    )]
    pub socketio_path: String,
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
    /// Seconds a pooled backend connection may idle (keep below the backend's own: uvicorn 5).
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
    /// Seconds a client has to send a request's headers (slowloris guard). An idle
    /// keep-alive connection is closed after this long too: waiting for the next request's
    /// headers is the same wait.
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
    /// Seconds of silence on a relayed WebSocket before chatgate pings the client.
    #[arg(
        long,
        env = "CHATGATE_WS_PING_INTERVAL",
        default_value = "30",
        global = true
    )]
    pub ws_ping_interval: String,
    /// Seconds to wait for any frame after a ping before closing the relay.
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
    /// Largest request body in bytes (413 beyond it).
    #[arg(
        long,
        env = "CHATGATE_MAX_BODY_BYTES",
        default_value = "2147483648",
        global = true
    )]
    pub max_body_bytes: String,
    /// Most client connections at once; beyond it new ones get a fast 503 and are closed.
    #[arg(
        long,
        env = "CHATGATE_MAX_CONNECTIONS",
        default_value = "10000",
        global = true
    )]
    pub max_connections: String,
    /// Per-client rate of ordinary HTTP requests, e.g. 600/minute (off when empty).
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_HTTP",
        default_value = "",
        global = true
    )]
    pub rate_limit_http: String,
    /// Per-client rate of WebSocket upgrades, e.g. 10/minute (off when empty).
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_WEBSOCKET",
        default_value = "",
        global = true
    )]
    pub rate_limit_websocket: String,
    /// Per-client rate of new Engine.IO sessions (polling handshakes), e.g. 10/minute.
    #[arg(
        long,
        env = "CHATGATE_RATE_LIMIT_ENGINEIO",
        default_value = "",
        global = true
    )]
    pub rate_limit_engineio: String,
    /// Comma-separated origins allowed to open Socket.IO sessions and WebSockets
    /// (e.g. https://chat.example); empty allows any.
    #[arg(
        long,
        env = "CHATGATE_ALLOWED_ORIGINS",
        default_value = "",
        global = true
    )]
    pub allowed_origins: String,
    /// on: add Secure, HttpOnly and SameSite=Lax to the backend's cookies where missing.
    #[arg(
        long,
        env = "CHATGATE_HARDEN_COOKIES",
        default_value = "off",
        global = true
    )]
    pub harden_cookies: String,
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

impl Cli {
    /// Parses `args` (program name first) with `env` as the source of `CHATGATE_*` values.
    ///
    /// clap reads the process environment itself; to keep tests hermetic, each argument's
    /// variable is looked up through `env` and turned into that argument's default instead.
    pub fn parse_with(
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Cli, clap::Error> {
        let mut command = Cli::command();
        let overrides: Vec<(clap::Id, String)> = command
            .get_arguments()
            .filter_map(|arg| {
                let name = arg.get_env()?.to_str()?;
                env(name).map(|value| (arg.get_id().clone(), value))
            })
            .collect();
        for (id, value) in overrides {
            command = command.mut_arg(id, |arg| arg.env(None).default_value(value));
        }
        let matches = command.try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }
}

/// How `/auth/config` is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStubMode {
    On,
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

/// The backend, split once so the hot path never parses a URL.
#[derive(Debug, Clone)]
pub struct Backend {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// `scheme://host:port` without credentials, for logs and the health document.
    pub display: String,
    pub host: String,
    pub port: u16,
}

/// Validated configuration. Durations are real durations, addresses real addresses.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub backend: Backend,
    pub backend_host: Option<HeaderValue>,
    pub trusted_proxies: Vec<IpNet>,
    pub chat_redirect_status: StatusCode,
    pub auth_stub: AuthStubMode,
    pub auth_stub_body: bytes::Bytes,
    pub socketio_path: String,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub health_path: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub backend_wait: Option<Duration>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub ws_max_message: usize,
    pub ws_max_frame: usize,
    pub ws_ping_interval: Duration,
    pub ws_pong_timeout: Duration,
    pub ws_handshake_timeout: Duration,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub rate_limit_http: Option<Rate>,
    pub rate_limit_websocket: Option<Rate>,
    pub rate_limit_engineio: Option<Rate>,
    pub allowed_origins: Vec<String>,
    pub harden_cookies: bool,
    pub admin_listen: Option<SocketAddr>,
}

/// The Chainlit 2.x `/auth/config` answer with login off. The frontend treats login as off
/// when the object is truthy and `requireLogin` is falsy, and takes its theme from
/// `default_theme` (missing: "system"); `null` or a 404 leaves its UI spinning.
pub const DEFAULT_AUTH_STUB: &str = r#"{"requireLogin":false,"passwordAuth":false,"headerAuth":false,"oauthProviders":[],"default_theme":"dark","ui":{"login_page_image":null,"login_page_image_filter":null,"login_page_image_dark_filter":null}}"#;

/// A setting that failed validation: which one, what was given, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} / {env} {value:?}: {reason}")]
pub struct ConfigError {
    pub flag: String,
    pub env: String,
    pub value: String,
    pub reason: String,
}

fn invalid(flag: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag: format!("--{flag}"),
        env: format!("CHATGATE_{}", flag.replace('-', "_").to_uppercase()),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn seconds(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let secs: f64 = value
        .trim()
        .parse()
        .map_err(|_| invalid(flag, value, "expected a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(invalid(
            flag,
            value,
            "expected seconds between 0 and a year",
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn positive_seconds(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let duration = seconds(flag, value)?;
    if duration.is_zero() {
        return Err(invalid(flag, value, "must be more than 0"));
    }
    Ok(duration)
}

fn count(flag: &str, value: &str, min: usize, max: usize) -> Result<usize, ConfigError> {
    let n: usize = value
        .trim()
        .parse()
        .map_err(|_| invalid(flag, value, "expected a whole number"))?;
    if !(min..=max).contains(&n) {
        return Err(invalid(
            flag,
            value,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

/// Parses the backend URL: http or https, a host, no path beyond `/`, no query. Errors
/// never repeat the credentials a URL may carry.
pub fn parse_backend(value: &str) -> Result<Backend, ConfigError> {
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

fn parse_backend_unredacted(value: &str) -> Result<Backend, ConfigError> {
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
    Ok(Backend {
        display: format!("{scheme}://{authority}"),
        host: host.to_owned(),
        port,
        scheme,
        authority,
    })
}

/// Parses a comma-separated CIDR list; a bare address counts as a single-host network.
pub fn parse_trusted_proxies(value: &str) -> Result<Vec<IpNet>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| invalid("trusted-proxies", value, format!("{item:?} is not a CIDR")))
        })
        .collect()
}

impl Config {
    /// Validates every setting; the first bad one is reported.
    pub fn from_settings(s: &Settings) -> Result<Config, ConfigError> {
        let listen: SocketAddr =
            s.listen.trim().parse().map_err(|_| {
                invalid("listen", &s.listen, "expected host:port, e.g. 0.0.0.0:8000")
            })?;
        let backend = parse_backend(&s.backend)?;
        let backend_host = s
            .backend_host
            .as_deref()
            .filter(|h| !h.trim().is_empty())
            .map(|h| {
                h.trim()
                    .parse::<http::uri::Authority>()
                    .ok()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                    .ok_or_else(|| invalid("backend-host", h, "expected a host[:port]"))
            })
            .transpose()?;
        let trusted_proxies = parse_trusted_proxies(&s.trusted_proxies)?;
        let chat_redirect_status = match s.chat_redirect_status.trim() {
            "301" => StatusCode::MOVED_PERMANENTLY,
            "302" => StatusCode::FOUND,
            "303" => StatusCode::SEE_OTHER,
            "307" => StatusCode::TEMPORARY_REDIRECT,
            "308" => StatusCode::PERMANENT_REDIRECT,
            _ => {
                return Err(invalid(
                    "chat-redirect-status",
                    &s.chat_redirect_status,
                    "expected 301, 302, 303, 307 or 308",
                ));
            }
        };
        let auth_stub = match s.auth_stub.trim() {
            "on" => AuthStubMode::On,
            "auto" => AuthStubMode::Auto,
            "off" => AuthStubMode::Off,
            _ => {
                return Err(invalid(
                    "auth-stub",
                    &s.auth_stub,
                    "expected on, auto or off",
                ));
            }
        };
        let auth_stub_body = match &s.auth_stub_file {
            None => bytes::Bytes::from_static(DEFAULT_AUTH_STUB.as_bytes()),
            Some(path) => std::fs::read(path).map(bytes::Bytes::from).map_err(|e| {
                invalid("auth-stub-file", &path.display().to_string(), e.to_string())
            })?,
        };
        let socketio_path = s.socketio_path.trim().to_owned();
        if !socketio_path.starts_with('/') || !socketio_path.ends_with('/') {
            return Err(invalid(
                "socketio-path",
                &s.socketio_path,
                "must start and end with /",
            ));
        }
        if socketio_path.parse::<http::uri::PathAndQuery>().is_err() || socketio_path.contains('?')
        {
            return Err(invalid(
                "socketio-path",
                &s.socketio_path,
                "not a valid path",
            ));
        }
        let health_path = s.health_path.trim().to_owned();
        if !health_path.starts_with('/') || health_path.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Err(invalid(
                "health-path",
                &s.health_path,
                "must be a path starting with /",
            ));
        }
        let backend_wait = seconds("backend-wait", &s.backend_wait)?;
        let log_format = match s.log_format.trim() {
            "auto" => LogFormat::Auto,
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            _ => {
                return Err(invalid(
                    "log-format",
                    &s.log_format,
                    "expected auto, json or text",
                ));
            }
        };
        let rate = |flag: &str, value: &str| parse_rate(value).map_err(|e| invalid(flag, value, e));
        let allowed_origins = s
            .allowed_origins
            .split(',')
            .filter(|o| !o.trim().is_empty())
            .map(|o| parse_origin(o).map_err(|e| invalid("allowed-origins", &s.allowed_origins, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let harden_cookies = match s.harden_cookies.trim() {
            "on" | "true" | "1" => true,
            "off" | "false" | "0" | "" => false,
            _ => {
                return Err(invalid(
                    "harden-cookies",
                    &s.harden_cookies,
                    "expected on or off",
                ));
            }
        };
        let admin_listen = match s.admin_listen.trim() {
            "" | "off" => None,
            addr => Some(addr.parse().map_err(|_| {
                invalid("admin-listen", &s.admin_listen, "expected host:port or off")
            })?),
        };
        let max_body_bytes: u64 = s.max_body_bytes.trim().parse().map_err(|_| {
            invalid(
                "max-body-bytes",
                &s.max_body_bytes,
                "expected a number of bytes",
            )
        })?;
        Ok(Config {
            max_body_bytes,
            max_connections: count("max-connections", &s.max_connections, 1, 10_000_000)?,
            rate_limit_http: rate("rate-limit-http", &s.rate_limit_http)?,
            rate_limit_websocket: rate("rate-limit-websocket", &s.rate_limit_websocket)?,
            rate_limit_engineio: rate("rate-limit-engineio", &s.rate_limit_engineio)?,
            allowed_origins,
            harden_cookies,
            admin_listen,
            listen,
            backend,
            backend_host,
            trusted_proxies,
            chat_redirect_status,
            auth_stub,
            auth_stub_body,
            socketio_path,
            health_interval: positive_seconds("health-interval", &s.health_interval)?,
            health_timeout: positive_seconds("health-timeout", &s.health_timeout)?,
            health_path,
            connect_timeout: positive_seconds("connect-timeout", &s.connect_timeout)?,
            response_timeout: positive_seconds("response-timeout", &s.response_timeout)?,
            body_idle_timeout: positive_seconds("body-idle-timeout", &s.body_idle_timeout)?,
            pool_idle_timeout: positive_seconds("pool-idle-timeout", &s.pool_idle_timeout)?,
            backend_wait: (!backend_wait.is_zero()).then_some(backend_wait),
            header_read_timeout: positive_seconds("header-read-timeout", &s.header_read_timeout)?,
            max_header_bytes: count("max-header-bytes", &s.max_header_bytes, 1024, 1 << 20)?,
            max_headers: count("max-headers", &s.max_headers, 8, 1000)?,
            ws_max_message: count("ws-max-message", &s.ws_max_message, 1024, 1 << 30)?,
            ws_max_frame: count("ws-max-frame", &s.ws_max_frame, 1024, 1 << 30)?,
            ws_ping_interval: positive_seconds("ws-ping-interval", &s.ws_ping_interval)?,
            ws_pong_timeout: positive_seconds("ws-pong-timeout", &s.ws_pong_timeout)?,
            ws_handshake_timeout: positive_seconds(
                "ws-handshake-timeout",
                &s.ws_handshake_timeout,
            )?,
            shutdown_delay: seconds("shutdown-delay", &s.shutdown_delay)?,
            // Zero would exit before an open relay's 1001 went out.
            shutdown_grace: positive_seconds("shutdown-grace", &s.shutdown_grace)?,
            log_format,
        })
    }

    /// The effective configuration as `key = value` lines for `check-config`. The backend is
    /// shown without credentials; the stub body by its size only.
    pub fn describe(&self) -> String {
        let proxies: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        let lines = [
            ("listen", self.listen.to_string()),
            ("backend", self.backend.display.clone()),
            (
                "backend_host",
                self.backend_host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("(client's Host)")
                    .to_owned(),
            ),
            ("trusted_proxies", proxies.join(",")),
            (
                "chat_redirect_status",
                self.chat_redirect_status.as_u16().to_string(),
            ),
            ("auth_stub", format!("{:?}", self.auth_stub).to_lowercase()),
            (
                "auth_stub_body",
                format!("{} bytes", self.auth_stub_body.len()),
            ),
            ("socketio_path", self.socketio_path.clone()),
            ("health_interval", format!("{:?}", self.health_interval)),
            ("health_timeout", format!("{:?}", self.health_timeout)),
            ("health_path", self.health_path.clone()),
            ("connect_timeout", format!("{:?}", self.connect_timeout)),
            ("response_timeout", format!("{:?}", self.response_timeout)),
            ("body_idle_timeout", format!("{:?}", self.body_idle_timeout)),
            ("pool_idle_timeout", format!("{:?}", self.pool_idle_timeout)),
            (
                "backend_wait",
                self.backend_wait
                    .map_or("off".to_owned(), |d| format!("{d:?}")),
            ),
            (
                "header_read_timeout",
                format!("{:?}", self.header_read_timeout),
            ),
            ("max_header_bytes", self.max_header_bytes.to_string()),
            ("max_headers", self.max_headers.to_string()),
            ("ws_max_message", self.ws_max_message.to_string()),
            ("ws_max_frame", self.ws_max_frame.to_string()),
            ("ws_ping_interval", format!("{:?}", self.ws_ping_interval)),
            ("ws_pong_timeout", format!("{:?}", self.ws_pong_timeout)),
            (
                "ws_handshake_timeout",
                format!("{:?}", self.ws_handshake_timeout),
            ),
            ("shutdown_delay", format!("{:?}", self.shutdown_delay)),
            ("shutdown_grace", format!("{:?}", self.shutdown_grace)),
            (
                "log_format",
                format!("{:?}", self.log_format).to_lowercase(),
            ),
            ("max_body_bytes", self.max_body_bytes.to_string()),
            ("max_connections", self.max_connections.to_string()),
            ("rate_limit_http", describe_rate(self.rate_limit_http)),
            (
                "rate_limit_websocket",
                describe_rate(self.rate_limit_websocket),
            ),
            (
                "rate_limit_engineio",
                describe_rate(self.rate_limit_engineio),
            ),
            ("allowed_origins", self.allowed_origins.join(",")),
            (
                "harden_cookies",
                if self.harden_cookies { "on" } else { "off" }.to_owned(),
            ),
            (
                "admin_listen",
                self.admin_listen
                    .map_or("off".to_owned(), |a| a.to_string()),
            ),
        ];
        lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }
}

fn describe_rate(rate: Option<Rate>) -> String {
    rate.map_or("off".to_owned(), |r| {
        format!("{}/{}s", r.count, r.period.as_secs())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = std::iter::once("chatgate").chain(args.iter().copied());
        let cli = Cli::parse_with(argv, |k| env.get(k).cloned()).map_err(|e| e.to_string())?;
        Config::from_settings(&cli.settings).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_listen_on_8000_in_front_of_8080() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.backend.display, "http://127.0.0.1:8080");
        assert_eq!(c.chat_redirect_status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(c.auth_stub, AuthStubMode::On);
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert!(c.backend_wait.is_none());
        assert!(c.trusted_proxies.is_empty());
    }

    #[test]
    fn environment_sets_values_and_flags_win_over_it() {
        let env = [
            ("CHATGATE_LISTEN", "127.0.0.1:9000"),
            ("CHATGATE_BACKEND", "http://b:1"),
        ];
        let c = config(&[], &env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.backend.display, "http://b:1");
        let c = config(&["--listen", "127.0.0.1:9001"], &env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9001".parse().unwrap());
    }

    #[test]
    fn bad_values_name_the_setting() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case<'_>] = &[
            (
                &["--backend", "ftp://x"],
                &[],
                "--backend / CHATGATE_BACKEND",
            ),
            (&["--backend", "http://"], &[], "CHATGATE_BACKEND"),
            (&["--backend", "http://x/app"], &[], "CHATGATE_BACKEND"),
            (&[], &[("CHATGATE_LISTEN", "nowhere")], "CHATGATE_LISTEN"),
            (
                &["--trusted-proxies", "10.0.0.0/8,bogus"],
                &[],
                "CHATGATE_TRUSTED_PROXIES",
            ),
            (&["--auth-stub", "maybe"], &[], "CHATGATE_AUTH_STUB"),
            (
                &["--auth-stub-file", "/nonexistent/stub.json"],
                &[],
                "CHATGATE_AUTH_STUB_FILE",
            ),
            (
                &["--chat-redirect-status", "200"],
                &[],
                "CHATGATE_CHAT_REDIRECT_STATUS",
            ),
            (&["--shutdown-grace=-1"], &[], "CHATGATE_SHUTDOWN_GRACE"),
            (&["--health-interval", "0"], &[], "CHATGATE_HEALTH_INTERVAL"),
            (
                &["--socketio-path", "ws/socket.io"],
                &[],
                "CHATGATE_SOCKETIO_PATH",
            ),
            (&["--max-headers", "lots"], &[], "CHATGATE_MAX_HEADERS"),
            (
                &["--rate-limit-websocket", "10/fortnight"],
                &[],
                "CHATGATE_RATE_LIMIT_WEBSOCKET",
            ),
            (
                &["--allowed-origins", "chat.example"],
                &[],
                "CHATGATE_ALLOWED_ORIGINS",
            ),
            (
                &["--harden-cookies", "maybe"],
                &[],
                "CHATGATE_HARDEN_COOKIES",
            ),
            (&["--admin-listen", "9100"], &[], "CHATGATE_ADMIN_LISTEN"),
            (&["--max-body-bytes", "1G"], &[], "CHATGATE_MAX_BODY_BYTES"),
        ];
        for (args, env, expected) in cases {
            let err = config(args, env).unwrap_err();
            assert!(err.contains(expected), "{args:?} {env:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }

    #[test]
    fn backend_credentials_never_reach_the_display_form() {
        let b = parse_backend("https://user:secret@app.internal:8443").unwrap();
        assert_eq!(b.display, "https://app.internal:8443");
        assert_eq!(b.port, 8443);
        assert!(!format!("{b:?}").contains("secret"));
        let c = config(&["--backend", "http://u:hunter2@127.0.0.1:9"], &[]).unwrap();
        assert!(!c.describe().contains("hunter2"));
    }

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

    #[test]
    fn trusted_proxies_take_cidrs_and_bare_addresses() {
        let nets = parse_trusted_proxies(" 10.0.0.0/8, 127.0.0.1 ,::1,").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
        assert!(parse_trusted_proxies("").unwrap().is_empty());
    }

    #[test]
    fn subcommands_parse() {
        let cli = Cli::parse_with(["chatgate", "check-config"], |_| None).unwrap();
        assert_eq!(cli.command, Some(Command::CheckConfig));
        let cli = Cli::parse_with(
            ["chatgate", "healthcheck", "--listen", "127.0.0.1:1"],
            |_| None,
        )
        .unwrap();
        assert_eq!(cli.command, Some(Command::Healthcheck));
        assert_eq!(cli.settings.listen, "127.0.0.1:1");
    }
}
