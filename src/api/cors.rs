//! Browser pages from other origins (`[server.cors]`): which origins may call corral, what a
//! preflight is answered, and what every answer to an allowed origin carries. Pure: the proxy
//! layer applies it (`proxy/cors.rs`).

use crate::config::CorsConfig;
use std::collections::HashSet;

/// Request headers a page may send: what the OpenAI, Anthropic and Ollama SDKs set in a browser,
/// and corral's own. Anything else a preflight asks for is left out, so the browser refuses.
const ALLOWED_HEADERS: &[&str] = &[
    "accept",
    "authorization",
    "content-type",
    "x-api-key",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    // ollama-js sets it; Firefox asks for it in the preflight (Chromium drops it instead).
    "user-agent",
];
/// A family of headers (the OpenAI and Anthropic SDKs' platform and retry headers).
const ALLOWED_PREFIX: &str = "x-stainless-";

/// Response headers a page may read besides the CORS-safelisted ones.
pub(crate) const EXPOSED_HEADERS: &str = "x-request-id, retry-after";

pub(crate) struct Cors {
    origins: HashSet<String>,
    max_age: String,
}

impl Cors {
    pub(crate) fn new(cfg: &CorsConfig) -> Cors {
        Cors {
            origins: cfg.origins.iter().cloned().collect(),
            max_age: cfg.max_age.0.as_secs().to_string(),
        }
    }

    /// The request's origin when it is an allowed one (exact match).
    pub(crate) fn allows<'a>(&self, origin: Option<&'a [u8]>) -> Option<&'a str> {
        let origin = std::str::from_utf8(origin?).ok()?;
        self.origins.contains(origin).then_some(origin)
    }

    /// The headers of a preflight's 204 for an allowed origin: the asked method (the route
    /// serves it), the asked headers corral allows, how long to remember it.
    pub(crate) fn preflight(
        &self,
        origin: &str,
        method: &str,
        asked_headers: Option<&str>,
        private_network: bool,
    ) -> Vec<(&'static str, String)> {
        let headers: Vec<String> = asked_headers
            .unwrap_or("")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| allowed_header(h))
            .collect();
        let mut out = vec![
            ("access-control-allow-origin", origin.to_string()),
            ("access-control-allow-methods", method.to_string()),
            ("access-control-max-age", self.max_age.clone()),
            (
                "vary",
                "origin, access-control-request-method, access-control-request-headers".into(),
            ),
        ];
        if !headers.is_empty() {
            out.push(("access-control-allow-headers", headers.join(", ")));
        }
        // Chrome asks before a public page calls a gateway on a private network; an allowed
        // origin is allowed there too.
        if private_network {
            out.push(("access-control-allow-private-network", "true".into()));
        }
        out
    }
}

fn allowed_header(name: &str) -> bool {
    ALLOWED_HEADERS.contains(&name)
        || name
            .strip_prefix(ALLOWED_PREFIX)
            .is_some_and(|rest| !rest.is_empty())
}

/// Whether a request is a CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`.
pub(crate) fn is_preflight(method: &http::Method, headers: &http::HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn cors() -> Cors {
        Cors::new(&CorsConfig {
            origins: vec![
                "https://chat.example.com".into(),
                "chrome-extension://abcdef".into(),
            ],
            max_age: HumanDuration::secs(600),
        })
    }

    #[test]
    fn only_exact_origins_are_allowed() {
        let c = cors();
        for ok in ["https://chat.example.com", "chrome-extension://abcdef"] {
            assert_eq!(c.allows(Some(ok.as_bytes())), Some(ok));
        }
        for no in [
            "https://chat.example.com.evil.com",
            "http://chat.example.com",
            "https://chat.example.com:8443",
            "https://CHAT.example.com",
            "https://chat.example.com/",
            "null",
            "",
        ] {
            assert_eq!(c.allows(Some(no.as_bytes())), None, "{no}");
        }
        assert_eq!(c.allows(None), None);
        assert_eq!(c.allows(Some(b"\xff")), None);
    }

    #[test]
    fn a_preflight_allows_what_the_sdks_send_and_nothing_else() {
        let c = cors();
        let h = c.preflight(
            "https://chat.example.com",
            "POST",
            Some("Authorization, content-type,x-stainless-os, X-Stainless-Retry-Count, cookie, x-stainless-, x-evil"),
            false,
        );
        let get = |name: &str| h.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        assert_eq!(
            get("access-control-allow-origin"),
            Some("https://chat.example.com")
        );
        assert_eq!(get("access-control-allow-methods"), Some("POST"));
        assert_eq!(get("access-control-max-age"), Some("600"));
        assert_eq!(
            get("access-control-allow-headers"),
            Some("authorization, content-type, x-stainless-os, x-stainless-retry-count")
        );
        assert_eq!(get("access-control-allow-private-network"), None);
        let h = c.preflight("chrome-extension://abcdef", "GET", None, true);
        assert!(!h.iter().any(|(k, _)| *k == "access-control-allow-headers"));
        assert!(h.contains(&("access-control-allow-private-network", "true".into())));
    }

    #[test]
    fn a_preflight_is_options_with_origin_and_a_requested_method() {
        let mut h = http::HeaderMap::new();
        h.insert("origin", "https://a.example".parse().unwrap());
        assert!(!is_preflight(&http::Method::OPTIONS, &h));
        h.insert("access-control-request-method", "POST".parse().unwrap());
        assert!(is_preflight(&http::Method::OPTIONS, &h));
        assert!(!is_preflight(&http::Method::POST, &h));
    }
}
