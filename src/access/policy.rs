//! Identity + route + model → allow or deny.
//!
//! Per team (from config): model globs, `admin` for the mutating routes, `cloud` for models Ollama
//! would forward to ollama.com. A key's `models` claim narrows its team's globs, never widens them:
//! a model must match both. Names are normalized as Ollama does (`llama3.2` is `llama3.2:latest`)
//! and compared case-insensitively.

use crate::access::auth::Identity;
use crate::api::error::GatewayError;
use crate::api::routes::{RouteClass, RouteKind};
use crate::config::TeamConfig;
use crate::ollama::json::JsonObject;
use crate::ollama::{is_cloud_model, ModelName};
use serde_json::Value;

/// A model-name pattern: `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(String);

impl Glob {
    pub(crate) fn new(pattern: &str) -> Glob {
        let p = pattern.trim();
        if !p.contains('*') {
            if let Some(name) = ModelName::parse(p) {
                return Glob(name.key());
            }
        }
        let lower = p.to_ascii_lowercase();
        let stripped = lower
            .strip_prefix("registry.ollama.ai/library/")
            .or_else(|| lower.strip_prefix("library/"))
            .unwrap_or(&lower);
        Glob(stripped.to_string())
    }

    /// Matches a normalized model name, in any case (patterns are kept lowercase).
    pub(crate) fn matches(&self, name: &str) -> bool {
        wildcard(self.0.as_bytes(), name.as_bytes())
    }
}

/// `*`-only wildcard matching of a lowercase pattern against text in any case, linear time (no
/// backtracking blow-up).
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && pattern[p] != b'*' && pattern[p] == text[t].to_ascii_lowercase() {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// A team's policy, compiled from its config table.
#[derive(Debug, Clone)]
pub(crate) struct Team {
    pub(crate) name: String,
    pub(crate) models: Vec<Glob>,
    pub(crate) admin: bool,
    pub(crate) cloud: bool,
    pub(crate) rpm: u32,
    pub(crate) tpm: u64,
    pub(crate) max_concurrent: u32,
    /// Share of the slots under contention.
    pub(crate) weight: u32,
    /// Requests it may have waiting for a slot (`None`: only the gateway's cap).
    pub(crate) max_queued: Option<u32>,
}

impl Team {
    pub(crate) fn new(name: &str, cfg: &TeamConfig) -> Team {
        Team {
            name: name.to_string(),
            models: cfg.models.iter().map(|g| Glob::new(g)).collect(),
            admin: cfg.admin,
            cloud: cfg.cloud,
            rpm: cfg.rpm,
            tpm: cfg.tpm,
            max_concurrent: cfg.max_concurrent,
            weight: cfg.weight.max(1),
            max_queued: cfg.max_queued,
        }
    }

    /// Whether this team, with this key, may use `model` (normalized).
    pub(crate) fn allows(&self, identity: &Identity, model: &ModelName) -> bool {
        let name = model.as_str();
        if is_cloud_model(name) && !self.cloud {
            return false;
        }
        key_allows(identity, model) && self.models.iter().any(|g| g.matches(name))
    }
}

/// Whether the key's own `models` claim (if it has one) covers `model`.
fn key_allows(identity: &Identity, model: &ModelName) -> bool {
    identity
        .models
        .as_ref()
        .is_none_or(|claim| claim.iter().any(|g| Glob::new(g).matches(model.as_str())))
}

/// A model a request names, and the field that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub(crate) field: &'static str,
    pub(crate) name: ModelName,
}

fn named(field: &'static str, value: Option<String>) -> Result<Option<ModelRef>, GatewayError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => ModelName::parse(&v)
            .map(|name| Some(ModelRef { field, name }))
            .ok_or_else(|| {
                GatewayError::BadRequest(format!("\"{field}\": `{v}` is not a valid model name"))
            }),
    }
}

fn field(obj: &JsonObject, name: &'static str) -> Result<Option<String>, GatewayError> {
    obj.string(name).map_err(|e| GatewayError::BadRequest(e.0))
}

/// What a request refers to: the models it names, and the first field that refers to something
/// no model name covers (blobs uploaded to `/api/blobs`, a remote host, a field corral does not
/// know), which a key's `models` claim therefore cannot allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    pub models: Vec<ModelRef>,
    /// The field that refers to something else than a named model, if any.
    pub(crate) unprovable: Option<String>,
    /// The request makes a model that Ollama serves from another host (`/api/create` with a
    /// `remote_host`): its prompts would leave like a cloud model's.
    pub(crate) remote: bool,
}

/// The fields of `/api/create` that build only from what the request names as models (checked
/// against the claim) or from text: `model`/`name` and `from` name models, `modelfile` is read
/// for its `FROM` lines; the rest shape the new model. Any other field (`files`, `adapters`,
/// `draft_files`, `remote_host`, one added by a later Ollama) is refused to a narrowed key.
const CREATE_FIELDS: &[&str] = &[
    "model",
    "name",
    "from",
    "modelfile",
    "template",
    "renderer",
    "parser",
    "license",
    "system",
    "parameters",
    "messages",
    "stream",
    "quantize",
];

/// Everything a request refers to, read from its body or path as Ollama reads them.
pub fn referenced(
    kind: RouteKind,
    body: Option<&JsonObject>,
    param: Option<&str>,
) -> Result<Refs, GatewayError> {
    let mut refs = Refs {
        models: referenced_models(kind, body, param)?,
        unprovable: None,
        remote: false,
    };
    if let (RouteKind::Create, Some(b)) = (kind, body) {
        refs.remote = field(b, "remote_host")?.is_some_and(|h| !h.is_empty());
        refs.unprovable = b
            .fields()
            .find(|(name, value)| {
                !CREATE_FIELDS.contains(&name.as_str())
                    && !matches!(value.get().trim(), "null" | "{}" | "[]" | "\"\"")
            })
            .map(|(name, _)| name);
        if let Some(text) = field(b, "modelfile")? {
            let (models, blobs) = modelfile_sources(&text);
            for m in models {
                refs.models.extend(named("modelfile", Some(m))?);
            }
            if blobs {
                refs.unprovable = refs.unprovable.or(Some("modelfile".into()));
            }
        }
    }
    Ok(refs)
}

/// The models a Modelfile (the legacy `modelfile` of `/api/create`) builds from, and whether it
/// also builds from something that is not a model name (a file, a blob, an `ADAPTER`). Read
/// conservatively: every line whose first word is `FROM` counts, even inside a quoted block, so
/// nothing Ollama would build from is missed.
fn modelfile_sources(text: &str) -> (Vec<String>, bool) {
    let mut models = Vec::new();
    let mut blobs = false;
    // Ollama's parser ends a line at `\r` as well as `\n`, and skips a byte-order mark and
    // anything unprintable before a command: so does this, and more (every leading character
    // that is not a letter), so a command it reads is never missed here.
    for line in text.split(['\n', '\r']) {
        let line = line.trim_start_matches(|c: char| !c.is_ascii_alphabetic());
        let word_end = line
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(line.len());
        let (word, arg) = line.split_at(word_end);
        let arg = arg.trim().trim_matches('"').trim();
        if word.eq_ignore_ascii_case("adapter") {
            blobs = true;
        } else if word.eq_ignore_ascii_case("from") {
            let path_like = arg.starts_with(['.', '/', '~', '@', '\\']) || arg.contains("sha256");
            match ModelName::parse(arg) {
                Some(_) if !path_like => models.push(arg.to_string()),
                _ => blobs = true,
            }
        }
    }
    (models, blobs)
}

/// Every model a request names, read from its body or path as Ollama reads them.
fn referenced_models(
    kind: RouteKind,
    body: Option<&JsonObject>,
    param: Option<&str>,
) -> Result<Vec<ModelRef>, GatewayError> {
    use RouteKind::*;
    let mut refs = Vec::new();
    match (kind, body) {
        (Model, _) => refs.extend(named("model", param.map(str::to_string))?),
        (Copy, Some(b)) => {
            refs.extend(named("source", field(b, "source")?)?);
            refs.extend(named("destination", field(b, "destination")?)?);
        }
        // Ollama falls back to the deprecated `name` when `model` is empty.
        (Show | Pull | Push | Delete | Create, Some(b)) => {
            let model = field(b, "model")?.filter(|m| !m.is_empty());
            refs.extend(match model {
                Some(m) => named("model", Some(m))?,
                None => named("name", field(b, "name")?)?,
            });
            if kind == Create {
                refs.extend(named("from", field(b, "from")?)?);
            }
        }
        (_, Some(b)) => refs.extend(named("model", field(b, "model")?)?),
        (_, None) => {}
    }
    Ok(refs)
}

/// Decides a request that carries a valid key.
pub(crate) fn authorize(
    team: &Team,
    identity: &Identity,
    kind: RouteKind,
    refs: &Refs,
) -> Result<(), GatewayError> {
    let models = refs.models.as_slice();
    match kind.class() {
        RouteClass::Public => Ok(()),
        RouteClass::Admin => {
            if !team.admin {
                return Err(GatewayError::Forbidden(format!(
                    "team `{}` may not call {}: it is an admin route (set admin = true for the team)",
                    team.name,
                    kind.name()
                )));
            }
            // A model served from another host sends its prompts there, as a cloud model does.
            if refs.remote && !team.cloud {
                return Err(GatewayError::Forbidden(format!(
                    "team `{}` may not create a model served from another host (\"remote_host\"): its prompts would leave this server; set cloud = true for the team",
                    team.name
                )));
            }
            // An admin team is not bound by its model globs here (it pulls models nobody uses
            // yet), but a key issued with a `models` claim is: the claim only ever narrows. What
            // corral cannot check against the claim (a model built from blobs) is refused, and
            // so is uploading blobs, which nothing such a key may create can use.
            if let (Some(claim), true) = (&identity.models, kind == RouteKind::Blobs) {
                return Err(GatewayError::Forbidden(format!(
                    "this key may only use the models its `models` claim names ({}); blobs name no model, so it may not upload them",
                    claim.join(", ")
                )));
            }
            if let (Some(claim), Some(field)) = (&identity.models, &refs.unprovable) {
                return Err(GatewayError::Forbidden(format!(
                    "{} with \"{field}\" is refused for this key: it builds from something no model name covers (blobs, another host), so the key's `models` claim ({}) cannot allow it",
                    kind.name(),
                    claim.join(", ")
                )));
            }
            for m in models {
                if is_cloud_model(m.name.as_str()) && !team.cloud {
                    return Err(cloud_refused(team, &m.name));
                }
                if !key_allows(identity, &m.name) {
                    return Err(GatewayError::Forbidden(format!(
                        "model `{}` is outside this key's `models` claim; {} with it is refused",
                        m.name,
                        kind.name()
                    )));
                }
            }
            Ok(())
        }
        RouteClass::Inference | RouteClass::Info => {
            if kind.class() == RouteClass::Inference && models.is_empty() {
                return Err(GatewayError::BadRequest(format!(
                    "{} needs a \"model\"",
                    kind.name()
                )));
            }
            for m in models {
                if is_cloud_model(m.name.as_str()) && !team.cloud {
                    return Err(cloud_refused(team, &m.name));
                }
                if !team.allows(identity, &m.name) {
                    return Err(GatewayError::Forbidden(format!(
                        "model `{}` is not allowed for team `{}`{}",
                        m.name,
                        team.name,
                        if identity.models.is_some() {
                            " with this key"
                        } else {
                            ""
                        }
                    )));
                }
            }
            Ok(())
        }
    }
}

fn cloud_refused(team: &Team, name: &ModelName) -> GatewayError {
    GatewayError::Forbidden(format!(
        "model `{name}` runs on ollama.com, not here; team `{}` may not use cloud models",
        team.name
    ))
}

/// Model lists (`/api/tags`, `/api/ps`, `/v1/models`) cut down to what the team may use. `None`
/// when the body is not the expected JSON (it is then withheld, not passed through).
pub(crate) fn filter_list(
    kind: RouteKind,
    team: &Team,
    identity: &Identity,
    body: &[u8],
) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let (list_key, name_key) = match kind {
        RouteKind::Tags | RouteKind::Ps => ("models", "model"),
        RouteKind::Models => ("data", "id"),
        _ => return None,
    };
    let keep = |item: &Value| {
        let name = item
            .get(name_key)
            .or_else(|| item.get("name"))
            .and_then(Value::as_str);
        name.and_then(ModelName::parse)
            .is_some_and(|n| team.allows(identity, &n))
    };
    match doc.get_mut(list_key)? {
        Value::Array(items) => items.retain(keep),
        // Ollama sends `"data": null` for no models.
        v @ Value::Null => *v = Value::Array(vec![]),
        _ => return None,
    }
    serde_json::to_vec(&doc).ok()
}

#[cfg(test)]
#[path = "tests/policy.rs"]
mod tests;
