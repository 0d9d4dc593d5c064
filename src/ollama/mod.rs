//! Facts of Ollama's protocol that corral and the Ollama double both rely on: how model names are
//! normalized, which names are cloud models, how `keep_alive` values are read.
//! (See `docs/ollama-protocol.md`.)

pub mod json;

use std::time::Duration;

const DEFAULT_HOST: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
const LOCAL_SUFFIX: &str = ":local";

/// A model name normalized as Ollama displays it: `llama3.2` → `llama3.2:latest`,
/// `library/llama3.2` → `llama3.2:latest`, `hf.co/user/model:Q4` unchanged.
/// Ollama compares names case-insensitively; [`ModelName::key`] is the form to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelName {
    display: String,
}

impl ModelName {
    /// Parses `[host/][namespace/]model[:tag]` (a `@digest` suffix is dropped). `None` for names
    /// Ollama refuses as invalid.
    pub(crate) fn parse(name: &str) -> Option<ModelName> {
        let name = name.split_once('@').map_or(name, |(n, _)| n);
        // `:local` (any case) only forces a local model: `llama3.2:local` is `llama3.2:latest`,
        // `llama3.2:3b:local` is `llama3.2:3b` (Ollama's modelref).
        let name = match name.len().checked_sub(LOCAL_SUFFIX.len()) {
            Some(at)
                if at > 0
                    && name.is_char_boundary(at)
                    && name[at..].eq_ignore_ascii_case(LOCAL_SUFFIX) =>
            {
                &name[..at]
            }
            _ => name,
        };
        if name.is_empty() || name.len() > 350 {
            return None;
        }
        let (path, tag) = match name.rsplit_once(':') {
            // A ':' inside the host part (`host:port/ns/model`) is not a tag separator.
            Some((p, t)) if !t.contains('/') => (p, t),
            _ => (name, DEFAULT_TAG),
        };
        let mut parts = path.split('/');
        let (host, namespace, model) = match (parts.next(), parts.next(), parts.next()) {
            (Some(m), None, _) => (DEFAULT_HOST, DEFAULT_NAMESPACE, m),
            (Some(ns), Some(m), None) => (DEFAULT_HOST, ns, m),
            (Some(h), Some(ns), Some(m)) if parts.next().is_none() => (h, ns, m),
            _ => return None,
        };
        let part_ok = |s: &str, max: usize, extra: &[u8]| {
            !s.is_empty()
                && s.len() <= max
                && s.as_bytes()[0].is_ascii_alphanumeric()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
        };
        let tag_ok = !tag.is_empty()
            && tag.len() <= 80
            && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.as_bytes()[0] == b'_')
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !(part_ok(host, 350, b"_.:-")
            && part_ok(namespace, 80, b"_-")
            && part_ok(model, 80, b"_.-")
            && tag_ok)
        {
            return None;
        }
        // Built in one allocation (`format!` grows its string piece by piece).
        let shown: &[&str] = if host.eq_ignore_ascii_case(DEFAULT_HOST) {
            if namespace.eq_ignore_ascii_case(DEFAULT_NAMESPACE) {
                &[model, ":", tag]
            } else {
                &[namespace, "/", model, ":", tag]
            }
        } else {
            &[host, "/", namespace, "/", model, ":", tag]
        };
        Some(ModelName {
            display: shown.concat(),
        })
    }

    /// The name as Ollama shows it in `/api/tags` (`llama3.2:latest`).
    pub(crate) fn as_str(&self) -> &str {
        &self.display
    }

    /// The comparison key (Ollama matches names case-insensitively).
    pub(crate) fn key(&self) -> String {
        self.display.to_ascii_lowercase()
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Whether Ollama would forward requests for this model to ollama.com (`*:cloud`, `*-cloud`;
/// suffixes matched case-insensitively).
pub(crate) fn is_cloud_model(name: &str) -> bool {
    let ends_with = |s: &str, suffix: &str| {
        s.len() >= suffix.len()
            && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    let tag = name.rsplit_once(':').map(|(_, t)| t);
    tag.is_some_and(|t| t.eq_ignore_ascii_case("cloud")) || ends_with(name, "-cloud")
}

/// A `keep_alive` value as Ollama reads it. The request path reads it from JSON
/// (`KeepAlive::from_json`); `preload.keep_alive` in the config file is read by the same rules
/// (its `Deserialize`), so both accept exactly what Ollama accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Keep loaded forever (negative values).
    Forever,
    /// Keep loaded this long after the last request (0 = unload when idle).
    For(Duration),
}

/// Why a `keep_alive` string is not a duration to Ollama.
enum TextError {
    /// A number in a string (`"-1"`, `"300"`): Go's `time.ParseDuration` needs a unit.
    MissingUnit,
    Invalid,
}

impl KeepAlive {
    /// A number of seconds: negative is forever, fractions are allowed.
    fn from_secs(secs: f64) -> KeepAlive {
        if secs < 0.0 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(Duration::from_secs_f64(secs.min(1e12)))
        }
    }

    /// A Go duration string with a unit (`"5m"`, `"1h30m"`); `"0"` is the one unitless value Go
    /// accepts; a negative duration is forever.
    fn from_text(s: &str) -> Result<KeepAlive, TextError> {
        let (negative, unsigned) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        if unsigned.parse::<f64>().is_ok() && unsigned != "0" {
            return Err(TextError::MissingUnit);
        }
        let d = if unsigned == "0" {
            Duration::ZERO
        } else {
            humantime::parse_duration(unsigned).map_err(|_| TextError::Invalid)?
        };
        Ok(if negative && !d.is_zero() {
            KeepAlive::Forever
        } else {
            KeepAlive::For(d)
        })
    }

    /// Reads a JSON `keep_alive`: a number of seconds (negative = forever), or a Go duration
    /// string with a unit. `Ok(None)` when absent or `null`. The error is Ollama's message.
    pub(crate) fn from_json(
        value: Option<&serde_json::Value>,
    ) -> Result<Option<KeepAlive>, String> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => {
                Ok(Some(KeepAlive::from_secs(n.as_f64().unwrap_or(0.0))))
            }
            Some(serde_json::Value::String(s)) => match KeepAlive::from_text(s) {
                Ok(k) => Ok(Some(k)),
                Err(TextError::MissingUnit) => {
                    Err(format!("time: missing unit in duration \"{s}\""))
                }
                Err(TextError::Invalid) => Err(format!("time: invalid duration \"{s}\"")),
            },
            Some(other) => {
                let ty = match other {
                    serde_json::Value::Bool(_) => "bool",
                    serde_json::Value::Array(_) => "array",
                    _ => "object",
                };
                Err(format!("Unsupported type: '{ty}'"))
            }
        }
    }

    /// The JSON value corral sends to Ollama: `-1` for forever, else the number of seconds
    /// (a whole number when it is one).
    pub(crate) fn to_json(self) -> serde_json::Value {
        match self {
            KeepAlive::Forever => (-1).into(),
            KeepAlive::For(d) if d.subsec_nanos() == 0 => d.as_secs().into(),
            KeepAlive::For(d) => d.as_secs_f64().into(),
        }
    }
}

impl serde::Serialize for KeepAlive {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// The config file's `keep_alive`: what Ollama accepts in a request (a number of seconds, negative
/// = forever, or a duration string with a unit), with a hint where Ollama only has its error.
impl<'de> serde::Deserialize<'de> for KeepAlive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = KeepAlive;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a number of seconds (negative = forever) or a duration such as \"24h\"",
                )
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<KeepAlive, E> {
                Ok(KeepAlive::from_secs(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<KeepAlive, E> {
                Ok(KeepAlive::from_secs(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<KeepAlive, E> {
                if v.is_finite() {
                    Ok(KeepAlive::from_secs(v))
                } else {
                    Err(E::custom("must be a finite number of seconds"))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeepAlive, E> {
                KeepAlive::from_text(v).map_err(|e| match e {
                    TextError::MissingUnit => E::custom(format!(
                        "\"{v}\" has no unit and Ollama rejects it; write a number ({v}) or \"{v}s\""
                    )),
                    TextError::Invalid => E::custom(format!(
                        "\"{v}\" is not a duration; write a number of seconds (negative = forever) or e.g. \"24h\""
                    )),
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn norm(s: &str) -> Option<String> {
        ModelName::parse(s).map(|n| n.to_string())
    }

    #[test]
    fn names_normalize_like_ollama() {
        assert_eq!(norm("llama3.2").as_deref(), Some("llama3.2:latest"));
        assert_eq!(norm("llama3.2:3b").as_deref(), Some("llama3.2:3b"));
        assert_eq!(norm("library/llama3.2").as_deref(), Some("llama3.2:latest"));
        assert_eq!(
            norm("registry.ollama.ai/library/llama3.2:latest").as_deref(),
            Some("llama3.2:latest")
        );
        assert_eq!(
            norm("myorg/mistral").as_deref(),
            Some("myorg/mistral:latest")
        );
        assert_eq!(
            norm("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M").as_deref(),
            Some("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M")
        );
        assert_eq!(
            norm("localhost:5000/ns/m").as_deref(),
            Some("localhost:5000/ns/m:latest")
        );
        assert_eq!(
            norm("nomic-embed-text@sha256:abc").as_deref(),
            Some("nomic-embed-text:latest")
        );
        assert_eq!(
            ModelName::parse("Llama3.2").unwrap().key(),
            "llama3.2:latest"
        );
        // `:local` only forces a local model: the same model.
        assert_eq!(norm("llama3.2:local").as_deref(), Some("llama3.2:latest"));
        assert_eq!(norm("llama3.2:3b:LOCAL").as_deref(), Some("llama3.2:3b"));
        assert_eq!(norm("myorg/m:local").as_deref(), Some("myorg/m:latest"));
        assert_eq!(norm("local").as_deref(), Some("local:latest"));
        assert_eq!(norm(":local"), None);
    }

    #[test]
    fn invalid_names_are_refused() {
        for bad in [
            "", ":latest", "a/b/c/d", "../etc", "llama 3", "m:", "m:t/x", "-m", "a//b", "m:tag!",
        ] {
            assert_eq!(norm(bad), None, "{bad}");
        }
    }

    #[test]
    fn cloud_models_are_recognised() {
        for cloud in [
            "gpt-oss:120b-cloud",
            "deepseek-v3.1:671b-cloud",
            "qwen3-coder:cloud",
            "glm-4.6:CLOUD",
            "kimi-cloud",
            "Kimi-CLOUD",
        ] {
            assert!(is_cloud_model(cloud), "{cloud}");
        }
        for local in [
            "llama3.2",
            "llama3.2:latest",
            "cloudy:7b",
            "my-cloud-tools:latest",
        ] {
            assert!(!is_cloud_model(local), "{local}");
        }
    }

    #[test]
    fn keep_alive_reads_like_ollama() {
        let ka = |v: serde_json::Value| KeepAlive::from_json(Some(&v));
        assert_eq!(ka(json!(-1)).unwrap(), Some(KeepAlive::Forever));
        assert_eq!(ka(json!(0)).unwrap(), Some(KeepAlive::For(Duration::ZERO)));
        assert_eq!(
            ka(json!(0.5)).unwrap(),
            Some(KeepAlive::For(Duration::from_millis(500)))
        );
        assert_eq!(
            ka(json!("5m")).unwrap(),
            Some(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(ka(json!("-1m")).unwrap(), Some(KeepAlive::Forever));
        assert_eq!(
            ka(json!("0")).unwrap(),
            Some(KeepAlive::For(Duration::ZERO))
        );
        assert_eq!(
            ka(json!("-1")).unwrap_err(),
            "time: missing unit in duration \"-1\""
        );
        assert_eq!(ka(json!(true)).unwrap_err(), "Unsupported type: 'bool'");
        assert_eq!(KeepAlive::from_json(None).unwrap(), None);
        assert_eq!(ka(json!(null)).unwrap(), None);
    }

    #[test]
    fn the_config_file_reads_keep_alive_by_the_same_rules() {
        for v in [
            json!(-1),
            json!(-0.5),
            json!(0),
            json!(0.5),
            json!(300),
            json!("5m"),
            json!("1h30m"),
            json!("-1m"),
            json!("0"),
            json!("-1"),
            json!("300"),
            json!("soon"),
            json!(true),
            json!([1]),
        ] {
            let request = KeepAlive::from_json(Some(&v));
            let config = serde_json::from_value::<KeepAlive>(v.clone());
            assert_eq!(request.is_ok(), config.is_ok(), "{v}");
            if let (Ok(Some(r)), Ok(c)) = (request, config) {
                assert_eq!(r, c, "{v}");
                // What corral sends reads back as the same value.
                assert_eq!(KeepAlive::from_json(Some(&c.to_json())).unwrap(), Some(c));
            }
        }
    }
}
