//! Settings of the asset cache (`src/asset_cache/`).

use std::time::Duration;

use clap::Args;

use super::values::{ConfigError, Line, Problems, duration_line, invalid, positive_seconds};

#[derive(Debug, Clone, Args)]
pub struct AssetCacheSettings {
    /// Memory for the asset cache in bytes (content-hashed static files, compressed once);
    /// 0 turns it off.
    #[arg(
        long,
        env = "CHATGATE_ASSET_CACHE_BYTES",
        default_value = "67108864",
        global = true
    )]
    pub asset_cache_bytes: String,
    /// Largest file the asset cache keeps, in bytes; larger ones stream through.
    #[arg(
        long,
        env = "CHATGATE_ASSET_CACHE_MAX_FILE",
        default_value = "16777216",
        global = true
    )]
    pub asset_cache_max_file: String,
    /// Comma-separated path prefixes whose content-hashed files the asset cache serves.
    #[arg(
        long,
        env = "CHATGATE_ASSET_CACHE_PATHS",
        default_value = "/assets/",
        global = true
    )]
    pub asset_cache_paths: String,
    /// Seconds after which a cached file is checked against the backend again.
    #[arg(
        long,
        env = "CHATGATE_ASSET_CACHE_REVALIDATE",
        default_value = "60",
        global = true
    )]
    pub asset_cache_revalidate: String,
}

/// The asset cache's settings (`--asset-cache-*`); off when `max_bytes` is 0 or no prefix.
#[derive(Debug, Clone)]
pub struct AssetCacheConfig {
    /// Memory bound of all cached files and their compressed variants.
    pub max_bytes: usize,
    /// Largest file kept (its uncompressed size); larger ones stream through.
    pub max_file: usize,
    /// Path prefixes, each starting and ending with `/`.
    pub paths: Vec<String>,
    /// Age after which an entry is checked against the backend on its next request.
    pub revalidate: Duration,
}

fn bytes(flag: &str, value: &str, max: u64) -> Result<usize, ConfigError> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| invalid(flag, value, "expected a number of bytes"))?;
    if n > max {
        return Err(invalid(flag, value, format!("must be at most {max}")));
    }
    usize::try_from(n).map_err(|_| invalid(flag, value, "too large for this machine"))
}

fn paths(value: &str) -> Result<Vec<String>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let plain = p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
            if p.starts_with('/') && p.ends_with('/') && plain && !p.contains("//") {
                Ok(p.to_owned())
            } else {
                Err(invalid(
                    "asset-cache-paths",
                    value,
                    format!("{p:?} must start and end with / and hold only letters, digits, -_./"),
                ))
            }
        })
        .collect()
}

fn max_file(value: &str) -> Result<usize, ConfigError> {
    let n = bytes("asset-cache-max-file", value, 1 << 32)?;
    if n == 0 {
        return Err(invalid(
            "asset-cache-max-file",
            value,
            "must be more than 0",
        ));
    }
    Ok(n)
}

impl AssetCacheConfig {
    pub fn is_enabled(&self) -> bool {
        self.max_bytes > 0 && !self.paths.is_empty()
    }

    pub(super) fn validate(s: &AssetCacheSettings, p: &mut Problems) -> Option<AssetCacheConfig> {
        let max_bytes = p.check(bytes("asset-cache-bytes", &s.asset_cache_bytes, 1 << 40));
        let max_file = p.check(max_file(&s.asset_cache_max_file));
        let paths = p.check(paths(&s.asset_cache_paths));
        let revalidate = p.check(positive_seconds(
            "asset-cache-revalidate",
            &s.asset_cache_revalidate,
        ));
        Some(AssetCacheConfig {
            max_bytes: max_bytes?,
            max_file: max_file?,
            paths: paths?,
            revalidate: revalidate?,
        })
    }

    pub(super) fn describe(&self, lines: &mut Vec<Line>) {
        lines.extend([
            (
                "asset_cache_bytes",
                match self.max_bytes {
                    0 => "0 (off)".to_owned(),
                    n => n.to_string(),
                },
            ),
            ("asset_cache_max_file", self.max_file.to_string()),
            ("asset_cache_paths", self.paths.join(",")),
            ("asset_cache_revalidate", duration_line(self.revalidate)),
        ]);
    }
}
