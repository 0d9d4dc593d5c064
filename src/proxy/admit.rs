//! Admission: everything decided before Ollama sees a byte. Framing and header limits, route, key,
//! body, policy, rate limits, and the rewrites corral makes to the body (pinned `keep_alive`, usage
//! on `/v1` streams).

use super::framing::{self, Framing};
use super::{ctx::GaugeGuard, Gateway, RequestCtx};
use crate::access::auth::{self, AuthFailure};
use crate::access::policy::{self, Refs};
use crate::access::Access;
use crate::api::error::GatewayError;
use crate::api::routes::{self, BodyMode, RouteClass, RouteError, RouteKind};
use crate::config::ByteSize;
use crate::ollama::json::{BodyError, JsonObject};
use crate::ollama::{KeepAlive, ModelName};
use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::ErrorType;
use serde_json::Value;
use std::time::{Duration, Instant};

impl Gateway {
    /// Decides whether the request goes upstream. `Err` is answered by corral.
    pub(super) async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        check_header_size(session.req_header(), self.limits.max_header_size)?;
        let framing = framing::of(session.req_header(), || session.to_h1_raw())?;
        let req = session.req_header();
        let matched =
            routes::classify(&req.method, req.raw_path()).map_err(|e| route_error(e, req, ctx))?;
        ctx.dialect = matched.kind.dialect();
        let kind = matched.kind;
        let param = matched.param.clone();
        ctx.route = Some(matched);

        // Who is calling, before reading any body: a 401 costs nothing.
        let access = self.access.current();
        if kind.class() != RouteClass::Public {
            let refuse = |ctx: &mut RequestCtx, failure: AuthFailure, key: Option<&str>| {
                ctx.auth_failure = Some(failure.reason());
                ctx.refused_key = key.map(|k| auth::refused_key(k, failure));
                GatewayError::Unauthorized(failure.message().to_string())
            };
            let key = auth::key_from_headers(&session.req_header().headers)
                .map_err(|failure| refuse(ctx, failure, None))?;
            let (identity, _) = access
                .authenticate(&key, auth::unix_now())
                .map_err(|failure| refuse(ctx, failure, Some(&key)))?;
            ctx.identity = Some(identity);
        }

        let body = match kind.body() {
            BodyMode::None => {
                // Whatever the framing says (an HTTP/2 stream may carry DATA frames with no
                // Content-Length at all), the body is read: a byte of it is refused, and an empty
                // one (a lone empty DATA frame) is no body. Nothing is ever forwarded.
                let no_body =
                    || GatewayError::BadRequest(format!("{} takes no request body", kind.name()));
                if framing.promises_bytes() {
                    return Err(no_body());
                }
                // Header time, not body time: a route without a body is only waiting for the
                // end of its (empty) framing, and may be reached without a key.
                let read = expect_no_body(session);
                tokio::time::timeout(self.limits.header_timeout, read)
                    .await
                    .map_err(|_| GatewayError::RequestTimeout)??
                    .then_some(())
                    .ok_or_else(no_body)?;
                None
            }
            BodyMode::Stream => None,
            BodyMode::Json => {
                refuse_encoded(session.req_header())?;
                let read = read_body(session, framing, self.limits.max_body);
                let body = tokio::time::timeout(self.limits.body_timeout, read)
                    .await
                    .map_err(|_| GatewayError::RequestTimeout)??;
                ctx.bytes_in = body.len() as u64;
                Some(body)
            }
        };

        let (refs, rewritten) = match &body {
            Some(raw) => {
                let obj = JsonObject::parse(raw).map_err(bad_request)?;
                let refs = policy::referenced(kind, Some(&obj), param.as_deref())?;
                ctx.stream = Some(
                    obj.bool("stream")
                        .map_err(bad_request)?
                        .unwrap_or(kind.streams_by_default()),
                );
                check_keep_alive(kind, &obj)?;
                ctx.model = refs.models.first().map(|m| m.name.to_string());
                // Every 400 comes before authorize: a malformed request costs no quota.
                let rewritten =
                    self.rewrite(ctx, kind, &obj, refs.models.first().map(|m| &m.name))?;
                self.authorize(ctx, &access, kind, &refs)?;
                (refs, rewritten)
            }
            None => {
                let refs = policy::referenced(kind, None, param.as_deref())?;
                ctx.model = refs.models.first().map(|m| m.name.to_string());
                self.authorize(ctx, &access, kind, &refs)?;
                (refs, None)
            }
        };
        drop(refs);
        ctx.body = rewritten.map(Bytes::from).or(body);
        ctx.access = Some(access);
        let team = ctx.identity.as_ref().map_or("none", |i| i.team.as_str());
        ctx.team_in_flight = Some(GaugeGuard::new(
            self.metrics.in_flight.with_label_values(&[team]),
        ));
        Ok(())
    }

    /// Policy, then rate limits (a request refused by policy costs no quota).
    fn authorize(
        &self,
        ctx: &mut RequestCtx,
        access: &Access,
        kind: RouteKind,
        refs: &Refs,
    ) -> Result<(), GatewayError> {
        let Some(identity) = &ctx.identity else {
            return Ok(());
        };
        let team = access.teams.get(&identity.team).ok_or_else(|| {
            GatewayError::Unauthorized(auth::AuthFailure::UnknownTeam.message().to_string())
        })?;
        policy::authorize(team, identity, kind, refs)?;
        match self.limiter.admit(team, kind.runs_model(), Instant::now()) {
            Ok(slot) => {
                ctx.slot = Some(slot);
                Ok(())
            }
            Err(refused) => {
                ctx.rate_limited = Some(refused.limit.label());
                Err(GatewayError::RateLimited {
                    message: refused.message(team),
                    retry_after_secs: refused.retry_after.as_secs_f64().ceil() as u64,
                })
            }
        }
    }

    /// The body corral forwards instead of the client's, if it changes anything.
    fn rewrite(
        &self,
        ctx: &mut RequestCtx,
        kind: RouteKind,
        obj: &JsonObject,
        model: Option<&ModelName>,
    ) -> Result<Option<Vec<u8>>, GatewayError> {
        // Field name → new JSON text.
        let mut changes: Vec<(&str, Option<String>)> = Vec::new();
        // No client may unload or shorten a pinned model (only the native routes carry keep_alive).
        if let (true, Some(pinned)) = (
            native_keep_alive(kind),
            model.and_then(|m| self.pins.keep_alive_for(m)),
        ) {
            let pinned = pinned.to_string();
            if obj.get("keep_alive").map(|v| v.get()) != Some(pinned.as_str()) {
                changes.push(("keep_alive", Some(pinned)));
            }
        }
        // Usage on /v1 streams is only sent when asked for: ask, and take it out again.
        if matches!(kind, RouteKind::ChatCompletions | RouteKind::Completions)
            && ctx.stream == Some(true)
        {
            let options = obj.object("stream_options").map_err(bad_request)?;
            let asked = options
                .as_ref()
                .map(|o| o.bool("include_usage"))
                .transpose()
                .map_err(bad_request)?
                .flatten();
            if asked != Some(true) {
                // The client's other options stay as sent; `include_usage` replaces whichever
                // spelling of it Go would read (`Include_Usage`, `include_uſage`).
                let set = [("include_usage", Some("true"))];
                let merged = match &options {
                    Some(o) => String::from_utf8(o.write_with(&set))
                        .expect("rewritten from valid UTF-8 JSON"),
                    None => r#"{"include_usage":true}"#.to_string(),
                };
                changes.push(("stream_options", Some(merged)));
                ctx.strip_usage = true;
            }
        }
        if changes.is_empty() {
            return Ok(None);
        }
        let refs: Vec<(&str, Option<&str>)> =
            changes.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        Ok(Some(obj.write_with(&refs)))
    }
}

/// Limits on what clients send, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_body: ByteSize,
    pub max_header_size: ByteSize,
    pub body_timeout: Duration,
    pub header_timeout: Duration,
}

fn route_error(e: RouteError, req: &RequestHeader, ctx: &mut RequestCtx) -> GatewayError {
    match e {
        RouteError::BadPath(why) => GatewayError::BadRequest(format!("{why}; the request was not forwarded")),
        RouteError::NotFound => GatewayError::NotFound(format!(
            "{} is not a route of this gateway (see the Ollama and OpenAI API docs for the routes it serves)",
            String::from_utf8_lossy(&req.raw_path()[..req.raw_path().len().min(200)])
        )),
        RouteError::MethodNotAllowed { allow, dialect } => {
            ctx.dialect = dialect;
            GatewayError::MethodNotAllowed { allow }
        }
    }
}

/// Refuses header blocks over the limit (431).
fn check_header_size(req: &RequestHeader, max_header_size: ByteSize) -> Result<(), GatewayError> {
    let size: usize = req.raw_path().len()
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if size as u64 > max_header_size.0 {
        return Err(GatewayError::HeadersTooLarge);
    }
    Ok(())
}

/// Routes whose bodies carry Ollama's `keep_alive`.
fn native_keep_alive(kind: RouteKind) -> bool {
    matches!(
        kind,
        RouteKind::Generate | RouteKind::Chat | RouteKind::Embed | RouteKind::Embeddings
    )
}

/// A `keep_alive` Ollama would refuse is refused here, with Ollama's message.
fn check_keep_alive(kind: RouteKind, obj: &JsonObject) -> Result<(), GatewayError> {
    let Some(raw) = obj.get("keep_alive").filter(|_| native_keep_alive(kind)) else {
        return Ok(());
    };
    let value: Value =
        serde_json::from_str(raw.get()).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    KeepAlive::from_json(Some(&value))
        .map(|_| ())
        .map_err(|e| GatewayError::BadRequest(format!("\"keep_alive\": {e}")))
}

fn bad_request(e: BodyError) -> GatewayError {
    GatewayError::BadRequest(e.0)
}

/// What the client is told when its body could not be read.
fn body_read_error(e: &pingora::Error) -> GatewayError {
    if *e.etype() == ErrorType::ReadTimedout {
        GatewayError::RequestTimeout
    } else {
        GatewayError::BadRequest("the request body could not be read".into())
    }
}

/// Reads what the request's framing carries. `Ok(true)`: nothing (no body, or an empty one).
async fn expect_no_body(session: &mut Session) -> Result<bool, GatewayError> {
    loop {
        match session.read_request_body().await {
            Ok(None) => return Ok(true),
            Ok(Some(chunk)) if chunk.is_empty() => {}
            Ok(Some(_)) => return Ok(false),
            Err(e) => return Err(body_read_error(&e)),
        }
    }
}

/// A compressed body cannot be inspected, so it is refused rather than waved through.
fn refuse_encoded(req: &RequestHeader) -> Result<(), GatewayError> {
    match req.headers.get(http::header::CONTENT_ENCODING) {
        Some(enc) if !enc.as_bytes().eq_ignore_ascii_case(b"identity") => Err(GatewayError::UnsupportedMediaType(format!(
            "request bodies with Content-Encoding `{}` are not accepted; send the JSON uncompressed",
            String::from_utf8_lossy(enc.as_bytes())
        ))),
        _ => Ok(()),
    }
}

/// Reads the whole request body, refusing it as soon as it passes `limit`.
async fn read_body(
    session: &mut Session,
    framing: Framing,
    limit: ByteSize,
) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::PayloadTooLarge { limit };
    if matches!(framing, Framing::Length(n) if n > limit.0) {
        return Err(too_large);
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .write_continue_response()
            .await
            .map_err(|_| GatewayError::BadRequest("client went away".into()))?;
    }
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if (body.len() + chunk.len()) as u64 > limit.0 {
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(body_read_error(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/api/chat", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn oversized_headers_are_431() {
        let big = "x".repeat(2000);
        assert_eq!(
            check_header_size(&req(&[("x-big", &big)]), ByteSize(1024))
                .unwrap_err()
                .status(),
            431
        );
    }

    #[test]
    fn keep_alive_of_the_wrong_type_is_refused_like_ollama_would() {
        let obj = |s: &'static str| JsonObject::parse(s.as_bytes()).unwrap();
        assert!(check_keep_alive(RouteKind::Chat, &obj(r#"{"keep_alive":"5m"}"#)).is_ok());
        assert!(check_keep_alive(RouteKind::Chat, &obj(r#"{"keep_alive":-1}"#)).is_ok());
        let e = check_keep_alive(RouteKind::Chat, &obj(r#"{"keep_alive":true}"#)).unwrap_err();
        assert!(e.to_string().contains("Unsupported type: 'bool'"), "{e}");
        let e = check_keep_alive(RouteKind::Generate, &obj(r#"{"keep_alive":"-1"}"#)).unwrap_err();
        assert!(e.to_string().contains("missing unit"), "{e}");
        // /v1 bodies have no keep_alive field; Ollama ignores it there.
        assert!(
            check_keep_alive(RouteKind::ChatCompletions, &obj(r#"{"keep_alive":true}"#)).is_ok()
        );
    }
}
