//! The upstream health probe: asks Ollama for `/api/tags` every few seconds, keeping
//! `corral_upstream_up` true to whether it answers, the model label set true to what it has, and
//! the other names of the pinned models known.

use crate::telemetry::metrics::Metrics;
use crate::upstream::client::UpstreamClient;
use crate::upstream::pins::Pins;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Probe {
    pub(crate) client: UpstreamClient,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pins: Arc<Pins>,
}

impl Probe {
    /// One probe: `true` when Ollama answered with its model list.
    pub(crate) async fn run_once(&self) -> bool {
        match self
            .client
            .request("GET", "/api/tags", None, PROBE_TIMEOUT)
            .await
        {
            Ok(answer) if answer.status == 200 => {
                let models = answer
                    .json()
                    .and_then(|v| v["models"].as_array().cloned())
                    .unwrap_or_default();
                let tags = models.iter().filter_map(|m| {
                    Some((m["name"].as_str()?, m["digest"].as_str().unwrap_or("")))
                });
                self.metrics
                    .set_upstream_models(tags.clone().map(|(name, _)| name.to_string()));
                self.pins
                    .set_aliases(tags.filter(|(_, digest)| !digest.is_empty()));
                true
            }
            Ok(answer) => {
                tracing::debug!(
                    status = answer.status,
                    "upstream health probe: unexpected status"
                );
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream health probe failed");
                false
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Probe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut was_up = None;
        loop {
            let up = self.run_once().await;
            self.metrics.upstream_up.set(up as i64);
            if was_up != Some(up) {
                if up {
                    tracing::info!("upstream answers");
                } else {
                    tracing::warn!("upstream does not answer its health probe (GET /api/tags)");
                }
                was_up = Some(up);
            }
            if !crate::clock::pause(PROBE_INTERVAL, &mut shutdown).await {
                return;
            }
        }
    }
}
