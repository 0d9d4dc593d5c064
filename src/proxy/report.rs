//! The end of every request: one access-log line and its metrics.

use super::ctx::Failure;
use super::{Gateway, RequestCtx};
use crate::access::auth::AuthFailure;
use crate::api::error::GatewayError;
use crate::api::routes::Dialect;
use crate::telemetry::access_log::{self, AccessRecord};
use crate::usage::BodyFormat;
use crate::usage::Outcome;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession as HttpSession;
use pingora::proxy::Session;

impl Gateway {
    pub(super) fn report(&self, session: &mut Session, ctx: &mut RequestCtx) {
        let req = session.req_header();
        // No response at all: the client went away first (nginx's 499).
        let status = session
            .response_written()
            .map_or(499, |r| r.status.as_u16());
        let outcome: Option<Outcome> = ctx.response.meter.as_mut().map(|m| m.finish());
        let pieces = ctx.response.meter.as_ref().map_or(0, |m| m.pieces());
        let streamed = matches!(ctx.response.format, BodyFormat::Ndjson | BodyFormat::Sse);
        let left_early = ctx.outcome.failure == Some(Failure::ClientClosed);
        let truncated =
            streamed && status == 200 && outcome.is_some_and(|o| !o.complete) && !left_early;
        if truncated && ctx.outcome.failure.is_none() {
            ctx.outcome.failure = Some(if outcome.is_some_and(|o| o.error_in_stream) {
                Failure::ErrorInStream
            } else {
                Failure::Truncated
            });
        }
        let reported = outcome.map(|o| o.usage).unwrap_or_default();
        // A stream with no counts of its own is charged an estimate: one the client left
        // before Ollama's final counts (leaving early does not make tokens free), or one that
        // ended properly but never reported usage (a server that sends none). A stream Ollama
        // broke off is charged only what was counted.
        let silent = outcome.is_some_and(|o| o.complete) && reported.is_unknown();
        let estimated = streamed && status == 200 && (left_early || silent);
        let usage = if estimated {
            reported.estimated(pieces, ctx.outcome.bytes_in)
        } else {
            reported
        };

        let m = &self.metrics;
        let team = ctx.team_label();
        let model = m.model_label(ctx.admission.model.as_deref());
        let route = ctx
            .admission
            .route
            .as_ref()
            .map_or("unmatched", |r| r.kind.name());
        let elapsed = ctx.start.elapsed();
        // A status is three digits: its label is written on the stack, not allocated.
        let digits = [
            b'0' + (status / 100 % 10) as u8,
            b'0' + (status / 10 % 10) as u8,
            b'0' + (status % 10) as u8,
        ];
        let status_label = std::str::from_utf8(&digits).unwrap_or("000");
        m.requests
            .with_label_values(&[team, &model, route, status_label])
            .inc();
        m.duration
            .with_label_values(&[team, &model, route])
            .observe(elapsed.as_secs_f64());
        if let (Some(first), true, 200) = (
            ctx.response.first_byte,
            streamed && outcome.is_some(),
            status,
        ) {
            m.ttft
                .with_label_values(&[team, &model])
                .observe(first.as_secs_f64());
        }
        let source = if estimated { "estimated" } else { "reported" };
        for (kind, n) in [("prompt", usage.prompt), ("completion", usage.completion)] {
            if let Some(n) = n.filter(|n| *n > 0) {
                m.tokens
                    .with_label_values(&[team, &model, kind, source])
                    .inc_by(n);
            }
        }
        if truncated {
            m.truncated.with_label_values(&[team, &model, route]).inc();
        }
        if let Some(failure) = ctx.outcome.auth_failure {
            m.auth_failures.with_label_values(&[failure.reason()]).inc();
        }
        if let Some(fault) = ctx.outcome.upstream_fault {
            m.upstream_errors.with_label_values(&[fault.label()]).inc();
        }
        if let Some(limit) = ctx.outcome.rate_limited {
            m.rate_limited
                .with_label_values(&[team, limit.label()])
                .inc();
        }
        // Token limits charge what was actually used, now that it is known.
        if let Some(caller) = &ctx.admission.caller {
            match &self.shared {
                Some(shared) => shared.charge(&caller.team, usage.total()),
                None => self.limiter.charge(&caller.team, usage.total()),
            }
        }

        let path = logged_path(req.raw_path(), ctx.admission.route.is_some());
        let refused = ctx.outcome.refused_key.as_ref();
        let caller = ctx.admission.caller.as_ref();
        self.access_log.write(&AccessRecord {
            ts: access_log::timestamp(),
            request_id: &ctx.request_id,
            team: caller
                .map(|c| c.team.name.as_str())
                .or(refused.and_then(|r| r.team.as_deref())),
            key_id: caller.map(|c| c.identity.key_id.as_str()).or(refused
                .filter(|r| r.signed)
                .and_then(|r| r.key_id.as_deref())),
            claimed_key_id: refused
                .filter(|r| !r.signed)
                .and_then(|r| r.key_id.as_deref()),
            client_ip: ctx.client_ip,
            method: Some(logged_method(&req.method)),
            path: Some(&*path),
            route: ctx.admission.route.as_ref().map(|r| r.kind.name()),
            model: ctx.admission.model.as_deref(),
            stream: ctx.admission.stream,
            status,
            duration_ms: elapsed.as_millis() as u64,
            ttft_ms: ctx.response.first_byte.map(|d| d.as_millis() as u64),
            prompt_tokens: usage.prompt,
            completion_tokens: usage.completion,
            tokens_estimated: estimated,
            bytes_in: ctx.outcome.bytes_in,
            bytes_out: ctx.outcome.bytes_out,
            error: ctx.outcome.failure.as_ref().map(Failure::label),
            auth_failure: ctx.outcome.auth_failure.map(AuthFailure::reason),
            node: ctx.nodes.node().map(|n| n.name.as_str()),
            attempts: ctx.nodes.count,
            queued_ms: ctx.outcome.queued.map(|q| q.as_millis() as u64),
        });
    }
}

impl Gateway {
    /// A request pingora refused while reading it (malformed header, conflicting
    /// `Content-Length`s, a target that is not a path, CONNECT): logged and counted like any
    /// other, and answered in corral's JSON. Nothing about it reached a hook or Ollama. The
    /// error's own text is never logged: it holds the raw request, keys included.
    pub(super) fn refused_unread(
        &self,
        session: &HttpSession,
        error: Option<&pingora::Error>,
        status: u16,
    ) -> Option<(ResponseHeader, bytes::Bytes)> {
        let request_id = super::headers::new_request_id();
        let too_large = error.is_some_and(|e| {
            e.context
                .as_ref()
                .is_some_and(|c| c.as_str().contains("header larger than"))
        });
        let err = match (status, too_large) {
            (405, _) => GatewayError::MethodNotAllowed {
                allow: "GET, HEAD, POST, DELETE".into(),
            },
            (_, true) => GatewayError::HeadersTooLarge,
            _ => GatewayError::BadRequest(
                "the request is not valid HTTP (a malformed header, conflicting Content-Length, or a target that is not a path); it was not forwarded".into(),
            ),
        };
        let rendered = err.render(Dialect::Ollama);
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // CONNECT was read: its method is known. A malformed request's is not.
        let parsed = error.is_none().then(|| session.req_header());
        let path = parsed.map(|r| {
            String::from_utf8_lossy(&r.raw_path()[..r.raw_path().len().min(512)]).into_owned()
        });
        let label = match err {
            GatewayError::BadRequest(_) => "malformed_request",
            _ => err.label(),
        };
        let route = if parsed.is_some() {
            "unmatched"
        } else {
            MALFORMED_ROUTE
        };
        self.metrics
            .requests
            .with_label_values(&["none", "none", route, &rendered.status.to_string()])
            .inc();
        self.access_log.write(&AccessRecord {
            ts: access_log::timestamp(),
            request_id: &request_id,
            client_ip,
            method: parsed.map(|r| r.method.as_str()),
            path: path.as_deref(),
            status: rendered.status,
            bytes_out: rendered.body.len() as u64,
            error: Some(label),
            ..Default::default()
        });
        let mut resp =
            ResponseHeader::build(rendered.status, Some(rendered.headers.len() + 1)).ok()?;
        for (k, v) in &rendered.headers {
            resp.insert_header(*k, v.as_str()).ok()?;
        }
        resp.insert_header("x-request-id", request_id.as_str())
            .ok()?;
        Some((resp, rendered.body))
    }
}

/// The `route` label of requests that could not be read as HTTP.
const MALFORMED_ROUTE: &str = "malformed";

/// The method as the log shows it: a standard one, or `OTHER` (a method is whatever token the
/// client sends, 70 KB of it included).
fn logged_method(method: &http::Method) -> &'static str {
    const STANDARD: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    STANDARD
        .iter()
        .find(|m| **m == method.as_str())
        .copied()
        .unwrap_or("OTHER")
}

/// The path as the log shows it, without its query: a route's path whole, any other cut to
/// 100 bytes (it is whatever the client sent, a key pasted into it included).
fn logged_path(raw: &[u8], routed: bool) -> std::borrow::Cow<'_, str> {
    let end = raw.iter().position(|&b| b == b'?').unwrap_or(raw.len());
    let end = end.min(if routed { 512 } else { 100 });
    String::from_utf8_lossy(&raw[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_methods_and_paths_are_bounded() {
        assert_eq!(logged_method(&http::Method::POST), "POST");
        let odd = http::Method::from_bytes(&[b'X'; 1000]).unwrap();
        assert_eq!(logged_method(&odd), "OTHER");
        assert_eq!(logged_path(b"/api/chat?key=secret", true), "/api/chat");
        let long = format!("/{}", "k".repeat(400));
        assert_eq!(logged_path(long.as_bytes(), false).len(), 100);
        assert_eq!(logged_path(long.as_bytes(), true).len(), 401);
    }
}
