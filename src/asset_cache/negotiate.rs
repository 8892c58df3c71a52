//! Content-coding negotiation (RFC 9110 §12.5.3): which stored variant a request's
//! `Accept-Encoding` asks for.

use http::header::HeaderValue;

/// A stored variant's content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Brotli,
    Gzip,
    Identity,
}

impl Coding {
    /// The `Content-Encoding` value; `None` for identity.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Coding::Brotli => Some("br"),
            Coding::Gzip => Some("gzip"),
            Coding::Identity => None,
        }
    }
}

/// The q-values (in thousandths) a request gave each coding chatgate can serve, and `*`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Weights {
    br: Option<u16>,
    gzip: Option<u16>,
    identity: Option<u16>,
    any: Option<u16>,
}

/// Picks the variant for a request's `Accept-Encoding` lines, among identity and the
/// compressed variants that exist:
/// - no header at all: identity. RFC 9110 lets a server pick any coding then, but a client
///   that sends none (curl, a health checker) most likely cannot decode one.
/// - the highest q wins; on a tie brotli before gzip before identity (smaller first).
/// - a coding not listed takes the q of `*`. Identity not listed (nor `*`) ranks below
///   every listed coding: a client that lists `gzip;q=0.1` still asks for compression.
/// - nothing acceptable (`identity;q=0` with neither br nor gzip on offer): identity anyway.
///   RFC 9110 allows either that or 406, and a plain answer is what a browser can still use
///   (nginx and Apache do the same).
///
/// Elements that don't parse (a bad q-value) are ignored, never guessed at.
pub fn choose<'a>(
    accept_encoding: impl IntoIterator<Item = &'a HeaderValue>,
    has_br: bool,
    has_gzip: bool,
) -> Coding {
    let mut lines = accept_encoding.into_iter().peekable();
    if lines.peek().is_none() {
        return Coding::Identity;
    }
    let mut w = Weights::default();
    for line in lines {
        let Ok(line) = line.to_str() else { continue };
        for element in line.split(',') {
            let Some((coding, q)) = parse_element(element) else {
                continue;
            };
            let slot = match coding {
                c if c.eq_ignore_ascii_case("br") => &mut w.br,
                c if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
                    &mut w.gzip
                }
                c if c.eq_ignore_ascii_case("identity") => &mut w.identity,
                "*" => &mut w.any,
                _ => continue,
            };
            // Listed twice: the higher weight stands.
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
    }
    let br = if has_br {
        w.br.or(w.any).unwrap_or(0)
    } else {
        0
    };
    let gzip = if has_gzip {
        w.gzip.or(w.any).unwrap_or(0)
    } else {
        0
    };
    let identity = w.identity.or(w.any).unwrap_or(0);
    let best = br.max(gzip).max(identity);
    if best == 0 {
        Coding::Identity
    } else if br == best {
        Coding::Brotli
    } else if gzip == best {
        Coding::Gzip
    } else {
        Coding::Identity
    }
}

/// `gzip;q=0.8` → ("gzip", 800). `None` for an empty element or a malformed q-value.
fn parse_element(element: &str) -> Option<(&str, u16)> {
    let mut parts = element.split(';');
    let coding = parts.next()?.trim();
    if coding.is_empty() {
        return None;
    }
    let mut q = 1000;
    for param in parts {
        let (name, value) = param.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("q") {
            q = parse_qvalue(value.trim())?;
        }
    }
    Some((coding, q))
}

/// RFC 9110 §12.4.2: `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`.
fn parse_qvalue(value: &str) -> Option<u16> {
    let (int, frac) = value.split_once('.').unwrap_or((value, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for (i, digit) in frac.bytes().enumerate() {
        thousandths += u16::from(digit - b'0') * [100, 10, 1][i];
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(lines: &[&str], has_br: bool, has_gzip: bool) -> Coding {
        let values: Vec<HeaderValue> = lines
            .iter()
            .map(|l| HeaderValue::from_str(l).unwrap())
            .collect();
        choose(&values, has_br, has_gzip)
    }

    #[test]
    fn negotiation_table() {
        use Coding::{Brotli as B, Gzip as G, Identity as I};
        let cases: &[(&[&str], Coding)] = &[
            (&[], I),
            (&[""], I),
            (&["gzip, deflate, br, zstd"], B), // Chromium
            (&["gzip, deflate, br"], B),
            (&["br"], B),
            (&["gzip"], G),
            (&["x-gzip"], G),
            (&["GZIP"], G),
            (&["deflate"], I),
            (&["zstd"], I),
            (&["identity"], I),
            (&["*"], B),
            (&["gzip;q=1.0, br;q=0.5"], G),
            (&["gzip;q=0.5, br;q=0.5"], B),
            (&["br;q=0, gzip"], G),
            (&["br;q=0, gzip;q=0"], I),
            (&["gzip;q=0.2, identity;q=0.5"], I),
            (&["gzip;q=0.5, identity;q=0.5"], G),
            (&["*;q=0"], I), // nothing acceptable: identity anyway
            (&["identity;q=0"], I),
            (&["identity;q=0, gzip;q=0.1"], G),
            (&["*;q=0, identity"], I),
            (&["*;q=0.1, gzip;q=0"], B),
            (&["gzip; q=0.8", "br ;q=0.9"], B),
            (&["br;q=2, gzip"], G),      // bad q: the br element is ignored
            (&["br;q=0.1234, gzip"], G), // too many digits
            (&["br;q=, gzip;q=0.1"], G),
            (&["br;q, gzip;q=0.9, identity;q=0.5"], G),
            (&[",,, gzip ,"], G),
            (&["br;level=5"], B),
            (&["br;q=0.5, br;q=1, gzip;q=0.9"], B),
        ];
        for (lines, expected) in cases {
            assert_eq!(pick(lines, true, true), *expected, "{lines:?}");
        }
    }

    #[test]
    fn only_variants_that_exist_are_chosen() {
        assert_eq!(pick(&["gzip, br"], false, true), Coding::Gzip);
        assert_eq!(pick(&["br"], false, true), Coding::Identity);
        assert_eq!(pick(&["gzip, br"], false, false), Coding::Identity);
        assert_eq!(pick(&["*"], false, true), Coding::Gzip);
        assert_eq!(pick(&["identity;q=0, br"], false, false), Coding::Identity);
    }

    #[test]
    fn qvalues_parse_per_rfc() {
        assert_eq!(parse_qvalue("0"), Some(0));
        assert_eq!(parse_qvalue("0.5"), Some(500));
        assert_eq!(parse_qvalue("0.05"), Some(50));
        assert_eq!(parse_qvalue("0.001"), Some(1));
        assert_eq!(parse_qvalue("1"), Some(1000));
        assert_eq!(parse_qvalue("1.000"), Some(1000));
        assert_eq!(parse_qvalue("1."), Some(1000));
        assert_eq!(parse_qvalue("1.5"), None);
        assert_eq!(parse_qvalue("2"), None);
        assert_eq!(parse_qvalue("-1"), None);
        assert_eq!(parse_qvalue("0.x"), None);
        assert_eq!(parse_qvalue(""), None);
    }
}
