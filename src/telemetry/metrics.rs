//! Prometheus metrics, served on `server.metrics_listen` at `/metrics`.
//!
//! Label values are bounded: `team` is a configured team (or `none`), `route` a route template
//! (or `unmatched`), `model` a model known from the configuration or Ollama's `/api/tags` (else
//! `other`; `none` when the request names no model), `status` an HTTP status code, and `kind`,
//! `reason`, `limit` small fixed sets.

use crate::config::Config;
use crate::ollama::ModelName;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Request durations: milliseconds (refusals) to an hour (long generations).
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0, 3600.0,
];
/// Time to first token: a warm model answers in tens of milliseconds, a cold 70B load takes minutes.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

/// The calls corral makes to the shared store (`corral_state_store_errors_total{op}`).
const STORE_OPS: [&str; 8] = [
    "connect", "admit", "charge", "refund", "renew", "release", "revoked", "slot",
];

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) ttft: HistogramVec,
    pub(crate) tokens: IntCounterVec,
    pub(crate) in_flight: IntGaugeVec,
    pub(crate) auth_failures: IntCounterVec,
    pub(crate) rate_limited: IntCounterVec,
    pub(crate) upstream_errors: IntCounterVec,
    pub(crate) upstream_up: IntGaugeVec,
    pub(crate) upstream_inflight: IntGaugeVec,
    pub(crate) upstream_slots: IntGaugeVec,
    pub(crate) upstream_attempts: IntCounterVec,
    pub(crate) model_loaded: IntGaugeVec,
    pub(crate) preload_duration: GaugeVec,
    pub(crate) model_pull_bytes: IntGaugeVec,
    pub(crate) truncated: IntCounterVec,
    pub(crate) reloads: IntCounterVec,
    pub(crate) connections_open: IntGauge,
    pub(crate) connections_refused: IntCounterVec,
    pub(crate) handshake_failures: IntCounterVec,
    pub(crate) requests_refused: IntCounterVec,
    pub(crate) body_memory: IntGauge,
    pub(crate) store_up: IntGauge,
    pub(crate) store_errors: IntCounterVec,
    pub(crate) oidc_up: IntGaugeVec,
    pub(crate) oidc_refresh: IntCounterVec,
    pub(crate) store_seconds: HistogramVec,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) queue_wait: HistogramVec,
    pub(crate) queue_rejected: IntCounterVec,
    known_models: RwLock<KnownModels>,
    /// The `model` label of a request that names no model.
    none_label: Arc<str>,
    /// The `model` label of a model no configuration names and no node lists.
    other_label: Arc<str>,
}

/// Model names that may be label values, by comparison key (lowercase), with the label each gets:
/// those the configuration names exactly and those Ollama lists.
#[derive(Default)]
struct KnownModels {
    config: HashMap<String, Arc<str>>,
    /// By node.
    upstream: HashMap<String, HashMap<String, Arc<str>>>,
}

fn by_key<I: IntoIterator<Item = String>>(names: I) -> HashMap<String, Arc<str>> {
    names
        .into_iter()
        .filter_map(|m| ModelName::parse(&m))
        .map(|m| (m.key(), Arc::from(m.as_str())))
        .collect()
}

/// Models the configuration names exactly (globs name none).
fn config_models(cfg: &Config) -> HashMap<String, Arc<str>> {
    let teams = cfg.teams.values().flat_map(|t| &t.models);
    by_key(
        cfg.preload
            .models
            .iter()
            .chain(teams.filter(|g| !g.contains('*')))
            .cloned(),
    )
}

/// Registers a metric. The definitions are fixed in this file, so a bad name or one used twice
/// is a bug, and every test that builds [`Metrics`] finds it.
#[allow(
    clippy::expect_used,
    reason = "fixed definitions, checked by every test"
)]
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let m = metric.expect("a valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("each metric registered once");
    m
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        ),
    )
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// How one attempt on a node ended (`corral_upstream_attempts_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttemptOutcome {
    /// The node answered (whatever the status).
    Ok,
    /// No connection, or it broke before the answer, and no other node was left to try.
    ConnectError,
    /// 502 or 503 from Ollama, and no other node was left to try.
    Unavailable,
    /// The attempt failed either way and the request went on to another node.
    Failover,
}

impl AttemptOutcome {
    pub(crate) const ALL: [AttemptOutcome; 4] = [
        AttemptOutcome::Ok,
        AttemptOutcome::ConnectError,
        AttemptOutcome::Unavailable,
        AttemptOutcome::Failover,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::ConnectError => "connect_error",
            AttemptOutcome::Unavailable => "unavailable",
            AttemptOutcome::Failover => "failover",
        }
    }
}

/// A node's series that requests touch: `corral_upstream_inflight` and
/// `corral_upstream_attempts_total` for every outcome (exported at 0 from the start). Resolved
/// once, when the node joins the pool, and kept by the node, so no request looks them up by
/// label, and a request still on a node that left counts into its detached series instead of
/// bringing them back into the exposition ([`Metrics::forget_node`]). A node that comes back is a
/// new node, which resolves them again.
pub(crate) struct NodeSeries {
    pub(crate) inflight: IntGauge,
    attempts: [IntCounter; 4],
}

impl NodeSeries {
    pub(crate) fn attempt(&self, outcome: AttemptOutcome) -> &IntCounter {
        &self.attempts[outcome as usize]
    }
}

impl Metrics {
    pub(crate) fn new(cfg: &Config) -> Metrics {
        let m = Metrics::register(cfg);
        // Every node's series from the start: a node that never answers shows as down, not absent.
        for node in cfg.upstream.node_list() {
            m.upstream_up.with_label_values(&[&node.name]).set(0);
            m.upstream_inflight.with_label_values(&[&node.name]).set(0);
            m.upstream_slots
                .with_label_values(&[&node.name])
                .set(node.parallel.unwrap_or(0).into());
        }
        for team in cfg.teams.keys() {
            m.queue_depth.with_label_values(&[team]).set(0);
            for reason in ["full", "timeout"] {
                m.queue_rejected.with_label_values(&[team, reason]);
            }
        }
        for op in STORE_OPS {
            m.store_errors.with_label_values(&[op]);
        }
        for provider in cfg.auth.oidc.values() {
            m.oidc_up.with_label_values(&[&provider.issuer]).set(0);
            for outcome in ["ok", "error"] {
                m.oidc_refresh
                    .with_label_values(&[&provider.issuer, outcome]);
            }
        }
        m
    }

    fn register(cfg: &Config) -> Metrics {
        let r = Registry::new();
        let upstream_up = gauge(
            &r,
            "corral_upstream_up",
            "1 while the node answers its health probe (down after 3 failures in a row), else 0.",
            &["node"],
        );
        let preload_duration = register(
            &r,
            GaugeVec::new(
                Opts::new(
                    "corral_model_preload_duration_seconds",
                    "How long the last successful preload of a pinned model on the node took.",
                ),
                &["node", "model"],
            ),
        );
        let build_info = gauge(
            &r,
            "corral_build_info",
            "Always 1; the labels say which corral runs.",
            &["version", "commit"],
        );
        build_info
            .with_label_values(&[crate::VERSION, crate::COMMIT])
            .set(1);
        let connections_open = register(
            &r,
            IntGauge::new(
                "corral_connections_open",
                "Client connections open now (TLS handshakes and idle keep-alive included).",
            ),
        );

        let connections_refused = counter(
            &r,
            "corral_connections_refused_total",
            "Client connections closed at once because a cap was reached (max_connections, max_connections_per_ip).",
            &["reason"],
        );
        let handshake_failures = counter(
            &r,
            "corral_tls_handshake_failures_total",
            "TLS handshakes that failed (error) or missed server.header_timeout (timeout).",
            &["reason"],
        );
        let requests_refused = counter(
            &r,
            "corral_requests_refused_total",
            "Requests answered 503 because the gateway was full (max_requests, max_requests_per_ip, body_memory).",
            &["reason"],
        );
        let body_memory = register(
            &r,
            IntGauge::new(
                "corral_request_body_memory_bytes",
                "Request body bytes held in memory now (capped by server.max_body_memory).",
            ),
        );

        Metrics {
            requests: counter(
                &r,
                "corral_requests_total",
                "Requests answered, by team, model, route and status.",
                &["team", "model", "route", "status"],
            ),
            duration: histogram(
                &r,
                "corral_request_duration_seconds",
                "Time from the request's arrival to its last response byte.",
                &["team", "model", "route"],
                DURATION_BUCKETS,
            ),
            ttft: histogram(
                &r,
                "corral_time_to_first_token_seconds",
                "Time from a streamed inference request's arrival to its first token.",
                &["team", "model"],
                TTFT_BUCKETS,
            ),
            tokens: counter(
                &r,
                "corral_tokens_total",
                "Tokens processed (kind: prompt or completion), as Ollama reported them (source: reported) or as corral estimated them for streams that ended without counts (source: estimated).",
                &["team", "model", "kind", "source"],
            ),
            in_flight: gauge(
                &r,
                "corral_inflight_requests",
                "Requests being served now.",
                &["team"],
            ),
            auth_failures: counter(
                &r,
                "corral_auth_failures_total",
                "Requests refused for their API key, by reason.",
                &["reason"],
            ),
            rate_limited: counter(
                &r,
                "corral_rate_limited_total",
                "Requests refused with 429, by team and limit (rpm, tpm, concurrency).",
                &["team", "limit"],
            ),
            upstream_errors: counter(
                &r,
                "corral_upstream_errors_total",
                "Failures talking to Ollama, by kind.",
                &["kind"],
            ),
            upstream_up,
            upstream_inflight: gauge(
                &r,
                "corral_upstream_inflight",
                "Requests corral has in flight on the node.",
                &["node"],
            ),
            upstream_slots: gauge(
                &r,
                "corral_upstream_slots",
                "Requests the node runs at once (its `parallel`; 0: no slot limit).",
                &["node"],
            ),
            upstream_attempts: counter(
                &r,
                "corral_upstream_attempts_total",
                "Attempts to forward a request to a node, by outcome (ok, connect_error, unavailable, failover).",
                &["node", "outcome"],
            ),
            model_loaded: gauge(
                &r,
                "corral_model_loaded",
                "1 when a pinned model is loaded on the node (per its /api/ps), else 0.",
                &["node", "model"],
            ),
            preload_duration,
            model_pull_bytes: gauge(
                &r,
                "corral_model_pull_bytes",
                "Progress of corral's pull of a pinned model a node lacked (preload.pull_missing): bytes completed and in total.",
                &["node", "model", "kind"],
            ),
            truncated: counter(
                &r,
                "corral_truncated_streams_total",
                "Streams that ended without their end marker (done:true, [DONE], ...).",
                &["team", "model", "route"],
            ),
            reloads: counter(
                &r,
                "corral_config_reloads_total",
                "Configuration reloads, by result (ok, error).",
                &["result"],
            ),
            connections_open,
            connections_refused,
            handshake_failures,
            requests_refused,
            body_memory,
            store_up: register(
                &r,
                IntGauge::new(
                    "corral_state_store_up",
                    "1 while the shared state store ([state]) answers, else 0 (always 0 with store = \"local\").",
                ),
            ),
            oidc_up: gauge(
                &r,
                "corral_oidc_jwks_up",
                "1 while the identity provider's last key fetch succeeded, by issuer ([auth.oidc.*]).",
                &["issuer"],
            ),
            oidc_refresh: counter(
                &r,
                "corral_oidc_jwks_refresh_total",
                "Fetches of identity providers' keys (JWKS), by issuer and outcome (ok, error).",
                &["issuer", "outcome"],
            ),
            store_errors: counter(
                &r,
                "corral_state_store_errors_total",
                "Failed or late calls to the shared state store, by operation (connect, admit, charge, refund, renew, release, revoked, slot).",
                &["op"],
            ),
            store_seconds: histogram(
                &r,
                "corral_state_store_seconds",
                "Time of calls to the shared state store, by operation.",
                &["op"],
                &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
            ),
            queue_depth: gauge(
                &r,
                "corral_queue_depth",
                "Requests waiting for a slot on a node, by team.",
                &["team"],
            ),
            queue_wait: histogram(
                &r,
                "corral_queue_wait_seconds",
                "Time requests that needed a slot on a node (parallel) waited for it (0 when one was free; those that timed out too), by team.",
                &["team"],
                DURATION_BUCKETS,
            ),
            queue_rejected: counter(
                &r,
                "corral_queue_rejected_total",
                "Requests refused while waiting for a slot, by team and reason (timeout: 503, full: 429).",
                &["team", "reason"],
            ),
            known_models: RwLock::new(KnownModels {
                config: config_models(cfg),
                upstream: HashMap::new(),
            }),
            none_label: Arc::from("none"),
            other_label: Arc::from("other"),
            registry: r,
        }
    }

    /// The exposition text for `/metrics`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// The `model` label of a (normalized) model name: its known spelling, else `other`.
    /// A shared string, not a copy: this runs for every request.
    pub(crate) fn model_label(&self, model: Option<&str>) -> Arc<str> {
        let Some(m) = model else {
            return self.none_label.clone();
        };
        // The comparison key, lowercased on the stack (a normalized name is ASCII, and within
        // 128 bytes but for unusual hosts).
        let mut buf = [0u8; 128];
        let lowered;
        let key = match buf.get_mut(..m.len()) {
            Some(b) => {
                b.copy_from_slice(m.as_bytes());
                b.make_ascii_lowercase();
                std::str::from_utf8(b).unwrap_or_default()
            }
            None => {
                lowered = m.to_ascii_lowercase();
                &lowered
            }
        };
        let known = self.known_models.read().unwrap_or_else(|e| e.into_inner());
        known
            .upstream
            .values()
            .find_map(|models| models.get(key))
            .or_else(|| known.config.get(key))
            .unwrap_or(&self.other_label)
            .clone()
    }

    /// Models a node has (from its `/api/tags`); they replace its previous list.
    pub(crate) fn set_upstream_models<I: IntoIterator<Item = String>>(
        &self,
        node: &str,
        models: I,
    ) {
        let models = by_key(models);
        self.known_models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .upstream
            .insert(node.to_string(), models);
    }

    /// The node's series that every request to it touches, resolved once (kept by the node)
    /// instead of looked up by label on each request.
    pub(crate) fn node_series(&self, node: &str) -> NodeSeries {
        NodeSeries {
            inflight: self.upstream_inflight.with_label_values(&[node]),
            attempts: AttemptOutcome::ALL
                .map(|o| self.upstream_attempts.with_label_values(&[node, o.label()])),
        }
    }

    /// A node left the pool: its series and its models go (a node found in DNS is named after its
    /// address, so nodes that come and go must not pile up).
    pub(crate) fn forget_node(&self, node: &str, models: &[String]) {
        for gauge in [
            &self.upstream_up,
            &self.upstream_inflight,
            &self.upstream_slots,
        ] {
            let _ = gauge.remove_label_values(&[node]);
        }
        for outcome in AttemptOutcome::ALL {
            let _ = self
                .upstream_attempts
                .remove_label_values(&[node, outcome.label()]);
        }
        for model in models {
            let _ = self.model_loaded.remove_label_values(&[node, model]);
            let _ = self.preload_duration.remove_label_values(&[node, model]);
            for kind in ["completed", "total"] {
                let _ = self
                    .model_pull_bytes
                    .remove_label_values(&[node, model, kind]);
            }
        }
        self.known_models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .upstream
            .remove(node);
    }

    /// Models a (reloaded) configuration names.
    pub(crate) fn set_config_models(&self, cfg: &Config) {
        let config = config_models(cfg);
        self.known_models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .config = config;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_bounded() {
        let mut cfg = Config::default();
        cfg.preload.models = vec!["llama3.2".into()];
        cfg.teams.insert(
            "t".into(),
            crate::config::TeamConfig {
                models: vec!["qwen2.5:7b".into(), "mistral*".into()],
                ..Default::default()
            },
        );
        let m = Metrics::new(&cfg);
        assert_eq!(&*m.model_label(Some("llama3.2:latest")), "llama3.2:latest");
        assert_eq!(&*m.model_label(Some("qwen2.5:7b")), "qwen2.5:7b");
        assert_eq!(
            &*m.model_label(Some("mistral:latest")),
            "other",
            "globs name no model"
        );
        assert_eq!(&*m.model_label(None), "none");
        m.set_upstream_models("default", ["mistral:latest".to_string()]);
        assert_eq!(&*m.model_label(Some("mistral:latest")), "mistral:latest");
        assert_eq!(
            &*m.model_label(Some("llama3.2:latest")),
            "llama3.2:latest",
            "config models stay known"
        );
        assert_eq!(
            &*m.model_label(Some("LLAMA3.2:Latest")),
            "llama3.2:latest",
            "one label whatever the case"
        );
        assert_eq!(&*m.model_label(Some("phi4:latest")), "other");
        cfg.teams.get_mut("t").unwrap().models.push("phi4".into());
        m.set_config_models(&cfg);
        assert_eq!(
            &*m.model_label(Some("phi4:latest")),
            "phi4:latest",
            "a reloaded configuration names it"
        );
        // A name longer than the stack buffer the key is lowered in.
        let long = format!("{}.example/team/model:tag", "h".repeat(140));
        m.set_upstream_models("default", [long.clone()]);
        assert_eq!(&*m.model_label(Some(&long.to_uppercase())), long);
    }

    #[test]
    fn a_node_that_left_loses_its_series_and_has_them_again_when_back() {
        let m = Metrics::new(&Config::default());
        let text = || String::from_utf8(m.encode()).unwrap();
        let answered = r#"corral_upstream_attempts_total{node="10-0-0-11",outcome="ok"} 1"#;
        let series = m.node_series("10-0-0-11");
        for outcome in ["connect_error", "unavailable", "failover"] {
            let zero = format!(
                r#"corral_upstream_attempts_total{{node="10-0-0-11",outcome="{outcome}"}} 0"#
            );
            assert!(text().contains(&zero), "every outcome from the start");
        }
        series.inflight.inc();
        series.attempt(AttemptOutcome::Ok).inc();
        assert!(text().contains(answered), "{}", text());
        assert!(text().contains(r#"corral_upstream_inflight{node="10-0-0-11"} 1"#));
        m.forget_node("10-0-0-11", &[]);
        assert!(!text().contains("10-0-0-11"), "{}", text());
        // A request still on the node that left fails: it does not bring the node back.
        series.attempt(AttemptOutcome::ConnectError).inc();
        series.inflight.dec();
        assert!(!text().contains("10-0-0-11"), "{}", text());
        // The same address found again is a new node, which resolves its series again.
        m.node_series("10-0-0-11").attempt(AttemptOutcome::Ok).inc();
        assert!(text().contains(answered), "{}", text());
    }

    #[test]
    fn exposition_has_the_design_series() {
        let m = Metrics::new(&Config::default());
        m.requests
            .with_label_values(&["t", "none", "/api/tags", "200"])
            .inc();
        m.duration
            .with_label_values(&["t", "none", "/api/tags"])
            .observe(0.01);
        let text = String::from_utf8(m.encode()).unwrap();
        for name in [
            "corral_requests_total",
            "corral_request_duration_seconds_bucket",
            "corral_upstream_up",
            "corral_build_info",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
