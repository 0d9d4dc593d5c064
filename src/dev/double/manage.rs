//! Ollama's native model routes: tags, ps, show, pull, push, create, copy, delete, blobs.

use super::models::ModelSpec;
use super::native::{body, find, model_or_name, str_field, stream_flag};
use super::reply::{empty, json_resp, line, native_error, streamed, Answer, Resp, NDJSON};
use super::server::Req;
use crate::ollama::{KeepAlive, ModelName};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

fn model_entry(m: &ModelSpec) -> Value {
    json!({
        "name": m.name, "model": m.name,
        "modified_at": humantime::format_rfc3339_nanos(m.modified_at).to_string(),
        "size": m.size, "digest": m.digest, "details": m.details(), "capabilities": m.capabilities,
    })
}

pub(super) fn tags(r: &Req<'_>) -> Resp {
    let models: Vec<Value> = r.state.store().catalog().iter().map(model_entry).collect();
    // hyper leaves the body out for HEAD.
    json_resp(StatusCode::OK, &json!({ "models": models }))
}

pub(super) fn ps(r: &Req<'_>) -> Resp {
    let now = Instant::now();
    let models: Vec<Value> = r
        .state
        .store()
        .loaded(now)
        .into_iter()
        .map(|(spec, l)| {
            // "Forever" is stored as the largest duration: about 292 years ahead.
            let until = match (l.keep_alive, l.expires_in) {
                (KeepAlive::Forever, _) => Duration::from_secs(292 * 365 * 86_400),
                (_, Some(left)) => left,
                (KeepAlive::For(d), None) => d,
            };
            let expires_at = SystemTime::now()
                .checked_add(until)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            json!({
                "name": spec.name, "model": spec.name, "size": spec.size, "digest": spec.digest,
                "details": spec.details(),
                "expires_at": humantime::format_rfc3339_nanos(expires_at).to_string(),
                "size_vram": spec.size, "context_length": spec.context_length,
            })
        })
        .collect();
    json_resp(StatusCode::OK, &json!({ "models": models }))
}

pub(super) fn show(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let name = model_or_name(&req);
    let Some(spec) = find(r, name) else {
        let shown = ModelName::parse(name)
            .map(|n| n.to_string())
            .unwrap_or_else(|| name.to_string());
        return Err(native_error(
            StatusCode::NOT_FOUND,
            format!("model '{shown}' not found"),
        ));
    };
    let arch = spec.family.clone();
    Ok(json_resp(
        StatusCode::OK,
        &json!({
            "modelfile": format!("FROM {}\n", spec.name),
            "parameters": "stop \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": spec.details(),
            "model_info": {
                "general.architecture": arch,
                format!("{arch}.context_length"): spec.context_length,
                format!("{arch}.embedding_length"): spec.embedding_length,
            },
            "capabilities": spec.capabilities,
            "modified_at": humantime::format_rfc3339_nanos(spec.modified_at).to_string(),
        }),
    ))
}

/// The name of the model a pull or create makes; Ollama's 400 when it is invalid.
fn new_name(req: &Value) -> Result<ModelName, Resp> {
    ModelName::parse(model_or_name(req))
        .ok_or_else(|| native_error(StatusCode::BAD_REQUEST, "invalid model name"))
}

/// Streams progress lines (`token_delay` apart), or answers with the last one.
fn progress(r: &Req<'_>, req: &Value, lines: Vec<Value>) -> Answer {
    let stream = stream_flag(req, true)?;
    if !stream {
        // Ollama's waitForStream: the last object, or a 500 with the error.
        let Some(last) = lines.last() else {
            return Ok(empty(StatusCode::INTERNAL_SERVER_ERROR));
        };
        let status = if last.get("error").is_some() {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        return Ok(json_resp(status, last));
    }
    let (mut tx, resp) = streamed(NDJSON);
    let delay = r.state.token_delay();
    tokio::spawn(async move {
        for (i, l) in lines.iter().enumerate() {
            if i > 0 && tx.pause(delay).await.is_err() {
                return;
            }
            if tx.send_data(line(l)).await.is_err() {
                return;
            }
        }
    });
    Ok(resp)
}

pub(super) async fn pull(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let name = new_name(&req)?;
    r.state.pulls.fetch_add(1, Ordering::SeqCst);
    let unknown = r
        .state
        .unpullable
        .iter()
        .any(|u| ModelName::parse(u).is_some_and(|u| u.key() == name.key()));
    if unknown {
        let lines = vec![
            json!({"status": "pulling manifest"}),
            json!({"error": "pull model manifest: file does not exist"}),
        ];
        return progress(r, &req, lines);
    }
    let spec = if name.as_str().contains("embed") {
        ModelSpec::embedding(name.as_str())
    } else {
        ModelSpec::chat(name.as_str())
    };
    let digest = format!("sha256:{}", spec.digest);
    let (layer, config) = (spec.size, 485u64);
    let config_digest = format!("sha256:{}", "c".repeat(64));
    let pulling = |d: &str, total: u64, completed: Option<u64>| {
        let mut line =
            json!({"status": format!("pulling {}", &d[7..19]), "digest": d, "total": total});
        if let Some(c) = completed {
            line["completed"] = json!(c);
        }
        line
    };
    let mut lines = vec![
        json!({"status": "pulling manifest"}),
        pulling(&digest, layer, None),
        pulling(&digest, layer, Some(layer / 4)),
        pulling(&digest, layer, Some(layer / 2)),
    ];
    let breaks = r
        .state
        .failing_pulls
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if breaks {
        // The download broke off (Ollama keeps the partial layer and resumes next time).
        lines.push(json!({"error": "max retries exceeded: read tcp: connection reset by peer"}));
        return progress(r, &req, lines);
    }
    lines.extend([
        pulling(&digest, layer, Some(layer * 3 / 4)),
        pulling(&digest, layer, Some(layer)),
        pulling(&config_digest, config, Some(config)),
        json!({"status": "verifying sha256 digest"}),
        json!({"status": "writing manifest"}),
        json!({"status": "success"}),
    ]);
    r.state.store().add(spec);
    progress(r, &req, lines)
}

pub(super) async fn push(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let name = model_or_name(&req);
    if find(r, name).is_none() {
        return Err(native_error(
            StatusCode::NOT_FOUND,
            format!("model '{name}' not found"),
        ));
    }
    let lines = vec![
        json!({"status": "retrieving manifest"}),
        json!({"status": "pushing manifest"}),
        json!({"status": "success"}),
    ];
    progress(r, &req, lines)
}

pub(super) async fn create(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let name = new_name(&req)?;
    let from = str_field(&req, "from");
    // `files` and `adapters` name blobs uploaded to /api/blobs; each must be there.
    for field in ["files", "adapters"] {
        let digests = req
            .get(field)
            .and_then(Value::as_object)
            .into_iter()
            .flatten();
        for (file, digest) in digests {
            let hex = digest
                .as_str()
                .and_then(|d| {
                    d.strip_prefix("sha256:")
                        .or_else(|| d.strip_prefix("sha256-"))
                })
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            let known = r.state.blobs().contains(&hex);
            if !known {
                return Err(native_error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{field}: blob for \"{file}\" not found; upload it to /api/blobs first"
                    ),
                ));
            }
        }
    }
    let mut spec = if from.is_empty() {
        ModelSpec::chat(name.as_str())
    } else {
        match find(r, from) {
            Some(base) => base,
            None => {
                return Err(native_error(
                    StatusCode::NOT_FOUND,
                    format!("model '{from}' not found"),
                ))
            }
        }
    };
    spec.name = name.to_string();
    spec.modified_at = SystemTime::now();
    r.state.store().add(spec);
    let lines = vec![
        json!({"status": "using existing layer sha256:0f1e2d"}),
        json!({"status": "writing manifest"}),
        json!({"status": "success"}),
    ];
    progress(r, &req, lines)
}

pub(super) fn copy(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let (src, dst) = (str_field(&req, "source"), str_field(&req, "destination"));
    let Some(dst_name) = ModelName::parse(dst) else {
        return Err(native_error(
            StatusCode::BAD_REQUEST,
            "invalid destination name",
        ));
    };
    let Some(mut spec) = find(r, src) else {
        return Err(native_error(
            StatusCode::NOT_FOUND,
            format!("model \"{src}\" not found"),
        ));
    };
    spec.name = dst_name.to_string();
    r.state.store().add(spec);
    Ok(empty(StatusCode::OK))
}

pub(super) fn delete(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let name = model_or_name(&req);
    if r.state.store().remove(name) {
        Ok(empty(StatusCode::OK))
    } else {
        Err(native_error(
            StatusCode::NOT_FOUND,
            format!("model '{name}' not found"),
        ))
    }
}

pub(super) fn blob(r: &Req<'_>, digest: &str) -> Answer {
    use sha2::{Digest, Sha256};
    let Some(hex) = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))
    else {
        return Err(native_error(
            StatusCode::BAD_REQUEST,
            "invalid digest format",
        ));
    };
    let key = hex.to_ascii_lowercase();
    let exists = r.state.blobs().contains(&key);
    if r.method == Method::HEAD {
        return Ok(empty(if exists {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        }));
    }
    if exists {
        return Ok(empty(StatusCode::OK));
    }
    let got: String = Sha256::digest(r.body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != key {
        return Err(native_error(
            StatusCode::BAD_REQUEST,
            format!("digest mismatch, expected \"sha256:{key}\", got \"sha256:{got}\""),
        ));
    }
    r.state.blobs().insert(key);
    Ok(empty(StatusCode::CREATED))
}
