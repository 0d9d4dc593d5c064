//! The double's model store: what is "pulled" (`/api/tags`) and what is "loaded" (`/api/ps`),
//! with Ollama's keep-alive timer semantics (the timer starts when the last request on a model
//! ends; a request's `keep_alive` replaces the model's duration; `0` unloads when idle).

use crate::ollama::{KeepAlive, ModelName};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

/// Ollama's default keep-alive (`OLLAMA_KEEP_ALIVE` unset).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(5 * 60);

/// One model the double can serve.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Normalized name (`llama3.2:latest`).
    pub(crate) name: String,
    /// The manifest digest `/api/tags` reports. `/api/copy` keeps it: the copy is another name
    /// for the same model, and Ollama runs one runner per model, whatever name loaded it.
    pub(crate) digest: String,
    /// `completion`, `tools`, `embedding`, `thinking`, `vision`, ...
    pub(crate) capabilities: Vec<String>,
    pub(crate) family: String,
    pub(crate) parameter_size: String,
    pub(crate) quantization: String,
    pub(crate) size: u64,
    /// How long a cold load takes.
    pub(crate) load_time: Duration,
    pub(crate) context_length: u64,
    pub(crate) embedding_length: usize,
    pub(crate) modified_at: SystemTime,
    /// Streams break off after this many tokens with an in-band error, as when Ollama's runner
    /// crashes mid-generation.
    pub(crate) fail_after: Option<usize>,
    /// The runner cannot start: every run answers 500 with Ollama's message (which names files
    /// on the server), as when a model does not fit in memory.
    pub(crate) load_error: Option<String>,
}

impl ModelSpec {
    fn base(name: &str, capabilities: &[&str]) -> ModelSpec {
        let name = ModelName::parse(name)
            .map(|n| n.to_string())
            .unwrap_or_else(|| name.to_string());
        ModelSpec {
            family: name
                .split([':', '.', '-'])
                .next()
                .unwrap_or("llama")
                .to_string(),
            digest: Sha256::digest(name.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            name,
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            parameter_size: "3.2B".into(),
            quantization: "Q4_K_M".into(),
            size: 2_019_393_189,
            load_time: Duration::from_millis(50),
            context_length: 4096,
            embedding_length: 8,
            modified_at: SystemTime::now(),
            fail_after: None,
            load_error: None,
        }
    }

    /// A chat/completion model.
    pub fn chat(name: &str) -> ModelSpec {
        Self::base(name, &["completion", "tools"])
    }

    /// An embedding-only model.
    pub fn embedding(name: &str) -> ModelSpec {
        let mut m = Self::base(name, &["embedding"]);
        m.parameter_size = "137M".into();
        m.quantization = "F16".into();
        m.size = 274_302_450;
        m
    }

    pub(crate) fn with_load_time(mut self, d: Duration) -> ModelSpec {
        self.load_time = d;
        self
    }

    /// A model whose runner fails to start (500, Ollama's message with server paths).
    pub fn failing_to_load(mut self) -> ModelSpec {
        self.load_error = Some(format!(
            "llama runner process has terminated: error loading model: /usr/share/ollama/.ollama/models/blobs/sha256-{}: cudaMalloc failed: out of memory",
            self.digest
        ));
        self
    }

    /// A model whose streams break off after `tokens` tokens.
    pub fn failing_after(mut self, tokens: usize) -> ModelSpec {
        self.fail_after = Some(tokens);
        self
    }

    pub(crate) fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    pub(crate) fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        })
    }
}

/// A loaded model (a runner).
#[derive(Clone, Debug)]
struct Loaded {
    /// The name it was loaded under (what `/api/ps` shows).
    name: String,
    ready_at: Instant,
    keep_alive: KeepAlive,
    in_flight: u32,
    idle_since: Option<Instant>,
}

impl Loaded {
    fn expired(&self, now: Instant) -> bool {
        match (self.keep_alive, self.idle_since) {
            (_, None) | (KeepAlive::Forever, _) => false,
            (KeepAlive::For(d), Some(idle)) => now >= idle + d,
        }
    }
}

/// What `/api/ps` reports for one model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedModel {
    pub name: String,
    pub keep_alive: KeepAlive,
    /// `None` while requests are running on it, or when it is kept forever.
    pub(crate) expires_in: Option<Duration>,
}

#[derive(Default)]
pub(crate) struct Store {
    catalog: Vec<ModelSpec>,
    /// Runners by model digest.
    loaded: HashMap<String, Loaded>,
}

impl Store {
    pub(crate) fn new(catalog: Vec<ModelSpec>) -> Store {
        Store {
            catalog,
            loaded: HashMap::new(),
        }
    }

    /// Finds a pulled model by any name Ollama accepts for it (case-insensitive).
    pub(crate) fn find(&self, name: &str) -> Option<&ModelSpec> {
        let key = ModelName::parse(name)?.key();
        self.catalog
            .iter()
            .find(|m| m.name.to_ascii_lowercase() == key)
    }

    pub(crate) fn catalog(&self) -> &[ModelSpec] {
        &self.catalog
    }

    pub(crate) fn add(&mut self, spec: ModelSpec) {
        self.remove(&spec.name.clone());
        self.catalog.insert(0, spec);
    }

    pub(crate) fn remove(&mut self, name: &str) -> bool {
        let Some(key) = ModelName::parse(name).map(|n| n.key()) else {
            return false;
        };
        let before = self.catalog.len();
        self.catalog.retain(|m| m.name.to_ascii_lowercase() != key);
        let catalog = &self.catalog;
        self.loaded
            .retain(|digest, _| catalog.iter().any(|m| m.digest == *digest));
        before != self.catalog.len()
    }

    /// Starts a request on a model: loads it if needed and returns when it will be ready.
    /// `keep_alive` (if the request had one) replaces the model's duration.
    pub(crate) fn begin(
        &mut self,
        spec: &ModelSpec,
        keep_alive: Option<KeepAlive>,
        now: Instant,
    ) -> Instant {
        let key = spec.digest.clone();
        let fresh = || Loaded {
            name: spec.name.clone(),
            ready_at: now + spec.load_time,
            keep_alive: KeepAlive::For(DEFAULT_KEEP_ALIVE),
            in_flight: 0,
            idle_since: None,
        };
        let entry = self.loaded.entry(key).or_insert_with(fresh);
        if entry.expired(now) {
            *entry = fresh();
        }
        if let Some(k) = keep_alive {
            entry.keep_alive = k;
        }
        entry.in_flight += 1;
        entry.idle_since = None;
        entry.ready_at
    }

    /// Ends a request on a model (by digest); the keep-alive timer starts when the last one ends.
    pub(crate) fn end(&mut self, digest: &str, now: Instant) {
        if let Some(l) = self.loaded.get_mut(digest) {
            l.in_flight = l.in_flight.saturating_sub(1);
            if l.in_flight == 0 {
                l.idle_since = Some(now);
            }
        }
        self.expire(now);
    }

    /// `keep_alive: 0` with no prompt (by digest, so through any name of the model): expire
    /// without loading (at once if idle).
    pub(crate) fn unload(&mut self, digest: &str, now: Instant) {
        if let Some(l) = self.loaded.get_mut(digest) {
            l.keep_alive = KeepAlive::For(Duration::ZERO);
            if l.in_flight == 0 {
                l.idle_since = Some(now);
            }
        }
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        self.loaded.retain(|_, l| !l.expired(now));
    }

    /// Models loaded and ready, latest expiry first (as `/api/ps` sorts them).
    pub(crate) fn loaded(&mut self, now: Instant) -> Vec<(ModelSpec, LoadedModel)> {
        self.expire(now);
        let mut out: Vec<(ModelSpec, LoadedModel)> = self
            .loaded
            .iter()
            .filter(|(_, l)| l.ready_at <= now)
            .filter_map(|(digest, l)| {
                let mut spec = self
                    .catalog
                    .iter()
                    .filter(|m| m.digest == *digest)
                    .max_by_key(|m| m.name == l.name)?
                    .clone();
                spec.name = l.name.clone();
                let expires_in = match (l.keep_alive, l.idle_since) {
                    (KeepAlive::For(d), Some(idle)) => {
                        Some((idle + d).saturating_duration_since(now))
                    }
                    _ => None,
                };
                let name = spec.name.clone();
                Some((
                    spec,
                    LoadedModel {
                        name,
                        keep_alive: l.keep_alive,
                        expires_in,
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(_, l)| std::cmp::Reverse(l.expires_in.unwrap_or(Duration::MAX)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_timer_starts_when_the_last_request_ends() {
        let spec = ModelSpec::chat("llama3.2").with_load_time(Duration::from_secs(2));
        let mut s = Store::new(vec![spec.clone()]);
        let t0 = Instant::now();
        let ready = s.begin(&spec, Some(KeepAlive::For(Duration::from_secs(10))), t0);
        assert_eq!(ready, t0 + Duration::from_secs(2));
        assert!(s.loaded(t0).is_empty(), "not listed while loading");
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(s.loaded(t1)[0].1.expires_in, None, "busy: no expiry");
        s.end(&spec.digest, t1);
        assert_eq!(s.loaded(t1)[0].1.expires_in, Some(Duration::from_secs(10)));
        assert!(s.loaded(t1 + Duration::from_secs(11)).is_empty());
    }

    #[test]
    fn forever_stays_and_zero_unloads() {
        let spec = ModelSpec::chat("llama3.2");
        let mut s = Store::new(vec![spec.clone()]);
        let t0 = Instant::now();
        s.begin(&spec, Some(KeepAlive::Forever), t0);
        s.end(&spec.digest, t0);
        let far = t0 + Duration::from_secs(1_000_000);
        assert_eq!(s.loaded(far).len(), 1);
        // A later request without keep_alive keeps "forever".
        s.begin(&spec, None, far);
        s.end(&spec.digest, far);
        assert_eq!(s.loaded(far)[0].1.keep_alive, KeepAlive::Forever);
        s.unload(&spec.digest, far);
        assert!(s.loaded(far).is_empty());
    }

    #[test]
    fn a_copy_is_another_name_for_the_same_runner() {
        let spec = ModelSpec::chat("llama3.2").with_load_time(Duration::ZERO);
        let mut s = Store::new(vec![spec.clone()]);
        let mut alias = spec.clone();
        alias.name = "team-llama:latest".into();
        s.add(alias.clone());
        let t0 = Instant::now();
        s.begin(&spec, Some(KeepAlive::Forever), t0);
        s.end(&spec.digest, t0);
        let loaded = s.loaded(t0);
        assert_eq!(loaded.len(), 1, "one runner");
        assert_eq!(loaded[0].1.name, "llama3.2:latest");
        // Unloading through the other name unloads it.
        s.unload(&alias.digest, t0);
        assert!(s.loaded(t0).is_empty());
    }

    #[test]
    fn names_resolve_like_ollama() {
        let s = Store::new(vec![
            ModelSpec::chat("llama3.2"),
            ModelSpec::embedding("nomic-embed-text"),
        ]);
        assert!(s.find("llama3.2").is_some());
        assert!(s.find("LLAMA3.2:latest").is_some());
        assert!(s.find("library/llama3.2").is_some());
        assert!(s.find("llama3.2:1b").is_none());
        assert!(s.find("nomic-embed-text").unwrap().has("embedding"));
    }
}
