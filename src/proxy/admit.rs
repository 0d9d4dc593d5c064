//! Admission: everything decided before Ollama sees a byte. Route, key, body, policy, and the
//! rewrites corral makes to the body (asking for usage on `/v1` streams).

use super::{ctx::GaugeGuard, Gateway, RequestCtx};
use crate::auth;
use crate::body::JsonObject;
use crate::config::ByteSize;
use crate::error::GatewayError;
use crate::ollama::ModelName;
use crate::policy;
use crate::routes::{self, BodyMode, RouteClass, RouteError, RouteKind};
use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::ErrorType;
use serde_json::Value;

impl Gateway {
    /// Decides whether the request goes upstream. `Err` is answered by corral.
    pub(super) async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        let req = session.req_header();
        let matched = routes::classify(&req.method, req.raw_path()).map_err(|e| match e {
            RouteError::BadPath(why) => GatewayError::BadRequest(format!("{why}; the request was not forwarded")),
            RouteError::NotFound => GatewayError::NotFound(format!(
                "{} is not a route of this gateway (see the Ollama and OpenAI API docs for the routes it serves)",
                String::from_utf8_lossy(&req.raw_path()[..req.raw_path().len().min(200)])
            )),
            RouteError::MethodNotAllowed { allow, dialect } => {
                ctx.dialect = dialect;
                GatewayError::MethodNotAllowed { allow }
            }
        })?;
        ctx.dialect = matched.kind.dialect();
        let kind = matched.kind;
        let param = matched.param.clone();
        ctx.route = Some(matched);

        // Who is calling, before reading any body: a 401 costs nothing.
        let access = self.access.current();
        if kind.class() != RouteClass::Public {
            let identity = auth::key_from_headers(&session.req_header().headers)
                .and_then(|key| {
                    access
                        .authenticate(&key, auth::unix_now())
                        .map(|(id, _)| id)
                })
                .map_err(|failure| {
                    ctx.auth_failure = Some(failure.reason());
                    GatewayError::Unauthorized(failure.message().to_string())
                })?;
            ctx.identity = Some(identity);
        }

        let mut body = match kind.body() {
            BodyMode::None => {
                let req = session.req_header();
                if declared_length(req).is_some_and(|n| n > 0)
                    || req.headers.contains_key(http::header::TRANSFER_ENCODING)
                {
                    return Err(GatewayError::BadRequest(format!(
                        "{} takes no request body",
                        kind.name()
                    )));
                }
                None
            }
            BodyMode::Stream => None,
            BodyMode::Json => {
                refuse_encoded(session.req_header())?;
                let body = read_body(session, self.max_body).await?;
                ctx.bytes_in = body.len() as u64;
                Some(body)
            }
        };

        let mut rewritten = None;
        if let Some(raw) = &body {
            let obj = JsonObject::parse(raw).map_err(bad_request)?;
            let models = policy::referenced_models(kind, Some(&obj), param.as_deref())?;
            ctx.model = models.first().map(|m| m.name.to_string());
            ctx.stream = Some(
                obj.bool("stream")
                    .map_err(bad_request)?
                    .unwrap_or(kind.streams_by_default()),
            );
            self.authorize(ctx, &access, kind, &models)?;
            rewritten = self.rewrite(ctx, kind, &obj, models.first().map(|m| &m.name))?;
        } else {
            let models = policy::referenced_models(kind, None, param.as_deref())?;
            ctx.model = models.first().map(|m| m.name.to_string());
            self.authorize(ctx, &access, kind, &models)?;
        }
        if let Some(new) = rewritten {
            body = Some(Bytes::from(new));
        }
        ctx.body = body;
        ctx.access = Some(access);
        let team = ctx.identity.as_ref().map_or("none", |i| i.team.as_str());
        ctx.team_in_flight = Some(GaugeGuard::new(
            self.metrics.in_flight.with_label_values(&[team]),
        ));
        Ok(())
    }

    fn authorize(
        &self,
        ctx: &RequestCtx,
        access: &crate::access::Access,
        kind: RouteKind,
        models: &[policy::ModelRef],
    ) -> Result<(), GatewayError> {
        let Some(identity) = &ctx.identity else {
            return Ok(());
        };
        let team = access.teams.get(&identity.team).ok_or_else(|| {
            GatewayError::Unauthorized(auth::AuthFailure::UnknownTeam.message().to_string())
        })?;
        policy::authorize(team, identity, kind, models)
    }

    /// The body corral forwards instead of the client's, if it changes anything.
    fn rewrite(
        &self,
        ctx: &mut RequestCtx,
        kind: RouteKind,
        obj: &JsonObject,
        model: Option<&ModelName>,
    ) -> Result<Option<Vec<u8>>, GatewayError> {
        let mut changes: Vec<(&str, Option<Value>)> = Vec::new();
        // No client may unload or shorten a pinned model (only the native routes carry keep_alive).
        let native = matches!(
            kind,
            RouteKind::Generate | RouteKind::Chat | RouteKind::Embed | RouteKind::Embeddings
        );
        if let (true, Some(pinned)) = (native, model.and_then(|m| self.pins.keep_alive_for(m))) {
            if obj.get("keep_alive").map(|v| v.get()) != Some(pinned.to_string().as_str()) {
                changes.push(("keep_alive", Some(pinned.clone())));
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
                let mut merged = match obj.get("stream_options") {
                    Some(raw) => serde_json::from_str::<serde_json::Map<String, Value>>(raw.get())
                        .unwrap_or_default(),
                    None => serde_json::Map::new(),
                };
                merged.retain(|k, _| !k.eq_ignore_ascii_case("include_usage"));
                merged.insert("include_usage".into(), Value::Bool(true));
                changes.push(("stream_options", Some(Value::Object(merged))));
                ctx.strip_usage = true;
            }
        }
        if changes.is_empty() {
            return Ok(None);
        }
        let refs: Vec<(&str, Option<&Value>)> =
            changes.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        Ok(Some(obj.write_with(&refs)))
    }
}

fn bad_request(e: crate::body::BodyError) -> GatewayError {
    GatewayError::BadRequest(e.0)
}

pub(super) fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
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
async fn read_body(session: &mut Session, limit: ByteSize) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::PayloadTooLarge { limit };
    if declared_length(session.req_header()).is_some_and(|n| n > limit.0) {
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
            Err(e) if *e.etype() == ErrorType::ReadTimedout => {
                return Err(GatewayError::RequestTimeout)
            }
            Err(_) => {
                return Err(GatewayError::BadRequest(
                    "the request body could not be read".into(),
                ))
            }
        }
    }
}
