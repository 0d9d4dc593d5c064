//! Pinned models: loaded when corral starts and kept loaded, on each node meant to hold them.
//!
//! One preloader per node. Each `preload.models` entry is loaded with `preload.keep_alive`
//! (default `-1`, forever), by the route its capabilities call for ([`show`](super::show)), on
//! the nodes whose `models` list it when any node has a placement, else on every node that has
//! it (in a pool, a node that lacks it leaves it to the others). While Ollama is not up yet corral
//! retries with capped exponential backoff. Then a watcher reads `/api/ps` every
//! `preload.watch_interval`, loads again any pinned model that is gone (Ollama restarted, the
//! model was evicted), and keeps `corral_model_loaded` true to what Ollama reports. A model that
//! cannot be loaded (not pulled, wrong capability) is reported in the log and `/readyz` and
//! retried each interval; it never blocks the others. With `preload.pull_missing` a missing one
//! is pulled first, in a task of its own ([`pull`](super::pull)).

use crate::telemetry::metrics::Metrics;
use crate::upstream::client::UpstreamClient;
use crate::upstream::node::Node;
use crate::upstream::pins::{ModelState, Pins};
use crate::upstream::pull::{self, Pulls, Start};
use crate::upstream::show::{self, Shown};
use crate::upstream::Pool;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Backoff while Ollama is unreachable: 1 s, doubling, at most 30 s.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// `/api/ps` answers at once; a load may take minutes (the upstream read timeout).
const PS_TIMEOUT: Duration = Duration::from_secs(30);

/// Ollama does not answer at all: the round stops, and is retried soon.
#[derive(Debug)]
struct Unreachable(String);

/// What became of one model in a round.
enum Loaded {
    Yes,
    No,
    /// A pull is under way; its task reports.
    Pulling,
}

/// What the preloader and its pull tasks share.
struct Shared {
    node: Arc<Node>,
    pool: Arc<Pool>,
    pins: Arc<Pins>,
    metrics: Arc<Metrics>,
    load_timeout: Duration,
    pull_missing: bool,
    pulls: Pulls,
    /// Models being loaded now: a pull's own load and the watcher's round never both load one.
    loading: std::sync::Mutex<HashSet<String>>,
}

/// A model's place in [`Shared::loading`], given back when the load ends (or is dropped).
struct Loading<'a>(&'a Shared, String);

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        self.0
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

pub(crate) struct Preloader {
    shared: Arc<Shared>,
    client: UpstreamClient,
    watch_interval: Duration,
    /// Pulls under way: they end with the preloader (a node that leaves the pool).
    pull_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Preloader {
    fn drop(&mut self) {
        let tasks = self.pull_tasks.lock().unwrap_or_else(|e| e.into_inner());
        for task in tasks.iter() {
            task.abort();
        }
    }
}

impl Preloader {
    pub(crate) fn new(
        node: Arc<Node>,
        pool: Arc<Pool>,
        pins: Arc<Pins>,
        metrics: Arc<Metrics>,
        cfg: &crate::config::PreloadConfig,
    ) -> Preloader {
        Preloader {
            client: UpstreamClient::new(node.upstream.clone()),
            shared: Arc::new(Shared {
                load_timeout: node.upstream.read_timeout,
                node,
                pool,
                pins,
                metrics,
                pull_missing: cfg.pull_missing,
                pulls: Pulls::default(),
                loading: std::sync::Mutex::default(),
            }),
            watch_interval: cfg.watch_interval.0,
            pull_tasks: std::sync::Mutex::default(),
        }
    }

    /// Checks `/api/ps` and loads every pinned model that is not there, or not held as pinned.
    async fn round(&self) -> Result<(), Unreachable> {
        let pins = &self.shared.pins;
        let ps = self
            .client
            .request("GET", "/api/ps", None, PS_TIMEOUT)
            .await
            .map_err(Unreachable)?;
        let listed = ps
            .json()
            .and_then(|v| v["models"].as_array().cloned())
            .unwrap_or_default();
        // Ollama lists a runner under the name that loaded it, maybe another name of a pinned
        // model: that counts for the pinned model.
        let key_of = |m: &Value| {
            let key = m["name"]
                .as_str()
                .and_then(crate::ollama::ModelName::parse)?
                .key();
            Some(pins.pinned_key(&key).unwrap_or(key))
        };
        let present: HashSet<String> = listed.iter().filter_map(key_of).collect();
        let held: HashSet<String> = listed
            .iter()
            .filter(|m| !pins.forever || held_forever(m["expires_at"].as_str().unwrap_or("")))
            .filter_map(key_of)
            .collect();
        let node = self.shared.node.name.as_str();
        for model in pins.names(node) {
            let key = model.to_ascii_lowercase();
            let gauge = self
                .shared
                .metrics
                .model_loaded
                .with_label_values(&[node, &model]);
            let state = pins.get(node, &model);
            let was_loaded = matches!(state, Some(ModelState::Loaded { .. }));
            // A node that leaves the model to others exports no series for it (it is not
            // "not loaded" there, it is not meant to be there).
            if present.contains(&key) || state != Some(ModelState::Absent) {
                gauge.set(present.contains(&key) as i64);
            }
            // Loaded by someone else (before corral started, or after Ollama restarted) with a
            // finite keep_alive, it would be evicted: corral loads it again with its own. With
            // a finite pinned keep_alive corral cannot tell, so it re-sends its own once at start.
            if held.contains(&key) && (pins.forever || was_loaded) {
                if !was_loaded {
                    pins.set(node, &model, ModelState::Loaded { seconds: 0.0 });
                }
                continue;
            }
            if was_loaded {
                pins.set(node, &model, ModelState::Loading);
            }
            match self.shared.load(&self.client, &model).await? {
                Loaded::Yes => gauge.set(1),
                Loaded::No => {}
                Loaded::Pulling => self.start_pull(&model),
            }
        }
        Ok(())
    }

    /// Pulls `model` in a task of its own, then loads it.
    fn start_pull(&self, model: &str) {
        let shared = self.shared.clone();
        let model = model.to_string();
        let mut tasks = self.pull_tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(async move {
            let client = UpstreamClient::new(shared.node.upstream.clone());
            let node = shared.node.name.as_str();
            let pulled = pull::pull(
                &client,
                (&shared.pins, node),
                &shared.metrics,
                &model,
                shared.load_timeout,
            )
            .await;
            match shared.pulls.finish(&model, &pulled) {
                None => {
                    // Loaded now rather than at the next round; if Ollama went away meanwhile,
                    // the next round will.
                    let _ = shared.load(&client, &model).await;
                }
                Some(retry_in) => {
                    let why = pulled.err().unwrap_or_default();
                    tracing::error!(model, node, reason = %why, retry_in = ?retry_in, "pinned model could not be pulled");
                    shared.pins.set(node, &model, ModelState::Failed(why));
                }
            }
        }));
    }
}

impl Shared {
    /// Loads one model, recording the outcome in the pins. `Loaded::Pulling`: Ollama lacks it
    /// and a pull may start (the caller starts it).
    async fn load(&self, client: &UpstreamClient, model: &str) -> Result<Loaded, Unreachable> {
        // Someone else is loading it (a pull that just ended, while the watcher's round runs):
        // its outcome is recorded by that load.
        let fresh = self
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(model.to_string());
        if !fresh {
            return Ok(Loaded::No);
        }
        let _loading = Loading(self, model.to_string());
        let route = match show::show(client, model).await.map_err(Unreachable)? {
            Shown::Loadable(route) => route,
            Shown::Missing if self.left_to_others(model) => {
                let node = self.node.name.as_str();
                self.pins.set(node, model, ModelState::Absent);
                let _ = self
                    .metrics
                    .model_loaded
                    .remove_label_values(&[node, model]);
                return Ok(Loaded::No);
            }
            Shown::Missing if self.pull_missing => {
                return Ok(match self.pulls.start(model) {
                    Start::Now => Loaded::Pulling,
                    // Its task reports; the state says how far it is.
                    Start::Running => Loaded::No,
                    Start::Waiting(why) => self.failed(model, why),
                });
            }
            Shown::Missing => {
                let why = format!(
                    "Ollama does not have it; pull it first (ollama pull {model}), or set preload.pull_missing"
                );
                return Ok(self.failed(model, why));
            }
            Shown::NotLoadable(why) | Shown::Refused(why) => return Ok(self.failed(model, why)),
        };
        let keep_alive = &self.pins.keep_alive;
        let path = route.path();
        let node = self.node.name.as_str();
        tracing::info!(model, node, route = path, keep_alive = %keep_alive, "preloading");
        let started = Instant::now();
        let answer = client
            .request(
                "POST",
                path,
                Some(&show::load_body(model, keep_alive)),
                self.load_timeout,
            )
            .await
            .map_err(Unreachable)?;
        if answer.status != 200 {
            let why = format!(
                "{path} answered {}: {}",
                answer.status,
                answer.error_message()
            );
            return Ok(self.failed(model, why));
        }
        let seconds = started.elapsed().as_secs_f64();
        self.metrics
            .preload_duration
            .with_label_values(&[node, model])
            .set(seconds);
        self.metrics
            .model_loaded
            .with_label_values(&[node, model])
            .set(1);
        self.pins.set(node, model, ModelState::Loaded { seconds });
        Ok(Loaded::Yes)
    }

    fn failed(&self, model: &str, why: String) -> Loaded {
        self.pins
            .set(&self.node.name, model, ModelState::Failed(why));
        Loaded::No
    }

    /// In a pool without a placement, a node that lacks a pinned model leaves it to the nodes
    /// that have it. When none has it, the first node that is up pulls it (with
    /// `preload.pull_missing`) and the others wait for it; without `pull_missing` every node
    /// reports it missing.
    fn left_to_others(&self, model: &str) -> bool {
        let nodes = self.pool.nodes();
        if !self.pool.is_pool() || nodes.iter().any(|n| !n.placement.is_empty()) {
            return false;
        }
        let key = crate::ollama::ModelName::parse(model).map(|m| m.key());
        // A node whose list is not read yet may have it.
        let listed = |n: &Node| {
            n.tags().is_none_or(|tags| {
                tags.iter().any(|t| {
                    t["name"]
                        .as_str()
                        .and_then(crate::ollama::ModelName::parse)
                        .map(|m| m.key())
                        == key
                })
            })
        };
        let others_have = nodes
            .iter()
            .any(|n| n.name != self.node.name && n.is_up() && listed(n));
        let first_up = nodes.iter().find(|n| n.is_up()).map(|n| n.name.as_str());
        others_have || (self.pull_missing && first_up != Some(self.node.name.as_str()))
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
                Err(Unreachable(why)) => {
                    attempt += 1;
                    let node = self.shared.node.name.as_str();
                    for model in self.shared.pins.names(node) {
                        self.shared
                            .metrics
                            .model_loaded
                            .with_label_values(&[node, &model])
                            .set(0);
                    }
                    tracing::warn!(node, attempt, retry_in = ?backoff, reason = %why, "Ollama not reachable for preloading");
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    wait
                }
            };
            if !crate::clock::pause(wait, &mut shutdown).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
