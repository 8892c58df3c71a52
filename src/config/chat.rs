//! Settings of the chat-aware edge: reading Socket.IO traffic and the chat limits.

use clap::Args;

use super::limits::{Rate, parse_rate};
use super::values::{Line, Problems, count, invalid, switch};

#[derive(Debug, Clone, Args)]
pub struct ChatSettings {
    /// on: read relayed Socket.IO traffic for the chat metrics, limits and drain (off: relays
    /// only move bytes; the chat limits then do nothing).
    #[arg(
        long,
        env = "CHATGATE_CHAT_OBSERVE",
        default_value = "on",
        global = true
    )]
    pub chat_observe: String,
    /// Per-client rate of chat messages, e.g. 10/minute (off when empty). The client is the
    /// browser (affinity cookie) or Engine.IO session where known, else the address.
    #[arg(
        long,
        env = "CHATGATE_CHAT_RATE_LIMIT",
        default_value = "",
        global = true
    )]
    pub chat_rate_limit: String,
    /// Most answers in progress per chat session before a new message is refused (0 = off).
    #[arg(
        long,
        env = "CHATGATE_MAX_ANSWERS_PER_SESSION",
        default_value = "0",
        global = true
    )]
    pub max_answers_per_session: String,
    /// Most answers in progress in this container before a new message is refused (0 = off).
    #[arg(long, env = "CHATGATE_MAX_ANSWERS", default_value = "0", global = true)]
    pub max_answers: String,
}

#[derive(Debug, Clone)]
pub struct ChatConfig {
    pub observe: bool,
    pub rate_limit: Option<Rate>,
    pub max_answers_per_session: Option<usize>,
    pub max_answers: Option<usize>,
}

impl ChatConfig {
    pub(super) fn validate(s: &ChatSettings, p: &mut Problems) -> Option<ChatConfig> {
        let observe = p.check(switch("chat-observe", &s.chat_observe));
        let rate_limit = p.check(
            parse_rate(&s.chat_rate_limit)
                .map_err(|e| invalid("chat-rate-limit", &s.chat_rate_limit, e)),
        );
        let cap = |flag: &str, value: &str| {
            count(flag, value, 0, 1_000_000).map(|n| (n > 0).then_some(n))
        };
        let max_answers_per_session =
            p.check(cap("max-answers-per-session", &s.max_answers_per_session));
        let max_answers = p.check(cap("max-answers", &s.max_answers));
        Some(ChatConfig {
            observe: observe?,
            rate_limit: rate_limit?,
            max_answers_per_session: max_answers_per_session?,
            max_answers: max_answers?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        let cap = |n: Option<usize>| n.map_or("off".to_owned(), |n| n.to_string());
        lines.extend([
            (
                "chat_observe",
                if self.observe { "on" } else { "off" }.to_owned(),
            ),
            (
                "chat_rate_limit",
                self.rate_limit.map_or("off".to_owned(), |r| {
                    format!("{}/{}s", r.count, r.period.as_secs())
                }),
            ),
            ("max_answers_per_session", cap(self.max_answers_per_session)),
            ("max_answers", cap(self.max_answers)),
        ]);
    }
}
