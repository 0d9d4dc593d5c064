//! 500 concurrent streams through corral to the double: every stream complete and correct, none
//! cut. Prints corral's memory (RSS) with all of them open, and checks that it is given back
//! when the clients leave.

use crate::common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const STREAMS: usize = 500;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_streams_all_complete_and_correct() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(300)).await;
    let mut cfg = test_config(&double.url());
    // Every test client is 127.0.0.1: the per-address caps (256 by default) would refuse half.
    cfg.server.max_connections_per_ip = 0;
    cfg.server.max_requests_per_ip = Some(0);
    let corral = Arc::new(Corral::start(cfg));
    let idle_rss = rss_kib(corral.pid());
    let started = Arc::new(AtomicUsize::new(0));
    let client = corral.client_builder().http1_only().build().unwrap();
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (client, corral, started) = (client.clone(), corral.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            // Alternate dialects: half NDJSON, half SSE.
            let (path, body) = if i % 2 == 0 {
                ("/api/chat", json!({"model": "llama3.2", "messages": [{"role": "user", "content": format!("stream {i}")}]}))
            } else {
                ("/v1/chat/completions", json!({"model": "llama3.2", "stream": true, "messages": [{"role": "user", "content": format!("stream {i}")}]}))
            };
            let mut resp = client.post(format!("{}{path}", corral.base())).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let first = next_chunk(&mut resp).await.unwrap();
            started.fetch_add(1, Ordering::SeqCst);
            let (rest, complete) = rest_text(&mut resp).await;
            assert!(complete, "stream {i} was cut");
            let text = String::from_utf8_lossy(&first).to_string() + &rest;
            (i, text)
        }));
    }
    wait_for_async(
        Duration::from_secs(120),
        "every stream to start",
        || async { (started.load(Ordering::SeqCst) == STREAMS).then_some(()) },
    )
    .await;
    let peak_rss = rss_kib(corral.pid());

    let expected = "The sky is blue because molecules in the air scatter blue light";
    for t in tasks {
        let (i, text) = t.await.unwrap();
        let content: String = if i % 2 == 0 {
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.last().unwrap()["done"], true, "stream {i}");
            assert_eq!(lines.last().unwrap()["eval_count"], 12, "stream {i}");
            lines
                .iter()
                .filter_map(|l| l["message"]["content"].as_str())
                .collect()
        } else {
            assert!(text.ends_with("data: [DONE]\n\n"), "stream {i}");
            text.split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str::<Value>(d).unwrap())
                .filter_map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect()
        };
        assert_eq!(content, expected, "stream {i}");
    }
    let per_stream = (peak_rss.saturating_sub(idle_rss)) as f64 / STREAMS as f64;
    eprintln!("corral RSS: idle {idle_rss} KiB, {STREAMS} streams open {peak_rss} KiB, about {per_stream:.1} KiB per stream (debug build)");
    assert_eq!(double.completed(), STREAMS as u64);
    assert_eq!(double.disconnects(), 0);
    // Gross leaks only; the benchmark measures the release build against its target.
    assert!(
        peak_rss < 1024 * 1024,
        "corral used {peak_rss} KiB for {STREAMS} streams"
    );
    let m = corral.metrics().await;
    assert_eq!(
        metric_sum(&m, "corral_requests_total", &[("status", "200")]),
        STREAMS as f64
    );
    assert_eq!(metric_sum(&m, "corral_truncated_streams_total", &[]), 0.0);
    assert_eq!(errors_logged(&corral), Vec::<String>::new());

    // The clients leave: what their side of the streams held goes back to the system though
    // corral's threads then have nothing to do (each collects its allocator heap on a timer;
    // without that, a quiet thread keeps what it freed for good, here all of it). The upstream
    // connections stay in the keep-alive pool and keep what they hold: about a third of it here,
    // against nearly all of it without the collection.
    drop(client);
    let grown = peak_rss.saturating_sub(idle_rss);
    let settled = wait_for_async(
        Duration::from_secs(30),
        "corral to give back the streams' memory",
        || async {
            let rss = rss_kib(corral.pid());
            (rss < idle_rss + grown * 3 / 5).then_some(rss)
        },
    )
    .await;
    eprintln!("corral RSS after the clients left: {settled} KiB");
}

/// Lines corral logged at ERROR.
fn errors_logged(corral: &Corral) -> Vec<String> {
    corral
        .stderr_text()
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .map(str::to_string)
        .collect()
}

/// Normal traffic, however bursty, logs nothing at ERROR (log-based alerting must not fire):
/// keep-alive clients hammering small requests through the upstream pool, clients that leave
/// in the middle of streams and right after their last byte, refused requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ordinary_traffic_logs_nothing_at_error() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(5)).await;
    let mut cfg = test_config(&double.url());
    cfg.server.max_connections_per_ip = 0;
    cfg.server.max_requests_per_ip = Some(0);
    let corral = Arc::new(Corral::start(cfg));
    let client = corral.client_builder().http1_only().build().unwrap();
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (client, corral) = (client.clone(), corral.clone());
        tasks.push(tokio::spawn(async move {
            for j in 0..20 {
                let base = corral.base();
                match (i + j) % 4 {
                    0 | 1 => {
                        let resp = client
                            .post(format!("{base}/api/show"))
                            .json(&json!({"model": "llama3.2"}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.bytes().await.unwrap();
                    }
                    2 => {
                        // A stream left after its first token.
                        let mut resp = client
                            .post(format!("{base}/api/chat"))
                            .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
                            .send()
                            .await
                            .unwrap();
                        next_chunk(&mut resp).await;
                        drop(resp);
                    }
                    _ => {
                        let resp = client
                            .get(format!("{base}/api/nothing-here"))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 404);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_for_async(Duration::from_secs(10), "every access-log line", || async {
        (corral.access_log().len() >= 48 * 20).then_some(())
    })
    .await;
    assert_eq!(errors_logged(&corral), Vec::<String>::new());
}
