//! The chat reader on Engine.IO long-polling: a POST carries the client's packets, joined by
//! `\x1e`; a GET's answer carries the server's. Polling sessions have no relay to hold their
//! chat state, so it is kept here by Engine.IO `sid`, bounded and expired.
//!
//! A refused user message in a POST becomes Engine.IO's noop packet (`6`), so the body stays
//! a valid payload and the rest of it still reaches the backend; its notice waits for the
//! session's next GET answer, which is whenever the backend next answers the long-poll (at
//! the latest its ping, 25 s with Chainlit's defaults).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::limits::ChatClient;
use super::{Chat, ChatRelay, Verdict};

/// Polling sessions tracked at once; beyond it the idlest is dropped (and its line written).
const MAX_SESSIONS: usize = 50_000;
/// A polling session not seen for this long has ended (Chainlit's ping interval + timeout is
/// 45 s; an upgraded session stops polling at once).
pub const SESSION_IDLE: Duration = Duration::from_secs(90);
/// Largest POST body read whole to screen it; a larger one passes untouched (Engine.IO's own
/// limit, `maxPayload`, is 1,000,000 bytes).
pub const MAX_SCREENED_BODY: usize = 1 << 20;
/// Notices waiting for one session's next GET.
const MAX_NOTICES: usize = 4;
/// Bytes of each record's start kept while a GET answer streams by: enough for the event name.
const HEAD_BYTES: usize = 96;

struct PollingSession {
    relay: ChatRelay,
    notices: Vec<String>,
    seen: Instant,
}

/// The polling sessions' chat state.
#[derive(Default)]
pub struct PollingChats {
    sessions: Mutex<HashMap<String, PollingSession>>,
}

impl PollingChats {
    /// Screens a POST body of session `sid`: each user message is admitted or replaced by a
    /// noop. Returns the body to send on, or `None` when nothing was changed (or the session
    /// is not one the backend has answered for yet).
    pub fn screen_post(&self, sid: &str, body: &str, draining: bool) -> Option<String> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // Only a session the backend has answered for (a 200 poll, which creates it in
        // `server_record`) is screened: any client can write a `sid` in a POST, and junk
        // ones must not fill the table. A real client's first poll answer (the Socket.IO
        // CONNECT ack) comes long before its first chat message.
        let session = sessions.get_mut(sid)?;
        session.seen = now;
        let mut changed = false;
        let mut out = String::with_capacity(body.len());
        for (i, record) in super::packets::records(body).enumerate() {
            if i > 0 {
                out.push('\x1e');
            }
            let verdict = if record.starts_with('b') {
                session.relay.client_binary()
            } else {
                session.relay.client_text(record, now, draining)
            };
            match verdict {
                Verdict::Forward => out.push_str(record),
                Verdict::Refuse(notice) => {
                    changed = true;
                    out.push('6');
                    if !notice.is_empty() && session.notices.len() < MAX_NOTICES {
                        session.notices.push(notice);
                    }
                }
            }
        }
        changed.then_some(out)
    }

    /// The notices waiting for session `sid`, taken (to go before its next GET answer).
    pub fn take_notices(&self, sid: &str) -> Vec<String> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get_mut(sid)
            .map(|s| std::mem::take(&mut s.notices))
            .unwrap_or_default()
    }

    /// A record of a GET answer for session `sid` (its first bytes at least).
    pub fn server_record(&self, chat: &Arc<Chat>, sid: &str, worker: usize, head: &str) {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        session(&mut sessions, chat, sid, worker, now)
            .relay
            .server_text(head, now);
    }

    /// Ends the sessions not seen for `SESSION_IDLE` (housekeeping).
    pub fn expire(&self, now: Instant) {
        let ended: Vec<(String, PollingSession)> = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let idle: Vec<String> = sessions
                .iter()
                .filter(|(_, s)| now.saturating_duration_since(s.seen) >= SESSION_IDLE)
                .map(|(sid, _)| sid.clone())
                .collect();
            idle.into_iter()
                .filter_map(|sid| sessions.remove(&sid).map(|s| (sid, s)))
                .collect()
        };
        for (sid, mut session) in ended {
            session.relay.finish("polling", &sid);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

fn session<'a>(
    sessions: &'a mut HashMap<String, PollingSession>,
    chat: &Arc<Chat>,
    sid: &str,
    worker: usize,
    now: Instant,
) -> &'a mut PollingSession {
    if !sessions.contains_key(sid) && sessions.len() >= MAX_SESSIONS {
        if let Some(idlest) = sessions
            .iter()
            .min_by_key(|(_, s)| s.seen)
            .map(|(k, _)| k.clone())
        {
            if let Some(mut gone) = sessions.remove(&idlest) {
                gone.relay.finish("polling", &idlest);
            }
        }
    }
    let session = sessions
        .entry(sid.to_owned())
        .or_insert_with(|| PollingSession {
            // A polling session's messages count against the session itself.
            relay: ChatRelay::new(
                Arc::clone(chat),
                ChatClient::Session(sid.to_owned()),
                worker,
            ),
            notices: Vec::new(),
            seen: now,
        });
    session.seen = now;
    session
}

/// Collects the first bytes of each `\x1e`-separated record of a body that streams by in
/// frames, without keeping more than `HEAD_BYTES` of any record.
#[derive(Default)]
pub struct RecordHeads {
    head: Vec<u8>,
    /// The current record's head was already handed out (it was long enough).
    done: bool,
}

impl RecordHeads {
    /// Feeds one frame; `each` gets every record head completed in it.
    pub fn feed(&mut self, mut data: &[u8], each: &mut dyn FnMut(&str)) {
        while !data.is_empty() {
            let end = data.iter().position(|&b| b == 0x1e);
            let part = &data[..end.unwrap_or(data.len())];
            if !self.done {
                let room = HEAD_BYTES - self.head.len();
                self.head.extend_from_slice(&part[..part.len().min(room)]);
                if self.head.len() == HEAD_BYTES {
                    self.emit(each);
                    self.done = true;
                }
            }
            match end {
                Some(at) => {
                    if !self.done {
                        self.emit(each);
                    }
                    self.done = false;
                    self.head.clear();
                    data = &data[at + 1..];
                }
                None => break,
            }
        }
    }

    /// The body ended: the last record's head, if not handed out yet.
    pub fn finish(&mut self, each: &mut dyn FnMut(&str)) {
        if !self.done && !self.head.is_empty() {
            self.emit(each);
        }
        self.head.clear();
        self.done = false;
    }

    fn emit(&self, each: &mut dyn FnMut(&str)) {
        // A head cut inside a multi-byte character keeps its valid part.
        let text = match std::str::from_utf8(&self.head) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&self.head[..e.valid_up_to()]).unwrap_or(""),
        };
        each(text);
    }
}

/// Reads the server's records of an Engine.IO polling answer as it streams to the client.
pub struct PollingTap {
    chat: Arc<Chat>,
    sid: String,
    worker: usize,
    heads: RecordHeads,
}

impl PollingTap {
    pub fn new(chat: Arc<Chat>, sid: String, worker: usize) -> Self {
        PollingTap {
            chat,
            sid,
            worker,
            heads: RecordHeads::default(),
        }
    }
}

impl crate::body::BodyTap for PollingTap {
    fn frame(&mut self, data: &bytes::Bytes) {
        let (chat, sid, worker) = (&self.chat, self.sid.as_str(), self.worker);
        self.heads.feed(data, &mut |head| {
            chat.polling.server_record(chat, sid, worker, head)
        });
    }
}

impl Drop for PollingTap {
    fn drop(&mut self) {
        let (chat, sid, worker) = (&self.chat, self.sid.as_str(), self.worker);
        self.heads
            .finish(&mut |head| chat.polling.server_record(chat, sid, worker, head));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::limits::ChatLimits;
    use crate::config::parse_rate;

    fn chat(limits: ChatLimits) -> Arc<Chat> {
        Chat::for_tests(limits)
    }

    const MESSAGE: &str = r#"42["client_message",{"message":{"output":"hi"}}]"#;

    #[test]
    fn a_refused_message_becomes_a_noop_and_its_notice_waits_for_the_next_get() {
        let chat = chat(ChatLimits::new(parse_rate("1/minute").unwrap(), None, None));
        let polling = PollingChats::default();
        assert_eq!(
            polling.screen_post("s1", MESSAGE, false),
            None,
            "a session the backend never answered for is not screened"
        );
        polling.server_record(&chat, "s1", 0, r#"40{"sid":"x"}"#);
        assert_eq!(polling.screen_post("s1", MESSAGE, false), None);
        let body = format!("{MESSAGE}\x1e42[\"fetch_favorites\",{{}}]");
        let screened = polling.screen_post("s1", &body, false).unwrap();
        assert_eq!(screened, "6\x1e42[\"fetch_favorites\",{}]");
        let notices = polling.take_notices("s1");
        assert_eq!(notices.len(), 1);
        assert!(notices[0].starts_with(r#"42["toast""#));
        assert!(polling.take_notices("s1").is_empty(), "taken once");
    }

    #[test]
    fn a_refused_binary_message_takes_its_base64_attachments_along() {
        let chat = chat(ChatLimits::default());
        let polling = PollingChats::default();
        polling.server_record(&chat, "s1", 0, r#"40{"sid":"x"}"#);
        let body =
            "451-[\"client_message\",{\"f\":{\"_placeholder\":true,\"num\":0}}]\x1ebAQID\x1ebBQY=";
        let screened = polling.screen_post("s1", body, true).unwrap();
        assert_eq!(screened, "6\x1e6\x1ebBQY=");
    }

    #[test]
    fn answers_in_a_get_are_tracked_per_session_and_expire() {
        let chat = chat(ChatLimits::default());
        let polling = PollingChats::default();
        polling.server_record(&chat, "s1", 0, r#"40{"sid":"x"}"#);
        polling.screen_post("s1", MESSAGE, false);
        polling.server_record(&chat, "s1", 0, r#"42["task_start",{}]"#);
        assert_eq!(chat.limits.in_progress(), 1);
        polling.server_record(&chat, "s2", 0, r#"42["task_start",{}]"#);
        assert_eq!(chat.limits.in_progress(), 2);
        polling.server_record(&chat, "s1", 0, r#"42["task_end",{}]"#);
        assert_eq!(chat.limits.in_progress(), 1);
        polling.expire(Instant::now() + SESSION_IDLE);
        assert_eq!(polling.len(), 0);
        assert_eq!(
            chat.limits.in_progress(),
            0,
            "an expired session gives its answers back"
        );
    }

    #[test]
    fn record_heads_survive_any_framing() {
        let body = format!(
            "42[\"task_start\",{{}}]\x1e42[\"stream_token\",{{\"token\":\"{}\"}}]\x1e2",
            "x".repeat(500)
        );
        let whole: Vec<String> = {
            let mut heads = RecordHeads::default();
            let mut out = Vec::new();
            heads.feed(body.as_bytes(), &mut |h| out.push(h.to_owned()));
            heads.finish(&mut |h| out.push(h.to_owned()));
            out
        };
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], "42[\"task_start\",{}]");
        assert!(whole[1].starts_with("42[\"stream_token\"") && whole[1].len() == HEAD_BYTES);
        assert_eq!(whole[2], "2");
        for split in 1..body.len() {
            let mut heads = RecordHeads::default();
            let mut out = Vec::new();
            heads.feed(&body.as_bytes()[..split], &mut |h| out.push(h.to_owned()));
            heads.feed(&body.as_bytes()[split..], &mut |h| out.push(h.to_owned()));
            heads.finish(&mut |h| out.push(h.to_owned()));
            assert_eq!(out, whole, "split at {split}");
        }
    }
}
