//! Reading Engine.IO v4 packets and the Socket.IO v5 packets inside them, just far enough to
//! name an event, without copying or changing a byte.
//!
//! Engine.IO v4 (<https://github.com/socketio/engine.io-protocol>): a WebSocket text frame is
//! one packet, `<type><data>`; a polling body joins several with the record separator
//! `\x1e`, a binary one base64-encoded behind `b`. Type 4 (message) carries a Socket.IO v5
//! packet (<https://github.com/socketio/socket.io-protocol>):
//! `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`, where an EVENT's JSON is an
//! array whose first element is the event name.
//!
//! Anything that does not read as expected is [`Packet::Other`]: the reader only observes,
//! so a packet it does not understand still passes through untouched.

/// What a packet is, as far as chatgate cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A Socket.IO EVENT (or BINARY_EVENT, whose attachments follow as binary frames).
    Event {
        name: &'a str,
        /// The ack id the sender asks to be answered with, if any.
        ack: Option<u64>,
        /// Binary attachments that follow this packet (BINARY_EVENT).
        attachments: u32,
    },
    /// Any other Socket.IO packet: CONNECT, DISCONNECT, ACK, CONNECT_ERROR, BINARY_ACK.
    SocketIo,
    /// An Engine.IO control packet: open, close, ping, pong, upgrade, noop.
    Control,
    /// Not understood (or an event name with escapes): passed on, never counted.
    Other,
}

/// Longest event name read; Chainlit's are short, and a bound keeps the scan cheap.
const MAX_EVENT_NAME: usize = 64;
/// Longest namespace read past (Chainlit uses none); a longer one is not understood, so the
/// scan never walks a whole message.
const MAX_NAMESPACE: usize = 128;

/// Reads one Engine.IO packet (a WebSocket text frame, or one record of a polling body).
pub fn read(packet: &str) -> Packet<'_> {
    let bytes = packet.as_bytes();
    match bytes.first() {
        Some(b'4') => read_socketio(&packet[1..]),
        Some(b'0' | b'1' | b'2' | b'3' | b'5' | b'6') => Packet::Control,
        _ => Packet::Other,
    }
}

/// The records of a polling body (Engine.IO v4 joins packets with `\x1e`). Binary records
/// (`b` + base64) come out as they are; [`read`] calls them [`Packet::Other`].
pub fn records(body: &str) -> impl Iterator<Item = &str> {
    body.split('\x1e')
}

fn read_socketio(packet: &str) -> Packet<'_> {
    let bytes = packet.as_bytes();
    let binary = match bytes.first() {
        Some(b'2') => false,
        Some(b'5') => true,
        Some(b'0' | b'1' | b'3' | b'4' | b'6') => return Packet::SocketIo,
        _ => return Packet::Other,
    };
    let mut i = 1;
    let mut attachments = 0u32;
    if binary {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || bytes.get(i) != Some(&b'-') {
            return Packet::Other;
        }
        match packet[start..i].parse() {
            Ok(n) => attachments = n,
            Err(_) => return Packet::Other,
        }
        i += 1;
    }
    if bytes.get(i) == Some(&b'/') {
        // A namespace: up to the comma. Chainlit uses the default one, but others are read
        // past all the same.
        match packet.as_bytes()[i..]
            .iter()
            .take(MAX_NAMESPACE)
            .position(|&b| b == b',')
        {
            Some(comma) => i += comma + 1,
            None => return Packet::Other,
        }
    }
    let ack_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let ack = if i > ack_start {
        match packet[ack_start..i].parse() {
            Ok(id) => Some(id),
            Err(_) => return Packet::Other,
        }
    } else {
        None
    };
    match event_name(&packet[i..]) {
        Some(name) => Packet::Event {
            name,
            ack,
            attachments,
        },
        None => Packet::Other,
    }
}

/// The first element of a JSON array when it is a plain string (no escapes).
fn event_name(json: &str) -> Option<&str> {
    let rest = json.strip_prefix('[')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest
        .as_bytes()
        .iter()
        .take(MAX_EVENT_NAME + 1)
        .position(|&b| b == b'"' || b == b'\\')?;
    if rest.as_bytes()[end] == b'\\' {
        return None;
    }
    let after = rest[end + 1..].trim_start();
    if !(after.starts_with(',') || after.starts_with(']')) {
        return None;
    }
    Some(&rest[..end])
}

/// A Socket.IO EVENT packet inside an Engine.IO message, for chatgate's own notices
/// (`42["toast",{...}]`, default namespace). `payload` is serialised as JSON.
pub fn event_packet(name: &str, payload: &serde_json::Value) -> String {
    let array = serde_json::Value::Array(vec![serde_json::Value::from(name), payload.clone()]);
    format!("42{array}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str) -> Packet<'_> {
        Packet::Event {
            name,
            ack: None,
            attachments: 0,
        }
    }

    #[test]
    fn packet_table() {
        let table: &[(&str, Packet<'_>)] = &[
            (
                r#"42["client_message",{"message":{"id":"x"}}]"#,
                event("client_message"),
            ),
            (r#"42["task_start",{}]"#, event("task_start")),
            (r#"42["stop"]"#, event("stop")),
            (r#"42[ "spaced" , 1]"#, event("spaced")),
            (
                r#"4213["fetch_favorites",{}]"#,
                Packet::Event {
                    name: "fetch_favorites",
                    ack: Some(13),
                    attachments: 0,
                },
            ),
            (r#"42/admin,["ns_event",1]"#, event("ns_event")),
            (
                r#"42/admin,7["ns_ack",1]"#,
                Packet::Event {
                    name: "ns_ack",
                    ack: Some(7),
                    attachments: 0,
                },
            ),
            (
                r#"451-["upload",{"_placeholder":true,"num":0}]"#,
                Packet::Event {
                    name: "upload",
                    ack: None,
                    attachments: 1,
                },
            ),
            (r#"40{"sessionId":"abc"}"#, Packet::SocketIo),
            (r#"41"#, Packet::SocketIo),
            (r#"4313[{"ok":true}]"#, Packet::SocketIo),
            (r#"0{"sid":"abc","upgrades":[]}"#, Packet::Control),
            ("2", Packet::Control),
            ("3probe", Packet::Control),
            ("5", Packet::Control),
            ("6", Packet::Control),
            // Not understood: passed on, never counted.
            ("", Packet::Other),
            ("x", Packet::Other),
            ("4", Packet::Other),
            ("42", Packet::Other),
            ("42{}", Packet::Other),
            ("42[1,2]", Packet::Other),
            (r#"42["unterminated"#, Packet::Other),
            (r#"42["esc\"aped",1]"#, Packet::Other),
            (r#"42["name"x]"#, Packet::Other),
            ("45-[\"x\"]", Packet::Other),
            ("451[\"x\"]", Packet::Other),
            ("42/admin[\"x\"]", Packet::Other),
            ("4299999999999999999999[\"x\"]", Packet::Other),
            ("bAQID", Packet::Other),
        ];
        for (input, expected) in table {
            assert_eq!(read(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn event_names_are_bounded() {
        let long = format!("42[\"{}\",1]", "a".repeat(MAX_EVENT_NAME + 1));
        assert_eq!(read(&long), Packet::Other);
        let fits = format!("42[\"{}\",1]", "a".repeat(MAX_EVENT_NAME));
        assert!(matches!(read(&fits), Packet::Event { .. }));
        let long_namespace = format!("42/{},[\"x\",1]", "n".repeat(MAX_NAMESPACE));
        assert_eq!(read(&long_namespace), Packet::Other);
    }

    #[test]
    fn polling_bodies_split_on_the_record_separator() {
        let body = "42[\"client_message\",{}]\x1e2\x1ebAQID\x1e42[\"stop\"]";
        let packets: Vec<Packet<'_>> = records(body).map(read).collect();
        assert_eq!(
            packets,
            [
                event("client_message"),
                Packet::Control,
                Packet::Other,
                event("stop")
            ]
        );
    }

    #[test]
    fn our_own_event_packets_read_back() {
        let toast = event_packet(
            "toast",
            &serde_json::json!({"message": "Slow down \"please\"", "type": "warning"}),
        );
        assert_eq!(read(&toast), event("toast"));
        let value: serde_json::Value = serde_json::from_str(&toast[2..]).unwrap();
        assert_eq!(value[1]["message"], "Slow down \"please\"");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn cases() -> ProptestConfig {
        ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(cases())]

        /// Whatever arrives, the reader answers without panicking, and a name it reports is
        /// a slice of the input that the packet really starts its array with.
        #[test]
        fn the_reader_is_total_and_names_only_what_is_there(input in ".{0,200}") {
            if let Packet::Event { name, .. } = read(&input) {
                prop_assert!(input.starts_with("42") || input.starts_with("45"));
                let quoted = format!("\"{name}\"");
                prop_assert!(input.contains(&quoted));
                prop_assert!(!name.contains('"') && !name.contains('\\'));
            }
        }

        /// Every event packet a Socket.IO encoder writes is read back with its name, ack id
        /// and attachment count.
        #[test]
        fn encoded_events_read_back(
            name in "[a-z_]{1,32}",
            namespace in prop::option::of("/[a-z]{1,8}"),
            ack in prop::option::of(0u64..1_000_000),
            attachments in prop::option::of(1u32..5),
            payload in prop::collection::vec(any::<i32>(), 0..4),
        ) {
            let mut packet = String::from("4");
            match attachments {
                Some(n) => packet.push_str(&format!("5{n}-")),
                None => packet.push('2'),
            }
            if let Some(ns) = &namespace {
                packet.push_str(ns);
                packet.push(',');
            }
            if let Some(id) = ack {
                packet.push_str(&id.to_string());
            }
            let mut array = vec![serde_json::Value::from(name.as_str())];
            array.extend(payload.into_iter().map(serde_json::Value::from));
            packet.push_str(&serde_json::Value::Array(array).to_string());
            prop_assert_eq!(
                read(&packet),
                Packet::Event { name: &name, ack, attachments: attachments.unwrap_or(0) }
            );
        }

        /// Splitting a polling body gives back exactly the packets that were joined.
        #[test]
        fn polling_records_round_trip(packets in prop::collection::vec("[^\x1e]{0,40}", 1..6)) {
            let body = packets.join("\x1e");
            let split: Vec<&str> = records(&body).collect();
            prop_assert_eq!(split, packets.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
