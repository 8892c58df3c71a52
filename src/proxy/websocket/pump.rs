//! The message pump: one task moves a relay's messages both ways, one pending message per
//! direction (backpressure), keeps an idle client alive with pings, gives up on a client
//! that answers nothing or takes no bytes (`liveness.rs`), and ends the relay with the close
//! code each side earned (RFC 6455 §7.4).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::liveness::{Keepalive, Tick, WriteStall, WriteWatch};
use super::stats::{Counts, RelayStats};
use crate::chat::{ChatRelay, Verdict};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::timer::poll_armed;

/// How long a closing handshake may take before the connections are dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client whose socket stalled gets to take the Close before it is dropped. Short:
/// the Close queues behind everything the client has not taken, so it rarely gets through.
const STALLED_CLOSE_ATTEMPT: Duration = Duration::from_millis(250);
/// Payload of chatgate's own keep-alive pings, so their pongs are not relayed.
const KEEPALIVE_PAYLOAD: &[u8] = b"chatgate-keepalive";

/// What a relay needs beyond its two sockets.
pub struct RelaySettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub shutdown: Shutdown,
    /// Message counts are added here at each keep-alive tick and at the end, not per
    /// message: a long chat shows up within one ping interval, at no per-message cost.
    pub metrics: Arc<Metrics>,
    /// `--shutdown-grace`: on a drain, how long an answer in progress may still take
    /// (less the time the closing handshake needs).
    pub drain_grace: Duration,
}

/// Notices chatgate writes to one client at most at once; a client that floods refused
/// messages gets no more until these are out (the refusals are still counted).
const MAX_NOTICES: usize = 4;

/// Adds what a relay moved since the last report to the message counters.
fn report(settings: &RelaySettings, c2b: &Direction, b2c: &Direction, reported: &mut (u64, u64)) {
    let metrics = &settings.metrics;
    metrics
        .ws_messages_to_backend
        .increment(c2b.counts.messages - reported.0);
    metrics
        .ws_messages_to_client
        .increment(b2c.counts.messages - reported.1);
    *reported = (c2b.counts.messages, b2c.counts.messages);
}

/// One direction of a relay: the message waiting for the other side to accept it (never
/// more than one: backpressure), a keep-alive ping to go out ahead of it, and counts.
#[derive(Debug, Default)]
struct Direction {
    pending: Option<Message>,
    /// A keep-alive ping waits to be written (towards the client only). It goes ahead of
    /// `pending`, so that a relay busy with messages still asks its client for an answer.
    ping: bool,
    /// chatgate's own messages to the client (chat notices), after the ping, before
    /// `pending`.
    notices: std::collections::VecDeque<Message>,
    unflushed: bool,
    counts: Counts,
}

impl Direction {
    /// The next message to write: the ping first, then the pending message.
    fn take_next(&mut self) -> Option<Message> {
        if std::mem::take(&mut self.ping) {
            Some(Message::Ping(Bytes::from_static(KEEPALIVE_PAYLOAD)))
        } else if let Some(notice) = self.notices.pop_front() {
            Some(notice)
        } else {
            self.pending.take()
        }
    }

    fn has_next(&self) -> bool {
        self.ping || !self.notices.is_empty() || self.pending.is_some()
    }

    /// Nothing left to write or flush.
    fn is_idle(&self) -> bool {
        !self.has_next() && !self.unflushed
    }
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
    /// The client's socket took no byte of what waited for it for `pong_timeout`.
    WriteStalled,
}

/// Moves messages from `src` to `dst` until neither can make progress. `Ready` when this
/// direction has ended.
fn poll_direction<S, D>(
    cx: &mut Context<'_>,
    src: &mut WebSocketStream<S>,
    dst: &mut WebSocketStream<D>,
    dir: &mut Direction,
    mut keepalive: Option<&mut Keepalive>,
    tap: &mut dyn FnMut(&Message) -> bool,
) -> Poll<End>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    'moving: loop {
        while dir.has_next() {
            match Pin::new(&mut *dst).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(End::WriteError(e)),
                Poll::Pending => break 'moving,
            }
            if let Some(message) = dir.take_next() {
                if let Err(e) = Pin::new(&mut *dst).start_send(message) {
                    return Poll::Ready(End::WriteError(e));
                }
                dir.unflushed = true;
            }
        }
        match Pin::new(&mut *src).poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => {
                if let Some(keepalive) = keepalive.as_deref_mut() {
                    keepalive.client_frame(Instant::now());
                }
                match message {
                    Message::Close(frame) => return Poll::Ready(End::Closed(frame)),
                    // The chat reader sees each data message; one it refuses goes no further.
                    Message::Text(_) | Message::Binary(_) if !tap(&message) => continue,
                    Message::Text(ref t) => dir.counts.add(t.len()),
                    Message::Binary(ref b) => dir.counts.add(b.len()),
                    // Our own ping's answer stays here.
                    Message::Pong(ref p)
                        if keepalive.is_some() && p.as_ref() == KEEPALIVE_PAYLOAD =>
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

pub fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
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

/// The earliest of the keep-alive's next look, the write-stall deadline and the end of a
/// drain.
fn next_look(keepalive_next: Instant, stall: &WriteStall, drain_until: Option<Instant>) -> Instant {
    [stall.deadline(), drain_until]
        .into_iter()
        .flatten()
        .fold(keepalive_next, Instant::min)
}

/// Runs a relay to its end and returns its counts. The client leg comes wrapped in a
/// `WriteWatch`, so the relay can tell a client that stopped reading from a slow one.
///
/// `chat` reads the Socket.IO traffic on the way: it counts and times the chat, refuses a
/// user message over a limit (the client gets a notice instead), and on a drain keeps the
/// relay open until the answers in progress are done, within `drain_grace`.
pub async fn pump<C, B>(
    mut client: WebSocketStream<WriteWatch<C>>,
    mut backend: WebSocketStream<B>,
    settings: &RelaySettings,
    chat: &mut ChatRelay,
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = RelayStats::default();
    let mut c2b = Direction::default();
    let mut b2c = Direction::default();
    let mut keepalive = Keepalive::new(
        settings.ping_interval,
        settings.pong_timeout,
        Instant::now(),
    );
    let mut stall = WriteStall::default();
    let mut keepalive_next = Instant::now() + settings.ping_interval;
    let mut reported = (0u64, 0u64);
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(keepalive_next));
    // Whether the timer holds this task's waker (see `timer::poll_armed`); cleared by
    // every reset.
    let mut timer_armed = false;
    let shutdown = settings.shutdown.cancelled();
    tokio::pin!(shutdown);
    // Set once a drain began while answers were in progress: the relay goes on until they
    // are done (and written), or until this instant.
    let mut drain_until: Option<Instant> = None;

    let event = poll_fn(|cx| {
        if drain_until.is_none() && shutdown.as_mut().poll(cx).is_ready() {
            if chat.answers_in_progress() == 0 {
                return Poll::Ready(Event::Shutdown);
            }
            let left = settings
                .drain_grace
                .saturating_sub(CLOSE_TIMEOUT + Duration::from_secs(1));
            drain_until = Some(Instant::now() + left);
            tracing::debug!(
                answers = chat.answers_in_progress(),
                "draining: the relay stays open until its answers are done"
            );
        }
        loop {
            if drain_until.is_some() && chat.answers_in_progress() == 0 && b2c.is_idle() {
                return Poll::Ready(Event::Shutdown);
            }
            while poll_armed(timer.as_mut(), &mut timer_armed, cx).is_ready() {
                let now = Instant::now();
                if drain_until.is_some_and(|until| now >= until) {
                    return Poll::Ready(Event::Shutdown);
                }
                if stall.stalled(now) {
                    return Poll::Ready(Event::WriteStalled);
                }
                report(settings, &c2b, &b2c, &mut reported);
                if c2b.has_next() {
                    // A message of the client's waits for the backend, so the pump is not
                    // reading the client and could not see its pongs: a backend that does
                    // not read must not make the client look dead.
                    keepalive.client_frame(now);
                }
                keepalive_next = match keepalive.tick(now) {
                    Tick::TimedOut => return Poll::Ready(Event::PingTimeout),
                    Tick::WaitUntil(next) => next,
                    Tick::Ping { next } => {
                        b2c.ping = true;
                        next
                    }
                };
                timer
                    .as_mut()
                    .reset(next_look(keepalive_next, &stall, drain_until));
                timer_armed = false;
            }
            let draining = drain_until.is_some();
            let notices = &mut b2c.notices;
            let mut from_client = |message: &Message| match message {
                Message::Text(text) => match chat.client_text(text, Instant::now(), draining) {
                    Verdict::Forward => true,
                    Verdict::Refuse(notice) => {
                        if notices.len() < MAX_NOTICES {
                            notices.push_back(Message::text(notice));
                        }
                        false
                    }
                },
                _ => chat.client_binary() == Verdict::Forward,
            };
            if let Poll::Ready(end) = poll_direction(
                cx,
                &mut client,
                &mut backend,
                &mut c2b,
                Some(&mut keepalive),
                &mut from_client,
            ) {
                return Poll::Ready(Event::Client(end));
            }
            let mut from_backend = |message: &Message| {
                if let Message::Text(text) = message {
                    chat.server_text(text, Instant::now());
                }
                true
            };
            let ping_waiting = b2c.ping;
            let moved = poll_direction(
                cx,
                &mut backend,
                &mut client,
                &mut b2c,
                None,
                &mut from_backend,
            );
            if ping_waiting && !b2c.ping {
                keepalive.ping_sent(Instant::now());
            }
            if let Poll::Ready(end) = moved {
                return Poll::Ready(Event::Backend(end));
            }
            // tungstenite also writes to the client outside the b2c direction (pongs to the
            // client's pings, during reads): whatever it holds, push it on while the socket
            // is refusing, so that "blocked" always means the client is not taking bytes.
            if client.get_ref().is_blocked() {
                if let Poll::Ready(Err(e)) = Pin::new(&mut client).poll_flush(cx) {
                    return Poll::Ready(Event::Backend(End::WriteError(e)));
                }
            }
            let watch = client.get_ref();
            if watch.is_blocked() {
                stall.blocked(Instant::now(), watch.written(), settings.pong_timeout);
            } else {
                stall.flowing();
            }
            if drain_until.is_some() && chat.answers_in_progress() == 0 && b2c.is_idle() {
                continue;
            }
            let look = next_look(keepalive_next, &stall, drain_until);
            if look == timer.deadline() {
                return Poll::Pending;
            }
            // The stall deadline moved: re-arm, and poll the timer again so it wakes us.
            timer.as_mut().reset(look);
            timer_armed = false;
        }
    })
    .await;

    // Each way of closing is boxed: it runs once, at the end, and inline its futures
    // would be part of every idle relay's memory for its whole life.
    match event {
        Event::Shutdown => {
            stats.closed_by = "proxy";
            stats.close_code = Some(1001);
            let frame = close_frame(CloseCode::Away, "server shutting down");
            let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = tokio::join!(
                    client.close(Some(frame.clone())),
                    backend.close(Some(frame))
                );
                let _ = tokio::join!(drain(&mut client), drain(&mut backend));
            }))
            .await;
        }
        Event::PingTimeout => {
            stats.closed_by = "proxy";
            stats.close_code = Some(1001);
            stats.error = Some("client did not answer a ping".into());
            let frame = close_frame(CloseCode::Away, "ping timeout");
            let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, async {
                let _ = tokio::join!(
                    client.close(Some(frame.clone())),
                    backend.close(Some(frame))
                );
            }))
            .await;
        }
        Event::WriteStalled => {
            // 1001 towards the backend, as for a ping timeout: the client went away in all
            // but name. (1008 would say it broke a rule; not reading is no message at all.)
            stats.closed_by = "proxy";
            stats.close_code = Some(1001);
            stats.error = Some(format!(
                "client took no data for {:?}",
                settings.pong_timeout
            ));
            let frame = close_frame(CloseCode::Away, "client stopped reading");
            let backend_frame = frame.clone();
            let _ = Box::pin(async {
                tokio::join!(
                    tokio::time::timeout(CLOSE_TIMEOUT, async {
                        let _ = backend.close(Some(backend_frame)).await;
                        drain(&mut backend).await;
                    }),
                    // The client has taken nothing for a whole timeout: one short try to
                    // queue the Close, then its connection is dropped.
                    tokio::time::timeout(STALLED_CLOSE_ATTEMPT, client.close(Some(frame))),
                )
            })
            .await;
        }
        Event::Client(end) => {
            stats.closed_by = "client";
            Box::pin(finish(end, &mut client, &mut backend, &mut stats)).await;
        }
        Event::Backend(end) => {
            stats.closed_by = "backend";
            Box::pin(finish(end, &mut backend, &mut client, &mut stats)).await;
        }
    }
    report(settings, &c2b, &b2c, &mut reported);
    stats.client_to_backend = c2b.counts;
    stats.backend_to_client = b2c.counts;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    const INTERVAL: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(20);

    /// A relay over in-memory pipes whose client pipe holds `client_pipe` bytes: (the raw
    /// client peer, backend peer, the pump's task, the shutdown token).
    async fn relay_raw(
        client_pipe: usize,
        ping_interval: Duration,
        pong_timeout: Duration,
    ) -> (
        DuplexStream,
        WebSocketStream<DuplexStream>,
        tokio::task::JoinHandle<RelayStats>,
        Shutdown,
    ) {
        let (client_peer, client_leg) = tokio::io::duplex(client_pipe);
        let (backend_leg, backend_peer) = tokio::io::duplex(64 * 1024);
        let client_leg =
            WebSocketStream::from_raw_socket(WriteWatch::new(client_leg), Role::Server, None).await;
        let backend_leg = WebSocketStream::from_raw_socket(backend_leg, Role::Client, None).await;
        let backend_peer = WebSocketStream::from_raw_socket(backend_peer, Role::Server, None).await;
        let shutdown = Shutdown::default();
        let settings = RelaySettings {
            ping_interval,
            pong_timeout,
            shutdown: shutdown.clone(),
            metrics: Arc::new(Metrics::new()),
            drain_grace: Duration::from_secs(20),
        };
        let mut chat = test_chat();
        let task =
            tokio::spawn(async move { pump(client_leg, backend_leg, &settings, &mut chat).await });
        (client_peer, backend_peer, task, shutdown)
    }

    /// A chat reader with no limits, as a relay gets by default.
    fn test_chat() -> ChatRelay {
        let chat = crate::chat::Chat::for_tests(Default::default());
        let client = crate::chat::limits::ChatClient::Address([127, 0, 0, 1].into());
        ChatRelay::new(chat, client, 0)
    }

    /// A relay over roomy in-memory pipes: (client peer, backend peer, task, shutdown).
    async fn relay(
        ping_interval: Duration,
        pong_timeout: Duration,
    ) -> (
        WebSocketStream<DuplexStream>,
        WebSocketStream<DuplexStream>,
        tokio::task::JoinHandle<RelayStats>,
        Shutdown,
    ) {
        let (client_peer, backend_peer, task, shutdown) =
            relay_raw(64 * 1024, ping_interval, pong_timeout).await;
        let client_peer = WebSocketStream::from_raw_socket(client_peer, Role::Client, None).await;
        (client_peer, backend_peer, task, shutdown)
    }

    /// The backend peer sends `message` every `every` (back to back when zero) until the
    /// relay stops taking them, and hands back the Close it receives.
    fn backend_sends(
        backend: WebSocketStream<DuplexStream>,
        message: Message,
        every: Duration,
    ) -> tokio::task::JoinHandle<Option<CloseFrame>> {
        tokio::spawn(async move {
            let (mut sink, mut stream) = backend.split();
            let sender = async {
                while sink.send(message.clone()).await.is_ok() {
                    if !every.is_zero() {
                        tokio::time::sleep(every).await;
                    }
                }
                // Sending failed: the relay closed. Keep reading for its Close.
                std::future::pending::<()>().await;
            };
            let reader = async {
                let mut close = None;
                while let Some(Ok(message)) = stream.next().await {
                    if let Message::Close(frame) = message {
                        close = close.or(frame);
                    }
                }
                close
            };
            tokio::select! {
                close = reader => close,
                () = sender => None,
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn messages_travel_both_ways_and_the_close_code_comes_back() {
        let (mut client, mut backend, task, _shutdown) = relay(INTERVAL, TIMEOUT).await;
        client.send(Message::text("42[\"hello\"]")).await.unwrap();
        assert_eq!(
            backend.next().await.unwrap().unwrap(),
            Message::text("42[\"hello\"]")
        );
        backend
            .send(Message::binary(vec![1u8, 2, 3]))
            .await
            .unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(vec![1u8, 2, 3])
        );
        backend
            .send(Message::Close(Some(close_frame(
                CloseCode::Library(4001),
                "bye",
            ))))
            .await
            .unwrap();
        match client.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4001),
            other => panic!("expected the backend's close, got {other:?}"),
        }
        drop(client);
        let stats = task.await.unwrap();
        assert_eq!(stats.closed_by, "backend");
        assert_eq!(stats.close_code, Some(4001));
        assert_eq!(stats.client_to_backend.messages, 1);
        assert_eq!(stats.backend_to_client.bytes, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_answers_a_ping_is_closed_with_1001() {
        let (client, mut backend, task, _shutdown) = relay(INTERVAL, TIMEOUT).await;
        // The client never reads, so it never answers: paused time runs to the timeout.
        let stats = task.await.unwrap();
        assert_eq!(stats.closed_by, "proxy");
        assert_eq!(stats.close_code, Some(1001));
        match backend.next().await.unwrap().unwrap() {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected 1001 to the backend, got {other:?}"),
        }
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_pings_stays() {
        let (mut client, mut backend, task, _shutdown) = relay(INTERVAL, TIMEOUT).await;
        // Reading answers pings (tungstenite queues the pong, written on the next flush).
        let reader = tokio::spawn(async move {
            let mut pings = 0;
            while let Some(Ok(message)) = client.next().await {
                if let Message::Ping(_) = message {
                    pings += 1;
                    client.flush().await.unwrap();
                }
                if pings == 3 {
                    client.send(Message::text("still here")).await.unwrap();
                    return client;
                }
            }
            panic!("relay ended before three pings");
        });
        let mut client = reader.await.unwrap();
        assert_eq!(
            backend.next().await.unwrap().unwrap(),
            Message::text("still here"),
            "our keep-alive pongs are not relayed"
        );
        assert!(!task.is_finished());
        client.close(None).await.unwrap();
        let stats = task.await.unwrap();
        assert_eq!(stats.closed_by, "client");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_both_sides_with_1001() {
        let (mut client, mut backend, task, shutdown) = relay(INTERVAL, TIMEOUT).await;
        shutdown.cancel();
        for side in [&mut client, &mut backend] {
            match side.next().await.unwrap().unwrap() {
                Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
                other => panic!("expected 1001, got {other:?}"),
            }
        }
        drop((client, backend));
        assert_eq!(task.await.unwrap().close_code, Some(1001));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_pong_timeout() {
        // A small pipe, never read: the client's "window" is full after a few frames.
        let (client, backend, task, _shutdown) = relay_raw(1024, INTERVAL, TIMEOUT).await;
        let started = Instant::now();
        let backend = backend_sends(backend, Message::binary(vec![0u8; 4096]), Duration::ZERO);
        let stats = task.await.unwrap();
        let took = started.elapsed();
        assert_eq!(stats.closed_by, "proxy");
        assert_eq!(stats.close_code, Some(1001));
        assert!(
            stats
                .error
                .as_deref()
                .unwrap_or("")
                .contains("took no data"),
            "{:?}",
            stats.error
        );
        // The write-stall rule ended it (the keep-alive would not even have pinged yet).
        assert!(took >= TIMEOUT && took < INTERVAL, "ended after {took:?}");
        let close = backend.await.unwrap().expect("a Close at the backend");
        assert_eq!(close.code, CloseCode::Away);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_keeps_reading_is_not_cut_off() {
        use tokio::io::AsyncReadExt;
        // No pings in this test: only the write-stall rule could end the relay.
        let (mut client, mut backend, task, _shutdown) =
            relay_raw(512, Duration::from_secs(3600), TIMEOUT).await;
        let started = Instant::now();
        backend
            .send(Message::binary(vec![7u8; 64 * 1024]))
            .await
            .unwrap();
        // 256 bytes every 5 s: minutes for the message, but never a timeout without a byte.
        let frame = 64 * 1024 + 10;
        let mut got = 0;
        let mut buf = [0u8; 256];
        while got < frame {
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(!task.is_finished(), "cut off after {got} bytes");
            got += client.read(&mut buf).await.unwrap();
        }
        assert_eq!(got, frame);
        assert!(started.elapsed() > 10 * TIMEOUT, "{:?}", started.elapsed());
        assert!(!task.is_finished());
        drop(client);
        assert_eq!(task.await.unwrap().closed_by, "client");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_does_not_read_does_not_make_the_client_look_dead() {
        use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
        let (client_peer, client_leg) = tokio::io::duplex(64 * 1024);
        // The backend never reads, and its leg holds little: the client's messages back up
        // until one waits in the pump, which then stops reading the client (backpressure).
        let (backend_leg, _backend_never_reads) = tokio::io::duplex(256);
        let small = WebSocketConfig::default()
            .write_buffer_size(0)
            .max_write_buffer_size(1024);
        let client_leg =
            WebSocketStream::from_raw_socket(WriteWatch::new(client_leg), Role::Server, None).await;
        let backend_leg =
            WebSocketStream::from_raw_socket(backend_leg, Role::Client, Some(small)).await;
        let settings = RelaySettings {
            ping_interval: INTERVAL,
            pong_timeout: TIMEOUT,
            shutdown: Shutdown::default(),
            metrics: Arc::new(Metrics::new()),
            drain_grace: Duration::from_secs(20),
        };
        let mut chat = test_chat();
        let task =
            tokio::spawn(async move { pump(client_leg, backend_leg, &settings, &mut chat).await });
        let mut client = WebSocketStream::from_raw_socket(client_peer, Role::Client, None).await;
        for _ in 0..8 {
            client.send(Message::text("x".repeat(600))).await.unwrap();
        }
        // The client keeps answering pings (its pongs sit unread behind the backlog) for
        // three times what a silent client would get.
        let watched = tokio::time::timeout(3 * (INTERVAL + TIMEOUT), async {
            loop {
                match client.next().await {
                    Some(Ok(Message::Ping(_))) => {
                        let _ = client.flush().await;
                    }
                    Some(Ok(Message::Close(frame))) => return frame,
                    None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(
            watched.is_err(),
            "the relay gave up on the client: {watched:?}"
        );
        assert!(!task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_only_receives_is_pinged_and_stays_while_it_answers() {
        let (mut client, backend, task, _shutdown) = relay(INTERVAL, TIMEOUT).await;
        // Messages to the client more often than the ping interval: they are no answer.
        let _backend = backend_sends(backend, Message::text("tick"), INTERVAL / 3);
        let started = Instant::now();
        let (mut pings, mut ticks) = (0, 0);
        while started.elapsed() < 4 * INTERVAL {
            match client.next().await {
                Some(Ok(Message::Ping(_))) => {
                    pings += 1;
                    client.flush().await.unwrap();
                }
                Some(Ok(Message::Text(_))) => ticks += 1,
                other => panic!("expected pings and ticks, got {other:?}"),
            }
        }
        assert!(pings >= 3, "{pings} pings in {:?}", started.elapsed());
        assert!(ticks >= 10, "{ticks} ticks");
        assert!(!task.is_finished());
        client.close(None).await.unwrap();
        assert_eq!(task.await.unwrap().closed_by, "client");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_but_never_answers_is_closed_after_the_pong_timeout() {
        use tokio::io::AsyncReadExt;
        let (mut client, backend, task, _shutdown) = relay_raw(64 * 1024, INTERVAL, TIMEOUT).await;
        let backend = backend_sends(backend, Message::text("tick"), INTERVAL / 3);
        // Reads every byte (so nothing stalls), writes none: no pong ever comes back.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let started = Instant::now();
        let stats = task.await.unwrap();
        let took = started.elapsed();
        assert_eq!(stats.close_code, Some(1001));
        assert_eq!(stats.error.as_deref(), Some("client did not answer a ping"));
        assert!(
            took >= INTERVAL + TIMEOUT && took < 2 * INTERVAL + TIMEOUT,
            "ended after {took:?}"
        );
        let close = backend.await.unwrap().expect("a Close at the backend");
        assert_eq!(close.code, CloseCode::Away);
        reader.await.unwrap();
    }
}
