//! The nodes requests go to: listed in the configuration (one for `upstream.url`), or found in
//! DNS (`upstream.discover`) and changing as the name resolves to other addresses.

use super::choose::{self, Choice};
use super::node::{List, Node};
use super::Upstream;
use crate::config::{NodeConfig, UpstreamConfig, UpstreamUrl};
use crate::ollama::ModelName;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub(crate) struct Pool {
    nodes: RwLock<Arc<[Arc<Node>]>>,
    /// Turns for equal nodes.
    turn: AtomicUsize,
    /// What every node is made with (the timeouts).
    cfg: UpstreamConfig,
}

/// Where a request goes (see [`choose`]).
pub(crate) enum Pick {
    Node(Arc<Node>),
    /// Every node that has (or may have) the model is down, or no node is known yet.
    Down,
    /// No node has the model.
    Missing,
    /// Every candidate was tried.
    Exhausted,
}

/// A node as the configuration describes it.
pub(crate) fn make_node(n: NodeConfig, cfg: &UpstreamConfig) -> Arc<Node> {
    let placement = n
        .models
        .iter()
        .filter_map(|m| ModelName::parse(m))
        .map(|m| m.key())
        .collect();
    let upstream = Arc::new(Upstream::new(n.url, cfg));
    Arc::new(Node::new(n.name, upstream, n.parallel, placement))
}

/// The node name of a discovered address: `10-0-0-11`, `fd00--1` (a valid `node` label).
pub(crate) fn discovered_name(ip: std::net::IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-").to_ascii_lowercase()
}

/// A discovered node at `addr`; `None` for an address that is no URL host (an IPv6 link-local
/// address with a zone).
pub(crate) fn discovered_node(
    addr: std::net::SocketAddr,
    parallel: Option<u32>,
    cfg: &UpstreamConfig,
) -> Option<Arc<Node>> {
    let url = UpstreamUrl::parse(&format!("http://{addr}")).ok()?;
    Some(make_node(
        NodeConfig {
            name: discovered_name(addr.ip()),
            url,
            parallel,
            models: Vec::new(),
        },
        cfg,
    ))
}

impl Pool {
    pub(crate) fn new(cfg: &UpstreamConfig) -> Pool {
        let nodes: Vec<Arc<Node>> = cfg
            .node_list()
            .into_iter()
            .map(|n| make_node(n, cfg))
            .collect();
        Pool {
            nodes: RwLock::new(nodes.into()),
            turn: AtomicUsize::new(0),
            cfg: cfg.clone(),
        }
    }

    pub(crate) fn config(&self) -> &UpstreamConfig {
        &self.cfg
    }

    /// The nodes now.
    pub(crate) fn nodes(&self) -> Arc<[Arc<Node>]> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the nodes (discovery found other addresses).
    pub(crate) fn replace(&self, nodes: Vec<Arc<Node>>) {
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes.into();
    }

    /// The timeouts every node has.
    pub(crate) fn timeouts(&self) -> (Duration, Duration, Duration) {
        let c = &self.cfg;
        (c.connect_timeout.0, c.read_timeout.0, c.request_timeout.0)
    }

    /// More than one node: requests are routed, lists merged, admin routes name their node.
    pub(crate) fn is_pool(&self) -> bool {
        self.nodes().len() > 1
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes().iter().find(|n| n.name == name).cloned()
    }

    /// The node names, for messages.
    pub(crate) fn names(&self) -> String {
        let nodes = self.nodes();
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        names.join(", ")
    }

    /// One list of every healthy node's, each model once (the first node that lists it gives its
    /// entry), as Ollama would answer it; `None` when no node is up.
    pub(crate) fn merged(&self, which: List) -> Option<serde_json::Value> {
        let nodes = self.nodes();
        let mut up = nodes.iter().filter(|n| n.is_up()).peekable();
        up.peek()?;
        let mut seen = std::collections::BTreeMap::new();
        for node in up {
            for (key, entry) in node.list(which) {
                seen.entry(key).or_insert(entry);
            }
        }
        let items: Vec<serde_json::Value> = seen.into_values().collect();
        Some(match which {
            List::OpenAi => serde_json::json!({"object": "list", "data": items}),
            List::Tags | List::Ps => serde_json::json!({ "models": items }),
        })
    }

    /// Every node that could take a request for `model` now, best first: `first` (the node
    /// [`pick`](Self::pick) chose for it), then the others in the order `choose` prefers them.
    /// Ranking takes no turn: equal nodes still alternate request by request.
    pub(crate) fn ranked(&self, model: Option<&str>, first: &Arc<Node>) -> Vec<Arc<Node>> {
        let turn = self.turn.load(Ordering::Relaxed);
        let mut ranked = vec![first.clone()];
        while let Pick::Node(next) = self.pick_in_turn(model, &ranked, turn) {
            ranked.push(next);
        }
        ranked
    }

    /// The node for a request for `model` (a key; `None`: any node) that has tried `tried`.
    /// Outside a pool the one node takes everything, as a single upstream always did.
    pub(crate) fn pick(&self, model: Option<&str>, tried: &[Arc<Node>]) -> Pick {
        self.pick_in_turn(model, tried, self.turn.fetch_add(1, Ordering::Relaxed))
    }

    fn pick_in_turn(&self, model: Option<&str>, tried: &[Arc<Node>], turn: usize) -> Pick {
        let nodes = self.nodes();
        let was_tried = |n: &Arc<Node>| tried.iter().any(|t| Arc::ptr_eq(t, n));
        match &nodes[..] {
            [] => return Pick::Down,
            [only] if was_tried(only) => return Pick::Exhausted,
            [only] => return Pick::Node(only.clone()),
            _ => {}
        }
        let views: Vec<choose::NodeView> =
            nodes.iter().map(|n| n.view(model, was_tried(n))).collect();
        match choose::choose(&views, turn) {
            Choice::Node(i) => Pick::Node(nodes[i].clone()),
            Choice::Down => Pick::Down,
            Choice::Missing => Pick::Missing,
            Choice::Exhausted => Pick::Exhausted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_addresses_make_valid_node_names() {
        assert_eq!(discovered_name("10.0.0.11".parse().unwrap()), "10-0-0-11");
        assert_eq!(discovered_name("fd00::1".parse().unwrap()), "fd00--1");
        let cfg = UpstreamConfig::default();
        let node = discovered_node("10.0.0.11:11434".parse().unwrap(), Some(4), &cfg).unwrap();
        assert_eq!(node.upstream.url.to_string(), "http://10.0.0.11:11434");
        assert_eq!(node.parallel, Some(4));
        let zoned = std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 11434, 0, 2);
        assert!(
            discovered_node(zoned.into(), None, &cfg).is_none(),
            "a link-local address with a zone is no URL host: skipped, never sent elsewhere"
        );
    }

    #[test]
    fn one_node_takes_everything_and_none_is_down() {
        let pool = Pool::new(&UpstreamConfig::default());
        let Pick::Node(only) = pool.pick(Some("anything:latest"), &[]) else {
            panic!("the one node takes it, whatever it lists");
        };
        assert!(matches!(pool.pick(None, &[only]), Pick::Exhausted));
        pool.replace(vec![]);
        assert!(matches!(pool.pick(None, &[]), Pick::Down));
        assert!(pool.merged(List::Tags).is_none());
    }

    #[test]
    fn ranking_the_nodes_keeps_equal_nodes_taking_turns() {
        let node = |name: &str| NodeConfig {
            name: name.into(),
            url: UpstreamUrl::parse("http://127.0.0.1:1").unwrap(),
            parallel: Some(2),
            models: Vec::new(),
        };
        let cfg = UpstreamConfig {
            nodes: vec![node("a"), node("b")],
            ..UpstreamConfig::default()
        };
        let pool = Pool::new(&cfg);
        let mut firsts = Vec::new();
        for _ in 0..4 {
            let Pick::Node(first) = pool.pick(Some("llama3.2:latest"), &[]) else {
                panic!("both may have it");
            };
            let ranked = pool.ranked(Some("llama3.2:latest"), &first);
            assert_eq!(ranked.len(), 2);
            assert!(Arc::ptr_eq(&ranked[0], &first));
            firsts.push(first.name.clone());
        }
        assert_eq!(firsts, ["a", "b", "a", "b"]);
    }
}
