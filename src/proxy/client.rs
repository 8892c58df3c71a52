//! The pooled keep-alive client to the backend (http or https), and how its errors are told
//! apart: refused, timed out, or failed after connecting.

use std::error::Error as StdError;
use std::io;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::RequestBody;
use crate::config::Config;
use crate::error::ProxyError;

pub type Connector = HttpsConnector<HttpConnector>;
pub type BackendClient = Client<Connector, RequestBody>;

/// The TLS client configuration for `https://` backends: rustls with the web PKI roots.
pub fn tls_config() -> rustls::ClientConfig {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        // ring supports the safe defaults; this arm only keeps the type checker honest.
        Err(_) => rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    }
}

/// A connector for `http://` and `https://` backends.
pub fn connector(config: &Config) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The request client: pooled, keep-alive, idle connections dropped before the backend's
/// own keep-alive timeout would close them under us (uvicorn: 5 s).
pub fn backend_client(config: &Config) -> BackendClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(1024)
        .retry_canceled_requests(true)
        .set_host(false)
        .build(connector(config))
}

fn io_kind(err: &(dyn StdError + 'static)) -> Option<io::ErrorKind> {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// Whether the backend actively refused the connection (nothing listens: starting up).
pub fn is_refused(err: &hyper_util::client::legacy::Error) -> bool {
    err.is_connect() && io_kind(err) == Some(io::ErrorKind::ConnectionRefused)
}

/// Maps a client error to where it came from.
pub fn classify(err: &hyper_util::client::legacy::Error) -> ProxyError {
    if err.is_connect() {
        return match io_kind(err) {
            Some(io::ErrorKind::ConnectionRefused) => ProxyError::BackendRefused,
            Some(io::ErrorKind::TimedOut) => ProxyError::BackendConnectTimeout,
            _ => ProxyError::BackendConnect(chain(err)),
        };
    }
    ProxyError::BackendReset(chain(err))
}

/// An error and its sources on one line.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
