//! Findings of the adversarial run (issue 12), one regression test each: upstream framing and
//! pooled-connection poisoning (F1), bodies on routes that take none (F2), a narrowed admin key
//! creating from blobs (F4), HEAD on filtered lists (F5), requests refused while parsing (F7).
//! Connection caps and deadlines (F3) are in `connections.rs`.

use crate::common::raw::{h1_raw, h2_connect, h2_request, RawUpstream};
use crate::common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn blob_digest(data: &[u8]) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Decodes a chunked body; `None` unless it is well-formed and ends exactly at its terminator.
fn dechunk(mut wire: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = wire.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&wire[..line_end]).ok()?, 16).ok()?;
        wire = &wire[line_end + 2..];
        if size == 0 {
            return (wire == b"\r\n").then_some(out);
        }
        out.extend_from_slice(wire.get(..size)?);
        wire = wire.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

/// F1: HTTP/2 requests that end with an empty DATA frame (what `curl -T -` sends) on every route
/// they could reach without a key (and with one), while another client keeps using the same
/// upstream pool. Every byte Ollama receives is framed exactly once, and no other client ever
/// gets an answer meant for a stray byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_final_data_frames_never_reach_the_upstream_as_stray_bytes() {
    let upstream = RawUpstream::start().await;
    let corral = Arc::new(Corral::start(test_config(&upstream.url())));

    // The victim: keep-alive HTTP/1.1 requests on the public route, four at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let victim = corral
        .anonymous_client_builder()
        .http1_only()
        .build()
        .unwrap();
    let mut victims = Vec::new();
    for _ in 0..4 {
        let (victim, stop, ok, bad, base) = (
            victim.clone(),
            stop.clone(),
            ok.clone(),
            bad.clone(),
            corral.base(),
        );
        victims.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let answered = match victim.get(format!("{base}/api/version")).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.unwrap_or_default(),
                    _ => String::new(),
                };
                let counter = if answered.contains("0.33.0") {
                    &ok
                } else {
                    &bad
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    let auth = format!("Bearer {}", corral.key);
    let blob = b"a model layer, in two DATA frames";
    let digest = blob_digest(blob);
    let mut attacker = h2_connect(corral.port, &corral.certs.ca_pem).await;
    let uri = |path: &str| format!("https://localhost:{}{path}", corral.port);
    for _ in 0..100 {
        for path in ["/", "/api/version"] {
            let (status, _) = h2_request(&mut attacker, "GET", &uri(path), &[], &[]).await;
            assert_eq!(status, 200, "GET {path}");
        }
        let (status, _) = h2_request(
            &mut attacker,
            "GET",
            &uri("/api/tags"),
            &[("authorization", &auth)],
            &[],
        )
        .await;
        assert_eq!(status, 200, "GET /api/tags");
        let (status, _) = h2_request(
            &mut attacker,
            "POST",
            &uri(&format!("/api/blobs/{digest}")),
            &[("authorization", &auth)],
            &[&blob[..10], &blob[10..]],
        )
        .await;
        assert_eq!(status, 201, "POST /api/blobs");
    }
    stop.store(true, Ordering::SeqCst);
    for v in victims {
        v.await.unwrap();
    }

    assert_eq!(
        upstream.stray(),
        Vec::<Vec<u8>>::new(),
        "stray bytes reached Ollama"
    );
    assert_eq!(bad.load(Ordering::SeqCst), 0, "a victim request failed");
    assert!(ok.load(Ordering::SeqCst) > 0);
    let forwarded = upstream.forwarded();
    let mut blobs = 0;
    for r in &forwarded {
        if r.request_line().starts_with("POST /api/blobs/") {
            blobs += 1;
            assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{}", r.head);
            assert_eq!(
                dechunk(&r.wire_body).as_deref(),
                Some(&blob[..]),
                "framed exactly once: {:?}",
                String::from_utf8_lossy(&r.wire_body)
            );
        } else {
            // Routes without a body are forwarded without any framing.
            assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
            assert_eq!(r.header("content-length"), None, "{}", r.head);
            assert!(r.wire_body.is_empty(), "{}", r.head);
        }
    }
    assert_eq!(blobs, 100);
    // The upstream connection a body was streamed through is never used again.
    let all = upstream.requests();
    for (i, b) in all.iter().enumerate() {
        if b.request_line().starts_with("POST /api/blobs/") {
            let later = all[i + 1..].iter().find(|r| r.connection == b.connection);
            assert!(later.is_none(), "reused after a blob upload: {later:?}");
        }
    }
}

/// F2: a route that takes no body is never forwarded one, whatever the protocol or framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_without_a_body_refuse_one_over_both_protocols() {
    let upstream = RawUpstream::start().await;
    let corral = Corral::start(test_config(&upstream.url()));
    let auth = format!("Bearer {}", corral.key);
    let uri = |path: &str| format!("https://localhost:{}{path}", corral.port);

    // HTTP/2: DATA frames with no Content-Length at all.
    let mut h2 = h2_connect(corral.port, &corral.certs.ca_pem).await;
    let (status, body) = h2_request(
        &mut h2,
        "GET",
        &uri("/api/tags"),
        &[("authorization", &auth)],
        &[b"hello"],
    )
    .await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("takes no request body"),
        "{body}"
    );
    let (status, _) = h2_request(&mut h2, "GET", &uri("/api/version"), &[], &[b"x"]).await;
    assert_eq!(status, 400);
    let (status, _) = h2_request(&mut h2, "HEAD", &uri("/"), &[], &[b"x"]).await;
    assert_eq!(status, 400);

    // HTTP/1.1: a Content-Length list pingora accepts as 5, and a chunked body.
    let ca = &corral.certs.ca_pem;
    let listed = format!(
        "GET /api/tags HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\nContent-Length: 5, 5\r\n\r\nhello"
    );
    let answer = h1_raw(corral.port, ca, listed.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("takes no request body"), "{answer}");
    let chunked = "GET /api/version HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let answer = h1_raw(corral.port, ca, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(upstream.forwarded().is_empty(), "a body reached Ollama");

    // An empty body is no body: forwarded, without any framing.
    let (status, _) = h2_request(
        &mut h2,
        "GET",
        &uri("/api/tags"),
        &[("authorization", &auth)],
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let empty_chunked = "GET /api/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = h1_raw(corral.port, ca, empty_chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let forwarded = upstream.forwarded();
    assert_eq!(forwarded.len(), 2);
    for r in forwarded {
        assert_eq!(r.header("transfer-encoding"), None, "{}", r.head);
        assert_eq!(r.header("content-length"), None, "{}", r.head);
        assert!(r.wire_body.is_empty());
    }
    assert!(upstream.stray().is_empty());
}

/// F4: a key narrowed to some models may create a model only from a model it names; blobs (which
/// name no model) are refused in every field that can carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowed_admin_key_cannot_create_from_blobs() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let narrow = corral.issue("test", Some(&["llama3.2:*"]), None);
    let layer = b"GGUF weights";
    let digest = blob_digest(layer);
    // The blob exists: an admin key without a claim uploads it.
    let up = corral
        .client()
        .post(format!("{}/api/blobs/{digest}", corral.base()))
        .body(&layer[..])
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 201);
    double.clear_requests();

    let bodies = [
        json!({"model": "llama3.2:alias", "files": {"model.gguf": digest}}),
        json!({"model": "llama3.2:alias", "from": "llama3.2", "adapters": {"lora.gguf": digest}}),
        json!({"model": "llama3.2:alias", "modelfile": "FROM qwen2.5-coder:7b"}),
        json!({"model": "llama3.2:alias", "modelfile": format!("FROM @{digest}")}),
    ];
    for body in &bodies {
        let resp = corral
            .anonymous_client()
            .post(format!("{}/api/create", corral.base()))
            .bearer_auth(&narrow)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"].as_str().unwrap().contains("claim"), "{err}");
    }
    assert!(
        forwarded(&double).is_empty(),
        "a refused create reached Ollama"
    );

    // Inside the claim it works, and a key without a claim may create from the blob.
    let ok = corral
        .anonymous_client()
        .post(format!("{}/api/create", corral.base()))
        .bearer_auth(&narrow)
        .json(&json!({"model": "llama3.2:alias", "from": "llama3.2", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok = corral
        .client()
        .post(format!("{}/api/create", corral.base()))
        .json(&json!({"model": "mine:latest", "files": {"model.gguf": digest}, "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "{}", ok.text().await.unwrap());
}

/// F5: HEAD on a filtered list tells no more than GET shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_a_filtered_list_does_not_reveal_its_unfiltered_size() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.teams.insert(
        "narrow".into(),
        corral::config::TeamConfig {
            models: vec!["llama3.2:*".into()],
            ..Default::default()
        },
    );
    let corral = Corral::start(cfg);
    let key = corral.issue("narrow", None, None);
    let client = corral.anonymous_client();
    let get = client
        .get(format!("{}/api/tags", corral.base()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let filtered = get.bytes().await.unwrap().len();
    let head = client
        .head(format!("{}/api/tags", corral.base()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let declared = head
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    assert!(
        declared.is_none() || declared == Some(filtered),
        "HEAD says {declared:?} bytes, GET sends {filtered}"
    );
}

/// F7: requests pingora refuses while reading them are answered in corral's JSON, logged with
/// what is known, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_while_parsing_are_logged_and_counted() {
    let double = double().await;
    let corral = Corral::start(test_config(&double.url()));
    let ca = &corral.certs.ca_pem;
    let key = &corral.key;
    let malformed: [Vec<u8>; 3] = [
        format!("GET /api/tags HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nX-Bad: a\x01b\r\n\r\n").into_bytes(),
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
        b"GET /api/t\xffgs HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
    ];
    for request in &malformed {
        let answer = h1_raw(corral.port, ca, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{answer}"));
        assert!(
            body["error"].as_str().unwrap().contains("not valid HTTP"),
            "{body}"
        );
    }
    let lines = wait_for(Duration::from_secs(10), "three access-log lines", || {
        let lines: Vec<Value> = corral
            .access_log()
            .into_iter()
            .filter(|l| l["error"] == "malformed_request")
            .collect();
        (lines.len() == 3).then_some(lines)
    });
    for l in &lines {
        assert_eq!(l["status"], 400);
        assert_eq!(l["client_ip"], "127.0.0.1");
        assert!(l["method"].is_null() && l["team"].is_null(), "{l}");
        assert!(l["request_id"].as_str().is_some_and(|id| id.len() == 32));
    }
    // The key in the first request is in no log.
    assert!(!corral.stdout_lines().concat().contains(key.as_str()));
    assert!(!corral.stderr_text().contains(key.as_str()));
    let metrics = corral.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "corral_requests_total",
            &[("route", "malformed"), ("status", "400")]
        ),
        3.0,
        "{metrics}"
    );
    assert!(forwarded(&double).is_empty());
}
