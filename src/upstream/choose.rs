//! Which node a request for a model goes to: a pure function of what corral knows about each
//! node (health, model lists, slots in use), so it is tested and benchmarked without sockets.
//!
//! Candidates are the healthy nodes that have the model (or whose list is not known yet) and
//! that this request has not tried. Among them, in order of preference:
//! 1. the model is loaded there and a slot is free;
//! 2. a slot is free;
//! 3. the model is loaded there (it waits in that node's line);
//! 4. any other candidate.
//!
//! A node whose list is not known yet (just discovered, not probed) comes only after every node
//! known to have the model: it may not have it. Within a tier, the node with the fewest requests
//! in flight, then the next in turn from `rotate` (so equal nodes share the load).

/// Whether a node's model list has the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Has {
    Yes,
    No,
    /// The node's list has not been read yet: it may have it.
    Unknown,
}

/// What routing needs to know about one node, for one request.
#[derive(Clone, Copy, Debug)]
pub struct NodeView {
    pub up: bool,
    pub has: Has,
    /// The model is loaded there (its `/api/ps`, or corral's own bookkeeping).
    pub loaded: bool,
    /// Requests corral has in flight there.
    pub inflight: u32,
    /// Requests it runs at once; `None`: no slot limit.
    pub parallel: Option<u32>,
    /// This request already tried it (failover tries each node once).
    pub tried: bool,
}

impl NodeView {
    fn free(&self) -> bool {
        self.parallel.is_none_or(|p| self.inflight < p)
    }
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// This node (an index into the views).
    Node(usize),
    /// No healthy node has the model, but a node that is down does (or may): try again later.
    Down,
    /// No node has the model.
    Missing,
    /// Every candidate was tried.
    Exhausted,
}

/// Picks the node for a request (see the module documentation for the order).
pub fn choose(nodes: &[NodeView], rotate: usize) -> Choice {
    let n = nodes.len();
    let mut best: Option<(usize, (bool, u8, u32, usize))> = None;
    let (mut down_has, mut tried_has) = (false, false);
    for (i, v) in nodes.iter().enumerate() {
        if v.has == Has::No {
            continue;
        }
        if !v.up {
            down_has = true;
            continue;
        }
        if v.tried {
            tried_has = true;
            continue;
        }
        let tier = match (v.loaded, v.free()) {
            (true, true) => 0,
            (false, true) => 1,
            (true, false) => 2,
            (false, false) => 3,
        };
        let turn = (i + n - rotate % n) % n;
        let key = (v.has == Has::Unknown, tier, v.inflight, turn);
        if best.is_none_or(|(_, k)| key < k) {
            best = Some((i, key));
        }
    }
    match best {
        Some((i, _)) => Choice::Node(i),
        None if tried_has => Choice::Exhausted,
        None if down_has => Choice::Down,
        None => Choice::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(has: Has, loaded: bool, inflight: u32, parallel: Option<u32>) -> NodeView {
        NodeView {
            up: true,
            has,
            loaded,
            inflight,
            parallel,
            tried: false,
        }
    }

    #[test]
    fn a_model_only_one_node_has_goes_there() {
        let nodes = [
            node(Has::No, false, 0, Some(4)),
            node(Has::Yes, false, 9, Some(4)),
            node(Has::No, true, 0, None),
        ];
        assert_eq!(choose(&nodes, 0), Choice::Node(1), "even when it is busy");
    }

    #[test]
    fn a_loaded_node_with_a_free_slot_wins_then_a_free_one_then_a_loaded_one() {
        let mut nodes = [
            node(Has::Yes, false, 0, Some(2)),
            node(Has::Yes, true, 1, Some(2)),
        ];
        assert_eq!(choose(&nodes, 0), Choice::Node(1), "warm beats idle");
        nodes[1].inflight = 2;
        assert_eq!(
            choose(&nodes, 0),
            Choice::Node(0),
            "a busy warm node spills"
        );
        nodes[0].inflight = 2;
        assert_eq!(
            choose(&nodes, 0),
            Choice::Node(1),
            "all busy: wait where it is warm"
        );
        nodes[0].loaded = true;
        nodes[1].inflight = 3;
        assert_eq!(choose(&nodes, 0), Choice::Node(0), "then the shortest line");
    }

    #[test]
    fn a_node_without_parallel_always_has_a_free_slot() {
        let nodes = [
            node(Has::Yes, true, 50, None),
            node(Has::Yes, false, 0, Some(1)),
        ];
        assert_eq!(choose(&nodes, 0), Choice::Node(0));
    }

    #[test]
    fn equal_nodes_take_turns() {
        let nodes = [node(Has::Yes, true, 0, None); 3];
        let picks: Vec<Choice> = (0..4).map(|r| choose(&nodes, r)).collect();
        assert_eq!(
            picks,
            [0, 1, 2, 0].map(Choice::Node),
            "the rotation picks each in turn"
        );
        let mut busy = nodes;
        busy[1].inflight = 1;
        assert_eq!(choose(&busy, 1), Choice::Node(2), "fewest in flight first");
    }

    #[test]
    fn a_known_list_beats_an_unknown_one() {
        let nodes = [
            node(Has::Unknown, false, 0, None),
            node(Has::Yes, false, 3, None),
        ];
        assert_eq!(choose(&nodes, 0), Choice::Node(1));
        let busy = [
            node(Has::Unknown, false, 0, Some(1)),
            node(Has::Yes, false, 3, Some(1)),
        ];
        assert_eq!(
            choose(&busy, 0),
            Choice::Node(1),
            "even busy: the unprobed node may answer 404"
        );
        assert_eq!(
            choose(&[node(Has::Unknown, false, 0, None)], 0),
            Choice::Node(0),
            "a node not yet listed may have it"
        );
    }

    #[test]
    fn down_nodes_and_tried_nodes_are_skipped() {
        let mut nodes = [
            node(Has::Yes, true, 0, None),
            node(Has::Yes, false, 0, None),
        ];
        nodes[0].up = false;
        assert_eq!(choose(&nodes, 0), Choice::Node(1));
        nodes[1].tried = true;
        assert_eq!(choose(&nodes, 0), Choice::Exhausted, "each node once");
        nodes[1].up = false;
        assert_eq!(
            choose(&nodes, 0),
            Choice::Down,
            "a node that has it is down"
        );
        nodes[0].has = Has::No;
        nodes[1].has = Has::Unknown;
        assert_eq!(choose(&nodes, 0), Choice::Down, "it may have it");
    }

    #[test]
    fn no_node_with_the_model_is_missing() {
        let nodes = [node(Has::No, false, 0, None), node(Has::No, true, 0, None)];
        assert_eq!(choose(&nodes, 0), Choice::Missing);
        assert_eq!(choose(&[], 0), Choice::Missing);
    }
}
