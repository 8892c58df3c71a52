//! Settings of chatgate's own routes: the `/chat` redirect, the `/auth/config` stub, the
//! Socket.IO mount.

use std::path::PathBuf;

use clap::Args;
use http::StatusCode;

use super::values::{Line, Problems, invalid};

#[derive(Debug, Clone, Args)]
pub struct RoutesSettings {
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
}

/// How `/auth/config` is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStubMode {
    On,
    Auto,
    Off,
}

/// The Chainlit 2.x `/auth/config` answer with login off. The frontend treats login as off
/// when the object is truthy and `requireLogin` is falsy, and takes its theme from
/// `default_theme` (missing: "system"); `null` or a 404 leaves its UI spinning.
pub const DEFAULT_AUTH_STUB: &str = r#"{"requireLogin":false,"passwordAuth":false,"headerAuth":false,"oauthProviders":[],"default_theme":"dark","ui":{"login_page_image":null,"login_page_image_filter":null,"login_page_image_dark_filter":null}}"#;

#[derive(Debug, Clone)]
pub struct RoutesConfig {
    pub chat_redirect_status: StatusCode,
    pub auth_stub: AuthStubMode,
    pub auth_stub_body: bytes::Bytes,
    /// The backend's Socket.IO mount: starts and ends with `/`.
    pub socketio_path: String,
}

impl RoutesConfig {
    pub(super) fn validate(s: &RoutesSettings, p: &mut Problems) -> Option<RoutesConfig> {
        let chat_redirect_status = p.check(match s.chat_redirect_status.trim() {
            "301" => Ok(StatusCode::MOVED_PERMANENTLY),
            "302" => Ok(StatusCode::FOUND),
            "303" => Ok(StatusCode::SEE_OTHER),
            "307" => Ok(StatusCode::TEMPORARY_REDIRECT),
            "308" => Ok(StatusCode::PERMANENT_REDIRECT),
            _ => Err(invalid(
                "chat-redirect-status",
                &s.chat_redirect_status,
                "expected 301, 302, 303, 307 or 308",
            )),
        });
        let auth_stub = p.check(match s.auth_stub.trim() {
            "on" => Ok(AuthStubMode::On),
            "auto" => Ok(AuthStubMode::Auto),
            "off" => Ok(AuthStubMode::Off),
            _ => Err(invalid(
                "auth-stub",
                &s.auth_stub,
                "expected on, auto or off",
            )),
        });
        let auth_stub_body = p.check(match &s.auth_stub_file {
            None => Ok(bytes::Bytes::from_static(DEFAULT_AUTH_STUB.as_bytes())),
            Some(path) => std::fs::read(path)
                .map(bytes::Bytes::from)
                .map_err(|e| invalid("auth-stub-file", &path.display().to_string(), e.to_string())),
        });
        let socketio_path = p.check(socketio_path(&s.socketio_path));
        Some(RoutesConfig {
            chat_redirect_status: chat_redirect_status?,
            auth_stub: auth_stub?,
            auth_stub_body: auth_stub_body?,
            socketio_path: socketio_path?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        lines.extend([
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
        ]);
    }
}

fn socketio_path(value: &str) -> Result<String, super::ConfigError> {
    let path = value.trim().to_owned();
    if !path.starts_with('/') || !path.ends_with('/') {
        return Err(invalid("socketio-path", value, "must start and end with /"));
    }
    if path.parse::<http::uri::PathAndQuery>().is_err() || path.contains('?') {
        return Err(invalid("socketio-path", value, "not a valid path"));
    }
    Ok(path)
}
