//! The WebSocket relay: a client's upgrade is answered only after the backend accepted its
//! own (RFC 6455 §4), then messages travel one by one through tokio-tungstenite on both
//! legs, so that chatgate can count, limit, keep alive and close them properly.

use std::future::poll_fn;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::gateway::{Gateway, RequestContext};
use crate::metrics::Metrics;
use crate::proxy::forward::backend_request_head;
use crate::proxy::headers::{has_token, strip_hop_by_hop};

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_PROTOCOL: HeaderName = HeaderName::from_static("sec-websocket-protocol");
static SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");
static SEC_WEBSOCKET_EXTENSIONS: HeaderName = HeaderName::from_static("sec-websocket-extensions");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// Each leg's read buffer. tungstenite allocates it eagerly (default 128 KiB, ~256 KiB per
/// relay); chat messages are small, and a larger message just takes more reads.
pub const READ_BUFFER: usize = 1024;
/// Bytes of small messages gathered before a write; a flush happens anyway whenever the
/// sending side has nothing more ready, so this only batches bursts.
pub const WRITE_BUFFER: usize = 8 * 1024;
/// How long a closing handshake may take before the connections are dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Payload of chatgate's own keep-alive pings, so their pongs are not relayed.
const KEEPALIVE_PAYLOAD: &[u8] = b"chatgate-keepalive";

/// Whether a request asks for a WebSocket upgrade (`Connection` is matched by token:
/// `keep-alive, Upgrade` is common).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), &header::CONNECTION, "upgrade")
        && has_token(req.headers(), &header::UPGRADE, "websocket")
}

/// Checks the client's handshake (RFC 6455 §4.2.1) and returns its key. A bad one is
/// refused here and never reaches the backend.
pub fn validate_handshake<B>(req: &Request<B>) -> Result<HeaderValue, ProxyError> {
    if req.method() != Method::GET {
        return Err(ProxyError::BadRequest("WebSocket handshake must be GET"));
    }
    if req
        .headers()
        .get(&SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ProxyError::BadRequest("Sec-WebSocket-Version must be 13"));
    }
    let key = req
        .headers()
        .get(&SEC_WEBSOCKET_KEY)
        .ok_or(ProxyError::BadRequest("missing Sec-WebSocket-Key"))?;
    // A base64-encoded 16-byte nonce is exactly 24 characters ending in "==".
    let bytes = key.as_bytes();
    let base64ish = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/');
    if bytes.len() != 24 || !bytes[..22].iter().all(base64ish) || &bytes[22..] != b"==" {
        return Err(ProxyError::BadRequest("malformed Sec-WebSocket-Key"));
    }
    Ok(key.clone())
}

/// The backend leg's handshake request: the client's end-to-end headers (cookies, origin,
/// authorization, subprotocols, user agent, forwarded headers), a fresh key, and never
/// `Sec-WebSocket-Extensions`: tungstenite has no permessage-deflate, and compressed frames
/// would break the relay.
pub fn backend_handshake_request(uri: Uri, mut headers: HeaderMap) -> Request<()> {
    strip_hop_by_hop(&mut headers);
    for name in [
        &SEC_WEBSOCKET_KEY,
        &SEC_WEBSOCKET_VERSION,
        &SEC_WEBSOCKET_EXTENSIONS,
        &SEC_WEBSOCKET_ACCEPT,
        &header::CONTENT_LENGTH,
    ] {
        headers.remove(name);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        SEC_WEBSOCKET_VERSION.clone(),
        HeaderValue::from_static("13"),
    );
    if let Ok(key) = HeaderValue::from_str(&generate_key()) {
        headers.insert(SEC_WEBSOCKET_KEY.clone(), key);
    }
    let mut request = Request::new(());
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// The 101 for the client: built here (the forwarder's hop-by-hop stripping would eat
/// `Upgrade`/`Connection`), with the accept key derived from the client's key, the
/// subprotocol the backend chose, and the backend's other end-to-end headers (cookies).
pub fn switching_protocols(
    client_key: &HeaderValue,
    backend_headers: &HeaderMap,
) -> Response<ProxyBody> {
    let mut headers = backend_headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(&SEC_WEBSOCKET_ACCEPT);
    headers.remove(&SEC_WEBSOCKET_EXTENSIONS);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(client_key.as_bytes())) {
        headers.insert(SEC_WEBSOCKET_ACCEPT.clone(), accept);
    }
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = headers;
    response
}

/// Relays a WebSocket upgrade: backend first, then the client's 101, then messages.
pub async fn relay(
    gw: &Gateway,
    mut req: Request<Incoming>,
    ctx: &RequestContext,
    path_and_query: Option<PathAndQuery>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_key = validate_handshake(&req)?;
    if gw.shutdown.is_cancelled() || gw.backend.is_draining() {
        return Err(ProxyError::Draining);
    }
    // The relay outlives the HTTP connection it came on (hyper lets go of it at the
    // upgrade), so it holds a connection slot of its own.
    let slot = Arc::clone(&gw.connection_slots)
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    backend_request_head(gw, &mut parts, ctx, path_and_query)?;
    let ws_scheme = if gw.config.backend.scheme == http::uri::Scheme::HTTPS {
        "wss"
    } else {
        "ws"
    };
    let backend_uri = Uri::builder()
        .scheme(ws_scheme)
        .authority(gw.config.backend.authority.clone())
        .path_and_query(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
        .build()
        .map_err(|_| ProxyError::BadRequest("unusable request target"))?;
    let request = backend_handshake_request(backend_uri, parts.headers);

    let config = ws_config(gw);
    let mut stream = connect_backend(gw).await?;
    let handshake = backend_handshake(&mut stream, &request);
    let (backend_headers, leftover) =
        match tokio::time::timeout(gw.config.ws_handshake_timeout, handshake).await {
            Err(_) => return Err(ProxyError::BackendTimeout(gw.config.ws_handshake_timeout)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(BackendAnswer::Refused(refusal))) => return Ok(*refusal),
            Ok(Ok(BackendAnswer::Accepted { headers, leftover })) => (headers, leftover),
        };
    // Built from what was read, so that `read_buffer_size` applies to this leg too
    // (tungstenite's own client handshake would leave its 4 KiB read buffer behind).
    let backend_ws =
        WebSocketStream::from_partially_read(stream, leftover, Role::Client, Some(config)).await;

    let response = switching_protocols(&client_key, &backend_headers);
    let settings = RelaySettings {
        ping_interval: gw.config.ws_ping_interval,
        pong_timeout: gw.config.ws_pong_timeout,
        shutdown: gw.shutdown.clone(),
        metrics: Arc::clone(&gw.metrics),
    };
    let mut line = RelayLine {
        path: ctx.uri.path().to_owned(),
        request_id: ctx.request_id.clone(),
        client: ctx.client,
        started: Instant::now(),
        stats: RelayStats::default(),
    };
    let backend_state = Arc::clone(&gw.backend);
    backend_state
        .websocket_relays
        .fetch_add(1, Ordering::Relaxed);
    gw.tasks.spawn(async move {
        let _slot = slot;
        match on_upgrade.await {
            Ok(upgraded) => {
                let client_ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                line.stats = run(client_ws, backend_ws, &settings).await;
            }
            Err(e) => {
                line.stats.error = Some(format!("client upgrade failed: {e}"));
                let mut backend_ws = backend_ws;
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT,
                    backend_ws.close(Some(close_frame(CloseCode::Away, "client went away"))),
                )
                .await;
            }
        }
        backend_state
            .websocket_relays
            .fetch_sub(1, Ordering::Relaxed);
        settings.metrics.websocket_closed(line.stats.close_code);
        line.emit();
    });
    Ok(response)
}

fn ws_config(gw: &Gateway) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + gw.config.ws_max_message + 64)
        .max_message_size(Some(gw.config.ws_max_message))
        .max_frame_size(Some(gw.config.ws_max_frame))
}

/// Largest handshake answer head read from the backend.
const MAX_HANDSHAKE_HEAD: usize = 16 * 1024;
/// Largest refusal body passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// What the backend said to the upgrade.
enum BackendAnswer {
    /// 101: its headers, and any bytes that came after them (the first frames).
    Accepted {
        headers: HeaderMap,
        leftover: Vec<u8>,
    },
    /// Anything else, as the client's answer: status, end-to-end headers, body.
    Refused(Box<Response<ProxyBody>>),
}

/// The backend leg's opening handshake (RFC 6455 §4.1), read into a small buffer. The caller
/// bounds it in time.
async fn backend_handshake(
    stream: &mut BackendStream,
    request: &Request<()>,
) -> Result<BackendAnswer, ProxyError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |what: String| ProxyError::BackendReset(format!("WebSocket handshake: {what}"));
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream
        .write_all(&head)
        .await
        .map_err(|e| failed(e.to_string()))?;
    stream.flush().await.map_err(|e| failed(e.to_string()))?;

    let mut buf = head;
    buf.clear();
    let (status, headers, head_len) = loop {
        if buf.len() >= MAX_HANDSHAKE_HEAD {
            return Err(failed("answer head too large".into()));
        }
        buf.reserve(1024);
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| failed(e.to_string()))?
            == 0
        {
            return Err(failed("connection closed before an answer".into()));
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut slots);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(failed(format!("malformed answer: {e}"))),
            Ok(httparse::Status::Complete(len)) => {
                let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
                    .map_err(|_| failed("bad status".into()))?;
                let mut headers = HeaderMap::with_capacity(parsed.headers.len());
                for h in parsed.headers.iter() {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(h.name.as_bytes()),
                        HeaderValue::from_bytes(h.value),
                    ) {
                        headers.append(name, value);
                    }
                }
                break (status, headers, len);
            }
        }
    };
    let rest = buf.split_off(head_len);

    if status != StatusCode::SWITCHING_PROTOCOLS {
        // A refusal: pass its body on, as much as it declared (bounded).
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(rest.len())
            .min(MAX_REFUSAL_BODY);
        let mut body = rest;
        while body.len() < declared {
            body.reserve(declared - body.len());
            match stream.read_buf(&mut body).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        body.truncate(declared);
        let mut refusal = Response::new(ProxyBody::full(Bytes::from(body)));
        *refusal.status_mut() = status;
        let mut headers = headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        *refusal.headers_mut() = headers;
        return Ok(BackendAnswer::Refused(Box::new(refusal)));
    }

    let key = request
        .headers()
        .get(&SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let accept_ok = headers
        .get(&SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|a| a.as_bytes() == derive_accept_key(key).as_bytes());
    if !accept_ok || !has_token(&headers, &header::UPGRADE, "websocket") {
        return Err(failed(
            "101 without a valid Sec-WebSocket-Accept and Upgrade".into(),
        ));
    }
    // RFC 6455 §4.1: a subprotocol the client did not offer fails the connection.
    if let Some(chosen) = headers.get(&SEC_WEBSOCKET_PROTOCOL) {
        let offered = has_token(
            request.headers(),
            &SEC_WEBSOCKET_PROTOCOL,
            chosen.to_str().unwrap_or("\0"),
        );
        if !offered {
            return Err(failed(
                "backend chose a subprotocol that was not offered".into(),
            ));
        }
    }
    if headers.contains_key(&SEC_WEBSOCKET_EXTENSIONS) {
        return Err(failed(
            "backend enabled an extension that was not offered".into(),
        ));
    }
    Ok(BackendAnswer::Accepted {
        headers,
        leftover: rest,
    })
}

async fn connect_backend(gw: &Gateway) -> Result<BackendStream, ProxyError> {
    let backend = &gw.config.backend;
    // An IP backend (the usual 127.0.0.1) is connected to directly: a host name would send
    // every handshake through the blocking resolver pool.
    let connect = async {
        match backend.host.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect((ip, backend.port)).await,
            Err(_) => TcpStream::connect((backend.host.as_str(), backend.port)).await,
        }
    };
    let tcp = match tokio::time::timeout(gw.config.connect_timeout, connect).await {
        Err(_) => return Err(ProxyError::BackendConnectTimeout),
        Ok(Err(e)) => return Err(ProxyError::BackendConnect(e.to_string())),
        Ok(Ok(tcp)) => tcp,
    };
    let _ = tcp.set_nodelay(true);
    if backend.scheme != http::uri::Scheme::HTTPS {
        return Ok(BackendStream::Plain(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(backend.host.clone())
        .map_err(|e| ProxyError::BackendConnect(format!("TLS name: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&gw.tls)).connect(name, tcp);
    match tokio::time::timeout(gw.config.connect_timeout, tls).await {
        Err(_) => Err(ProxyError::BackendConnectTimeout),
        Ok(Err(e)) => Err(ProxyError::BackendConnect(format!("TLS: {e}"))),
        Ok(Ok(stream)) => Ok(BackendStream::Tls(Box::new(stream))),
    }
}

/// The backend leg's transport: plain TCP or TLS.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
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
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a relay needs beyond its two sockets.
pub struct RelaySettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub shutdown: CancellationToken,
    /// Message counts are added here at each keep-alive tick and at the end, not per
    /// message: a long chat shows up within one ping interval, at no per-message cost.
    pub metrics: Arc<Metrics>,
}

/// Adds what a relay moved since the last report to the message counters.
fn report(settings: &RelaySettings, c2b: &Direction, b2c: &Direction, reported: &mut (u64, u64)) {
    let metrics = &settings.metrics;
    metrics
        .ws_messages_to_backend
        .increment(c2b.messages - reported.0);
    metrics
        .ws_messages_to_client
        .increment(b2c.messages - reported.1);
    *reported = (c2b.messages, b2c.messages);
}

/// Counts for the relay's access line.
#[derive(Debug, Default, Clone)]
pub struct RelayStats {
    pub client_to_backend: Direction,
    pub backend_to_client: Direction,
    pub closed_by: &'static str,
    pub close_code: Option<u16>,
    pub error: Option<String>,
}

/// One direction of a relay: the message waiting for the other side to accept it (never
/// more than one: backpressure), and counts.
#[derive(Debug, Default, Clone)]
pub struct Direction {
    pending: Option<Message>,
    unflushed: bool,
    pub messages: u64,
    pub bytes: u64,
}

/// Why one side's stream stopped.
#[derive(Debug)]
enum End {
    /// The side sent a Close frame.
    Closed(Option<CloseFrame>),
    /// The side's stream ended without a Close (connection dropped).
    Vanished,
    /// Reading from the side failed: too large, protocol violation, or I/O.
    ReadError(WsError),
    /// Writing to the *other* side failed: it is gone.
    WriteError(WsError),
}

enum Event {
    Client(End),
    Backend(End),
    Shutdown,
    PingTimeout,
}

/// Moves messages from `src` to `dst` until neither can make progress. `Ready` when this
/// direction has ended.
fn poll_direction<S, D>(
    cx: &mut Context<'_>,
    src: &mut WebSocketStream<S>,
    dst: &mut WebSocketStream<D>,
    dir: &mut Direction,
    mut src_activity: Option<&mut Instant>,
    drop_keepalive_pongs: bool,
) -> Poll<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        if let Some(message) = dir.pending.take() {
            match Pin::new(&mut *dst).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if let Err(e) = Pin::new(&mut *dst).start_send(message) {
                        return Poll::Ready(End::WriteError(e));
                    }
                    dir.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(End::WriteError(e)),
                Poll::Pending => {
                    dir.pending = Some(message);
                    break;
                }
            }
        }
        match Pin::new(&mut *src).poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => {
                if let Some(seen) = src_activity.as_deref_mut() {
                    *seen = Instant::now();
                }
                match message {
                    Message::Close(frame) => return Poll::Ready(End::Closed(frame)),
                    Message::Text(ref t) => {
                        dir.messages += 1;
                        dir.bytes += t.len() as u64;
                    }
                    Message::Binary(ref b) => {
                        dir.messages += 1;
                        dir.bytes += b.len() as u64;
                    }
                    Message::Pong(ref p)
                        if drop_keepalive_pongs && p.as_ref() == KEEPALIVE_PAYLOAD =>
                    {
                        continue;
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Frame(_) => continue,
                }
                dir.pending = Some(message);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(End::ReadError(e)),
            Poll::Ready(None) => return Poll::Ready(End::Vanished),
            Poll::Pending => break,
        }
    }
    if dir.unflushed {
        match Pin::new(&mut *dst).poll_flush(cx) {
            Poll::Ready(Ok(())) => dir.unflushed = false,
            Poll::Ready(Err(e)) => return Poll::Ready(End::WriteError(e)),
            Poll::Pending => {}
        }
    }
    Poll::Pending
}

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }
}

/// The close code a side earns for a read error: 1009 for too large, 1007 for bad UTF-8,
/// 1002 for other protocol violations; `None` when the connection itself failed.
fn offender_code(error: &WsError) -> Option<CloseCode> {
    match error {
        WsError::Capacity(_) => Some(CloseCode::Size),
        WsError::Utf8(_) => Some(CloseCode::Invalid),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some(CloseCode::Protocol),
        _ => None,
    }
}

/// Runs a relay to its end and returns its counts.
pub async fn run<C, B>(
    mut client: WebSocketStream<C>,
    mut backend: WebSocketStream<B>,
    settings: &RelaySettings,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = RelayStats::default();
    let mut c2b = Direction::default();
    let mut b2c = Direction::default();
    let mut last_client_frame = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut reported = (0u64, 0u64);
    let mut keepalive: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(settings.ping_interval));
    let shutdown = settings.shutdown.cancelled();
    tokio::pin!(shutdown);

    let event = poll_fn(|cx| {
        if shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Shutdown);
        }
        // Keep-alive: ping an idle client, give up on one that stays silent after a ping.
        while keepalive.as_mut().poll(cx).is_ready() {
            report(settings, &c2b, &b2c, &mut reported);
            let now = Instant::now();
            if let Some(sent) = ping_sent {
                if last_client_frame < sent {
                    if now >= sent + settings.pong_timeout {
                        return Poll::Ready(Event::PingTimeout);
                    }
                    keepalive.as_mut().reset(sent + settings.pong_timeout);
                    continue;
                }
                ping_sent = None;
            }
            if now < last_client_frame + settings.ping_interval {
                keepalive
                    .as_mut()
                    .reset(last_client_frame + settings.ping_interval);
            } else if b2c.pending.is_none() {
                b2c.pending = Some(Message::Ping(Bytes::from_static(KEEPALIVE_PAYLOAD)));
                ping_sent = Some(now);
                keepalive.as_mut().reset(now + settings.pong_timeout);
            } else {
                // A message to the client is on its way: that is activity enough.
                keepalive.as_mut().reset(now + settings.ping_interval);
            }
        }
        if let Poll::Ready(end) = poll_direction(
            cx,
            &mut client,
            &mut backend,
            &mut c2b,
            Some(&mut last_client_frame),
            true,
        ) {
            return Poll::Ready(Event::Client(end));
        }
        let before = b2c.messages;
        if let Poll::Ready(end) =
            poll_direction(cx, &mut backend, &mut client, &mut b2c, None, false)
        {
            return Poll::Ready(Event::Backend(end));
        }
        // Frames *to* the client count as client activity too.
        if b2c.messages != before {
            last_client_frame = Instant::now();
        }
        Poll::Pending
    })
    .await;

    match event {
        Event::Shutdown => {
            stats.closed_by = "proxy";
            stats.close_code = Some(1001);
            let frame = close_frame(CloseCode::Away, "server shutting down");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = tokio::join!(
                    client.close(Some(frame.clone())),
                    backend.close(Some(frame))
                );
                let _ = tokio::join!(drain(&mut client), drain(&mut backend));
            })
            .await;
        }
        Event::PingTimeout => {
            stats.closed_by = "proxy";
            stats.close_code = Some(1001);
            stats.error = Some("client did not answer a ping".into());
            let frame = close_frame(CloseCode::Away, "ping timeout");
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = tokio::join!(
                    client.close(Some(frame.clone())),
                    backend.close(Some(frame))
                );
            })
            .await;
        }
        Event::Client(end) => {
            stats.closed_by = "client";
            finish(end, &mut client, &mut backend, &mut stats).await;
        }
        Event::Backend(end) => {
            stats.closed_by = "backend";
            finish(end, &mut backend, &mut client, &mut stats).await;
        }
    }
    report(settings, &c2b, &b2c, &mut reported);
    stats.client_to_backend = c2b;
    stats.backend_to_client = b2c;
    stats
}

/// Ends a relay after `from` stopped: `from`'s close is answered and travels to `to`, or,
/// when `from` failed, each side gets the code it earned. Bounded by `CLOSE_TIMEOUT`.
async fn finish<F, T>(
    end: End,
    from: &mut WebSocketStream<F>,
    to: &mut WebSocketStream<T>,
    stats: &mut RelayStats,
) where
    F: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        match end {
            End::Closed(frame) => {
                stats.close_code = frame.as_ref().map(|f| u16::from(f.code));
                // Answer `from` now: tungstenite queued the echo of its Close when reading
                // it but writes it only on the next flush, and RFC 6455 §5.5.1 wants the
                // answer "as soon as practical", not when (or if) `to` answers.
                let _ = from.flush().await;
                // Relay the close (reserved codes never arrive: tungstenite rejects them).
                let _ = to.send(Message::Close(frame)).await;
                // `from` takes nothing after its Close; read `to` until its answer ends it.
                drain(to).await;
            }
            End::Vanished | End::ReadError(_) => {
                let code = match &end {
                    End::ReadError(e) => {
                        stats.error = Some(e.to_string());
                        offender_code(e)
                    }
                    _ => None,
                };
                stats.close_code = code.map(u16::from);
                if let Some(code) = code {
                    let reason = match code {
                        CloseCode::Size => "message too big",
                        CloseCode::Invalid => "invalid UTF-8",
                        _ => "protocol error",
                    };
                    let _ = from
                        .send(Message::Close(Some(close_frame(code, reason))))
                        .await;
                }
                let _ = to
                    .send(Message::Close(Some(close_frame(
                        CloseCode::Error,
                        "peer went away",
                    ))))
                    .await;
                drain(to).await;
            }
            End::WriteError(e) => {
                // `to` is gone: tell `from`.
                stats.error = Some(e.to_string());
                stats.closed_by = if stats.closed_by == "client" {
                    "backend"
                } else {
                    "client"
                };
                stats.close_code = Some(1011);
                let _ = from
                    .send(Message::Close(Some(close_frame(
                        CloseCode::Error,
                        "peer went away",
                    ))))
                    .await;
                drain(from).await;
            }
        }
    })
    .await;
}

/// Reads a closing side until it ends, so its close answer is consumed.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    while let Some(Ok(_)) = ws.next().await {}
}

/// The relay's access line, written when it ends.
struct RelayLine {
    path: String,
    request_id: HeaderValue,
    client: IpAddr,
    started: Instant,
    stats: RelayStats,
}

impl RelayLine {
    fn emit(&self) {
        let s = &self.stats;
        tracing::info!(
            path = self.path.as_str(),
            duration_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            messages_in = s.client_to_backend.messages,
            bytes_in = s.client_to_backend.bytes,
            messages_out = s.backend_to_client.messages,
            bytes_out = s.backend_to_client.bytes,
            closed_by = s.closed_by,
            close_code = s.close_code,
            error = s.error.as_deref().unwrap_or(""),
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %self.client,
            "websocket relay"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/ws/socket.io/?EIO=4&transport=websocket");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn upgrade_requests_are_recognised_by_token() {
        assert!(is_upgrade_request(&upgrade(GOOD)));
        assert!(!is_upgrade_request(&upgrade(&[("upgrade", "websocket")])));
        assert!(!is_upgrade_request(&upgrade(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
    }

    #[test]
    fn bad_handshakes_are_refused() {
        assert!(validate_handshake(&upgrade(GOOD)).is_ok());
        let no_key: Vec<_> = GOOD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "sec-websocket-key")
            .collect();
        assert!(validate_handshake(&upgrade(&no_key)).is_err());
        let mut v8 = GOOD.to_vec();
        v8[2] = ("sec-websocket-version", "8");
        assert!(validate_handshake(&upgrade(&v8)).is_err());
        let mut short = GOOD.to_vec();
        short[3] = ("sec-websocket-key", "abc");
        assert!(validate_handshake(&upgrade(&short)).is_err());
        let mut post = upgrade(GOOD);
        *post.method_mut() = Method::POST;
        assert!(validate_handshake(&post).is_err());
    }

    #[test]
    fn backend_handshake_carries_end_to_end_headers_but_never_extensions() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("sec-websocket-protocol", "chat, superchat"),
            ("cookie", "session=1"),
            ("origin", "https://chat.example"),
            ("authorization", "Bearer t"),
            ("user-agent", "test"),
            ("host", "chat.example"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let req = backend_handshake_request("ws://127.0.0.1:1/ws/".parse().unwrap(), h);
        let h = req.headers();
        assert!(h.get("sec-websocket-extensions").is_none());
        assert_ne!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        for name in [
            "cookie",
            "origin",
            "authorization",
            "user-agent",
            "sec-websocket-protocol",
            "host",
        ] {
            assert!(h.contains_key(name), "{name}");
        }
        assert_eq!(h.get_all("connection").iter().count(), 1);
    }

    #[test]
    fn switching_protocols_derives_accept_and_keeps_subprotocol() {
        let mut backend = HeaderMap::new();
        backend.insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
        backend.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("backend-accept"),
        );
        backend.insert("set-cookie", HeaderValue::from_static("a=b"));
        let r = switching_protocols(
            &HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
            &backend,
        );
        assert_eq!(r.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455 §1.3's worked example.
        assert_eq!(
            r.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(r.headers()["sec-websocket-protocol"], "chat");
        assert_eq!(r.headers()["set-cookie"], "a=b");
        assert_eq!(r.headers()["upgrade"], "websocket");
    }
}
