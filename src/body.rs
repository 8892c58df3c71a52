//! Body types: one response body for everything chatgate answers (small fixed bodies or a
//! backend's streamed body), and the watched stream that enforces an idle timeout, signals
//! its end, and counts bytes for the access log. Frames pass through one by one: nothing is
//! buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::telemetry::AccessLog;

/// Why a body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("body idle for {0:?}")]
    IdleTimeout(Duration),
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
}

/// A streamed body with an idle timeout: asked for a frame, the stream has none for
/// `idle_timeout`, and it ends with an error (never a total timeout: a long download that
/// keeps moving is fine). The wait counts from when the consumer asked, not from the last
/// frame: a consumer that was slow to ask (hyper stops asking while a slow client's socket
/// is full) is backpressure, not an idle stream, and must not trip the timer on its next
/// poll. A client that stops reading altogether is the socket's watchdog's business
/// (`client_io`). `Unpin`, as hyper's client connection requires of request bodies.
pub struct Watched<B = Incoming> {
    inner: B,
    // Armed only once the stream first has to wait: a body that arrives at once never
    // touches the timer.
    idle: Option<Pin<Box<Sleep>>>,
    idle_timeout: Duration,
    // Since when the consumer has been waiting for the next frame; `None` right after a
    // frame (so only the first poll that has to wait reads the clock).
    waiting_since: Option<Instant>,
    // Fires once the stream has ended (the request fully sent).
    done: Option<oneshot::Sender<()>>,
    // Request bodies only: the size limit, what has passed, and the bytes metric.
    limit: u64,
    seen: u64,
    counter: Option<metrics::Counter>,
}

impl<B> Watched<B> {
    pub fn new(inner: B, idle_timeout: Duration) -> Self {
        Watched {
            inner,
            idle: None,
            idle_timeout,
            waiting_since: None,
            done: None,
            limit: u64::MAX,
            seen: 0,
            counter: None,
        }
    }

    /// A request body: ends with [`BodyError::TooLarge`] past `limit` bytes, counts its bytes
    /// into `counter`, and the returned receiver resolves once it has been sent whole.
    pub fn request(
        inner: B,
        idle_timeout: Duration,
        limit: u64,
        counter: metrics::Counter,
    ) -> (Self, oneshot::Receiver<()>) {
        let (mut body, sent) = Watched::with_end_signal(inner, idle_timeout);
        body.limit = limit;
        body.counter = Some(counter);
        (body, sent)
    }

    /// Like [`Watched::new`], and the returned receiver resolves when the body has ended.
    pub fn with_end_signal(inner: B, idle_timeout: Duration) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut body = Watched::new(inner, idle_timeout);
        body.done = Some(tx);
        (body, rx)
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting_since = None;
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    this.seen += len;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                    if let Some(counter) = &this.counter {
                        counter.increment(len);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    let _ = done.send(());
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                // The timer is re-armed lazily, only when it fires: resetting it on every
                // wait would touch the timer wheel (and its lock) per frame.
                let deadline =
                    *this.waiting_since.get_or_insert_with(Instant::now) + this.idle_timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                loop {
                    ready!(idle.as_mut().poll(cx));
                    if Instant::now() >= deadline {
                        return Poll::Ready(Some(Err(BodyError::IdleTimeout(this.idle_timeout))));
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Kind {
    Full {
        data: Option<Bytes>,
    },
    Stream {
        body: Watched,
    },
    Tapped {
        body: Watched,
        tap: Box<dyn BodyTap>,
    },
}

/// Sees a streamed response body's frames on their way to the client, and is dropped with
/// the body: for bookkeeping that lasts as long as the response (a worker's load) or reads
/// its first bytes (an Engine.IO handshake's session id). Nothing is held back.
pub trait BodyTap: Send + Sync {
    fn frame(&mut self, data: &Bytes);
}

/// Two taps on one body, each seeing every frame.
impl<A: BodyTap, B: BodyTap> BodyTap for (A, B) {
    fn frame(&mut self, data: &Bytes) {
        self.0.frame(data);
        self.1.frame(data);
    }
}

/// Every response chatgate sends. Carries the request's access log, written when the body
/// is done or dropped (a client that went away still gets its line). `Unpin`, like
/// everything it holds, so no pin projection is needed.
pub struct ProxyBody {
    kind: Kind,
    /// Bytes of chatgate's own sent before the body (chat notices ahead of an Engine.IO
    /// polling answer).
    prefix: Option<Bytes>,
    log: Option<AccessLog>,
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ProxyBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            prefix: None,
            log: None,
        }
    }

    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Full { data: None },
            prefix: None,
            log: None,
        }
    }

    pub fn stream(body: Watched) -> Self {
        ProxyBody {
            kind: Kind::Stream { body },
            prefix: None,
            log: None,
        }
    }

    /// A streamed body whose frames `tap` sees.
    pub fn tapped(body: Watched, tap: Box<dyn BodyTap>) -> Self {
        ProxyBody {
            kind: Kind::Tapped { body, tap },
            prefix: None,
            log: None,
        }
    }

    /// Sends `prefix` before the body (the caller adjusts `Content-Length`).
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    pub fn set_log(&mut self, mut log: AccessLog) {
        // An empty body is never polled: it is complete as soon as the head is sent.
        log.completed |= self.is_end_stream();
        self.log = Some(log);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let (polled, ended) = match &mut this.kind {
            _ if this.prefix.is_some() => (
                Poll::Ready(this.prefix.take().map(|d| Ok(Frame::data(d)))),
                false,
            ),
            Kind::Full { data } => (Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))), true),
            Kind::Stream { body } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                (polled, body.is_end_stream())
            }
            Kind::Tapped { body, tap } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        tap.frame(data);
                    }
                }
                (polled, body.is_end_stream())
            }
        };
        if let Some(log) = this.log.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    log.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
                    // hyper stops polling a body once its known length has been sent.
                    log.completed |= ended;
                }
                Poll::Ready(Some(Err(e))) => log.note_error(e.to_string()),
                Poll::Ready(None) => log.completed = true,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if self.prefix.is_some() {
            return false;
        }
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Stream { body } | Kind::Tapped { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Stream { body } | Kind::Tapped { body, .. } => body.size_hint(),
        };
        if let Some(prefix) = &self.prefix {
            let extra = prefix.len() as u64;
            // Upper first: SizeHint refuses a lower bound above its upper one.
            let (lower, upper) = (hint.lower() + extra, hint.upper().map(|u| u + extra));
            hint = SizeHint::new();
            if let Some(upper) = upper {
                hint.set_upper(upper);
            }
            hint.set_lower(lower);
        }
        hint
    }
}

/// A request body on its way to the backend: nothing at all (most requests, and the only
/// kind that can be resent on a fresh connection), or the client's stream.
pub enum RequestBody {
    Empty,
    Stream {
        body: Watched,
    },
    /// A small body read whole first (an Engine.IO polling POST the chat reader screened).
    Full {
        data: Option<Bytes>,
    },
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Stream { body } => Pin::new(body).poll_frame(cx),
            RequestBody::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Stream { body } => body.is_end_stream(),
            RequestBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Stream { body } => body.size_hint(),
            RequestBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body fed by the test, one frame at a time.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            self.get_mut()
                .0
                .poll_recv(cx)
                .map(|next| next.map(|b| Ok(Frame::data(b))))
        }
    }

    fn poll_once(body: &mut Watched<Fed>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let waker = std::task::Waker::noop();
        Pin::new(body).poll_frame(&mut Context::from_waker(waker))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_does_not_trip_the_idle_timer() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = Watched::new(Fed(rx), Duration::from_secs(1));
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(matches!(poll_once(&mut body), Poll::Ready(Some(Ok(_)))));
        // The consumer (hyper, behind a slow client) does not ask for 5 s.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            poll_once(&mut body).is_pending(),
            "waiting starts when the consumer asks"
        );
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(poll_once(&mut body).is_pending());
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        assert!(matches!(poll_once(&mut body), Poll::Ready(Some(Ok(_)))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_with_nothing_to_give_times_out() {
        let (_tx, rx) = mpsc::channel::<Bytes>(4);
        let mut body = Watched::new(Fed(rx), Duration::from_secs(1));
        assert!(poll_once(&mut body).is_pending());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(poll_once(&mut body).is_pending());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(
            poll_once(&mut body),
            Poll::Ready(Some(Err(BodyError::IdleTimeout(_))))
        ));
    }
}
