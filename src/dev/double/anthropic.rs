//! The Anthropic-compatible `/v1/messages` route, with Anthropic's error shape and events.

use super::engine::{count_tokens, stream_run, Run};
use super::openai::{error_type, message_list, message_words, parse};
use super::reply::{json_resp, sse_event, Answer, Resp, SSE};
use super::server::Req;
use http::StatusCode;
use serde_json::{json, Value};

/// The Anthropic error shape of `/v1/messages`.
fn anthropic_error(status: StatusCode, message: impl Into<String>) -> Resp {
    let ty = error_type(status);
    json_resp(
        status,
        &json!({"type": "error", "error": {"type": ty, "message": message.into()}, "request_id": "req_double"}),
    )
}

pub(super) async fn messages(r: &Req<'_>) -> Answer {
    let p = parse(r, anthropic_error)?;
    let messages = message_list(
        &p.req,
        anthropic_error,
        "messages: at least one message is required",
    )?;
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
    .await?;
    let id = format!("msg_{}", r.state.next_id());
    let stop = |reason: &str| {
        if reason == "length" {
            "max_tokens"
        } else {
            "end_turn"
        }
    };
    if !p.stream {
        let (text, m) = run.complete().await;
        return Ok(json_resp(
            StatusCode::OK,
            &json!({"id": id, "type": "message", "role": "assistant", "model": p.model,
                    "content": [{"type": "text", "text": text}], "stop_reason": stop(m.done_reason), "stop_sequence": null,
                    "usage": {"input_tokens": m.prompt_eval_count, "output_tokens": m.eval_count}}),
        ));
    }
    let (model, prompt_tokens) = (p.model.clone(), run.prompt_tokens);
    Ok(stream_run(
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
    ))
}
