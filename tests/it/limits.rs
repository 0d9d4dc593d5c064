//! Per-team rate limits: rpm, tpm and concurrency give 429 with Retry-After in the caller's
//! dialect, are counted, and refused requests never reach Ollama.

use crate::common::*;
use corral::config::TeamConfig;
use serde_json::{json, Value};
use std::time::Duration;

async fn gateway(team: TeamConfig) -> (OllamaDouble, Corral, String) {
    let double = double_with(|c| c.token_delay = Duration::from_millis(200)).await;
    let mut cfg = test_config(&double.url());
    cfg.teams.insert(
        "limited".into(),
        TeamConfig {
            models: vec!["*".into()],
            ..team
        },
    );
    cfg.teams.insert(
        "free".into(),
        TeamConfig {
            models: vec!["*".into()],
            ..Default::default()
        },
    );
    let corral = Corral::start(cfg);
    let key = corral.issue("limited", None, None);
    (double, corral, key)
}

fn chat(stream: bool) -> Value {
    json!({"model": "llama3.2", "stream": stream, "messages": [{"role": "user", "content": "one two three four five"}]})
}

async fn post(corral: &Corral, key: &str, path: &str, body: &Value) -> reqwest::Response {
    corral
        .anonymous_client()
        .post(format!("{}{path}", corral.base()))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_is_429_with_retry_after_in_each_dialect() {
    let (double, corral, key) = gateway(TeamConfig {
        rpm: 3,
        ..Default::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            post(&corral, &key, "/api/chat", &chat(false))
                .await
                .status(),
            200
        );
    }
    let before = forwarded(&double).len();
    let resp = post(&corral, &key, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3 requests per minute"));
    let resp = post(&corral, &key, "/api/chat", &chat(false)).await;
    assert_eq!(resp.status(), 429);
    assert!(
        resp.json::<Value>().await.unwrap()["error"].is_string(),
        "Ollama dialect"
    );
    assert_eq!(
        forwarded(&double).len(),
        before,
        "a refused request reached Ollama"
    );
    let rpm = [("team", "limited"), ("limit", "rpm")];
    assert_eq!(
        corral
            .metric_settled("corral_rate_limited_total", &rpm, 2.0)
            .await,
        2.0
    );
    // Another team is not affected.
    let free = corral.issue("free", None, None);
    assert_eq!(
        post(&corral, &free, "/api/chat", &chat(false))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_charges_the_tokens_actually_used() {
    // 5 prompt + 12 completion tokens per chat: 20 per minute allows two, then waits.
    let (_double, corral, key) = gateway(TeamConfig {
        tpm: 20,
        ..Default::default()
    })
    .await;
    assert_eq!(
        post(&corral, &key, "/api/chat", &chat(false))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&corral, &key, "/api/chat", &chat(false))
            .await
            .status(),
        200,
        "3 tokens left: admitted"
    );
    let resp = post(&corral, &key, "/api/chat", &chat(false)).await;
    assert_eq!(resp.status(), 429);
    // 14 tokens over, refilled at 20/min: about 42 s.
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((40..=45).contains(&retry), "{retry}");
    let tpm = [("limit", "tpm")];
    assert_eq!(
        corral
            .metric_settled("corral_rate_limited_total", &tpm, 1.0)
            .await,
        1.0
    );
    // Listing models is not a model run: still allowed.
    let resp = corral
        .anonymous_client()
        .get(format!("{}/api/tags", corral.base()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_stream_before_its_counts_does_not_make_it_free() {
    let (_double, corral, key) = gateway(TeamConfig {
        tpm: 20,
        ..Default::default()
    })
    .await;
    // The client reads two tokens and leaves, before Ollama's final counts.
    let mut resp = post(&corral, &key, "/api/chat", &chat(true)).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    next_chunk(&mut resp).await.unwrap();
    next_chunk(&mut resp).await.unwrap();
    drop(resp);
    let line = corral.log_line(&id);
    // It was charged an estimate (the prompt from the body size, a token per line received),
    // logged as such, which uses up this team's 20 tokens a minute.
    assert_eq!(line["tokens_estimated"], true, "{line}");
    assert_eq!(
        line["prompt_tokens"],
        line["bytes_in"].as_u64().unwrap() / 4,
        "{line}"
    );
    assert_eq!(line["completion_tokens"], 2, "{line}");
    assert_eq!(
        post(&corral, &key, "/api/chat", &chat(false))
            .await
            .status(),
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_counts_streams_in_flight() {
    let (_double, corral, key) = gateway(TeamConfig {
        max_concurrent: 1,
        ..Default::default()
    })
    .await;
    let mut stream = post(&corral, &key, "/api/chat", &chat(true)).await;
    next_chunk(&mut stream).await.unwrap();
    let resp = post(&corral, &key, "/api/chat", &chat(false)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let (rest, complete) = rest_text(&mut stream).await;
    assert!(complete && rest.contains("\"done\":true"));
    // The slot is free again.
    wait_for_async(Duration::from_secs(10), "the slot to free", || async {
        (post(&corral, &key, "/api/chat", &chat(false))
            .await
            .status()
            == 200)
            .then_some(())
    })
    .await;
    let concurrency = [("limit", "concurrency")];
    assert_eq!(
        corral
            .metric_settled("corral_rate_limited_total", &concurrency, 1.0)
            .await,
        1.0
    );
}

/// A team over its limit is refused as soon as its header is in: corral does not wait for (or
/// hold) a body it will refuse anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_over_its_limit_is_refused_before_its_body_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_double, corral, key) = gateway(TeamConfig {
        rpm: 1,
        ..Default::default()
    })
    .await;
    assert_eq!(
        post(&corral, &key, "/api/chat", &chat(false))
            .await
            .status(),
        200
    );
    let mut tls =
        crate::common::raw::tls_connect(corral.port, &corral.certs.ca_pem, b"http/1.1").await;
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("answered without the body");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
}

/// A request refused before it reaches Ollama (a malformed body, a model the key may not use)
/// costs its team nothing, although the limit is checked before the body is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_cost_the_team_nothing() {
    let (_double, corral, key) = gateway(TeamConfig {
        rpm: 2,
        ..Default::default()
    })
    .await;
    let narrow = corral.issue("limited", Some(&["qwen2.5"]), None);
    for _ in 0..5 {
        let resp = corral
            .anonymous_client()
            .post(format!("{}/api/chat", corral.base()))
            .bearer_auth(&key)
            .body("{\"model\": ")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let resp = post(&corral, &narrow, "/api/chat", &chat(false)).await;
        assert_eq!(resp.status(), 403);
    }
    for _ in 0..2 {
        let resp = post(&corral, &key, "/api/chat", &chat(false)).await;
        assert_eq!(resp.status(), 200);
    }
    let resp = post(&corral, &key, "/api/chat", &chat(false)).await;
    assert_eq!(resp.status(), 429, "the minute's two requests were used");
}

/// A request that wasted the gateway's time (its body never came, within `body_timeout`) keeps
/// its charge: retrying that is not free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_comes_keeps_its_charge() {
    use tokio::io::AsyncWriteExt;
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.server.body_timeout = corral::config::HumanDuration::secs(1);
    cfg.teams.insert(
        "limited".into(),
        TeamConfig {
            models: vec!["*".into()],
            rpm: 1,
            ..Default::default()
        },
    );
    let corral = Corral::start(cfg);
    let key = corral.issue("limited", None, None);
    let mut tls =
        crate::common::raw::tls_connect(corral.port, &corral.certs.ca_pem, b"http/1.1").await;
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\""
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    wait_for_async(Duration::from_secs(30), "the 408", || async {
        corral
            .access_log()
            .iter()
            .any(|l| l["status"] == 408)
            .then_some(())
    })
    .await;
    drop(tls);
    let resp = post(&corral, &key, "/api/chat", &chat(false)).await;
    assert_eq!(resp.status(), 429, "the minute's one request was spent");
}
