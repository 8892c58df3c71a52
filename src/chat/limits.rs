//! The chat limits, each off unless set: a per-client rate of user messages, and caps on the
//! answers in progress per session and per container. A message over a limit is not
//! forwarded; the pump tells the user why.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::Rate;

/// Who a chat message is counted against: the Engine.IO session when the request names
/// one, else the client address (from the trusted-proxy logic). Not the affinity cookie: it
/// names a worker, which many visitors share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChatClient {
    Session(String),
    Address(IpAddr),
}

/// Why a message was refused (the `reason` label of `chatgate_chat_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `--chat-rate-limit`; retry after the wait.
    Rate(Duration),
    /// `--max-answers-per-session` answers already in progress in this session.
    SessionAnswers,
    /// `--max-answers` answers already in progress in this container.
    Answers,
    /// chatgate is draining for a restart.
    Draining,
}

impl Refusal {
    pub const LABELS: [&'static str; 4] = ["rate", "session_answers", "answers", "draining"];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate(_) => "rate",
            Refusal::SessionAnswers => "session_answers",
            Refusal::Answers => "answers",
            Refusal::Draining => "draining",
        }
    }

    /// What the user reads in the chat's notice.
    pub fn notice(self) -> String {
        match self {
            Refusal::Rate(wait) => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                format!(
                    "You are sending messages too fast. Please wait {} s and send it again.",
                    secs.max(1)
                )
            }
            Refusal::SessionAnswers => {
                "An answer is still on its way. Please wait for it (or stop it) before sending another message.".to_owned()
            }
            Refusal::Answers => {
                "The assistant is busy with other conversations. Please try again in a moment.".to_owned()
            }
            Refusal::Draining => {
                "The chat is restarting for an update. Please send your message again in a few seconds.".to_owned()
            }
        }
    }
}

/// The configured limits and the container-wide count of answers in progress.
#[derive(Default)]
pub struct ChatLimits {
    rate: Option<DefaultKeyedRateLimiter<ChatClient>>,
    max_per_session: Option<usize>,
    max_total: Option<usize>,
    /// Answers in progress across every session of this chatgate.
    in_progress: AtomicUsize,
}

impl ChatLimits {
    pub fn new(
        rate: Option<Rate>,
        max_per_session: Option<usize>,
        max_total: Option<usize>,
    ) -> Self {
        ChatLimits {
            rate: rate.map(|rate| {
                let per_cell = rate.period / rate.count.get();
                let quota = Quota::with_period(per_cell.max(Duration::from_nanos(1)))
                    .unwrap_or_else(|| Quota::per_second(rate.count))
                    .allow_burst(rate.count);
                DefaultKeyedRateLimiter::keyed(quota)
            }),
            max_per_session,
            max_total,
            in_progress: AtomicUsize::new(0),
        }
    }

    /// Whether a user message from `client`, whose session has `session_answers` answers in
    /// progress, may go to the backend. A refused message does not use up the rate.
    pub fn admit(&self, client: &ChatClient, session_answers: usize) -> Result<(), Refusal> {
        if self
            .max_per_session
            .is_some_and(|max| session_answers >= max)
        {
            return Err(Refusal::SessionAnswers);
        }
        if self
            .max_total
            .is_some_and(|max| self.in_progress.load(Ordering::Relaxed) >= max)
        {
            return Err(Refusal::Answers);
        }
        if let Some(limiter) = &self.rate {
            limiter.check_key(client).map_err(|not_until| {
                Refusal::Rate(not_until.wait_time_from(DefaultClock::default().now()))
            })?;
        }
        Ok(())
    }

    pub fn answer_started(&self) {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
    }

    pub fn answers_ended(&self, count: usize) {
        // Never below zero, even if a session's counts were off.
        let _ = self
            .in_progress
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(count))
            });
    }

    /// Answers in progress in this container.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// Forgets clients whose rate has fully replenished (called from housekeeping).
    pub fn forget_idle_clients(&self) {
        if let Some(limiter) = &self.rate {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rate;

    fn client(n: u8) -> ChatClient {
        ChatClient::Address(IpAddr::from([192, 0, 2, n]))
    }

    #[test]
    fn no_limit_set_admits_everything() {
        let limits = ChatLimits::default();
        for _ in 0..1000 {
            assert!(limits.admit(&client(1), 99).is_ok());
        }
    }

    #[test]
    fn the_rate_is_per_client() {
        let limits = ChatLimits::new(parse_rate("2/minute").unwrap(), None, None);
        assert!(limits.admit(&client(1), 0).is_ok());
        assert!(limits.admit(&client(1), 0).is_ok());
        let Err(Refusal::Rate(wait)) = limits.admit(&client(1), 0) else {
            panic!("third message in a minute must be refused");
        };
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(limits.admit(&client(2), 0).is_ok());
        assert!(limits.admit(&ChatClient::Session("s".into()), 0).is_ok());
    }

    #[test]
    fn answer_caps_count_what_is_in_progress() {
        let limits = ChatLimits::new(None, Some(1), Some(2));
        assert!(limits.admit(&client(1), 0).is_ok());
        assert_eq!(limits.admit(&client(1), 1), Err(Refusal::SessionAnswers));
        limits.answer_started();
        limits.answer_started();
        assert_eq!(limits.admit(&client(2), 0), Err(Refusal::Answers));
        limits.answers_ended(5);
        assert_eq!(limits.in_progress(), 0);
        assert!(limits.admit(&client(2), 0).is_ok());
    }

    #[test]
    fn every_refusal_has_a_label_and_a_notice() {
        for refusal in [
            Refusal::Rate(Duration::from_millis(1500)),
            Refusal::SessionAnswers,
            Refusal::Answers,
            Refusal::Draining,
        ] {
            assert!(Refusal::LABELS.contains(&refusal.label()));
            assert!(refusal.notice().len() > 20);
        }
        assert!(
            Refusal::Rate(Duration::from_millis(1500))
                .notice()
                .contains("2 s")
        );
    }
}
