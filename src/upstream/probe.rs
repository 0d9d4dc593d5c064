//! A node's health probe: asks it for `/api/tags` and `/api/ps` every few seconds (and at once
//! after corral changed its models), keeping the node's health and model lists current for
//! routing, `corral_upstream_up{node}` true to whether it answers, the model label set true to
//! what the nodes have, and the other names of the pinned models known.

use crate::telemetry::metrics::Metrics;
use crate::upstream::client::UpstreamClient;
use crate::upstream::node::{Listed, Node};
use crate::upstream::pins::Pins;
use crate::upstream::Pool;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Probe {
    pub(crate) node: Arc<Node>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) client: UpstreamClient,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pins: Arc<Pins>,
}

impl Probe {
    pub(crate) fn new(
        node: Arc<Node>,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        pins: Arc<Pins>,
    ) -> Probe {
        Probe {
            client: UpstreamClient::new(node.upstream.clone()),
            node,
            pool,
            metrics,
            pins,
        }
    }

    /// Reads one list (the `field` array of the answer to `path`).
    async fn list(&self, path: &str, field: &str) -> Result<Vec<Value>, String> {
        let answer = self
            .client
            .request("GET", path, None, PROBE_TIMEOUT)
            .await?;
        if answer.status != 200 {
            return Err(format!("{path} answered {}", answer.status));
        }
        Ok(answer
            .json()
            .and_then(|v| v[field].as_array().cloned())
            .unwrap_or_default())
    }

    /// One probe: `true` when the node answered with its model list.
    pub(crate) async fn run_once(&self) -> bool {
        let tags = match self.list("/api/tags", "models").await {
            Ok(tags) => tags,
            Err(e) => {
                tracing::debug!(node = %self.node.name, error = %e, "health probe failed");
                return false;
            }
        };
        // Without `/api/ps` (an older Ollama) only the loaded list is unknown. `/v1/models` is
        // what a pool's merged `/v1/models` is made of.
        let listed = Listed {
            ps: self.list("/api/ps", "models").await.ok(),
            openai: match self.pool.is_pool() || self.pool.config().discover.is_some() {
                true => self.list("/v1/models", "data").await.ok(),
                false => None,
            },
            tags,
        };
        self.node.set_lists(&listed);
        let tags = listed.tags;
        self.metrics.set_upstream_models(
            &self.node.name,
            tags.iter()
                .filter_map(|m| m["name"].as_str().map(str::to_string)),
        );
        // Other names of the pinned models, on any node.
        let all: Vec<(String, String)> = self
            .pool
            .nodes()
            .iter()
            .flat_map(|n| n.tags().unwrap_or_default())
            .filter_map(|m| {
                let name = m["name"].as_str()?.to_string();
                let digest = m["digest"].as_str().unwrap_or("").to_string();
                (!digest.is_empty()).then_some((name, digest))
            })
            .collect();
        self.pins
            .set_aliases(all.iter().map(|(n, d)| (n.as_str(), d.as_str())));
        true
    }
}

#[async_trait]
impl BackgroundService for Probe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let node = &self.node;
        let up_gauge = self.metrics.upstream_up.with_label_values(&[&node.name]);
        let mut logged = None;
        loop {
            if self.run_once().await {
                node.succeeded();
            } else {
                node.failed();
            }
            let up = node.is_up();
            up_gauge.set(up as i64);
            if logged != Some(up) {
                if up {
                    tracing::info!(node = %node.name, "upstream answers");
                } else {
                    tracing::warn!(node = %node.name, "upstream does not answer its health probe (GET /api/tags); out of routing until it does");
                }
                logged = Some(up);
            }
            let wait = crate::clock::pause(PROBE_INTERVAL, &mut shutdown);
            tokio::select! {
                go_on = wait => if !go_on { return },
                _ = node.refresh.notified() => {}
            }
        }
    }
}
