//! `corral check`: validates everything `corral serve` would load, and asks Ollama whether it
//! answers, printing each finding with the file and key at fault.

use crate::config::{Config, Source};
use crate::upstream::client::UpstreamClient;
use crate::upstream::show::{show, Shown};
use crate::upstream::Pool;
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
    }
    out
}

/// Asks every node (the one `upstream.url`, or each of `upstream.nodes`).
fn check_upstream(cfg: &Config) -> Vec<Finding> {
    let pool = Pool::new(&cfg.upstream);
    let mut out = Vec::new();
    for (i, node) in pool.nodes().iter().enumerate() {
        let (key, models_prefix) = if cfg.upstream.nodes.is_empty() {
            ("upstream.url".to_string(), String::new())
        } else {
            let key = format!("upstream.nodes[{i}] ({})", node.name);
            (key.clone(), format!("{key}: "))
        };
        let client = UpstreamClient::new(node.upstream.clone());
        out.extend(check_node(cfg, &client, &key, &models_prefix));
    }
    out
}

fn check_node(
    cfg: &Config,
    client: &UpstreamClient,
    node_key: &str,
    models_prefix: &str,
) -> Vec<Finding> {
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
    for (i, model) in cfg.preload.models.iter().enumerate() {
        let key = format!("{models_prefix}preload.models[{i}] = \"{model}\"");
        out.push(match runtime.block_on(show(client, model)) {
            Ok(Shown::Loadable(_)) => Finding::Ok(format!("{key}: Ollama has it")),
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
