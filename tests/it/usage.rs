//! Known traffic through corral to the double: the access log and `/metrics` must say exactly
//! what the double produced; `/v1` streams look exactly as Ollama would send them.

use crate::common::*;
use serde_json::{json, Value};

async fn gateway() -> (OllamaDouble, Corral) {
    let double = double_with(|c| {
        c.token_delay = std::time::Duration::from_millis(2);
        c.models.push(ModelSpec::chat("flaky").failing_after(3));
    })
    .await;
    let corral = Corral::start(test_config(&double.url()));
    (double, corral)
}

/// Sends a request, reads the whole answer, returns (request id, body text).
async fn call(corral: &Corral, path: &str, body: Value) -> (String, String) {
    let resp = corral
        .client()
        .post(format!("{}{path}", corral.base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    (id, resp.text().await.unwrap())
}

fn sse_data(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_in_the_log_and_metrics_is_what_ollama_reported() {
    let (_double, corral) = gateway().await;
    let msgs = json!([{"role": "user", "content": "why is the sky blue"}]); // 5 words
                                                                            // (path, body, prompt tokens, completion tokens) as the double counts them.
    let traffic: Vec<(&str, Value, Option<u64>, Option<u64>)> = vec![
        (
            "/api/chat",
            json!({"model": "llama3.2", "messages": msgs}),
            Some(5),
            Some(12),
        ),
        (
            "/api/generate",
            json!({"model": "llama3.2", "prompt": "hello there", "stream": false, "options": {"num_predict": 4}}),
            Some(2),
            Some(4),
        ),
        (
            "/api/embed",
            json!({"model": "nomic-embed-text", "input": ["a b", "c"]}),
            Some(3),
            None,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": msgs}),
            Some(5),
            Some(12),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": msgs, "stream": true}),
            Some(5),
            Some(12),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "messages": msgs, "stream": true, "max_tokens": 3, "stream_options": {"include_usage": true}}),
            Some(5),
            Some(3),
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.2", "prompt": "one two three", "stream": true}),
            Some(3),
            Some(12),
        ),
        (
            "/v1/responses",
            json!({"model": "llama3.2", "input": "four words right here", "stream": true}),
            Some(4),
            Some(12),
        ),
        (
            "/v1/messages",
            json!({"model": "llama3.2", "max_tokens": 7, "messages": msgs, "stream": true}),
            Some(5),
            Some(7),
        ),
        (
            "/v1/embeddings",
            json!({"model": "nomic-embed-text", "input": "x y"}),
            Some(2),
            None,
        ),
    ];
    let (mut prompt_sum, mut completion_sum) = (0, 0);
    for (path, body, prompt, completion) in &traffic {
        let (id, text) = call(&corral, path, body.clone()).await;
        let line = corral.log_line(&id);
        assert_eq!(
            line["prompt_tokens"].as_u64(),
            *prompt,
            "{path} {body}: {line}"
        );
        assert_eq!(
            line["completion_tokens"].as_u64(),
            *completion,
            "{path} {body}: {line}"
        );
        assert_eq!(line["team"], "test");
        assert!(line["error"].is_null(), "{path}: {line}");
        prompt_sum += prompt.unwrap_or(0);
        completion_sum += completion.unwrap_or(0);
        if *path == "/v1/chat/completions" && body["stream"] == true {
            let asked = body.get("stream_options").is_some();
            let has_usage = sse_data(&text).iter().any(|c| c.get("usage").is_some());
            assert_eq!(
                has_usage,
                asked,
                "usage chunk seen by a client that {} it",
                if asked {
                    "asked for"
                } else {
                    "did not ask for"
                }
            );
        }
    }

    let metrics = corral.metrics().await;
    let team = [("team", "test")];
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_tokens_total",
            &[("team", "test"), ("kind", "prompt")]
        ),
        prompt_sum as f64
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_tokens_total",
            &[("team", "test"), ("kind", "completion")]
        ),
        completion_sum as f64
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_requests_total",
            &[("team", "test"), ("status", "200")]
        ),
        traffic.len() as f64
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_requests_total",
            &[
                ("team", "test"),
                ("model", "llama3.2:latest"),
                ("route", "/api/chat")
            ]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(&metrics, "corral_request_duration_seconds_count", &team),
        traffic.len() as f64
    );
    // Six streamed inference requests above.
    assert_eq!(
        metric_sum(&metrics, "corral_time_to_first_token_seconds_count", &team),
        6.0
    );
    assert_eq!(metric_sum(&metrics, "corral_inflight_requests", &team), 0.0);
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_build_info",
            &[("version", corral::VERSION)]
        ),
        1.0
    );
    assert_eq!(metric_sum(&metrics, "corral_upstream_up", &[]), 1.0);
}

/// A stream with the per-request fields (`id`, `created`, timestamps) blanked.
fn normalized(frames: Vec<Value>) -> Vec<Value> {
    frames
        .into_iter()
        .map(|mut f| {
            for k in ["id", "created"] {
                if let Some(o) = f.as_object_mut() {
                    o.remove(k);
                }
            }
            f
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_usage_is_taken_out_so_clients_see_what_ollama_sends() {
    let (double, corral) = gateway().await;
    let direct = reqwest::Client::new();
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "llama3.2", "stream": true, "prompt": "hi"}),
        ),
    ] {
        let from_ollama = direct
            .post(format!("{}{path}", double.url()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let (id, via_corral) = call(&corral, path, body.clone()).await;
        assert_eq!(
            normalized(sse_data(&via_corral)),
            normalized(sse_data(&from_ollama)),
            "{path}"
        );
        assert!(via_corral.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            corral.log_line(&id)["completion_tokens"],
            12,
            "{path}: corral still counted"
        );
        // And Ollama was asked for the usage.
        let sent = double.requests_to(path).last().unwrap().json().unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }

    // A "no" spelled the way only Go folds (LONG S) is replaced, not left next to corral's "yes"
    // for Ollama to read last; the client's other options stay as sent.
    let body = json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": "hi"}],
                      "stream_options": {"include_u\u{17f}age": false, "other": [1, 2]}});
    let (id, via_corral) = call(&corral, "/v1/chat/completions", body).await;
    assert!(!via_corral.contains("\"usage\""), "{via_corral}");
    assert_eq!(corral.log_line(&id)["completion_tokens"], 12);
    let sent = double
        .requests_to("/v1/chat/completions")
        .last()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        sent["stream_options"],
        json!({"include_usage": true, "other": [1, 2]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_break_off_are_logged_and_counted_as_truncated() {
    let (_double, corral) = gateway().await;
    for (path, body) in [
        (
            "/api/chat",
            json!({"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "flaky", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let (id, text) = call(&corral, path, body).await;
        assert!(text.contains("unexpected EOF"), "{path}: {text}");
        let line = corral.log_line(&id);
        assert_eq!(line["error"], "error_in_stream", "{path}: {line}");
    }
    let metrics = corral.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_truncated_streams_total",
            &[("team", "test")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_truncated_streams_total",
            &[("route", "/api/chat")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_unknown_models_are_counted_with_bounded_labels() {
    let (_double, corral) = gateway().await;
    let anon = corral.anonymous_client();
    anon.get(format!("{}/api/tags", corral.base()))
        .send()
        .await
        .unwrap();
    anon.get(format!("{}/api/tags", corral.base()))
        .bearer_auth("garbage")
        .send()
        .await
        .unwrap();
    // Allowed by the team's "*", unknown to Ollama: the label is "other", not the name.
    let resp = corral
        .client()
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "made-up-model:1b", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    corral
        .client()
        .get(format!("{}/nope", corral.base()))
        .send()
        .await
        .unwrap();

    let metrics = corral.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_auth_failures_total",
            &[("reason", "missing")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_auth_failures_total",
            &[("reason", "malformed")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_requests_total",
            &[("team", "none"), ("status", "401")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_requests_total",
            &[("model", "other"), ("status", "404")]
        ),
        1.0
    );
    assert!(
        !metrics.contains("made-up-model"),
        "an unknown model became a label"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
}
