//! Takes back out of a `/v1` stream the usage corral asked Ollama for, so the client sees exactly
//! what Ollama would have sent it: the usage-only chunk (`"choices":[]`) is dropped, and the zero
//! `usage` Ollama adds to every `/v1/completions` chunk once usage is requested is removed.
//!
//! Events are passed on as soon as they are complete; only an incomplete event's bytes wait for
//! the rest of it.

use bytes::{Bytes, BytesMut};

/// What Ollama appends to each `/v1/completions` chunk when usage is requested.
const ZERO_USAGE: &[u8] = br#","usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#;
/// An event larger than this is passed on unexamined (no usage chunk is anywhere near it).
const MAX_EVENT: usize = 1 << 20;

#[derive(Default)]
pub struct UsageStripper {
    pending: BytesMut,
    /// How much of `pending` has been searched for an event's end already: each byte is looked
    /// at once, however finely the stream is cut.
    scanned: usize,
}

impl UsageStripper {
    /// Returns what the client gets for this piece of the stream.
    pub fn process(&mut self, chunk: &[u8], end_of_stream: bool) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = find_event_end(&self.pending, self.scanned) {
            let event = self.pending.split_to(end);
            out.extend_from_slice(&rewrite(&event));
            self.scanned = 0;
        }
        self.scanned = self.pending.len();
        if end_of_stream || self.pending.len() > MAX_EVENT {
            out.extend_from_slice(&self.pending.split());
            self.scanned = 0;
        }
        out.freeze()
    }
}

/// Index just past the blank line that ends the first complete event (`\n\n`, `\r\n\r\n`),
/// searching from `from` on (the bytes before it were searched already).
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    (from.max(1)..buf.len())
        .find(|&i| {
            buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 2 && buf[i - 2..i] == *b"\n\r"))
        })
        .map(|i| i + 1)
}

fn rewrite(event: &[u8]) -> Vec<u8> {
    let Some(data) = super::sse_data_value(event) else {
        return event.to_vec();
    };
    let start = event.len() - data.len();
    let json_end = data
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(data.len());
    let json = &data[..json_end];
    if is_usage_only_chunk(json) {
        return Vec::new();
    }
    match json.windows(ZERO_USAGE.len()).position(|w| w == ZERO_USAGE) {
        Some(i) => [&event[..start + i], &event[start + i + ZERO_USAGE.len()..]].concat(),
        None => event.to_vec(),
    }
}

/// `{"...","choices":[],"usage":{...}}`: the chunk Ollama sends only when usage is requested.
fn is_usage_only_chunk(json: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Chunk>(json) {
        Ok(c) => c.usage.is_some() && c.choices.is_some_and(|c| c.is_empty()),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
        "data: [DONE]\n\n",
    );

    fn strip_all(text: &str, cut: &[usize]) -> String {
        let mut s = UsageStripper::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cut.iter().chain(std::iter::once(&text.len())) {
            out.extend_from_slice(&s.process(&text.as_bytes()[last..c], c == text.len()));
            last = c;
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn drops_the_usage_chunk_wherever_the_stream_is_cut() {
        let expected = CHAT.replace(
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
            "",
        );
        for cut in 0..CHAT.len() {
            assert_eq!(strip_all(CHAT, &[cut]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_stream() {
        let expected = strip_all(CHAT, &[]);
        let cuts: Vec<usize> = (1..CHAT.len()).collect();
        assert_eq!(strip_all(CHAT, &cuts), expected);
        let crlf = CHAT.replace("\n", "\r\n");
        let cuts: Vec<usize> = (1..crlf.len()).collect();
        assert_eq!(strip_all(&crlf, &cuts), strip_all(&crlf, &[]));
        assert!(!strip_all(&crlf, &cuts).contains("\"choices\":[],"));
    }

    #[test]
    fn removes_the_zero_usage_of_completions_chunks() {
        let with = "data: {\"id\":\"cmpl-1\",\"choices\":[{\"text\":\"Hi\",\"index\":0,\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}}\n\n";
        let without = "data: {\"id\":\"cmpl-1\",\"choices\":[{\"text\":\"Hi\",\"index\":0,\"finish_reason\":null}]}\n\n";
        assert_eq!(strip_all(with, &[]), without);
        // `data:` without its optional space is the same field, read the same way.
        let tight = |s: &str| s.replacen("data: ", "data:", 1);
        assert_eq!(strip_all(&tight(with), &[]), tight(without));
        let usage_only = "data:{\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n";
        assert_eq!(strip_all(usage_only, &[]), "");
    }

    #[test]
    fn leaves_everything_else_alone() {
        let other = "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n: comment\n\nevent: x\ndata: y\n\n";
        assert_eq!(strip_all(other, &[3, 20]), other);
        let unfinished = "data: {\"choices\":[],\"usa";
        assert_eq!(
            strip_all(unfinished, &[]),
            unfinished,
            "an incomplete event is flushed at the end"
        );
    }
}
