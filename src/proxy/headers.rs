//! Header hygiene between the client and Ollama.

use pingora::http::RequestHeader;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Client headers that never reach Ollama: credentials (corral's own key among them), forwarding
/// claims corral sets itself, `X-Forwarded-Prefix` (gin builds redirects from it), `Origin`
/// (Ollama refuses unknown origins with a bare 403), and content negotiation corral must not
/// leave to the client (usage is read from identity-encoded responses), and corral's own
/// `x-corral-node`.
const STRIPPED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "x-forwarded-prefix",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "forwarded",
    "origin",
    "accept-encoding",
    "expect",
    "x-corral-node",
];

/// Rewrites the upstream request headers: `Host` becomes the upstream's (a loopback-bound Ollama
/// refuses other hosts), forwarding headers describe the real client.
pub(crate) fn prepare_upstream(
    req: &mut RequestHeader,
    upstream_host: http::HeaderValue,
    client_ip: Option<IpAddr>,
    request_id: &str,
    client_tls: bool,
) -> pingora::Result<()> {
    // One pass over what the client sent, then only the names it used are removed (each
    // removal is a lookup; most requests carry one or two of these).
    let mut present = [false; STRIPPED.len()];
    for name in req.headers.keys() {
        if let Some(i) = STRIPPED.iter().position(|s| *s == name.as_str()) {
            present[i] = true;
        }
    }
    for (name, _) in STRIPPED.iter().zip(present).filter(|(_, p)| *p) {
        while req.remove_header(*name).is_some() {}
    }
    req.insert_header(http::header::HOST, upstream_host)?;
    // Fixed values are static: nothing is parsed or copied for them per request.
    if let Some(ip) = client_ip {
        let mut text = [0u8; IP_TEXT_MAX];
        req.insert_header(X_FORWARDED_FOR, ip_text(ip, &mut text))?;
    }
    let proto = http::HeaderValue::from_static(if client_tls { "https" } else { "http" });
    req.insert_header(X_FORWARDED_PROTO, proto)?;
    req.insert_header(X_REQUEST_ID, request_id)?;
    Ok(())
}

/// The longest text of an address (`INET6_ADDRSTRLEN` without its NUL; Rust writes at most 39).
const IP_TEXT_MAX: usize = 45;

/// An address as text, written into `buf`: the header value is then its only copy.
fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT_MAX]) -> &[u8] {
    let mut rest = &mut buf[..];
    let _ = std::io::Write::write_fmt(&mut rest, format_args!("{ip}"));
    let written = IP_TEXT_MAX - rest.len();
    &buf[..written]
}

// Names corral adds are given as static text, not `HeaderName`s: pingora keeps each header's
// spelling next to its name, and copies a name it is given as `HeaderName` (one allocation per
// header and request) while it borrows a static one.
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
/// The request id header, to Ollama and back to the client.
pub(crate) const X_REQUEST_ID: &str = "x-request-id";

/// The client's `X-Request-Id` if it is well-formed (1-128 of `[A-Za-z0-9._:-]`), else a new one.
pub(crate) fn request_id(incoming: Option<&[u8]>) -> String {
    if let Some(id) = incoming {
        if (1..=128).contains(&id.len())
            && id
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
        {
            return String::from_utf8_lossy(id).into_owned();
        }
    }
    new_request_id()
}

/// 32 hex digits: a random per-process prefix and a counter (unique, cheap, not secret).
pub(crate) fn new_request_id() -> String {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    // Sized at once (`format!` would grow the string twice).
    let mut id = String::with_capacity(32);
    let _ = std::fmt::Write::write_fmt(
        &mut id,
        format_args!(
            "{prefix:016x}{:016x}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ),
    );
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_credentials_and_rewrites_host() {
        let mut req = RequestHeader::build("POST", b"/api/chat", None).unwrap();
        for (k, v) in [
            ("host", "corral.example.com"),
            ("authorization", "Bearer secret"),
            ("x-api-key", "secret"),
            ("cookie", "a=b"),
            ("x-forwarded-prefix", "/evil"),
            ("x-forwarded-for", "6.6.6.6"),
            ("origin", "https://evil.example"),
            ("content-type", "application/json"),
        ] {
            req.append_header(k, v).unwrap();
        }
        req.append_header("authorization", "Basic second").unwrap();
        prepare_upstream(
            &mut req,
            http::HeaderValue::from_static("127.0.0.1:11434"),
            Some("10.1.2.3".parse().unwrap()),
            "rid",
            true,
        )
        .unwrap();
        let h = &req.headers;
        assert_eq!(h.get("host").unwrap(), "127.0.0.1:11434");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.1.2.3");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-request-id").unwrap(), "rid");
        assert_eq!(h.get("content-type").unwrap(), "application/json");
        for gone in [
            "authorization",
            "x-api-key",
            "cookie",
            "x-forwarded-prefix",
            "origin",
        ] {
            assert!(h.get(gone).is_none(), "{gone} still there");
        }
    }

    #[test]
    fn addresses_are_written_whole() {
        let mut buf = [0u8; IP_TEXT_MAX];
        for ip in [
            "255.255.255.255",
            "1111:2222:3333:4444:5555:6666:7777:8888",
            "::ffff:203.0.113.7",
            "::1",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(parsed, &mut buf), ip.as_bytes());
        }
    }

    #[test]
    fn request_ids_are_kept_only_when_well_formed() {
        assert_eq!(request_id(Some(b"abc-123.x:y_z")), "abc-123.x:y_z");
        for bad in [&b""[..], b"has space", b"new\nline", &[b'a'; 129]] {
            let id = request_id(Some(bad));
            assert_eq!(id.len(), 32, "{id}");
        }
        assert_ne!(new_request_id(), new_request_id());
    }
}
