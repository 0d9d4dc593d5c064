//! Streams pass through chunk by chunk; slow starts and long streams survive; bodies and headers
//! reach Ollama the way Ollama needs them.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_lines_arrive_while_ollama_is_still_generating() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(400)).await;
    let corral = Corral::start(test_config(&double.url()));
    let mut resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let first = next_chunk(&mut resp).await.unwrap();
    // Causal, not timed: the double has not finished generating, yet a line is here.
    assert_eq!(
        double.completed(),
        0,
        "first chunk only after generation ended: buffered"
    );
    let first: Value =
        serde_json::from_slice(first.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["done"], false);
    let (rest, complete) = rest_text(&mut resp).await;
    assert!(complete);
    let last: Value = serde_json::from_str(rest.trim_end().lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["eval_count"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_frames_arrive_while_ollama_is_still_generating() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(400)).await;
    let corral = Corral::start(test_config(&double.url()));
    let mut resp = corral
        .client()
        .post(format!("{}/v1/chat/completions", corral.base()))
        .json(&json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = next_chunk(&mut resp).await.unwrap();
    assert_eq!(
        double.completed(),
        0,
        "first frame only after generation ended: buffered"
    );
    assert!(first.starts_with(b"data: {"), "{first:?}");
    let (rest, complete) = rest_text(&mut resp).await;
    assert!(complete);
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_slow_to_load_is_waited_for() {
    // llama3.1:70b takes 3 s to load in the double; nothing in corral's path may give up first.
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let resp = corral
        .client()
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.1:70b", "prompt": "hello", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["done"], true);
    assert!(body["load_duration"].as_u64().unwrap() >= 3_000_000_000);
    let line = corral.log_line(&id);
    assert!(line["ttft_ms"].as_u64().unwrap() >= 3000, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_long_silences_is_not_cut() {
    // Token gaps longer than pingora's default downstream timeouts would cut, if any applied.
    let double = double_with(|c| {
        c.token_delay = Duration::from_millis(1500);
        c.response_tokens = 4;
    })
    .await;
    let mut cfg = test_config(&double.url());
    cfg.upstream.read_timeout = corral::config::HumanDuration::secs(5);
    let corral = Corral::start(cfg);
    let mut resp = corral
        .client()
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.2", "prompt": "tell me a story"}))
        .send()
        .await
        .unwrap();
    let (text, complete) = rest_text(&mut resp).await;
    assert!(complete, "stream was cut: {text}");
    assert_eq!(text.lines().count(), 5);
    assert!(text.lines().last().unwrap().contains("\"done\":true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_reach_ollama_intact_over_http1_and_http2() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    // A 5 MiB base64 "image": far past pingora's 64 KiB retry buffer.
    let image = "A".repeat(5 << 20);
    let body = json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "what is this?", "images": [image]}]});
    for client in [
        corral.client_builder().http1_only().build().unwrap(),
        corral.client(),
    ] {
        double.clear_requests();
        let resp = client
            .post(format!("{}/api/chat", corral.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{:?}", resp.version());
        let got = double.requests_to("/api/chat");
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].json().unwrap(),
            body,
            "body altered on {:?}",
            resp.version()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_for_ollama_and_credentials_never_reach_it() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    // The public name as Host: a loopback-bound Ollama answers 403 to it unless corral rewrites.
    let resp = corral
        .anonymous_client()
        .post(format!("{}/api/show?debug=1", corral.public_base()))
        .header("authorization", format!("Bearer {}", corral.key))
        .header("x-api-key", &corral.key)
        .header("cookie", "session=should-not-leak")
        .header("x-forwarded-prefix", "/evil")
        .header("x-forwarded-for", "6.6.6.6")
        .header("origin", "https://evil.example")
        .header("x-request-id", "client-chosen-id.42")
        .json(&json!({"model": "llama3.2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-chosen-id.42");
    let seen = &double.requests_to("/api/show")[0];
    assert_eq!(
        seen.header("host"),
        Some(double.addr().to_string().as_str())
    );
    assert_eq!(seen.target, "/api/show", "query string forwarded");
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-request-id"), Some("client-chosen-id.42"));
    for gone in [
        "authorization",
        "x-api-key",
        "cookie",
        "x-forwarded-prefix",
        "origin",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached Ollama");
    }

    // A malformed id is replaced by corral's own.
    let resp = corral
        .client()
        .get(format!("{}/api/version", corral.base()))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(
        double.requests_to("/api/version")[0].header("x-request-id"),
        Some(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_bodies_are_forwarded() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let resp = corral
        .client()
        .delete(format!("{}/api/delete", corral.base()))
        .json(&json!({"model": "qwen2.5-coder:7b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        double.requests_to("/api/delete")[0].json().unwrap(),
        json!({"model": "qwen2.5-coder:7b"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_access_log_line() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let resp = corral
        .client()
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.2", "prompt": "a secret prompt", "stream": false}))
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    resp.bytes().await.unwrap();
    let line = corral.log_line(&id);
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/api/generate");
    assert_eq!(line["route"], "/api/generate");
    assert_eq!(line["status"], 200);
    assert_eq!(line["model"], "llama3.2:latest");
    assert_eq!(line["stream"], false);
    assert_eq!(line["client_ip"], "127.0.0.1");
    assert!(line["bytes_in"].as_u64().unwrap() > 0 && line["bytes_out"].as_u64().unwrap() > 0);
    // A refusal corral answers itself is logged with what it sent.
    let resp = corral
        .anonymous_client()
        .get(format!("{}/api/tags", corral.base()))
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let sent = resp.bytes().await.unwrap().len() as u64;
    let line = corral.log_line(&id);
    assert_eq!(line["status"], 401);
    assert_eq!(line["bytes_out"], sent, "{line}");
    let all = corral.stdout_lines().join("\n");
    assert!(!all.contains("a secret prompt"), "prompt logged");
}

/// A lone surrogate escape (what a JavaScript client sends for an emoji cut in half) is valid
/// JSON syntax: Ollama's Go decoder reads it as U+FFFD, and corral passes it through untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_surrogate_escape_is_served() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let body = r#"{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"cut \ud83d"}]}"#;
    let resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(status, 200, "{}", resp.text().await.unwrap());
    let seen = double.requests_to("/api/chat").pop().unwrap();
    assert_eq!(seen.body, body.as_bytes(), "forwarded untouched");
    assert_eq!(
        seen.json().unwrap()["messages"][0]["content"],
        "cut \u{fffd}"
    );
}
