//! Ollama's checks before any route: the CORS `Origin` check and the loopback `Host` guard.

use http::HeaderMap;
use std::net::IpAddr;

/// Ollama's middlewares, in its order: CORS, then (if `host_guard`) the `Host` guard. `false`:
/// the request is refused (an empty 403).
pub(super) fn admits(headers: &HeaderMap, host_guard: bool) -> bool {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = headers
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        if !origin_allowed(origin, host) {
            return false;
        }
    }
    !host_guard || host_allowed(host)
}

/// A loopback-bound Ollama accepts only local-looking `Host` headers (anti DNS rebinding).
fn host_allowed(host: &str) -> bool {
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or_default()
    } else {
        host
    };
    if name.is_empty() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    if [".localhost", ".local", ".internal"]
        .iter()
        .any(|s| lower.ends_with(s))
    {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_unspecified(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xfe00) == 0xfc00
        }
        Err(_) => false,
    }
}

/// Ollama's default `OLLAMA_ORIGINS`.
fn origin_allowed(origin: &str, host: &str) -> bool {
    if origin == format!("http://{host}") || origin == format!("https://{host}") {
        return true;
    }
    let local = ["localhost", "127.0.0.1", "0.0.0.0"];
    for scheme in ["http://", "https://"] {
        if let Some(rest) = origin.strip_prefix(scheme) {
            let name = rest.split(':').next().unwrap_or_default();
            if local.contains(&name)
                && rest[name.len()..]
                    .chars()
                    .all(|c| c == ':' || c.is_ascii_digit())
            {
                return true;
            }
        }
    }
    [
        "app://",
        "file://",
        "tauri://",
        "vscode-webview://",
        "vscode-file://",
    ]
    .iter()
    .any(|s| origin.starts_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_guard_matches_ollama() {
        for ok in [
            "",
            "localhost",
            "localhost:11434",
            "127.0.0.1:11434",
            "[::1]:11434",
            "10.0.0.5",
            "gpu.local",
            "ollama.internal:11434",
            "0.0.0.0",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "example.com",
            "corral.example.com:8443",
            "8.8.8.8:11434",
            "[2001:db8::1]:11434",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn default_origins_match_ollama() {
        assert!(origin_allowed("http://localhost:3000", "x"));
        assert!(origin_allowed("https://127.0.0.1", "x"));
        assert!(origin_allowed("app://anything", "x"));
        assert!(origin_allowed("https://gw.example.com", "gw.example.com"));
        assert!(!origin_allowed("https://evil.example", "127.0.0.1:11434"));
        assert!(!origin_allowed("http://localhost.evil.example", "x"));
    }
}
