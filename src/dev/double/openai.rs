//! Ollama's OpenAI-compatible `/v1/*` routes, and the request checks `/v1/messages` shares.

use super::engine::{count_tokens, embed_text, stream_run, Run, RunStats};
use super::models::ModelSpec;
use super::native::{embedding_model, inputs, str_field};
use super::reply::{json_resp, sse, sse_done, sse_event, Answer, Resp, SSE};
use super::server::Req;
use http::StatusCode;
use serde_json::{json, Value};

/// The error `type` of the OpenAI and Anthropic error shapes.
pub(super) fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        404 => "not_found_error",
        _ => "api_error",
    }
}

/// The OpenAI error shape Ollama's middleware writes.
fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    let ty = error_type(status);
    json_resp(
        status,
        &json!({"error": {"message": message.into(), "type": ty, "param": null, "code": null}}),
    )
}

/// Common checks: JSON body, `model` present and pulled, `stream` (default false).
pub(super) struct Parsed {
    pub(super) req: Value,
    pub(super) spec: ModelSpec,
    pub(super) model: String,
    pub(super) stream: bool,
}

pub(super) fn parse(r: &Req<'_>, err: fn(StatusCode, String) -> Resp) -> Result<Parsed, Resp> {
    let req = r.json().map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    let model = str_field(&req, "model").to_string();
    if model.is_empty() {
        return Err(err(StatusCode::BAD_REQUEST, "model is required".into()));
    }
    let stream = match req.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err(StatusCode::BAD_REQUEST, "invalid stream value".into())),
    };
    let spec = r
        .state
        .store()
        .find(&model)
        .cloned()
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("model '{model}' not found")))?;
    if let Some(e) = &spec.load_error {
        return Err(err(StatusCode::INTERNAL_SERVER_ERROR, e.clone()));
    }
    Ok(Parsed {
        req,
        spec,
        model,
        stream,
    })
}

fn include_usage(req: &Value) -> bool {
    req.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true)
}

fn max_tokens(req: &Value) -> Option<i64> {
    req.get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_i64)
}

pub(super) fn message_words(messages: &[Value]) -> u64 {
    messages
        .iter()
        .map(|m| match m.get("content") {
            Some(Value::String(s)) => count_tokens(s),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| count_tokens(str_field(p, "text")))
                .sum(),
            _ => 0,
        })
        .sum()
}

/// The request's `messages` array; `err(400, when_empty)` when it is empty, missing or not an
/// array.
pub(super) fn message_list(
    req: &Value,
    err: fn(StatusCode, String) -> Resp,
    when_empty: &str,
) -> Result<Vec<Value>, Resp> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if messages.is_empty() {
        return Err(err(StatusCode::BAD_REQUEST, when_empty.into()));
    }
    Ok(messages)
}

/// The fields a chat or text completion (or one of its chunks) starts with, then its `choices`.
fn envelope(id: &str, object: &str, created: u64, model: &str, choices: Value) -> Value {
    json!({"id": id, "object": object, "created": created, "model": model,
           "system_fingerprint": "fp_ollama", "choices": choices})
}

/// A whole (not streamed) completion: its one choice, then the usage.
fn whole(id: &str, object: &str, created: u64, model: &str, choice: Value, m: &RunStats) -> Resp {
    let mut v = envelope(id, object, created, model, json!([choice]));
    v["usage"] = usage(m.prompt_eval_count, m.eval_count);
    json_resp(StatusCode::OK, &v)
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

pub(super) async fn chat_completions(r: &Req<'_>) -> Answer {
    let p = parse(r, error)?;
    let messages = message_list(&p.req, error, "[] is too short - 'messages'")?;
    if !p.spec.has("completion") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("\"{}\" does not support chat", p.model),
        ));
    }
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        message_words(&messages),
        max_tokens(&p.req),
    )
    .await?;
    let id = format!("chatcmpl-{}", r.state.next_id() % 999);
    let created = crate::clock::unix_now();
    let finish = |reason: &str| if reason == "length" { "length" } else { "stop" };
    if !p.stream {
        let (text, m) = run.complete().await;
        let choice = json!({"index": 0, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish(m.done_reason)});
        return Ok(whole(&id, "chat.completion", created, &p.model, choice, &m));
    }
    let with_usage = include_usage(&p.req);
    let chunk = {
        let (id, model) = (id.clone(), p.model.clone());
        move |choices: Value| envelope(&id, "chat.completion.chunk", created, &model, choices)
    };
    let chunk2 = chunk.clone();
    Ok(stream_run(
        run,
        SSE,
        move |i, token| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": token})
            } else {
                json!({"content": token})
            };
            vec![sse(&chunk(
                json!([{"index": 0, "delta": delta, "finish_reason": null}]),
            ))]
        },
        move |m, _| {
            let mut frames = vec![sse(&chunk2(
                json!([{"index": 0, "delta": {}, "finish_reason": finish(m.done_reason)}]),
            ))];
            if with_usage {
                let mut u = chunk2(json!([]));
                u["usage"] = usage(m.prompt_eval_count, m.eval_count);
                frames.push(sse(&u));
            }
            frames.push(sse_done());
            frames
        },
    ))
}

pub(super) async fn completions(r: &Req<'_>) -> Answer {
    let p = parse(r, error)?;
    let Some(prompt) = p.req.get("prompt").and_then(Value::as_str) else {
        return Err(error(StatusCode::BAD_REQUEST, "prompt must be a string"));
    };
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        count_tokens(prompt),
        max_tokens(&p.req),
    )
    .await?;
    let id = format!("cmpl-{}", r.state.next_id() % 999);
    let created = crate::clock::unix_now();
    if !p.stream {
        let (text, m) = run.complete().await;
        let choice =
            json!({"text": text, "index": 0, "logprobs": null, "finish_reason": m.done_reason});
        return Ok(whole(&id, "text_completion", created, &p.model, choice, &m));
    }
    let with_usage = include_usage(&p.req);
    let chunk = {
        let (id, model) = (id.clone(), p.model.clone());
        move |text: &str, finish: Value| {
            let choice =
                json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish});
            let mut c = envelope(&id, "text_completion", created, &model, json!([choice]));
            if with_usage {
                // Ollama's quirk: with include_usage every chunk carries zero usage.
                c["usage"] = usage(0, 0);
            }
            c
        }
    };
    let chunk2 = chunk.clone();
    let (id2, model2) = (id, p.model);
    Ok(stream_run(
        run,
        SSE,
        move |_, token| vec![sse(&chunk(token, Value::Null))],
        move |m, _| {
            let mut frames = vec![sse(&chunk2("", json!(m.done_reason)))];
            if with_usage {
                let mut u = envelope(&id2, "text_completion", created, &model2, json!([]));
                u["usage"] = usage(m.prompt_eval_count, m.eval_count);
                frames.push(sse(&u));
            }
            frames.push(sse_done());
            frames
        },
    ))
}

pub(super) async fn embeddings(r: &Req<'_>) -> Answer {
    let req = r.json().map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let model = str_field(&req, "model");
    if model.is_empty() {
        return Err(error(StatusCode::BAD_REQUEST, "model is required"));
    }
    let texts = match req.get("input") {
        Some(Value::String(s)) if s.is_empty() => vec![String::new()],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(error(StatusCode::BAD_REQUEST, "invalid input"))
        }
        None | Some(Value::Null) => return Err(error(StatusCode::BAD_REQUEST, "invalid input")),
        other => inputs(other).map_err(|e| error(StatusCode::BAD_REQUEST, e))?,
    };
    match str_field(&req, "encoding_format") {
        "" | "float" | "base64" => {}
        other => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("invalid encoding format: {other}"),
            ))
        }
    }
    let spec = embedding_model(r, model).map_err(|(status, msg)| error(status, msg))?;
    let tokens: u64 = texts.iter().map(|t| count_tokens(t)).sum();
    let run = Run::start(r.state, &spec, None, tokens, Some(0)).await?;
    let m = run.finish();
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "embedding": embed_text(t, spec.embedding_length), "index": i}))
        .collect();
    Ok(json_resp(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": m.prompt_eval_count, "total_tokens": m.prompt_eval_count}}),
    ))
}

fn model_object(m: &ModelSpec) -> Value {
    let created = m
        .modified_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let owner = if m.name.contains('/') {
        m.name.split('/').next().unwrap_or("library")
    } else {
        "library"
    };
    json!({"id": m.name, "object": "model", "created": created, "owned_by": owner})
}

pub(super) fn models(r: &Req<'_>) -> Resp {
    let data: Vec<Value> = r.state.store().catalog().iter().map(model_object).collect();
    // With no models Ollama sends `null`, not `[]`.
    let data = if data.is_empty() {
        Value::Null
    } else {
        Value::Array(data)
    };
    json_resp(StatusCode::OK, &json!({"object": "list", "data": data}))
}

pub(super) fn model(r: &Req<'_>, name: &str) -> Resp {
    match r.state.store().find(name) {
        Some(m) => json_resp(StatusCode::OK, &model_object(m)),
        None => error(StatusCode::NOT_FOUND, format!("model '{name}' not found")),
    }
}

fn responses_usage(m: &RunStats) -> Value {
    json!({"input_tokens": m.prompt_eval_count, "output_tokens": m.eval_count,
           "total_tokens": m.prompt_eval_count + m.eval_count,
           "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}})
}

pub(super) async fn responses(r: &Req<'_>) -> Answer {
    let p = parse(r, error)?;
    let words = match p.req.get("input") {
        Some(Value::String(s)) => count_tokens(s),
        Some(Value::Array(items)) => message_words(items),
        _ => return Err(error(StatusCode::BAD_REQUEST, "input is required")),
    };
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        words,
        p.req.get("max_output_tokens").and_then(Value::as_i64),
    )
    .await?;
    let n = r.state.next_id();
    let (resp_id, msg_id, created) = (
        format!("resp_{n}"),
        format!("msg_{n}"),
        crate::clock::unix_now(),
    );
    let response = {
        let (resp_id, msg_id, model) = (resp_id.clone(), msg_id.clone(), p.model.clone());
        move |status: &str, text: Option<&str>, usage: Value| {
            let output = match text {
                Some(t) => {
                    json!([{"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": t, "annotations": []}]}])
                }
                None => json!([]),
            };
            json!({"id": resp_id, "object": "response", "created_at": created, "status": status,
                   "model": model, "output": output, "usage": usage})
        }
    };
    if !p.stream {
        let (text, m) = run.complete().await;
        return Ok(json_resp(
            StatusCode::OK,
            &response("completed", Some(&text), responses_usage(&m)),
        ));
    }
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let event = {
        let seq = seq.clone();
        move |ty: &str, mut v: Value| {
            v["type"] = json!(ty);
            v["sequence_number"] = json!(seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            sse_event(ty, &v)
        }
    };
    let event2 = event.clone();
    let (response2, msg_id2) = (response.clone(), msg_id.clone());
    let mut resp = stream_run(
        run,
        SSE,
        move |i, token| {
            let mut frames = Vec::new();
            if i == 0 {
                frames.push(event(
                    "response.created",
                    json!({"response": response("in_progress", None, Value::Null)}),
                ));
                frames.push(event(
                    "response.in_progress",
                    json!({"response": response("in_progress", None, Value::Null)}),
                ));
                frames.push(event("response.output_item.added", json!({"output_index": 0,
                    "item": {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}})));
                frames.push(event(
                    "response.content_part.added",
                    json!({"item_id": msg_id, "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
                ));
            }
            frames.push(event(
                "response.output_text.delta",
                json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": token}),
            ));
            frames
        },
        move |m, text| {
            vec![
                event2(
                    "response.output_text.done",
                    json!({"item_id": msg_id2, "output_index": 0, "content_index": 0, "text": text}),
                ),
                event2(
                    "response.content_part.done",
                    json!({"item_id": msg_id2, "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
                ),
                event2(
                    "response.output_item.done",
                    json!({"output_index": 0, "item": {"type": "message", "id": msg_id2,
                    "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}}),
                ),
                event2(
                    "response.completed",
                    json!({"response": response2("completed", Some(&text), responses_usage(m))}),
                ),
            ]
        },
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    Ok(resp)
}
