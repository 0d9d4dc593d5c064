//! Each node's background work (its health probe, its preloader, the resolver of its host name)
//! runs for as long as the node is in the pool. With `upstream.discover`, the pool is kept equal
//! to the addresses the DNS name resolves to: a new address is a node that joins (probed, then
//! routed to), a missing one a node that leaves.

use super::node::Node;
use super::pins::Pins;
use super::pool::{discovered_node, Pool};
use super::preload::Preloader;
use super::probe::Probe;
use super::Resolver;
use crate::config::{DiscoverConfig, PreloadConfig};
use crate::telemetry::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often a discovery name is resolved again (pods come and go).
const DISCOVER_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) struct Supervisor {
    pub(crate) pool: Arc<Pool>,
    pub(crate) pins: Arc<Pins>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) preload: PreloadConfig,
}

/// The tasks of one node.
struct Running {
    node: Arc<Node>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn spawn<S: BackgroundService + Send + Sync + 'static>(
    service: S,
    shutdown: &ShutdownWatch,
) -> JoinHandle<()> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move { service.start(shutdown).await })
}

impl Supervisor {
    /// Starts the work of a node that joined.
    fn run(&self, node: &Arc<Node>, shutdown: &ShutdownWatch) -> Running {
        let name = node.name.as_str();
        self.metrics.upstream_up.with_label_values(&[name]).set(0);
        // Its series are resolved now, while it is in the pool (see `NodeSeries`).
        node.series(&self.metrics).inflight.set(0);
        self.metrics
            .upstream_slots
            .with_label_values(&[name])
            .set(node.parallel.unwrap_or(0).into());
        self.pins.add_node(name, &node.placement);
        let probe = Probe::new(
            node.clone(),
            self.pool.clone(),
            self.metrics.clone(),
            self.pins.clone(),
        );
        let mut tasks = vec![spawn(probe, shutdown)];
        if node.upstream.needs_dns() {
            tasks.push(spawn(Resolver(node.upstream.clone()), shutdown));
        }
        if !self.preload.models.is_empty() {
            let preloader = Preloader::new(
                node.clone(),
                self.pool.clone(),
                self.pins.clone(),
                self.metrics.clone(),
                &self.preload,
            );
            tasks.push(spawn(preloader, shutdown));
        }
        Running {
            node: node.clone(),
            tasks,
        }
    }

    /// Stops the work of a node that left, and forgets its series.
    fn forget(&self, running: Running) {
        let name = running.node.name.as_str();
        // Its tasks (probe, preloader and its pulls) are aborted as `running` drops.
        self.metrics.forget_node(name, &self.pins.names(name));
        self.pins.remove_node(name);
    }

    /// Makes the running work match the pool.
    fn sync(&self, running: &mut HashMap<String, Running>, shutdown: &ShutdownWatch) {
        let nodes = self.pool.nodes();
        let gone: Vec<String> = running
            .keys()
            .filter(|name| !nodes.iter().any(|n| &n.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = running.remove(&name) {
                tracing::info!(node = %name, "node left the pool");
                self.forget(r);
            }
        }
        for node in nodes.iter() {
            if !running.contains_key(&node.name) {
                running.insert(node.name.clone(), self.run(node, shutdown));
            }
        }
    }

    /// Resolves the discovery name and makes the pool its addresses. A failed or empty answer
    /// keeps the nodes there are (a DNS hiccup must not empty the pool).
    async fn discover(&self, d: &DiscoverConfig, failures: &mut u32) {
        let Some((host, port)) = d.host_port() else {
            return;
        };
        let addrs: BTreeSet<std::net::SocketAddr> = match tokio::net::lookup_host((host, port))
            .await
        {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                *failures += 1;
                if *failures == 1 || *failures % 30 == 0 {
                    tracing::warn!(dns = %d.dns, error = %e, "cannot resolve upstream.discover.dns; keeping the nodes known");
                }
                return;
            }
        };
        if addrs.is_empty() {
            return;
        }
        *failures = 0;
        let current = self.pool.nodes();
        if let Some(next) = converge(&current, &addrs, d.parallel, self.pool.config()) {
            self.pool.replace(next);
        }
    }
}

/// The nodes for the addresses a discovery name resolves to: the node of an address still there
/// is kept (its health, lists and requests in flight with it), a new address makes a new node.
/// `None` when nothing changed.
fn converge(
    current: &[Arc<Node>],
    addrs: &BTreeSet<std::net::SocketAddr>,
    parallel: Option<u32>,
    cfg: &crate::config::UpstreamConfig,
) -> Option<Vec<Arc<Node>>> {
    let next: Vec<Arc<Node>> = addrs
        .iter()
        .filter_map(|addr| {
            let name = super::pool::discovered_name(addr.ip());
            current
                .iter()
                .find(|n| n.name == name && n.upstream.url.port == addr.port())
                .cloned()
                .or_else(|| {
                    let node = discovered_node(*addr, parallel, cfg);
                    match &node {
                        Some(_) => tracing::info!(node = %name, %addr, "node joined the pool"),
                        None => tracing::warn!(%addr, "skipped: not an address corral can reach as http://ADDRESS:PORT"),
                    }
                    node
                })
        })
        .collect();
    let same =
        next.len() == current.len() && next.iter().zip(current).all(|(a, b)| Arc::ptr_eq(a, b));
    (!same).then_some(next)
}

#[async_trait]
impl BackgroundService for Supervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut running = HashMap::new();
        let mut failures = 0;
        let discover = self.pool.config().discover.clone();
        loop {
            if let Some(d) = &discover {
                self.discover(d, &mut failures).await;
            }
            self.sync(&mut running, &shutdown);
            let wait = match discover {
                Some(_) => DISCOVER_INTERVAL,
                None => Duration::from_secs(3600),
            };
            if !crate::clock::pause(wait, &mut shutdown).await {
                // Dropping the work aborts its tasks (they stop on shutdown anyway).
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_follows_the_addresses_a_name_resolves_to() {
        let cfg = crate::config::UpstreamConfig::default();
        let addrs = |list: &[&str]| -> BTreeSet<std::net::SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        let first = converge(
            &[],
            &addrs(&["10.0.0.1:11434", "10.0.0.2:11434"]),
            Some(2),
            &cfg,
        )
        .unwrap();
        let names: Vec<&str> = first.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["10-0-0-1", "10-0-0-2"]);
        assert_eq!(first[0].parallel, Some(2));
        assert!(
            converge(
                &first,
                &addrs(&["10.0.0.2:11434", "10.0.0.1:11434"]),
                Some(2),
                &cfg
            )
            .is_none(),
            "the same addresses change nothing"
        );
        // One pod replaced by another: the node still there is the same node.
        let next = converge(
            &first,
            &addrs(&["10.0.0.2:11434", "10.0.0.3:11434"]),
            Some(2),
            &cfg,
        )
        .unwrap();
        assert!(Arc::ptr_eq(&next[0], &first[1]), "kept with its state");
        assert_eq!(next[1].name, "10-0-0-3");
        assert_eq!(next[1].upstream.url.to_string(), "http://10.0.0.3:11434");
        // An address that left and came back is a new node: nothing of the old one (its health,
        // its metric series, forgotten when it left) carries over.
        let metrics = crate::telemetry::metrics::Metrics::new(&crate::config::Config::default());
        let exported = || String::from_utf8(metrics.encode()).unwrap();
        first[0].series(&metrics).inflight.inc();
        metrics.forget_node(&first[0].name, &[]);
        let back = converge(
            &next,
            &addrs(&["10.0.0.1:11434", "10.0.0.2:11434", "10.0.0.3:11434"]),
            Some(2),
            &cfg,
        )
        .unwrap();
        assert_eq!(back[0].name, "10-0-0-1");
        assert!(!Arc::ptr_eq(&back[0], &first[0]), "a new node");
        assert!(!exported().contains("10-0-0-1"), "forgotten");
        back[0].series(&metrics).inflight.inc();
        assert!(
            exported().contains(r#"corral_upstream_inflight{node="10-0-0-1"} 1"#),
            "its series are resolved anew, not the old node's detached ones"
        );
    }
}
