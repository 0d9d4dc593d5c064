//! `[teams.NAME]`: one table per team, and the checks of team names and model globs.

use super::units::comma_list;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TeamConfig {
    /// Model globs the team may use (`*` matches any run of characters). Empty: none.
    #[serde(deserialize_with = "comma_list")]
    pub models: Vec<String>,
    /// May call the mutating routes (`/api/pull`, `/api/delete`, ...).
    pub admin: bool,
    /// May use `*:cloud` / `*-cloud` models (Ollama forwards those prompts to ollama.com).
    pub cloud: bool,
    /// Requests per minute; 0 = unlimited.
    pub rpm: u32,
    /// Tokens per minute; 0 = unlimited.
    pub tpm: u64,
    /// Requests in flight at once; 0 = unlimited.
    pub max_concurrent: u32,
    /// Share of the nodes' slots while they are all taken (`[scheduler]`); at least 1.
    pub weight: u32,
    /// This team's requests waiting for a slot; beyond, 429 at once. Unset: only
    /// `scheduler.max_queued` applies; 0: the team never waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
}

impl Default for TeamConfig {
    fn default() -> Self {
        TeamConfig {
            models: Vec::new(),
            admin: false,
            cloud: false,
            rpm: 0,
            tpm: 0,
            max_concurrent: 0,
            weight: 1,
            max_queued: None,
        }
    }
}

/// Every problem with the `[teams.*]` tables.
pub(super) fn check(teams: &BTreeMap<String, TeamConfig>, problems: &mut Vec<Problem>) {
    for (name, team) in teams {
        let key = format!("teams.{name}");
        if !valid_team_name(name) {
            problems.push(Problem::new(
                &key,
                "team names are 1-64 lowercase letters, digits, '-' or '_' (so CORRAL__TEAMS__NAME__KEY can address them)",
            ));
        }
        if !(1..=1000).contains(&team.weight) {
            problems.push(Problem::new(
                format!("{key}.weight"),
                "a team's share of the slots is 1 to 1000 (default 1)",
            ));
        }
        for (i, glob) in team.models.iter().enumerate() {
            if glob.trim().is_empty() || glob.chars().any(|c| c.is_whitespace() || c.is_control()) {
                problems.push(Problem::new(
                    format!("{key}.models[{i}]"),
                    "a model glob is a model name with optional '*', e.g. \"llama3.2:*\"",
                ));
            }
        }
    }
}

/// Team names: 1-64 lowercase letters, digits, '-' or '_'.
pub fn valid_team_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load_str};
    use super::*;

    #[test]
    fn team_names_can_be_addressed_from_the_environment() {
        for good in ["research", "ops-2", "a_b", &"x".repeat(64)] {
            assert!(valid_team_name(good), "{good}");
        }
        for bad in ["", "Research", "a.b", "a b", &"x".repeat(65)] {
            assert!(!valid_team_name(bad), "{bad}");
        }
        let e = load_str("[teams.ok]\nmodels = [\"llama3.2:*\", \"a b\"]\n").unwrap_err();
        assert_eq!(keys(&e), ["teams.ok.models[1]"]);
    }
}
