//! Pinned models: loaded when corral starts and kept loaded.
//!
//! Each `preload.models` entry is loaded with `preload.keep_alive` (default `-1`, forever):
//! embedding models through `/api/embed`, the others through `/api/generate`, as the capabilities
//! from `/api/show` say. While Ollama is not up yet corral retries with capped exponential
//! backoff. Then a watcher reads `/api/ps` every `preload.watch_interval`, loads again any pinned
//! model that is gone (Ollama restarted, the model was evicted), and keeps `corral_model_loaded`
//! true to what Ollama reports. A model that cannot be loaded (not pulled, wrong capability) is
//! reported in the log and `/readyz` and retried each interval; it never blocks the others.
//!
//! With `preload.pull_missing`, a pinned model Ollama does not have is pulled first
//! (`/api/pull`), its progress shown in `/readyz` ("pulling 42%"), the log and
//! `corral_model_pull_bytes`; a pull that fails is retried with backoff (10 s, doubling, at most
//! 10 minutes) and reported, and never stops corral or the other models.

use crate::config::PreloadConfig;
use crate::ollama::{KeepAlive, ModelName};
use crate::telemetry::metrics::Metrics;
use crate::upstream::client::{Answer, UpstreamClient};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Backoff while Ollama is unreachable: 1 s, doubling, at most 30 s.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// `/api/show` and `/api/ps` answer at once; a load may take minutes (the upstream read timeout).
const INFO_TIMEOUT: Duration = Duration::from_secs(30);

/// Backoff between pulls of a model that failed: 10 s, doubling, at most 10 minutes.
const PULL_BACKOFF_START: Duration = Duration::from_secs(10);
const PULL_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// Where a pinned model stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading,
    /// Being pulled: bytes of its layers done so far and in all (as far as announced).
    Pulling {
        completed: u64,
        total: u64,
    },
    Loaded {
        seconds: f64,
    },
    Failed(String),
}

impl ModelState {
    fn describe(&self) -> String {
        match self {
            ModelState::Loading => "loading".into(),
            ModelState::Pulling { completed, total } if *total > 0 => {
                format!("pulling {}%", completed.saturating_mul(100) / total)
            }
            ModelState::Pulling { .. } => "pulling".into(),
            ModelState::Loaded { .. } => "loaded".into(),
            ModelState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// A pull that failed, and when it is tried again.
#[derive(Debug, Clone)]
pub struct PullRetry {
    at: Instant,
    backoff: Duration,
    why: String,
}

/// Progress of one pull, from Ollama's NDJSON lines (one per layer update).
#[derive(Debug, Default)]
struct PullProgress {
    /// digest → (completed, total)
    layers: BTreeMap<String, (u64, u64)>,
    error: Option<String>,
    success: bool,
}

impl PullProgress {
    fn line(&mut self, line: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            self.error = Some(e.to_string());
        }
        if v.get("status").and_then(Value::as_str) == Some("success") {
            self.success = true;
        }
        if let (Some(digest), Some(total)) = (
            v.get("digest").and_then(Value::as_str),
            v.get("total").and_then(Value::as_u64),
        ) {
            let completed = v.get("completed").and_then(Value::as_u64).unwrap_or(0);
            self.layers
                .insert(digest.to_string(), (completed.min(total), total));
        }
    }

    /// (completed, total) over every layer announced so far.
    fn bytes(&self) -> (u64, u64) {
        self.layers
            .values()
            .fold((0, 0), |(c, t), (lc, lt)| (c + lc, t + lt))
    }
}

/// The pinned models and their states, shared with `/readyz` and the keep-alive policy.
pub struct Pins {
    /// Normalized keys (`llama3.2:latest`) of the pinned models.
    keys: HashSet<String>,
    /// Keys of other names for the pinned models (same digest in `/api/tags`, e.g. made with
    /// `/api/copy`): Ollama runs one runner per model, so `keep_alive: 0` through any of its
    /// names unloads it.
    aliases: RwLock<HashMap<String, String>>,
    states: RwLock<BTreeMap<String, ModelState>>,
    pub requires_ready: bool,
    /// The `keep_alive` pinned models are loaded with (and that `pin` writes into requests).
    pub keep_alive: Value,
    /// `keep_alive` is "forever" (a negative duration), which `/api/ps` shows as ~292 years out.
    forever: bool,
    pub pin_requests: bool,
}

impl Pins {
    pub fn new(cfg: &PreloadConfig) -> Pins {
        let names: Vec<ModelName> = cfg
            .models
            .iter()
            .filter_map(|m| ModelName::parse(m))
            .collect();
        Pins {
            keys: names.iter().map(ModelName::key).collect(),
            aliases: RwLock::default(),
            states: RwLock::new(
                names
                    .iter()
                    .map(|n| (n.to_string(), ModelState::Loading))
                    .collect(),
            ),
            requires_ready: cfg.ready_requires_preload,
            keep_alive: cfg.keep_alive.to_json(),
            forever: matches!(
                KeepAlive::from_json(Some(&cfg.keep_alive.to_json())),
                Ok(Some(KeepAlive::Forever))
            ),
            pin_requests: cfg.keep_alive_policy == crate::config::KeepAlivePolicy::Pin,
        }
    }

    pub fn is_pinned(&self, model: &ModelName) -> bool {
        let key = model.key();
        self.keys.contains(&key)
            || self
                .aliases
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key)
    }

    /// The pinned model (its key) that a model key names, directly or as another name.
    fn pinned_key(&self, key: &str) -> Option<String> {
        if self.keys.contains(key) {
            return Some(key.to_string());
        }
        let aliases = self.aliases.read().unwrap_or_else(|e| e.into_inner());
        aliases.get(key).cloned()
    }

    /// Learns the other names of the pinned models from Ollama's model list: `(name, digest)`
    /// pairs from `/api/tags`.
    pub fn set_aliases<'a>(&self, tags: impl IntoIterator<Item = (&'a str, &'a str)> + Clone) {
        let key = |name: &str| ModelName::parse(name).map(|n| n.key());
        // digest → the pinned model with it
        let pinned: HashMap<&str, String> = tags
            .clone()
            .into_iter()
            .filter_map(|(name, digest)| Some((digest, key(name)?)))
            .filter(|(_, k)| self.keys.contains(k))
            .collect();
        let aliases = tags
            .into_iter()
            .filter_map(|(name, digest)| Some((key(name)?, pinned.get(digest)?.clone())))
            .filter(|(k, _)| !self.keys.contains(k))
            .collect();
        *self.aliases.write().unwrap_or_else(|e| e.into_inner()) = aliases;
    }

    /// The `keep_alive` a request for `model` must carry instead of the client's, if any.
    pub fn keep_alive_for(&self, model: &ModelName) -> Option<&Value> {
        (self.pin_requests && self.is_pinned(model)).then_some(&self.keep_alive)
    }

    /// Ready when every pinned model is loaded (or readiness does not wait for them).
    pub fn ready(&self) -> bool {
        !self.requires_ready
            || self
                .read()
                .values()
                .all(|s| matches!(s, ModelState::Loaded { .. }))
    }

    /// Model → state, for `/readyz`.
    pub fn report(&self) -> Value {
        Value::Object(
            self.read()
                .iter()
                .map(|(m, s)| (m.clone(), Value::String(s.describe())))
                .collect(),
        )
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelState>> {
        self.states.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, model: &str, state: ModelState) {
        let mut states = self.states.write().unwrap_or_else(|e| e.into_inner());
        let old = states.insert(model.to_string(), state.clone());
        if old.as_ref() != Some(&state) {
            match &state {
                ModelState::Loaded { seconds } => {
                    tracing::info!(model, seconds, "pinned model loaded")
                }
                ModelState::Failed(why) => {
                    tracing::error!(model, reason = %why, "pinned model cannot be loaded; retrying each watch interval")
                }
                ModelState::Loading => tracing::warn!(
                    model,
                    "pinned model is not loaded in Ollama; loading it again"
                ),
                ModelState::Pulling { .. } => {}
            }
        }
    }

    fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }
}

/// Why a round of checks could not finish.
#[derive(Debug)]
enum Unreachable {
    /// Ollama does not answer at all: retry soon.
    Down(String),
}

pub struct Preloader {
    pub client: UpstreamClient,
    pub pins: Arc<Pins>,
    pub metrics: Arc<Metrics>,
    pub watch_interval: Duration,
    pub load_timeout: Duration,
    /// Pull pinned models Ollama does not have (`preload.pull_missing`).
    pub pull_missing: bool,
    /// Models whose last pull failed: when to try again, the backoff, and why it failed.
    pub pull_backoff: std::sync::Mutex<HashMap<String, PullRetry>>,
}

/// How a model is loaded, from its capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Generate,
    Embed,
}

impl Preloader {
    /// Checks `/api/ps` and loads every pinned model that is not there, or not held as pinned.
    async fn round(&self) -> Result<(), Unreachable> {
        let ps = self
            .client
            .request("GET", "/api/ps", None, INFO_TIMEOUT)
            .await
            .map_err(Unreachable::Down)?;
        let forever = self.pins.forever;
        let listed = ps
            .json()
            .and_then(|v| v["models"].as_array().cloned())
            .unwrap_or_default();
        // Ollama lists a runner under the name that loaded it, maybe another name of a pinned
        // model: that counts for the pinned model.
        let key_of = |m: &Value| {
            let key = m["name"].as_str().and_then(ModelName::parse)?.key();
            Some(self.pins.pinned_key(&key).unwrap_or(key))
        };
        let present: HashSet<String> = listed.iter().filter_map(key_of).collect();
        let held: HashSet<String> = listed
            .iter()
            .filter(|m| !forever || held_forever(m["expires_at"].as_str().unwrap_or("")))
            .filter_map(key_of)
            .collect();
        for model in self.pins.names() {
            let key = model.to_ascii_lowercase();
            let gauge = self.metrics.model_loaded.with_label_values(&[&model]);
            let was_loaded = matches!(
                self.pins.read().get(&model),
                Some(ModelState::Loaded { .. })
            );
            gauge.set(present.contains(&key) as i64);
            // Loaded by someone else (before corral started, or after Ollama restarted) with a
            // finite keep_alive, it would be evicted: corral loads it again with its own. With
            // a finite pinned keep_alive corral cannot tell, so it re-sends its own once at start.
            if held.contains(&key) && (forever || was_loaded) {
                if !was_loaded {
                    self.pins.set(&model, ModelState::Loaded { seconds: 0.0 });
                }
                continue;
            }
            if was_loaded {
                self.pins.set(&model, ModelState::Loading);
            }
            match self.load(&model).await? {
                Ok(seconds) => {
                    gauge.set(1);
                    self.metrics
                        .preload_duration
                        .with_label_values(&[&model])
                        .set(seconds);
                    self.pins.set(&model, ModelState::Loaded { seconds });
                }
                Err(why) => self.pins.set(&model, ModelState::Failed(why)),
            }
        }
        Ok(())
    }

    async fn show(&self, model: &str) -> Result<Answer, Unreachable> {
        self.client
            .request(
                "POST",
                "/api/show",
                Some(&json!({ "model": model })),
                INFO_TIMEOUT,
            )
            .await
            .map_err(Unreachable::Down)
    }

    /// Pulls a model, following its progress. Outer error: Ollama unreachable (or the download
    /// stalled past the read timeout); inner: the pull failed.
    async fn pull(&self, model: &str) -> Result<Result<(), String>, Unreachable> {
        {
            let backoff = self.pull_backoff.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(retry) = backoff.get(model).filter(|r| Instant::now() < r.at) {
                let wait = retry.at.saturating_duration_since(Instant::now());
                return Ok(Err(format!(
                    "{} (pulling again in {}s)",
                    retry.why,
                    wait.as_secs() + 1
                )));
            }
        }
        tracing::info!(model, "pinned model missing from Ollama; pulling it");
        // After a failure, /readyz keeps saying why until the new attempt makes progress.
        let retrying = matches!(self.pins.read().get(model), Some(ModelState::Failed(_)));
        if !retrying {
            self.pins.set(
                model,
                ModelState::Pulling {
                    completed: 0,
                    total: 0,
                },
            );
        }
        let gauge = |kind: &str| {
            self.metrics
                .model_pull_bytes
                .with_label_values(&[model, kind])
        };
        let mut progress = PullProgress::default();
        let mut last_logged = 0;
        let started = Instant::now();
        let status = self
            .client
            .lines(
                "POST",
                "/api/pull",
                Some(&json!({ "model": model, "stream": true })),
                self.load_timeout,
                |line| {
                    progress.line(line);
                    let (completed, total) = progress.bytes();
                    if total == 0 {
                        return;
                    }
                    gauge("completed").set(completed as i64);
                    gauge("total").set(total as i64);
                    self.pins
                        .set(model, ModelState::Pulling { completed, total });
                    let percent = completed
                        .saturating_mul(100)
                        .checked_div(total)
                        .unwrap_or(0);
                    if percent >= last_logged + 10 {
                        last_logged = percent - percent % 10;
                        tracing::info!(
                            model,
                            percent,
                            completed_bytes = completed,
                            total_bytes = total,
                            "pulling"
                        );
                    }
                },
            )
            .await;
        let outcome = match status {
            Err(e) => {
                // A pull that stalls or loses Ollama halfway is retried like a failed one.
                let why = format!("pull broke off: {e}");
                self.pins.set(model, ModelState::Loading);
                self.back_off(model, &why);
                return Err(Unreachable::Down(format!("pulling {model}: {why}")));
            }
            Ok(200) if progress.success && progress.error.is_none() => Ok(()),
            Ok(status) => Err(format!(
                "pull failed: {}",
                progress
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("/api/pull answered {status}"))
            )),
        };
        match &outcome {
            Ok(()) => {
                self.pull_backoff
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(model);
                let (_, total) = progress.bytes();
                tracing::info!(
                    model,
                    seconds = started.elapsed().as_secs_f64(),
                    total_bytes = total,
                    "pulled"
                );
            }
            Err(why) => {
                let retry_in = self.back_off(model, why);
                tracing::error!(model, reason = %why, retry_in = ?retry_in, "pinned model could not be pulled");
            }
        }
        Ok(outcome)
    }

    /// Schedules the next pull of a model after a failure; returns the wait.
    fn back_off(&self, model: &str, why: &str) -> Duration {
        let mut backoff = self.pull_backoff.lock().unwrap_or_else(|e| e.into_inner());
        let delay = backoff.get(model).map_or(PULL_BACKOFF_START, |r| {
            (r.backoff * 2).min(PULL_BACKOFF_MAX)
        });
        let retry = PullRetry {
            at: Instant::now() + delay,
            backoff: delay,
            why: why.to_string(),
        };
        backoff.insert(model.to_string(), retry);
        delay
    }

    /// Loads one model. Outer error: Ollama unreachable; inner: this model cannot be loaded.
    async fn load(&self, model: &str) -> Result<Result<f64, String>, Unreachable> {
        let mut show = self.show(model).await?;
        if show.status == 404 && self.pull_missing {
            if let Err(why) = self.pull(model).await? {
                return Ok(Err(why));
            }
            show = self.show(model).await?;
        }
        let route = match show.status {
            200 => {
                let caps: Vec<String> = show
                    .json()
                    .and_then(|v| v["capabilities"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect();
                match route_for(&caps) {
                    Some(r) => r,
                    None => {
                        return Ok(Err(format!(
                            "it can neither generate nor embed (capabilities: {})",
                            caps.join(", ")
                        )))
                    }
                }
            }
            404 => {
                return Ok(Err(format!(
                    "Ollama does not have it; pull it first (ollama pull {model}), or set preload.pull_missing"
                )))
            }
            status => {
                return Ok(Err(format!(
                    "/api/show answered {status}: {}",
                    show.error_message()
                )))
            }
        };
        let (path, body) = match route {
            Route::Generate => (
                "/api/generate",
                json!({ "model": model, "keep_alive": self.pins.keep_alive }),
            ),
            Route::Embed => (
                "/api/embed",
                json!({ "model": model, "keep_alive": self.pins.keep_alive }),
            ),
        };
        tracing::info!(model, route = path, keep_alive = %self.pins.keep_alive, "preloading");
        let started = Instant::now();
        let answer = self
            .client
            .request("POST", path, Some(&body), self.load_timeout)
            .await
            .map_err(Unreachable::Down)?;
        if answer.status == 200 {
            Ok(Ok(started.elapsed().as_secs_f64()))
        } else {
            Ok(Err(format!(
                "{path} answered {}: {}",
                answer.status,
                answer.error_message()
            )))
        }
    }
}

/// Whether an `/api/ps` `expires_at` is Ollama's "forever" (about 292 years out; its CLI prints
/// "Forever" past 20 years).
fn held_forever(expires_at: &str) -> bool {
    let year = |s: &str| s.get(..4).and_then(|y| y.parse::<u64>().ok());
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    match (year(expires_at), year(&now)) {
        (Some(at), Some(now)) => at >= now + 20,
        _ => false,
    }
}

fn route_for(capabilities: &[String]) -> Option<Route> {
    let has = |c: &str| capabilities.iter().any(|x| x == c);
    if has("completion") {
        Some(Route::Generate)
    } else if has("embedding") {
        Some(Route::Embed)
    } else {
        None
    }
}

#[async_trait]
impl BackgroundService for Preloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = BACKOFF_START;
        let mut attempt = 0u32;
        loop {
            let wait = match self.round().await {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(attempts = attempt, "Ollama answers; preloads under way");
                    }
                    backoff = BACKOFF_START;
                    attempt = 0;
                    self.watch_interval
                }
                Err(Unreachable::Down(why)) => {
                    attempt += 1;
                    for model in self.pins.names() {
                        self.metrics
                            .model_loaded
                            .with_label_values(&[&model])
                            .set(0);
                    }
                    tracing::warn!(attempt, retry_in = ?backoff, reason = %why, "Ollama not reachable for preloading");
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeepAlive, KeepAlivePolicy};

    fn pins(policy: KeepAlivePolicy) -> Pins {
        Pins::new(&PreloadConfig {
            models: vec!["llama3.2".into(), "nomic-embed-text".into()],
            keep_alive: KeepAlive::Seconds(-1.0),
            keep_alive_policy: policy,
            ..Default::default()
        })
    }

    #[test]
    fn pinned_models_get_the_pinned_keep_alive_under_pin_only() {
        let p = pins(KeepAlivePolicy::Pin);
        assert_eq!(
            p.keep_alive_for(&ModelName::parse("llama3.2:latest").unwrap()),
            Some(&json!(-1))
        );
        assert_eq!(
            p.keep_alive_for(&ModelName::parse("LLAMA3.2").unwrap()),
            Some(&json!(-1))
        );
        assert_eq!(
            p.keep_alive_for(&ModelName::parse("llama3.2:1b").unwrap()),
            None,
            "other tags are not pinned"
        );
        let p = pins(KeepAlivePolicy::Pass);
        assert_eq!(
            p.keep_alive_for(&ModelName::parse("llama3.2").unwrap()),
            None
        );
    }

    #[test]
    fn other_names_of_a_pinned_model_are_pinned_too() {
        let p = pins(KeepAlivePolicy::Pin);
        let alias = ModelName::parse("Team-Llama").unwrap();
        assert_eq!(p.keep_alive_for(&alias), None);
        let tags = [
            ("llama3.2:latest", "d1"),
            ("team-llama:latest", "d1"),
            ("llama3.2:1b", "d2"),
            ("nomic-embed-text:latest", "d3"),
        ];
        p.set_aliases(tags.iter().copied());
        assert_eq!(p.keep_alive_for(&alias), Some(&json!(-1)));
        assert_eq!(
            p.keep_alive_for(&ModelName::parse("llama3.2:1b").unwrap()),
            None,
            "another model of the family is not"
        );
        // The alias is gone from Ollama: no longer pinned.
        p.set_aliases(tags[..1].iter().copied());
        assert_eq!(p.keep_alive_for(&alias), None);
    }

    #[test]
    fn ready_once_every_pin_is_loaded() {
        let p = pins(KeepAlivePolicy::Pin);
        assert!(!p.ready());
        p.set("llama3.2:latest", ModelState::Loaded { seconds: 1.0 });
        assert!(!p.ready());
        p.set("nomic-embed-text:latest", ModelState::Failed("x".into()));
        assert!(!p.ready());
        assert_eq!(p.report()["nomic-embed-text:latest"], "failed: x");
        p.set(
            "nomic-embed-text:latest",
            ModelState::Loaded { seconds: 0.5 },
        );
        assert!(p.ready());
        let relaxed = Pins {
            requires_ready: false,
            ..pins(KeepAlivePolicy::Pin)
        };
        assert!(relaxed.ready());
    }

    #[test]
    fn forever_is_two_decades_out_or_more() {
        use std::time::SystemTime;
        assert!(held_forever("2318-03-04T12:00:00.123456789-07:00"));
        assert!(!held_forever(
            &humantime::format_rfc3339_nanos(SystemTime::now() + Duration::from_secs(300))
                .to_string()
        ));
        assert!(!held_forever(""));
        assert!(!held_forever("0001-01-01T00:00:00Z"));
    }

    #[test]
    fn capabilities_choose_the_route() {
        let caps = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            route_for(&caps(&["completion", "tools"])),
            Some(Route::Generate)
        );
        assert_eq!(route_for(&caps(&["embedding"])), Some(Route::Embed));
        assert_eq!(route_for(&caps(&["vision"])), None);
    }
}
