//! Deny by default: unknown routes, never-routes and path tricks are answered by corral and never
//! reach Ollama; malformed bodies are refused before Ollama sees them.

use crate::common::*;
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

/// A request head with the given extra header lines, and a body.
fn request(method: &str, target: &str, headers: &str, body: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

struct Gw {
    double: OllamaDouble,
    corral: Corral,
    port: u16,
}

impl Gw {
    async fn start() -> Gw {
        Self::start_with(|_| {}).await
    }

    async fn start_with(edit: impl FnOnce(&mut corral::config::Config)) -> Gw {
        let double = double().await;
        let mut cfg = test_config(&double.url());
        let port = reserve_port();
        cfg.server.plain_listen = ListenAddr(Some(loopback(port)));
        edit(&mut cfg);
        let corral = Corral::start(cfg);
        Gw {
            double,
            corral,
            port,
        }
    }

    fn auth(&self) -> String {
        format!("Authorization: Bearer {}\r\n", self.corral.key)
    }

    fn get(&self, target: &str) -> (u16, String) {
        raw(self.port, &request("GET", target, &self.auth(), ""))
    }

    fn post(&self, target: &str, body: &str) -> (u16, String) {
        let headers = format!("{}Content-Type: application/json\r\n", self.auth());
        raw(self.port, &request("POST", target, &headers, body))
    }

    fn forwarded(&self) -> Vec<String> {
        forwarded(&self.double)
            .iter()
            .map(|r| r.target.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_routes_and_unknown_paths_are_404_and_not_forwarded() {
    let gw = Gw::start().await;
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
        let (status, text) = gw.post(target, "{}");
        assert_eq!(status, 404, "{target}: {text}");
        assert!(text.contains("\"error\""), "{target}: not JSON: {text}");
    }
    let (status, text) = gw.post("/v1/bogus", "{}");
    assert_eq!(status, 404);
    assert!(
        text.contains("\"not_found_error\""),
        "OpenAI dialect expected: {text}"
    );
    assert!(gw.forwarded().is_empty(), "forwarded: {:?}", gw.forwarded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_refused_and_not_forwarded() {
    let gw = Gw::start().await;
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
        "/v1/models/..",
        "/v1/models/%2e%2e",
        "http://127.0.0.1:11434/api/tags",
    ] {
        let (status, text) = gw.get(target);
        assert!(status == 400 || status == 404, "{target}: {status} {text}");
    }
    assert!(gw.forwarded().is_empty(), "forwarded: {:?}", gw.forwarded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_405_with_allow() {
    let gw = Gw::start().await;
    let (status, text) = gw.get("/api/chat");
    assert_eq!(status, 405, "{text}");
    assert!(text.to_ascii_lowercase().contains("allow: post"), "{text}");
    let (status, _) = gw.post("/api/delete", r#"{"model":"x"}"#);
    assert_eq!(status, 405);
    assert!(gw.forwarded().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_is_refused_before_ollama() {
    let gw = Gw::start().await;
    for (target, body, expect) in [
        ("/api/chat", "{\"model\":", "not valid JSON"),
        ("/api/chat", "[1,2,3]", "must be a JSON object"),
        ("/api/chat", "", "missing request body"),
        (
            "/api/chat",
            "{\"model\":\"llama3.2\"}\u{0}",
            "not valid JSON",
        ),
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
            "/api/generate",
            r#"{"prompt":"hi"}"#,
            "needs a \\\"model\\\"",
        ),
        (
            "/api/generate",
            r#"{"model":"../../x"}"#,
            "not a valid model name",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"llama3.2","stream":"yes"}"#,
            "must be true or false",
        ),
    ] {
        let (status, text) = gw.post(target, body);
        assert_eq!(status, 400, "{target} {body}: {text}");
        assert!(text.contains(expect), "{target} {body}: {text}");
    }
    // Invalid UTF-8 inside a string.
    let mut bytes = request(
        "POST",
        "/api/chat",
        &gw.auth(),
        r#"{"model":"llama3.2","x":"AB"}"#,
    )
    .into_bytes();
    let at = bytes.len() - 3;
    bytes[at] = 0xff;
    let mut s = TcpStream::connect(loopback(gw.port)).unwrap();
    s.write_all(&bytes).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(gw.forwarded().is_empty(), "forwarded: {:?}", gw.forwarded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_pass_without_a_key_and_get_routes_refuse_bodies() {
    let gw = Gw::start().await;
    let (status, text) = raw(gw.port, &request("GET", "/", "", ""));
    assert_eq!(status, 200);
    assert!(text.ends_with("Ollama is running"));
    let (status, _) = raw(gw.port, &request("GET", "/api/version", "", ""));
    assert_eq!(status, 200);
    let (status, text) = raw(gw.port, &request("GET", "/api/tags", &gw.auth(), "{}"));
    assert_eq!(status, 400, "{text}");
    assert_eq!(gw.forwarded(), ["/", "/api/version"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_413_without_reading_them() {
    let gw = Gw::start_with(|cfg| cfg.server.max_body = corral::config::ByteSize(1024)).await;
    // Declared too large: refused on the header alone.
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\n{}Content-Length: 999999999\r\n\r\n",
        gw.auth()
    );
    let (status, text) = raw(gw.port, &head);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1KiB"), "{text}");
    // Chunked and too large: refused once past the limit.
    let chunk = "a".repeat(2000);
    let chunked = format!(
        "POST /api/chat HTTP/1.1\r\nHost: x\r\n{}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        gw.auth(),
        chunk.len()
    );
    assert_eq!(raw(gw.port, &chunked).0, 413);
    // Compressed bodies cannot be inspected: refused.
    let zstd = request(
        "POST",
        "/api/chat",
        &format!("{}Content-Encoding: zstd\r\n", gw.auth()),
        "{}",
    );
    let (status, text) = raw(gw.port, &zstd);
    assert_eq!(status, 415, "{text}");
    // Without a key nothing is read at all: 401 first.
    let (status, _) = raw(
        gw.port,
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
    );
    assert_eq!(status, 401);
    assert!(gw.forwarded().is_empty());
}
