//! Pulling a pinned model Ollama does not have (`preload.pull_missing`): `/api/pull`, its NDJSON
//! progress shown in `/readyz` ("pulling 42%"), the log (every 10%) and `corral_model_pull_bytes`,
//! and a backoff between attempts after a failure (10 s, doubling, at most 10 minutes). One pull
//! per model at a time, each in its own task, so a long download never holds up the other models.

use crate::telemetry::metrics::Metrics;
use crate::upstream::client::UpstreamClient;
use crate::upstream::pins::{ModelState, Pins};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Backoff between pulls of a model that failed: 10 s, doubling, at most 10 minutes.
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(600);

/// Progress of one pull, from Ollama's NDJSON lines (one per layer update).
#[derive(Debug, Default)]
struct Progress {
    /// digest → (completed, total)
    layers: BTreeMap<String, (u64, u64)>,
    error: Option<String>,
    success: bool,
}

impl Progress {
    fn line(&mut self, line: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            self.error = Some(e.to_string());
        }
        if v.get("status").and_then(Value::as_str) == Some("success") {
            self.success = true;
        }
        if let (Some(digest), Some(total)) = (
            v.get("digest").and_then(Value::as_str),
            v.get("total").and_then(Value::as_u64),
        ) {
            let completed = v.get("completed").and_then(Value::as_u64).unwrap_or(0);
            self.layers
                .insert(digest.to_string(), (completed.min(total), total));
        }
    }

    /// (completed, total) over every layer announced so far.
    fn bytes(&self) -> (u64, u64) {
        self.layers
            .values()
            .fold((0, 0), |(c, t), (lc, lt)| (c + lc, t + lt))
    }
}

/// A pull that failed, and when it may be tried again.
#[derive(Debug, Clone)]
struct Retry {
    at: Instant,
    backoff: Duration,
    why: String,
}

/// Which pulls are under way, and which wait out a backoff.
#[derive(Default)]
pub(crate) struct Pulls {
    running: Mutex<HashSet<String>>,
    failed: Mutex<HashMap<String, Retry>>,
}

/// Whether a pull of a model may start now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Start {
    Now,
    /// One is under way already.
    Running,
    /// The last one failed (why, with when the next may start).
    Waiting(String),
}

impl Pulls {
    /// Claims the pull of `model` if none is running and no backoff holds it back.
    pub(crate) fn start(&self, model: &str) -> Start {
        if let Some(r) = lock(&self.failed)
            .get(model)
            .filter(|r| Instant::now() < r.at)
        {
            let wait = r.at.saturating_duration_since(Instant::now());
            return Start::Waiting(format!(
                "{} (pulling again in {}s)",
                r.why,
                wait.as_secs() + 1
            ));
        }
        if lock(&self.running).insert(model.to_string()) {
            Start::Now
        } else {
            Start::Running
        }
    }

    /// A pull ended: done, or failed with a reason (the backoff grows). Returns the wait before
    /// the next attempt after a failure.
    pub(crate) fn finish(&self, model: &str, outcome: &Result<(), String>) -> Option<Duration> {
        lock(&self.running).remove(model);
        let mut failed = lock(&self.failed);
        match outcome {
            Ok(()) => {
                failed.remove(model);
                None
            }
            Err(why) => {
                let backoff = failed
                    .get(model)
                    .map_or(BACKOFF_START, |r| (r.backoff * 2).min(BACKOFF_MAX));
                let retry = Retry {
                    at: Instant::now() + backoff,
                    backoff,
                    why: why.clone(),
                };
                failed.insert(model.to_string(), retry);
                Some(backoff)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pulls `model`, following its progress into `pins` and the metrics. `read_timeout` bounds the
/// silence between two progress lines. `Err`: why it failed (Ollama's reason, or the download
/// broke off).
pub(crate) async fn pull(
    client: &UpstreamClient,
    (pins, node): (&Pins, &str),
    metrics: &Metrics,
    model: &str,
    read_timeout: Duration,
) -> Result<(), String> {
    tracing::info!(model, node, "pinned model missing from Ollama; pulling it");
    // After a failure, /readyz keeps saying why until the new attempt makes progress.
    if !matches!(pins.get(node, model), Some(ModelState::Failed(_))) {
        pins.set(
            node,
            model,
            ModelState::Pulling {
                completed: 0,
                total: 0,
            },
        );
    }
    let gauge = |kind: &str| {
        metrics
            .model_pull_bytes
            .with_label_values(&[node, model, kind])
    };
    let mut progress = Progress::default();
    let mut logged = 0;
    let started = Instant::now();
    let status = client
        .lines(
            "POST",
            "/api/pull",
            Some(&json!({ "model": model, "stream": true })),
            read_timeout,
            |line| {
                progress.line(line);
                let (completed, total) = progress.bytes();
                if total == 0 {
                    return;
                }
                gauge("completed").set(completed as i64);
                gauge("total").set(total as i64);
                pins.set(node, model, ModelState::Pulling { completed, total });
                let percent = completed.saturating_mul(100) / total;
                if percent >= logged + 10 {
                    logged = percent - percent % 10;
                    tracing::info!(
                        model,
                        node,
                        percent,
                        completed_bytes = completed,
                        total_bytes = total,
                        "pulling"
                    );
                }
            },
        )
        .await
        .map_err(|e| format!("pull broke off: {e}"))?;
    let (_, total) = progress.bytes();
    match (status, progress.success, progress.error) {
        (200, true, None) => {
            tracing::info!(
                model,
                node,
                seconds = started.elapsed().as_secs_f64(),
                total_bytes = total,
                "pulled"
            );
            Ok(())
        }
        (status, _, error) => Err(format!(
            "pull failed: {}",
            error.unwrap_or_else(|| format!("/api/pull answered {status}"))
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_adds_up_the_layers_and_spots_the_end() {
        let mut p = Progress::default();
        for line in [
            r#"{"status":"pulling manifest"}"#,
            r#"{"status":"pulling a","digest":"sha256:a","total":1000}"#,
            r#"{"status":"pulling a","digest":"sha256:a","total":1000,"completed":500}"#,
            r#"{"status":"pulling b","digest":"sha256:b","total":24,"completed":24}"#,
            "not json",
        ] {
            p.line(line.as_bytes());
        }
        assert_eq!(p.bytes(), (524, 1024));
        assert!(!p.success);
        p.line(br#"{"status":"success"}"#);
        assert!(p.success && p.error.is_none());
        p.line(br#"{"error":"pull model manifest: file does not exist"}"#);
        assert_eq!(
            p.error.as_deref(),
            Some("pull model manifest: file does not exist")
        );
    }

    #[test]
    fn one_pull_at_a_time_and_a_growing_backoff_after_failures() {
        let pulls = Pulls::default();
        assert_eq!(pulls.start("m"), Start::Now);
        assert_eq!(pulls.start("m"), Start::Running);
        assert_eq!(pulls.start("other"), Start::Now);
        let first = pulls.finish("m", &Err("pull failed: x".into()));
        assert_eq!(first, Some(BACKOFF_START));
        assert!(
            matches!(pulls.start("m"), Start::Waiting(why) if why.starts_with("pull failed: x"))
        );
        // The backoff doubles with each failure, up to its cap.
        let mut last = first.unwrap();
        for _ in 0..10 {
            lock(&pulls.failed).get_mut("m").unwrap().at = Instant::now();
            assert_eq!(pulls.start("m"), Start::Now);
            let next = pulls.finish("m", &Err("again".into())).unwrap();
            assert_eq!(next, (last * 2).min(BACKOFF_MAX));
            last = next;
        }
        assert_eq!(last, BACKOFF_MAX);
        lock(&pulls.failed).get_mut("m").unwrap().at = Instant::now();
        assert_eq!(pulls.start("m"), Start::Now);
        assert_eq!(pulls.finish("m", &Ok(())), None);
        assert_eq!(pulls.start("m"), Start::Now, "a success clears the backoff");
    }
}
