//! `[auth]`: the keys that verify API keys and the revocation list, and their checks.

use super::units::comma_list;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Ed25519 public keys (PEM) that verify API keys; the file name gives the key id (`kid`,
    /// see [`kid_of`]).
    #[serde(deserialize_with = "comma_list")]
    pub verify_keys: Vec<PathBuf>,
    /// Revoked key ids (`jti`), one per line. Empty: no revocation list.
    pub revoked_file: PathBuf,
}

/// The key id of a key file: its name without `.pem` and without `.pub`/`.key`
/// (`corral-2026.pub.pem` and `corral-2026.key.pem` are both `corral-2026`).
pub(crate) fn kid_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let name = name.strip_suffix(".pem").unwrap_or(name);
    let name = name
        .strip_suffix(".pub")
        .or_else(|| name.strip_suffix(".key"))
        .unwrap_or(name);
    (!name.is_empty()).then(|| name.to_string())
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
            if kid_of(path).is_none() {
                problems.push(Problem::new(
                    format!("auth.verify_keys[{i}]"),
                    "needs a file name that gives the key id, like ID.pub.pem",
                ));
            }
        }
    }
}
