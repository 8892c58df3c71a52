//! One chat session as chatgate sees it (a relayed WebSocket, or an Engine.IO polling
//! session): the user's messages, the answers Chainlit is working on, and how long they
//! take. A state machine over instants, fed the events the packet reader names; it never
//! touches a socket, so its rules are tested without one.
//!
//! Chainlit 2.12 (`chainlit/socket.py`, `emitter.py`): a `client_message` (or
//! `edit_message`) starts a task that emits `task_start`, the answer (`stream_start`,
//! `stream_token`..., `new_message`, `update_message`), then `task_end`, also when the
//! handler fails or the user sends `stop`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// What an event means for the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatEvent {
    /// The user sent a message: `client_message`, `edit_message`.
    UserMessage,
    /// The user asked to stop the answer: `stop`.
    Stop,
    /// Chainlit started working on a message: `task_start`.
    TaskStart,
    /// Chainlit finished (or gave up on) a message: `task_end`.
    TaskEnd,
    /// Part of an answer reached the user: `stream_start`, `stream_token`, `new_message`.
    AnswerPart,
    /// Anything else.
    Other,
}

impl ChatEvent {
    /// An event the browser sent.
    pub fn from_client(name: &str) -> ChatEvent {
        match name {
            "client_message" | "edit_message" => ChatEvent::UserMessage,
            "stop" => ChatEvent::Stop,
            _ => ChatEvent::Other,
        }
    }

    /// An event Chainlit sent.
    pub fn from_server(name: &str) -> ChatEvent {
        match name {
            "task_start" => ChatEvent::TaskStart,
            "task_end" => ChatEvent::TaskEnd,
            "stream_start" | "stream_token" | "new_message" => ChatEvent::AnswerPart,
            _ => ChatEvent::Other,
        }
    }
}

/// Answers tracked at once per session; Chainlit starts one task per message, so more than
/// this means the counts are off (or a client floods): the oldest start is dropped.
const MAX_TRACKED_TASKS: usize = 16;

/// What an observed server event produced, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observed {
    Nothing,
    /// The first part of an answer, this long after the user's message.
    FirstToken(Duration),
    /// An answer started.
    AnswerStarted,
    /// An answer ended after this long.
    AnswerEnded(Duration),
}

/// Counts and clocks of one chat session.
#[derive(Debug, Default)]
pub struct ChatSession {
    pub messages: u64,
    pub answers: u64,
    pub answer_time: Duration,
    /// When the oldest user message still waiting for its first answer part was sent.
    waiting_since: Option<Instant>,
    /// Start instants of the answers in progress, oldest first.
    tasks: VecDeque<Instant>,
}

impl ChatSession {
    /// Answers Chainlit is working on for this session.
    pub fn answers_in_progress(&self) -> usize {
        self.tasks.len()
    }

    /// A user message was forwarded at `now`.
    pub fn user_message(&mut self, now: Instant) {
        self.messages += 1;
        self.waiting_since.get_or_insert(now);
    }

    /// Chainlit sent `event` at `now`.
    pub fn server_event(&mut self, event: ChatEvent, now: Instant) -> Observed {
        match event {
            ChatEvent::TaskStart => {
                if self.tasks.len() == MAX_TRACKED_TASKS {
                    self.tasks.pop_front();
                }
                self.tasks.push_back(now);
                Observed::AnswerStarted
            }
            ChatEvent::TaskEnd => match self.tasks.pop_front() {
                Some(started) => {
                    let took = now.saturating_duration_since(started);
                    self.answers += 1;
                    self.answer_time += took;
                    // An answer that ended without a part (an error, a stop) ends the wait,
                    // but only a wait it could have answered: a message sent after this
                    // answer began (the user read the reply and wrote again before its
                    // `task_end` arrived) waits for the next answer.
                    if self.tasks.is_empty()
                        && self.waiting_since.is_some_and(|sent| sent <= started)
                    {
                        self.waiting_since = None;
                    }
                    Observed::AnswerEnded(took)
                }
                None => Observed::Nothing,
            },
            ChatEvent::AnswerPart => match self.waiting_since.take() {
                Some(sent) => Observed::FirstToken(now.saturating_duration_since(sent)),
                None => Observed::Nothing,
            },
            _ => Observed::Nothing,
        }
    }

    /// The session ended: the answers still counted as in progress, now abandoned.
    pub fn close(&mut self) -> usize {
        self.waiting_since = None;
        let open = self.tasks.len();
        self.tasks.clear();
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn events_are_named_as_chainlit_sends_them() {
        assert_eq!(
            ChatEvent::from_client("client_message"),
            ChatEvent::UserMessage
        );
        assert_eq!(
            ChatEvent::from_client("edit_message"),
            ChatEvent::UserMessage
        );
        assert_eq!(ChatEvent::from_client("stop"), ChatEvent::Stop);
        assert_eq!(ChatEvent::from_client("task_start"), ChatEvent::Other);
        assert_eq!(ChatEvent::from_server("task_start"), ChatEvent::TaskStart);
        assert_eq!(ChatEvent::from_server("task_end"), ChatEvent::TaskEnd);
        assert_eq!(
            ChatEvent::from_server("stream_token"),
            ChatEvent::AnswerPart
        );
        assert_eq!(ChatEvent::from_server("client_message"), ChatEvent::Other);
    }

    #[test]
    fn a_round_trip_measures_first_token_and_duration() {
        let t0 = Instant::now();
        let mut s = ChatSession::default();
        s.user_message(t0);
        assert_eq!(
            s.server_event(ChatEvent::TaskStart, t0 + ms(2)),
            Observed::AnswerStarted
        );
        assert_eq!(s.answers_in_progress(), 1);
        assert_eq!(
            s.server_event(ChatEvent::AnswerPart, t0 + ms(50)),
            Observed::FirstToken(ms(50))
        );
        assert_eq!(
            s.server_event(ChatEvent::AnswerPart, t0 + ms(60)),
            Observed::Nothing,
            "only the first part counts"
        );
        assert_eq!(
            s.server_event(ChatEvent::TaskEnd, t0 + ms(302)),
            Observed::AnswerEnded(ms(300))
        );
        assert_eq!((s.messages, s.answers, s.answer_time), (1, 1, ms(300)));
        assert_eq!(s.answers_in_progress(), 0);
    }

    #[test]
    fn stray_ends_and_answerless_tasks_do_not_confuse_the_counts() {
        let t0 = Instant::now();
        let mut s = ChatSession::default();
        assert_eq!(s.server_event(ChatEvent::TaskEnd, t0), Observed::Nothing);
        s.user_message(t0);
        s.server_event(ChatEvent::TaskStart, t0);
        s.server_event(ChatEvent::TaskEnd, t0 + ms(5));
        // The next message's first token is measured from the next message.
        s.user_message(t0 + ms(100));
        assert_eq!(
            s.server_event(ChatEvent::AnswerPart, t0 + ms(130)),
            Observed::FirstToken(ms(30))
        );
    }

    #[test]
    fn a_message_sent_before_the_last_answers_end_keeps_its_first_token() {
        // The reply's parts reach the user, who writes again before Chainlit's `task_end`
        // for that reply comes through: the new message's wait must survive that end.
        let t0 = Instant::now();
        let mut s = ChatSession::default();
        s.user_message(t0);
        s.server_event(ChatEvent::TaskStart, t0 + ms(1));
        s.server_event(ChatEvent::AnswerPart, t0 + ms(10));
        s.user_message(t0 + ms(20));
        assert_eq!(
            s.server_event(ChatEvent::TaskEnd, t0 + ms(21)),
            Observed::AnswerEnded(ms(20))
        );
        s.server_event(ChatEvent::TaskStart, t0 + ms(22));
        assert_eq!(
            s.server_event(ChatEvent::AnswerPart, t0 + ms(50)),
            Observed::FirstToken(ms(30))
        );
    }

    #[test]
    fn tracked_tasks_are_bounded_and_closing_abandons_them() {
        let t0 = Instant::now();
        let mut s = ChatSession::default();
        for _ in 0..100 {
            s.server_event(ChatEvent::TaskStart, t0);
        }
        assert_eq!(s.answers_in_progress(), MAX_TRACKED_TASKS);
        assert_eq!(s.close(), MAX_TRACKED_TASKS);
        assert_eq!(s.answers_in_progress(), 0);
    }
}
