//! Shutdown signals: SIGTERM (what Azure Container Apps and Docker send) and SIGINT, and
//! [`Shutdown`], the signal every connection and relay watches for.
//!
//! The handlers are installed by [`Signals::install`] before the listener is bound: a
//! SIGTERM that arrives as soon as the port accepts must drain, not kill, the process.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// The process's shutdown, which every connection and relay watches for: a flag and a
/// `Notify` to wake the watchers.
///
/// Why not tokio-util's `CancellationToken`: its `cancelled()` future takes the token's
/// mutex and its waiter list's mutex on every poll, and every connection shares both. A
/// client connection's task is polled some five times per request, a relay's per message:
/// that was 800 instructions per proxied request, and on several cores two locks every core
/// takes (bench/NOTES.md, issue 12). tokio's `Notify` locks the same way when polled, and no
/// crate offers a cheaper poll, so [`Cancelled`] polls its `Notified` only to register the
/// task, then reads the flag. One pointer wide, like the token: every idle relay holds one.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<Signal>);

#[derive(Debug, Default)]
struct Signal {
    begun: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// Begins the shutdown: every [`Cancelled`] resolves.
    pub fn cancel(&self) {
        // The flag first: a task woken below must find it set.
        self.0.begun.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.begun.load(Ordering::Acquire)
    }

    /// Resolves once the shutdown has begun; cheap to poll again and again (see [`Shutdown`]).
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            begun: &self.0.begun,
            task: None,
            // Made now: a `notify_waiters` after this and before the first poll still
            // counts for it (tokio's `Notified` contract), and the flag covers the rest.
            notified: self.0.notify.notified(),
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Shutdown::cancelled`]. Its `Notified` is polled to register the task's waker,
    /// and again only when the poll comes with another task's waker; otherwise a poll reads
    /// the flag and nothing else.
    pub struct Cancelled<'a> {
        begun: &'a AtomicBool,
        // The registered waker's data pointer (a tokio task's own address): enough to tell
        // another task's waker, in one word where a stored `Waker` would take two, and every
        // idle relay holds this future. Two wakers with one data pointer and different
        // vtables would pass for one; tokio's, the only executor chatgate runs on, do not.
        task: Option<std::num::NonZeroUsize>,
        #[pin]
        notified: Notified<'a>,
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.begun.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let task = std::num::NonZeroUsize::new(cx.waker().data() as usize);
        if task.is_some() && *this.task == task {
            // `Notified` holds this task's waker: `cancel` wakes it after setting the flag.
            return Poll::Pending;
        }
        *this.task = task;
        this.notified.poll(cx)
    }
}

/// Installed SIGTERM and SIGINT handlers.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; from here on the signals no longer end the process.
    pub fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// Resolves on the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = self.int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(fut: Pin<&mut Cancelled<'_>>, count: &Arc<Count>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(count));
        fut.poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn cancel_wakes_the_waiting_task_and_resolves_it() {
        let shutdown = Shutdown::default();
        let fut = shutdown.cancelled();
        tokio::pin!(fut);
        let task = Arc::new(Count::default());
        // Polled again and again (the task's other work waking it), it stays pending.
        for _ in 0..5 {
            assert!(poll(fut.as_mut(), &task).is_pending());
        }
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        shutdown.clone().cancel();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "cancel wakes the task");
        assert!(poll(fut.as_mut(), &task).is_ready());
        assert!(shutdown.is_cancelled());
    }

    #[test]
    fn a_new_waker_is_the_one_woken() {
        let shutdown = Shutdown::default();
        let fut = shutdown.cancelled();
        tokio::pin!(fut);
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        assert!(poll(fut.as_mut(), &first).is_pending());
        // The future moved to another task: that task must be woken, not the first.
        assert!(poll(fut.as_mut(), &second).is_pending());
        shutdown.cancel();
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(poll(fut.as_mut(), &second).is_ready());
    }

    #[test]
    fn after_cancel_a_new_watch_is_ready_at_once() {
        let shutdown = Shutdown::default();
        shutdown.cancel();
        let fut = shutdown.cancelled();
        tokio::pin!(fut);
        assert!(poll(fut.as_mut(), &Arc::new(Count::default())).is_ready());
    }
}
