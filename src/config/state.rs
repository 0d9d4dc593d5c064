//! `[state]`: where the state replicas share lives (team limits, in-flight leases, revocations):
//! this process only, or a Redis/Valkey store, and what to do when the store fails.

use super::units::HumanDuration;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `local` (this process only), or `redis://` / `rediss://` URL of a Redis or Valkey. A
    /// password belongs in `CORRAL__STATE__STORE` or in `store_file`, never in the file.
    pub store: String,
    /// A file holding the store's URL (a mounted Secret), read at start and on reload.
    #[serde(skip_serializing_if = "is_empty_path")]
    pub store_file: PathBuf,
    /// What admission does while the store fails.
    pub on_store_error: OnStoreError,
    /// Prefix of every key corral writes.
    pub key_prefix: String,
    /// Deadline of one store call: a slow store must not stall requests.
    pub timeout: HumanDuration,
    /// How long a request's place (`max_concurrent`) outlives a replica that stopped renewing
    /// it (killed with SIGKILL); live requests renew theirs three times as often.
    pub lease_ttl: HumanDuration,
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            store: "local".into(),
            store_file: PathBuf::new(),
            on_store_error: OnStoreError::Local,
            key_prefix: "corral:".into(),
            timeout: HumanDuration(std::time::Duration::from_millis(50)),
            lease_ttl: HumanDuration::secs(30),
        }
    }
}

/// What admission does while the store cannot be reached.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// This replica's own limits, as with `store = "local"`.
    Local,
    /// 503 for every request that needs the store.
    Deny,
    /// No limit at all until the store is back.
    Allow,
}

impl StateConfig {
    /// Whether the store is shared (a URL), not this process's memory.
    pub(crate) fn shared(&self) -> bool {
        self.store != "local" || !is_empty_path(&self.store_file)
    }

    pub(super) fn resolve_paths(&mut self, fix: impl Fn(&mut PathBuf)) {
        fix(&mut self.store_file);
    }

    /// Every problem with `[state]`.
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        let store = self.store.as_str();
        if store != "local" {
            match redis_url_problem(store) {
                Some(why) => problems.push(Problem::new("state.store", why)),
                None if has_password(store) && !from_environment() => {
                    problems.push(Problem::new(
                        "state.store",
                        "holds a password: put the URL in CORRAL__STATE__STORE or in state.store_file instead, so the configuration file carries no secret",
                    ))
                }
                None => {}
            }
        }
        if store != "local" && !is_empty_path(&self.store_file) {
            problems.push(Problem::new(
                "state.store_file",
                "set either state.store or state.store_file, not both",
            ));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > std::time::Duration::from_secs(5) {
            problems.push(Problem::new(
                "state.timeout",
                "must be more than 0 and at most 5s (every admission may wait this long)",
            ));
        }
        let ttl = self.lease_ttl.0;
        if ttl < std::time::Duration::from_secs(3) || ttl > std::time::Duration::from_secs(300) {
            problems.push(Problem::new(
                "state.lease_ttl",
                "must be between 3s and 5m (30s: a killed replica's places are free within 30 s)",
            ));
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
        if !prefix_ok {
            problems.push(Problem::new(
                "state.key_prefix",
                "1 to 64 of a-z, A-Z, 0-9 and - _ : . (e.g. \"corral:\")",
            ));
        }
    }
}

/// Whether `CORRAL__STATE__STORE` is set (the URL came from the environment, not the file).
fn from_environment() -> bool {
    std::env::var_os("CORRAL__STATE__STORE").is_some_and(|v| !v.is_empty())
}

/// Why `url` is not a store URL, if it is not one.
pub(crate) fn redis_url_problem(url: &str) -> Option<String> {
    let example = "e.g. \"redis://redis.corral.svc:6379/0\" (or \"local\")";
    let Some(rest) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
    else {
        return Some(format!(
            "`{}` must be \"local\" or start with redis:// or rediss://, {example}",
            redact(url)
        ));
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Some(format!("`{}` needs a host, {example}", redact(url)));
    }
    None
}

/// Whether a store URL carries a password (`redis://:pw@host` or `redis://user:pw@host`).
fn has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'))
}

/// A store URL as it may be shown: without its password.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let shown = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{user}:***@{host}")
        }
        None => authority.to_string(),
    };
    if path.is_empty() {
        format!("{scheme}://{shown}")
    } else {
        format!("{scheme}://{shown}/{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load_str};
    use super::*;

    #[test]
    fn local_is_the_default_and_a_redis_url_is_shared() {
        let cfg = load_str("").unwrap();
        assert_eq!(cfg.state.store, "local");
        assert!(!cfg.state.shared());
        let cfg = load_str(
            "[state]\nstore = \"redis://redis.corral.svc:6379/0\"\non_store_error = \"deny\"\n",
        )
        .unwrap();
        assert!(cfg.state.shared());
        assert_eq!(cfg.state.on_store_error, OnStoreError::Deny);
    }

    #[test]
    fn bad_urls_passwords_in_the_file_and_bad_knobs_are_refused() {
        let e = load_str("[state]\nstore = \"memcached://x\"\n").unwrap_err();
        assert_eq!(keys(&e), ["state.store"]);
        let e = load_str("[state]\nstore = \"redis://:hunter2@redis:6379\"\n").unwrap_err();
        assert_eq!(keys(&e), ["state.store"]);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = load_str(
            "[state]\nstore = \"redis://redis\"\nstore_file = \"/run/secrets/store\"\ntimeout = \"0s\"\nkey_prefix = \"a b\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&e),
            ["state.store_file", "state.timeout", "state.key_prefix"]
        );
        let e = load_str("[state]\non_store_error = \"maybe\"\n").unwrap_err();
        assert_eq!(keys(&e), ["state.on_store_error"]);
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact("redis://:hunter2@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redact("rediss://corral:hunter2@redis"),
            "rediss://corral:***@redis"
        );
        assert_eq!(redact("redis://redis:6379"), "redis://redis:6379");
        assert!(has_password("redis://u:p@h") && !has_password("redis://h:6379"));
    }
}
