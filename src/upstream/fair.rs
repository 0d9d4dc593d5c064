//! Who gets a freed slot: weighted fair queueing across teams, first in first out within a
//! team. Pure (no clock, no sockets), so the choice is unit-tested on its own.
//!
//! Stride scheduling: every team has a `pass`; serving one of its requests adds `STRIDE /
//! weight` to it, and the freed slot goes to the team with the lowest pass among those with a
//! request the slot's node can serve (ties: the earliest request). Under contention a team of
//! weight 3 is therefore served three times for every turn of a team of weight 1; a team alone
//! gets every slot. A team that starts waiting after being idle starts at the current virtual
//! time (the pass of the last team served), so idleness earns no burst of turns later, and no
//! waiting team is starved: every turn taken raises the taker's pass.

use std::collections::{BTreeMap, VecDeque};

/// One unit of weight's pass per turn; weights divide it.
const STRIDE: u64 = 1 << 20;

/// Requests waiting, by team.
pub(crate) struct Fair<T> {
    teams: BTreeMap<String, Lane<T>>,
    /// The pass of the team served last: where a team that starts waiting begins.
    vtime: u64,
    /// Arrival order (tickets), across teams.
    seq: u64,
    len: usize,
}

struct Lane<T> {
    pass: u64,
    stride: u64,
    waiting: VecDeque<(u64, T)>,
}

/// Identifies a waiting request, to take it out (its client left, its wait timed out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl<T> Default for Fair<T> {
    fn default() -> Self {
        Fair {
            teams: BTreeMap::new(),
            vtime: 0,
            seq: 0,
            len: 0,
        }
    }
}

impl<T> Fair<T> {
    /// Requests waiting in all.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Requests of `team` waiting.
    pub(crate) fn depth(&self, team: &str) -> usize {
        self.teams.get(team).map_or(0, |l| l.waiting.len())
    }

    /// Whether any waiting request satisfies `f`.
    pub(crate) fn any(&self, mut f: impl FnMut(&T) -> bool) -> bool {
        self.teams
            .values()
            .any(|l| l.waiting.iter().any(|(_, item)| f(item)))
    }

    /// `item` of `team` (of `weight`, at least 1) waits, after every request of its team.
    pub(crate) fn push(&mut self, team: &str, weight: u32, item: T) -> Ticket {
        let stride = STRIDE / u64::from(weight.max(1));
        let vtime = self.vtime;
        let lane = self.teams.entry(team.to_string()).or_insert(Lane {
            pass: vtime,
            stride,
            waiting: VecDeque::new(),
        });
        lane.stride = stride;
        if lane.waiting.is_empty() {
            // Idle time earns no credit.
            lane.pass = lane.pass.max(vtime);
        }
        self.seq += 1;
        lane.waiting.push_back((self.seq, item));
        self.len += 1;
        Ticket(self.seq)
    }

    /// Takes the request whose turn it is among those `fits` accepts: the team with the lowest
    /// pass (then the earliest request), its earliest request that fits.
    pub(crate) fn pop_where(&mut self, mut fits: impl FnMut(&T) -> bool) -> Option<T> {
        let mut best: Option<(u64, u64, &str, usize)> = None;
        for (team, lane) in &self.teams {
            if best.is_some_and(|(pass, ..)| lane.pass > pass) {
                continue;
            }
            let Some((i, (seq, _))) = lane
                .waiting
                .iter()
                .enumerate()
                .find(|(_, (_, item))| fits(item))
            else {
                continue;
            };
            if best.is_none_or(|(pass, s, ..)| (lane.pass, *seq) < (pass, s)) {
                best = Some((lane.pass, *seq, team.as_str(), i));
            }
        }
        let (_, _, team, i) = best?;
        let team = team.to_string();
        let lane = self.teams.get_mut(&team)?;
        let (_, item) = lane.waiting.remove(i)?;
        self.vtime = self.vtime.max(lane.pass);
        lane.pass += lane.stride;
        self.len -= 1;
        Some(item)
    }

    /// Takes a waiting request out of line (it does not count as a turn).
    pub(crate) fn remove(&mut self, team: &str, ticket: Ticket) -> Option<T> {
        let lane = self.teams.get_mut(team)?;
        let i = lane.waiting.iter().position(|(seq, _)| *seq == ticket.0)?;
        let (_, item) = lane.waiting.remove(i)?;
        self.len -= 1;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `turns` slots to two always-backlogged teams and counts each one's.
    fn serve(fair: &mut Fair<&'static str>, turns: usize) -> (usize, usize) {
        let mut counts = (0, 0);
        for _ in 0..turns {
            match fair.pop_where(|_| true) {
                Some("a") => {
                    counts.0 += 1;
                    fair.push("a", 3, "a");
                }
                Some("b") => {
                    counts.1 += 1;
                    fair.push("b", 1, "b");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        counts
    }

    #[test]
    fn backlogged_teams_share_slots_by_weight() {
        let mut fair = Fair::default();
        for _ in 0..10 {
            fair.push("a", 3, "a");
            fair.push("b", 1, "b");
        }
        assert_eq!(serve(&mut fair, 400), (300, 100));
    }

    #[test]
    fn a_team_alone_gets_every_slot_whatever_its_weight() {
        let mut fair = Fair::default();
        for i in 0..5 {
            fair.push("light", 1, i);
        }
        let served: Vec<i32> = std::iter::from_fn(|| fair.pop_where(|_| true)).collect();
        assert_eq!(served, vec![0, 1, 2, 3, 4], "first in, first out");
        assert_eq!(fair.len(), 0);
    }

    #[test]
    fn within_a_team_requests_go_in_arrival_order() {
        let mut fair = Fair::default();
        fair.push("a", 1, 1);
        fair.push("b", 1, 10);
        fair.push("a", 1, 2);
        fair.push("b", 1, 20);
        let served: Vec<i32> = std::iter::from_fn(|| fair.pop_where(|_| true)).collect();
        assert_eq!(
            served,
            vec![1, 10, 2, 20],
            "equal weights alternate, each in order"
        );
    }

    #[test]
    fn a_slot_goes_only_to_a_request_its_node_can_serve() {
        let mut fair = Fair::default();
        fair.push("a", 1, "llama");
        fair.push("a", 1, "qwen");
        fair.push("b", 1, "mistral");
        // The node that freed the slot has qwen only: a's first request that it can serve.
        assert_eq!(fair.pop_where(|m| *m == "qwen"), Some("qwen"));
        assert_eq!((fair.depth("a"), fair.depth("b")), (1, 1));
        assert_eq!(fair.pop_where(|m| *m == "phi4"), None);
        assert_eq!(fair.len(), 2, "nothing is taken when nothing fits");
        // b's turn now, but only a's request fits this node: a is served, not skipped.
        assert_eq!(fair.pop_where(|m| *m == "llama"), Some("llama"));
    }

    #[test]
    fn an_idle_team_earns_no_burst_when_it_comes_back() {
        let mut fair = Fair::default();
        fair.push("busy", 1, "busy");
        for _ in 0..100 {
            assert_eq!(fair.pop_where(|_| true), Some("busy"));
            fair.push("busy", 1, "busy");
        }
        fair.push("back", 1, "back");
        let mut back = 0;
        for _ in 0..20 {
            let team = fair.pop_where(|_| true).expect("both wait");
            back += usize::from(team == "back");
            fair.push(team, 1, team);
        }
        // Equal weights: about half the turns (the 100 it missed are not made up).
        assert!((10..=11).contains(&back), "{back} of 20");
    }

    #[test]
    fn no_team_starves_under_a_heavy_one() {
        let mut fair = Fair::default();
        fair.push("heavy", 1000, "heavy");
        fair.push("light", 1, "light");
        let mut light = 0;
        for _ in 0..3003 {
            let team = fair.pop_where(|_| true).expect("both always wait");
            if team == "light" {
                light += 1;
            }
            fair.push(team, if team == "heavy" { 1000 } else { 1 }, team);
        }
        assert!((2..=4).contains(&light), "one turn in about 1001: {light}");
    }

    #[test]
    fn a_request_taken_out_of_line_is_gone_without_costing_a_turn() {
        let mut fair = Fair::default();
        let first = fair.push("a", 1, 1);
        fair.push("a", 1, 2);
        fair.push("b", 1, 3);
        assert_eq!(fair.remove("a", first), Some(1));
        assert_eq!(fair.remove("a", first), None, "only once");
        assert_eq!(fair.remove("b", first), None, "not another team's");
        assert_eq!(fair.depth("a"), 1);
        let served: Vec<i32> = std::iter::from_fn(|| fair.pop_where(|_| true)).collect();
        assert_eq!(served, vec![2, 3]);
    }
}
