//! How a request's body is framed, read from its head: by `Content-Length`, by chunked
//! `Transfer-Encoding`, or by neither (no body over HTTP/1.1; over HTTP/2, DATA frames may still
//! follow). Anything two parsers could read differently (request smuggling) is refused. Pure, and
//! fuzzed (`fuzz/fuzz_targets/framing.rs`).

use crate::api::error::GatewayError;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use pingora::http::RequestHeader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No framing header.
    Unframed,
    Length(u64),
    Chunked,
}

impl Framing {
    /// Whether the head promises body bytes (a `Content-Length` above 0). Chunks may still
    /// turn out to be none.
    pub(crate) fn promises_bytes(self) -> bool {
        matches!(self, Framing::Length(1..))
    }
}

fn bad(message: &str) -> GatewayError {
    GatewayError::BadRequest(message.into())
}

/// The framing of a request. pingora drops `Content-Length` when `Transfer-Encoding` is present
/// (RFC 9112 6.3); `raw` gives the header block as sent, read only then, to see whether the
/// client sent both.
pub fn of<R: AsRef<[u8]>>(
    req: &RequestHeader,
    raw: impl FnOnce() -> R,
) -> Result<Framing, GatewayError> {
    let mut te = req.headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if req.headers.contains_key(CONTENT_LENGTH) || declares_length(raw().as_ref()) {
            return Err(bad(
                "a request may not carry both Content-Length and Transfer-Encoding",
            ));
        }
        if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(bad("the only Transfer-Encoding accepted is `chunked`"));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in req.headers.get_all(CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| bad("Content-Length must be a number"))?;
        for n in text.split(',') {
            // Digits only (RFC 9110 8.6): Rust would also take a leading `+`.
            let n = n.trim();
            let n: u64 = (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse().ok())
                .flatten()
                .ok_or_else(|| bad("Content-Length must be a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Unframed, Framing::Length))
}

/// Whether a raw HTTP/1 header block has a `Content-Length` line.
fn declares_length(raw: &[u8]) -> bool {
    raw.split(|&b| b == b'\n').skip(1).any(|line| {
        line.iter().position(|&b| b == b':').is_some_and(|colon| {
            line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(b"content-length")
        })
    })
}

/// A `POST /api/chat` header with these fields, for the proxy's unit tests.
#[cfg(test)]
pub(crate) fn test_request(headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("POST", b"/api/chat", None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::test_request as req;
    use super::*;

    fn framing(headers: &[(&str, &str)]) -> Result<Framing, u16> {
        of(&req(headers), || b"".to_vec()).map_err(|e| e.status())
    }

    #[test]
    fn each_framing_is_read() {
        assert_eq!(framing(&[]), Ok(Framing::Unframed));
        assert_eq!(framing(&[("content-length", "5")]), Ok(Framing::Length(5)));
        assert_eq!(
            framing(&[("content-length", "5, 5")]),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing(&[("content-length", "0"), ("content-length", "0")]),
            Ok(Framing::Length(0))
        );
        assert_eq!(
            framing(&[("transfer-encoding", "Chunked")]),
            Ok(Framing::Chunked)
        );
        assert!(!Framing::Length(0).promises_bytes() && !Framing::Chunked.promises_bytes());
        assert!(Framing::Length(5).promises_bytes());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for bad in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "xchunked")],
            &[("content-length", "5, 6")],
            &[("content-length", "5"), ("content-length", "6")],
            &[("content-length", "-1")],
            &[("content-length", "+5")],
            &[("content-length", "")],
        ] {
            assert_eq!(framing(bad), Err(400), "{bad:?}");
        }
    }

    #[test]
    fn content_length_hidden_by_pingora_is_still_seen() {
        let raw = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-length : 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(declares_length(raw));
        let raw = b"POST /content-length: HTTP/1.1\r\nX-Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!declares_length(raw));
        let te = req(&[("transfer-encoding", "chunked")]);
        let hidden = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(of(&te, || hidden.to_vec()).unwrap_err().status(), 400);
    }
}
