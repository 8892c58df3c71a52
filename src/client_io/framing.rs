//! Request framing, checked on the raw bytes as they arrive: finds each request head in the
//! client's byte stream and flags one that carries both `Content-Length` and
//! `Transfer-Encoding` (RFC 9112 §6.1: "A server MAY reject a request that contains both
//! Content-Length and Transfer-Encoding"; nginx and Envoy do, as request smuggling needs it).
//!
//! Why by hand, next to hyper: hyper resolves that conflict itself (chunked wins) and
//! removes `Content-Length` from the parsed head in either header order
//! (`proto/h1/role.rs`, `Server::parse`: a `Content-Length` after `Transfer-Encoding` is
//! skipped, one before it is removed), so the service never sees it, and hyper has no hook
//! on the raw head. This check parses heads with the same parser (httparse, default
//! settings, the same header limits), so both agree on where a head ends; the quick look
//! for a plain head (`plain_head`) agrees with that parse wherever hyper accepts the head.
//! Both hold only while `server.rs` builds hyper's server with httparse's default
//! settings: a lenient option there (`ignore_invalid_headers`, say) would make this check
//! lose heads hyper serves, and stop counting them for the head clock (`HeadClock`).
//!
//! Finding the *next* head on a keep-alive connection needs the previous message's length.
//! A `Content-Length` body is counted off here; a chunked body is not followed at all:
//! the connection closes after any request with `Transfer-Encoding` (the pipeline adds
//! `Connection: close` to its response, `gateway::Answering`), so no head can follow one.
//! That keeps this a head parser and a byte counter rather than a second HTTP/1 decoder
//! that could drift from hyper's.

use std::mem::MaybeUninit;

/// Where the check is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// At a message boundary: the next bytes begin a request head.
    Head,
    /// Inside a `Content-Length` body: this many bytes before the next head.
    Body(u64),
    /// No longer following the stream (see [`Outcome`]).
    Stopped,
}

/// What a call to [`FramingCheck::inspect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report: the check goes on.
    Continue,
    /// A head with both `Content-Length` and `Transfer-Encoding`. The check stops.
    Conflict,
    /// A chunked request: the connection ends after it, so the check stops, content.
    Chunked,
    /// A head the check could not follow (malformed, too large, a bad `Content-Length`):
    /// hyper refuses such a head too. The check stops; it fails closed (see the caller).
    Lost,
}

/// The incremental head finder for one connection. Allocation-free on the common path:
/// a head that arrives within one read is parsed in place; only a head split across reads
/// is gathered (up to `max_head_bytes`).
#[derive(Debug)]
pub struct FramingCheck {
    position: Position,
    partial: Vec<u8>,
    max_head_bytes: usize,
    max_headers: usize,
    /// Complete heads seen, wrapping (the head clock compares it with the answers).
    heads: u32,
    /// Heads parsed, for the test that trickling a head costs linear time.
    #[cfg(test)]
    parses: std::cell::Cell<usize>,
}

/// Header slots on the stack; a configuration allowing more uses the heap.
const STACK_HEADERS: usize = 128;

impl FramingCheck {
    pub fn new(max_head_bytes: usize, max_headers: usize) -> Self {
        FramingCheck {
            position: Position::Head,
            partial: Vec::new(),
            max_head_bytes,
            max_headers,
            heads: 0,
            #[cfg(test)]
            parses: std::cell::Cell::new(0),
        }
    }

    /// How many complete request heads have passed, wrapping (frozen once stopped).
    pub fn heads(&self) -> u32 {
        self.heads
    }

    /// Inside a `Content-Length` body: some of it has yet to arrive.
    pub fn in_body(&self) -> bool {
        matches!(self.position, Position::Body(_))
    }

    pub fn is_stopped(&self) -> bool {
        self.position == Position::Stopped
    }

    /// Stops the check for good (the connection was upgraded: what follows is not HTTP).
    pub fn stop(&mut self) {
        self.position = Position::Stopped;
        self.partial = Vec::new();
    }

    /// Takes the next bytes the client sent, in order.
    pub fn inspect(&mut self, mut bytes: &[u8]) -> Outcome {
        while !bytes.is_empty() {
            match self.position {
                Position::Stopped => return Outcome::Continue,
                Position::Body(left) => {
                    let skip = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    bytes = &bytes[skip..];
                    let left = left - skip as u64;
                    self.position = if left == 0 {
                        Position::Head
                    } else {
                        Position::Body(left)
                    };
                }
                Position::Head => {
                    let (used, outcome) = self.head(bytes);
                    if outcome != Outcome::Continue {
                        self.stop();
                        return outcome;
                    }
                    bytes = &bytes[used..];
                }
            }
        }
        Outcome::Continue
    }

    /// Parses the head that starts with what was gathered so far plus `bytes`; returns how
    /// many of `bytes` it used (all of them while the head is incomplete).
    fn head(&mut self, bytes: &[u8]) -> (usize, Outcome) {
        if self.partial.is_empty() {
            return match self.parse(bytes) {
                Parsed::Complete(len, framing) => (len, self.after_head(framing)),
                Parsed::Partial => self.gather(bytes),
                Parsed::Invalid => (bytes.len(), Outcome::Lost),
            };
        }
        let before = self.partial.len();
        // At most one byte past the limit: enough to tell "too large" from "complete".
        let room = (self.max_head_bytes + 1).saturating_sub(before);
        let take = room.min(bytes.len());
        self.partial.extend_from_slice(&bytes[..take]);
        // Parse again only once the head can have ended: a head trickled in byte by byte
        // must cost linear time, not a parse of everything so far per byte. hyper tests the
        // same way (the new bytes and the 3 before them, for `\n\n` or `\n\r\n`), so both
        // still agree on where the head ends.
        if !may_end_head(&self.partial[before.saturating_sub(3)..]) {
            if self.partial.len() > self.max_head_bytes {
                return (take, Outcome::Lost);
            }
            return (take, Outcome::Continue);
        }
        let partial = std::mem::take(&mut self.partial);
        let result = match self.parse(&partial) {
            Parsed::Complete(len, framing) => (len - before, self.after_head(framing)),
            Parsed::Partial if partial.len() > self.max_head_bytes => (take, Outcome::Lost),
            Parsed::Partial => {
                self.partial = partial;
                return (take, Outcome::Continue);
            }
            Parsed::Invalid => (take, Outcome::Lost),
        };
        // Keep the allocation for the next split head.
        self.partial = partial;
        self.partial.clear();
        result
    }

    fn gather(&mut self, bytes: &[u8]) -> (usize, Outcome) {
        if bytes.len() > self.max_head_bytes {
            return (bytes.len(), Outcome::Lost);
        }
        self.partial.extend_from_slice(bytes);
        (bytes.len(), Outcome::Continue)
    }

    fn after_head(&mut self, framing: Framing) -> Outcome {
        self.heads = self.heads.wrapping_add(1);
        match framing {
            Framing::Conflict => Outcome::Conflict,
            Framing::Chunked => Outcome::Chunked,
            Framing::BadLength => Outcome::Lost,
            Framing::Length(0) => {
                self.position = Position::Head;
                Outcome::Continue
            }
            Framing::Length(n) => {
                self.position = Position::Body(n);
                Outcome::Continue
            }
        }
    }

    fn parse(&self, buf: &[u8]) -> Parsed {
        #[cfg(test)]
        self.parses.set(self.parses.get() + 1);
        if let Some(len) = plain_head(buf, self.max_head_bytes, self.max_headers) {
            return Parsed::Complete(len, Framing::Length(0));
        }
        if self.max_headers <= STACK_HEADERS {
            let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
            parse_head(buf, &mut slots[..self.max_headers], self.max_head_bytes)
        } else {
            let mut slots = Vec::with_capacity(self.max_headers);
            slots.resize_with(self.max_headers, MaybeUninit::uninit);
            parse_head(buf, &mut slots, self.max_head_bytes)
        }
    }
}

/// Whether `bytes` hold the end of a request head (an empty line: `\n\n` or `\n\r\n`).
fn may_end_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// The length of a complete head that no line of names `Content-Length` or
/// `Transfer-Encoding`: what nearly every request (a GET) is, found without parsing it.
/// `None` sends the head to the full parse, which this never contradicts where hyper
/// accepts the head (the property test below holds it to that):
/// - for a head httparse accepts, its end is the first empty line (`\n\n` or `\n\r\n`),
///   and a head with neither field is `Length(0)`;
/// - a head httparse refuses (a field name with a space, a folded line) is refused by hyper
///   as well, with the connection closed, so nothing follows it to be checked.
///
/// Anything unusual goes the long way: leading empty lines (httparse skips them), a bare CR
/// at a line's start, more lines than `max_headers`, a head over `max_head_bytes`, and any
/// line that merely begins with either name. Saves the second parse of every head
/// (~600 instructions per request, bench/NOTES.md, issue 12).
fn plain_head(buf: &[u8], max_head_bytes: usize, max_headers: usize) -> Option<usize> {
    if !buf.first().is_some_and(u8::is_ascii_alphabetic) {
        return None;
    }
    for (lines, newline) in memchr::memchr_iter(b'\n', buf).enumerate() {
        let line = &buf[newline + 1..];
        let end = match line {
            [b'\n', ..] => Some(newline + 2),
            [b'\r', b'\n', ..] => Some(newline + 3),
            [] | [b'\r', ..] => return None,
            _ => None,
        };
        if let Some(end) = end {
            return (end <= max_head_bytes).then_some(end);
        }
        if lines >= max_headers || names_framing(line) {
            return None;
        }
    }
    None
}

/// Whether a line begins with either framing field's name, in any case.
fn names_framing(line: &[u8]) -> bool {
    let starts = |name: &[u8]| {
        line.get(..name.len())
            .is_some_and(|l| l.eq_ignore_ascii_case(name))
    };
    starts(b"content-length") || starts(b"transfer-encoding")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    Conflict,
    BadLength,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    Complete(usize, Framing),
    Partial,
    Invalid,
}

fn parse_head<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    max_head_bytes: usize,
) -> Parsed {
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) if len <= max_head_bytes => len,
        Ok(httparse::Status::Complete(_)) | Err(_) => return Parsed::Invalid,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
    };
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if header.name.eq_ignore_ascii_case("content-length") {
            match (digits(header.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => bad_length = true,
            }
        }
    }
    let framing = match (chunked, length.is_some() || bad_length) {
        // Any Content-Length line counts, valid or not: hyper does not even read one that
        // follows Transfer-Encoding.
        (true, true) => Framing::Conflict,
        // A Transfer-Encoding that is not chunked is refused by hyper (400); either way
        // the connection ends after this request.
        (true, false) => Framing::Chunked,
        (false, _) if bad_length => Framing::BadLength,
        (false, _) => Framing::Length(length.unwrap_or(0)),
    };
    Parsed::Complete(len, framing)
}

/// A `Content-Length` value as hyper reads it: ASCII digits only, no sign, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check() -> FramingCheck {
        FramingCheck::new(1024, 16)
    }

    /// Feeds `stream` split at every position, and all at once; every split must agree.
    fn outcome_of(stream: &[u8]) -> Outcome {
        let whole = check().inspect(stream);
        for split in 1..stream.len() {
            let mut c = check();
            let first = c.inspect(&stream[..split]);
            let outcome = if first == Outcome::Continue {
                c.inspect(&stream[split..])
            } else {
                first
            };
            assert_eq!(outcome, whole, "split at {split}");
        }
        for step in [1, 3, 7] {
            let mut c = check();
            let mut outcome = Outcome::Continue;
            for piece in stream.chunks(step) {
                outcome = c.inspect(piece);
                if outcome != Outcome::Continue {
                    break;
                }
            }
            assert_eq!(outcome, whole, "in pieces of {step}");
        }
        whole
    }

    #[test]
    fn a_head_trickled_byte_by_byte_is_parsed_a_bounded_number_of_times() {
        // 60 KiB of headers, one byte per read: parsing all that was gathered on every read
        // would be quadratic (seconds of CPU per connection, before any authentication).
        let mut head = String::from("POST / HTTP/1.1\r\nHost: x\r\n");
        while head.len() < 60 * 1024 {
            head.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        head.push_str("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        let mut c = FramingCheck::new(64 * 1024, 2000);
        let mut outcome = Outcome::Continue;
        for byte in head.as_bytes() {
            outcome = c.inspect(std::slice::from_ref(byte));
            if outcome != Outcome::Continue {
                break;
            }
        }
        assert_eq!(outcome, Outcome::Conflict);
        assert!(
            c.parses.get() <= 3,
            "{} parses for one head",
            c.parses.get()
        );
    }

    #[test]
    fn both_lengths_are_a_conflict_in_either_order() {
        for head in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: junk\r\n\r\n",
        ] {
            assert_eq!(outcome_of(head.as_bytes()), Outcome::Conflict, "{head}");
        }
    }

    #[test]
    fn a_conflict_behind_keep_alive_requests_is_found() {
        let body = "Transfer-Encoding: chunked\r\n\r\n";
        let stream = format!(
            "\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}\
             POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            body.len()
        );
        assert_eq!(outcome_of(stream.as_bytes()), Outcome::Conflict);
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_skipped() {
        // The body of /b is a whole conflicting head; it is body, not a request.
        let body = "POST /c HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let stream = format!(
            "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}\
             GET /d HTTP/1.1\r\nHost: x\r\n\r\n",
            body.len()
        );
        assert_eq!(outcome_of(stream.as_bytes()), Outcome::Continue);
        let mut c = check();
        assert_eq!(c.inspect(stream.as_bytes()), Outcome::Continue);
        assert!(!c.is_stopped(), "still at a boundary after /d");
    }

    #[test]
    fn a_chunked_request_stops_the_check_without_a_conflict() {
        let stream = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(outcome_of(stream), Outcome::Chunked);
    }

    #[test]
    fn what_hyper_refuses_stops_the_check() {
        for stream in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"\x16\x03\x01 not http\r\n\r\n",
        ] {
            assert_eq!(outcome_of(stream), Outcome::Lost, "{stream:?}");
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(2000, b'a');
        assert_eq!(outcome_of(&huge), Outcome::Lost);
        let many: String = (0..20).map(|i| format!("X-{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(outcome_of(many.as_bytes()), Outcome::Lost);
    }

    #[test]
    fn equal_duplicate_lengths_are_followed() {
        let stream = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi\
            POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(outcome_of(stream), Outcome::Conflict);
    }

    #[test]
    fn a_stopped_check_ignores_what_follows() {
        let mut c = check();
        c.stop();
        assert_eq!(
            c.inspect(
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            Outcome::Continue
        );
    }

    #[test]
    fn many_headers_use_the_heap_and_still_parse() {
        let mut c = FramingCheck::new(1 << 16, 500);
        let many: String = (0..300).map(|i| format!("X-{i}: y\r\n")).collect();
        let head = format!(
            "POST / HTTP/1.1\r\n{many}Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert_eq!(c.inspect(head.as_bytes()), Outcome::Conflict);
    }

    #[test]
    fn a_plain_get_skips_the_full_parse() {
        let get = b"GET /page HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nCookie: a=b\r\nConnection: keep-alive\r\n\r\nGET";
        assert_eq!(plain_head(get, 1024, 16), Some(get.len() - 3));
        let lf = b"GET / HTTP/1.1\nHost: x\n\n";
        assert_eq!(plain_head(lf, 1024, 16), Some(lf.len()));
        for long_way in [
            &b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(plain_head(long_way, 1024, 16), None, "{long_way:?}");
        }
        // The limits are the full parse's to apply.
        assert_eq!(
            plain_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 1024, 1),
            None
        );
        assert_eq!(
            plain_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 20, 16),
            None
        );
    }

    /// Heads from pieces that matter to framing: either field in any case (also as a
    /// prefix of another name), ordinary fields, folded lines, bad names, bare CRs, either
    /// line ending, leading empty lines, and cut short anywhere.
    fn head_piece() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "Host: x",
            "Content-Length: 5",
            "content-length: 0",
            "CONTENT-LENGTH: junk",
            "Content-Lengthy: 1",
            "Transfer-Encoding: chunked",
            "transfer-encoding: gzip",
            "Cookie: a=b",
            "Connection: keep-alive",
            "Content-Type: text/plain",
            "Te: trailers",
            " folded: line",
            "\tContent-Length: 3",
            "Content-Length : 3",
            "Bad Name: x",
            "X-Cr: a\rb",
            "",
            "\r",
        ])
        .prop_map(str::to_owned)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Where the quick look answers, the full parse agrees, or refuses the head (and
        /// hyper, with the same parser and settings, refuses it too).
        #[test]
        fn the_quick_look_never_contradicts_the_full_parse(
            leading in 0usize..3,
            line in prop_oneof![
                Just("GET /a HTTP/1.1"),
                Just("POST /b?c=d HTTP/1.1"),
                Just("get / HTTP/1.0"),
                Just("Content-Length: 1"),
            ],
            fields in prop::collection::vec(head_piece(), 0..8),
            crlf in any::<bool>(),
            cut in any::<prop::sample::Index>(),
            max_headers in 1usize..10,
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut head = eol.repeat(leading);
            head.push_str(line);
            for field in &fields {
                head.push_str(eol);
                head.push_str(field);
            }
            head.push_str(eol);
            head.push_str(eol);
            head.push_str("GET /next HTTP/1.1");
            for bytes in [head.as_bytes(), &head.as_bytes()[..cut.index(head.len())]] {
                if let Some(len) = plain_head(bytes, 256, max_headers) {
                    let mut slots = vec![MaybeUninit::uninit(); max_headers];
                    let full = parse_head(bytes, &mut slots, 256);
                    prop_assert!(
                        full == Parsed::Complete(len, Framing::Length(0)) || full == Parsed::Invalid,
                        "{:?}: quick {} full {:?}", String::from_utf8_lossy(bytes), len, full
                    );
                }
            }
        }
    }

    #[test]
    fn lengths_parse_like_hyper() {
        assert_eq!(digits(b"0"), Some(0));
        assert_eq!(digits(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"-1",
            b"1,1",
            b" 1",
            b"0x1",
        ] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
    }
}
