//! Key parsing: carriers and verification must never panic, and nothing but a key signed by the
//! trusted key verifies.
#![no_main]

use corral::access::auth::{key_from_headers, Verifier};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn verifier() -> &'static Verifier {
    static V: OnceLock<(tempfile_dir::Dir, Verifier)> = OnceLock::new();
    &V.get_or_init(|| {
        let dir = tempfile_dir::Dir::new();
        let (_, public) = corral::access::keys::init(&dir.0, "fuzz").unwrap();
        let key = corral::access::keys::load_verify_key(&public).unwrap();
        (
            dir,
            Verifier::new([("fuzz".to_string(), key)].into(), Default::default()),
        )
    })
    .1
}

mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("corral-fuzz-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Fuzz bytes as header values in each carrier.
    let mut headers = http::HeaderMap::new();
    for (i, part) in text.split('\n').take(4).enumerate() {
        let name = ["authorization", "x-api-key", "authorization", "x-api-key"][i];
        if let Ok(v) = http::HeaderValue::from_str(part) {
            headers.append(name, v);
        }
    }
    if let Ok(key) = key_from_headers(&headers) {
        // Random input never carries a signature by the fuzz key.
        assert!(verifier().verify(&key, 0).is_err());
    }
    let _ = verifier().verify(&text, 0);
    let _ = corral::access::keys::peek(&text);
});
