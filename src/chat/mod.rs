//! The chat-aware edge: chatgate reads the Socket.IO traffic it relays (without changing
//! or copying it) to count the user's messages and Chainlit's answers, time them, enforce
//! the chat limits, and let answers finish during a drain.
//!
//! `packets.rs` names events, `session.rs` keeps one session's counts and clocks,
//! `limits.rs` decides whether a message may pass; [`ChatRelay`] ties them to one relay.

pub mod limits;
pub mod packets;
pub mod polling;
pub mod session;

use std::sync::Arc;

use tokio::time::Instant;

use crate::metrics::Metrics;
use limits::{ChatClient, ChatLimits, Refusal};
use packets::Packet;
use session::{ChatEvent, ChatSession, Observed};

/// What every relay shares: the limits and the metrics.
pub struct Chat {
    /// `--chat-observe`: read the traffic at all (off: relays only move bytes).
    pub observe: bool,
    pub limits: ChatLimits,
    pub metrics: Arc<Metrics>,
    /// Engine.IO polling sessions' chat state, by `sid`.
    pub polling: polling::PollingChats,
}

#[cfg(test)]
impl Chat {
    /// A chat edge reading the traffic, with these limits and metrics of its own.
    pub fn for_tests(limits: ChatLimits) -> Arc<Chat> {
        Arc::new(Chat {
            observe: true,
            limits,
            metrics: Arc::new(Metrics::new()),
            polling: Default::default(),
        })
    }
}

/// What to do with a message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Do not forward it; send this Socket.IO packet (a text frame) to the client instead.
    Refuse(String),
}

/// One relay's view of its chat.
pub struct ChatRelay {
    chat: Arc<Chat>,
    client: ChatClient,
    /// The worker the session is on (its metrics' `worker` label with several workers).
    worker: usize,
    session: ChatSession,
    /// Binary frames still to drop: the attachments of a refused BINARY_EVENT.
    skip_attachments: u32,
    /// Whether the traffic looked like Socket.IO at all (only then a session line is due).
    seen_socketio: bool,
}

impl ChatRelay {
    pub fn new(chat: Arc<Chat>, client: ChatClient, worker: usize) -> ChatRelay {
        ChatRelay {
            chat,
            client,
            worker,
            session: ChatSession::default(),
            skip_attachments: 0,
            seen_socketio: false,
        }
    }

    pub fn answers_in_progress(&self) -> usize {
        self.session.answers_in_progress()
    }

    /// A text frame from the client. `draining`: chatgate is shutting down, so a new
    /// message would be cut; it is refused with a notice instead.
    pub fn client_text(&mut self, text: &str, now: Instant, draining: bool) -> Verdict {
        if !self.chat.observe {
            return Verdict::Forward;
        }
        let Packet::Event {
            name, attachments, ..
        } = packets::read(text)
        else {
            return Verdict::Forward;
        };
        self.seen_socketio = true;
        if ChatEvent::from_client(name) != ChatEvent::UserMessage {
            return Verdict::Forward;
        }
        let admitted = if draining {
            Err(Refusal::Draining)
        } else {
            self.chat
                .limits
                .admit(&self.client, self.session.answers_in_progress())
        };
        match admitted {
            Ok(()) => {
                self.session.user_message(now);
                self.chat.metrics.chat_message(self.worker);
                Verdict::Forward
            }
            Err(refusal) => {
                self.skip_attachments = attachments;
                self.chat.metrics.chat_refused(refusal.label());
                tracing::info!(
                    reason = refusal.label(),
                    client = ?self.client,
                    "chat message refused"
                );
                Verdict::Refuse(notice(refusal))
            }
        }
    }

    /// A binary frame from the client: dropped when it belongs to a refused message.
    pub fn client_binary(&mut self) -> Verdict {
        if self.skip_attachments > 0 {
            self.skip_attachments -= 1;
            return Verdict::Refuse(String::new());
        }
        Verdict::Forward
    }

    /// A text frame from the backend.
    pub fn server_text(&mut self, text: &str, now: Instant) {
        if !self.chat.observe {
            return;
        }
        let Packet::Event { name, .. } = packets::read(text) else {
            return;
        };
        self.seen_socketio = true;
        match self.session.server_event(ChatEvent::from_server(name), now) {
            Observed::Nothing => {}
            Observed::FirstToken(took) => self.chat.metrics.chat_first_token(self.worker, took),
            Observed::AnswerStarted => {
                self.chat.limits.answer_started();
                self.chat.metrics.chat_answer_started(self.worker);
            }
            Observed::AnswerEnded(took) => {
                self.chat.limits.answers_ended(1);
                self.chat.metrics.chat_answer_ended(self.worker, took);
            }
        }
    }

    /// The relay ended: answers still open are abandoned, and the session's line is written.
    pub fn finish(&mut self, path: &str, request_id: &str) {
        let open = self.session.close();
        if open > 0 {
            self.chat.limits.answers_ended(open);
            self.chat.metrics.chat_answers_abandoned(self.worker, open);
        }
        if self.seen_socketio {
            tracing::info!(
                path,
                messages = self.session.messages,
                answers = self.session.answers,
                answer_seconds = (self.session.answer_time.as_secs_f64() * 1e3).round() / 1e3,
                abandoned = open,
                request_id,
                "chat session"
            );
        }
    }
}

/// The notice a refused message earns: Chainlit's own `toast` event, which its frontend
/// shows as a pop-up (`{"message", "type"}`, type one of info/success/warning/error).
fn notice(refusal: Refusal) -> String {
    packets::event_packet(
        "toast",
        &serde_json::json!({ "message": refusal.notice(), "type": "warning" }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rate;
    use std::net::IpAddr;
    use std::time::Duration;

    fn relay(limits: ChatLimits) -> ChatRelay {
        let chat = Chat::for_tests(limits);
        ChatRelay::new(chat, ChatClient::Address(IpAddr::from([192, 0, 2, 1])), 0)
    }

    const MESSAGE: &str = r#"42["client_message",{"message":{"output":"hi"},"fileReferences":[]}]"#;

    #[test]
    fn a_message_over_the_rate_is_refused_with_a_toast() {
        let mut r = relay(ChatLimits::new(parse_rate("1/minute").unwrap(), None, None));
        let now = Instant::now();
        assert_eq!(r.client_text(MESSAGE, now, false), Verdict::Forward);
        let Verdict::Refuse(toast) = r.client_text(MESSAGE, now, false) else {
            panic!("second message in a minute must be refused");
        };
        assert_eq!(
            packets::read(&toast),
            packets::Packet::Event {
                name: "toast",
                ack: None,
                attachments: 0
            }
        );
        assert!(toast.contains("too fast"), "{toast}");
        // Other events still pass.
        assert_eq!(
            r.client_text(r#"42["fetch_favorites",{}]"#, now, false),
            Verdict::Forward
        );
    }

    #[test]
    fn a_refused_binary_message_takes_its_attachments_with_it() {
        let mut r = relay(ChatLimits::default());
        let now = Instant::now();
        let binary = r#"452-["client_message",{"a":{"_placeholder":true,"num":0}}]"#;
        assert!(matches!(
            r.client_text(binary, now, true),
            Verdict::Refuse(_)
        ));
        assert!(matches!(r.client_binary(), Verdict::Refuse(_)));
        assert!(matches!(r.client_binary(), Verdict::Refuse(_)));
        assert_eq!(r.client_binary(), Verdict::Forward);
    }

    #[test]
    fn answers_are_tracked_and_released_when_the_relay_ends() {
        let mut r = relay(ChatLimits::new(None, Some(1), None));
        let t0 = Instant::now();
        assert_eq!(r.client_text(MESSAGE, t0, false), Verdict::Forward);
        r.server_text(r#"42["task_start",{}]"#, t0);
        assert_eq!(r.answers_in_progress(), 1);
        assert!(matches!(
            r.client_text(MESSAGE, t0, false),
            Verdict::Refuse(_)
        ));
        r.server_text(
            r#"42["stream_token",{"id":"1","token":"Hi"}]"#,
            t0 + Duration::from_millis(5),
        );
        r.server_text(r#"42["task_end",{}]"#, t0 + Duration::from_millis(9));
        assert_eq!(r.answers_in_progress(), 0);
        assert_eq!(r.chat.limits.in_progress(), 0);
        r.server_text(r#"42["task_start",{}]"#, t0);
        assert_eq!(r.chat.limits.in_progress(), 1);
        r.finish("/ws/socket.io/", "req");
        assert_eq!(
            r.chat.limits.in_progress(),
            0,
            "an ended relay gives its answers back"
        );
    }

    #[test]
    fn observe_off_reads_nothing() {
        let chat = Arc::new(Chat {
            observe: false,
            limits: ChatLimits::new(None, Some(0), None),
            metrics: Arc::new(Metrics::new()),
            polling: Default::default(),
        });
        let mut r = ChatRelay::new(chat, ChatClient::Session("s".into()), 0);
        assert_eq!(
            r.client_text(MESSAGE, Instant::now(), true),
            Verdict::Forward
        );
    }
}
