//! The configuration: the root [`Config`], loading it, and reporting what is wrong with it.
//!
//! Each section is a file of its own, its checks next to its struct: `server`, `upstream`,
//! `auth`, `teams`, `preload`, `log`; `units` holds the duration and size types they use.
//!
//! One TOML file (found at `--config`, else `$CORRAL_CONFIG`, else `./config/corral.toml`),
//! overlaid with `CORRAL__SECTION__KEY` environment variables, deserialized into [`Config`] with
//! unknown keys rejected, then checked by `Config::validate`. Every problem is reported with the
//! file and the key at fault; a value that cannot be read does not hide the problems after it.
//! `config/corral.toml` documents every key.

mod auth;
mod log;
mod preload;
mod scheduler;
mod server;
mod state;
mod teams;
mod units;
mod upstream;

pub(crate) use auth::{issuer_problem, kid_of};
pub use auth::{AuthConfig, OidcConfig};
pub use log::{LogConfig, LogFormat};
pub use preload::{KeepAlivePolicy, PreloadConfig};
pub use scheduler::SchedulerConfig;
pub use server::{CorsConfig, ListenAddr, ServerConfig};
pub(crate) use state::{redact as redact_store_url, redis_url_problem as state_url_problem};
pub use state::{OnStoreError, StateConfig};
pub use teams::{valid_team_name, TeamConfig};
pub use units::{ByteSize, HumanDuration};
pub use upstream::{DiscoverConfig, NodeConfig, UpstreamConfig, UpstreamUrl};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    File(PathBuf),
    /// No file anywhere: built-in defaults (loopback only).
    BuiltIn,
}

impl Source {
    /// `--config`, else `$CORRAL_CONFIG`, else `./config/corral.toml` if it exists, else built-in.
    pub(crate) fn locate(cli: Option<&Path>) -> Source {
        if let Some(p) = cli {
            return Source::File(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("CORRAL_CONFIG").filter(|p| !p.is_empty()) {
            return Source::File(PathBuf::from(p));
        }
        let default = PathBuf::from(DEFAULT_CONFIG_PATH);
        if default.exists() {
            Source::File(default)
        } else {
            Source::BuiltIn
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::BuiltIn => "built-in defaults".to_string(),
        }
    }
}

pub(crate) const DEFAULT_CONFIG_PATH: &str = "config/corral.toml";
pub(crate) const ENV_PREFIX: &str = "CORRAL";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    /// One table per team, keyed by the team name (the `sub` of its API keys).
    pub teams: BTreeMap<String, TeamConfig>,
    pub preload: PreloadConfig,
    pub log: LogConfig,
    /// State shared by replicas (team limits, leases, revocations).
    pub state: StateConfig,
    /// Waiting for a slot on a node (`parallel`).
    pub scheduler: SchedulerConfig,
}

/// One thing wrong with the configuration: the key at fault and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) key: String,
    pub(crate) message: String,
}

impl Problem {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Whether this problem is about `key` or names it (a check comparing two keys): such a
    /// problem is not reported when `key` could not be read and was judged by its default.
    fn involves(&self, key: &str) -> bool {
        let names = |text: &str| {
            text.match_indices(key).any(|(at, _)| {
                let before = text[..at].chars().next_back();
                let after = text[at + key.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        };
        names(&self.key) || names(&self.message)
    }
}

/// Everything wrong with one configuration source.
#[derive(Debug, Clone)]
pub(crate) struct ConfigError {
    pub(crate) source: Source,
    pub(crate) problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = self.source.describe();
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{origin}: {}", p.message)?;
            } else {
                write!(f, "{origin}: {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the file (if any), applies `CORRAL__*` overrides, resolves relative paths against the
    /// file's directory and validates the result.
    pub(crate) fn load(source: &Source) -> Result<Config, ConfigError> {
        Config::load_with_env(source, None)
    }

    /// [`Config::load`] with the environment given (`None`: the process's own).
    fn load_with_env(
        source: &Source,
        env: Option<config::Map<String, String>>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source: source.clone(),
            problems,
        };
        let mut builder = config::Config::builder();
        if let Source::File(path) = source {
            if !path.is_file() {
                return Err(fail(vec![Problem::new(
                    "",
                    "file not found (give --config FILE, set CORRAL_CONFIG, or create ./config/corral.toml)",
                )]));
            }
            builder = builder.add_source(
                config::File::from(path.as_path())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(env),
        );
        let merged = builder
            .build()
            .map_err(|e| fail(vec![problem_from_config_error(e)]))?;
        let (cfg, mut problems, unread) = read_all(merged.cache);
        let Some(mut cfg) = cfg else {
            return Err(fail(problems));
        };
        if let Source::File(path) = source {
            cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        }
        problems.extend(
            cfg.validate()
                .into_iter()
                .filter(|p| !unread.iter().any(|key| p.involves(key))),
        );
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(problems))
        }
    }

    /// Makes relative file paths relative to the config file's directory.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                let joined = base.join(&*p);
                *p = std::path::absolute(&joined).unwrap_or(joined);
            }
        };
        self.server.resolve_paths(fix);
        self.auth.resolve_paths(fix);
        self.state.resolve_paths(fix);
    }

    /// Every problem with the values (files are checked where they are loaded), section by
    /// section; values that cannot even be read (a bad `upstream.url`) were refused before.
    pub(crate) fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.server.check(&mut problems);
        self.upstream.check(&mut problems);
        self.upstream
            .check_placement(&self.preload.models, &mut problems);
        let teams: Vec<&str> = self.teams.keys().map(String::as_str).collect();
        self.auth.check(&teams, &mut problems);
        teams::check(&self.teams, &mut problems);
        self.preload.check(&mut problems);
        self.log.check(&mut problems);
        self.state.check(&mut problems);
        self.scheduler.check(&mut problems);
        problems
    }

    /// The TOML text of this configuration (used by `corral demo` to write what it runs).
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| format!("cannot write the configuration as TOML: {e}"))
    }
}

/// Deserializes the merged sources into a [`Config`]. A value that cannot be read is reported and
/// left out (its default takes its place) so the next one can be found too: every unreadable key
/// is reported, not just the first. Returns the config (`None` when even that failed), the
/// problems, and the keys left out.
fn read_all(mut tree: config::Value) -> (Option<Config>, Vec<Problem>, Vec<String>) {
    let mut problems = Vec::new();
    let mut unread = Vec::new();
    let cfg = loop {
        match tree.clone().try_deserialize::<Config>() {
            Ok(cfg) => break Some(cfg),
            Err(e) => {
                let problem = problem_from_config_error(e);
                let key = problem.key.clone();
                problems.push(problem);
                if !remove_key(&mut tree, &key) {
                    break None;
                }
                unread.push(key);
            }
        }
    };
    // Found in the order of the `config` crate's hash maps: put them in file order.
    const SECTIONS: [&str; 7] = [
        "server", "upstream", "auth", "teams", "preload", "log", "state",
    ];
    problems.sort_by_cached_key(|p| {
        let section = p.key.split(['.', '[']).next().unwrap_or_default();
        let at = SECTIONS.iter().position(|s| *s == section);
        (at.unwrap_or(SECTIONS.len()), p.key.clone())
    });
    (cfg, problems, unread)
}

/// Removes `key` (`upstream.url`, `teams.a.models[0]`: the whole list) from a value tree; false
/// when it is not there.
fn remove_key(tree: &mut config::Value, key: &str) -> bool {
    let key = key.split('[').next().unwrap_or_default();
    let (parents, last) = key.rsplit_once('.').unwrap_or(("", key));
    let mut node = tree;
    for part in parents.split('.').filter(|p| !p.is_empty()) {
        match &mut node.kind {
            config::ValueKind::Table(t) => match t.get_mut(part) {
                Some(child) => node = child,
                None => return false,
            },
            _ => return false,
        }
    }
    match &mut node.kind {
        config::ValueKind::Table(t) => !last.is_empty() && t.shift_remove(last).is_some(),
        _ => false,
    }
}

/// Turns the `config` crate's error ("... for key `server.n`") into key + message.
fn problem_from_config_error(e: config::ConfigError) -> Problem {
    let text = e.to_string();
    if let Some((message, rest)) = text.rsplit_once(" for key `") {
        let key = rest.split('`').next().unwrap_or_default();
        // The `config` crate writes a field of a table in a list as `nodes[0]url`.
        let mut fixed = String::with_capacity(key.len() + 2);
        let mut after_index = false;
        for c in key.chars() {
            if after_index && c != '.' && c != '[' {
                fixed.push('.');
            }
            after_index = c == ']';
            fixed.push(c);
        }
        return Problem::new(fixed, message);
    }
    Problem::new("", text)
}

/// Loading from text, for the tests of every section.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::io::Write;

    pub(crate) fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        Config::load(&Source::File(f.path().to_path_buf()))
    }

    pub(crate) fn keys(e: &ConfigError) -> Vec<&str> {
        e.problems.iter().map(|p| p.key.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{keys, load_str};
    use super::*;

    #[test]
    fn env_overrides_take_lists_as_comma_separated_strings() {
        let env = [
            ("CORRAL__UPSTREAM__URL", "http://ollama:11434"),
            (
                "CORRAL__TEAMS__RESEARCH__MODELS",
                "llama3.2:*, nomic-embed-text",
            ),
            ("CORRAL__TEAMS__OPS__MODELS", "*"),
            ("CORRAL__TEAMS__OPS__ADMIN", "true"),
            ("CORRAL__PRELOAD__MODELS", "llama3.2,nomic-embed-text"),
        ];
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::load_with_env(&Source::BuiltIn, Some(env.collect())).unwrap();
        assert_eq!(c.upstream.url().to_string(), "http://ollama:11434");
        assert_eq!(
            c.teams["research"].models,
            ["llama3.2:*", "nomic-embed-text"]
        );
        assert_eq!(c.teams["ops"].models, ["*"]);
        assert!(c.teams["ops"].admin);
        assert_eq!(c.preload.models, ["llama3.2", "nomic-embed-text"]);
        // A TOML array still works, and a wrong type is still an error.
        let c = load_str("[teams.a]\nmodels = [\"x\", \"y\"]\n").unwrap();
        assert_eq!(c.teams["a"].models, ["x", "y"]);
        assert!(load_str("[teams.a]\nmodels = 3\n").is_err());
    }

    #[test]
    fn built_in_defaults_are_loopback_only_and_valid() {
        let c = Config::default();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert!(c.server.listen.0.unwrap().ip().is_loopback());
        assert!(c.server.metrics_listen.0.unwrap().ip().is_loopback());
        assert!(c.teams.is_empty());
        assert_eq!(c.upstream.read_timeout, HumanDuration::secs(900));
        assert_eq!(c.upstream.request_timeout, HumanDuration::secs(3600));
    }

    /// Loading `toml` fails at `key` alone, with a message that contains `says`.
    fn refused_at(toml: &str, key: &str, says: &str) {
        let e = load_str(toml).unwrap_err();
        assert_eq!(keys(&e), [key], "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        refused_at(
            "[server]\nlisten = \"127.0.0.1:8443\"\nlisen = 1\n",
            "server",
            "unknown field `lisen`",
        );
        refused_at("[teams.research]\nmodel = [\"x\"]\n", "teams.research", "");
    }

    #[test]
    fn wrong_types_name_the_key() {
        refused_at(
            "[upstream]\nread_timeout = \"forever\"\n",
            "upstream.read_timeout",
            "\"15m\"",
        );
        refused_at("[server]\nlisten = \"localhost\"\n", "server.listen", "");
    }

    #[test]
    fn validation_reports_every_problem() {
        let e = load_str(
            "[server]\nlisten = \"0.0.0.0:8443\"\nmetrics_listen = \"0.0.0.0:8443\"\nmax_body = 0\n\
             [upstream]\nurl = \"ftp://x\"\n[teams.Research]\nmodels = [\"\"]\n[log]\nlevel = \"loud!\"\n",
        )
        .unwrap_err();
        let k = keys(&e);
        for expected in [
            "server.tls_cert",
            "server.metrics_listen",
            "server.max_body",
            "upstream.url",
            "teams.Research",
            "teams.Research.models[0]",
            "log.level",
        ] {
            assert!(k.contains(&expected), "{expected} missing from {k:?}");
        }
    }

    #[test]
    fn every_unreadable_value_is_reported_and_not_judged_by_its_default() {
        // max_connections cannot be read; judged by its default (4096), max_connections_per_ip
        // would look too large: that is not reported.
        let e = load_str(
            "[server]\nmax_connections = \"lots\"\nmax_connections_per_ip = 8000\n\
             [upstream]\nurl = \"not a url\"\n[log]\nlevel = \"loud!\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&e),
            ["server.max_connections", "upstream.url", "log.level"]
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corral.toml");
        std::fs::write(
            &path,
            "[server]\ntls_cert = \"tls/a.crt\"\ntls_key = \"/abs/a.key\"\n",
        )
        .unwrap();
        let c = Config::load(&Source::File(path)).unwrap();
        assert_eq!(
            c.server.tls_cert,
            std::path::absolute(dir.path().join("tls/a.crt")).unwrap()
        );
        assert_eq!(c.server.tls_key, PathBuf::from("/abs/a.key"));
    }

    #[test]
    fn missing_file_is_an_error_not_a_default() {
        let e = Config::load(&Source::File("/nonexistent/corral.toml".into())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/corral.toml: file not found"),
            "{e}"
        );
    }

    /// A configuration read from TOML text alone (no environment, no file checks).
    fn from_toml(text: &str) -> Config {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    /// One of the configurations shipped in `config/`.
    fn shipped(name: &str) -> Config {
        let path = format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"));
        from_toml(&std::fs::read_to_string(path).unwrap())
    }

    #[test]
    fn the_shipped_example_config_is_valid_toml_with_known_keys() {
        // Paths in it point at /etc; only the structure and values are checked here.
        let cfg = shipped("corral.toml");
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        assert_eq!(cfg.server.listen.0.unwrap().to_string(), "0.0.0.0:8443");
    }

    #[test]
    fn the_kubernetes_config_is_valid_too() {
        let cfg = shipped("kubernetes.toml");
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let discover = cfg.upstream.discover.as_ref().unwrap();
        assert_eq!(
            discover.host_port(),
            Some(("ollama-headless", 11434)),
            "the Ollama StatefulSet's headless Service"
        );
        assert!(
            cfg.server.metrics_listen.0.unwrap().ip().is_unspecified(),
            "probes reach the pod IP"
        );
    }

    #[test]
    fn round_trips_through_toml() {
        let mut c = Config::default();
        c.teams.insert(
            "research".into(),
            TeamConfig {
                models: vec!["llama3.2:*".into()],
                rpm: 5,
                ..Default::default()
            },
        );
        assert_eq!(from_toml(&c.to_toml().unwrap()), c);
    }
}
