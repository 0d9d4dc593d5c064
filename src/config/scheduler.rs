//! `[scheduler]`: how long and how many requests may wait for a slot on a node when every
//! node's `parallel` slots are taken (see `upstream::queue`).

use super::units::HumanDuration;
use super::Problem;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Longest wait for a slot; then 503 with Retry-After.
    pub queue_timeout: HumanDuration,
    /// Requests waiting in all; beyond, 429 at once.
    pub max_queued: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            queue_timeout: HumanDuration::secs(60),
            max_queued: 1000,
        }
    }
}

impl SchedulerConfig {
    /// Every problem with `[scheduler]`.
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        if self.queue_timeout.0.is_zero() {
            problems.push(Problem::new(
                "scheduler.queue_timeout",
                "must be more than 0 (e.g. \"60s\"); set scheduler.max_queued = 0 for no waiting at all",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load_str};

    #[test]
    fn defaults_and_checks() {
        let cfg = load_str("").unwrap();
        assert_eq!(cfg.scheduler.queue_timeout.0.as_secs(), 60);
        assert_eq!(cfg.scheduler.max_queued, 1000);
        let cfg = load_str("[scheduler]\nqueue_timeout = \"5s\"\nmax_queued = 0\n").unwrap();
        assert_eq!(
            (
                cfg.scheduler.queue_timeout.0.as_secs(),
                cfg.scheduler.max_queued
            ),
            (5, 0)
        );
        assert_eq!(
            keys(&load_str("[scheduler]\nqueue_timeout = \"0s\"\n").unwrap_err()),
            vec!["scheduler.queue_timeout"]
        );
        assert!(
            load_str("[scheduler]\nqueue = 3\n").is_err(),
            "unknown keys are refused"
        );
    }
}
