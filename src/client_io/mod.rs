//! The client connection's socket, watched on its way to hyper: the request heads as they
//! pass (the framing check, `framing.rs`) and the writes (a client that stops reading is
//! cut). What it learns reaches the request pipeline through [`ConnectionWatch`].
//!
//! Why a wrapper around the socket: hyper polls a response body only while its write buffer
//! has room, so once a client stops reading, nothing above the socket runs at all, and no
//! body timer can notice. Only the socket sees a write that cannot finish.

mod framing;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub use framing::{FramingCheck, Outcome};

use crate::metrics::MetricsHandle;
use crate::timer::poll_armed;

/// What a connection's socket wrapper and its request handling tell each other. Relaxed
/// atomics: the flags are written once, the head clock's counts on every read or write,
/// and all of it is read and written by the connection's task (the relay's, once upgraded).
#[derive(Debug, Default)]
pub struct ConnectionWatch {
    /// A request head had both lengths, or the check could not follow the stream: a
    /// chunked request on this connection is refused (fail closed).
    refuse_chunked: AtomicBool,
    /// The service answered 101: no more HTTP heads to check.
    upgraded: AtomicBool,
    /// The relay holds the socket (hyper wrote the 101 and let go of it): the relay keeps
    /// its own timers, so the write watchdog stands down. Not before: a client that does not
    /// read the 101 itself must still be cut.
    handed_over: AtomicBool,
    /// The write watchdog cut the connection.
    stalled: AtomicBool,
    /// Complete request heads the framing check has seen, wrapping (for [`HeadClock`]).
    heads: AtomicU32,
    /// Writes to the client that went through, wrapping (for [`HeadClock`]).
    writes: AtomicU32,
    /// A write to the client is waiting for room (for [`HeadClock`]: the write watchdog's
    /// business, not the head clock's).
    write_blocked: AtomicBool,
    /// A request body has yet to arrive in full (for [`HeadClock`]: the body's own idle
    /// timeout governs it, also once the answer is out).
    in_body: AtomicBool,
}

impl ConnectionWatch {
    pub fn refuses_chunked(&self) -> bool {
        self.refuse_chunked.load(Ordering::Relaxed)
    }

    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// The WebSocket relay has the socket: from here on it watches the client itself.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Relaxed);
    }

    fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Relaxed)
    }

    pub fn was_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

/// A client socket with the framing check on reads and a write-progress watchdog: a write
/// that has waited `stall_timeout` for room in the socket fails with `TimedOut`, which
/// ends the hyper connection (and drops the response body, and so the backend exchange).
///
/// One timer per connection, armed lazily: only when a write first has to wait, and then
/// moved, in place, only when it fires early (a newer wait began since). A download to a
/// client that keeps up never touches it.
pub struct ClientIo<T> {
    inner: T,
    watch: Arc<ConnectionWatch>,
    framing: FramingCheck,
    stall_timeout: Duration,
    // Since when the current write has been waiting; `None` while writes go through.
    blocked_since: Option<Instant>,
    stall_timer: Option<Pin<Box<Sleep>>>,
}

impl<T> ClientIo<T> {
    pub fn new(
        inner: T,
        watch: Arc<ConnectionWatch>,
        framing: FramingCheck,
        stall_timeout: Duration,
    ) -> Self {
        ClientIo {
            inner,
            watch,
            framing,
            stall_timeout,
            blocked_since: None,
            stall_timer: None,
        }
    }

    /// The write could not go through: wait for room, but no longer than `stall_timeout`
    /// since the wait began.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.watch.is_handed_over() {
            return Poll::Pending;
        }
        if self.blocked_since.is_none() {
            self.watch.write_blocked.store(true, Ordering::Relaxed);
        }
        let deadline = *self.blocked_since.get_or_insert_with(Instant::now) + self.stall_timeout;
        let timer = self
            .stall_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                self.watch.stalled.store(true, Ordering::Relaxed);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client accepted no bytes for {:?}", self.stall_timeout),
                )));
            }
            // Armed for an earlier wait: move it to this one's deadline.
            timer.as_mut().reset(deadline);
        }
    }

    fn progress<R>(&mut self, result: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if result.is_ready() {
            if self.blocked_since.take().is_some() {
                self.watch.write_blocked.store(false, Ordering::Relaxed);
            }
            let writes = &self.watch.writes;
            // Only this task writes it: a load and a store, no read-modify-write.
            writes.store(
                writes.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
        }
        result
    }
}

/// The request-head timeout (`--header-read-timeout`: the slowloris guard, and the limit on
/// an idle keep-alive connection), kept by the connection's task rather than by hyper:
/// hyper boxes a new timer for every head, registers it and drops it once the head is in,
/// an allocation and two timer-wheel updates per request (bench/NOTES.md, issue 12). This
/// clock has one timer for the connection's life, moved only when it fires; per request it
/// costs a few relaxed loads and stores of counts (heads, writes, answers).
///
/// The connection waits for a request from its start and from the end of each answer (its
/// access line, which counts it and notes when), for as long as every head the framing
/// check has seen is answered and no request body is still arriving. When the timer fires
/// on a connection that is busy, or that wrote to the client since the last look, or is
/// waiting to (the tail of a response leaving hyper's buffer for a slow reader), it looks
/// again a timeout later: a client that stops reading is the write watchdog's. So an idle
/// connection, or a head trickling in after an answer, is cut between one and two timeouts
/// after the answer went out; a first head, one timeout after the connection opened.
///
/// Its timer is polled through `timer::poll_armed`, which assumes one task polls it (the
/// connection's, in `server.rs`'s `select!`).
pub struct HeadClock {
    timeout: Duration,
    watch: Arc<ConnectionWatch>,
    /// Counts the connection's finished responses and notes the last one's end.
    answers: MetricsHandle,
    /// `ConnectionWatch::writes` when the timer last fired.
    writes_at: u32,
    timer: Pin<Box<Sleep>>,
    /// The timer holds this task's waker (`timer::poll_armed`).
    armed: bool,
}

impl HeadClock {
    pub fn new(timeout: Duration, watch: Arc<ConnectionWatch>, answers: MetricsHandle) -> Self {
        HeadClock {
            timeout,
            watch,
            answers,
            writes_at: 0,
            timer: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }

    /// Ready once the connection has waited `timeout` for a request head. Pending for good
    /// once it is upgraded (a relay keeps its own timers).
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Duration> {
        loop {
            ready!(poll_armed(self.timer.as_mut(), &mut self.armed, cx));
            if self.watch.is_upgraded() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let writes = self.watch.writes.load(Ordering::Relaxed);
            let wrote = writes != self.writes_at;
            self.writes_at = writes;
            let (answered, answered_at) = self.answers.responses_finished();
            let waiting = self.watch.heads.load(Ordering::Relaxed) == answered
                && !self.watch.write_blocked.load(Ordering::Relaxed)
                && !self.watch.in_body.load(Ordering::Relaxed);
            let deadline = if waiting && !wrote {
                answered_at + self.timeout
            } else {
                now + self.timeout
            };
            if now >= deadline {
                return Poll::Ready(self.timeout);
            }
            self.timer.as_mut().reset(deadline);
            self.armed = false;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.framing.is_stopped() {
            if this.watch.is_upgraded() {
                this.framing.stop();
            } else {
                match this.framing.inspect(&buf.filled()[before..]) {
                    Outcome::Continue | Outcome::Chunked => {}
                    Outcome::Conflict | Outcome::Lost => {
                        this.watch.refuse_chunked.store(true, Ordering::Relaxed);
                    }
                }
                this.watch
                    .heads
                    .store(this.framing.heads(), Ordering::Relaxed);
                this.watch
                    .in_body
                    .store(this.framing.in_body(), Ordering::Relaxed);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.poll_stall(cx),
            done => this.progress(done),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_stall(cx),
            done => this.progress(done),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn wrap(
        io: tokio::io::DuplexStream,
        timeout: Duration,
    ) -> (ClientIo<tokio::io::DuplexStream>, Arc<ConnectionWatch>) {
        let watch = Arc::new(ConnectionWatch::default());
        let io = ClientIo::new(io, Arc::clone(&watch), FramingCheck::new(4096, 32), timeout);
        (io, watch)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_too_long_fails() {
        let (ours, mut client) = tokio::io::duplex(16);
        let (mut io, watch) = wrap(ours, Duration::from_secs(5));
        let started = Instant::now();
        let err = io.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(watch.was_stalled());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        let mut got = [0u8; 16];
        client.read_exact(&mut got).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut() {
        let (ours, mut client) = tokio::io::duplex(16);
        let (mut io, watch) = wrap(ours, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 16 * 10];
            for chunk in got.chunks_mut(16) {
                tokio::time::sleep(Duration::from_secs(4)).await;
                client.read_exact(chunk).await.unwrap();
            }
            got
        });
        // 40 s of writing, blocked most of the time, never 5 s in a row.
        io.write_all(&[7u8; 16 * 10]).await.unwrap();
        assert!(!watch.was_stalled());
        assert!(reader.await.unwrap().iter().all(|&b| b == 7));
    }

    #[tokio::test(start_paused = true)]
    async fn once_the_relay_holds_the_socket_the_watchdog_stands_down() {
        let (ours, _client) = tokio::io::duplex(16);
        let (mut io, watch) = wrap(ours, Duration::from_secs(5));
        watch.set_upgraded();
        watch.hand_over();
        let write = tokio::time::timeout(Duration::from_secs(60), io.write_all(&[0u8; 64]));
        assert!(write.await.is_err(), "still waiting after 60 s, not cut");
        assert!(!watch.was_stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_101_is_still_cut() {
        // The service answered 101, but hyper cannot write it: the relay does not hold the
        // socket yet, so nothing else would ever time this client out.
        let (ours, _client) = tokio::io::duplex(16);
        let (mut io, watch) = wrap(ours, Duration::from_secs(5));
        watch.set_upgraded();
        let write = tokio::time::timeout(Duration::from_secs(60), io.write_all(&[0u8; 64]));
        let result = write.await.expect("cut before 60 s");
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(watch.was_stalled());
    }

    #[tokio::test]
    async fn a_conflicting_head_is_reported_as_it_is_read() {
        let (ours, mut client) = tokio::io::duplex(1024);
        let (mut io, watch) = wrap(ours, Duration::from_secs(5));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let _ = io.read(&mut buf).await.unwrap();
        assert!(!watch.refuses_chunked());
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let _ = io.read(&mut buf).await.unwrap();
        assert!(watch.refuses_chunked());
    }
}
