//! The backend connection a client connection owns: the requests of one keep-alive client
//! connection go to their worker over one keep-alive backend connection, run by the client
//! connection's own task (`server.rs` polls [`OwnedBackend::drive`] beside hyper's server
//! connection). Request, response head and body never cross tasks, and nothing shared is
//! locked or hashed per request: what nginx and HAProxy do in their event loops.
//!
//! Why by hand: hyper-util's pooled client runs each backend connection in a task of its
//! own and checks connections out of a shared, hashed, locked pool for every request (the
//! profile in `bench/NOTES.md`); hyper's `client::conn` gives the parts, not this shape.
//!
//! A client connection that ends with its backend connection idle leaves it in its
//! worker's [`IdleConnections`], where the next new client connection finds it: backend
//! connections are opened per burst of new clients, not per client.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep};

use crate::backend::client::{BackendStream, LegError, connect_stream};
use crate::body::RequestBody;
use crate::config::BackendConfig;

type Driver = Connection<TokioIo<BackendStream>, RequestBody>;

/// One keep-alive HTTP/1.1 connection to a worker.
pub struct BackendConn {
    sender: SendRequest<RequestBody>,
    driver: Pin<Box<Driver>>,
    /// Since when it has been idle (set when an exchange ends, see `poll_drive`).
    idle_since: Instant,
    /// An exchange is under way (sent, and the connection not yet ready for the next).
    in_flight: bool,
}

impl BackendConn {
    /// Opens a connection to `backend` (TLS for `https://`), bounded by `--connect-timeout`.
    pub async fn connect(
        backend: &BackendConfig,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<BackendConn, LegError> {
        let stream = connect_stream(backend, tls).await?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                LegError::Failed(crate::error::ProxyError::BackendConnect(
                    crate::error::Cause::new(e),
                ))
            })?;
        Ok(BackendConn {
            sender,
            driver: Box::pin(driver),
            idle_since: Instant::now(),
            in_flight: false,
        })
    }

    /// Notes the end of an exchange: idle from now (a long answer, a 25 s long-poll, must
    /// not make a fresh connection look stale).
    fn settle(&mut self) {
        if self.in_flight && self.sender.is_ready() {
            self.in_flight = false;
            self.idle_since = Instant::now();
        }
    }

    /// Idle (no exchange in progress), open, and not idle for longer than `max_idle`.
    fn is_reusable(&self, max_idle: Duration) -> bool {
        self.sender.is_ready() && self.idle_since.elapsed() < max_idle
    }

    /// Not idle and not closed: a response is still on its way over it.
    fn is_busy(&self) -> bool {
        !self.sender.is_ready() && !self.sender.is_closed()
    }

    /// Lets a busy connection finish its exchange in a task of its own (then it closes).
    fn detach(self) {
        let BackendConn { sender, driver, .. } = self;
        drop(sender);
        // Outside a runtime (it is shutting down) the connection just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(error = %e, "detached backend connection ended with an error");
                }
            });
        }
    }
}

/// A worker's idle connections, newest last, left by client connections that ended.
/// Locked once per new client connection (never per request), and not polled while here:
/// a connection the backend closed meanwhile gives its request back unsent on first use
/// (hyper reads the close before it writes), and the request goes out on a new one.
pub struct IdleConnections {
    list: Mutex<Vec<BackendConn>>,
    max_idle: Duration,
    capacity: usize,
}

impl IdleConnections {
    pub fn new(max_idle: Duration, capacity: usize) -> IdleConnections {
        IdleConnections {
            list: Mutex::new(Vec::new()),
            max_idle,
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<BackendConn>> {
        self.list
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&self) -> Option<BackendConn> {
        let mut list = self.lock();
        while let Some(conn) = list.pop() {
            if conn.is_reusable(self.max_idle) {
                return Some(conn);
            }
        }
        None
    }

    fn park(&self, mut conn: BackendConn) {
        conn.settle();
        if conn.is_reusable(self.max_idle) {
            let mut list = self.lock();
            if list.len() < self.capacity {
                list.push(conn);
            }
        }
    }

    /// Closes the connections idle for longer than `--pool-idle-timeout` (housekeeping).
    pub fn expire(&self) {
        let max_idle = self.max_idle;
        self.lock().retain(|conn| conn.is_reusable(max_idle));
    }
}

/// The backend connection of one client connection, bound to the worker it talks to.
#[derive(Default)]
pub struct OwnedBackend {
    // Shared by two futures of the client connection's task (the request handler and the
    // driver), so the lock is never contended; a plain field would not be `Sync`.
    slot: Mutex<Slot>,
    // Wakes the driver when the handler installs a new connection.
    waker: AtomicWaker,
}

#[derive(Default)]
struct Slot {
    conn: Option<Bound>,
    /// The response-header deadline, one timer for the connection's life, moved in place
    /// per request (tokio extends a pending timer without touching the timer wheel).
    timer: Option<Pin<Box<Sleep>>>,
}

struct Bound {
    conn: BackendConn,
    home: Arc<IdleConnections>,
}

impl Bound {
    /// Lets go of the connection: an idle one goes back to its worker's list, a busy one
    /// finishes on its own, a closed or stale one is dropped.
    fn release(self) {
        if self.conn.is_busy() {
            self.conn.detach();
        } else {
            self.home.park(self.conn);
        }
    }
}

/// What became of a request handed to [`OwnedBackend::send`].
pub enum Sent<F> {
    /// On its way: the response.
    Sent(F),
    /// No connection to send it on: connect one and call `send` again with it.
    NeedsConnection(Box<Request<RequestBody>>),
}

impl OwnedBackend {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `req` to `home`'s worker: on `connected` when given (it becomes this client
    /// connection's), else on the connection held for that worker, else on an idle one of
    /// the worker's; `fresh` skips both (a retry after a failure).
    pub fn send(
        &self,
        home: &Arc<IdleConnections>,
        req: Request<RequestBody>,
        fresh: bool,
        connected: Option<BackendConn>,
    ) -> Sent<
        impl Future<Output = Result<Response<Incoming>, TrySendError<Request<RequestBody>>>>
        + Send
        + use<>,
    > {
        let mut slot = self.lock();
        let usable = slot.conn.as_ref().is_some_and(|bound| {
            !fresh && Arc::ptr_eq(&bound.home, home) && bound.conn.is_reusable(home.max_idle)
        });
        if !usable || connected.is_some() {
            if let Some(old) = slot.conn.take() {
                old.release();
            }
            let next = match connected {
                Some(conn) => Some(conn),
                None if fresh => None,
                None => home.take(),
            };
            let Some(conn) = next else {
                return Sent::NeedsConnection(Box::new(req));
            };
            slot.conn = Some(Bound {
                conn,
                home: Arc::clone(home),
            });
            // The driver has not seen this connection yet.
            self.waker.wake();
        }
        let Some(bound) = slot.conn.as_mut() else {
            return Sent::NeedsConnection(Box::new(req));
        };
        bound.conn.in_flight = true;
        Sent::Sent(bound.conn.sender.try_send_request(req))
    }

    /// The connection's response-header timer, set to `deadline` (give it back with
    /// [`OwnedBackend::put_timer`]).
    pub fn timer(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        match self.lock().timer.take() {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    pub fn put_timer(&self, timer: Pin<Box<Sleep>>) {
        self.lock().timer = Some(timer);
    }

    /// Runs the backend connection (reads its responses, writes its requests) for as long
    /// as the client connection lasts. Never resolves: poll it beside the client connection.
    pub fn drive(&self) -> impl Future<Output = Infallible> + '_ {
        std::future::poll_fn(move |cx| self.poll_drive(cx))
    }

    fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<Infallible> {
        self.waker.register(cx.waker());
        let mut slot = self.lock();
        if let Some(bound) = slot.conn.as_mut() {
            if let Poll::Ready(result) = bound.conn.driver.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "backend connection ended with an error");
                }
                slot.conn = None;
            } else {
                bound.conn.settle();
            }
        }
        Poll::Pending
    }
}

impl Drop for OwnedBackend {
    /// The client connection is gone: an idle backend connection stays for the next one.
    fn drop(&mut self) {
        let slot = self.slot.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(bound) = slot.conn.take() {
            bound.release();
        }
    }
}
