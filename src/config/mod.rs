//! Typed, validated configuration.
//!
//! One TOML file (found at `--config`, else `$CORRAL_CONFIG`, else `./config/corral.toml`),
//! overlaid with `CORRAL__SECTION__KEY` environment variables, deserialized into [`Config`] with
//! unknown keys rejected, then checked by [`Config::validate`]. Every problem is reported with the
//! file and the key at fault. `config/corral.toml` documents every key.

mod units;

use units::comma_list;
pub use units::{ByteSize, HumanDuration};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// No file anywhere: built-in defaults (loopback only).
    BuiltIn,
}

impl Source {
    /// `--config`, else `$CORRAL_CONFIG`, else `./config/corral.toml` if it exists, else built-in.
    pub fn locate(cli: Option<&Path>) -> Source {
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

    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::BuiltIn => "built-in defaults".to_string(),
        }
    }
}

pub const DEFAULT_CONFIG_PATH: &str = "config/corral.toml";
pub const ENV_PREFIX: &str = "CORRAL";

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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TLS listener (HTTP/1.1 and HTTP/2 via ALPN). Empty: no TLS listener.
    pub listen: ListenAddr,
    /// PEM certificate chain. Empty (with `tls_key` empty): a throwaway self-signed certificate,
    /// allowed on a loopback `listen` only.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Optional cleartext listener, e.g. behind a TLS-terminating load balancer.
    pub plain_listen: ListenAddr,
    /// `/metrics`, `/livez`, `/readyz`. Empty: disabled.
    pub metrics_listen: ListenAddr,
    /// Largest request body accepted (413 above).
    pub max_body: ByteSize,
    /// How long in-flight requests may finish after SIGTERM.
    pub grace_period: HumanDuration,
    /// Largest request header block (431 above).
    pub max_header_size: ByteSize,
    /// How long a client may take to send a request header, counted from when the connection is
    /// ready for one (so it also closes idle kept-alive connections). Slow clients are cut off.
    pub header_timeout: HumanDuration,
    /// How long a client may take to send a request body corral reads (408 after).
    pub body_timeout: HumanDuration,
    /// Client connections open at once, idle ones included; 0 = no cap. Over it, a new
    /// connection is closed at once.
    pub max_connections: u32,
    /// Client connections open at once from one address (IPv6: one /64); 0 = no cap.
    pub max_connections_per_ip: u32,
    /// Requests in flight at once (HTTP/2 streams included); 0 = no cap. Over it, a request is
    /// answered 503 with `Retry-After` before anything else is done for it.
    pub max_requests: u32,
    /// Requests in flight at once from one address (IPv6: one /64); 0 = no cap.
    pub max_requests_per_ip: u32,
    /// Request bodies held in memory at once, all requests together (corral reads JSON bodies
    /// whole and keeps each until Ollama answers); 0 = no cap. A body that does not fit is
    /// answered 503 with `Retry-After`.
    pub max_body_memory: ByteSize,
    /// PID file written in daemon mode (`corral serve --daemon`).
    pub pid_file: PathBuf,
    /// Unix socket through which a new corral takes over the listening sockets of a running one
    /// (`corral serve --upgrade`, then SIGQUIT to the old process).
    pub upgrade_sock: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ListenAddr::loopback(8443),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            plain_listen: ListenAddr::default(),
            metrics_listen: ListenAddr::loopback(9464),
            max_body: ByteSize::mib(32),
            grace_period: HumanDuration::secs(30),
            max_header_size: ByteSize(64 * 1024),
            header_timeout: HumanDuration::secs(30),
            body_timeout: HumanDuration::secs(300),
            max_connections: 4096,
            max_connections_per_ip: 256,
            max_requests: 4096,
            max_requests_per_ip: 256,
            max_body_memory: ByteSize::mib(256),
            pid_file: PathBuf::from("/run/corral/corral.pid"),
            upgrade_sock: PathBuf::from("/run/corral/upgrade.sock"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of Ollama: `http://host:port` (no path).
    pub url: String,
    /// Establishing the TCP connection.
    pub connect_timeout: HumanDuration,
    /// Longest silence between two upstream bytes, including the wait for the first one (a cold
    /// model load).
    pub read_timeout: HumanDuration,
    /// Hard cap on a whole request.
    pub request_timeout: HumanDuration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:11434".to_string(),
            connect_timeout: HumanDuration::secs(3),
            read_timeout: HumanDuration::secs(15 * 60),
            request_timeout: HumanDuration::secs(60 * 60),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Ed25519 public keys (PEM) that verify API keys; the file stem is the key id (`kid`).
    #[serde(deserialize_with = "comma_list")]
    pub verify_keys: Vec<PathBuf>,
    /// Revoked key ids (`jti`), one per line. Empty: no revocation list.
    pub revoked_file: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PreloadConfig {
    /// Models loaded at start-up and kept loaded.
    #[serde(deserialize_with = "comma_list")]
    pub models: Vec<String>,
    /// `keep_alive` sent with the preloads: seconds (negative = forever) or a duration string.
    pub keep_alive: KeepAlive,
    /// How often `/api/ps` is checked for pinned models that went away.
    pub watch_interval: HumanDuration,
    /// `/readyz` is 503 until every preload succeeded.
    pub ready_requires_preload: bool,
    pub keep_alive_policy: KeepAlivePolicy,
    /// A pinned model Ollama does not have is pulled (`/api/pull`) before it is loaded.
    pub pull_missing: bool,
}

impl Default for PreloadConfig {
    fn default() -> Self {
        PreloadConfig {
            models: Vec::new(),
            keep_alive: KeepAlive::Seconds(-1.0),
            watch_interval: HumanDuration::secs(30),
            ready_requires_preload: true,
            keep_alive_policy: KeepAlivePolicy::Pin,
            pull_missing: false,
        }
    }
}

/// An Ollama `keep_alive` value, as Ollama parses it: a number of seconds (negative = forever) or
/// a Go duration string with a unit (`"5m"`, `"-1m"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum KeepAlive {
    Seconds(f64),
    Text(String),
}

impl KeepAlive {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            KeepAlive::Seconds(s) if s.fract() == 0.0 && s.abs() < 1e15 => (*s as i64).into(),
            KeepAlive::Seconds(s) => (*s).into(),
            KeepAlive::Text(t) => t.clone().into(),
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            KeepAlive::Seconds(s) if s.is_finite() => Ok(()),
            KeepAlive::Seconds(_) => Err("must be a finite number of seconds".into()),
            KeepAlive::Text(t) => {
                let unsigned = t.strip_prefix('-').unwrap_or(t);
                if unsigned.parse::<f64>().is_ok() {
                    return Err(format!(
                        "\"{t}\" has no unit and Ollama rejects it; write a number (-1) or \"{t}s\""
                    ));
                }
                humantime::parse_duration(unsigned)
                    .map(|_| ())
                    .map_err(|e| format!("\"{t}\" is not a duration ({e})"))
            }
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

/// A listening address; the empty string means "no listener".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl ListenAddr {
    pub const fn loopback(port: u16) -> Self {
        ListenAddr(Some(SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port,
        )))
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(a) => s.collect_str(&a),
            None => s.serialize_str(""),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(ListenAddr(None));
        }
        text.parse::<SocketAddr>().map(|a| ListenAddr(Some(a))).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{text}` is not an address; write IP:PORT, e.g. \"0.0.0.0:8443\" or \"[::1]:8443\", or \"\" for none"
            ))
        })
    }
}

/// One thing wrong with the configuration: the key at fault and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Everything wrong with one configuration source.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source: Source,
    pub problems: Vec<Problem>,
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
    pub fn load(source: &Source) -> Result<Config, ConfigError> {
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
        let mut cfg: Config = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| fail(vec![problem_from_config_error(e)]))?;
        if let Source::File(path) = source {
            cfg.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        }
        let problems = cfg.validate();
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
        fix(&mut self.server.tls_cert);
        fix(&mut self.server.tls_key);
        fix(&mut self.server.pid_file);
        fix(&mut self.server.upgrade_sock);
        fix(&mut self.auth.revoked_file);
        self.auth.verify_keys.iter_mut().for_each(fix);
    }

    /// Every problem with the values (files are checked where they are loaded).
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let s = &self.server;

        if s.listen.0.is_none() && s.plain_listen.0.is_none() {
            problems.push(Problem::new(
                "server.listen",
                "no listener: set server.listen (TLS) or server.plain_listen (cleartext)",
            ));
        }
        let (cert, key) = (
            s.tls_cert.as_os_str().is_empty(),
            s.tls_key.as_os_str().is_empty(),
        );
        if cert != key {
            let missing = if cert {
                "server.tls_cert"
            } else {
                "server.tls_key"
            };
            problems.push(Problem::new(
                missing,
                "set both server.tls_cert and server.tls_key, or neither",
            ));
        }
        if let Some(addr) = s.listen.0 {
            if cert && key && !addr.ip().is_loopback() {
                problems.push(Problem::new(
                    "server.tls_cert",
                    format!(
                        "server.listen = \"{addr}\" is not loopback, so it needs a real certificate: set server.tls_cert and server.tls_key"
                    ),
                ));
            }
        }
        let listeners = [
            ("server.listen", s.listen.0),
            ("server.plain_listen", s.plain_listen.0),
            ("server.metrics_listen", s.metrics_listen.0),
        ];
        for (i, (name, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr else { continue };
            if addr.port() == 0 {
                problems.push(Problem::new(*name, "port 0 is not allowed; pick a port"));
            }
            for (other, other_addr) in &listeners[..i] {
                if other_addr.is_some_and(|o| {
                    o.port() == addr.port()
                        && (o.ip() == addr.ip()
                            || o.ip().is_unspecified()
                            || addr.ip().is_unspecified())
                }) {
                    problems.push(Problem::new(*name, format!("same port as {other}")));
                }
            }
        }
        if s.max_body.0 == 0 {
            problems.push(Problem::new("server.max_body", "must be more than 0"));
        }
        if s.max_header_size.0 < 1024 {
            problems.push(Problem::new(
                "server.max_header_size",
                "must be at least 1KiB",
            ));
        }
        for (key, d) in [
            ("server.header_timeout", s.header_timeout),
            ("server.body_timeout", s.body_timeout),
        ] {
            if d.0.is_zero() {
                problems.push(Problem::new(key, "must be more than 0"));
            }
        }
        for (key, per_ip, total, total_key) in [
            (
                "server.max_connections_per_ip",
                s.max_connections_per_ip,
                s.max_connections,
                "server.max_connections",
            ),
            (
                "server.max_requests_per_ip",
                s.max_requests_per_ip,
                s.max_requests,
                "server.max_requests",
            ),
        ] {
            if total > 0 && per_ip > total {
                problems.push(Problem::new(
                    key,
                    format!(
                        "is more than {total_key} ({total}); lower it, or set 0 for no cap per address"
                    ),
                ));
            }
        }
        if s.max_body_memory.0 > 0 && s.max_body_memory.0 < s.max_body.0 {
            problems.push(Problem::new(
                "server.max_body_memory",
                format!(
                    "is less than server.max_body ({}): a body of the largest allowed size could never be read; raise it, or set 0 for no cap",
                    s.max_body
                ),
            ));
        }
        for (key, p) in [
            ("server.pid_file", &s.pid_file),
            ("server.upgrade_sock", &s.upgrade_sock),
        ] {
            if !p.is_absolute() {
                problems.push(Problem::new(key, "must be an absolute path"));
            }
        }

        let u = &self.upstream;
        if let Err(e) = crate::upstream::UpstreamUrl::parse(&u.url) {
            problems.push(Problem::new("upstream.url", e));
        }
        for (key, d) in [
            ("upstream.connect_timeout", u.connect_timeout),
            ("upstream.read_timeout", u.read_timeout),
            ("upstream.request_timeout", u.request_timeout),
        ] {
            if d.0.is_zero() {
                problems.push(Problem::new(key, "must be more than 0"));
            }
        }

        for (i, path) in self.auth.verify_keys.iter().enumerate() {
            if path.file_stem().is_none_or(|s| s.is_empty()) {
                problems.push(Problem::new(
                    format!("auth.verify_keys[{i}]"),
                    "needs a file name: its stem is the key id",
                ));
            }
        }

        for (name, team) in &self.teams {
            let key = format!("teams.{name}");
            if !valid_team_name(name) {
                problems.push(Problem::new(
                    &key,
                    "team names are 1-64 lowercase letters, digits, '-' or '_' (so CORRAL__TEAMS__NAME__KEY can address them)",
                ));
            }
            for (i, glob) in team.models.iter().enumerate() {
                if glob.trim().is_empty()
                    || glob.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    problems.push(Problem::new(
                        format!("{key}.models[{i}]"),
                        "a model glob is a model name with optional '*', e.g. \"llama3.2:*\"",
                    ));
                }
            }
        }

        let p = &self.preload;
        for (i, m) in p.models.iter().enumerate() {
            if m.trim().is_empty() || m.contains('*') {
                problems.push(Problem::new(
                    format!("preload.models[{i}]"),
                    "a model name without '*', e.g. \"llama3.2\"",
                ));
            }
        }
        if let Err(e) = p.keep_alive.check() {
            problems.push(Problem::new("preload.keep_alive", e));
        }
        if p.watch_interval.0.is_zero() {
            problems.push(Problem::new(
                "preload.watch_interval",
                "must be more than 0",
            ));
        }

        if !valid_log_filter(&self.log.level) {
            problems.push(Problem::new(
                "log.level",
                format!(
                    "`{}` is not a level or filter; use error, warn, info, debug or trace, or e.g. \"info,corral=debug\"",
                    self.log.level
                ),
            ));
        }
        problems
    }

    /// The TOML text of this configuration (used by `corral demo` to show what it runs).
    pub fn to_toml(&self) -> String {
        toml_text(self)
    }
}

fn toml_text(cfg: &Config) -> String {
    // The `config` crate has no serializer; `serde_json` → a tiny TOML writer is enough for our
    // flat two-level structure.
    let value = serde_json::to_value(cfg).expect("config serializes");
    let mut out = String::new();
    let obj = value.as_object().expect("object");
    for (section, body) in obj {
        let Some(table) = body.as_object() else {
            continue;
        };
        if section == "teams" {
            for (team, fields) in table {
                out.push_str(&format!("[teams.{team}]\n"));
                write_fields(&mut out, fields);
                out.push('\n');
            }
        } else {
            out.push_str(&format!("[{section}]\n"));
            write_fields(&mut out, body);
            out.push('\n');
        }
    }
    out
}

fn write_fields(out: &mut String, fields: &serde_json::Value) {
    if let Some(map) = fields.as_object() {
        for (k, v) in map {
            out.push_str(&format!("{k} = {v}\n"));
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

/// Team names: 1-64 lowercase letters, digits, '-' or '_'.
pub fn valid_team_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Turns the `config` crate's error ("... for key `server.n`") into key + message.
fn problem_from_config_error(e: config::ConfigError) -> Problem {
    let text = e.to_string();
    if let Some((message, rest)) = text.rsplit_once(" for key `") {
        let key = rest.split('`').next().unwrap_or_default();
        return Problem::new(key, message);
    }
    Problem::new("", text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        Config::load(&Source::File(f.path().to_path_buf()))
    }

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
        assert_eq!(c.upstream.url, "http://ollama:11434");
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

    fn keys(e: &ConfigError) -> Vec<&str> {
        e.problems.iter().map(|p| p.key.as_str()).collect()
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

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let e = load_str("[server]\nlisten = \"127.0.0.1:8443\"\nlisen = 1\n").unwrap_err();
        assert_eq!(keys(&e), ["server"]);
        assert!(e.to_string().contains("unknown field `lisen`"), "{e}");
        let e = load_str("[teams.research]\nmodel = [\"x\"]\n").unwrap_err();
        assert_eq!(keys(&e), ["teams.research"]);
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = load_str("[upstream]\nread_timeout = \"forever\"\n").unwrap_err();
        assert_eq!(keys(&e), ["upstream.read_timeout"]);
        assert!(e.to_string().contains("\"15m\""), "{e}");
        let e = load_str("[server]\nlisten = \"localhost\"\n").unwrap_err();
        assert_eq!(keys(&e), ["server.listen"]);
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
    fn caps_must_fit_together() {
        let e = load_str(
            "[server]\nmax_connections = 10\nmax_connections_per_ip = 11\n\
             max_requests = 10\nmax_requests_per_ip = 11\n\
             max_body = \"2MiB\"\nmax_body_memory = \"1MiB\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&e),
            [
                "server.max_connections_per_ip",
                "server.max_requests_per_ip",
                "server.max_body_memory"
            ]
        );
        // 0 is no cap, and fits anything.
        load_str("[server]\nmax_requests = 0\nmax_requests_per_ip = 11\nmax_body_memory = 0\n")
            .unwrap();
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

    #[test]
    fn keep_alive_follows_ollama_rules() {
        assert!(KeepAlive::Seconds(-1.0).check().is_ok());
        assert!(KeepAlive::Text("30m".into()).check().is_ok());
        assert!(KeepAlive::Text("-1m".into()).check().is_ok());
        assert!(KeepAlive::Text("-1".into())
            .check()
            .unwrap_err()
            .contains("no unit"));
        assert_eq!(KeepAlive::Seconds(-1.0).to_json(), serde_json::json!(-1));
        assert_eq!(KeepAlive::Seconds(0.5).to_json(), serde_json::json!(0.5));
    }

    #[test]
    fn the_shipped_example_config_is_valid_toml_with_known_keys() {
        // Paths in it point at /etc; only the structure and values are checked here.
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/corral.toml"))
                .unwrap();
        let cfg: Config = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        assert_eq!(cfg.server.listen.0.unwrap().to_string(), "0.0.0.0:8443");
    }

    #[test]
    fn the_kubernetes_config_is_valid_too() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/kubernetes.toml"
        ))
        .unwrap();
        let cfg: Config = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        assert_eq!(cfg.upstream.url, "http://ollama:11434");
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
        let text = c.to_toml();
        let back: Config = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(back, c);
    }
}
