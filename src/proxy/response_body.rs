//! The response on its way back: usage metering and stripping for inference routes, model lists
//! cut down to the team's models. Streams are never held back; only a model list (small JSON) is
//! collected whole before it is filtered.

use super::ctx::{Failure, UpstreamFault};
use super::RequestCtx;
use crate::access::policy;
use crate::api::error::GatewayError;
use crate::api::routes::RouteKind;
use crate::usage::BodyFormat;
use crate::usage::{Meter, UsageStripper};
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorType, Result};

/// Model lists are small; one this large is not a model list.
const MAX_LIST_BODY: usize = 16 << 20;

/// Decides, from the response header, what the body needs.
pub(super) fn prepare(ctx: &mut RequestCtx, resp: &mut ResponseHeader, head_only: bool) {
    ctx.response.status_from_upstream = resp.status.as_u16();
    ctx.response.format = resp
        .headers
        .get(http::header::CONTENT_TYPE)
        .map_or(BodyFormat::Other, |ct| {
            BodyFormat::from_content_type(ct.as_bytes())
        });
    let Some(kind) = ctx.admission.route.as_ref().map(|m| m.kind) else {
        return;
    };
    if resp.status.is_server_error() {
        // Ollama's own 5xx bodies can carry its file paths and internals: the client gets
        // corral's error in its dialect instead (same status), and the log gets the original.
        for h in [
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_ENCODING,
            http::header::CONTENT_TYPE,
        ] {
            resp.remove_header(&h);
        }
        let _ = resp.insert_header(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        );
        ctx.outcome.upstream_fault = Some(UpstreamFault::ServerError);
        if head_only {
            // No body will pass: what is known is logged now.
            let err = GatewayError::UpstreamFailed(ctx.response.status_from_upstream);
            tracing::warn!(request_id = %ctx.request_id, status = ctx.response.status_from_upstream, "Ollama answered a HEAD request with a server error");
            ctx.outcome.failure = Some(Failure::Answered(err));
        } else {
            ctx.response.upstream_failure = Some(BytesMut::new());
        }
        return;
    }
    if resp.status != 200 {
        return;
    }
    if kind.runs_model() && !head_only {
        ctx.response.meter = Some(Meter::new(ctx.response.format));
        if ctx.admission.strip_usage && ctx.response.format == BodyFormat::Sse {
            ctx.response.stripper = Some(UsageStripper::default());
        }
    } else if matches!(kind, RouteKind::Tags | RouteKind::Ps | RouteKind::Models)
        && ctx.admission.caller.is_some()
    {
        // The list is cut down for the team, so its length changes; the whole list's length
        // would tell a HEAD request what the team may not see.
        resp.remove_header(&http::header::CONTENT_LENGTH);
        if !head_only {
            ctx.response.list_body = Some(BytesMut::new());
        }
    }
}

/// The most of Ollama's error body the log keeps.
const MAX_LOGGED_FAILURE: usize = 1024;

/// Reads (and where needed rewrites) one piece of the body.
pub(super) fn body_chunk(
    ctx: &mut RequestCtx,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) -> Result<()> {
    if let Some(original) = ctx.response.upstream_failure.as_mut() {
        if let Some(chunk) = body.take() {
            let room = MAX_LOGGED_FAILURE.saturating_sub(original.len());
            original.extend_from_slice(&chunk[..room.min(chunk.len())]);
        }
        if end_of_stream {
            let err = GatewayError::UpstreamFailed(ctx.response.status_from_upstream);
            tracing::warn!(
                request_id = %ctx.request_id,
                status = ctx.response.status_from_upstream,
                body = %String::from_utf8_lossy(original),
                "Ollama answered with a server error; the client got corral's error instead"
            );
            *body = Some(err.render(ctx.dialect).body);
            ctx.outcome.failure = Some(Failure::Answered(err));
        }
        return Ok(());
    }
    if let Some(meter) = ctx.response.meter.as_mut() {
        if let Some(chunk) = body.as_ref() {
            meter.feed(chunk);
        }
    }
    if let Some(stripper) = ctx.response.stripper.as_mut() {
        let chunk = body.take().unwrap_or_default();
        let out = stripper.process(&chunk, end_of_stream);
        *body = (!out.is_empty() || end_of_stream).then_some(out);
    }
    if ctx.response.list_body.is_some() {
        filter_model_list(ctx, body, end_of_stream)?;
    }
    Ok(())
}

/// Collects a model list whole and, at its end, sends only the models the team may use.
fn filter_model_list(
    ctx: &mut RequestCtx,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) -> Result<()> {
    let Some(buf) = ctx.response.list_body.as_mut() else {
        return Ok(());
    };
    if let Some(chunk) = body.take() {
        if buf.len() + chunk.len() > MAX_LIST_BODY {
            return Error::e_explain(
                ErrorType::Custom("model_list_too_large"),
                "model list too large",
            );
        }
        buf.extend_from_slice(&chunk);
    }
    if !end_of_stream {
        return Ok(());
    }
    let (Some(kind), Some(caller)) = (
        ctx.admission.route.as_ref().map(|m| m.kind),
        &ctx.admission.caller,
    ) else {
        return Ok(());
    };
    let filtered = policy::filter_list(kind, &caller.team, &caller.identity, buf);
    *body = Some(Bytes::from(filtered.unwrap_or_else(|| {
        // Not the JSON Ollama sends: withhold it rather than pass an unfiltered list.
        tracing::warn!(request_id = %ctx.request_id, "unexpected model list from upstream; sent an empty one");
        let empty = if kind == RouteKind::Models { r#"{"object":"list","data":[]}"# } else { r#"{"models":[]}"# };
        empty.as_bytes().to_vec()
    })));
    ctx.response.list_body = None;
    Ok(())
}
