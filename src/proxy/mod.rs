//! The request path: one pingora `ProxyHttp` implementation whose hooks stay thin and delegate
//! to the modules that own each concern (routes, body, headers, error, telemetry).

mod ctx;
mod headers;

pub use ctx::{BodyFormat, RequestCtx};
pub use headers::new_request_id;

use crate::access::AccessHandle;
use crate::auth;
use crate::body::JsonObject;
use crate::config::{ByteSize, HumanDuration};
use crate::error::GatewayError;
use crate::lifecycle::Lifecycle;
use crate::policy;
use crate::routes::{self, BodyMode, Dialect, RouteClass, RouteError, RouteKind};
use crate::telemetry::access_log::{self, AccessLog, AccessRecord};
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use std::sync::Arc;
use std::time::Duration;

/// The gateway: everything the hooks need, shared by all requests.
pub struct Gateway {
    pub upstream: Arc<Upstream>,
    pub access: Arc<AccessHandle>,
    pub max_body: ByteSize,
    pub lifecycle: Arc<Lifecycle>,
    pub access_log: Arc<AccessLog>,
}

const REQUEST_TIMEOUT: ErrorType = ErrorType::Custom("request_timeout");
const UNRESOLVED: ErrorType = ErrorType::Custom("upstream_unresolved");
/// Model lists are small; one this large is not a model list.
const MAX_LIST_BODY: usize = 16 << 20;

impl Gateway {
    /// Decides whether the request goes upstream: route, then body. `Err` is answered by corral.
    async fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), GatewayError> {
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

        // Who is calling (before reading any body: a 401 costs nothing).
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

        let body = match kind.body() {
            BodyMode::None => {
                if declared_length(session.req_header()).is_some_and(|n| n > 0)
                    || is_chunked(session.req_header())
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
                if let Some(enc) = session
                    .req_header()
                    .headers
                    .get(http::header::CONTENT_ENCODING)
                {
                    if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
                        return Err(GatewayError::UnsupportedMediaType(format!(
                            "request bodies with Content-Encoding `{}` are not accepted; send the JSON uncompressed",
                            String::from_utf8_lossy(enc.as_bytes())
                        )));
                    }
                }
                let body = read_body(session, self.max_body).await?;
                ctx.bytes_in = body.len() as u64;
                Some(body)
            }
        };
        let obj = body
            .as_deref()
            .map(JsonObject::parse)
            .transpose()
            .map_err(|e| GatewayError::BadRequest(e.0))?;
        let models = policy::referenced_models(kind, obj.as_ref(), param.as_deref())?;
        ctx.model = models.first().map(|m| m.name.to_string());
        if let Some(obj) = &obj {
            let stream = obj
                .bool("stream")
                .map_err(|e| GatewayError::BadRequest(e.0))?;
            ctx.stream = Some(stream.unwrap_or(kind.streams_by_default()));
        }

        // What the caller may do.
        if let Some(identity) = &ctx.identity {
            let team = access
                .teams
                .get(&identity.team)
                .ok_or(GatewayError::Unauthorized(
                    auth::AuthFailure::UnknownTeam.message().to_string(),
                ))?;
            policy::authorize(team, identity, kind, &models)?;
        }
        ctx.body = body;
        ctx.access = Some(access);
        Ok(())
    }

    /// Writes an error response in the caller's dialect (if nothing was sent yet).
    async fn respond(&self, session: &mut Session, ctx: &mut RequestCtx, err: &GatewayError) {
        ctx.error = Some(err.label());
        let rendered = err.render(ctx.dialect);
        let Ok(mut resp) = ResponseHeader::build(rendered.status, Some(rendered.headers.len() + 1))
        else {
            return;
        };
        for (k, v) in &rendered.headers {
            let _ = resp.insert_header(*k, v.as_str());
        }
        let _ = resp.insert_header("x-request-id", ctx.request_id.as_str());
        // The request body may be unread: don't reuse the connection.
        session.set_keepalive(None);
        let head_only = session.req_header().method == http::Method::HEAD;
        if session
            .write_response_header(Box::new(resp), head_only)
            .await
            .is_ok()
            && !head_only
        {
            let _ = session.write_response_body(Some(rendered.body), true).await;
        }
    }

    /// Maps a pingora failure to what the client is told (`None`: the client is gone).
    fn failure(&self, e: &Error) -> Option<GatewayError> {
        let etype = e.etype();
        if *etype == REQUEST_TIMEOUT {
            return Some(GatewayError::RequestTooLong(HumanDuration(
                self.upstream.request_timeout,
            )));
        }
        match e.esource() {
            ErrorSource::Upstream => Some(match etype {
                ErrorType::ConnectTimedout => {
                    GatewayError::UpstreamTimeout(HumanDuration(self.upstream.connect_timeout))
                }
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    GatewayError::UpstreamTimeout(HumanDuration(
                        self.upstream
                            .read_timeout
                            .min(self.upstream.request_timeout),
                    ))
                }
                _ => GatewayError::UpstreamUnavailable,
            }),
            ErrorSource::Downstream => match etype {
                ErrorType::ReadTimedout => Some(GatewayError::RequestTimeout),
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => None,
                _ => Some(GatewayError::BadRequest("malformed request".into())),
            },
            ErrorSource::Internal | ErrorSource::Unset if *etype == UNRESOLVED => {
                Some(GatewayError::UpstreamUnavailable)
            }
            ErrorSource::Internal | ErrorSource::Unset => Some(GatewayError::Internal),
        }
    }
}

/// Collects a model list whole and, at its end, sends only the models the team may use.
fn filter_model_list(
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    ctx: &mut RequestCtx,
) -> Result<()> {
    let Some(buf) = ctx.list_body.as_mut() else {
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
    let (Some(kind), Some(identity), Some(access)) = (
        ctx.route.as_ref().map(|m| m.kind),
        &ctx.identity,
        &ctx.access,
    ) else {
        return Ok(());
    };
    let filtered = access
        .teams
        .get(&identity.team)
        .and_then(|team| policy::filter_list(kind, team, identity, buf));
    *body = Some(Bytes::from(filtered.unwrap_or_else(|| {
        // Not the JSON Ollama sends: withhold it rather than pass an unfiltered list.
        tracing::warn!(request_id = %ctx.request_id, "unexpected model list from upstream; sent an empty one");
        let empty = if kind == RouteKind::Models { r#"{"object":"list","data":[]}"# } else { r#"{"models":[]}"# };
        empty.as_bytes().to_vec()
    })));
    ctx.list_body = None;
    Ok(())
}

fn declared_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn is_chunked(req: &RequestHeader) -> bool {
    req.headers.get(http::header::TRANSFER_ENCODING).is_some()
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

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.lifecycle.enter())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id = headers::request_id(req.headers.get("x-request-id").map(|v| v.as_bytes()));
        ctx.dialect = ctx::dialect_of_path(req.raw_path());
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        match self.admit(session, ctx).await {
            Ok(()) => Ok(false),
            Err(e) => {
                self.respond(session, ctx, &e).await;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        match self.upstream.peer() {
            Some(peer) => Ok(Box::new(peer)),
            None => Error::e_explain(UNRESOLVED, "the upstream host name has not resolved yet"),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client_tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        headers::prepare_upstream(
            upstream_request,
            &self.upstream.url.authority(),
            ctx.client_ip,
            &ctx.request_id,
            client_tls,
        )?;
        if let Some(m) = &ctx.route {
            // Exactly the matched path: no query string, nothing corral did not check.
            upstream_request.set_uri(
                http::Uri::try_from(m.path.as_str())
                    .map_err(|_| Error::new(ErrorType::InternalError))?,
            );
        }
        if let Some(body) = &ctx.body {
            upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
            upstream_request.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        match (&ctx.body, body.as_ref()) {
            // The body was read before forwarding: send it now (again on a retry).
            (Some(held), None) if end_of_stream => *body = Some(held.clone()),
            (None, Some(chunk)) => ctx.bytes_in += chunk.len() as u64,
            _ => {}
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.response_format = upstream_response
            .headers
            .get(http::header::CONTENT_TYPE)
            .map_or(BodyFormat::Other, |ct| {
                BodyFormat::from_content_type(ct.as_bytes())
            });
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())?;
        let lists_models = ctx
            .route
            .as_ref()
            .is_some_and(|m| matches!(m.kind, RouteKind::Tags | RouteKind::Ps | RouteKind::Models));
        if lists_models
            && ctx.identity.is_some()
            && upstream_response.status == 200
            && session.req_header().method != http::Method::HEAD
        {
            // The list is cut down for the team, so its length changes.
            upstream_response.remove_header(&http::header::CONTENT_LENGTH);
            ctx.list_body = Some(BytesMut::new());
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if ctx.list_body.is_some() {
            filter_model_list(body, end_of_stream, ctx)?;
        }
        if let Some(chunk) = body.as_ref().filter(|b| !b.is_empty()) {
            ctx.first_byte.get_or_insert_with(|| ctx.start.elapsed());
            ctx.bytes_out += chunk.len() as u64;
        }
        if ctx.start.elapsed() > self.upstream.request_timeout {
            return Error::e_explain(REQUEST_TIMEOUT, "upstream.request_timeout exceeded");
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let Some(err) = self.failure(e) else {
            ctx.error = Some("client_closed");
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if matches!(e.esource(), ErrorSource::Upstream) || *e.etype() == REQUEST_TIMEOUT {
            tracing::warn!(request_id = %ctx.request_id, error = %e, "upstream request failed");
        }
        if session.response_written().is_none() {
            self.respond(session, ctx, &err).await;
        } else {
            // Mid-stream: the status is gone; end the stream with an in-band error the client's
            // library raises (Ollama does the same), then close.
            ctx.error = Some(err.label());
            let frame = match (ctx.response_format, ctx.dialect) {
                (BodyFormat::Ndjson, _) => Some(format!("{}\n", err.json(Dialect::Ollama))),
                (BodyFormat::Sse, Dialect::Anthropic) => Some(format!(
                    "event: error\ndata: {}\n\n",
                    err.json(Dialect::Anthropic)
                )),
                (BodyFormat::Sse, _) => Some(format!("data: {}\n\n", err.json(Dialect::OpenAi))),
                (BodyFormat::Other, _) => None,
            };
            if let Some(frame) = frame {
                let _ = session
                    .write_response_body(Some(Bytes::from(frame)), true)
                    .await;
            }
        }
        FailToProxy {
            error_code: err.status(),
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Every failure is in the access log, and upstream ones are logged above with detail.
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let req = session.req_header();
        let raw = req.raw_path();
        let path = String::from_utf8_lossy(
            &raw[..raw
                .iter()
                .position(|&b| b == b'?')
                .unwrap_or(raw.len())
                .min(512)],
        );
        let status = session
            .response_written()
            .map_or(499, |r| r.status.as_u16());
        let record = AccessRecord {
            ts: access_log::timestamp(),
            request_id: &ctx.request_id,
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
            method: req.method.as_str(),
            path: &path,
            route: ctx.route.as_ref().map(|m| m.kind.name()),
            team: ctx.identity.as_ref().map(|i| i.team.as_str()),
            key_id: ctx.identity.as_ref().map(|i| i.key_id.as_str()),
            model: ctx.model.as_deref(),
            stream: ctx.stream,
            status,
            duration_ms: ctx.start.elapsed().as_millis() as u64,
            ttft_ms: ctx.first_byte.map(|d| d.as_millis() as u64),
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            error: ctx.error,
            ..Default::default()
        };
        self.access_log.write(&record);
    }
}
