//! Deny by default: unknown routes, never-routes and path tricks are answered by corral and never
//! reach Ollama.

mod common;

use common::*;
use corral::config::ListenAddr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends exact request bytes on the cleartext listener (clients normalize paths; attackers don't).
fn raw(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(loopback(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get(port: u16, target: &str) -> (u16, String) {
    raw(
        port,
        &format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

fn post(port: u16, target: &str, body: &str) -> (u16, String) {
    raw(
        port,
        &format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
    )
}

async fn start() -> (OllamaDouble, Corral, u16) {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    let plain = reserve_port();
    cfg.server.plain_listen = ListenAddr(Some(loopback(plain)));
    let corral = Corral::start(cfg);
    (double, corral, plain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_routes_and_unknown_paths_are_404_and_not_forwarded() {
    let (double, corral, port) = start().await;
    for target in [
        "/api/me",
        "/api/signout",
        "/api/user/keys/abc",
        "/api/experimental/web_search",
        "/api/experimental/model-recommendations",
        "/api/status",
        "/v1/audio/transcriptions",
        "/debug/pprof",
        "/api/tags/",
        "/API/TAGS",
        "/Api/Chat",
        "/metrics",
    ] {
        let (status, text) = post(port, target, "{}");
        assert_eq!(status, 404, "{target}: {text}");
        assert!(text.contains("\"error\""), "{target}: not JSON: {text}");
    }
    let (status, text) = post(port, "/v1/bogus", "{}");
    assert_eq!(status, 404);
    assert!(
        text.contains("\"not_found_error\""),
        "OpenAI dialect expected: {text}"
    );
    assert!(
        double.requests().is_empty(),
        "forwarded: {:?}",
        double
            .requests()
            .iter()
            .map(|r| &r.target)
            .collect::<Vec<_>>()
    );
    drop(corral);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_400_and_not_forwarded() {
    let (double, corral, port) = start().await;
    for target in [
        "/api/../api/me",
        "/api/./tags",
        "/api//tags",
        "//api/tags",
        "/api/%2e%2e/me",
        "/api%2ftags",
        "/api/%2Fme",
        "/api\\tags",
        "/api/tags/..",
        "http://127.0.0.1:11434/api/tags",
    ] {
        let (status, text) = get(port, target);
        assert!(status == 400 || status == 404, "{target}: {status} {text}");
    }
    assert!(
        double.requests().is_empty(),
        "forwarded: {:?}",
        double
            .requests()
            .iter()
            .map(|r| &r.target)
            .collect::<Vec<_>>()
    );
    drop(corral);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_405_with_allow() {
    let (double, corral, port) = start().await;
    let (status, text) = get(port, "/api/chat");
    assert_eq!(status, 405, "{text}");
    assert!(text.to_ascii_lowercase().contains("allow: post"), "{text}");
    let (status, _) = post(port, "/api/delete", r#"{"model":"x"}"#);
    assert_eq!(status, 405);
    assert!(double.requests().is_empty());
    drop(corral);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_is_refused_before_ollama() {
    let (double, corral, port) = start().await;
    for (target, body, expect) in [
        ("/api/chat", "{\"model\":", "not valid JSON"),
        ("/api/chat", "[1,2,3]", "must be a JSON object"),
        ("/api/chat", "", "missing request body"),
        (
            "/api/generate",
            r#"{"model":"a","Model":"b"}"#,
            "more than once",
        ),
        (
            "/api/generate",
            r#"{"model":7}"#,
            "\\\"model\\\" must be a string",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama3.2","stream":"yes"}"#,
            "must be true or false",
        ),
    ] {
        let (status, text) = post(port, target, body);
        assert_eq!(status, 400, "{target} {body}: {text}");
        assert!(text.contains(expect), "{target} {body}: {text}");
    }
    assert!(double.requests().is_empty());
    drop(corral);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_pass_and_get_routes_refuse_bodies() {
    let (double, corral, port) = start().await;
    let (status, text) = get(port, "/");
    assert_eq!(status, 200);
    assert!(text.ends_with("Ollama is running"));
    let (status, _) = get(port, "/api/version");
    assert_eq!(status, 200);
    let (status, text) = raw(
        port,
        "GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(status, 400, "{text}");
    assert_eq!(double.requests().len(), 2);
    drop(corral);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_413_without_reading_them() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    let port = reserve_port();
    cfg.server.plain_listen = ListenAddr(Some(loopback(port)));
    cfg.server.max_body = corral::config::ByteSize(1024);
    let corral = Corral::start(cfg);
    // Declared too large: refused on the header alone.
    let (status, text) = raw(
        port,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
    );
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1KiB"), "{text}");
    // Chunked and too large: refused once past the limit.
    let chunk = "a".repeat(2000);
    let (status, _) = raw(
        port,
        &format!("POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len()),
    );
    assert_eq!(status, 413);
    // Compressed bodies cannot be inspected: refused.
    let (status, text) = raw(
        port,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Encoding: zstd\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(status, 415, "{text}");
    assert!(double.requests().is_empty());
    drop(corral);
}
