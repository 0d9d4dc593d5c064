//! JSON as Ollama's Go decoder reads it, where that differs from strict JSON (serde_json): invalid
//! UTF-8 and unpaired UTF-16 surrogate escapes become U+FFFD instead of failing. The double reads
//! request bodies this way, as Ollama does. (corral itself refuses invalid UTF-8 and passes
//! surrogate escapes through untouched.)

use std::borrow::Cow;

/// The body as Go's decoder reads it, where that differs from strict JSON: invalid UTF-8 and
/// unpaired UTF-16 surrogate escapes (`"\ud83d"`, what a JavaScript client sends for an emoji cut
/// in half) become U+FFFD instead of failing. `None`: nothing to change (the usual case).
pub(crate) fn go_lenient(body: &[u8]) -> Option<Vec<u8>> {
    let has_escape_d = body
        .windows(3)
        .any(|w| w[0] == b'\\' && w[1] == b'u' && matches!(w[2], b'd' | b'D'));
    let text = String::from_utf8_lossy(body);
    if !has_escape_d {
        return matches!(text, Cow::Owned(_)).then(|| text.into_owned().into_bytes());
    }
    let unit = |s: &str| u16::from_str_radix(s.get(2..6)?, 16).ok();
    let mut out = String::with_capacity(text.len());
    let (mut rest, mut in_string, mut changed) = (&text[..], false, matches!(text, Cow::Owned(_)));
    while let Some(c) = rest.chars().next() {
        if in_string && c == '\\' && rest.as_bytes().get(1) == Some(&b'u') {
            if let Some(u) = unit(rest) {
                let low_next = rest
                    .get(6..)
                    .filter(|r| r.starts_with("\\u"))
                    .and_then(unit)
                    .is_some_and(|n| (0xDC00..0xE000).contains(&n));
                if (0xD800..0xDC00).contains(&u) && low_next {
                    out.push_str(&rest[..12]);
                    rest = &rest[12..];
                } else {
                    if (0xD800..0xE000).contains(&u) {
                        out.push_str("\\ufffd");
                        changed = true;
                    } else {
                        out.push_str(&rest[..6]);
                    }
                    rest = &rest[6..];
                }
                continue;
            }
        }
        if in_string && c == '\\' {
            // Any other escape: copy it whole so an escaped quote does not end the string.
            let len = 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&rest[..len]);
            rest = &rest[len..];
            continue;
        }
        if c == '"' {
            in_string = !in_string;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    changed.then(|| out.into_bytes())
}

/// A JSON document read as Go reads it (see [`go_lenient`]).
pub(crate) fn value_like_go(body: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    match go_lenient(body) {
        Some(repaired) => serde_json::from_slice(&repaired),
        None => serde_json::from_slice(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_go_would_repair_is_repaired_not_refused() {
        let fix = |b: &[u8]| go_lenient(b).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(fix(br#"{"prompt":"fine \u00e9 \ud83d\ude00"}"#), None);
        assert_eq!(
            fix(br#"{"prompt":"cut \ud83d","x":"\uDE00 end"}"#).as_deref(),
            Some(r#"{"prompt":"cut \ufffd","x":"\ufffd end"}"#)
        );
        // An escaped backslash before `ud800` is text, not an escape.
        assert_eq!(fix(br#"{"p":"\\ud800"}"#), None);
        assert_eq!(
            fix(b"{\"p\":\"a\xff\"}").as_deref(),
            Some("{\"p\":\"a\u{fffd}\"}")
        );
    }
}
