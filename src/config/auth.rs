//! `[auth]`: the keys that verify API keys and the revocation list, and their checks.

use super::units::comma_list;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Ed25519 public keys (PEM) that verify API keys; the file stem is the key id (`kid`).
    #[serde(deserialize_with = "comma_list")]
    pub verify_keys: Vec<PathBuf>,
    /// Revoked key ids (`jti`), one per line. Empty: no revocation list.
    pub revoked_file: PathBuf,
}

impl AuthConfig {
    /// Applies `fix` (which makes a relative path relative to the config file) to every path.
    pub(super) fn resolve_paths(&mut self, fix: impl Fn(&mut PathBuf)) {
        fix(&mut self.revoked_file);
        self.verify_keys.iter_mut().for_each(fix);
    }

    /// Every problem with `[auth]` (the files themselves are read, and checked, at start-up).
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        for (i, path) in self.verify_keys.iter().enumerate() {
            if path.file_stem().is_none_or(|s| s.is_empty()) {
                problems.push(Problem::new(
                    format!("auth.verify_keys[{i}]"),
                    "needs a file name: its stem is the key id",
                ));
            }
        }
    }
}
