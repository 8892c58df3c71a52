//! Compressing a cached file, once. Blocking work: callers run it on
//! `tokio::task::spawn_blocking`, never on the async threads.

use std::hash::{Hash, Hasher};
use std::io::Write;

use bytes::Bytes;
use http::header::HeaderValue;

/// gzip level 6 (zlib's default): on Chainlit's 4.6 MB bundle 1.30 MB in ~0.19 s (miniz_oxide,
/// release build, this machine); level 9 saves 0.2% for 30% more time. gzip is made while
/// the first request waits, so speed matters more than the last percent.
const GZIP_LEVEL: u32 = 6;

/// Brotli at its best (quality 11, 4 MiB window): 1.04 MB for the bundle, 20% under gzip,
/// but ~9 s of one core. Made in the background, one file at a time, after the file is
/// already served with gzip; quality 9 would take 0.6 s for 1.14 MB.
///
/// Debug builds (the tests and the e2e suite) use 9: brotli's encoder is generic, so it is
/// compiled unoptimised into chatgate whatever its own opt-level, and quality 11 took ~35 s
/// of a core there for the bundle.
const BROTLI_QUALITY: i32 = if cfg!(debug_assertions) { 9 } else { 11 };
const BROTLI_WINDOW: i32 = 22;

/// Files below this are not compressed: the headers outweigh the gain.
const MIN_SIZE: usize = 256;

/// Whether a `Content-Type` is worth compressing: text, scripts, JSON, XML/SVG, WebAssembly
/// and uncompressed fonts. Images, woff/woff2 and archives are compressed already.
pub fn is_compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(Ok(value)) = content_type.map(HeaderValue::to_str) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence.starts_with("text/")
        || essence.ends_with("+xml")
        || essence.ends_with("+json")
        || matches!(
            essence.as_str(),
            "application/javascript"
                | "application/x-javascript"
                | "application/json"
                | "application/xml"
                | "application/wasm"
                | "application/manifest+json"
                | "image/svg+xml"
                | "image/x-icon"
                | "image/vnd.microsoft.icon"
                | "font/ttf"
                | "font/otf"
                | "application/vnd.ms-fontobject"
        )
}

/// A compressed copy, kept only when it saves at least 5%.
fn worth_it(original: &[u8], compressed: Vec<u8>) -> Option<Bytes> {
    (compressed.len() <= original.len() - original.len() / 20).then(|| Bytes::from(compressed))
}

pub fn gzip(data: &[u8]) -> Option<Bytes> {
    if data.len() < MIN_SIZE {
        return None;
    }
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 3),
        flate2::Compression::new(GZIP_LEVEL),
    );
    encoder.write_all(data).ok()?;
    worth_it(data, encoder.finish().ok()?)
}

pub fn brotli(data: &[u8]) -> Option<Bytes> {
    if data.len() < MIN_SIZE {
        return None;
    }
    let params = brotli::enc::BrotliEncoderParams {
        quality: BROTLI_QUALITY,
        lgwin: BROTLI_WINDOW,
        size_hint: data.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(data.len() / 4);
    brotli::BrotliCompress(&mut &data[..], &mut out, &params).ok()?;
    worth_it(data, out)
}

/// A 64-bit digest of a file's bytes, for its `ETag`. SipHash with fixed keys: the same
/// bytes give the same tag in every chatgate process of one build (a later build may pick
/// other tags: one re-download per client, no wrong answer).
pub fn digest(data: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    data.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn compressed_copies_decompress_to_the_original() {
        let text: Vec<u8> = (0..2_000u32)
            .flat_map(|i| format!("function f{i}() {{ return {i}; }}\n").into_bytes())
            .collect();
        let gz = gzip(&text).expect("text compresses");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, text);
        let br = brotli(&text).expect("text compresses");
        let mut back = Vec::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, text);
        assert!(br.len() < gz.len());
    }

    #[test]
    fn small_or_incompressible_files_stay_as_they_are() {
        assert!(gzip(b"tiny").is_none());
        let mut noise = vec![0u8; 64 * 1024];
        let mut x: u32 = 1;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        assert!(gzip(&noise).is_none());
        assert!(brotli(&noise).is_none());
    }

    #[test]
    fn compressible_types() {
        let yes = [
            "text/javascript; charset=utf-8",
            "text/css",
            "application/javascript",
            "application/json",
            "image/svg+xml",
            "application/ld+json",
            "font/ttf",
        ];
        for t in yes {
            assert!(is_compressible(Some(&HeaderValue::from_static(t))), "{t}");
        }
        let no = [
            "image/png",
            "font/woff2",
            "application/octet-stream",
            "application/gzip",
        ];
        for t in no {
            assert!(!is_compressible(Some(&HeaderValue::from_static(t))), "{t}");
        }
        assert!(!is_compressible(None));
    }

    #[test]
    fn digests_tell_contents_apart() {
        assert_eq!(digest(b"abc"), digest(b"abc"));
        assert_ne!(digest(b"abc"), digest(b"abd"));
    }
}
