//! Fair sharing when Ollama is saturated: requests wait in corral for a node's `parallel`
//! slots, and each freed slot goes to the team whose turn it is. Every wait here is set up by
//! holding the slots with streams the test controls, so the outcomes depend on the order of
//! events, not on this machine's speed.

use crate::common::*;
use corral::config::{Config, HumanDuration, TeamConfig};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn team(weight: u32, max_queued: Option<u32>) -> TeamConfig {
    TeamConfig {
        models: vec!["*".into()],
        weight,
        max_queued,
        ..Default::default()
    }
}

fn config(double: &OllamaDouble, parallel: Option<u32>) -> Config {
    let mut cfg = test_config(&double.url());
    cfg.upstream.parallel = parallel;
    cfg.teams.insert("hold".into(), team(1, None));
    cfg
}

/// The double's pace while streams hold the slots: each runs 12 s unless dropped (tests speed it
/// up with `set_token_delay` before they let the slots go).
const HOLDING: Duration = Duration::from_secs(1);

/// A stream that holds one slot until it is dropped.
async fn hold_slot(corral: &Corral, key: &str) -> reqwest::Response {
    let mut resp = corral
        .anonymous_client()
        .post(format!("{}/api/generate", corral.base()))
        .bearer_auth(key)
        .json(&json!({"model": "llama3.2", "prompt": "hold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(next_chunk(&mut resp).await.is_some());
    resp
}

/// Two streams of team `hold` holding two slots until they are dropped.
async fn hold_two_slots(corral: &Corral) -> [reqwest::Response; 2] {
    let hold = corral.issue("hold", None, None);
    [
        hold_slot(corral, &hold).await,
        hold_slot(corral, &hold).await,
    ]
}

async fn chat(client: &reqwest::Client, base: &str, key: &str) -> reqwest::Response {
    client
        .post(format!("{base}/api/chat"))
        .bearer_auth(key)
        .json(&json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

async fn waiting(corral: &Corral, team: &str) -> f64 {
    metric_sum(
        &corral.metrics().await,
        "corral_queue_depth",
        &[("team", team)],
    )
}

async fn wait_until_waiting(corral: &Corral, team: &str, n: f64) {
    wait_for_async(
        Duration::from_secs(60),
        "requests waiting in line",
        || async { (waiting(corral, team).await == n).then_some(()) },
    )
    .await;
}

/// Sends `n` chats of `team` at once; each one that succeeds appends its team to `done`.
fn flood(
    corral: &Corral,
    key: &str,
    team: &'static str,
    n: usize,
    done: &Arc<Mutex<Vec<&'static str>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (client, base, key, done) = (
                corral.anonymous_client(),
                corral.base(),
                key.to_string(),
                done.clone(),
            );
            tokio::spawn(async move {
                let resp = chat(&client, &base, &key).await;
                assert_eq!(resp.status(), 200);
                let _ = resp.bytes().await;
                done.lock().unwrap().push(team);
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn teams_weighted_three_to_one_get_busy_slots_three_to_one() {
    let double = double_with(|c| {
        c.token_delay = HOLDING;
        c.response_tokens = 3;
    })
    .await;
    let mut cfg = config(&double, Some(2));
    cfg.teams.insert("research".into(), team(3, None));
    cfg.teams.insert("batch".into(), team(1, None));
    let corral = Corral::start(cfg);
    let blockers = hold_two_slots(&corral).await;

    let done = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = flood(
        &corral,
        &corral.issue("research", None, None),
        "research",
        60,
        &done,
    );
    tasks.extend(flood(
        &corral,
        &corral.issue("batch", None, None),
        "batch",
        60,
        &done,
    ));
    wait_until_waiting(&corral, "research", 60.0).await;
    wait_until_waiting(&corral, "batch", 60.0).await;
    double.set_token_delay(Duration::from_millis(2));
    drop(blockers);
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    // The first 60 answers, while both teams still had requests waiting.
    let research = order[..60].iter().filter(|t| **t == "research").count() as f64;
    let batch = 60.0 - research;
    let ratio = research / batch;
    assert!(
        (2.55..=3.45).contains(&ratio),
        "research:batch = {research}:{batch} ({ratio:.2}), expected 3:1 within 15%"
    );
    let m = corral.metrics().await;
    assert_eq!(metric_sum(&m, "corral_queue_depth", &[]), 0.0);
    assert_eq!(
        metric_sum(
            &m,
            "corral_queue_wait_seconds_count",
            &[("team", "research")]
        ),
        60.0,
        "every request that waited is in the histogram"
    );
    // Every chat's log line says how long it waited.
    wait_for(
        Duration::from_secs(10),
        "120 chats logged with queued_ms",
        || {
            let queued = corral
                .access_log()
                .iter()
                .filter(|l| l["route"] == "/api/chat" && l["queued_ms"].is_u64())
                .count();
            (queued == 120).then_some(())
        },
    );
}

/// How many batch answers arrive before one interactive request's, when it comes after 50
/// batch requests that wait for Ollama's two busy slots: in corral's line (`parallel` set), or
/// in Ollama's own (corral forwards everything).
async fn batch_answers_before_an_interactive_one(parallel: Option<u32>) -> usize {
    let double = double_with(|c| {
        c.token_delay = HOLDING;
        c.response_tokens = 8;
        c.parallel = Some(2);
    })
    .await;
    let mut cfg = config(&double, parallel);
    cfg.teams.insert("batch".into(), team(1, None));
    cfg.teams.insert("chat".into(), team(1, None));
    let corral = Corral::start(cfg);
    let blockers = hold_two_slots(&corral).await;
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = flood(
        &corral,
        &corral.issue("batch", None, None),
        "batch",
        50,
        &done,
    );
    // All 50 are in: waiting in corral's line, or forwarded to wait in Ollama's.
    wait_for_async(Duration::from_secs(60), "the backlog", || async {
        let m = corral.metrics().await;
        let n = if parallel.is_some() {
            metric_sum(&m, "corral_queue_depth", &[("team", "batch")])
        } else {
            metric_sum(&m, "corral_inflight_requests", &[("team", "batch")])
        };
        (n == 50.0).then_some(())
    })
    .await;
    tasks.extend(flood(
        &corral,
        &corral.issue("chat", None, None),
        "chat",
        1,
        &done,
    ));
    wait_for_async(
        Duration::from_secs(60),
        "the interactive request",
        || async {
            let m = corral.metrics().await;
            (metric_sum(&m, "corral_inflight_requests", &[("team", "chat")]) == 1.0).then_some(())
        },
    )
    .await;
    double.set_token_delay(Duration::from_millis(5));
    drop(blockers);
    for t in tasks {
        t.await.unwrap();
    }
    let order = done.lock().unwrap().clone();
    order.iter().position(|t| *t == "chat").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interactive_request_waits_about_one_generation_not_behind_a_batch() {
    let with_line = batch_answers_before_an_interactive_one(Some(2)).await;
    assert!(
        with_line <= 3,
        "with corral's line the chat waits for one slot: {with_line} batch answers came first"
    );
    let without = batch_answers_before_an_interactive_one(None).await;
    eprintln!("batch answers before the chat's: {with_line} with corral's line, {without} without");
    assert!(
        without >= 40,
        "without it the chat waits behind Ollama's queue of 50: only {without} batch answers came first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_while_waiting_never_reaches_ollama() {
    let double = double_with(|c| c.token_delay = HOLDING).await;
    let corral = Corral::start(config(&double, Some(1)));
    let hold = corral.issue("hold", None, None);
    let blocker = hold_slot(&corral, &hold).await;
    let (client, base, key) = (corral.anonymous_client(), corral.base(), hold.clone());
    let waiter = tokio::spawn(async move {
        client
            .post(format!("{base}/api/chat"))
            .bearer_auth(&key)
            .header("x-request-id", "left-while-waiting")
            .json(&json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
    });
    wait_until_waiting(&corral, "hold", 1.0).await;
    waiter.abort();
    // Its connection closed: it is out of line while the slot is still taken.
    wait_until_waiting(&corral, "hold", 0.0).await;
    double.set_token_delay(Duration::from_millis(1));
    drop(blocker);
    let resp = chat(&corral.anonymous_client(), &corral.base(), &hold).await;
    assert_eq!(resp.status(), 200, "the slot is free again");
    let chats = forwarded(&double)
        .iter()
        .filter(|r| r.target.starts_with("/api/chat"))
        .count();
    assert_eq!(chats, 1, "only the last chat reached Ollama");
    let line = wait_for(Duration::from_secs(10), "the log line", || {
        corral
            .access_log()
            .into_iter()
            .find(|l| l["request_id"] == "left-while-waiting")
    });
    assert_eq!(
        (&line["status"], &line["error"]),
        (&json!(499), &json!("client_closed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_line_is_refused_at_once_and_a_long_wait_times_out() {
    let double = double_with(|c| c.token_delay = HOLDING).await;
    let mut cfg = config(&double, Some(1));
    cfg.teams.insert("small".into(), team(1, Some(1)));
    cfg.scheduler.queue_timeout = HumanDuration::secs(1);
    let corral = Corral::start(cfg);
    let blocker = hold_slot(&corral, &corral.issue("hold", None, None)).await;
    let key = corral.issue("small", None, None);
    let (client, base, k) = (corral.anonymous_client(), corral.base(), key.clone());
    let first = tokio::spawn(async move {
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&k)
            .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    });
    wait_until_waiting(&corral, "small", 1.0).await;
    // The team's line holds one: the next is refused at once, in its dialect.
    let full = corral
        .anonymous_client()
        .post(format!("{}/v1/chat/completions", corral.base()))
        .bearer_auth(&key)
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), 429);
    assert_eq!(full.headers()["retry-after"], "5");
    let body: serde_json::Value = full.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "queue_full");
    // The waiting one gives up after queue_timeout.
    let timed_out = first.await.unwrap();
    assert_eq!(timed_out.status(), 503);
    assert_eq!(timed_out.headers()["retry-after"], "5");
    let body: serde_json::Value = timed_out.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_timeout");
    let m = corral.metrics().await;
    for reason in ["full", "timeout"] {
        assert_eq!(
            metric_sum(
                &m,
                "corral_queue_rejected_total",
                &[("team", "small"), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    drop(blocker);
    let chats = forwarded(&double)
        .iter()
        .filter(|r| r.target.starts_with("/v1/chat"))
        .count();
    assert_eq!(chats, 0, "neither reached Ollama");
}
