//! Is the client still there? Two small state machines over instants, tested without sockets
//! or timers: `Keepalive` pings a silent client and gives up when it stays silent, and
//! `WriteStall` gives up on a client whose socket takes no byte of what is waiting for it.
//! `WriteWatch` is the socket wrapper that tells the pump what `WriteStall` needs to know.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Keep-alive towards the client: ping it after `interval` without a frame *from* it, give
/// up when it stays silent for `timeout` after the ping went out. Messages *to* the client
/// prove nothing (a client that stopped reading still "receives" until its window fills),
/// so only what the client sends counts as activity or as an answer.
#[derive(Debug)]
pub struct Keepalive {
    interval: Duration,
    timeout: Duration,
    last_client_frame: Instant,
    ping: Ping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ping {
    /// No ping outstanding.
    Idle,
    /// A ping was asked for and waits to be written (behind a message to the client).
    Queued,
    /// A ping went out at this instant.
    Sent(Instant),
}

/// What the keep-alive timer asks for when it fires.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do: fire again at this instant.
    WaitUntil(Instant),
    /// Queue a ping (and call `ping_sent` when it goes out), then fire again at this instant.
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
            ping: Ping::Idle,
        }
    }

    /// A frame arrived from the client.
    pub fn client_frame(&mut self, now: Instant) {
        self.last_client_frame = now;
    }

    /// The queued ping was handed to the client's socket: its answer is due `timeout` from
    /// now. (Until then the ping waits behind a message, and `WriteStall` judges the
    /// client: a client taking bytes slowly is not asked to answer what it cannot see yet.)
    pub fn ping_sent(&mut self, now: Instant) {
        if self.ping == Ping::Queued {
            self.ping = Ping::Sent(now);
        }
    }

    /// The timer fired at `now` (early firings are harmless: they only say when to fire).
    pub fn tick(&mut self, now: Instant) -> Tick {
        match self.ping {
            Ping::Sent(sent) if self.last_client_frame < sent => {
                return if now >= sent + self.timeout {
                    Tick::TimedOut
                } else {
                    Tick::WaitUntil(sent + self.timeout)
                };
            }
            Ping::Queued => return Tick::WaitUntil(now + self.timeout),
            Ping::Sent(_) | Ping::Idle => self.ping = Ping::Idle,
        }
        if now < self.last_client_frame + self.interval {
            Tick::WaitUntil(self.last_client_frame + self.interval)
        } else {
            self.ping = Ping::Queued;
            Tick::Ping {
                next: now + self.timeout,
            }
        }
    }
}

/// The write-stall rule: while the client's socket refuses bytes that wait for it, a clock
/// runs; every byte it takes restarts the clock, and when the clock reaches `timeout` the
/// relay ends. A slow client (taking bytes, however few) is never cut off by this rule; a
/// client that stopped reading (zero TCP window) is, even though chatgate's buffers, not the
/// client, hold what it has not read.
///
/// The timeout comes with each look rather than being kept: every idle relay holds one of
/// these, and the relay's task sits just under an allocator size class (bench/NOTES.md).
#[derive(Debug, Default)]
pub struct WriteStall {
    /// When the relay gives up, counted from when the socket refused bytes without taking
    /// any.
    deadline: Option<Instant>,
    /// The socket's byte count when the clock started (or at the last look while blocked).
    written: u64,
}

impl WriteStall {
    /// The socket refused its latest write (at `now`), having taken `written` bytes in all;
    /// the clock, if it starts now, runs for `timeout`.
    pub fn blocked(&mut self, now: Instant, written: u64, timeout: Duration) {
        if self.deadline.is_none() || written != self.written {
            self.deadline = Some(now + timeout);
        }
        self.written = written;
    }

    /// The socket took everything offered to it.
    pub fn flowing(&mut self) {
        self.deadline = None;
    }

    /// When the relay gives up unless the socket takes a byte first.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn stalled(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| now >= deadline)
    }
}

/// The client leg's socket, watched: whether its latest write was refused (the peer's
/// receive window is full) and how many bytes it has taken. tungstenite holds what it
/// cannot write in its own buffer and says only "not yet", so the socket itself is where a
/// slow client (taking bytes) is told from a stuck one. Written by hand: a pass-through of
/// four methods that counts, which no crate offers.
#[derive(Debug)]
pub struct WriteWatch<T> {
    io: T,
    written: u64,
    blocked: bool,
}

impl<T> WriteWatch<T> {
    pub fn new(io: T) -> WriteWatch<T> {
        WriteWatch {
            io,
            written: 0,
            blocked: false,
        }
    }

    /// Whether the latest write was refused (returned `Pending`).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Bytes the socket has taken so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        match &result {
            Poll::Ready(Ok(n)) => {
                self.written += *n as u64;
                self.blocked = false;
            }
            Poll::Ready(Err(_)) => self.blocked = false,
            Poll::Pending => self.blocked = true,
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(20);
    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn keepalive_pings_an_idle_client_and_gives_up_on_a_silent_one() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        // Early tick: wait for the rest of the interval.
        assert_eq!(k.tick(t0 + 10 * SECOND), Tick::WaitUntil(t0 + INTERVAL));
        // Idle for the interval: ping, then wait for the answer.
        assert_eq!(
            k.tick(t0 + INTERVAL),
            Tick::Ping {
                next: t0 + INTERVAL + TIMEOUT
            }
        );
        k.ping_sent(t0 + INTERVAL);
        // An early look meanwhile changes nothing.
        assert_eq!(
            k.tick(t0 + INTERVAL + SECOND),
            Tick::WaitUntil(t0 + INTERVAL + TIMEOUT)
        );
        // Still silent when the timeout is up: give up.
        assert_eq!(k.tick(t0 + INTERVAL + TIMEOUT), Tick::TimedOut);
    }

    #[test]
    fn keepalive_an_answer_resets_the_clock() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert!(matches!(k.tick(t0 + INTERVAL), Tick::Ping { .. }));
        k.ping_sent(t0 + INTERVAL);
        let answered = t0 + INTERVAL + SECOND;
        k.client_frame(answered);
        assert_eq!(
            k.tick(t0 + INTERVAL + TIMEOUT),
            Tick::WaitUntil(answered + INTERVAL)
        );
        // The next ping comes an interval after the answer.
        assert!(matches!(k.tick(answered + INTERVAL), Tick::Ping { .. }));
    }

    #[test]
    fn keepalive_counts_the_answer_time_from_when_the_ping_went_out() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert!(matches!(k.tick(t0 + INTERVAL), Tick::Ping { .. }));
        // The ping waits behind a long message: no verdict while it has not gone out.
        let late = t0 + INTERVAL + TIMEOUT + 5 * SECOND;
        assert_eq!(k.tick(late), Tick::WaitUntil(late + TIMEOUT));
        k.ping_sent(late);
        assert_eq!(
            k.tick(late + TIMEOUT - SECOND),
            Tick::WaitUntil(late + TIMEOUT)
        );
        assert_eq!(k.tick(late + TIMEOUT), Tick::TimedOut);
    }

    #[test]
    fn keepalive_a_frame_before_the_ping_went_out_is_no_answer() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert!(matches!(k.tick(t0 + INTERVAL), Tick::Ping { .. }));
        k.client_frame(t0 + INTERVAL + SECOND);
        k.ping_sent(t0 + INTERVAL + 2 * SECOND);
        assert_eq!(k.tick(t0 + INTERVAL + 2 * SECOND + TIMEOUT), Tick::TimedOut);
    }

    #[test]
    fn keepalive_ping_sent_without_a_queued_ping_is_ignored() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(INTERVAL, TIMEOUT, t0);
        k.ping_sent(t0 + SECOND);
        assert_eq!(k.tick(t0 + 2 * SECOND), Tick::WaitUntil(t0 + INTERVAL));
    }

    #[test]
    fn write_stall_a_socket_that_takes_nothing_stalls_after_the_timeout() {
        let t0 = Instant::now();
        let mut w = WriteStall::default();
        assert_eq!(w.deadline(), None);
        w.blocked(t0, 4096, TIMEOUT);
        assert_eq!(w.deadline(), Some(t0 + TIMEOUT));
        // Looking again without progress keeps the clock running.
        w.blocked(t0 + 10 * SECOND, 4096, TIMEOUT);
        assert!(!w.stalled(t0 + TIMEOUT - SECOND));
        assert!(w.stalled(t0 + TIMEOUT));
    }

    #[test]
    fn write_stall_every_byte_taken_restarts_the_clock() {
        let t0 = Instant::now();
        let mut w = WriteStall::default();
        w.blocked(t0, 4096, TIMEOUT);
        // One byte taken 19 s later, still blocked after it: a slow client, not a stuck one.
        w.blocked(t0 + 19 * SECOND, 4097, TIMEOUT);
        assert!(!w.stalled(t0 + TIMEOUT));
        assert_eq!(w.deadline(), Some(t0 + 19 * SECOND + TIMEOUT));
    }

    #[test]
    fn write_stall_a_flowing_socket_has_no_deadline() {
        let t0 = Instant::now();
        let mut w = WriteStall::default();
        w.blocked(t0, 0, TIMEOUT);
        w.flowing();
        assert_eq!(w.deadline(), None);
        assert!(!w.stalled(t0 + 10 * TIMEOUT));
        // Blocked again later: a fresh clock, whatever the count.
        w.blocked(t0 + 100 * SECOND, 0, TIMEOUT);
        assert_eq!(w.deadline(), Some(t0 + 100 * SECOND + TIMEOUT));
    }

    #[tokio::test]
    async fn write_watch_sees_a_full_pipe_and_counts_what_it_took() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(8);
        let mut watched = WriteWatch::new(near);
        watched.write_all(b"12345678").await.unwrap();
        assert_eq!(watched.written(), 8);
        assert!(!watched.is_blocked());
        // The pipe is full: the next write is refused.
        let refused = futures_util::FutureExt::now_or_never(std::future::poll_fn(|cx| {
            Pin::new(&mut watched).poll_write(cx, b"9")
        }));
        assert!(refused.is_none());
        assert!(watched.is_blocked());
        let mut buf = [0u8; 8];
        far.read_exact(&mut buf).await.unwrap();
        watched.write_all(b"9").await.unwrap();
        assert_eq!(watched.written(), 9);
        assert!(!watched.is_blocked());
    }
}
