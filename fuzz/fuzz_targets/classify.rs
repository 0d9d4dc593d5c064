//! Request classification: route table, body reading and model extraction must never panic, and
//! a path corral accepts must be exactly a route it serves.
#![no_main]

use corral::ollama::json::JsonObject;
use corral::access::policy::referenced;
use corral::api::routes::classify;
use libfuzzer_sys::fuzz_target;

const METHODS: [http::Method; 5] = [
    http::Method::GET,
    http::Method::POST,
    http::Method::DELETE,
    http::Method::HEAD,
    http::Method::PUT,
];

fuzz_target!(|data: &[u8]| {
    let (Some(&first), rest) = (data.first(), data.get(1..).unwrap_or_default()) else {
        return;
    };
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let (target, body) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
    let method = &METHODS[first as usize % METHODS.len()];
    if let Ok(m) = classify(method, target) {
        // Whatever was accepted carries no trick.
        assert!(
            !m.path.contains("..") && !m.path.contains("//") && !m.path.contains('%'),
            "{m:?}"
        );
        assert!(m.path.starts_with('/'));
        if let Ok(obj) = JsonObject::parse(body) {
            let _ = referenced(m.kind, Some(&obj), m.param.as_deref());
            let _ = obj.write_with(&[("keep_alive", None)]);
        }
    }
});
