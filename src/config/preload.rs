//! `[preload]`: the pinned models, their `keep_alive` (Ollama's [`KeepAlive`]), and their checks.

use super::units::{comma_list, HumanDuration};
use super::Problem;
use crate::ollama::KeepAlive;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PreloadConfig {
    /// Models loaded at start-up and kept loaded.
    #[serde(deserialize_with = "comma_list")]
    pub models: Vec<String>,
    /// `keep_alive` sent with the preloads: what Ollama accepts in a request (seconds, negative =
    /// forever, or a duration string with a unit), except 0.
    pub(crate) keep_alive: KeepAlive,
    /// How often `/api/ps` is checked for pinned models that went away.
    pub watch_interval: HumanDuration,
    /// `/readyz` is 503 until every preload succeeded.
    pub(crate) ready_requires_preload: bool,
    pub keep_alive_policy: KeepAlivePolicy,
    /// A pinned model Ollama does not have is pulled (`/api/pull`) before it is loaded.
    pub pull_missing: bool,
}

impl Default for PreloadConfig {
    fn default() -> Self {
        PreloadConfig {
            models: Vec::new(),
            keep_alive: KeepAlive::Forever,
            watch_interval: HumanDuration::secs(30),
            ready_requires_preload: true,
            keep_alive_policy: KeepAlivePolicy::Pin,
            pull_missing: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeepAlivePolicy {
    /// Replace a client's `keep_alive` on pinned models so no client can unload them.
    Pin,
    /// Forward clients' `keep_alive` untouched.
    Pass,
}

impl PreloadConfig {
    /// Every problem with `[preload]`.
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        for (i, m) in self.models.iter().enumerate() {
            if m.trim().is_empty() || m.contains('*') {
                problems.push(Problem::new(
                    format!("preload.models[{i}]"),
                    "a model name without '*', e.g. \"llama3.2\"",
                ));
            }
        }
        // Ollama reads 0 as "unload as soon as idle": pinned models would be unloaded after the
        // preload and after every request (the pin policy writes it into them), then loaded
        // again by the watcher.
        if self.keep_alive == KeepAlive::For(std::time::Duration::ZERO) {
            problems.push(Problem::new(
                "preload.keep_alive",
                "0 tells Ollama to unload a model as soon as it is idle, which undoes pinning; write -1 (forever) or a duration such as \"24h\"",
            ));
        }
        if self.watch_interval.0.is_zero() {
            problems.push(Problem::new(
                "preload.watch_interval",
                "must be more than 0",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load_str};
    use super::*;
    use std::time::Duration;

    fn keep_alive(value: &str) -> Result<KeepAlive, String> {
        load_str(&format!("[preload]\nkeep_alive = {value}\n"))
            .map(|c| c.preload.keep_alive)
            .map_err(|e| {
                assert_eq!(keys(&e), ["preload.keep_alive"], "{e}");
                e.to_string()
            })
    }

    #[test]
    fn keep_alive_follows_ollama_rules() {
        assert!(keep_alive("-1").is_ok());
        assert!(keep_alive("\"30m\"").is_ok());
        assert!(keep_alive("\"-1m\"").is_ok());
        assert!(keep_alive("\"-1\"").unwrap_err().contains("no unit"));
        assert_eq!(KeepAlive::Forever.to_json(), serde_json::json!(-1));
        assert_eq!(
            KeepAlive::For(Duration::from_millis(500)).to_json(),
            serde_json::json!(0.5)
        );
        // Read as the request path reads them.
        assert_eq!(keep_alive("-1"), Ok(KeepAlive::Forever));
        assert_eq!(keep_alive("-0.5"), Ok(KeepAlive::Forever));
        assert_eq!(keep_alive("\"-1m\""), Ok(KeepAlive::Forever));
        assert_eq!(
            keep_alive("\"30m\""),
            Ok(KeepAlive::For(Duration::from_secs(1800)))
        );
        assert_eq!(
            keep_alive("1.5"),
            Ok(KeepAlive::For(Duration::from_millis(1500)))
        );
        assert!(keep_alive("\"soon\"")
            .unwrap_err()
            .contains("not a duration"));
        assert!(keep_alive("true").is_err());
        assert!(keep_alive("nan").unwrap_err().contains("finite"));
    }

    #[test]
    fn keep_alive_0_is_read_like_ollama_then_refused_for_pinned_models() {
        for zero in ["0", "\"0\"", "\"0s\"", "0.0"] {
            let e = keep_alive(zero).unwrap_err();
            assert!(e.contains("undoes pinning"), "{zero}: {e}");
        }
    }

    #[test]
    fn keep_alive_from_the_environment_is_a_number_or_a_duration() {
        let load = |v: &str| {
            let env = [("CORRAL__PRELOAD__KEEP_ALIVE".to_string(), v.to_string())];
            super::super::Config::load_with_env(
                &super::super::Source::BuiltIn,
                Some(env.into_iter().collect()),
            )
            .map(|c| c.preload.keep_alive)
        };
        assert_eq!(load("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(
            load("24h").unwrap(),
            KeepAlive::For(Duration::from_secs(86_400))
        );
        assert!(load("0").is_err());
    }

    #[test]
    fn model_names_and_the_watch_interval_are_checked() {
        let e =
            load_str("[preload]\nmodels = [\"llama*\", \" \"]\nwatch_interval = 0\n").unwrap_err();
        assert_eq!(
            keys(&e),
            [
                "preload.models[0]",
                "preload.models[1]",
                "preload.watch_interval"
            ]
        );
    }
}
