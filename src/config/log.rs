//! `[log]`: the log format and level filter, and the check of the filter.

use super::Problem;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `corral=debug,pingora=warn`, ...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogConfig {
    /// Every problem with `[log]`.
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        if !valid_log_filter(&self.level) {
            problems.push(Problem::new(
                "log.level",
                format!(
                    "`{}` is not a level or filter; use error, warn, info, debug or trace, or e.g. \"info,corral=debug\"",
                    self.level
                ),
            ));
        }
    }
}

/// A level (`info`) or comma-separated `target=level` directives (`info,corral=debug`).
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let level = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    !filter.trim().is_empty()
        && filter.split(',').all(|d| match d.split_once('=') {
            Some((target, l)) => {
                !target.is_empty()
                    && target
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_:-".contains(&b))
                    && level(l)
            }
            None => level(d),
        })
        && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_are_filters() {
        for good in [
            "info",
            "DEBUG",
            "info,corral=debug",
            "corral=trace,pingora=warn",
        ] {
            assert!(valid_log_filter(good), "{good}");
        }
        for bad in ["", "loud!", "info,", "=debug", "corral=loud"] {
            assert!(!valid_log_filter(bad), "{bad}");
        }
    }
}
