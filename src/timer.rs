//! A timer polled only when polling it can change something: to register the task's waker
//! after it was made or reset, and once it has fired. A `Sleep` polled on every wake-up of
//! its task updates its registration each time (bench/NOTES.md, issue 12); the relay's
//! timer and the connection's head clock poll through this instead.
//!
//! One flag says whether the waker is registered, so the caller must be polled by one task
//! for its whole life (a spawned task's own future, or a `select!` arm in it). A timer that
//! may be polled with different wakers keeps the waker and compares it instead
//! (`proxy::forward`'s `TimerGate`).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Sleep;

/// Polls `timer` if `armed` is false or it has fired; `armed` is left true once a poll has
/// registered the waker. Clear `armed` after every `reset`.
///
/// Armed only by a poll that had cooperative budget left: without budget, tokio's `Sleep`
/// returns `Pending` before it registers anything (tokio then wakes the task again itself).
pub fn poll_armed(timer: Pin<&mut Sleep>, armed: &mut bool, cx: &mut Context<'_>) -> Poll<()> {
    if *armed && !timer.is_elapsed() {
        return Poll::Pending;
    }
    let budget = tokio::task::coop::has_budget_remaining();
    let polled = timer.poll(cx);
    *armed = polled.is_pending() && budget;
    polled
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_timer_first_polled_without_budget_still_fires() {
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
        let mut armed = false;
        let mut first = true;
        let fired = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| {
                if std::mem::take(&mut first) {
                    // The task's budget used up before the timer's first poll, as a burst
                    // of messages can leave it.
                    loop {
                        let spend = std::pin::pin!(tokio::task::consume_budget());
                        if spend.poll(cx).is_pending() {
                            break;
                        }
                    }
                }
                poll_armed(timer.as_mut(), &mut armed, cx)
            }),
        )
        .await;
        assert!(fired.is_ok(), "the timer never fired");
    }
}
