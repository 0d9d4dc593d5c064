//! Token usage and stream completeness, read from responses as they pass, never buffered. Uses
//! nothing else of corral.
//!
//! One [`Meter`] per response. It reads whichever shape the route produces (Ollama's final NDJSON
//! object, `usage` in `/v1` bodies and SSE chunks, the Responses API's `response.completed`,
//! Anthropic's `message_start`/`message_delta`), correct whatever the chunk boundaries, and tells
//! whether a stream ended with its end marker (`"done":true`, `data: [DONE]`, `response.completed`,
//! `message_stop`). [`UsageStripper`] removes the usage corral asked Ollama for on `/v1` streams
//! whose client did not ask for it.

mod format;
mod scan;
mod strip;

pub use format::BodyFormat;
pub use strip::UsageStripper;

use scan::Scanner;

/// Tokens of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt: Option<u64>,
    pub(crate) completion: Option<u64>,
}

/// The most prompt tokens a cut-off stream is charged without a count from Ollama.
pub(crate) const PROMPT_ESTIMATE_CAP: u64 = 4096;

impl Usage {
    /// This usage with every missing count estimated, for streams that end without Ollama's
    /// counts (the client left first, or the server never reports usage): one completion token
    /// per NDJSON line or SSE event received (Ollama streams a token at a time) and one prompt
    /// token per 4 bytes of request body, at most [`PROMPT_ESTIMATE_CAP`] (a base64 image is
    /// large but costs few tokens).
    pub(crate) fn estimated(&self, pieces: u64, request_bytes: u64) -> Usage {
        Usage {
            prompt: Some(
                self.prompt
                    .unwrap_or((request_bytes / 4).min(PROMPT_ESTIMATE_CAP)),
            ),
            completion: Some(self.completion.unwrap_or(pieces)),
        }
    }

    /// Whether the response reported no count at all.
    pub(crate) fn is_unknown(&self) -> bool {
        self.prompt.is_none() && self.completion.is_none()
    }

    pub(crate) fn total(&self) -> u64 {
        self.prompt
            .unwrap_or(0)
            .saturating_add(self.completion.unwrap_or(0))
    }
}

/// What the meter concluded about a response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub(crate) usage: Usage,
    /// The body ended properly: a stream with its end marker, a document that closed.
    pub(crate) complete: bool,
    /// An error object arrived inside the stream.
    pub(crate) error_in_stream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Prompt,
    Completion,
    Done,
    Error,
}

/// The fields that carry usage, in every shape Ollama produces (they do not collide).
const FIELDS: &[(&[&[u8]], Role)] = &[
    (&[b"prompt_eval_count"], Role::Prompt),
    (&[b"eval_count"], Role::Completion),
    (&[b"done"], Role::Done),
    (&[b"error"], Role::Error),
    (&[b"error", b"message"], Role::Error),
    (&[b"usage", b"prompt_tokens"], Role::Prompt),
    (&[b"usage", b"completion_tokens"], Role::Completion),
    (&[b"usage", b"input_tokens"], Role::Prompt),
    (&[b"usage", b"output_tokens"], Role::Completion),
    (&[b"response", b"usage", b"input_tokens"], Role::Prompt),
    (&[b"response", b"usage", b"output_tokens"], Role::Completion),
    (&[b"message", b"usage", b"input_tokens"], Role::Prompt),
];

/// SSE events that end a stream (besides `data: [DONE]`).
const SSE_END_EVENTS: &[&[u8]] = &[
    b"response.completed",
    b"response.incomplete",
    b"message_stop",
];
const SSE_ERROR_EVENTS: &[&[u8]] = &[b"error", b"response.failed"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the field name (up to ':').
    Field,
    /// Skipping the one optional space after ':'.
    ValueStart,
    Value,
    /// A field corral does not read, or a comment.
    Ignore,
}

/// The value of an SSE `data` line: what follows `data:`, less one optional space. The SSE rule
/// both the [`Meter`] (byte by byte: `Line::ValueStart`) and the [`UsageStripper`] (an event's
/// first line) read `data` by.
fn sse_data_value(line: &[u8]) -> Option<&[u8]> {
    let value = line.strip_prefix(b"data:")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// SSE framing state: which field the current line carries.
#[derive(Debug)]
struct Sse {
    line: Line,
    field: Vec<u8>,
    line_empty: bool,
    event: Vec<u8>,
    data: Vec<u8>,
}

pub struct Meter {
    format: BodyFormat,
    scanner: Scanner,
    sse: Sse,
    outcome: Outcome,
    saw_body: bool,
    /// NDJSON lines or SSE events with data seen so far.
    pieces: u64,
}

impl Meter {
    pub fn new(format: BodyFormat) -> Meter {
        Meter {
            format,
            scanner: Scanner::default(),
            sse: Sse {
                line: Line::Field,
                field: Vec::new(),
                line_empty: true,
                event: Vec::new(),
                data: Vec::new(),
            },
            outcome: Outcome::default(),
            saw_body: false,
            pieces: 0,
        }
    }

    /// Reads the next piece of the body, wherever it was cut.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.saw_body = true;
        match self.format {
            BodyFormat::Other => {
                let outcome = &mut self.outcome;
                self.scanner
                    .feed(chunk, &mut |path, v| record(outcome, path, v));
            }
            BodyFormat::Ndjson => {
                // Compact JSON never holds a raw newline: each one ends a document.
                for part in chunk.split_inclusive(|&b| b == b'\n') {
                    let (body, ends) = match part.strip_suffix(b"\n") {
                        Some(b) => (b, true),
                        None => (part, false),
                    };
                    let outcome = &mut self.outcome;
                    self.scanner
                        .feed(body, &mut |path, v| record(outcome, path, v));
                    if ends {
                        self.scanner.reset();
                        self.pieces += 1;
                    }
                }
            }
            BodyFormat::Sse => {
                let mut rest = chunk;
                while let Some((&b, tail)) = rest.split_first() {
                    let in_data = self.sse.line == Line::Value && self.sse.field == b"data";
                    if in_data && b != b'\n' && b != b'\r' {
                        // The bulk of a stream: hand the whole run of data to the scanner.
                        let run = tail
                            .iter()
                            .position(|&c| c == b'\n' || c == b'\r')
                            .map_or(rest.len(), |i| i + 1);
                        if run > 1 {
                            self.sse_data(&rest[..run]);
                            rest = &rest[run..];
                            continue;
                        }
                    }
                    self.sse_byte(b);
                    rest = tail;
                }
            }
        }
    }

    fn sse_byte(&mut self, b: u8) {
        let sse = &mut self.sse;
        if b == b'\n' {
            if sse.line_empty {
                self.end_event();
            } else if sse.field == b"data" {
                // Multi-line data continues the same document.
                let outcome = &mut self.outcome;
                self.scanner
                    .feed(b"\n", &mut |path, v| record(outcome, path, v));
            }
            let sse = &mut self.sse;
            sse.line = Line::Field;
            sse.field.clear();
            sse.line_empty = true;
            return;
        }
        if b == b'\r' {
            return;
        }
        sse.line_empty = false;
        match sse.line {
            Line::Field if b == b':' => {
                sse.line = if sse.field.is_empty() {
                    Line::Ignore
                } else {
                    Line::ValueStart
                };
            }
            Line::Field => {
                if sse.field.len() < 16 {
                    sse.field.push(b);
                } else {
                    sse.line = Line::Ignore;
                }
            }
            // One optional space after the colon, as in `sse_data_value`.
            Line::ValueStart if b == b' ' => sse.line = Line::Value,
            Line::ValueStart | Line::Value => {
                sse.line = Line::Value;
                if sse.field == b"data" {
                    self.sse_data(&[b]);
                } else if sse.field == b"event" && sse.event.len() < 64 {
                    sse.event.push(b);
                }
            }
            Line::Ignore => {}
        }
    }

    /// Part of a `data:` value, with no line break in it.
    fn sse_data(&mut self, bytes: &[u8]) {
        let data = &mut self.sse.data;
        let room = 8usize.saturating_sub(data.len());
        data.extend_from_slice(&bytes[..room.min(bytes.len())]);
        let outcome = &mut self.outcome;
        self.scanner
            .feed(bytes, &mut |path, v| record(outcome, path, v));
    }

    fn end_event(&mut self) {
        let sse = &mut self.sse;
        // Every event with data is a piece (about a token), but the `[DONE]` marker.
        if !sse.data.is_empty() && !sse.data.starts_with(b"[DONE]") {
            self.pieces += 1;
        }
        if sse.data.starts_with(b"[DONE]") || SSE_END_EVENTS.contains(&sse.event.as_slice()) {
            self.outcome.complete = true;
        }
        if SSE_ERROR_EVENTS.contains(&sse.event.as_slice()) {
            self.outcome.error_in_stream = true;
        }
        sse.event.clear();
        sse.data.clear();
        self.scanner.reset();
    }

    /// Whether the body's end marker has been read (a document that closed, for bodies that
    /// are not streams): whatever happens to the connection afterwards, the client has it all.
    pub(crate) fn complete(&self) -> bool {
        self.outcome.complete || (self.format == BodyFormat::Other && self.scanner.complete())
    }

    /// NDJSON lines or SSE events with data read so far.
    pub(crate) fn pieces(&self) -> u64 {
        self.pieces
    }

    /// The verdict once the body has ended (or broke off).
    pub fn finish(&mut self) -> Outcome {
        if self.format == BodyFormat::Other {
            self.outcome.complete = self.scanner.complete() || !self.saw_body;
        }
        self.outcome
    }
}

fn record(outcome: &mut Outcome, path: &[&[u8]], value: &[u8]) {
    let Some((_, role)) = FIELDS.iter().find(|(p, _)| *p == path) else {
        return;
    };
    match role {
        Role::Prompt => outcome.usage.prompt = parse_count(value).or(outcome.usage.prompt),
        Role::Completion => {
            outcome.usage.completion = parse_count(value).or(outcome.usage.completion)
        }
        Role::Done => {
            if value == b"true" {
                outcome.complete = true;
            }
        }
        Role::Error => {
            if value != b"null" {
                outcome.error_in_stream = true;
            }
        }
    }
}

fn parse_count(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
