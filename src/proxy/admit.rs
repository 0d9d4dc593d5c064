//! Admission: everything decided before Ollama sees a byte. Framing and header limits, route, key,
//! body, policy, rate limits, and the rewrites corral makes to the body (pinned `keep_alive`, usage
//! on `/v1` streams).

use super::ctx::{Caller, GaugeGuard, HeldBody};
use super::framing::{self, Framing};
use super::{Gateway, RequestCtx};
use crate::access::auth::{self, AuthFailure};
use crate::access::caps::{Over, Share};
use crate::access::limits::Slot;
use crate::access::policy::{self, Team};
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
use std::time::Duration;

impl Gateway {
    /// Decides whether the request goes upstream. `Err` is answered by corral, and a request
    /// refused here for what it asks costs its team nothing (one that wasted the gateway's time,
    /// a body too slow or cut off, keeps its charge: see `forfeit`).
    pub(super) async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let admitted = self.decide(session, ctx).await;
        if admitted.is_err() {
            if let Some(slot) = ctx.admission.slot.take() {
                slot.refund();
            }
        }
        admitted
    }

    async fn decide(
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
        ctx.admission.route = Some(matched);

        // A place among the requests in flight before anything is read or waited for: a flood
        // of requests (HTTP/2 streams cost a client almost nothing to open) is refused at once.
        let place = self.requests.admit(ctx.client_ip).map_err(|over| {
            self.full(match over {
                Over::Total => Full::Requests,
                Over::PerClient => Full::RequestsPerIp,
            })
        })?;
        ctx.admission.place = Some(place);

        // Who is calling, before reading any body: a 401 costs nothing.
        let access = self.access.current();
        if kind.class() != RouteClass::Public {
            let refuse = |ctx: &mut RequestCtx, failure: AuthFailure, key: Option<&str>| {
                ctx.outcome.auth_failure = Some(failure);
                ctx.outcome.refused_key = key.map(|k| auth::refused_key(k, failure));
                failure.error()
            };
            let key = auth::key_from_headers(&session.req_header().headers)
                .map_err(|failure| refuse(ctx, failure, None))?;
            let (identity, team) = access
                .identify(&key, crate::clock::unix_now(), &self.metrics)
                .await
                .map_err(|failure| refuse(ctx, failure, Some(&key)))?;
            // Revoked through the shared store (`corral keys revoke` on any replica).
            if self
                .shared
                .as_ref()
                .is_some_and(|s| s.is_revoked(&identity.key_id))
            {
                return Err(refuse(ctx, AuthFailure::Revoked, Some(&key)));
            }
            // The team's limits, before its body is read: a team over them makes corral hold
            // nothing. The charge is refunded if the request is refused below.
            let slot = self.limit(ctx, &team, kind).await;
            ctx.admission.caller = Some(Caller { identity, team });
            ctx.admission.slot = Some(slot?);
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
                let empty = tokio::time::timeout(self.limits.header_timeout, read)
                    .await
                    .map_err(|_| GatewayError::RequestTimeout)
                    .and_then(|read| read)
                    .map_err(|e| forfeit(ctx, e))?;
                if !empty {
                    return Err(no_body());
                }
                None
            }
            BodyMode::Stream => None,
            BodyMode::Json => {
                refuse_encoded(session.req_header())?;
                let mut memory = self.body_memory.share(ctx.team_label());
                let read = read_body(session, framing, self.limits.max_body, &mut memory);
                let bytes = match tokio::time::timeout(self.limits.body_timeout, read).await {
                    Ok(Ok(bytes)) => bytes,
                    // Too large: refused for what it is, like a bad body.
                    Ok(Err(ReadError::Refused(e @ GatewayError::PayloadTooLarge { .. }))) => {
                        return Err(e)
                    }
                    Ok(Err(ReadError::Refused(e))) => return Err(forfeit(ctx, e)),
                    Ok(Err(ReadError::NoMemory)) => {
                        return Err(forfeit(ctx, self.full(Full::BodyMemory)))
                    }
                    Err(_) => return Err(forfeit(ctx, GatewayError::RequestTimeout)),
                };
                ctx.outcome.bytes_in = bytes.len() as u64;
                Some(HeldBody { bytes, memory })
            }
        };

        let (refs, rewritten) = match &body {
            Some(held) => {
                let obj = JsonObject::parse(&held.bytes).map_err(bad_request)?;
                let refs = policy::referenced(kind, Some(&obj), param.as_deref())?;
                ctx.admission.stream = Some(
                    obj.bool("stream")
                        .map_err(bad_request)?
                        .unwrap_or(kind.streams_by_default()),
                );
                check_keep_alive(kind, &obj)?;
                ctx.admission.model = refs.models.first().map(|m| m.name.to_string());
                let rewritten =
                    self.rewrite(ctx, kind, &obj, refs.models.first().map(|m| &m.name))?;
                (refs, rewritten)
            }
            None => {
                let refs = policy::referenced(kind, None, param.as_deref())?;
                ctx.admission.model = refs.models.first().map(|m| m.name.to_string());
                (refs, None)
            }
        };
        if let Some(caller) = &ctx.admission.caller {
            policy::authorize(&caller.team, &caller.identity, kind, &refs)?;
        }
        drop(refs);
        self.place(session.req_header(), ctx)?;
        ctx.admission.body = match (body, rewritten) {
            (Some(mut held), Some(new)) => {
                held.memory.set(new.len() as u64);
                held.bytes = Bytes::from(new);
                Some(held)
            }
            (body, _) => body,
        };
        ctx.admission.team_in_flight = Some(GaugeGuard::new(
            self.metrics
                .in_flight
                .with_label_values(&[ctx.team_label()]),
        ));
        Ok(())
    }

    /// The team's rate and concurrency limits.
    async fn limit(
        &self,
        ctx: &mut RequestCtx,
        team: &Team,
        kind: RouteKind,
    ) -> Result<Slot, GatewayError> {
        use crate::access::shared::Refusal;
        let admitted = match &self.shared {
            Some(shared) => shared.admit(team, kind.runs_model()).await,
            None => self
                .limiter
                .admit(team, kind.runs_model())
                .map_err(Refusal::Limited),
        };
        admitted.map_err(|refusal| match refusal {
            Refusal::Limited(refused) => {
                ctx.outcome.rate_limited = Some(refused.limit);
                GatewayError::RateLimited {
                    message: refused.message(team),
                    retry_after_secs: refused.retry_after.as_secs_f64().ceil() as u64,
                }
            }
            Refusal::StoreDown => self.full(Full::StateStore),
        })
    }

    /// The gateway holds as much as it may: 503, counted by reason.
    pub(super) fn full(&self, full: Full) -> GatewayError {
        self.metrics
            .requests_refused
            .with_label_values(&[full.label()])
            .inc();
        GatewayError::Overloaded {
            message: full.message().to_string(),
            retry_after_secs: 1,
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
            && ctx.admission.stream == Some(true)
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
                    // Rewritten from valid UTF-8 JSON: nothing is lost.
                    Some(o) => String::from_utf8_lossy(&o.write_with(&set)).into_owned(),
                    None => r#"{"include_usage":true}"#.to_string(),
                };
                changes.push(("stream_options", Some(merged)));
                ctx.admission.strip_usage = true;
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
pub(crate) struct ClientLimits {
    pub(crate) max_body: ByteSize,
    pub(crate) max_header_size: ByteSize,
    pub(crate) body_timeout: Duration,
    pub(crate) header_timeout: Duration,
}

/// What the gateway is full of (`corral_requests_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Requests,
    RequestsPerIp,
    BodyMemory,
    /// The shared state store failed and `state.on_store_error = "deny"`.
    StateStore,
}

impl Full {
    pub(crate) const ALL: [Full; 4] = [
        Full::Requests,
        Full::RequestsPerIp,
        Full::BodyMemory,
        Full::StateStore,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Full::Requests => "max_requests",
            Full::RequestsPerIp => "max_requests_per_ip",
            Full::BodyMemory => "body_memory",
            Full::StateStore => "state_store",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Full::Requests => {
                "the gateway is serving as many requests as it may at once; try again shortly"
            }
            Full::RequestsPerIp => {
                "too many requests from your address are in flight at once; try again when one finishes"
            }
            Full::BodyMemory => {
                "the gateway holds as many request bodies as it may at once; try again shortly"
            }
            Full::StateStore => {
                "the gateway cannot check its shared limits right now; try again shortly"
            }
        }
    }
}

pub(super) fn route_error(
    e: RouteError,
    req: &RequestHeader,
    ctx: &mut RequestCtx,
) -> GatewayError {
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
pub(super) fn check_header_size(
    req: &RequestHeader,
    max_header_size: ByteSize,
) -> Result<(), GatewayError> {
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

/// The request is refused for the gateway's time it took (a body too slow, cut off, or one the
/// full gateway could not hold): its team keeps the charge, so retrying that costs quota.
fn forfeit(ctx: &mut RequestCtx, e: GatewayError) -> GatewayError {
    drop(ctx.admission.slot.take());
    e
}

/// Why a body was not read.
enum ReadError {
    /// The body memory budget has no room for it.
    NoMemory,
    Refused(GatewayError),
}

impl From<GatewayError> for ReadError {
    fn from(e: GatewayError) -> ReadError {
        ReadError::Refused(e)
    }
}

/// Reads the whole request body, refusing it as soon as it passes `limit`. Every byte of buffer
/// is taken from `memory` before it is allocated.
async fn read_body(
    session: &mut Session,
    framing: Framing,
    limit: ByteSize,
    memory: &mut Share,
) -> Result<Bytes, ReadError> {
    let too_large = GatewayError::PayloadTooLarge { limit };
    // The most the buffer may need: the declared length, else the limit. Memory is taken as
    // bytes arrive, never for a length only promised (a client that declares 32 MiB and sends
    // nothing holds nothing).
    let most = match framing {
        Framing::Length(n) if n > limit.0 => return Err(too_large.into()),
        Framing::Length(n) => n,
        _ => limit.0,
    };
    let mut body = BytesMut::new();
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
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                let need = (body.len() + chunk.len()) as u64;
                if need > limit.0 {
                    return Err(too_large.into());
                }
                if need > body.capacity() as u64 {
                    // The buffer doubles (up to what the body may need), and the budget is
                    // charged what is allocated, before it is.
                    let target = need.max(body.capacity() as u64 * 2).min(most.max(need));
                    if !memory.grow(target.saturating_sub(memory.bytes())) {
                        return Err(ReadError::NoMemory);
                    }
                    body.reserve((target - body.len() as u64) as usize);
                    memory.set(memory.bytes().max(body.capacity() as u64));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(body_read_error(&e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::proxy::framing::test_request as req;

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
