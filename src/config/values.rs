//! Value parsers shared by the settings (seconds, counts), and the errors they report.

use std::time::Duration;

/// A setting that failed validation: which one, what was given, and why.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} / {env} {value:?}: {reason}")]
pub struct ConfigError {
    pub flag: String,
    pub env: String,
    pub value: String,
    pub reason: String,
}

/// Every setting that failed validation, one line each.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects validation errors so that every bad setting is reported at once.
#[derive(Default)]
pub(super) struct Problems(Vec<ConfigError>);

impl Problems {
    /// The value when `result` is fine; otherwise notes the error and gives `None`.
    pub(super) fn check<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.0.push(error);
                None
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn into_errors(self) -> ConfigErrors {
        ConfigErrors(self.0)
    }
}

/// The error for `--flag` (and its `CHATGATE_FLAG` variable).
pub(super) fn invalid(flag: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag: format!("--{flag}"),
        env: format!("CHATGATE_{}", flag.replace('-', "_").to_uppercase()),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

pub(super) fn seconds(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let secs: f64 = value
        .trim()
        .parse()
        .map_err(|_| invalid(flag, value, "expected a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(invalid(
            flag,
            value,
            "expected seconds between 0 and a year",
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(super) fn positive_seconds(flag: &str, value: &str) -> Result<Duration, ConfigError> {
    let duration = seconds(flag, value)?;
    if duration.is_zero() {
        return Err(invalid(flag, value, "must be more than 0"));
    }
    Ok(duration)
}

pub(super) fn count(flag: &str, value: &str, min: usize, max: usize) -> Result<usize, ConfigError> {
    let n: usize = value
        .trim()
        .parse()
        .map_err(|_| invalid(flag, value, "expected a whole number"))?;
    if !(min..=max).contains(&n) {
        return Err(invalid(
            flag,
            value,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

/// `on`/`off` (also `true`/`false`, `1`/`0`; empty is off).
pub(super) fn switch(flag: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" | "" => Ok(false),
        _ => Err(invalid(flag, value, "expected on or off")),
    }
}

/// A `check-config` line.
pub(super) type Line = (&'static str, String);

pub(super) fn duration_line(d: Duration) -> String {
    format!("{d:?}")
}
