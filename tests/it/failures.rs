//! A dead, silent or crashing Ollama gives clear errors in the caller's dialect, and a client that
//! leaves stops the work upstream.

use crate::common::*;
use corral::config::HumanDuration;
use serde_json::{json, Value};
use std::time::Duration;

async fn post(corral: &Corral, path: &str, body: Value) -> (u16, Value, String) {
    let resp = corral
        .client()
        .post(format!("{}{path}", corral.base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

fn chat() -> Value {
    json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_down_is_502_in_both_dialects_without_its_address() {
    let dead = format!("http://127.0.0.1:{}", reserve_port());
    let corral = Corral::start(test_config(&dead));

    let (status, body, text) = post(&corral, "/api/chat", chat()).await;
    assert_eq!(status, 502);
    assert!(
        body["error"].as_str().unwrap().contains("not reachable"),
        "{text}"
    );
    assert!(!text.contains("127.0.0.1"), "address leaked: {text}");

    let (status, body, text) = post(&corral, "/v1/chat/completions", chat()).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["type"], "api_error", "{text}");
    assert!(!text.contains("127.0.0.1"), "address leaked: {text}");

    let (status, body, _) = post(&corral, "/v1/messages", chat()).await;
    assert_eq!(status, 502);
    assert_eq!(body["type"], "error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_ollama_is_504_after_read_timeout_in_both_dialects() {
    let double = double().await;
    double.set_hang(true);
    let mut cfg = test_config(&double.url());
    cfg.upstream.read_timeout = HumanDuration::secs(1);
    let corral = Corral::start(cfg);

    let (status, body, _) = post(
        &corral,
        "/api/generate",
        json!({"model": "llama3.2", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, 504);
    assert_eq!(body["error"], "the model server did not answer within 1s");

    let (status, body, _) = post(
        &corral,
        "/v1/completions",
        json!({"model": "llama3.2", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(
        body["error"]["message"],
        "the model server did not answer within 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_load_longer_than_read_timeout_is_504() {
    let double = double().await; // llama3.1:70b loads in 3 s
    let mut cfg = test_config(&double.url());
    cfg.upstream.read_timeout = HumanDuration::secs(1);
    let corral = Corral::start(cfg);
    let (status, _, _) = post(
        &corral,
        "/api/generate",
        json!({"model": "llama3.1:70b", "prompt": "hi"}),
    )
    .await;
    assert_eq!(status, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_caps_the_whole_exchange_whatever_read_timeout_allows() {
    // read_timeout would allow an hour of silence; request_timeout ends the request long before.
    let double = double_with(|c| c.token_delay = Duration::from_millis(20)).await;
    let mut cfg = test_config(&double.url());
    cfg.upstream.read_timeout = HumanDuration::secs(3600);
    cfg.upstream.request_timeout = HumanDuration::secs(2);
    let corral = Corral::start(cfg);

    // Silent before the first byte: 504 naming the cap.
    double.set_hang(true);
    let (status, body, _) = post(&corral, "/api/chat", chat()).await;
    assert_eq!(status, 504);
    assert_eq!(
        body["error"],
        "the request took longer than the 2s limit of this gateway"
    );
    let (status, body, _) = post(&corral, "/v1/chat/completions", chat()).await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["type"], "api_error");
    double.set_hang(false);

    // A stream that stalls after its first token: ended with an in-band error, and the
    // generation upstream is cancelled.
    let before = double.disconnects();
    let mut resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    next_chunk(&mut resp).await.unwrap();
    double.set_token_delay(Duration::from_secs(3600));
    let (rest, _) = rest_text(&mut resp).await;
    assert!(!rest.contains("\"done\":true"), "{rest}");
    let last: Value = serde_json::from_str(rest.trim_end().lines().last().unwrap()).unwrap();
    assert_eq!(
        last["error"],
        "the request took longer than the 2s limit of this gateway"
    );
    wait_for_async(
        Duration::from_secs(10),
        "the double to see corral leave",
        || async { (double.disconnects() > before).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_dying_mid_stream_ends_the_stream_with_an_error_the_client_sees() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(300)).await;
    let corral = Corral::start(test_config(&double.url()));

    let mut resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&chat())
        .send()
        .await
        .unwrap();
    next_chunk(&mut resp).await.unwrap();
    double.stop();
    let (rest, _) = rest_text(&mut resp).await;
    let last: Value = serde_json::from_str(rest.trim_end().lines().last().unwrap()).unwrap();
    assert!(
        last["error"].as_str().unwrap().contains("not reachable"),
        "{rest}"
    );
    assert!(!rest.contains("\"done\":true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_upstream_generation() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(300)).await;
    let corral = Corral::start(test_config(&double.url()));

    for (path, body) in [
        ("/api/chat", chat()),
        (
            "/v1/chat/completions",
            json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ] {
        let before = double.disconnects();
        let client = corral.client();
        let mut resp = client
            .post(format!("{}{path}", corral.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        next_chunk(&mut resp).await.unwrap();
        drop(resp);
        drop(client);
        wait_for_async(
            Duration::from_secs(10),
            "the double to see the client leave",
            || async { (double.disconnects() > before).then_some(()) },
        )
        .await;
        // An HTTP/2 stream reset is the client leaving, not a bad request.
        assert_eq!(corral.log_line(&id)["error"], "client_closed", "{path}");
    }
    assert_eq!(
        double.completed(),
        0,
        "a generation ran to the end for nobody"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_a_cold_load_cancels_it() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let client = corral.client();
    let req = client
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.1:70b", "prompt": "hi"}))
        .send();
    // Give up while the 3 s load is still going.
    let _ = tokio::time::timeout(Duration::from_millis(800), req).await;
    drop(client);
    wait_for_async(
        Duration::from_secs(10),
        "the double to see the client leave",
        || async { (double.disconnects() == 1).then_some(()) },
    )
    .await;
}
