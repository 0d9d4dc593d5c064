//! One Ollama server of the pool: its address, its slots, and what corral knows of it (health,
//! the models it has and has loaded, requests in flight), kept current by its probe and by the
//! requests that go through it.

use super::choose::{Has, NodeView};
use super::Upstream;
use crate::telemetry::metrics::{Metrics, NodeSeries};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// Consecutive failures (requests or probes) that take a node out of routing.
pub(crate) const DOWN_AFTER: u32 = 3;

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) upstream: Arc<Upstream>,
    /// Requests it runs at once (`parallel`); `None`: no slot limit.
    pub(crate) parallel: Option<u32>,
    /// Keys of the pinned models placed on it (`models`); empty: no placement.
    pub(crate) placement: HashSet<String>,
    inflight: AtomicU32,
    /// Slots this replica holds on it (of `parallel`), while requests wait for them.
    taken: AtomicU32,
    failures: AtomicU32,
    up: AtomicBool,
    lists: RwLock<Lists>,
    /// Wakes the node's probe to read its lists again (after a pull, copy, create or delete).
    pub(crate) refresh: tokio::sync::Notify,
    /// Its metric series (see [`Node::series`]).
    series: OnceLock<NodeSeries>,
}

/// The node's model lists, as its probe last read them.
#[derive(Default)]
struct Lists {
    /// `/api/tags` entries by model key; `None` until first read.
    tags: Option<BTreeMap<String, Value>>,
    /// `/api/ps` entries by model key.
    ps: BTreeMap<String, Value>,
    /// `/v1/models` entries by model key.
    openai: BTreeMap<String, Value>,
    /// Models requests ran here since the last `/api/ps` (corral's own bookkeeping).
    warm: HashSet<String>,
}

/// The lists a probe read from a node (each the `models` or `data` array of its answer).
#[derive(Default)]
pub(crate) struct Listed {
    pub(crate) tags: Vec<Value>,
    /// `None`: the node did not answer `/api/ps` (its loaded models stay as they were).
    pub(crate) ps: Option<Vec<Value>>,
    pub(crate) openai: Option<Vec<Value>>,
}

/// Entries by model key, read from `field` (or `name`).
fn by_key(entries: &[Value], field: &str) -> BTreeMap<String, Value> {
    entries
        .iter()
        .filter_map(|m| {
            let name = m[field].as_str().or_else(|| m["name"].as_str())?;
            Some((crate::ollama::ModelName::parse(name)?.key(), m.clone()))
        })
        .collect()
}

impl Node {
    pub(crate) fn new(
        name: String,
        upstream: Arc<Upstream>,
        parallel: Option<u32>,
        placement: HashSet<String>,
    ) -> Node {
        Node {
            name,
            upstream,
            parallel,
            placement,
            inflight: AtomicU32::new(0),
            taken: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            up: AtomicBool::new(true),
            lists: RwLock::default(),
            refresh: tokio::sync::Notify::new(),
            series: OnceLock::new(),
        }
    }

    /// Its metric series: resolved when it joins the pool (`supervise.rs`), or by a request that
    /// reaches it first, and kept for its life (see `NodeSeries`).
    pub(crate) fn series(&self, metrics: &Metrics) -> &NodeSeries {
        self.series.get_or_init(|| metrics.node_series(&self.name))
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Takes one of its `parallel` slots for a request (see `upstream::queue`); false when
    /// every slot is taken. A node without `parallel` has no slots to take.
    pub(crate) fn try_take_slot(&self) -> bool {
        let Some(parallel) = self.parallel else {
            return false;
        };
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < parallel).then_some(n + 1)
            })
            .is_ok()
    }

    /// A slot taken with [`try_take_slot`](Self::try_take_slot) is free again.
    pub(crate) fn give_back_slot(&self) {
        let _ = self
            .taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Slots taken on it (by this replica).
    pub(crate) fn slots_taken(&self) -> u32 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Whether a request for `model` (a key; `None`: any) could run here now: it is up and has
    /// the model, or its list is not known yet.
    pub(crate) fn may_run(&self, model: Option<&str>) -> bool {
        self.is_up() && self.view(model, false).has != Has::No
    }

    /// Counts a request in flight on this node until the lease is dropped.
    pub(crate) fn lease(self: &Arc<Self>) -> Lease {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        Lease(self.clone())
    }

    /// The node answered (a request or a probe). Returns true when it was down.
    pub(crate) fn succeeded(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        !self.up.swap(true, Ordering::Relaxed)
    }

    /// The node failed to answer. Returns true when this failure takes it down.
    pub(crate) fn failed(&self) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= DOWN_AFTER && self.up.swap(false, Ordering::Relaxed)
    }

    /// What routing needs to know about this node for `model` (a key).
    pub(crate) fn view(&self, model: Option<&str>, tried: bool) -> NodeView {
        let lists = self.lists.read().unwrap_or_else(|e| e.into_inner());
        let (has, loaded) = match (model, &lists.tags) {
            (None, _) => (Has::Yes, false),
            (Some(_), None) => (Has::Unknown, false),
            (Some(m), Some(tags)) => {
                let has = if tags.contains_key(m) {
                    Has::Yes
                } else {
                    Has::No
                };
                (has, lists.ps.contains_key(m) || lists.warm.contains(m))
            }
        };
        NodeView {
            up: self.is_up(),
            has,
            loaded,
            // A slot held for a request not yet sent counts as much as one in flight.
            inflight: self.inflight().max(self.slots_taken()),
            parallel: self.parallel,
            tried,
        }
    }

    /// Replaces the model lists with what the node answered.
    pub(crate) fn set_lists(&self, listed: &Listed) {
        let mut lists = self.lists.write().unwrap_or_else(|e| e.into_inner());
        lists.tags = Some(by_key(&listed.tags, "name"));
        if let Some(ps) = &listed.ps {
            lists.ps = by_key(ps, "name");
            lists.warm.clear();
        }
        if let Some(openai) = &listed.openai {
            lists.openai = by_key(openai, "id");
        }
    }

    /// A request ran `model` (a key) here: Ollama has it loaded now.
    pub(crate) fn mark_loaded(&self, model: &str) {
        let mut lists = self.lists.write().unwrap_or_else(|e| e.into_inner());
        if !lists.ps.contains_key(model) {
            lists.warm.insert(model.to_string());
        }
    }

    /// The `/api/tags` entries, when known.
    pub(crate) fn tags(&self) -> Option<Vec<Value>> {
        let lists = self.lists.read().unwrap_or_else(|e| e.into_inner());
        lists.tags.as_ref().map(|t| t.values().cloned().collect())
    }

    /// The entries of one of its lists by model key: `/api/tags`, `/api/ps` or `/v1/models`.
    pub(crate) fn list(&self, which: List) -> BTreeMap<String, Value> {
        let lists = self.lists.read().unwrap_or_else(|e| e.into_inner());
        match which {
            List::Tags => lists.tags.clone().unwrap_or_default(),
            List::Ps => lists.ps.clone(),
            List::OpenAi => lists.openai.clone(),
        }
    }
}

/// One of a node's model lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum List {
    Tags,
    Ps,
    OpenAi,
}

/// A request in flight on a node (see [`Node::lease`]).
pub(crate) struct Lease(Arc<Node>);

impl Lease {
    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{UpstreamConfig, UpstreamUrl};
    use serde_json::json;

    pub(crate) fn node(name: &str, parallel: Option<u32>) -> Arc<Node> {
        let cfg = UpstreamConfig::default();
        let url = UpstreamUrl::parse("http://127.0.0.1:11434").unwrap();
        let upstream = Arc::new(Upstream::new(url, &cfg));
        Arc::new(Node::new(name.into(), upstream, parallel, HashSet::new()))
    }

    #[test]
    fn three_failures_in_a_row_take_a_node_down_and_an_answer_brings_it_back() {
        let n = node("a", None);
        assert!(n.is_up(), "up until it fails");
        assert!(!n.failed());
        assert!(!n.failed());
        assert!(!n.succeeded(), "it was not down");
        assert!(!n.failed() && !n.failed(), "the count starts again");
        assert!(n.failed(), "the third in a row");
        assert!(!n.is_up());
        assert!(!n.failed(), "already down");
        assert!(n.succeeded(), "back");
        assert!(n.is_up());
    }

    #[test]
    fn leases_count_requests_in_flight() {
        let n = node("a", Some(2));
        let a = n.lease();
        let b = n.lease();
        assert_eq!(n.view(None, false).inflight, 2);
        drop(a);
        assert_eq!(n.inflight(), 1);
        drop(b);
        assert_eq!(n.inflight(), 0);
    }

    #[test]
    fn slots_are_taken_up_to_parallel_and_given_back() {
        let n = node("a", Some(2));
        assert!(n.try_take_slot() && n.try_take_slot());
        assert!(!n.try_take_slot(), "two slots");
        assert_eq!(n.view(None, false).inflight, 2, "held slots count as busy");
        n.give_back_slot();
        assert!(n.try_take_slot());
        for _ in 0..3 {
            n.give_back_slot();
        }
        assert_eq!(n.slots_taken(), 0, "never below zero");
        assert!(!node("b", None).try_take_slot(), "no parallel: no slots");
    }

    #[test]
    fn views_follow_the_lists() {
        let n = node("a", Some(1));
        assert_eq!(n.view(Some("llama3.2:latest"), false).has, Has::Unknown);
        n.set_lists(&Listed {
            tags: vec![
                json!({"name": "llama3.2:latest"}),
                json!({"name": "qwen2.5:7b"}),
            ],
            ps: Some(vec![json!({"name": "qwen2.5:7b", "model": "qwen2.5:7b"})]),
            openai: Some(vec![json!({"id": "qwen2.5:7b"})]),
        });
        let v = n.view(Some("llama3.2:latest"), false);
        assert_eq!((v.has, v.loaded), (Has::Yes, false));
        let v = n.view(Some("qwen2.5:7b"), true);
        assert_eq!((v.has, v.loaded, v.tried), (Has::Yes, true, true));
        assert_eq!(n.view(Some("mistral:latest"), false).has, Has::No);
        n.mark_loaded("llama3.2:latest");
        assert!(n.view(Some("llama3.2:latest"), false).loaded);
        assert_eq!(
            n.list(List::Ps).len(),
            1,
            "what corral ran is not in the node's /api/ps"
        );
        assert!(n.list(List::OpenAi).contains_key("qwen2.5:7b"));
        // The next /api/ps is the truth again.
        n.set_lists(&Listed {
            tags: vec![json!({"name": "llama3.2:latest"})],
            ps: Some(vec![]),
            openai: None,
        });
        assert!(!n.view(Some("llama3.2:latest"), false).loaded);
        assert!(!n.view(Some("qwen2.5:7b"), false).loaded);
        assert_eq!(n.list(List::OpenAi).len(), 1, "kept when not read");
    }
}
