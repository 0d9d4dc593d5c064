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
    /// A file holding the store's URL (a mounted Secret), read at start (a change takes a
    /// restart, as every `[state]` key does).
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

/// Why `url` is not a store URL, if it is not one. Parsed as the Redis client parses it, so
/// what passes here connects.
pub(crate) fn redis_url_problem(url: &str) -> Option<String> {
    let example = "e.g. \"redis://redis.corral.svc:6379/0\" (or \"local\")";
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    let parsed = redis::parse_redis_url(url).filter(|_| scheme_ok);
    match parsed {
        None => Some(format!(
            "`{}` must be \"local\" or a redis:// or rediss:// URL (a password with / ? # @ must be percent-encoded), {example}",
            redact(url)
        )),
        Some(u) if u.host_str().is_none_or(str::is_empty) => {
            Some(format!("`{}` needs a host, {example}", redact(url)))
        }
        Some(_) if redis::Client::open(url).is_err() => {
            Some(format!("`{}` is not a URL the Redis client accepts, {example}", redact(url)))
        }
        Some(_) => None,
    }
}

/// Whether a store URL carries a password (`redis://:pw@host` or `redis://user:pw@host`). A
/// URL that does not parse but holds an `@` counts as one.
fn has_password(url: &str) -> bool {
    match redis::parse_redis_url(url) {
        Some(u) => u.password().is_some(),
        None => url.contains('@'),
    }
}

/// A store URL as it may be shown: without its password. One that does not parse is not shown
/// at all when it may hold one.
pub(crate) fn redact(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        None if url.contains('@') => "(a URL that does not parse; not shown)".to_string(),
        None => url.to_string(),
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
        // A password with a slash, not percent-encoded: never shown, never accepted.
        let raw = "redis://:ab/cd@host/0";
        assert!(
            !redact(raw).contains("ab/cd") && !redact(raw).contains("cd@"),
            "{}",
            redact(raw)
        );
        assert!(redis_url_problem(raw).is_some() || has_password(raw));
    }
}
