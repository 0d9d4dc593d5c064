//! JSON request bodies, read the way Ollama reads them.
//!
//! Ollama decodes bodies with Go's `encoding/json`, which matches object keys to fields
//! case-insensitively (with Unicode folding: `"MODEL"`, `"ſtream"` and `"\u212Aeep_alive"` all
//! hit a field) and lets the last duplicate win. If corral read a body differently, a client could
//! show corral one model and Ollama another. So corral looks keys up the same folded way and
//! refuses a body in which two keys fold to the same name, and refuses anything that is not one
//! valid JSON object. Values are borrowed from the body, never copied into a tree: a 30 MiB base64
//! image costs nothing extra to inspect.

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Top-level fields a body may have. Ollama's and OpenAI's requests have a few dozen at most; the
/// cap keeps a body of millions of tiny fields from costing more than it is worth to inspect.
const MAX_FIELDS: usize = 256;
const TOO_MANY_FIELDS: &str = "the request body has more than 256 top-level fields";

/// Why a body was refused (always a 400 in the caller's dialect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub String);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The top level of a JSON object body: keys in order, values as raw JSON text.
#[derive(Debug)]
pub struct JsonObject<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> JsonObject<'a> {
    pub fn parse(body: &'a [u8]) -> Result<JsonObject<'a>, BodyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(BodyError("missing request body".into()));
        }
        let entries: Entries<'a> = serde_json::from_slice(body).map_err(|e| {
            if e.is_data() && e.to_string().starts_with(TOO_MANY_FIELDS) {
                BodyError(TOO_MANY_FIELDS.into())
            } else if e.is_data() {
                BodyError("the request body must be a JSON object".into())
            } else {
                BodyError(format!("the request body is not valid JSON: {e}"))
            }
        })?;
        let mut seen: Vec<String> = Vec::with_capacity(entries.0.len());
        for (key, _) in &entries.0 {
            let folded = fold(key);
            if seen.contains(&folded) {
                return Err(BodyError(format!(
                    "the request body has the field \"{folded}\" more than once (field names are case-insensitive)"
                )));
            }
            seen.push(folded);
        }
        Ok(JsonObject { entries: entries.0 })
    }

    /// The fields' names as Go matches them (folded: `"Files"` is `files`), with their raw values.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (String, &'a RawValue)> + '_ {
        self.entries.iter().map(|(k, v)| (fold(k), *v))
    }

    /// The value of a field, matched as Go matches it (`name` is lowercase ASCII).
    pub(crate) fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .find(|(k, _)| folds_to(k, name))
            .map(|(_, v)| *v)
    }

    /// A string field; `null` and absent are `None`, any other type is an error.
    pub(crate) fn string(&self, name: &str) -> Result<Option<String>, BodyError> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) => match serde_json::from_str::<Option<String>>(raw.get()) {
                Ok(v) => Ok(v),
                Err(_) => Err(BodyError(format!("\"{name}\" must be a string"))),
            },
        }
    }

    /// A boolean field; `null` and absent are `None`, any other type is an error.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, BodyError> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str::<Option<bool>>(raw.get())
                .map_err(|_| BodyError(format!("\"{name}\" must be true or false"))),
        }
    }

    /// A nested object field, parsed with the same rules.
    pub(crate) fn object(&self, name: &str) -> Result<Option<JsonObject<'a>>, BodyError> {
        match self.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => JsonObject::parse(raw.get().as_bytes())
                .map(Some)
                .map_err(|_| BodyError(format!("\"{name}\" must be an object"))),
        }
    }

    /// The body re-serialized with `changes` applied: `(name, Some(json))` sets a field to the
    /// JSON text `json` (replacing the field Go would read as `name` in place, or appending),
    /// `(name, None)` removes it. Other fields keep their order and exact text.
    pub fn write_with(&self, changes: &[(&str, Option<&str>)]) -> Vec<u8> {
        let size: usize = self
            .entries
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = Vec::with_capacity(size + 64);
        out.push(b'{');
        let mut first = true;
        let mut push = |out: &mut Vec<u8>, key: &str, value: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            out.extend_from_slice(serde_json::Value::from(key).to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        };
        let mut applied = vec![false; changes.len()];
        for (key, value) in &self.entries {
            match changes.iter().position(|(name, _)| folds_to(key, name)) {
                Some(i) => {
                    applied[i] = true;
                    if let Some(v) = changes[i].1 {
                        push(&mut out, changes[i].0, v);
                    }
                }
                None => push(&mut out, key, value.get()),
            }
        }
        for (i, (name, value)) in changes.iter().enumerate() {
            if let (false, Some(v)) = (applied[i], value) {
                push(&mut out, name, v);
            }
        }
        out.push(b'}');
        out
    }
}

/// Go's `bytes.EqualFold` for the ASCII field names corral reads: ASCII case plus the two
/// non-ASCII letters that fold onto ASCII ones (KELVIN SIGN → k, LONG S → s).
fn fold_char(c: char) -> char {
    match c {
        '\u{212A}' => 'k',
        '\u{017F}' => 's',
        c => c.to_ascii_lowercase(),
    }
}

fn fold(key: &str) -> String {
    key.chars().map(fold_char).collect()
}

fn folds_to(key: &str, name: &str) -> bool {
    key.chars().map(fold_char).eq(name.chars())
}

struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Entries<'de>, M::Error> {
                let mut entries = Vec::new();
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    if entries.len() == MAX_FIELDS {
                        return Err(de::Error::custom(TOO_MANY_FIELDS));
                    }
                    let v: &'de RawValue = map.next_value()?;
                    entries.push((k, v));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<JsonObject<'_>, BodyError> {
        JsonObject::parse(s.as_bytes())
    }

    #[test]
    fn reads_fields_like_go_does() {
        let o = parse(r#"{"MODEL":"llama3.2","Stream":false}"#).unwrap();
        assert_eq!(o.string("model").unwrap().as_deref(), Some("llama3.2"));
        assert_eq!(o.bool("stream").unwrap(), Some(false));
        // KELVIN SIGN and LONG S fold onto k and s in Go.
        let o = parse("{\"\u{212A}eep_alive\":0,\"\u{017F}tream\":true}").unwrap();
        assert_eq!(o.get("keep_alive").unwrap().get(), "0");
        assert_eq!(o.bool("stream").unwrap(), Some(true));
        // Escapes in keys are decoded before matching.
        let o = parse(r#"{"mod\u0065l":"x"}"#).unwrap();
        assert_eq!(o.string("model").unwrap().as_deref(), Some("x"));
    }

    #[test]
    fn refuses_keys_that_go_would_merge() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"model":"allowed","Model":"secret"}"#,
            r#"{"model":"allowed","MODEL":"secret"}"#,
            "{\"stream\":false,\"\u{017F}tream\":true}",
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.0.contains("more than once"), "{body}: {e}");
        }
    }

    #[test]
    fn a_body_of_countless_fields_is_refused_cheaply() {
        let fields = |n: usize| {
            let body: Vec<String> = (0..n).map(|i| format!("\"f{i}\":0")).collect();
            format!("{{{}}}", body.join(","))
        };
        assert!(parse(&fields(MAX_FIELDS)).is_ok());
        // A megabyte of fields: refused at the cap, not compared pairwise.
        let e = parse(&fields(100_000)).unwrap_err();
        assert_eq!(e.0, TOO_MANY_FIELDS);
    }

    #[test]
    fn refuses_what_is_not_one_json_object() {
        assert_eq!(parse("").unwrap_err().0, "missing request body");
        assert_eq!(parse("  \n").unwrap_err().0, "missing request body");
        assert!(parse("[1,2]")
            .unwrap_err()
            .0
            .contains("must be a JSON object"));
        assert!(parse("\"x\"")
            .unwrap_err()
            .0
            .contains("must be a JSON object"));
        assert!(parse("{\"model\":")
            .unwrap_err()
            .0
            .contains("not valid JSON"));
        assert!(parse(r#"{"model":"a"} {"model":"b"}"#)
            .unwrap_err()
            .0
            .contains("not valid JSON"));
        assert!(parse(r#"{"model":NaN}"#).is_err());
        assert!(
            JsonObject::parse(b"{\"model\":\"\xff\"}").is_err(),
            "invalid UTF-8"
        );
    }

    #[test]
    fn typed_getters_refuse_wrong_types() {
        let o = parse(r#"{"model":7,"stream":"yes","x":null}"#).unwrap();
        assert_eq!(
            o.string("model").unwrap_err().0,
            "\"model\" must be a string"
        );
        assert_eq!(
            o.bool("stream").unwrap_err().0,
            "\"stream\" must be true or false"
        );
        let o = parse(r#"{"model":null,"stream":null}"#).unwrap();
        assert_eq!(o.string("model").unwrap(), None);
        assert_eq!(o.bool("stream").unwrap(), None);
        assert_eq!(o.string("absent").unwrap(), None);
    }

    #[test]
    fn nested_objects_use_the_same_rules() {
        let o = parse(r#"{"stream_options":{"Include_Usage":true}}"#).unwrap();
        let so = o.object("stream_options").unwrap().unwrap();
        assert_eq!(so.bool("include_usage").unwrap(), Some(true));
        let o = parse(r#"{"stream_options":[1]}"#).unwrap();
        assert!(o.object("stream_options").is_err());
        let o = parse(r#"{"stream_options":null}"#).unwrap();
        assert!(
            o.object("stream_options").unwrap().is_none(),
            "null is no object"
        );
        assert!(o.object("absent").unwrap().is_none());
    }

    #[test]
    fn errors_read_as_their_message() {
        let e = parse("[]").unwrap_err();
        assert_eq!(e.to_string(), e.0);
        assert_eq!(e.to_string(), "the request body must be a JSON object");
    }

    #[test]
    fn rewrites_keep_everything_else_byte_for_byte() {
        let body =
            r#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}],"Keep_Alive":0}"#;
        let o = parse(body).unwrap();
        let out = o.write_with(&[
            ("keep_alive", Some("-1")),
            ("stream_options", Some(r#"{"include_usage":true}"#)),
        ]);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            r#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}],"keep_alive":-1,"stream_options":{"include_usage":true}}"#
        );
        let out = o.write_with(&[("keep_alive", None)]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}]}"#
        );
        // The smallest fields, and none at all.
        let tiny = parse(r#"{"a":1}"#).unwrap();
        assert_eq!(tiny.write_with(&[("b", Some("2"))]), br#"{"a":1,"b":2}"#);
        assert_eq!(parse("{}").unwrap().write_with(&[]), b"{}");
    }
}
