//! The edges of streams (issue 13): a stream is complete once its end marker has reached the
//! client, whatever the connection does afterwards; a stream without usage is charged an
//! estimate; Ollama's 5xx bodies never reach the client.

use crate::common::raw::{chunk, scripted_upstream, Step};
use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
const NDJSON_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";

/// An SSE stream of `words` tokens, with or without a usage chunk, ending with `[DONE]`.
fn sse_events(words: &[&str], usage: bool) -> Vec<String> {
    let mut events: Vec<String> = words
        .iter()
        .map(|w| format!("data: {}\n\n", json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]})))
        .collect();
    events.push(format!(
        "data: {}\n\n",
        json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    ));
    if usage {
        events.push(format!("data: {}\n\n", json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})));
    }
    events.push("data: [DONE]\n\n".into());
    events
}

fn ndjson_lines() -> Vec<String> {
    vec![
        format!(
            "{}\n",
            json!({"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "done": false})
        ),
        format!(
            "{}\n",
            json!({"model": "llama3.2", "message": {"role": "assistant", "content": ""}, "done": true, "prompt_eval_count": 7, "eval_count": 3})
        ),
    ]
}

fn script(head: &str, pieces: &[String], then: Vec<Step>) -> Vec<Step> {
    let mut steps = vec![Step::Write(head.as_bytes().to_vec())];
    steps.extend(pieces.iter().map(|p| Step::Write(chunk(p))));
    steps.extend(then);
    steps
}

fn chat_stream(route: &str) -> Value {
    let messages = json!([{"role": "user", "content": "hi"}]);
    if route == "/api/chat" {
        json!({"model": "llama3.2", "messages": messages})
    } else {
        json!({"model": "llama3.2", "stream": true, "messages": messages})
    }
}

/// The openai SDK closes its connection as soon as it has read `data: [DONE]`; the ollama
/// client as soon as it has the `done: true` line. When that comes before the upstream's chunk
/// terminator, the stream is still complete: logged without error, charged what it reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_right_after_the_end_marker_has_a_complete_stream() {
    for (route, head, pieces, end) in [
        (
            "/v1/chat/completions",
            SSE_HEAD,
            sse_events(&["Hi", "!"], true),
            "data: [DONE]",
        ),
        ("/api/chat", NDJSON_HEAD, ndjson_lines(), "\"done\":true"),
    ] {
        // The terminator comes long after the end marker.
        let steps = script(
            head,
            &pieces,
            vec![
                Step::Pause(Duration::from_secs(30)),
                Step::Write(b"0\r\n\r\n".to_vec()),
            ],
        );
        let (addr, _server) = scripted_upstream(steps).await;
        let corral = Corral::start(test_config(&format!("http://{addr}")));
        let client = corral.client_builder().http1_only().build().unwrap();
        let mut resp = client
            .post(format!("{}{route}", corral.base()))
            .header("x-request-id", "leaves-at-the-end")
            .json(&chat_stream(route))
            .send()
            .await
            .unwrap();
        let mut text = String::new();
        while !text.contains(end) {
            let c = next_chunk(&mut resp).await.expect("stream open");
            text.push_str(&String::from_utf8_lossy(&c));
        }
        drop(resp);
        drop(client);
        let line = corral.log_line("leaves-at-the-end");
        assert_eq!(line["status"], 200, "{route}: {line}");
        assert!(line["error"].is_null(), "{route}: {line}");
        assert_eq!(line["prompt_tokens"], 7, "{route}: {line}");
        assert_eq!(line["completion_tokens"], 3, "{route}: {line}");
        assert_eq!(line["tokens_estimated"], false, "{route}: {line}");
        let m = corral.metrics().await;
        assert_eq!(metric_sum(&m, "corral_truncated_streams_total", &[]), 0.0);
    }
}

/// An upstream that drops the connection after the end marker, without the chunk terminator:
/// nothing is appended to the stream, it ends properly for the client, and it is no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_drops_the_connection_after_the_end_marker_appends_nothing() {
    for (route, head, pieces) in [
        (
            "/v1/chat/completions",
            SSE_HEAD,
            sse_events(&["Hi", "!"], true),
        ),
        ("/api/chat", NDJSON_HEAD, ndjson_lines()),
    ] {
        let (addr, _server) = scripted_upstream(script(head, &pieces, vec![Step::Close])).await;
        let corral = Corral::start(test_config(&format!("http://{addr}")));
        let resp = corral
            .client()
            .post(format!("{}{route}", corral.base()))
            .header("x-request-id", "dropped-after-the-end")
            .json(&chat_stream(route))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.expect("the stream ends cleanly");
        let mut expected = pieces.concat();
        if route == "/v1/chat/completions" {
            // corral asked for the usage chunk itself, and takes it out again.
            expected = expected.replace(&pieces[pieces.len() - 2], "");
        }
        assert_eq!(body, expected, "{route}: nothing appended");
        let line = corral.log_line("dropped-after-the-end");
        assert!(line["error"].is_null(), "{route}: {line}");
        let m = corral.metrics().await;
        assert_eq!(
            metric_sum(&m, "corral_upstream_errors_total", &[]),
            0.0,
            "{m}"
        );
    }
}

/// A server that never reports usage does not get round `tpm`: its streams are charged an
/// estimate, and the log says the tokens are estimated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_usage_is_charged_an_estimate() {
    let pieces = sse_events(&["one", "two", "three", "four", "five", "six"], false);
    let steps = script(SSE_HEAD, &pieces, vec![Step::Write(b"0\r\n\r\n".to_vec())]);
    let (addr, _server) = scripted_upstream(steps).await;
    let mut cfg = test_config(&format!("http://{addr}"));
    cfg.teams.insert(
        "metered".into(),
        corral::config::TeamConfig {
            models: vec!["*".into()],
            tpm: 20,
            ..Default::default()
        },
    );
    let corral = Corral::start(cfg);
    let key = corral.issue("metered", None, None);
    let client = corral.anonymous_client();
    let send = |id: &'static str| {
        client
            .post(format!("{}/v1/chat/completions", corral.base()))
            .bearer_auth(&key)
            .header("x-request-id", id)
            .json(&chat_stream("/v1/chat/completions"))
            .send()
    };
    let first = send("no-usage").await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    let line = corral.log_line("no-usage");
    assert_eq!(line["tokens_estimated"], true, "{line}");
    // Seven events before [DONE] (six words and the stop chunk) and a prompt estimated from
    // the request body.
    assert_eq!(line["completion_tokens"], 7, "{line}");
    assert!(line["prompt_tokens"].as_u64().unwrap() > 10, "{line}");
    assert!(line["error"].is_null(), "{line}");
    let m = corral.metrics().await;
    assert!(
        metric_sum(
            &m,
            "corral_tokens_total",
            &[("team", "metered"), ("source", "estimated")]
        ) > 17.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(&m, "corral_tokens_total", &[("source", "reported")]),
        0.0
    );
    // Over the 20-token budget now.
    let second = send("over-budget").await.unwrap();
    assert_eq!(second.status(), 429);
}

/// Ollama's own 5xx bodies can name files on the server: the client gets corral's error, in its
/// dialect and with Ollama's status; the log keeps the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollamas_server_errors_are_not_passed_through_verbatim() {
    let double = double_with(|c| c.models.push(ModelSpec::chat("broken").failing_to_load())).await;
    let corral = Corral::start(test_config(&double.url()));
    let client = corral.client();
    for (route, body) in [
        (
            "/api/chat",
            json!({"model": "broken", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "broken", "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let resp = client
            .post(format!("{}{route}", corral.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 500, "{route}");
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains("/usr/share") && !text.contains("cudaMalloc"),
            "{route}: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        let message = if route == "/api/chat" {
            v["error"].as_str().unwrap().to_string()
        } else {
            assert_eq!(v["error"]["type"], "api_error", "{text}");
            v["error"]["message"].as_str().unwrap().to_string()
        };
        assert!(message.contains("model server failed"), "{message}");
        assert_eq!(corral.log_line(&id)["error"], "upstream_failed");
    }
    assert!(
        corral.stderr_text().contains("cudaMalloc failed"),
        "the original is logged"
    );
    // Ollama's 4xx messages are the user's own mistakes: they pass through.
    let resp = client
        .post(format!("{}/api/chat", corral.base()))
        .json(
            &json!({"model": "nomic-embed-text", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("does not support chat"));
}
