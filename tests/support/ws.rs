//! WebSocket fixtures: backends built on tokio-tungstenite (echo, refusing, stalling,
//! never-reading, killable), real clients, and a raw-socket client for a peer that stops
//! answering. Every socket is on 127.0.0.1 port 0; every wait has a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HandshakeRequest, Response as HandshakeResponse,
};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{Backend, DEADLINE, handler, raw_backend, read_head};

pub type Client = WebSocketStream<TcpStream>;

/// What a backend saw of one WebSocket handshake.
#[derive(Debug, Clone)]
pub struct SeenHandshake {
    /// Path and query, as the request line had them.
    pub target: String,
    pub headers: HeaderMap,
}

impl SeenHandshake {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What happened on a backend's WebSocket connection, in order.
#[derive(Debug)]
pub enum BackendEvent {
    /// A data, ping or pong message arrived.
    Received(Message),
    /// A Close frame arrived (code, reason).
    Closed(Option<(u16, String)>),
    /// Reading failed (for example the peer vanished without a Close).
    Failed(String),
    /// The connection's loop ended.
    Ended,
}

/// How a WebSocket backend treats a connection once the handshake is done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Echo text and binary; answer pings; `close:CODE:REASON` makes it close with that,
    /// `big:N` makes it send an N-byte text message.
    #[default]
    Echo,
    /// Never read again: a slow (stuck) reader.
    NeverRead,
    /// Send 16 KiB binary messages back to back, as fast as the relay takes them, while
    /// reading (so the relay's Close is seen).
    Flood,
    /// Send `tick` every period, and echo what arrives like `Echo`.
    Tick(Duration),
}

/// Builds a WebSocket backend.
#[derive(Debug, Clone, Default)]
pub struct WsBackendBuilder {
    subprotocol: Option<&'static str>,
    announce_extension: bool,
    behaviour: Behaviour,
    recv_buffer: Option<u32>,
}

impl WsBackendBuilder {
    /// Selects `protocol` when the client offers it.
    pub fn subprotocol(mut self, protocol: &'static str) -> Self {
        self.subprotocol = Some(protocol);
        self
    }

    /// Answers every handshake with `Sec-WebSocket-Extensions: permessage-deflate`, as a
    /// compressing backend would if it had been offered the extension.
    pub fn announce_extension(mut self) -> Self {
        self.announce_extension = true;
        self
    }

    pub fn behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    /// Sets SO_RCVBUF on the listener (inherited by accepted sockets), so a backend that
    /// stops reading holds little in its kernel buffer.
    pub fn recv_buffer(mut self, bytes: u32) -> Self {
        self.recv_buffer = Some(bytes);
        self
    }

    pub async fn start(self) -> WsBackend {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(bytes) = self.recv_buffer {
            socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let listener = socket.listen(64).expect("listen");
        WsBackend::serve(listener, self)
    }
}

/// A WebSocket backend on 127.0.0.1:0. Answers `GET /health` with 200 (the proxy's probe)
/// and counts every other connection.
pub struct WsBackend {
    pub addr: SocketAddr,
    /// Connections other than health probes (a request reaching the backend).
    pub contacted: Arc<AtomicUsize>,
    handshakes: Arc<Mutex<Vec<SeenHandshake>>>,
    events: mpsc::UnboundedReceiver<BackendEvent>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl WsBackend {
    pub fn builder() -> WsBackendBuilder {
        WsBackendBuilder::default()
    }

    /// The plain echo backend.
    pub async fn echo() -> WsBackend {
        WsBackend::builder().start().await
    }

    fn serve(listener: TcpListener, options: WsBackendBuilder) -> WsBackend {
        let addr = listener.local_addr().unwrap();
        let contacted = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = {
            let contacted = Arc::clone(&contacted);
            let handshakes = Arc::clone(&handshakes);
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let contacted = Arc::clone(&contacted);
                    let handshakes = Arc::clone(&handshakes);
                    let events = events_tx.clone();
                    let options = options.clone();
                    let connection = tokio::spawn(async move {
                        serve_ws_connection(stream, options, contacted, handshakes, events).await
                    });
                    let mut open = connections.lock().unwrap();
                    open.retain(|c: &JoinHandle<()>| !c.is_finished());
                    open.push(connection);
                }
            })
        };
        WsBackend {
            addr,
            contacted,
            handshakes,
            events,
            connections,
            task,
        }
    }

    pub fn contacted(&self) -> usize {
        self.contacted.load(Ordering::SeqCst)
    }

    pub fn handshakes(&self) -> Vec<SeenHandshake> {
        self.handshakes.lock().unwrap().clone()
    }

    /// The latest handshake seen (panics if there was none).
    pub fn last_handshake(&self) -> SeenHandshake {
        self.handshakes()
            .pop()
            .expect("the backend saw a handshake")
    }

    /// Kills every open connection: its task is aborted and its socket dropped without a
    /// Close frame, as when the backend process dies.
    pub fn kill_connections(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// The next event on any connection (panics after `DEADLINE`).
    pub async fn next_event(&mut self) -> BackendEvent {
        match tokio::time::timeout(DEADLINE, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("backend event channel closed"),
            Err(_) => panic!("no backend event within {DEADLINE:?}"),
        }
    }

    /// Waits for the next data message the backend receives (skipping pings and pongs).
    pub async fn received(&mut self) -> Message {
        loop {
            match self.next_event().await {
                BackendEvent::Received(m @ (Message::Text(_) | Message::Binary(_))) => return m,
                BackendEvent::Received(_) => continue,
                other => panic!("expected a message at the backend, got {other:?}"),
            }
        }
    }

    /// Waits for the Close frame the backend receives, skipping messages before it.
    pub async fn close_received(&mut self) -> Option<(u16, String)> {
        loop {
            match self.next_event().await {
                BackendEvent::Received(_) => continue,
                BackendEvent::Closed(frame) => return frame,
                other => panic!("expected a Close at the backend, got {other:?}"),
            }
        }
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
        self.kill_connections();
    }
}

async fn serve_ws_connection(
    stream: TcpStream,
    options: WsBackendBuilder,
    contacted: Arc<AtomicUsize>,
    handshakes: Arc<Mutex<Vec<SeenHandshake>>>,
    events: mpsc::UnboundedSender<BackendEvent>,
) {
    let mut stream = stream;
    match first_line(&stream).await {
        // A TCP-connect probe, or nothing at all.
        None => return,
        Some(line) if line.starts_with("GET /health ") => {
            let _ = read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            return;
        }
        Some(_) => {
            contacted.fetch_add(1, Ordering::SeqCst);
        }
    }
    // The signature is tungstenite's `Callback`: its error type is a whole response.
    #[allow(clippy::result_large_err)]
    let callback = |request: &HandshakeRequest,
                    mut response: HandshakeResponse|
     -> Result<HandshakeResponse, ErrorResponse> {
        handshakes.lock().unwrap().push(SeenHandshake {
            target: request
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_default(),
            headers: request.headers().clone(),
        });
        if let Some(chosen) = options.subprotocol {
            let offered = request
                .headers()
                .get_all("sec-websocket-protocol")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|p| p.trim() == chosen);
            if offered {
                response
                    .headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
            }
        }
        if options.announce_extension {
            response.headers_mut().insert(
                "sec-websocket-extensions",
                HeaderValue::from_static("permessage-deflate"),
            );
        }
        Ok(response)
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async(stream, callback).await {
        Ok(ws) => ws,
        Err(e) => {
            let _ = events.send(BackendEvent::Failed(format!("handshake: {e}")));
            return;
        }
    };
    match options.behaviour {
        Behaviour::NeverRead => {
            // Hold the socket open and never read it, until the test ends.
            std::future::pending::<()>().await;
        }
        Behaviour::Flood => return flood(ws, events).await,
        Behaviour::Tick(every) => return tick(ws, every, events).await,
        Behaviour::Echo => {}
    }
    while let Some(item) = ws.next().await {
        match item {
            Ok(Message::Text(text)) if text.starts_with("close:") => {
                let _ = events.send(BackendEvent::Received(Message::Text(text.clone())));
                let mut parts = text.splitn(3, ':').skip(1);
                let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1000);
                let reason = parts.next().unwrap_or("").to_owned();
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: Utf8Bytes::from(reason),
                };
                let _ = ws.close(Some(frame)).await;
                // Keep reading: the peer's Close answer arrives next.
            }
            Ok(Message::Text(text)) if text.starts_with("big:") => {
                let _ = events.send(BackendEvent::Received(Message::Text(text.clone())));
                let size: usize = text[4..].parse().unwrap_or(0);
                if ws.send(Message::text("b".repeat(size))).await.is_err() {
                    break;
                }
            }
            Ok(Message::Close(frame)) => {
                let frame = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
                let _ = events.send(BackendEvent::Closed(frame));
            }
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                let _ = events.send(BackendEvent::Received(message.clone()));
                if ws.send(message).await.is_err() {
                    break;
                }
            }
            // tungstenite queues the Pong to a Ping by itself.
            Ok(other) => {
                let _ = events.send(BackendEvent::Received(other));
            }
            Err(e) => {
                let _ = events.send(BackendEvent::Failed(e.to_string()));
                break;
            }
        }
    }
    let _ = events.send(BackendEvent::Ended);
}

/// Reports one item a backend read as an event; false when the connection is done.
fn report_received(
    item: Option<Result<Message, WsError>>,
    events: &mpsc::UnboundedSender<BackendEvent>,
) -> bool {
    match item {
        Some(Ok(Message::Close(frame))) => {
            let frame = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
            let _ = events.send(BackendEvent::Closed(frame));
            true
        }
        Some(Ok(message)) => {
            let _ = events.send(BackendEvent::Received(message));
            true
        }
        Some(Err(e)) => {
            let _ = events.send(BackendEvent::Failed(e.to_string()));
            false
        }
        None => false,
    }
}

async fn flood(ws: WebSocketStream<TcpStream>, events: mpsc::UnboundedSender<BackendEvent>) {
    let (mut sink, mut stream) = ws.split();
    let message = Message::binary(vec![0x5a; 16 * 1024]);
    let sender = async {
        while sink.send(message.clone()).await.is_ok() {}
        // The relay is closing: keep reading for its Close.
        std::future::pending::<()>().await;
    };
    let reader = async { while report_received(stream.next().await, &events) {} };
    tokio::select! {
        () = reader => {}
        () = sender => {}
    }
    let _ = events.send(BackendEvent::Ended);
}

async fn tick(
    ws: WebSocketStream<TcpStream>,
    every: Duration,
    events: mpsc::UnboundedSender<BackendEvent>,
) {
    let (mut sink, mut stream) = ws.split();
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            item = stream.next() => {
                let echo = match &item {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => Some(m.clone()),
                    _ => None,
                };
                if !report_received(item, &events) {
                    break;
                }
                if let Some(echo) = echo {
                    if sink.send(echo).await.is_err() {
                        break;
                    }
                }
            }
            _ = ticker.tick() => {
                if sink.send(Message::text("tick")).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = events.send(BackendEvent::Ended);
}

/// The request line of a new connection, peeked (left in the socket for the handshake).
/// `None` when the peer closes without sending anything.
async fn first_line(stream: &TcpStream) -> Option<String> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(2).position(|w| w == b"\r\n") {
            return Some(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        if n == buf.len() {
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        // A partial line: peek returns the same bytes until more arrive.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A backend refusing every request (the upgrade included) with `status` and `body`.
pub async fn refusing_backend(status: u16, body: &'static str) -> Backend {
    Backend::start(handler(move |_req| async move {
        Response::builder()
            .status(status)
            .header("x-refused-by", "backend")
            .body(super::full(body))
            .unwrap()
    }))
    .await
}

/// A backend that accepts TCP, reads the request head and never answers. Counts requests.
pub async fn stalling_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    let (addr, task) = raw_backend(move |mut stream| {
        let counter = Arc::clone(&counter);
        async move {
            let head = read_head(&mut stream).await;
            if !head.is_empty() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            // Hold the connection until the peer gives up (bounded all the same).
            let mut sink = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
    })
    .await;
    (addr, requests, task)
}

/// A client handshake request for `ws://addr{path}`.
pub fn ws_request(addr: SocketAddr, path: &str) -> Request<()> {
    format!("ws://{addr}{path}")
        .into_client_request()
        .expect("client request")
}

/// Performs a client handshake (bounded).
pub async fn try_connect(
    request: Request<()>,
) -> Result<(Client, Response<Option<Vec<u8>>>), WsError> {
    let addr = request
        .uri()
        .authority()
        .expect("authority")
        .as_str()
        .to_owned();
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(WsError::Io)?;
        tokio_tungstenite::client_async(request, stream).await
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("client handshake not done within {DEADLINE:?}"))
}

/// Connects a WebSocket client through the proxy (panics if the handshake fails).
pub async fn connect(addr: SocketAddr, path: &str) -> Client {
    match try_connect(ws_request(addr, path)).await {
        Ok((client, _)) => client,
        Err(e) => panic!("WebSocket handshake to {path} failed: {e}"),
    }
}

/// The next message of any kind (panics on timeout, error or end).
pub async fn next_message(client: &mut Client) -> Message {
    match tokio::time::timeout(DEADLINE, client.next()).await {
        Ok(Some(Ok(message))) => message,
        Ok(Some(Err(e))) => panic!("client read failed: {e}"),
        Ok(None) => panic!("client stream ended"),
        Err(_) => panic!("no message within {DEADLINE:?}"),
    }
}

/// The next text or binary message, skipping pings and pongs.
pub async fn next_data(client: &mut Client) -> Message {
    loop {
        match next_message(client).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Reads until a Close frame arrives (skipping anything before it) and returns its code
/// and reason. Panics if the connection ends or fails without one.
pub async fn close_received(client: &mut Client) -> Option<(u16, String)> {
    loop {
        if let Message::Close(frame) = next_message(client).await {
            return frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
        }
    }
}

/// A client socket whose WebSocket handshake is done by hand, so that nothing answers
/// pings: a client that has stopped responding.
pub struct RawClient {
    pub stream: TcpStream,
    pub response_head: String,
}

/// A frame as read off a raw socket (server frames are unmasked).
#[derive(Debug)]
pub struct RawFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;

    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == Self::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawClient::handshake(stream, addr, path).await
    }

    /// Connects with SO_RCVBUF set to `bytes` (before the connect, so the window it
    /// advertises is that small): a client that stops reading shows a zero window at once.
    pub async fn connect_with_recv_buffer(addr: SocketAddr, path: &str, bytes: u32) -> RawClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        RawClient::handshake(stream, addr, path).await
    }

    async fn handshake(mut stream: TcpStream, addr: SocketAddr, path: &str) -> RawClient {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write handshake");
        let response_head = read_head(&mut stream).await;
        RawClient {
            stream,
            response_head,
        }
    }

    /// The next frame, or `None` when the connection ends first (bounded by `DEADLINE`).
    pub async fn next_frame(&mut self) -> Option<RawFrame> {
        let read = async {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).await.ok()?;
            let opcode = head[0] & 0x0f;
            let len = match head[1] & 0x7f {
                126 => u64::from(self.stream.read_u16().await.ok()?),
                127 => self.stream.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len).ok()?];
            self.stream.read_exact(&mut payload).await.ok()?;
            Some(RawFrame { opcode, payload })
        };
        tokio::time::timeout(DEADLINE, read)
            .await
            .expect("a frame or the end within DEADLINE")
    }
}
