//! Ollama's native generation routes (generate, chat, embed, embeddings) and their request fields.

use super::engine::{count_tokens, embed_text, stream_run, Run, RunStats};
use super::models::ModelSpec;
use super::reply::{json_resp, line, native_error, Answer, Resp, NDJSON};
use super::server::Req;
use crate::ollama::KeepAlive;
use http::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime};

/// The body as JSON; Ollama's 400 when it is empty or invalid.
pub(super) fn body(r: &Req<'_>) -> Result<Value, Resp> {
    r.json()
        .map_err(|e| native_error(StatusCode::BAD_REQUEST, e))
}

/// A string field of a request body (`""` when missing or not a string).
pub(super) fn str_field<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `model`, falling back to the deprecated `name` (show, pull, push, delete, create).
pub(super) fn model_or_name(v: &Value) -> &str {
    Some(str_field(v, "model"))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| str_field(v, "name"))
}

fn keep_alive(v: &Value) -> Result<Option<KeepAlive>, Resp> {
    KeepAlive::from_json(v.get("keep_alive")).map_err(|e| native_error(StatusCode::BAD_REQUEST, e))
}

/// `stream`, Ollama's 400 when it is not a boolean.
pub(super) fn stream_flag(v: &Value, default: bool) -> Result<bool, Resp> {
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

/// A pulled model by any name Ollama accepts for it.
pub(super) fn find(r: &Req<'_>, name: &str) -> Option<ModelSpec> {
    r.state.store().find(name).cloned()
}

fn stats_into(obj: &mut Value, m: &RunStats) {
    let Some(o) = obj.as_object_mut() else {
        return;
    };
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

/// `created_at` of the native objects.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
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

    /// The final object of a run: its statistics, and for generate a `context`.
    fn last(self, model: &str, content: &str, m: &RunStats) -> Value {
        let mut v = self.object(model, content, true);
        stats_into(&mut v, m);
        if let Kind::Generate = self {
            v["context"] = json!([1, 2, 3]);
        }
        v
    }

    fn verb(self) -> &'static str {
        match self {
            Kind::Generate => "generate",
            Kind::Chat => "chat",
        }
    }
}

pub(super) async fn generate(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let model = str_field(&req, "model");
    if model.is_empty() {
        return Err(native_error(StatusCode::NOT_FOUND, "model '' not found"));
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

pub(super) async fn chat(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let model = str_field(&req, "model");
    if model.is_empty() {
        return Err(native_error(StatusCode::BAD_REQUEST, "model is required"));
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
) -> Answer {
    let keep_alive = keep_alive(req)?;
    let Some(spec) = find(r, model) else {
        return Err(native_error(
            StatusCode::NOT_FOUND,
            format!("model '{model}' not found"),
        ));
    };
    if preload && keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
        // Unload: expire without loading; answered at once, never streamed.
        r.state.store().unload(&spec.digest, Instant::now());
        let mut v = kind.object(model, "", true);
        v["done_reason"] = json!("unload");
        return Ok(json_resp(StatusCode::OK, &v));
    }
    if !spec.has("completion") {
        return Err(native_error(
            StatusCode::BAD_REQUEST,
            format!("\"{model}\" does not support {}", kind.verb()),
        ));
    }
    if let Some(e) = &spec.load_error {
        return Err(native_error(StatusCode::INTERNAL_SERVER_ERROR, e.clone()));
    }
    let stream = stream_flag(req, true)?;
    let run = Run::start(r.state, &spec, keep_alive, prompt_tokens, num_predict(req)).await?;
    if preload {
        // Load only: a single object whatever `stream` says.
        run.finish();
        let mut v = kind.object(model, "", true);
        v["done_reason"] = json!("load");
        return Ok(json_resp(StatusCode::OK, &v));
    }
    let model = model.to_string();
    if !stream {
        let (text, m) = run.complete().await;
        return Ok(json_resp(StatusCode::OK, &kind.last(&model, &text, &m)));
    }
    let model2 = model.clone();
    Ok(stream_run(
        run,
        NDJSON,
        move |_, token| vec![line(&kind.object(&model, token, false))],
        move |m, _| vec![line(&kind.last(&model2, "", m))],
    ))
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

pub(super) async fn embed(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let model = str_field(&req, "model");
    let ka = keep_alive(&req)?;
    let spec = embedding_model(r, model).map_err(|(status, msg)| native_error(status, msg))?;
    let texts = inputs(req.get("input")).map_err(|e| native_error(StatusCode::BAD_REQUEST, e))?;
    let tokens: u64 = texts.iter().map(|t| count_tokens(t)).sum();
    let run = Run::start(r.state, &spec, ka, tokens, Some(0)).await?;
    let m = run.finish();
    if texts.is_empty() {
        return Ok(json_resp(
            StatusCode::OK,
            &json!({"model": model, "embeddings": []}),
        ));
    }
    let embeddings: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| embed_text(t, spec.embedding_length))
        .collect();
    Ok(json_resp(
        StatusCode::OK,
        &json!({"model": model, "embeddings": embeddings, "total_duration": m.total_duration as u64,
                "load_duration": m.load_duration as u64, "prompt_eval_count": m.prompt_eval_count}),
    ))
}

pub(super) async fn embeddings(r: &Req<'_>) -> Answer {
    let req = body(r)?;
    let ka = keep_alive(&req)?;
    let spec = embedding_model(r, str_field(&req, "model"))
        .map_err(|(status, msg)| native_error(status, msg))?;
    let prompt = str_field(&req, "prompt");
    let run = Run::start(r.state, &spec, ka, count_tokens(prompt), Some(0)).await?;
    run.finish();
    let embedding = if prompt.is_empty() {
        vec![]
    } else {
        embed_text(prompt, spec.embedding_length)
    };
    Ok(json_resp(
        StatusCode::OK,
        &json!({ "embedding": embedding }),
    ))
}
