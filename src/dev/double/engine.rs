//! The generation engine: one model run, its tokens and their pacing, and its [`RunStats`].

use super::models::ModelSpec;
use super::reply::{line, native_error, sse, streamed, Resp, SSE};
use super::state::State;
use crate::ollama::KeepAlive;
use bytes::Bytes;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORDS: &[&str] = &[
    "The",
    "sky",
    "is",
    "blue",
    "because",
    "molecules",
    "in",
    "the",
    "air",
    "scatter",
    "blue",
    "light",
    "from",
    "the",
    "sun",
    "more",
    "than",
    "they",
    "scatter",
    "red",
    "light.",
    "This",
    "is",
    "called",
    "Rayleigh",
    "scattering.",
];

/// Words of text, as the double counts prompt tokens.
pub(crate) fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// What a finished run measured: token counts and timings (nanoseconds), as Ollama's final
/// object reports them.
pub(crate) struct RunStats {
    pub(crate) prompt_eval_count: u64,
    pub(crate) eval_count: u64,
    pub(crate) total_duration: u128,
    pub(crate) load_duration: u128,
    pub(crate) prompt_eval_duration: u128,
    pub(crate) eval_duration: u128,
    pub(crate) done_reason: &'static str,
}

/// One model run: holds the model busy, yields tokens, and counts a disconnect if it is dropped
/// before it finished (the client went away and Ollama cancels the work).
pub(crate) struct Run {
    state: Arc<State>,
    /// The digest of the model's runner.
    runner: String,
    started: Instant,
    loaded_at: Instant,
    pub(crate) prompt_tokens: u64,
    pub(crate) tokens: Vec<String>,
    limited: bool,
    finished: bool,
    fail_after: Option<usize>,
    /// One of the model's `parallel` slots, held until the run ends.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Ollama's answer when a model's queue is full (two spaces, as Ollama writes it).
pub(crate) const SERVER_BUSY: &str =
    "server busy, please try again.  maximum pending requests exceeded";

/// Takes one of the model's slots, waiting in line for it as Ollama's scheduler does (the wait
/// ends if the client leaves: the future is dropped). A full line is a 503 at once.
async fn take_slot(
    state: &State,
    spec: &ModelSpec,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Resp> {
    let Some(slots) = state.slots(&spec.digest) else {
        return Ok(None);
    };
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Ok(Some(permit));
    }
    if state.queued.fetch_add(1, Ordering::SeqCst) >= state.max_queue {
        state.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(native_error(
            http::StatusCode::SERVICE_UNAVAILABLE,
            SERVER_BUSY,
        ));
    }
    let permit = slots.acquire_owned().await;
    state.queued.fetch_sub(1, Ordering::SeqCst);
    Ok(permit.ok())
}

impl Run {
    /// Waits for one of the model's slots (`parallel`) and for the model to be loaded (both
    /// cancelled if the client leaves), then is ready to generate `max_tokens` tokens (`None`:
    /// the double's default). `Err`: the model's line is full (503).
    pub(super) async fn start(
        state: &Arc<State>,
        spec: &ModelSpec,
        keep_alive: Option<KeepAlive>,
        prompt_tokens: u64,
        max_tokens: Option<i64>,
    ) -> Result<Run, Resp> {
        let started = Instant::now();
        let slot = take_slot(state, spec).await?;
        let ready_at = state.store().begin(spec, keep_alive, started);
        let mut run = Run {
            state: state.clone(),
            runner: spec.digest.clone(),
            started,
            loaded_at: started,
            prompt_tokens,
            tokens: Vec::new(),
            limited: false,
            finished: false,
            fail_after: spec.fail_after,
            _slot: slot,
        };
        tokio::time::sleep_until(ready_at.into()).await;
        run.loaded_at = Instant::now();
        let n = match max_tokens {
            Some(n) if n >= 0 => {
                run.limited = (n as usize) < state.response_tokens;
                (n as usize).min(state.response_tokens)
            }
            _ => state.response_tokens,
        };
        run.tokens = (0..n)
            .map(|i| {
                let w = WORDS[i % WORDS.len()];
                if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                }
            })
            .collect();
        Ok(run)
    }

    fn delay(&self) -> Duration {
        self.state.token_delay()
    }

    /// Waits as long as generating every token takes (non-streaming answers).
    async fn generate_all(&self) {
        let n = self.tokens.len().saturating_sub(1) as u32;
        tokio::time::sleep(self.delay() * n).await;
    }

    fn text(&self) -> String {
        self.tokens.concat()
    }

    /// A non-streaming answer: generates every token, then finishes with the whole text.
    pub(super) async fn complete(self) -> (String, RunStats) {
        self.generate_all().await;
        let text = self.text();
        (text, self.finish())
    }

    /// Ends the run with a failure (not a disconnect, not a completion).
    fn fail(mut self) {
        self.finished = true;
    }

    /// Marks the run complete and returns what it measured.
    pub(super) fn finish(mut self) -> RunStats {
        self.finished = true;
        self.state.completed.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let load = self.loaded_at - self.started;
        let eval = now - self.loaded_at;
        RunStats {
            prompt_eval_count: self.prompt_tokens,
            eval_count: self.tokens.len() as u64,
            total_duration: (now - self.started).as_nanos().max(1),
            load_duration: load.as_nanos().max(1),
            prompt_eval_duration: 1_000_000,
            eval_duration: eval.as_nanos().max(1),
            done_reason: if self.limited { "length" } else { "stop" },
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            self.state.disconnects.fetch_add(1, Ordering::SeqCst);
        }
        self.state.store().end(&self.runner, Instant::now());
    }
}

/// Sends `frame(i, token)` for each token, `token_delay` apart, then the frames of `last`.
/// Stops (and the dropped [`Run`] counts a disconnect) when the client goes away.
pub(super) fn stream_run(
    run: Run,
    content_type: &'static str,
    mut frame: impl FnMut(usize, &str) -> Vec<Bytes> + Send + 'static,
    last: impl FnOnce(&RunStats, String) -> Vec<Bytes> + Send + 'static,
) -> Resp {
    let is_sse = content_type == SSE;
    let (mut tx, resp) = streamed(content_type);
    tokio::spawn(async move {
        for (i, token) in run.tokens.iter().enumerate() {
            // The delay is read per token: a test can stall a stream that is under way.
            if i > 0 && tx.pause(run.delay()).await.is_err() {
                return;
            }
            if run.fail_after == Some(i) {
                // The runner died: an in-band error, then the stream ends without its marker.
                let message = "an error was encountered while running the model: unexpected EOF";
                let frame = if is_sse {
                    sse(
                        &json!({"error": {"message": message, "type": "api_error", "param": null, "code": null}}),
                    )
                } else {
                    line(&json!({ "error": message }))
                };
                let _ = tx.send_data(frame).await;
                run.fail();
                return;
            }
            for f in frame(i, token) {
                if tx.send_data(f).await.is_err() {
                    return;
                }
            }
        }
        let text = run.text();
        let stats = run.finish();
        for f in last(&stats, text) {
            if tx.send_data(f).await.is_err() {
                return;
            }
        }
    });
    resp
}

/// Deterministic unit-length-ish embedding of `text`.
pub(crate) fn embed_text(text: &str, dims: usize) -> Vec<f32> {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(text.as_bytes());
    (0..dims)
        .map(|i| (hash[i % hash.len()] as f32 / 255.0) * 2.0 - 1.0)
        .collect()
}
