//! Slots on the nodes, and the line for them. A request that runs a model takes one of its
//! node's `parallel` slots and holds it until it ends (a stream until its last byte). With no
//! slot free on any node that has its model, it waits in its team's queue, and each slot that
//! frees goes to the request whose turn it is ([`fair`](super::fair): weighted across teams,
//! first in first out within one, among the requests the freed node can serve). Nodes without
//! `parallel` have no slots: nothing waits for them.
//!
//! With a shared store (`[state]`) the slots are leases in the store, so replicas together
//! never put more than `parallel` requests on a node; each replica's line stays its own. A slot
//! another replica frees is noticed by [`LineKeeper`], which looks for free slots while
//! requests wait.

use super::fair::{Fair, Ticket};
use super::node::Node;
use super::Pool;
use crate::config::{OnStoreError, SchedulerConfig};
use crate::state::store::Store;
use crate::telemetry::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often waiting requests look for slots no slot's end handed them (see [`LineKeeper`]).
const POLL: Duration = Duration::from_millis(50);

pub(crate) struct Scheduler {
    line: Mutex<Fair<Waiter>>,
    /// Wakes the [`LineKeeper`] when a request starts waiting (it sleeps while none does).
    kick: tokio::sync::Notify,
    cfg: RwLock<SchedulerConfig>,
    store: Option<Arc<Store>>,
    metrics: Arc<Metrics>,
}

/// A request waiting for a slot.
struct Waiter {
    /// The model it runs (a key), so a freed slot goes only to a request its node can serve.
    model: Option<String>,
    /// The nodes it may go to (those that could take it when it came).
    nodes: Vec<Arc<Node>>,
    team: String,
    tx: oneshot::Sender<SlotHold>,
}

impl Waiter {
    /// Whether a slot on `node` can serve this request: one of its nodes, and (in a pool of
    /// several) still up with its model. One node takes everything, as routing does.
    fn fits(&self, node: &Arc<Node>) -> bool {
        self.nodes.iter().any(|n| Arc::ptr_eq(n, node))
            && (self.nodes.len() == 1 || node.may_run(self.model.as_deref()))
    }
}

/// Who asks for a slot: the team, its weight and its own cap on waiting requests.
pub(crate) struct Asker<'a> {
    pub(crate) team: &'a str,
    pub(crate) weight: u32,
    /// `None`: only `scheduler.max_queued` applies.
    pub(crate) max_queued: Option<u32>,
}

/// Where the request goes: a node, with the slot it holds there (none on a node without
/// `parallel`, or while the store fails with `on_store_error = "allow"`).
pub(crate) struct Granted {
    pub(crate) node: Arc<Node>,
    pub(crate) slot: Option<SlotHold>,
    /// How long it waited in line.
    pub(crate) waited: Duration,
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// The line (all of it, or the team's) is full: 429.
    Full,
    /// No slot within `scheduler.queue_timeout`: 503.
    Timeout,
    /// The client left while waiting.
    Gone,
    /// The store failed and `on_store_error = "deny"`.
    StoreDown,
}

impl NoSlot {
    /// `corral_queue_rejected_total{reason}`, for the refusals that have one.
    pub(crate) fn reason(self) -> Option<&'static str> {
        match self {
            NoSlot::Full => Some("full"),
            NoSlot::Timeout => Some("timeout"),
            NoSlot::Gone | NoSlot::StoreDown => None,
        }
    }
}

/// A slot on a node, held while its request lives. Dropped, it goes to the next request in
/// line that the node can serve, or is freed.
pub(crate) struct SlotHold {
    held: Option<(Arc<Node>, Kind)>,
    scheduler: Arc<Scheduler>,
}

#[derive(Clone, Debug)]
enum Kind {
    /// Counted on the node, in this process.
    Local,
    /// A lease in the store's set of the node's slots.
    Shared(String),
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        if let Some((node, kind)) = self.held.take() {
            self.scheduler.offer(node, kind);
        }
    }
}

impl Scheduler {
    pub(crate) fn new(
        cfg: SchedulerConfig,
        store: Option<Arc<Store>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            line: Mutex::new(Fair::default()),
            kick: tokio::sync::Notify::new(),
            cfg: RwLock::new(cfg),
            store,
            metrics,
        })
    }

    /// `[scheduler]` changed on reload: the next requests wait by the new settings.
    pub(crate) fn reconfigure(&self, cfg: SchedulerConfig) {
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// `scheduler.queue_timeout` now.
    pub(crate) fn queue_timeout(&self) -> Duration {
        self.cfg
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .queue_timeout
            .0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fair<Waiter>> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold(self: &Arc<Self>, node: Arc<Node>, kind: Kind) -> SlotHold {
        SlotHold {
            held: Some((node, kind)),
            scheduler: self.clone(),
        }
    }

    /// Requests waiting in all.
    pub(crate) fn waiting(&self) -> usize {
        self.lock().len()
    }

    /// A slot on `node` is free: the request whose turn it is among those the node can serve
    /// gets it, else it is freed.
    fn offer(self: &Arc<Self>, node: Arc<Node>, kind: Kind) {
        let mut line = self.lock();
        let mut kind = kind;
        while let Some(waiter) = line.pop_where(|w| w.fits(&node)) {
            self.metrics
                .queue_depth
                .with_label_values(&[&waiter.team])
                .dec();
            match waiter.tx.send(self.hold(node.clone(), kind)) {
                Ok(()) => return,
                // It stopped waiting a moment ago: the next one.
                Err(mut back) => {
                    let Some((_, k)) = back.held.take() else {
                        return;
                    };
                    kind = k;
                }
            }
        }
        // Freed before the line is let go: a request joining it meanwhile would miss the slot.
        match kind {
            Kind::Local => node.give_back_slot(),
            Kind::Shared(lease) => {
                if let Some(store) = &self.store {
                    store.let_go(lease);
                }
            }
        }
    }

    /// A slot for a request for `model` on one of `ranked` (the nodes that could take it, best
    /// first): at once when one is free (or a node has no slot limit), else after waiting in
    /// line, until `scheduler.queue_timeout` or until `gone` (the client left) completes.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        ranked: &[Arc<Node>],
        model: Option<&str>,
        asker: &Asker<'_>,
        gone: impl Future<Output = ()>,
    ) -> Result<Granted, NoSlot> {
        let Some(first) = ranked.first() else {
            return Err(NoSlot::Timeout);
        };
        let at_once = |node: &Arc<Node>, slot| Granted {
            node: node.clone(),
            slot,
            waited: Duration::ZERO,
        };
        if first.parallel.is_none() {
            return Ok(at_once(first, None));
        }
        // Requests already waiting here for these nodes go first: a newcomer joins the line
        // rather than take a slot another replica freed before the line sees it.
        let behind = self.store.is_some() && self.lock().any(|w| ranked.iter().any(|n| w.fits(n)));
        let shared = if behind {
            Shared::Full
        } else {
            self.take_shared(ranked).await
        };
        let local = match shared {
            Shared::Taken(granted) => {
                self.observe_wait(asker.team, Duration::ZERO);
                return Ok(granted);
            }
            Shared::Full => false,
            Shared::NoStore => true,
            Shared::Failed => match self.store.as_ref().map(|s| s.on_error()) {
                Some(OnStoreError::Deny) => return Err(NoSlot::StoreDown),
                Some(OnStoreError::Allow) => return Ok(at_once(first, None)),
                _ => true,
            },
        };
        let started = Instant::now();
        let (timeout, rx, ticket) = {
            let mut line = self.lock();
            if local {
                for node in ranked {
                    if node.parallel.is_none() {
                        return Ok(at_once(node, None));
                    }
                    if node.try_take_slot() {
                        self.observe_wait(asker.team, Duration::ZERO);
                        return Ok(at_once(node, Some(self.hold(node.clone(), Kind::Local))));
                    }
                }
            } else if let Some(free) = ranked.iter().find(|n| n.parallel.is_none()) {
                return Ok(at_once(free, None));
            }
            let cfg = self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone();
            let team_full = asker
                .max_queued
                .is_some_and(|cap| line.depth(asker.team) >= cap as usize);
            if line.len() >= cfg.max_queued as usize || team_full {
                drop(line);
                return Err(self.refused(asker.team, NoSlot::Full, Duration::ZERO));
            }
            let (tx, rx) = oneshot::channel();
            let waiter = Waiter {
                model: model.map(str::to_string),
                nodes: ranked.to_vec(),
                team: asker.team.to_string(),
                tx,
            };
            let ticket = line.push(asker.team, asker.weight, waiter);
            self.kick.notify_one();
            self.metrics
                .queue_depth
                .with_label_values(&[asker.team])
                .inc();
            (cfg.queue_timeout.0, rx, ticket)
        };
        // Out of line however this ends, the request's task dropped included.
        let mut in_line = InLine {
            scheduler: self,
            team: asker.team,
            ticket: Some(ticket),
        };
        let outcome = tokio::select! {
            granted = rx => granted.ok(),
            () = tokio::time::sleep(timeout) => None,
            () = gone => {
                in_line.leave();
                return Err(NoSlot::Gone);
            }
        };
        in_line.leave();
        let waited = started.elapsed();
        match outcome {
            Some(slot) => {
                self.observe_wait(asker.team, waited);
                let node = slot.held.as_ref().map(|(n, _)| n.clone());
                match node {
                    Some(node) => Ok(Granted {
                        node,
                        slot: Some(slot),
                        waited,
                    }),
                    None => Err(NoSlot::Timeout),
                }
            }
            None => Err(self.refused(asker.team, NoSlot::Timeout, waited)),
        }
    }

    /// Takes a waiting request out of line (its slot, if one was handed to it meanwhile, goes
    /// on to the next when the channel drops it).
    fn leave(&self, team: &str, ticket: Ticket) {
        if self.lock().remove(team, ticket).is_some() {
            self.metrics.queue_depth.with_label_values(&[team]).dec();
        }
    }

    fn observe_wait(&self, team: &str, waited: Duration) {
        self.metrics
            .queue_wait
            .with_label_values(&[team])
            .observe(waited.as_secs_f64());
    }

    fn refused(&self, team: &str, why: NoSlot, waited: Duration) -> NoSlot {
        if let Some(reason) = why.reason() {
            self.metrics
                .queue_rejected
                .with_label_values(&[team, reason])
                .inc();
        }
        if why == NoSlot::Timeout {
            self.observe_wait(team, waited);
        }
        why
    }

    /// A slot in the store on the first of `ranked` with one free (one round trip).
    async fn take_shared(self: &Arc<Self>, ranked: &[Arc<Node>]) -> Shared {
        let Some(store) = &self.store else {
            return Shared::NoStore;
        };
        let Some(redis) = store.redis() else {
            return Shared::Failed;
        };
        // Up to the first node without a slot limit: it takes the request if these are full.
        let limited: Vec<(&str, u32)> = ranked
            .iter()
            .map_while(|n| n.parallel.map(|p| (n.name.as_str(), p)))
            .collect();
        let lease = store.new_lease();
        let started = Instant::now();
        let taken = redis.take_slot(&limited, &lease, store.lease_ttl()).await;
        store.observe("slot", started, taken.as_ref().err());
        match taken {
            Ok(Some(i)) => {
                let node = ranked[i].clone();
                store.hold(&lease, redis.node_slots(&node.name));
                Shared::Taken(Granted {
                    slot: Some(self.hold(node.clone(), Kind::Shared(lease))),
                    node,
                    waited: Duration::ZERO,
                })
            }
            Ok(None) => Shared::Full,
            Err(_) => {
                // The script may have run after all: the lease is let go, not left to lapse.
                for (name, _) in &limited {
                    store.let_go_late(&lease, redis.node_slots(name));
                }
                Shared::Failed
            }
        }
    }

    /// Looks for free slots for requests waiting here: ones other replicas freed (shared
    /// store), and ones a request could not use until now (its node came back, or listed its
    /// model).
    async fn poll(self: &Arc<Self>, pool: &Pool) {
        let redis = self.store.as_ref().and_then(|s| s.redis());
        for node in pool.nodes().iter() {
            let Some(parallel) = node.parallel else {
                continue;
            };
            loop {
                if !self.lock().any(|w| w.fits(node)) {
                    break;
                }
                let (Some(store), Some(redis)) = (&self.store, &redis) else {
                    // This process's own count (no store, or on_store_error = "local").
                    if !node.try_take_slot() {
                        break;
                    }
                    self.offer(node.clone(), Kind::Local);
                    continue;
                };
                let lease = store.new_lease();
                let started = Instant::now();
                let taken = redis
                    .take_slot(&[(&node.name, parallel)], &lease, store.lease_ttl())
                    .await;
                store.observe("slot", started, taken.as_ref().err());
                match taken {
                    Ok(Some(_)) => {
                        store.hold(&lease, redis.node_slots(&node.name));
                        self.offer(node.clone(), Kind::Shared(lease));
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // The script may have run after all: let the lease go, not lapse.
                        store.let_go_late(&lease, redis.node_slots(&node.name));
                        break;
                    }
                }
            }
        }
    }
}

/// A request in line; taken out when dropped (its task may be dropped while it waits).
struct InLine<'a> {
    scheduler: &'a Scheduler,
    team: &'a str,
    ticket: Option<Ticket>,
}

impl InLine<'_> {
    fn leave(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.scheduler.leave(self.team, ticket);
        }
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

enum Shared {
    Taken(Granted),
    Full,
    NoStore,
    Failed,
}

/// Hands free slots to requests waiting here that no slot's end would reach: slots other
/// replicas freed (shared store), nodes that came back or now list the model.
pub(crate) struct LineKeeper {
    pub(crate) scheduler: Arc<Scheduler>,
    pub(crate) pool: Arc<Pool>,
}

#[async_trait]
impl BackgroundService for LineKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            // Asleep while nobody waits: an idle gateway is not woken 20 times a second.
            tokio::select! {
                () = self.scheduler.kick.notified() => {}
                _ = shutdown.changed() => return,
            }
            while self.scheduler.waiting() > 0 {
                if !crate::clock::pause(POLL, &mut shutdown).await {
                    return;
                }
                self.scheduler.poll(&self.pool).await;
            }
        }
    }
}

/// The scheduler's path when a slot is free, on its own, for `benches/hot_paths.rs`: one node,
/// with `parallel` slots or none.
#[doc(hidden)]
pub struct FreeSlotPath {
    scheduler: Arc<Scheduler>,
    nodes: Vec<Arc<Node>>,
}

impl FreeSlotPath {
    pub fn new(parallel: Option<u32>) -> FreeSlotPath {
        let cfg = crate::config::Config::default();
        let mut node = cfg.upstream.node_list().remove(0);
        node.parallel = parallel;
        FreeSlotPath {
            scheduler: Scheduler::new(cfg.scheduler.clone(), None, Arc::new(Metrics::new(&cfg))),
            nodes: vec![super::pool::make_node(node, &cfg.upstream)],
        }
    }

    /// Takes a slot (one is always free, so nothing waits) and gives it back; true when the
    /// request went at once.
    pub fn take_and_give_back(&self) -> bool {
        let asker = Asker {
            team: "bench",
            weight: 1,
            max_queued: None,
        };
        let acquire = self.scheduler.acquire(
            &self.nodes,
            Some("llama3.2:latest"),
            &asker,
            std::future::pending(),
        );
        let mut acquire = std::pin::pin!(acquire);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(
            acquire.as_mut().poll(&mut cx),
            std::task::Poll::Ready(Ok(ref g)) if g.waited.is_zero()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(max_queued: u32) -> Arc<Scheduler> {
        let cfg = crate::config::Config::default();
        let sched = SchedulerConfig {
            queue_timeout: crate::config::HumanDuration::secs(30),
            max_queued,
        };
        Scheduler::new(sched, None, Arc::new(Metrics::new(&cfg)))
    }

    fn node(name: &str, parallel: Option<u32>) -> Arc<Node> {
        let cfg = crate::config::UpstreamConfig::default();
        let mut n = cfg.node_list().remove(0);
        n.name = name.into();
        n.parallel = parallel;
        super::super::pool::make_node(n, &cfg)
    }

    fn asker(team: &str) -> Asker<'_> {
        Asker {
            team,
            weight: 1,
            max_queued: None,
        }
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_waiting_request_and_a_full_line_refuses() {
        let sched = scheduler(1);
        let a = node("a", Some(1));
        let nodes = [a.clone()];
        let first = sched
            .acquire(&nodes, None, &asker("t"), std::future::pending())
            .await
            .unwrap();
        assert!(first.slot.is_some() && first.waited.is_zero());
        let waiting = {
            let sched = sched.clone();
            let nodes = nodes.clone();
            tokio::spawn(async move {
                sched
                    .acquire(&nodes, None, &asker("t"), std::future::pending())
                    .await
                    .map(|g| g.node.name.clone())
            })
        };
        while sched.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = sched
            .acquire(&nodes, None, &asker("u"), std::future::pending())
            .await;
        assert_eq!(refused.err(), Some(NoSlot::Full), "max_queued = 1 in all");
        drop(first);
        assert_eq!(waiting.await.unwrap().ok(), Some("a".to_string()));
        assert_eq!(
            a.slots_taken(),
            0,
            "the handed-over slot was given back when it ended"
        );
    }

    #[tokio::test]
    async fn a_node_without_slots_takes_requests_at_once_and_a_leaver_is_taken_out() {
        let sched = scheduler(10);
        let free = node("free", None);
        let granted = sched
            .acquire(&[free], None, &asker("t"), std::future::pending())
            .await
            .unwrap();
        assert!(granted.slot.is_none(), "nothing to hold");
        let busy = node("busy", Some(1));
        let _held = sched
            .acquire(
                std::slice::from_ref(&busy),
                None,
                &asker("t"),
                std::future::pending(),
            )
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let leaver = {
            let (sched, busy) = (sched.clone(), busy.clone());
            tokio::spawn(async move {
                let gone = async {
                    let _ = rx.await;
                };
                sched.acquire(&[busy], None, &asker("t"), gone).await.err()
            })
        };
        while sched.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        tx.send(()).unwrap();
        assert_eq!(leaver.await.unwrap(), Some(NoSlot::Gone));
        assert_eq!(sched.waiting(), 0, "out of line");
    }

    #[tokio::test]
    async fn one_node_serves_its_line_whatever_it_lists_and_a_dropped_waiter_leaves() {
        let sched = scheduler(10);
        let only = node("only", Some(1));
        // Its list lacks the model: routing sends everything to a single node anyway (Ollama
        // answers 404 itself), so the line must too.
        only.set_lists(&super::super::node::Listed::default());
        let nodes = [only.clone()];
        let first = sched
            .acquire(
                &nodes,
                Some("typo:latest"),
                &asker("t"),
                std::future::pending(),
            )
            .await
            .unwrap();
        let waiting = {
            let (sched, nodes) = (sched.clone(), nodes.clone());
            tokio::spawn(async move {
                sched
                    .acquire(
                        &nodes,
                        Some("typo:latest"),
                        &asker("t"),
                        std::future::pending(),
                    )
                    .await
                    .is_ok()
            })
        };
        while sched.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(waiting.await.unwrap(), "the freed slot reached it");

        let _held = sched
            .acquire(&nodes, None, &asker("t"), std::future::pending())
            .await
            .unwrap();
        let dropped = {
            let (sched, nodes) = (sched.clone(), nodes.clone());
            tokio::spawn(async move {
                let _ = sched
                    .acquire(&nodes, None, &asker("t"), std::future::pending())
                    .await;
            })
        };
        while sched.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        dropped.abort();
        let _ = dropped.await;
        assert_eq!(
            sched.waiting(),
            0,
            "a request whose task was dropped is out of line"
        );
    }

    #[test]
    fn the_free_slot_path_never_waits() {
        assert!(FreeSlotPath::new(Some(4)).take_and_give_back());
        assert!(FreeSlotPath::new(None).take_and_give_back());
    }
}
