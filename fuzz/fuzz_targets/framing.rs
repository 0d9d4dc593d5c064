//! Request framing: any header block, parsed as pingora parses it, is read as exactly one framing
//! or refused, never both, and what is accepted is what the headers say.
#![no_main]

use corral::proxy::framing::{self, Framing};
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return;
    };
    let Ok(mut req) = RequestHeader::build(method, path.as_bytes(), None) else {
        return;
    };
    for h in parsed.headers.iter() {
        if req.append_header(h.name.to_string(), h.value).is_err() {
            return;
        }
    }
    let te: Vec<_> = req.headers.get_all("transfer-encoding").iter().collect();
    let cl: Vec<_> = req.headers.get_all("content-length").iter().collect();
    match framing::of(&req, || data.to_vec()) {
        Ok(Framing::Chunked) => {
            assert!(cl.is_empty());
            assert_eq!(te.len(), 1);
            assert!(te[0].as_bytes().eq_ignore_ascii_case(b"chunked"));
        }
        Ok(Framing::Length(n)) => {
            assert!(te.is_empty());
            for v in cl {
                for part in v.to_str().unwrap().split(',') {
                    let part = part.trim();
                    assert!(part.bytes().all(|b| b.is_ascii_digit()), "{part}");
                    assert_eq!(part.parse::<u64>().unwrap(), n);
                }
            }
        }
        Ok(Framing::Unframed) => assert!(te.is_empty() && cl.is_empty()),
        Err(e) => assert_eq!(e.status(), 400),
    }
});
