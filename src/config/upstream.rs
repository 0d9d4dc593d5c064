//! `[upstream]`: where Ollama is (one `url`, or a pool of `nodes`; each [`UpstreamUrl`] checked
//! as it is read) and the timeouts.

use super::units::HumanDuration;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of Ollama: `http://host:port` (no path). Unset: `http://127.0.0.1:11434`, unless
    /// `nodes` are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<UpstreamUrl>,
    /// Requests that one Ollama runs at once (its `OLLAMA_NUM_PARALLEL`): excess requests wait
    /// in corral, fairly between teams (`[scheduler]`). Unset: no slot limit. A pool sets it
    /// per node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// A pool of Ollama servers, instead of `url`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeConfig>,
    /// A pool found in DNS, instead of `url` or `nodes`: every address the name resolves to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discover: Option<DiscoverConfig>,
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
            url: None,
            parallel: None,
            nodes: Vec::new(),
            discover: None,
            connect_timeout: HumanDuration::secs(3),
            read_timeout: HumanDuration::secs(15 * 60),
            request_timeout: HumanDuration::secs(60 * 60),
        }
    }
}

/// One Ollama server of a pool (`[[upstream.nodes]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `[a-z0-9-]+`, unique: the `node` label in metrics and the access log, and what
    /// `x-corral-node` names.
    pub name: String,
    pub url: UpstreamUrl,
    /// Requests the node runs at once (its `OLLAMA_NUM_PARALLEL`); unset: no slot limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// Placement: the pinned models this node should hold (empty: no placement).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

/// `[upstream.discover]`: the nodes are the addresses a DNS name resolves to (a Kubernetes
/// headless Service), resolved again every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscoverConfig {
    /// `host:port`, e.g. `ollama-headless.llm.svc.cluster.local:11434`.
    pub dns: String,
    /// Every node's `parallel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
}

impl DiscoverConfig {
    /// The host and port of `dns`.
    pub(crate) fn host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.dns.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
        host_ok.then_some((host, port))
    }
}

/// The name of the one node `upstream.url` makes.
pub(crate) const SINGLE_NODE: &str = "default";

impl UpstreamConfig {
    /// The single upstream: `url`, or Ollama's default address.
    pub fn url(&self) -> UpstreamUrl {
        self.url.clone().unwrap_or_else(|| UpstreamUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port: 11434,
        })
    }

    /// The nodes corral starts with: the listed `nodes`, or one (named `default`) at `url`;
    /// none with `discover` (they are found in DNS).
    pub(crate) fn node_list(&self) -> Vec<NodeConfig> {
        if self.discover.is_some() {
            Vec::new()
        } else if self.nodes.is_empty() {
            vec![NodeConfig {
                name: SINGLE_NODE.into(),
                url: self.url(),
                parallel: self.parallel,
                models: Vec::new(),
            }]
        } else {
            self.nodes.clone()
        }
    }

    /// Placement names pinned models only: a node's `models` that `preload.models` lacks is a
    /// mistake (a typo would otherwise silently place nothing).
    pub(super) fn check_placement(&self, pinned: &[String], problems: &mut Vec<Problem>) {
        let key = |m: &str| crate::ollama::ModelName::parse(m).map(|n| n.key());
        let pinned: std::collections::HashSet<String> =
            pinned.iter().filter_map(|m| key(m)).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            for (j, m) in node.models.iter().enumerate() {
                if key(m).is_some_and(|k| !pinned.contains(&k)) {
                    problems.push(Problem::new(
                        format!("upstream.nodes[{i}].models[{j}]"),
                        format!(
                            "`{m}` is not in preload.models; a node's models place pinned models"
                        ),
                    ));
                }
            }
        }
    }

    /// Every problem with `[upstream]` (the URLs were checked when they were read).
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        if self.url.is_some() && !self.nodes.is_empty() {
            problems.push(Problem::new(
                "upstream.url",
                "set either upstream.url (one Ollama) or upstream.nodes (a pool), not both",
            ));
        }
        if self.parallel == Some(0) {
            problems.push(Problem::new(
                "upstream.parallel",
                "must be at least 1 (leave it out for no slot limit)",
            ));
        }
        if self.parallel.is_some() && (!self.nodes.is_empty() || self.discover.is_some()) {
            problems.push(Problem::new(
                "upstream.parallel",
                "is for one Ollama at upstream.url; in a pool set parallel per node (upstream.nodes[].parallel or upstream.discover.parallel)",
            ));
        }
        if let Some(d) = &self.discover {
            if self.url.is_some() {
                problems.push(Problem::new(
                    "upstream.url",
                    "set either upstream.url (one Ollama) or upstream.discover (a pool found in DNS), not both",
                ));
            }
            if !self.nodes.is_empty() {
                problems.push(Problem::new(
                    "upstream.nodes",
                    "set either upstream.nodes (listed) or upstream.discover (found in DNS), not both",
                ));
            }
            if d.host_port().is_none() {
                problems.push(Problem::new(
                    "upstream.discover.dns",
                    format!(
                        "`{}` must be host:port, e.g. \"ollama-headless.llm.svc.cluster.local:11434\"",
                        d.dns
                    ),
                ));
            }
            if d.parallel == Some(0) {
                problems.push(Problem::new(
                    "upstream.discover.parallel",
                    "must be at least 1 (leave it out for no slot limit)",
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let key = |field: &str| format!("upstream.nodes[{i}].{field}");
            let n = &node.name;
            if n.is_empty()
                || n.len() > 63
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                problems.push(Problem::new(
                    key("name"),
                    format!("`{n}` must be 1 to 63 of a-z, 0-9 and -, e.g. \"gpu-a\""),
                ));
            } else if !seen.insert(n.as_str()) {
                problems.push(Problem::new(
                    key("name"),
                    format!("`{n}` names another node too; node names must be unique"),
                ));
            }
            if node.parallel == Some(0) {
                problems.push(Problem::new(
                    key("parallel"),
                    "must be at least 1 (leave it out for no slot limit)",
                ));
            }
            for (j, m) in node.models.iter().enumerate() {
                if crate::ollama::ModelName::parse(m).is_none() {
                    problems.push(Problem::new(
                        format!("upstream.nodes[{i}].models[{j}]"),
                        format!("`{m}` is not a model name"),
                    ));
                }
            }
        }
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
            UpstreamConfig::default().url().to_string(),
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

    #[test]
    fn a_pool_of_nodes_is_read_and_checked() {
        let cfg = load_str(
            "[preload]\nmodels = [\"llama3.1:8b\"]\n[[upstream.nodes]]\nname = \"gpu-a\"\nurl = \"http://10.0.0.11:11434\"\nparallel = 4\nmodels = [\"llama3.1:8b\"]\n\
             [[upstream.nodes]]\nname = \"gpu-b\"\nurl = \"http://10.0.0.12:11434\"\n",
        )
        .unwrap();
        let nodes = cfg.upstream.node_list();
        assert_eq!(nodes.len(), 2);
        assert_eq!(
            (nodes[0].name.as_str(), nodes[0].parallel, nodes[1].parallel),
            ("gpu-a", Some(4), None)
        );
        assert_eq!(nodes[1].url.to_string(), "http://10.0.0.12:11434");
        let single = UpstreamConfig::default().node_list();
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].name, SINGLE_NODE);
    }

    #[test]
    fn a_pool_refuses_bad_names_duplicates_zero_slots_and_a_url_beside_it() {
        let node = |name: &str, extra: &str| {
            format!(
                "[[upstream.nodes]]\nname = \"{name}\"\nurl = \"http://10.0.0.1:11434\"\n{extra}"
            )
        };
        let e = load_str(&format!(
            "[upstream]\nurl = \"http://x:1\"\n{}{}{}{}",
            node("GPU_A", ""),
            node("b", "parallel = 0\n"),
            node("b", "models = [\"\"]\n"),
            node("c", "")
        ))
        .unwrap_err();
        assert_eq!(
            keys(&e),
            [
                "upstream.url",
                "upstream.nodes[0].name",
                "upstream.nodes[1].parallel",
                "upstream.nodes[2].name",
                "upstream.nodes[2].models[0]",
            ]
        );
        let text = e.to_string();
        assert!(text.contains("upstream.nodes (a pool), not both"), "{text}");
        assert!(text.contains("must be unique"), "{text}");
        let e = load_str("[[upstream.nodes]]\nname = \"a\"\nurl = \"ftp://x\"\n").unwrap_err();
        assert_eq!(keys(&e), ["upstream.nodes[0].url"]);
        // A placement names pinned models only.
        let e = load_str(&node("a", "models = [\"llama3.1:8b\"]\n")).unwrap_err();
        assert_eq!(keys(&e), ["upstream.nodes[0].models[0]"]);
        assert!(e.to_string().contains("not in preload.models"), "{e}");
    }

    #[test]
    fn a_pool_found_in_dns_is_read_and_checked() {
        let cfg = load_str(
            "[upstream.discover]\ndns = \"ollama-headless.llm.svc.cluster.local:11434\"\nparallel = 4\n",
        )
        .unwrap();
        let d = cfg.upstream.discover.as_ref().unwrap();
        assert_eq!(
            d.host_port(),
            Some(("ollama-headless.llm.svc.cluster.local", 11434))
        );
        assert_eq!(d.parallel, Some(4));
        assert!(cfg.upstream.node_list().is_empty(), "found later, in DNS");
        let e = load_str(
            "[upstream]\nurl = \"http://x:1\"\n[upstream.discover]\ndns = \"ollama\"\nparallel = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(&e),
            [
                "upstream.url",
                "upstream.discover.dns",
                "upstream.discover.parallel"
            ]
        );
        assert!(e
            .to_string()
            .contains("upstream.discover (a pool found in DNS), not both"));
    }

    #[test]
    fn one_ollama_may_have_slots_too() {
        let cfg = load_str("[upstream]\nurl = \"http://10.0.0.5:11434\"\nparallel = 2\n").unwrap();
        let nodes = cfg.upstream.node_list();
        assert_eq!((nodes.len(), nodes[0].parallel), (1, Some(2)));
        let e = load_str("[upstream]\nparallel = 0\n").unwrap_err();
        assert_eq!(keys(&e), ["upstream.parallel"]);
        let e = load_str(
            "[upstream]\nparallel = 2\n[[upstream.nodes]]\nname = \"a\"\nurl = \"http://a:1\"\n",
        )
        .unwrap_err();
        assert_eq!(keys(&e), ["upstream.parallel"], "a pool sets it per node");
    }
}
