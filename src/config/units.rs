//! Human-readable durations ("30s", "15m", "1h30m") and byte sizes ("32MiB") for the config file.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration written as `humantime` text (`"500ms"`, `"30s"`, `"15m"`, `"1h30m"`) or as a bare
/// number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(secs: u64) -> Self {
        HumanDuration(Duration::from_secs(secs))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<u64>() {
            return Ok(HumanDuration(Duration::from_secs(secs)));
        }
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| {
                format!("`{s}` is not a duration ({e}); write e.g. \"30s\", \"15m\" or \"1h\"")
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrNumber::<HumanDuration>::new(
            "a duration such as \"30s\"",
        ))
    }
}

/// A size in bytes written as `"32MiB"`, `"512KiB"`, `"1GB"` or a bare number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }
}

const UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1_000),
    ("kib", 1 << 10),
    ("mb", 1_000_000),
    ("mib", 1 << 20),
    ("gb", 1_000_000_000),
    ("gib", 1 << 30),
];

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let bad = || {
            format!("`{s}` is not a size; write e.g. \"32MiB\", \"512KiB\" or a number of bytes")
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_lowercase();
        let mult = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, m)| *m)
                .ok_or_else(bad)?
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= mult && self.0 % mult == 0 {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextOrNumber::<ByteSize>::new("a size such as \"32MiB\""))
    }
}

/// Accepts a string parsed with `FromStr`, or a non-negative integer read as its decimal text
/// (seconds for durations, bytes for sizes).
struct TextOrNumber<T> {
    expecting: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<T> TextOrNumber<T> {
    fn new(expecting: &'static str) -> Self {
        TextOrNumber {
            expecting,
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: std::str::FromStr<Err = String>> de::Visitor<'_> for TextOrNumber<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        v.to_string().parse().map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom(format!("{v} is negative; {}", self.expecting)));
        }
        self.visit_u64(v as u64)
    }
}

/// A list written as a TOML array or as one comma-separated string: environment overrides
/// (`CORRAL__TEAMS__RESEARCH__MODELS="llama3.2:*,nomic-embed-text"`) can only give strings.
pub(crate) fn comma_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + From<String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText<T> {
        List(Vec<T>),
        Text(String),
    }
    match ListOrText::<T>::deserialize(d).map_err(|_| {
        de::Error::custom("expected a list of strings or one comma-separated string")
    })? {
        ListOrText::List(items) => Ok(items),
        ListOrText::Text(text) => Ok(text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| T::from(item.to_string()))
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_humans_write_them() {
        assert_eq!(
            "30s".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(30)
        );
        assert_eq!(
            "15m".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(900)
        );
        assert_eq!(
            "1h30m".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(5400)
        );
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "45".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(45)
        );
        assert!("soon"
            .parse::<HumanDuration>()
            .unwrap_err()
            .contains("\"30s\""));
        assert!("-5s".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!("32MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(32));
        assert_eq!("32 mib".parse::<ByteSize>().unwrap(), ByteSize::mib(32));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("32 megabytes".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize::mib(32).to_string(), "32MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn numbers_in_toml_are_seconds_and_bytes() {
        #[derive(Deserialize)]
        struct T {
            d: HumanDuration,
            s: ByteSize,
        }
        let t: T = serde_json::from_str(r#"{"d": 90, "s": 2048}"#).unwrap();
        assert_eq!(t.d, HumanDuration::secs(90));
        assert_eq!(t.s, ByteSize(2048));
        assert!(serde_json::from_str::<T>(r#"{"d": -1, "s": 1}"#).is_err());
    }
}
