//! The pinned models (`preload.models`) and where each stands on each node, shared by the
//! preloaders (one per node, which load them), `/readyz` (which reports them) and the request
//! path (whose keep-alive policy protects them).

use crate::config::PreloadConfig;
use crate::ollama::{KeepAlive, ModelName};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::RwLock;

/// Where a pinned model stands.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ModelState {
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
    /// The node does not have it and is not meant to (another node of the pool holds it).
    Absent,
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
            ModelState::Absent => "not on this node".into(),
        }
    }
}

/// The pinned models and their states, shared with `/readyz` and the keep-alive policy.
pub(crate) struct Pins {
    /// Normalized keys (`llama3.2:latest`) of the pinned models.
    keys: HashSet<String>,
    /// Keys of other names for the pinned models (same digest in `/api/tags`, e.g. made with
    /// `/api/copy`): Ollama runs one runner per model, so `keep_alive: 0` through any of its
    /// names unloads it.
    aliases: RwLock<HashMap<String, String>>,
    /// Model → node → state, for the nodes meant to hold it.
    states: RwLock<BTreeMap<String, BTreeMap<String, ModelState>>>,
    /// A pool: `/readyz` says which node holds what.
    pool: bool,
    /// Some node has a placement: a model is held only by the nodes that list it.
    placed: bool,
    pub(crate) requires_ready: bool,
    /// The `keep_alive` pinned models are loaded with (and that `pin` writes into requests).
    pub(crate) keep_alive: Value,
    /// `keep_alive` is "forever" (a negative duration), which `/api/ps` shows as ~292 years out.
    pub(super) forever: bool,
    pub(crate) pin_requests: bool,
}

impl Pins {
    /// The pins of `cfg` on `nodes` (name and placement: the model keys a node should hold). With
    /// a placement on any node, a model is held by the nodes that list it; without, by every node
    /// that has it.
    /// `pool`: report by node (more than one node, or nodes found in DNS).
    pub(crate) fn new(
        cfg: &PreloadConfig,
        nodes: &[(String, HashSet<String>)],
        pool: bool,
    ) -> Pins {
        let names: Vec<ModelName> = cfg
            .models
            .iter()
            .filter_map(|m| ModelName::parse(m))
            .collect();
        let placed = nodes.iter().any(|(_, p)| !p.is_empty());
        let states = names
            .iter()
            .map(|n| {
                let holders = nodes
                    .iter()
                    .filter(|(_, p)| !placed || p.contains(&n.key()))
                    .map(|(node, _)| (node.clone(), ModelState::Loading))
                    .collect();
                (n.to_string(), holders)
            })
            .collect();
        Pins {
            keys: names.iter().map(ModelName::key).collect(),
            aliases: RwLock::default(),
            states: RwLock::new(states),
            pool,
            placed,
            requires_ready: cfg.ready_requires_preload,
            keep_alive: cfg.keep_alive.to_json(),
            forever: cfg.keep_alive == KeepAlive::Forever,
            pin_requests: cfg.keep_alive_policy == crate::config::KeepAlivePolicy::Pin,
        }
    }

    pub(crate) fn is_pinned(&self, model: &ModelName) -> bool {
        let key = model.key();
        self.keys.contains(&key)
            || self
                .aliases
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key)
    }

    /// The pinned model (its key) that a model key names, directly or as another name.
    pub(super) fn pinned_key(&self, key: &str) -> Option<String> {
        if self.keys.contains(key) {
            return Some(key.to_string());
        }
        let aliases = self.aliases.read().unwrap_or_else(|e| e.into_inner());
        aliases.get(key).cloned()
    }

    /// Learns the other names of the pinned models from Ollama's model list: `(name, digest)`
    /// pairs from `/api/tags`.
    pub(crate) fn set_aliases<'a>(
        &self,
        tags: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    ) {
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
    pub(crate) fn keep_alive_for(&self, model: &ModelName) -> Option<&Value> {
        (self.pin_requests && self.is_pinned(model)).then_some(&self.keep_alive)
    }

    /// Ready when every pinned model is loaded on at least one node that is up (or readiness
    /// does not wait for them).
    pub(crate) fn ready(&self, up: impl Fn(&str) -> bool) -> bool {
        !self.requires_ready
            || self.read().values().all(|nodes| {
                nodes
                    .iter()
                    .any(|(node, s)| matches!(s, ModelState::Loaded { .. }) && up(node))
            })
    }

    /// Model → state (in a pool: model → node → state), for `/readyz`.
    pub(crate) fn report(&self) -> Value {
        let describe = |nodes: &BTreeMap<String, ModelState>| {
            if self.pool {
                Value::Object(
                    nodes
                        .iter()
                        .map(|(n, s)| (n.clone(), Value::String(s.describe())))
                        .collect(),
                )
            } else {
                let state = nodes.values().next().map(ModelState::describe);
                Value::String(state.unwrap_or_default())
            }
        };
        Value::Object(
            self.read()
                .iter()
                .map(|(m, nodes)| (m.clone(), describe(nodes)))
                .collect(),
        )
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<String, ModelState>>> {
        self.states.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `model` stands on `node`.
    pub(super) fn get(&self, node: &str, model: &str) -> Option<ModelState> {
        self.read().get(model)?.get(node).cloned()
    }

    pub(super) fn set(&self, node: &str, model: &str, state: ModelState) {
        let mut states = self.states.write().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = states.get_mut(model).and_then(|nodes| nodes.get_mut(node)) else {
            return;
        };
        if *slot == state {
            return;
        }
        *slot = state.clone();
        match &state {
            ModelState::Loaded { seconds } => {
                tracing::info!(model, node, seconds, "pinned model loaded")
            }
            ModelState::Failed(why) => {
                tracing::error!(model, node, reason = %why, "pinned model cannot be loaded; retrying")
            }
            ModelState::Loading => tracing::warn!(
                model,
                node,
                "pinned model is not loaded in Ollama; loading it again"
            ),
            ModelState::Absent => {
                tracing::info!(
                    model,
                    node,
                    "pinned model is held by other nodes, not this one"
                )
            }
            ModelState::Pulling { .. } => {}
        }
    }

    /// A node joined the pool (found in DNS): it may hold every pinned model (a discovered
    /// node has no placement).
    pub(crate) fn add_node(&self, node: &str, placement: &HashSet<String>) {
        let mut states = self.states.write().unwrap_or_else(|e| e.into_inner());
        for (model, nodes) in states.iter_mut() {
            let key = model.to_ascii_lowercase();
            if !self.placed || placement.contains(&key) {
                nodes.entry(node.to_string()).or_insert(ModelState::Loading);
            }
        }
    }

    /// A node left the pool.
    pub(crate) fn remove_node(&self, node: &str) {
        let mut states = self.states.write().unwrap_or_else(|e| e.into_inner());
        for nodes in states.values_mut() {
            nodes.remove(node);
        }
    }

    /// The pinned models `node` is meant to hold (or may, without a placement).
    pub(super) fn names(&self, node: &str) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(m, _)| m.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeepAlivePolicy;
    use serde_json::json;

    fn pins(policy: KeepAlivePolicy) -> Pins {
        Pins::new(
            &PreloadConfig {
                models: vec!["llama3.2".into(), "nomic-embed-text".into()],
                keep_alive: KeepAlive::Forever,
                keep_alive_policy: policy,
                ..Default::default()
            },
            &[("default".into(), HashSet::new())],
            false,
        )
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
        let up = |_: &str| true;
        assert!(!p.ready(up));
        p.set(
            "default",
            "llama3.2:latest",
            ModelState::Loaded { seconds: 1.0 },
        );
        assert!(!p.ready(up));
        p.set(
            "default",
            "nomic-embed-text:latest",
            ModelState::Failed("x".into()),
        );
        assert!(!p.ready(up));
        assert_eq!(p.report()["nomic-embed-text:latest"], "failed: x");
        p.set(
            "default",
            "nomic-embed-text:latest",
            ModelState::Loaded { seconds: 0.5 },
        );
        assert!(p.ready(up));
        assert!(!p.ready(|_| false), "loaded on a node that is down");
        let relaxed = Pins {
            requires_ready: false,
            ..pins(KeepAlivePolicy::Pin)
        };
        assert!(relaxed.ready(up));
    }

    #[test]
    fn in_a_pool_a_placement_decides_who_holds_what_and_one_healthy_holder_is_enough() {
        let cfg = PreloadConfig {
            models: vec!["llama3.2".into(), "nomic-embed-text".into()],
            ..Default::default()
        };
        let nodes = [
            (
                "a".to_string(),
                HashSet::from(["llama3.2:latest".to_string()]),
            ),
            (
                "b".to_string(),
                HashSet::from([
                    "llama3.2:latest".to_string(),
                    "nomic-embed-text:latest".to_string(),
                ]),
            ),
        ];
        let p = Pins::new(&cfg, &nodes, true);
        assert_eq!(p.names("a"), ["llama3.2:latest"]);
        assert_eq!(p.names("b"), ["llama3.2:latest", "nomic-embed-text:latest"]);
        p.set("a", "llama3.2:latest", ModelState::Loaded { seconds: 1.0 });
        p.set(
            "b",
            "nomic-embed-text:latest",
            ModelState::Loaded { seconds: 1.0 },
        );
        assert!(p.ready(|_| true), "llama3.2 on a is enough");
        assert!(!p.ready(|n| n != "a"), "not once a is down");
        assert_eq!(p.report()["llama3.2:latest"]["a"], "loaded");
        assert_eq!(p.report()["llama3.2:latest"]["b"], "loading");
        // Without a placement every node may hold every model.
        let open = Pins::new(
            &cfg,
            &[("a".into(), HashSet::new()), ("b".into(), HashSet::new())],
            true,
        );
        assert_eq!(open.names("a").len(), 2);
        // A node found in DNS joins, then leaves.
        open.add_node("10-0-0-3", &HashSet::new());
        assert_eq!(open.names("10-0-0-3").len(), 2);
        assert_eq!(open.report()["llama3.2:latest"]["10-0-0-3"], "loading");
        open.remove_node("10-0-0-3");
        assert!(open.names("10-0-0-3").is_empty());
        assert!(p.names("c").is_empty());
        p.add_node("c", &HashSet::new());
        assert!(
            p.names("c").is_empty(),
            "a placement leaves a node without one nothing"
        );
    }
}
