//! The message pump: one task moves a relay's messages both ways, one pending message per
//! direction (backpressure), keeps an idle client alive with pings, and ends the relay with
//! the close code each side earned (RFC 6455 §7.4).

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
use tokio_util::sync::CancellationToken;

use super::stats::{Counts, RelayStats};
use crate::metrics::Metrics;

/// How long a closing handshake may take before the connections are dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Payload of chatgate's own keep-alive pings, so their pongs are not relayed.
const KEEPALIVE_PAYLOAD: &[u8] = b"chatgate-keepalive";

/// What a relay needs beyond its two sockets.
pub struct RelaySettings {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub shutdown: CancellationToken,
    /// Message counts are added here at each keep-alive tick and at the end, not per
    /// message: a long chat shows up within one ping interval, at no per-message cost.
    pub metrics: Arc<Metrics>,
}

/// Keep-alive towards the client: ping it after `interval` of silence, give up when it
/// stays silent for `timeout` after a ping. A small state machine over instants, so that
/// its rules are tested without sockets or timers.
#[derive(Debug)]
pub struct Keepalive {
    interval: Duration,
    timeout: Duration,
    last_client_frame: Instant,
    ping_sent: Option<Instant>,
}

/// What the keep-alive timer asks for when it fires.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do: fire again at this instant.
    WaitUntil(Instant),
    /// Send a ping now, then fire again at this instant.
    Ping { next: Instant },
    /// The client did not answer the ping in time.
    TimedOut,
}

impl Keepalive {
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Keepalive {
        Keepalive {
            interval,
            timeout,
            last_client_frame: now,
            ping_sent: None,
        }
    }

    /// A frame arrived from the client (or, for now, a message went to it: see `pump`).
    pub fn client_frame(&mut self, now: Instant) {
        self.last_client_frame = now;
    }

    /// The timer fired at `now`; `can_ping` is false while a message to the client is
    /// already waiting (a message on its way is activity enough).
    pub fn tick(&mut self, now: Instant, can_ping: bool) -> Tick {
        if let Some(sent) = self.ping_sent {
            if self.last_client_frame < sent {
                return if now >= sent + self.timeout {
                    Tick::TimedOut
                } else {
                    Tick::WaitUntil(sent + self.timeout)
                };
            }
            self.ping_sent = None;
        }
        if now < self.last_client_frame + self.interval {
            Tick::WaitUntil(self.last_client_frame + self.interval)
        } else if can_ping {
            self.ping_sent = Some(now);
            Tick::Ping {
                next: now + self.timeout,
            }
        } else {
            Tick::WaitUntil(now + self.interval)
        }
    }
}

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
/// more than one: backpressure), and counts.
#[derive(Debug, Default)]
struct Direction {
    pending: Option<Message>,
    unflushed: bool,
    counts: Counts,
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
    mut keepalive: Option<&mut Keepalive>,
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
                if let Some(keepalive) = keepalive.as_deref_mut() {
                    keepalive.client_frame(Instant::now());
                }
                match message {
                    Message::Close(frame) => return Poll::Ready(End::Closed(frame)),
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

/// Runs a relay to its end and returns its counts.
pub async fn pump<C, B>(
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
    let mut keepalive = Keepalive::new(
        settings.ping_interval,
        settings.pong_timeout,
        Instant::now(),
    );
    let mut reported = (0u64, 0u64);
    let mut timer: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(settings.ping_interval));
    let shutdown = settings.shutdown.cancelled();
    tokio::pin!(shutdown);

    let event = poll_fn(|cx| {
        if shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Shutdown);
        }
        while timer.as_mut().poll(cx).is_ready() {
            report(settings, &c2b, &b2c, &mut reported);
            match keepalive.tick(Instant::now(), b2c.pending.is_none()) {
                Tick::TimedOut => return Poll::Ready(Event::PingTimeout),
                Tick::WaitUntil(next) => timer.as_mut().reset(next),
                Tick::Ping { next } => {
                    b2c.pending = Some(Message::Ping(Bytes::from_static(KEEPALIVE_PAYLOAD)));
                    timer.as_mut().reset(next);
                }
            }
        }
        if let Poll::Ready(end) = poll_direction(
            cx,
            &mut client,
            &mut backend,
            &mut c2b,
            Some(&mut keepalive),
        ) {
            return Poll::Ready(Event::Client(end));
        }
        let before = b2c.counts.messages;
        if let Poll::Ready(end) = poll_direction(cx, &mut backend, &mut client, &mut b2c, None) {
            return Poll::Ready(Event::Backend(end));
        }
        // Frames *to* the client count as client activity too.
        if b2c.counts.messages != before {
            keepalive.client_frame(Instant::now());
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

    #[test]
    fn keepalive_pings_an_idle_client_and_gives_up_on_a_silent_one() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        // Early tick: wait for the rest of the interval.
        assert_eq!(
            k.tick(t0 + Duration::from_secs(10), true),
            Tick::WaitUntil(t0 + INTERVAL)
        );
        // Idle for the interval: ping, then wait for the answer.
        assert_eq!(
            k.tick(t0 + INTERVAL, true),
            Tick::Ping {
                next: t0 + INTERVAL + TIMEOUT
            }
        );
        // Still silent when the timeout is up: give up.
        assert_eq!(k.tick(t0 + INTERVAL + TIMEOUT, true), Tick::TimedOut);
    }

    #[test]
    fn keepalive_an_answer_resets_the_clock() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert!(matches!(k.tick(t0 + INTERVAL, true), Tick::Ping { .. }));
        let answered = t0 + INTERVAL + Duration::from_secs(1);
        k.client_frame(answered);
        assert_eq!(
            k.tick(t0 + INTERVAL + TIMEOUT, true),
            Tick::WaitUntil(answered + INTERVAL)
        );
    }

    #[test]
    fn keepalive_does_not_queue_a_ping_behind_a_pending_message() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert_eq!(
            k.tick(t0 + INTERVAL, false),
            Tick::WaitUntil(t0 + INTERVAL + INTERVAL)
        );
    }

    /// A relay over in-memory pipes: (client peer, backend peer, the pump's task).
    async fn relay(
        ping_interval: Duration,
        pong_timeout: Duration,
    ) -> (
        WebSocketStream<DuplexStream>,
        WebSocketStream<DuplexStream>,
        tokio::task::JoinHandle<RelayStats>,
        CancellationToken,
    ) {
        let (client_peer, client_leg) = tokio::io::duplex(64 * 1024);
        let (backend_leg, backend_peer) = tokio::io::duplex(64 * 1024);
        let ws = |io, role| WebSocketStream::from_raw_socket(io, role, None);
        let client_peer = ws(client_peer, Role::Client).await;
        let client_leg = ws(client_leg, Role::Server).await;
        let backend_leg = ws(backend_leg, Role::Client).await;
        let backend_peer = ws(backend_peer, Role::Server).await;
        let shutdown = CancellationToken::new();
        let settings = RelaySettings {
            ping_interval,
            pong_timeout,
            shutdown: shutdown.clone(),
            metrics: Arc::new(Metrics::new()),
        };
        let task = tokio::spawn(async move { pump(client_leg, backend_leg, &settings).await });
        (client_peer, backend_peer, task, shutdown)
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
}
