//! The upstream health probe: asks Ollama for `/api/tags` every few seconds, keeping
//! `corral_upstream_up` true to whether it answers, and the model label set true to what it has.

use crate::telemetry::metrics::Metrics;
use crate::upstream_client::UpstreamClient;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Probe {
    pub client: UpstreamClient,
    pub metrics: Arc<Metrics>,
}

impl Probe {
    /// One probe: `true` when Ollama answered with its model list.
    pub async fn run_once(&self) -> bool {
        match self
            .client
            .request("GET", "/api/tags", None, PROBE_TIMEOUT)
            .await
        {
            Ok(answer) if answer.status == 200 => {
                let names = answer
                    .json()
                    .and_then(|v| v["models"].as_array().cloned())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|m| m["name"].as_str().map(str::to_string));
                self.metrics.set_upstream_models(names);
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
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
