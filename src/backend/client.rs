//! Reaching the backend: the connector the health probe uses (http or https), the transport
//! of a connection of chatgate's own (plain TCP or TLS: a WebSocket leg's, or a client
//! connection's, `owned.rs`), and how their errors are told apart: refused, timed out, or
//! failed after connecting.

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::BackendConfig;
use crate::error::{Cause, ProxyError};

pub type Connector = HttpsConnector<HttpConnector>;

/// The TLS client configuration for `https://` backends: rustls with the web PKI roots.
pub fn tls_config() -> rustls::ClientConfig {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
pub fn connector(config: &BackendConfig) -> Connector {
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

/// Why the WebSocket leg has no connection.
#[derive(Debug)]
pub enum LegError {
    /// Nothing listens at the backend: another worker may take the client.
    Refused(io::Error),
    Failed(ProxyError),
}

impl From<LegError> for ProxyError {
    fn from(err: LegError) -> ProxyError {
        match err {
            LegError::Refused(e) => ProxyError::BackendConnect(Cause::new(e)),
            LegError::Failed(e) => e,
        }
    }
}

/// Opens a connection to the backend (a WebSocket leg's, or a client connection's own:
/// `owned.rs`), TLS included for an `https://` backend; bounded by `--connect-timeout`.
pub async fn connect_stream(
    config: &BackendConfig,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<BackendStream, LegError> {
    connect_leg(config, tls).await.map_err(|e| match e {
        Ok(refused) => LegError::Refused(refused),
        Err(failed) => LegError::Failed(failed),
    })
}

async fn connect_leg(
    config: &BackendConfig,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<BackendStream, Result<io::Error, ProxyError>> {
    let url = &config.url;
    // An IP backend (the usual 127.0.0.1) is connected to directly: a host name would send
    // every handshake through the blocking resolver pool.
    let connect = async {
        match url.host.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect((ip, url.port)).await,
            Err(_) => TcpStream::connect((url.host.as_str(), url.port)).await,
        }
    };
    let tcp = match tokio::time::timeout(config.connect_timeout, connect).await {
        Err(_) => return Err(Err(ProxyError::BackendConnectTimeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(Ok(e)),
        Ok(Err(e)) => return Err(Err(ProxyError::BackendConnect(Cause::new(e)))),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    if !url.is_https() {
        return Ok(BackendStream::Plain(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| {
        Err(ProxyError::BackendConnect(Cause::msg(format!(
            "TLS name: {e}"
        ))))
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(tls)).connect(name, tcp);
    match tokio::time::timeout(config.connect_timeout, tls).await {
        Err(_) => Err(Err(ProxyError::BackendConnectTimeout)),
        Ok(Err(e)) => Err(Err(ProxyError::BackendConnect(Cause::msg(format!(
            "TLS: {e}"
        ))))),
        Ok(Ok(stream)) => Ok(BackendStream::Tls(Box::new(stream))),
    }
}

/// The WebSocket leg's transport: plain TCP or TLS.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
