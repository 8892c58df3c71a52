//! Numbers, addresses and times written as ASCII on the hot path (the access line, the
//! forwarded headers) without `core::fmt`, whose argument plumbing and padding pass cost
//! more than the digits (bench/NOTES.md, issue 12). Integers of any size go through `itoa`.

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `addr` dotted-quad into `out`; returns the length. Digit by digit: copying
/// each octet's text in would be a `memcpy` call per octet.
pub fn ipv4(addr: Ipv4Addr, out: &mut [u8; 15]) -> usize {
    let mut len = 0;
    for (i, octet) in addr.octets().into_iter().enumerate() {
        if i > 0 {
            out[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            out[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            out[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        out[len] = b'0' + octet % 10;
        len += 1;
    }
    len
}

/// Appends an integer.
pub fn push_int(line: &mut Vec<u8>, n: impl itoa::Integer) {
    line.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `n` as exactly `width` digits, zero-padded (`n` below `10^width`).
pub fn push_padded(line: &mut Vec<u8>, mut n: u32, width: usize) {
    let mut digits = [b'0'; 10];
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    line.extend_from_slice(&digits[..width]);
}

/// RFC 3339 UTC timestamps with microseconds, as `humantime` writes them, with the part up
/// to the seconds formatted once per second rather than once per line.
#[derive(Default)]
pub struct Rfc3339Clock {
    second: u64,
    /// `2026-12-01T14:50:07` for `second`.
    prefix: String,
}

impl Rfc3339Clock {
    /// Appends the time `now` (`2026-12-01T14:50:07.123456Z`).
    pub fn push(&mut self, line: &mut Vec<u8>, now: SystemTime) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if self.prefix.is_empty() || second != self.second {
            let whole = UNIX_EPOCH + std::time::Duration::from_secs(second);
            self.prefix = humantime::format_rfc3339_seconds(whole).to_string();
            // Drop the `Z`: the fraction goes before it.
            self.prefix.pop();
            self.second = second;
        }
        line.extend_from_slice(self.prefix.as_bytes());
        // `.123456Z` in one copy.
        let mut fraction = *b".000000Z";
        let mut micros = since.subsec_micros();
        for slot in fraction[1..7].iter_mut().rev() {
            *slot = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        line.extend_from_slice(&fraction);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_matches_display() {
        for addr in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.22.1.0",
            "100.9.99.109",
        ] {
            let addr: Ipv4Addr = addr.parse().unwrap();
            let mut out = [0u8; 15];
            let len = ipv4(addr, &mut out);
            assert_eq!(std::str::from_utf8(&out[..len]).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn padded_numbers_keep_their_width() {
        let mut line = Vec::new();
        push_padded(&mut line, 7, 3);
        push_padded(&mut line, 123_456, 6);
        push_padded(&mut line, 0, 6);
        assert_eq!(line, b"007123456000000");
    }

    #[test]
    fn timestamps_match_humantime_across_a_second_boundary() {
        let mut clock = Rfc3339Clock::default();
        let base = UNIX_EPOCH + std::time::Duration::from_micros(1_796_000_000_999_998);
        for step in 0..5 {
            let t = base + std::time::Duration::from_micros(step);
            let mut line = Vec::new();
            clock.push(&mut line, t);
            assert_eq!(
                String::from_utf8(line).unwrap(),
                humantime::format_rfc3339_micros(t).to_string()
            );
        }
    }
}
