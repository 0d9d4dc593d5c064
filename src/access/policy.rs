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

    /// Matches a normalized, lowercase model key.
    pub(crate) fn matches(&self, key: &str) -> bool {
        wildcard(self.0.as_bytes(), key.as_bytes())
    }
}

/// `*`-only wildcard matching, linear time (no backtracking blow-up).
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && pattern[p] != b'*' && pattern[p] == text[t] {
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
        }
    }

    /// Whether this team, with this key, may use `model` (normalized).
    pub(crate) fn allows(&self, identity: &Identity, model: &ModelName) -> bool {
        let key = model.key();
        if is_cloud_model(&key) && !self.cloud {
            return false;
        }
        key_allows(identity, model) && self.models.iter().any(|g| g.matches(&key))
    }
}

/// Whether the key's own `models` claim (if it has one) covers `model`.
fn key_allows(identity: &Identity, model: &ModelName) -> bool {
    let key = model.key();
    identity
        .models
        .as_ref()
        .is_none_or(|claim| claim.iter().any(|g| Glob::new(g).matches(&key)))
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
mod tests {
    use super::*;
    use serde_json::json;

    fn team(models: &[&str]) -> Team {
        Team::new(
            "research",
            &TeamConfig {
                models: models.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    fn id(models: Option<&[&str]>) -> Identity {
        Identity {
            team: "research".into(),
            key_id: "k".into(),
            kid: "v".into(),
            models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
            expires_at: None,
        }
    }

    fn only(models: &[ModelRef]) -> Refs {
        Refs {
            models: models.to_vec(),
            unprovable: None,
            remote: false,
        }
    }

    fn m(name: &str) -> ModelName {
        ModelName::parse(name).unwrap()
    }

    #[test]
    fn globs_match_normalized_names() {
        let t = team(&["llama3.2:*", "nomic-embed-text*", "qwen2.5"]);
        for ok in [
            "llama3.2",
            "llama3.2:3b",
            "LLAMA3.2:latest",
            "library/llama3.2",
            "nomic-embed-text",
            "qwen2.5:latest",
        ] {
            assert!(t.allows(&id(None), &m(ok)), "{ok}");
        }
        for no in [
            "llama3.1",
            "qwen2.5:7b",
            "mistral",
            "hf.co/x/llama3.2",
            "evil/llama3.2",
        ] {
            assert!(!t.allows(&id(None), &m(no)), "{no}");
        }
        assert!(team(&["*"]).allows(&id(None), &m("anything:at-all")));
        assert!(
            !team(&[]).allows(&id(None), &m("llama3.2")),
            "no globs, no models"
        );
    }

    #[test]
    fn wildcard_matching_is_linear_and_correct() {
        assert!(wildcard(b"a*b*c", b"aXXbYYc"));
        assert!(!wildcard(b"a*b*c", b"aXXbYY"));
        assert!(wildcard(b"*", b""));
        assert!(!wildcard(b"abc", b"abcd"));
        let long = "a".repeat(10_000);
        assert!(!wildcard(
            format!("{}b", "*a".repeat(50)).as_bytes(),
            long.as_bytes()
        ));
    }

    #[test]
    fn a_key_claim_narrows_and_never_widens() {
        let t = team(&["llama3.2:*"]);
        assert!(t.allows(&id(Some(&["llama3.2:1b"])), &m("llama3.2:1b")));
        assert!(
            !t.allows(&id(Some(&["llama3.2:1b"])), &m("llama3.2:3b")),
            "narrowed"
        );
        assert!(
            !t.allows(&id(Some(&["*"])), &m("qwen2.5")),
            "a wide claim does not widen"
        );
    }

    #[test]
    fn cloud_models_need_the_cloud_flag() {
        let mut t = team(&["*"]);
        assert!(!t.allows(&id(None), &m("gpt-oss:120b-cloud")));
        let cloud = [ModelRef {
            field: "model",
            name: m("gpt-oss:120b-cloud"),
        }];
        let e = authorize(&t, &id(None), RouteKind::Chat, &only(&cloud)).unwrap_err();
        assert!(e.to_string().contains("runs on ollama.com"), "{e}");
        t.cloud = true;
        assert!(t.allows(&id(None), &m("gpt-oss:120b-cloud")));
        assert!(authorize(&t, &id(None), RouteKind::Chat, &only(&cloud)).is_ok());
    }

    #[test]
    fn admin_routes_need_the_admin_flag() {
        let mut t = team(&["*"]);
        let refs = [ModelRef {
            field: "model",
            name: m("llama3.2"),
        }];
        let e = authorize(&t, &id(None), RouteKind::Pull, &only(&refs)).unwrap_err();
        assert_eq!(e.status(), 403);
        t.admin = true;
        assert!(authorize(&t, &id(None), RouteKind::Pull, &only(&refs)).is_ok());
        let cloud = [ModelRef {
            field: "model",
            name: m("x:cloud"),
        }];
        assert_eq!(
            authorize(&t, &id(None), RouteKind::Pull, &only(&cloud))
                .unwrap_err()
                .status(),
            403
        );
    }

    #[test]
    fn admin_routes_are_not_bound_by_team_globs_but_by_the_key_claim() {
        let mut t = team(&["llama3.2:*"]);
        t.admin = true;
        let r = |name: &str, field| ModelRef {
            field,
            name: m(name),
        };
        // The team may pull a model it does not list yet...
        assert!(authorize(
            &t,
            &id(None),
            RouteKind::Pull,
            &only(&[r("mistral", "model")])
        )
        .is_ok());
        // ...but a key narrowed to llama3.2 may not delete or copy anything else.
        let narrow = id(Some(&["llama3.2:*"]));
        assert!(authorize(
            &t,
            &narrow,
            RouteKind::Delete,
            &only(&[r("llama3.2", "model")])
        )
        .is_ok());
        let e = authorize(
            &t,
            &narrow,
            RouteKind::Delete,
            &only(&[r("mistral", "model")]),
        )
        .unwrap_err();
        assert_eq!(e.status(), 403);
        let copy = [r("llama3.2", "source"), r("mistral", "destination")];
        let e = authorize(&t, &narrow, RouteKind::Copy, &only(&copy)).unwrap_err();
        assert_eq!(e.status(), 403);
    }

    #[test]
    fn a_narrowed_admin_key_cannot_create_from_what_its_claim_cannot_cover() {
        let mut t = team(&[]);
        t.admin = true;
        let narrow = id(Some(&["llama3.2:*"]));
        let decide = |who: &Identity, body: &str| {
            let obj = JsonObject::parse(body.as_bytes()).unwrap();
            let refs = referenced(RouteKind::Create, Some(&obj), None).unwrap();
            authorize(&t, who, RouteKind::Create, &refs).map_err(|e| e.status())
        };
        // Inside the claim: a model made from a model the key names.
        assert_eq!(
            decide(&narrow, r#"{"model":"llama3.2:alias","from":"llama3.2"}"#),
            Ok(())
        );
        assert_eq!(
            decide(&narrow, r#"{"model":"llama3.2:alias","from":"qwen2.5:7b"}"#),
            Err(403)
        );
        // Blobs name no model: refused for a narrowed key, in every field that can carry them,
        // and so is any field corral does not know.
        let digest = format!("sha256:{}", "a".repeat(64));
        for body in [
            format!(r#"{{"model":"llama3.2:alias","files":{{"m.gguf":"{digest}"}}}}"#),
            format!(r#"{{"model":"llama3.2:alias","from":"llama3.2","draft_files":{{"d.gguf":"{digest}"}}}}"#),
            r#"{"model":"llama3.2:alias","from":"llama3.2","something_new":1}"#.to_string(),
            format!(r#"{{"model":"llama3.2:alias","from":"llama3.2","adapters":{{"a.gguf":"{digest}"}}}}"#),
            format!(r#"{{"model":"llama3.2:alias","Files":{{"m.gguf":"{digest}"}}}}"#),
            r#"{"model":"llama3.2:alias","modelfile":"FROM qwen2.5:7b"}"#.to_string(),
            r#"{"model":"llama3.2:alias","modelfile":"  from \"qwen2.5:7b\"\nSYSTEM hi"}"#.to_string(),
            r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\nADAPTER ./lora.gguf"}"#.to_string(),
            format!(r#"{{"model":"llama3.2:alias","modelfile":"FROM /root/.ollama/models/blobs/{digest}"}}"#),
            r#"{"model":"llama3.2:alias","modelfile":"FROM ./model.gguf"}"#.to_string(),
            r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\nTEMPLATE \"\"\"\nFROM qwen2.5\n\"\"\""}"#.to_string(),
        ] {
            assert_eq!(decide(&narrow, &body), Err(403), "{body}");
            // A key without a claim may (its team is admin).
            assert_eq!(decide(&id(None), &body), Ok(()), "{body}");
        }
        // Ollama's parser also ends lines at \r, and skips a byte-order mark or anything
        // unprintable before a command.
        for body in [
            r#"{"model":"llama3.2:alias","modelfile":"SYSTEM hi\rFROM /etc/passwd"}"#,
            r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\n# c\rADAPTER /x.gguf"}"#,
            "{\"model\":\"llama3.2:alias\",\"modelfile\":\"\u{feff}FROM /x.gguf\"}",
            r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\n\u0000ADAPTER /x"}"#,
            r#"{"model":"llama3.2:alias","from":"llama3.2","path":"/tmp/Modelfile"}"#,
        ] {
            assert_eq!(decide(&narrow, body), Err(403), "{body}");
        }
        // A model served from another host needs the cloud flag, whatever the key.
        let remote =
            r#"{"model":"llama3.2:x","from":"llama3.2","remote_host":"https://ollama.com"}"#;
        assert_eq!(decide(&id(None), remote), Err(403));
        let mut cloudy = t.clone();
        cloudy.cloud = true;
        let obj = JsonObject::parse(remote.as_bytes()).unwrap();
        let refs = referenced(RouteKind::Create, Some(&obj), None).unwrap();
        assert!(authorize(&cloudy, &id(None), RouteKind::Create, &refs).is_ok());
        // A narrowed key may not upload blobs; another admin key may.
        let blob = Refs::default();
        assert_eq!(
            authorize(&t, &narrow, RouteKind::Blobs, &blob).map_err(|e| e.status()),
            Err(403)
        );
        assert!(authorize(&t, &id(None), RouteKind::Blobs, &blob).is_ok());
        // A modelfile whose FROM is a model the claim names is fine.
        assert_eq!(
            decide(
                &narrow,
                r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2:1b\nSYSTEM be brief"}"#
            ),
            Ok(())
        );
        // A blob digest where a model name should be: refused even for a key whose claim
        // matches every name.
        let everything = id(Some(&["*"]));
        for from in [digest.as_str(), &digest.replace(':', "-")] {
            let body = format!(r#"{{"model":"x","modelfile":"FROM {from}"}}"#);
            assert_eq!(decide(&everything, &body), Err(403), "{body}");
        }
        // Empty blob maps name nothing.
        assert_eq!(
            decide(
                &narrow,
                r#"{"model":"llama3.2:alias","from":"llama3.2","files":{},"adapters":null}"#
            ),
            Ok(())
        );
    }

    #[test]
    fn inference_needs_an_allowed_model() {
        let t = team(&["llama3.2:*"]);
        assert_eq!(
            authorize(&t, &id(None), RouteKind::Chat, &only(&[]))
                .unwrap_err()
                .status(),
            400
        );
        let ok = [ModelRef {
            field: "model",
            name: m("llama3.2"),
        }];
        assert!(authorize(&t, &id(None), RouteKind::Chat, &only(&ok)).is_ok());
        let no = [ModelRef {
            field: "model",
            name: m("mistral"),
        }];
        let e = authorize(&t, &id(None), RouteKind::ChatCompletions, &only(&no)).unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(e.to_string().contains("mistral:latest"));
        // Info routes with no model name (lists) pass; named ones are checked.
        assert!(authorize(&t, &id(None), RouteKind::Tags, &only(&[])).is_ok());
        assert_eq!(
            authorize(&t, &id(None), RouteKind::Show, &only(&no))
                .unwrap_err()
                .status(),
            403
        );
    }

    #[test]
    fn models_are_read_from_the_fields_ollama_reads() {
        let refs = |kind, body: &str| {
            let obj = JsonObject::parse(body.as_bytes()).unwrap();
            referenced_models(kind, Some(&obj), None)
                .unwrap()
                .into_iter()
                .map(|r| (r.field, r.name.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            refs(RouteKind::Chat, r#"{"model":"llama3.2"}"#),
            [("model", "llama3.2:latest".to_string())]
        );
        assert_eq!(
            refs(RouteKind::Show, r#"{"name":"qwen2.5"}"#),
            [("name", "qwen2.5:latest".to_string())]
        );
        assert_eq!(
            refs(RouteKind::Show, r#"{"model":"a","name":"b"}"#),
            [("model", "a:latest".to_string())]
        );
        assert_eq!(
            refs(RouteKind::Copy, r#"{"source":"a","destination":"b"}"#).len(),
            2
        );
        assert_eq!(
            refs(RouteKind::Create, r#"{"model":"mine","from":"llama3.2"}"#).len(),
            2
        );
        assert_eq!(
            referenced_models(RouteKind::Model, None, Some("llama3.2")).unwrap()[0]
                .name
                .to_string(),
            "llama3.2:latest"
        );
        let obj = JsonObject::parse(br#"{"model":"../../etc"}"#).unwrap();
        assert_eq!(
            referenced_models(RouteKind::Chat, Some(&obj), None)
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn lists_only_show_the_teams_models() {
        let t = team(&["llama3.2:*"]);
        let tags = json!({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}, {"name": "qwen2.5:7b", "model": "qwen2.5:7b"}]});
        let out: Value = serde_json::from_slice(
            &filter_list(RouteKind::Tags, &t, &id(None), tags.to_string().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(out["models"].as_array().unwrap().len(), 1);
        assert_eq!(out["models"][0]["name"], "llama3.2:latest");
        let models =
            json!({"object": "list", "data": [{"id": "qwen2.5:7b"}, {"id": "llama3.2:3b"}]});
        let out: Value = serde_json::from_slice(
            &filter_list(
                RouteKind::Models,
                &t,
                &id(None),
                models.to_string().as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(out["data"], json!([{"id": "llama3.2:3b"}]));
        let none = json!({"object": "list", "data": null});
        let out: Value = serde_json::from_slice(
            &filter_list(
                RouteKind::Models,
                &t,
                &id(None),
                none.to_string().as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(out["data"], json!([]));
        assert!(filter_list(RouteKind::Tags, &t, &id(None), b"not json").is_none());
    }
}
