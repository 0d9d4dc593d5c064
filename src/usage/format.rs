//! What a response body is, read from its content type: the shapes the meter and the stripper know.

/// What the response body is, from its content type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyFormat {
    #[default]
    Other,
    /// `application/x-ndjson`: Ollama's native streams.
    Ndjson,
    /// `text/event-stream`: the `/v1` streams.
    Sse,
}

impl BodyFormat {
    pub(crate) fn from_content_type(ct: &[u8]) -> BodyFormat {
        let ct = ct.to_ascii_lowercase();
        if ct.starts_with(b"application/x-ndjson") {
            BodyFormat::Ndjson
        } else if ct.starts_with(b"text/event-stream") {
            BodyFormat::Sse
        } else {
            BodyFormat::Other
        }
    }
}
