//! `[upstream]`: where Ollama is ([`UpstreamUrl`], checked as it is read) and the timeouts.

use super::units::HumanDuration;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of Ollama: `http://host:port` (no path).
    pub url: UpstreamUrl,
    /// Establishing the TCP connection.
    pub(crate) connect_timeout: HumanDuration,
    /// Longest silence between two upstream bytes, including the wait for the first one (a cold
    /// model load).
    pub read_timeout: HumanDuration,
    /// Hard cap on a whole request.
    pub request_timeout: HumanDuration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: UpstreamUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 11434,
            },
            connect_timeout: HumanDuration::secs(3),
            read_timeout: HumanDuration::secs(15 * 60),
            request_timeout: HumanDuration::secs(60 * 60),
        }
    }
}

impl UpstreamConfig {
    /// Every problem with `[upstream]` (the URL was checked when it was read).
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        for (key, d) in [
            ("upstream.connect_timeout", self.connect_timeout),
            ("upstream.read_timeout", self.read_timeout),
            ("upstream.request_timeout", self.request_timeout),
        ] {
            if d.0.is_zero() {
                problems.push(Problem::new(key, "must be more than 0"));
            }
        }
    }
}

/// `http(s)://host[:port]` without path, query or credentials. Read from the config file (or
/// `CORRAL__UPSTREAM__URL`) as a string; a URL that is not one of these is refused there, at the
/// key `upstream.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl UpstreamUrl {
    pub(crate) fn parse(url: &str) -> Result<UpstreamUrl, String> {
        let scheme = || {
            format!("`{url}` must start with http:// or https://, e.g. \"http://127.0.0.1:11434\"")
        };
        let just_host_and_port = || {
            format!("`{url}` must be just scheme, host and port, e.g. \"http://127.0.0.1:11434\"")
        };
        let uri = match url.parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(_) if !has_http_scheme(url) => return Err(scheme()),
            Err(e) => {
                return Err(format!(
                    "`{url}` is not a URL ({e}); write scheme, host and port, e.g. \"http://127.0.0.1:11434\""
                ))
            }
        };
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(scheme()),
        };
        let path_ok = matches!(uri.path(), "" | "/");
        let authority = match uri.authority() {
            Some(a) if path_ok && uri.query().is_none() && !url.contains('#') => a.as_str(),
            _ => return Err(just_host_and_port()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(just_host_and_port());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("`{url}`: bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("`{url}`: bad port")),
            };
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("`{url}`: bad IPv6 address"))?;
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("`{url}`: bad port `{p}`"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(format!("`{url}` needs a host and a port"));
        }
        Ok(UpstreamUrl { tls, host, port })
    }

    /// `host:port` as it goes into the `Host` header (IPv6 in brackets).
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The address, when the host is an IP literal (no DNS needed).
    pub(crate) fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// Whether `url` starts with `http://` or `https://` (any case), so a parse error is about the
/// rest of it.
fn has_http_scheme(url: &str) -> bool {
    ["http://", "https://"].iter().any(|s| {
        url.get(..s.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(s))
    })
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        UpstreamUrl::parse(s)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        UpstreamUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load_str};
    use super::*;

    #[test]
    fn parses_the_urls_operators_write() {
        let u = UpstreamUrl::parse("http://127.0.0.1:11434").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (false, "127.0.0.1", 11434)
        );
        assert_eq!(u.authority(), "127.0.0.1:11434");
        let u = UpstreamUrl::parse("http://ollama:11434/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("ollama", 11434));
        let u = UpstreamUrl::parse("https://gpu.internal").unwrap();
        assert_eq!((u.tls, u.port), (true, 443));
        let u = UpstreamUrl::parse("http://[::1]:11434").unwrap();
        assert_eq!(u.authority(), "[::1]:11434");
    }

    #[test]
    fn refuses_urls_with_paths_credentials_or_other_schemes() {
        for bad in [
            "127.0.0.1:11434",
            "ftp://x",
            "http://",
            "http://host:11434/api",
            "http://user:pw@host:11434",
            "http://host:notaport",
            "http://host:0",
            "http://[::1:11434",
            "http://host:11434?x=1",
            "http://host:11434#top",
            "not a url",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn writes_back_what_it_reads() {
        for url in [
            "http://127.0.0.1:11434",
            "https://gpu.internal:443",
            "http://[::1]:11434",
        ] {
            assert_eq!(UpstreamUrl::parse(url).unwrap().to_string(), url);
        }
        assert_eq!(
            UpstreamConfig::default().url.to_string(),
            "http://127.0.0.1:11434"
        );
    }

    #[test]
    fn a_bad_url_is_refused_at_its_key_with_the_reason() {
        let e = load_str("[upstream]\nurl = \"ftp://x\"\n").unwrap_err();
        assert_eq!(keys(&e), ["upstream.url"]);
        assert!(
            e.to_string()
                .contains("must start with http:// or https://"),
            "{e}"
        );
        let e = load_str("[upstream]\nurl = \"http://ollama:11434/api\"\n").unwrap_err();
        assert_eq!(keys(&e), ["upstream.url"]);
        assert!(e.to_string().contains("just scheme, host and port"), "{e}");
        let e = load_str("[upstream]\nurl = \"not a url\"\n").unwrap_err();
        assert_eq!(keys(&e), ["upstream.url"]);
    }
}
