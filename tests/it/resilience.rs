//! Hostile and slow clients, a restarting Ollama, and reloads under traffic: corral refuses what it
//! must, keeps serving everyone else, and never cuts a live stream.

use crate::common::*;
use corral::config::{HumanDuration, ListenAddr};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A gateway with a cleartext listener for raw requests.
async fn gateway(edit: impl FnOnce(&mut corral::config::Config)) -> (OllamaDouble, Corral, u16) {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    let plain = reserve_port();
    cfg.server.plain_listen = ListenAddr(Some(loopback(plain)));
    edit(&mut cfg);
    (double, Corral::start(cfg), plain)
}

fn read_all(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let (_double, corral, port) =
        gateway(|c| c.server.header_timeout = HumanDuration::secs(2)).await;
    let mut slow = TcpStream::connect(loopback(port)).unwrap();
    slow.write_all(b"GET /api/version HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        // One header byte every 500 ms: every single read is quick, the header never ends.
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(500));
            if slow.write_all(b"X").is_err() {
                return true;
            }
        }
        false
    });
    // Meanwhile a normal client is served.
    let resp = corral
        .client()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cut = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    assert!(cut, "the slow client was never disconnected");
    assert!(started.elapsed() < Duration::from_secs(19));

    // Clients that send nothing, or one byte, are cut off too (read_all waits at most 20 s;
    // the connection must end, not time out).
    for start in [&b""[..], b"G", b"PRI * HTTP/2.0"] {
        let mut idle = TcpStream::connect(loopback(port)).unwrap();
        idle.write_all(start).unwrap();
        let started = Instant::now();
        let answer = tokio::task::spawn_blocking(move || read_all(idle))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(19),
            "{start:?}: still open, answer so far {answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_is_408() {
    let (double, corral, port) = gateway(|c| c.server.body_timeout = HumanDuration::secs(1)).await;
    let mut s = TcpStream::connect(loopback(port)).unwrap();
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 100\r\n\r\n{{\"model\":",
        corral.key
    );
    s.write_all(head.as_bytes()).unwrap();
    let answer = read_all(s);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(forwarded(&double).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_heads_are_refused() {
    let (double, corral, port) =
        gateway(|c| c.server.max_header_size = corral::config::ByteSize(4096)).await;
    let key = &corral.key;
    let send = |req: String| {
        let mut s = TcpStream::connect(loopback(port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        read_all(s)
    };
    let big = "x".repeat(5000);
    let answer = send(format!(
        "GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Big: {big}\r\n\r\n"
    ));
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = send(format!("GET /api/tags HTTP/1.1\r\nHost: x\r\n{many}\r\n"));
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // Request smuggling: both framings, with a body that is valid under either (pingora itself
    // would frame by Transfer-Encoding and drop Content-Length).
    let chat = r#"{"model":"llama3.2","messages":[]}"#;
    let answer = send(format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chat}\r\n0\r\n\r\n",
        chat.len() + 5,
        chat.len(),
    ));
    assert!(
        answer.starts_with("HTTP/1.1 400")
            && answer.contains("both Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    let answer = send(format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    ));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = send(format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"
    ));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Two different keys.
    let answer = send(format!(
        "GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Api-Key: other\r\nConnection: close\r\n\r\n"
    ));
    assert!(
        answer.starts_with("HTTP/1.1 401") && answer.contains("more than one API key"),
        "{answer}"
    );
    // keep_alive of a type Ollama refuses.
    let body = r#"{"model":"llama3.2","prompt":"x","keep_alive":{"forever":true}}"#;
    let answer = send(format!(
        "POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("Unsupported type"),
        "{answer}"
    );
    assert!(
        forwarded(&double).is_empty(),
        "{:?}",
        forwarded(&double)
            .iter()
            .map(|r| &r.target)
            .collect::<Vec<_>>()
    );
    // And the gateway still serves.
    assert_eq!(
        corral
            .client()
            .get(format!("{}/api/tags", corral.base()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_restarting_mid_traffic_fails_in_flight_requests_cleanly_and_recovers() {
    let (double, corral, _) = gateway(|_| {}).await;
    double.set_token_delay(Duration::from_millis(100));
    let addr = double.addr();
    let client = corral.client();
    let chat = json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    // Warm the connection pool, then start streams that the restart will break.
    for _ in 0..4 {
        assert_eq!(
            client
                .post(format!("{}/api/chat", corral.base()))
                .json(&chat)
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = client
            .post(format!("{}/api/chat", corral.base()))
            .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        next_chunk(&mut s).await.unwrap();
        streams.push(s);
    }
    double.shutdown().await;
    // In flight: each ends with an error line the client library raises, never a hang.
    for mut s in streams {
        let (rest, _) = tokio::time::timeout(Duration::from_secs(20), rest_text(&mut s))
            .await
            .expect("a stream hung");
        let last: Value = serde_json::from_str(rest.trim_end().lines().last().unwrap()).unwrap();
        assert!(last["error"].is_string(), "{rest}");
    }
    // While down: a clean 502.
    let resp = client
        .post(format!("{}/api/chat", corral.base()))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    // Back up: the very next requests succeed (stale pooled connections are not reused).
    let _restarted = OllamaDouble::start_on(addr, DoubleConfig::default())
        .await
        .unwrap();
    for _ in 0..5 {
        let resp = client
            .post(format!("{}/api/chat", corral.base()))
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_traffic_fail_nothing() {
    let double = double().await;
    let setup = Setup::new(test_config(&double.url()));
    let config_path = setup.write();
    let corral = Arc::new(setup.start());
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (corral, failures, done) = (corral.clone(), failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client = corral.client();
            for _ in 0..40 {
                let resp = client
                    .post(format!("{}/api/generate", corral.base()))
                    .json(&json!({"model": "llama3.2", "prompt": "x", "stream": false, "options": {"num_predict": 2}}))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    // Rewrite the configuration (a new team each time) while the traffic runs.
    for i in 0..5 {
        let mut cfg = corral.cfg.clone();
        cfg.teams.insert(format!("extra-{i}"), Default::default());
        std::fs::write(&config_path, cfg.to_toml().unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert_eq!(done.load(Ordering::SeqCst), 160);
    let m = corral.metrics().await;
    assert!(
        metric_sum(&m, "corral_config_reloads_total", &[("result", "ok")]) >= 1.0,
        "no reload happened"
    );
}
