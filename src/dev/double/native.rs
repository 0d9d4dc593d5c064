//! Ollama's native `/api/*` routes.

use super::{
    count_tokens, embed_text, empty, json_resp, native_error, now_rfc3339, stream_run, streamed,
    Metrics, ModelSpec, Req, Resp, Run,
};
use crate::ollama::{KeepAlive, ModelName};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

const NDJSON: &str = "application/x-ndjson";

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn str_field<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `model`, falling back to the deprecated `name` (show, pull, push, delete, create).
fn model_or_name(v: &Value) -> &str {
    Some(str_field(v, "model"))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| str_field(v, "name"))
}

fn keep_alive(v: &Value) -> Result<Option<KeepAlive>, Resp> {
    KeepAlive::from_json(v.get("keep_alive")).map_err(|e| native_error(StatusCode::BAD_REQUEST, e))
}

fn stream_flag(v: &Value, default: bool) -> Result<bool, Resp> {
    match v.get("stream") {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(native_error(
            StatusCode::BAD_REQUEST,
            "json: cannot unmarshal into Go struct field .stream of type bool",
        )),
    }
}

fn num_predict(v: &Value) -> Option<i64> {
    v.get("options")
        .and_then(|o| o.get("num_predict"))
        .and_then(Value::as_i64)
}

fn find(r: &Req<'_>, name: &str) -> Option<ModelSpec> {
    r.state.store().find(name).cloned()
}

fn metrics_into(obj: &mut Value, m: &Metrics) {
    let o = obj.as_object_mut().expect("object");
    o.insert("done_reason".into(), json!(m.done_reason));
    o.insert("total_duration".into(), json!(m.total_duration as u64));
    o.insert("load_duration".into(), json!(m.load_duration as u64));
    o.insert("prompt_eval_count".into(), json!(m.prompt_eval_count));
    o.insert(
        "prompt_eval_duration".into(),
        json!(m.prompt_eval_duration as u64),
    );
    o.insert("eval_count".into(), json!(m.eval_count));
    o.insert("eval_duration".into(), json!(m.eval_duration as u64));
}

/// Generate and chat share everything but the shape of one output object.
#[derive(Clone, Copy)]
enum Kind {
    Generate,
    Chat,
}

impl Kind {
    fn object(self, model: &str, content: &str, done: bool) -> Value {
        match self {
            Kind::Generate => {
                json!({"model": model, "created_at": now_rfc3339(), "response": content, "done": done})
            }
            Kind::Chat => json!({"model": model, "created_at": now_rfc3339(),
                "message": {"role": "assistant", "content": content}, "done": done}),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Kind::Generate => "generate",
            Kind::Chat => "chat",
        }
    }
}

pub(super) async fn generate(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return native_error(StatusCode::NOT_FOUND, "model '' not found");
    }
    let prompt = format!(
        "{} {}",
        str_field(&req, "system"),
        str_field(&req, "prompt")
    );
    let empty_prompt = str_field(&req, "prompt").is_empty()
        && req
            .get("images")
            .is_none_or(|i| i.as_array().is_none_or(Vec::is_empty));
    run_text(
        r,
        Kind::Generate,
        &req,
        model,
        count_tokens(&prompt),
        empty_prompt,
    )
    .await
}

pub(super) async fn chat(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return native_error(StatusCode::BAD_REQUEST, "model is required");
    }
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let words: u64 = messages
        .iter()
        .map(|m| count_tokens(str_field(m, "content")))
        .sum();
    run_text(r, Kind::Chat, &req, model, words, messages.is_empty()).await
}

async fn run_text(
    r: &Req<'_>,
    kind: Kind,
    req: &Value,
    model: &str,
    prompt_tokens: u64,
    preload: bool,
) -> Resp {
    let keep_alive = match keep_alive(req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let Some(spec) = find(r, model) else {
        return native_error(StatusCode::NOT_FOUND, format!("model '{model}' not found"));
    };
    if preload && keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        // Unload: expire without loading; answered at once, never streamed.
        r.state.store().unload(&spec.digest, Instant::now());
        let mut v = kind.object(model, "", true);
        v["done_reason"] = json!("unload");
        return json_resp(StatusCode::OK, &v);
    }
    if !spec.has("completion") {
        return native_error(
            StatusCode::BAD_REQUEST,
            format!("\"{model}\" does not support {}", kind.verb()),
        );
    }
    if let Some(e) = &spec.load_error {
        return native_error(StatusCode::INTERNAL_SERVER_ERROR, e.clone());
    }
    let stream = match stream_flag(req, true) {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let run = Run::start(r.state, &spec, keep_alive, prompt_tokens, num_predict(req)).await;
    if preload {
        // Load only: a single object whatever `stream` says.
        run.finish();
        let mut v = kind.object(model, "", true);
        v["done_reason"] = json!("load");
        return json_resp(StatusCode::OK, &v);
    }
    let model = model.to_string();
    if !stream {
        run.generate_all().await;
        let text = run.text();
        let m = run.finish();
        let mut v = kind.object(&model, &text, true);
        metrics_into(&mut v, &m);
        if let Kind::Generate = kind {
            v["context"] = json!([1, 2, 3]);
        }
        return json_resp(StatusCode::OK, &v);
    }
    let model2 = model.clone();
    stream_run(
        run,
        NDJSON,
        move |_, token| vec![line(&kind.object(&model, token, false))],
        move |m, _| {
            let mut v = kind.object(&model2, "", true);
            metrics_into(&mut v, m);
            if let Kind::Generate = kind {
                v["context"] = json!([1, 2, 3]);
            }
            vec![line(&v)]
        },
    )
}

/// `input` of `/api/embed` and `/v1/embeddings`: a string or a list of strings.
pub(super) fn inputs(v: Option<&Value>) -> Result<Vec<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) if s.is_empty() => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "invalid input type".to_string())
            })
            .collect(),
        Some(_) => Err("invalid input type".into()),
    }
}

/// Looks up an embedding model; the error response is in the native shape.
pub(super) fn embedding_model(r: &Req<'_>, model: &str) -> Result<ModelSpec, (StatusCode, String)> {
    let spec = find(r, model).ok_or((
        StatusCode::NOT_FOUND,
        format!("model \"{model}\" not found, try pulling it first"),
    ))?;
    if !spec.has("embedding") {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("\"{model}\" does not support embeddings"),
        ));
    }
    Ok(spec)
}

pub(super) async fn embed(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let model = str_field(&req, "model");
    let ka = match keep_alive(&req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let spec = match embedding_model(r, model) {
        Ok(s) => s,
        Err((status, msg)) => return native_error(status, msg),
    };
    let texts = match inputs(req.get("input")) {
        Ok(t) => t,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let tokens: u64 = texts.iter().map(|t| count_tokens(t)).sum();
    let run = Run::start(r.state, &spec, ka, tokens, Some(0)).await;
    let m = run.finish();
    if texts.is_empty() {
        return json_resp(StatusCode::OK, &json!({"model": model, "embeddings": []}));
    }
    let embeddings: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| embed_text(t, spec.embedding_length))
        .collect();
    json_resp(
        StatusCode::OK,
        &json!({"model": model, "embeddings": embeddings, "total_duration": m.total_duration as u64,
                "load_duration": m.load_duration as u64, "prompt_eval_count": m.prompt_eval_count}),
    )
}

pub(super) async fn embeddings(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let ka = match keep_alive(&req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let spec = match embedding_model(r, str_field(&req, "model")) {
        Ok(s) => s,
        Err((status, msg)) => return native_error(status, msg),
    };
    let prompt = str_field(&req, "prompt");
    let run = Run::start(r.state, &spec, ka, count_tokens(prompt), Some(0)).await;
    run.finish();
    let embedding = if prompt.is_empty() {
        vec![]
    } else {
        embed_text(prompt, spec.embedding_length)
    };
    json_resp(StatusCode::OK, &json!({ "embedding": embedding }))
}

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

pub(super) fn show(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let name = model_or_name(&req);
    let Some(spec) = find(r, name) else {
        let shown = ModelName::parse(name)
            .map(|n| n.to_string())
            .unwrap_or_else(|| name.to_string());
        return native_error(StatusCode::NOT_FOUND, format!("model '{shown}' not found"));
    };
    let arch = spec.family.clone();
    json_resp(
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
    )
}

/// Streams progress lines (`token_delay` apart), or answers with the last one.
fn progress(r: &Req<'_>, req: &Value, lines: Vec<Value>) -> Resp {
    let stream = match stream_flag(req, true) {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    if !stream {
        // Ollama's waitForStream: the last object, or a 500 with the error.
        let last = lines.last().expect("at least one line");
        let status = if last.get("error").is_some() {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        return json_resp(status, last);
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
    resp
}

pub(super) async fn pull(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let Some(name) = ModelName::parse(model_or_name(&req)) else {
        return native_error(StatusCode::BAD_REQUEST, "invalid model name");
    };
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

pub(super) async fn push(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let name = model_or_name(&req);
    if find(r, name).is_none() {
        return native_error(StatusCode::NOT_FOUND, format!("model '{name}' not found"));
    }
    let lines = vec![
        json!({"status": "retrieving manifest"}),
        json!({"status": "pushing manifest"}),
        json!({"status": "success"}),
    ];
    progress(r, &req, lines)
}

pub(super) async fn create(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let Some(name) = ModelName::parse(model_or_name(&req)) else {
        return native_error(StatusCode::BAD_REQUEST, "invalid model name");
    };
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
            let known = r
                .state
                .blobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&hex);
            if !known {
                return native_error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{field}: blob for \"{file}\" not found; upload it to /api/blobs first"
                    ),
                );
            }
        }
    }
    let mut spec = if from.is_empty() {
        ModelSpec::chat(name.as_str())
    } else {
        match find(r, from) {
            Some(base) => base,
            None => {
                return native_error(StatusCode::NOT_FOUND, format!("model '{from}' not found"))
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

pub(super) fn copy(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let (src, dst) = (str_field(&req, "source"), str_field(&req, "destination"));
    let Some(dst_name) = ModelName::parse(dst) else {
        return native_error(StatusCode::BAD_REQUEST, "invalid destination name");
    };
    let Some(mut spec) = find(r, src) else {
        return native_error(StatusCode::NOT_FOUND, format!("model \"{src}\" not found"));
    };
    spec.name = dst_name.to_string();
    r.state.store().add(spec);
    empty(StatusCode::OK)
}

pub(super) fn delete(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return native_error(StatusCode::BAD_REQUEST, e),
    };
    let name = model_or_name(&req);
    if r.state.store().remove(name) {
        empty(StatusCode::OK)
    } else {
        native_error(StatusCode::NOT_FOUND, format!("model '{name}' not found"))
    }
}

pub(super) fn blob(r: &Req<'_>, digest: &str) -> Resp {
    use sha2::{Digest, Sha256};
    let Some(hex) = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))
    else {
        return native_error(StatusCode::BAD_REQUEST, "invalid digest format");
    };
    let key = hex.to_ascii_lowercase();
    let exists = r
        .state
        .blobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&key);
    if r.method == Method::HEAD {
        return empty(if exists {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        });
    }
    if exists {
        return empty(StatusCode::OK);
    }
    let got: String = Sha256::digest(r.body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != key {
        return native_error(
            StatusCode::BAD_REQUEST,
            format!("digest mismatch, expected \"sha256:{key}\", got \"sha256:{got}\""),
        );
    }
    r.state
        .blobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    empty(StatusCode::CREATED)
}
