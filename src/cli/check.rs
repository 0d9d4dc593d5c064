//! `corral check`: validates everything `corral serve` would load, and asks Ollama whether it
//! answers, printing each finding with the file and key at fault.

use crate::config::{Config, Source};
use crate::upstream::client::UpstreamClient;
use crate::upstream::node::Node;
use crate::upstream::pool::discovered_node;
use crate::upstream::show::{show, Shown};
use crate::upstream::Pool;
use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// One line of the report.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Finding {
    Ok(String),
    Warning(String),
    Error(String),
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Ok(m) => write!(f, "ok       {m}"),
            Finding::Warning(m) => write!(f, "warning  {m}"),
            Finding::Error(m) => write!(f, "error    {m}"),
        }
    }
}

/// Runs every check. `upstream`: also ask Ollama.
pub(crate) fn run(source: &Source, upstream: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let cfg = match Config::load(source) {
        Ok(cfg) => {
            out.push(Finding::Ok(format!(
                "configuration {} is valid",
                source.describe()
            )));
            cfg
        }
        Err(e) => {
            out.extend(e.to_string().lines().map(|l| Finding::Error(l.to_string())));
            return out;
        }
    };
    if source == &Source::BuiltIn {
        out.push(Finding::Warning(format!(
            "no configuration file (looked at --config, $CORRAL_CONFIG and ./{}); built-in defaults apply",
            crate::config::DEFAULT_CONFIG_PATH
        )));
    }
    match crate::runtime::server::prepare(source.clone(), cfg.clone()) {
        Ok(p) => {
            if p.certs.is_some() && cfg.server.tls_cert.as_os_str().is_empty() {
                out.push(Finding::Warning(
                    "server.tls_cert is empty: a throwaway self-signed certificate will be used (loopback only)".into(),
                ));
            } else if p.certs.is_some() {
                out.push(Finding::Ok(format!(
                    "TLS certificate {} and key load and match",
                    cfg.server.tls_cert.display()
                )));
            }
        }
        Err(e) => out.extend(e.0.into_iter().map(Finding::Error)),
    }
    if upstream {
        out.extend(check_upstream(&cfg));
        out.extend(check_store(&cfg));
        out.extend(check_identity_providers(&cfg));
    }
    out
}

/// Fetches each identity provider's keys (`[auth.oidc.*]`) as the gateway will.
fn check_identity_providers(cfg: &Config) -> Vec<Finding> {
    if cfg.auth.oidc.is_empty() {
        return vec![];
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return vec![Finding::Error(format!("cannot start a runtime: {e}"))],
    };
    let mut out = Vec::new();
    for (name, o) in &cfg.auth.oidc {
        let found = crate::access::oidc::Provider::new(name, o, &crate::runtime::oidc::make_fetch)
            .map(|p| runtime.block_on(p.keys.check()));
        out.push(match found {
            Ok(Ok(n)) => Finding::Ok(format!(
                "auth.oidc.{name}: {} publishes {n} signing key(s) corral can use",
                o.issuer
            )),
            Ok(Err(e)) | Err(e) => Finding::Error(format!(
                "auth.oidc.{name}: {e} (its tokens get 503 until its keys load; corral keys are not affected)"
            )),
        });
    }
    out
}

/// Asks the shared state store (`[state]`) whether it answers.
fn check_store(cfg: &Config) -> Vec<Finding> {
    let url = match crate::runtime::server::state_store_url(&cfg.state) {
        Ok(Some(url)) => url,
        Ok(None) => return vec![],
        Err(e) => return vec![Finding::Error(e)],
    };
    let shown = crate::config::redact_store_url(&url);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return vec![Finding::Error(format!("cannot start a runtime: {e}"))],
    };
    let connected = runtime.block_on(crate::state::redis::RedisStore::connect(
        &url,
        &cfg.state.key_prefix,
        Duration::from_secs(3),
    ));
    vec![match connected {
        Ok(_) => Finding::Ok(format!("state store {shown} answers")),
        Err(e) => Finding::Error(format!(
            "state store {shown}: {e} (replicas fall back to state.on_store_error = {:?} while it is down)",
            cfg.state.on_store_error
        )),
    }]
}

/// Asks every node: the one `upstream.url`, each of `upstream.nodes`, or every address
/// `upstream.discover.dns` resolves to.
fn check_upstream(cfg: &Config) -> Vec<Finding> {
    let up = &cfg.upstream;
    let nodes: Vec<(String, Arc<Node>)> = match &up.discover {
        Some(d) => {
            let Some((host, port)) = d.host_port() else {
                return vec![];
            };
            let addrs: BTreeSet<SocketAddr> = match (host, port).to_socket_addrs() {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    return vec![Finding::Error(format!(
                        "upstream.discover.dns = \"{}\": cannot resolve it ({e})",
                        d.dns
                    ))]
                }
            };
            addrs
                .into_iter()
                .filter_map(|a| {
                    let node = discovered_node(a, d.parallel, up)?;
                    Some((format!("upstream.discover.dns ({})", node.name), node))
                })
                .collect()
        }
        None => Pool::new(up)
            .nodes()
            .iter()
            .enumerate()
            .map(|(i, n)| match up.nodes.is_empty() {
                true => ("upstream.url".to_string(), n.clone()),
                false => (format!("upstream.nodes[{i}] ({})", n.name), n.clone()),
            })
            .collect(),
    };
    let pool = nodes.len() > 1 || up.discover.is_some();
    let placed = nodes.iter().any(|(_, n)| !n.placement.is_empty());
    let mut out = Vec::new();
    for (key, node) in &nodes {
        let client = UpstreamClient::new(node.upstream.clone());
        let here = Here {
            node_key: key,
            pool,
            placement: placed.then_some(&node.placement),
        };
        out.extend(check_node(cfg, &client, &here));
    }
    out
}

/// Which node is checked, and what it is meant to hold.
struct Here<'a> {
    node_key: &'a str,
    /// In a pool, a node may lack a pinned model other nodes hold.
    pool: bool,
    /// The pinned models placed on it, when the pool has a placement.
    placement: Option<&'a std::collections::HashSet<String>>,
}

fn check_node(cfg: &Config, client: &UpstreamClient, here: &Here) -> Vec<Finding> {
    let node_key = here.node_key;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return vec![Finding::Error(format!("cannot start a runtime: {e}"))],
    };
    let url = format!("{node_key} = \"{}\"", client.url());
    let timeout = Duration::from_secs(10);
    let answer = runtime.block_on(client.request("GET", "/api/version", None, timeout));
    let first = match answer {
        Ok(a) if a.status == 200 => {
            let version = a
                .json()
                .and_then(|v| v["version"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".into());
            Finding::Ok(format!("{url}: Ollama {version} answers"))
        }
        Ok(a) if a.status == 403 => {
            return vec![Finding::Error(format!(
                "{url}: answered 403; Ollama refuses this Host or Origin (is this really Ollama?)"
            ))]
        }
        Ok(a) => {
            return vec![Finding::Error(format!(
                "{url}: answered {} to GET /api/version; is this Ollama?",
                a.status
            ))]
        }
        Err(e) => {
            return vec![Finding::Error(format!(
                "{url}: {e} (is Ollama running? `--skip-upstream` skips this check)"
            ))]
        }
    };
    let mut out = vec![first];
    // Every pinned model must exist, and be loadable.
    let prefix = if here.pool {
        format!("{node_key}: ")
    } else {
        String::new()
    };
    for (i, model) in cfg.preload.models.iter().enumerate() {
        let placed = here.placement.is_none_or(|p| {
            crate::ollama::ModelName::parse(model).is_some_and(|m| p.contains(&m.key()))
        });
        if !placed {
            continue;
        }
        let key = format!("{prefix}preload.models[{i}] = \"{model}\"");
        out.push(match runtime.block_on(show(client, model)) {
            Ok(Shown::Loadable(_)) => Finding::Ok(format!("{key}: Ollama has it")),
            Ok(Shown::Missing) if here.pool && here.placement.is_none() => Finding::Warning(format!(
                "{key}: this node does not have it; other nodes of the pool may hold it"
            )),
            Ok(Shown::Missing) if cfg.preload.pull_missing => Finding::Warning(format!(
                "{key}: Ollama does not have it yet; corral will pull it (preload.pull_missing)"
            )),
            Ok(Shown::Missing) => Finding::Error(format!(
                "{key}: Ollama does not have it; pull it first (ollama pull {model}), or set preload.pull_missing"
            )),
            Ok(Shown::NotLoadable(why)) => {
                Finding::Error(format!("{key}: {why}, so it cannot be preloaded"))
            }
            Ok(Shown::Refused(why)) => Finding::Error(format!("{key}: {why}")),
            Err(e) => Finding::Error(format!("{key}: {e}")),
        });
    }
    out
}
