//! An incremental JSON scanner that reports scalar values at chosen paths without holding the
//! document: bytes go in as they arrive (split anywhere), memory stays bounded by nesting depth.
//! It assumes well-formed JSON (it reads Ollama's output) and never fails: odd input just yields
//! no values.

/// Keys longer than this are not matched (no watched key is anywhere near it).
const MAX_KEY: usize = 48;
/// Scalars longer than this are not reported.
const MAX_SCALAR: usize = 40;
/// Deeper nesting is scanned but not tracked.
const MAX_DEPTH: usize = 16;

/// Receives `(path, scalar)` for every scalar read.
pub(crate) type OnValue<'a> = dyn FnMut(&[&[u8]], &[u8]) + 'a;

#[derive(Debug, Clone)]
struct Frame {
    object: bool,
    key: Vec<u8>,
    key_overflow: bool,
    expecting_key: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Between,
    String { key: bool, escape: bool },
    Scalar,
}

/// Scans one JSON document at a time. Call [`Scanner::reset`] between documents.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    stack: Vec<Frame>,
    depth: usize,
    state: State,
    scalar: Vec<u8>,
    scalar_overflow: bool,
    /// Whether the document's top-level value has closed.
    complete: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            stack: Vec::with_capacity(4),
            depth: 0,
            state: State::Between,
            scalar: Vec::with_capacity(MAX_SCALAR),
            scalar_overflow: false,
            complete: false,
        }
    }
}

impl Scanner {
    pub(crate) fn reset(&mut self) {
        self.stack.clear();
        self.depth = 0;
        self.state = State::Between;
        self.scalar.clear();
        self.scalar_overflow = false;
        self.complete = false;
    }

    /// Whether a whole document (object or array) has been read.
    pub(crate) fn complete(&self) -> bool {
        self.complete
    }

    /// Feeds bytes; `on_value(path, scalar)` is called for every scalar (number, `true`,
    /// `false`, `null`, or a string's raw contents) whose path is fully tracked. `path` holds the
    /// keys of the enclosing objects, with `""` for array levels.
    pub(crate) fn feed(&mut self, bytes: &[u8], on_value: &mut OnValue<'_>) {
        for &b in bytes {
            self.step(b, on_value);
        }
    }

    /// Reports a value; a string longer than `MAX_SCALAR` is reported by its start (callers only
    /// look at short strings, or at a string's presence), an overlong number not at all.
    fn path_matches_and_emit(&self, value: &[u8], string: bool, on_value: &mut OnValue<'_>) {
        if self.depth > MAX_DEPTH
            || self.stack.iter().any(|f| f.key_overflow)
            || (self.scalar_overflow && !string)
        {
            return;
        }
        let mut path: [&[u8]; MAX_DEPTH] = [&[]; MAX_DEPTH];
        for (i, f) in self.stack.iter().enumerate() {
            path[i] = if f.object { &f.key } else { b"" };
        }
        on_value(&path[..self.stack.len()], value);
    }

    fn end_scalar(&mut self, string: bool, on_value: &mut OnValue<'_>) {
        if self.in_value_position() {
            let value = std::mem::take(&mut self.scalar);
            self.path_matches_and_emit(&value, string, on_value);
            self.scalar = value;
        }
        self.scalar.clear();
        self.scalar_overflow = false;
        self.state = State::Between;
    }

    /// Object members report under their key; array elements under "".
    fn in_value_position(&self) -> bool {
        self.stack
            .last()
            .is_none_or(|f| !f.object || !f.expecting_key)
    }

    fn open(&mut self, object: bool) {
        self.depth += 1;
        if self.depth <= MAX_DEPTH {
            self.stack.push(Frame {
                object,
                key: Vec::new(),
                key_overflow: false,
                expecting_key: object,
            });
        }
    }

    fn close(&mut self) {
        if self.depth == 0 {
            return;
        }
        if self.depth <= MAX_DEPTH {
            self.stack.pop();
        }
        self.depth -= 1;
        if self.depth == 0 {
            self.complete = true;
        }
    }

    fn step(&mut self, b: u8, on_value: &mut OnValue<'_>) {
        match self.state {
            State::String { key, escape } => {
                if escape {
                    self.state = State::String { key, escape: false };
                    self.push_string_byte(key, b);
                } else if b == b'\\' {
                    self.state = State::String { key, escape: true };
                    self.push_string_byte(key, b);
                } else if b == b'"' {
                    if key {
                        if let Some(f) = self.tracked_top() {
                            f.expecting_key = false;
                        }
                        self.state = State::Between;
                    } else {
                        self.end_scalar(true, on_value);
                    }
                } else {
                    self.push_string_byte(key, b);
                }
            }
            State::Scalar => match b {
                b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t' => {
                    self.end_scalar(false, on_value);
                    self.step(b, on_value);
                }
                _ => self.push_scalar(b),
            },
            State::Between => match b {
                b'{' => self.open(true),
                b'[' => self.open(false),
                b'}' | b']' => self.close(),
                b',' => {
                    if let Some(f) = self.tracked_top() {
                        if f.object {
                            f.expecting_key = true;
                            f.key.clear();
                            f.key_overflow = false;
                        }
                    }
                }
                b'"' => {
                    let key = self.depth <= MAX_DEPTH
                        && self
                            .stack
                            .last()
                            .is_some_and(|f| f.object && f.expecting_key);
                    if key {
                        if let Some(f) = self.tracked_top() {
                            f.key.clear();
                            f.key_overflow = false;
                        }
                    }
                    self.state = State::String { key, escape: false };
                }
                b':' | b' ' | b'\n' | b'\r' | b'\t' => {}
                _ => {
                    self.state = State::Scalar;
                    self.push_scalar(b);
                }
            },
        }
    }

    fn tracked_top(&mut self) -> Option<&mut Frame> {
        if self.depth <= MAX_DEPTH {
            self.stack.last_mut()
        } else {
            None
        }
    }

    fn push_string_byte(&mut self, key: bool, b: u8) {
        if key {
            if let Some(f) = self.tracked_top() {
                if f.key.len() < MAX_KEY {
                    f.key.push(b);
                } else {
                    f.key_overflow = true;
                }
            }
        } else {
            self.push_scalar(b);
        }
    }

    fn push_scalar(&mut self, b: u8) {
        if self.scalar.len() < MAX_SCALAR {
            self.scalar.push(b);
        } else {
            self.scalar_overflow = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(doc: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut s = Scanner::default();
        s.feed(doc.as_bytes(), &mut |path, v| {
            let p: Vec<String> = path
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            out.push((p.join("."), String::from_utf8_lossy(v).into_owned()));
        });
        assert!(s.complete(), "{doc}");
        out
    }

    #[test]
    fn reports_scalars_with_their_paths() {
        let v = values(r#"{"a":1,"b":{"c":true,"d":[10,{"e":"x\"y"}]},"f":null , "g" : -2.5e3}"#);
        assert_eq!(
            v,
            [
                ("a", "1"),
                ("b.c", "true"),
                ("b.d.", "10"),
                ("b.d..e", "x\\\"y"),
                ("f", "null"),
                ("g", "-2.5e3"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn keys_inside_strings_do_not_confuse_it() {
        let v = values(r#"{"content":"{\"eval_count\":99}","eval_count":7}"#);
        assert_eq!(
            v.last().unwrap(),
            &("eval_count".to_string(), "7".to_string())
        );
        assert_eq!(v.iter().filter(|(k, _)| k == "eval_count").count(), 1);
    }

    #[test]
    fn long_strings_and_deep_nesting_stay_bounded() {
        let big = "a".repeat(100_000);
        let doc = format!(
            r#"{{"s":"{big}","n":{}1{},"k":2}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let v = values(&doc);
        assert_eq!(
            v[0],
            ("s".to_string(), "a".repeat(MAX_SCALAR)),
            "a long string reports its start"
        );
        assert_eq!(v[1..], [("k".to_string(), "2".to_string())]);
    }
}
