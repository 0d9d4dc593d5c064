//! Ollama's OpenAI-compatible `/v1/*` routes and the Anthropic-compatible `/v1/messages`.

use super::native::{embedding_model, inputs};
use super::{count_tokens, embed_text, json_resp, stream_run, unix_now, ModelSpec, Req, Resp, Run};
use bytes::Bytes;
use http::StatusCode;
use serde_json::{json, Value};

const SSE: &str = "text/event-stream";

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse_event(event: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {v}\n\n"))
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The OpenAI error shape Ollama's middleware writes.
fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    let ty = match status.as_u16() {
        400 => "invalid_request_error",
        404 => "not_found_error",
        _ => "api_error",
    };
    json_resp(
        status,
        &json!({"error": {"message": message.into(), "type": ty, "param": null, "code": null}}),
    )
}

/// The Anthropic error shape of `/v1/messages`.
fn anthropic_error(status: StatusCode, message: impl Into<String>) -> Resp {
    let ty = match status.as_u16() {
        400 => "invalid_request_error",
        404 => "not_found_error",
        _ => "api_error",
    };
    json_resp(
        status,
        &json!({"type": "error", "error": {"type": ty, "message": message.into()}, "request_id": "req_double"}),
    )
}

fn str_field<'v>(v: &'v Value, key: &str) -> &'v str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Common checks: JSON body, `model` present and pulled, `stream` (default false).
struct Parsed {
    req: Value,
    spec: ModelSpec,
    model: String,
    stream: bool,
}

fn parse(r: &Req<'_>, err: fn(StatusCode, String) -> Resp) -> Result<Parsed, Resp> {
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

fn message_words(messages: &[Value]) -> u64 {
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

/// The request's `messages` array (empty when missing or not an array).
fn message_list(req: &Value) -> Vec<Value> {
    req.get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

pub(super) async fn chat_completions(r: &Req<'_>) -> Resp {
    let p = match parse(r, error) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let messages = message_list(&p.req);
    if messages.is_empty() {
        return error(StatusCode::BAD_REQUEST, "[] is too short - 'messages'");
    }
    if !p.spec.has("completion") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("\"{}\" does not support chat", p.model),
        );
    }
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        message_words(&messages),
        max_tokens(&p.req),
    )
    .await;
    let id = format!("chatcmpl-{}", r.state.next_id() % 999);
    let created = unix_now();
    let finish = |reason: &str| if reason == "length" { "length" } else { "stop" };
    if !p.stream {
        run.generate_all().await;
        let text = run.text();
        let m = run.finish();
        return json_resp(
            StatusCode::OK,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": p.model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(m.done_reason)}],
                "usage": usage(m.prompt_eval_count, m.eval_count),
            }),
        );
    }
    let with_usage = include_usage(&p.req);
    let chunk = {
        let (id, model) = (id.clone(), p.model.clone());
        move |choices: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "fp_ollama", "choices": choices})
        }
    };
    let chunk2 = chunk.clone();
    stream_run(
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
            frames.push(done());
            frames
        },
    )
}

pub(super) async fn completions(r: &Req<'_>) -> Resp {
    let p = match parse(r, error) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let Some(prompt) = p.req.get("prompt").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, "prompt must be a string");
    };
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        count_tokens(prompt),
        max_tokens(&p.req),
    )
    .await;
    let id = format!("cmpl-{}", r.state.next_id() % 999);
    let created = unix_now();
    if !p.stream {
        run.generate_all().await;
        let text = run.text();
        let m = run.finish();
        return json_resp(
            StatusCode::OK,
            &json!({
                "id": id, "object": "text_completion", "created": created, "model": p.model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": m.done_reason}],
                "usage": usage(m.prompt_eval_count, m.eval_count),
            }),
        );
    }
    let with_usage = include_usage(&p.req);
    let chunk = {
        let (id, model) = (id.clone(), p.model.clone());
        move |text: &str, finish: Value| {
            let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]});
            if with_usage {
                // Ollama's quirk: with include_usage every chunk carries zero usage.
                c["usage"] = usage(0, 0);
            }
            c
        }
    };
    let chunk2 = chunk.clone();
    let (id2, model2) = (id, p.model);
    stream_run(
        run,
        SSE,
        move |_, token| vec![sse(&chunk(token, Value::Null))],
        move |m, _| {
            let mut frames = vec![sse(&chunk2("", json!(m.done_reason)))];
            if with_usage {
                frames.push(sse(&json!({"id": id2, "object": "text_completion", "created": created, "model": model2,
                    "system_fingerprint": "fp_ollama", "choices": [], "usage": usage(m.prompt_eval_count, m.eval_count)})));
            }
            frames.push(done());
            frames
        },
    )
}

pub(super) async fn embeddings(r: &Req<'_>) -> Resp {
    let req = match r.json() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let model = str_field(&req, "model");
    if model.is_empty() {
        return error(StatusCode::BAD_REQUEST, "model is required");
    }
    let texts = match req.get("input") {
        Some(Value::String(s)) if s.is_empty() => vec![String::new()],
        Some(Value::Array(a)) if a.is_empty() => {
            return error(StatusCode::BAD_REQUEST, "invalid input")
        }
        None | Some(Value::Null) => return error(StatusCode::BAD_REQUEST, "invalid input"),
        other => match inputs(other) {
            Ok(t) => t,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
    };
    match str_field(&req, "encoding_format") {
        "" | "float" | "base64" => {}
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid encoding format: {other}"),
            )
        }
    }
    let spec = match embedding_model(r, model) {
        Ok(s) => s,
        Err((status, msg)) => return error(status, msg),
    };
    let tokens: u64 = texts.iter().map(|t| count_tokens(t)).sum();
    let run = Run::start(r.state, &spec, None, tokens, Some(0)).await;
    let m = run.finish();
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "embedding": embed_text(t, spec.embedding_length), "index": i}))
        .collect();
    json_resp(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": m.prompt_eval_count, "total_tokens": m.prompt_eval_count}}),
    )
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

fn responses_usage(m: &super::Metrics) -> Value {
    json!({"input_tokens": m.prompt_eval_count, "output_tokens": m.eval_count,
           "total_tokens": m.prompt_eval_count + m.eval_count,
           "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}})
}

pub(super) async fn responses(r: &Req<'_>) -> Resp {
    let p = match parse(r, error) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let words = match p.req.get("input") {
        Some(Value::String(s)) => count_tokens(s),
        Some(Value::Array(items)) => message_words(items),
        _ => return error(StatusCode::BAD_REQUEST, "input is required"),
    };
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        words,
        p.req.get("max_output_tokens").and_then(Value::as_i64),
    )
    .await;
    let n = r.state.next_id();
    let (resp_id, msg_id, created) = (format!("resp_{n}"), format!("msg_{n}"), unix_now());
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
        run.generate_all().await;
        let text = run.text();
        let m = run.finish();
        return json_resp(
            StatusCode::OK,
            &response("completed", Some(&text), responses_usage(&m)),
        );
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
        "no-cache".parse().expect("ascii"),
    );
    resp
}

pub(super) async fn messages(r: &Req<'_>) -> Resp {
    let p = match parse(r, anthropic_error) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let messages = message_list(&p.req);
    if messages.is_empty() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "messages: at least one message is required",
        );
    }
    let system = match p.req.get("system") {
        Some(Value::String(s)) => count_tokens(s),
        _ => 0,
    };
    let run = Run::start(
        r.state,
        &p.spec,
        None,
        system + message_words(&messages),
        p.req.get("max_tokens").and_then(Value::as_i64),
    )
    .await;
    let id = format!("msg_{}", r.state.next_id());
    let stop = |reason: &str| {
        if reason == "length" {
            "max_tokens"
        } else {
            "end_turn"
        }
    };
    if !p.stream {
        run.generate_all().await;
        let text = run.text();
        let m = run.finish();
        return json_resp(
            StatusCode::OK,
            &json!({"id": id, "type": "message", "role": "assistant", "model": p.model,
                    "content": [{"type": "text", "text": text}], "stop_reason": stop(m.done_reason), "stop_sequence": null,
                    "usage": {"input_tokens": m.prompt_eval_count, "output_tokens": m.eval_count}}),
        );
    }
    let (model, prompt_tokens) = (p.model.clone(), run.prompt_tokens);
    stream_run(
        run,
        SSE,
        move |i, token| {
            let mut frames = Vec::new();
            if i == 0 {
                frames.push(sse_event("message_start", &json!({"type": "message_start", "message": {"id": id, "type": "message",
                    "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})));
                frames.push(sse_event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ));
                frames.push(sse_event("ping", &json!({"type": "ping"})));
            }
            frames.push(sse_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": token}}),
            ));
            frames
        },
        move |m, _| {
            vec![
                sse_event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                sse_event(
                    "message_delta",
                    &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop(m.done_reason), "stop_sequence": null},
                    "usage": {"output_tokens": m.eval_count}}),
                ),
                sse_event("message_stop", &json!({"type": "message_stop"})),
            ]
        },
    )
}
