//! The request path: one pingora `ProxyHttp` implementation whose hooks stay thin and delegate.
//! Uses `access`, `upstream`, `usage`, `api`, `telemetry`, `config`, `ollama`; never `runtime`.
//!
//! `admit` (route, key, body, policy, body rewrites), `nodes` (which node each attempt goes to,
//! failover, the merged model lists of a pool), `headers` (hygiene toward Ollama),
//! `response_body` (usage metering, model-list filtering), `error_response` (errors corral
//! answers itself, before forwarding or when Ollama fails), `report` (access log and metrics).
//! `ctx` is the state one request carries through the hooks; `traffic` counts requests in
//! flight for readiness and shutdown.

mod admit;
mod cors;
mod ctx;
mod error_response;
pub mod framing;
mod headers;
mod nodes;
mod report;
mod response_body;
mod traffic;
mod wait;

pub(crate) use admit::{ClientLimits, Full};
use ctx::Failure;
pub(crate) use ctx::RequestCtx;
pub(crate) use traffic::Traffic;

use crate::access::caps::{Budget, Counter};
use crate::access::limits::Limiter;
use crate::access::AccessHandle;
use crate::api::routes::BodyMode;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::upstream::pins::Pins;
use crate::upstream::Pool;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use std::sync::Arc;
use std::time::Duration;

/// The gateway: everything the hooks need, shared by all requests.
pub(crate) struct Gateway {
    pub(crate) pool: Arc<Pool>,
    pub(crate) access: Arc<AccessHandle>,
    pub(crate) limits: ClientLimits,
    pub(crate) limiter: Arc<Limiter>,
    /// The team limits in the shared store (`[state]`), when one is configured.
    pub(crate) shared: Option<Arc<crate::access::shared::SharedLimits>>,
    /// Requests in flight (`server.max_requests`, `server.max_requests_per_ip`).
    pub(crate) requests: Arc<Counter>,
    /// Request bodies held in memory (`server.max_body_memory`).
    pub(crate) body_memory: Arc<Budget>,
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) access_log: Arc<AccessLog>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pins: Arc<Pins>,
    /// Slots on the nodes and the line for them.
    pub(crate) scheduler: Arc<crate::upstream::queue::Scheduler>,
    /// `[server.cors]`: browser pages from these origins may call corral.
    pub(crate) cors: Option<Arc<crate::api::cors::Cors>>,
}

/// `upstream.request_timeout` passed: the error the patched pingora-proxy gives when it ends an
/// exchange with Ollama at the cap (`HttpProxy::upstream_request_timeout`).
const REQUEST_TIMEOUT: ErrorType = ErrorType::Custom("request_timeout");

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.traffic.enter())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let req = session.req_header();
        ctx.request_id =
            headers::request_id(req.headers.get(headers::X_REQUEST_ID).map(|v| v.as_bytes()));
        ctx.dialect = crate::api::routes::dialect_of_path(req.raw_path());
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if let Some(cors) = &self.cors {
            let origin = req.headers.get(http::header::ORIGIN);
            ctx.cors_origin = origin
                .filter(|o| cors.allows(Some(o.as_bytes())).is_some())
                .cloned();
            if crate::api::cors::is_preflight(&req.method, &req.headers) {
                let cors = cors.clone();
                self.preflight(session, ctx, &cors).await;
                return Ok(true);
            }
        }
        if let Err(e) = self.admit(session, ctx).await {
            self.respond(session, ctx, &e).await;
            return Ok(true);
        }
        if self.answer_merged(session, ctx).await {
            return Ok(true);
        }
        match self.take_slot(session, ctx).await {
            Ok(()) => Ok(false),
            Err(Some(e)) => {
                self.respond(session, ctx, &e).await;
                Ok(true)
            }
            // The client left while waiting: nothing to answer.
            Err(None) => Ok(true),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let node = self.next_node(ctx)?;
        match node.upstream.peer() {
            Some(peer) => Ok(Box::new(peer)),
            None => {
                // No address: like a connection that cannot be made, another node may take it.
                let mut e = Error::explain(
                    nodes::UNRESOLVED,
                    "the upstream host name has not resolved yet",
                );
                e.set_retry(self.attempt_failed(ctx, false));
                Err(e)
            }
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent: another node that has the model can take the request.
        if self.attempt_failed(ctx, false) {
            e.set_retry(true);
        }
        e
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
        let host = ctx
            .nodes
            .node()
            .map(|n| n.upstream.host_header.clone())
            .unwrap_or_else(|| http::HeaderValue::from_static(""));
        headers::prepare_upstream(
            upstream_request,
            host,
            ctx.client_ip,
            &ctx.request_id,
            client_tls,
        )?;
        if let Some(m) = &ctx.admission.route {
            // Exactly the matched path: no query string, nothing corral did not check. (The
            // raw target is compared, not the parsed one, which may differ from what is sent.)
            if upstream_request.raw_path() != m.path.as_bytes() {
                let uri = http::Uri::try_from(m.path.as_str())
                    .map_err(|_| Error::new(ErrorType::InternalError))?;
                upstream_request.set_uri(uri);
            }
        }
        // corral frames every body it holds itself, with its exact length, and sends routes that
        // take none without any framing (admission made sure they carried nothing). Only blob
        // uploads are streamed as the client framed them (see `upstream_reusable`).
        let held = match (
            &ctx.admission.body,
            ctx.admission.route.as_ref().map(|m| m.kind.body()),
        ) {
            (Some(body), _) => Some(body.bytes.len()),
            (None, Some(BodyMode::None)) => Some(0),
            _ => None,
        };
        if let Some(len) = held {
            upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
            upstream_request.remove_header(&http::header::CONTENT_LENGTH);
            if len > 0 {
                upstream_request
                    .insert_header(http::header::CONTENT_LENGTH, http::HeaderValue::from(len))?;
                // The whole body is held: it is sent in the same write as the header
                // (patched pingora-core, see its PATCHED.md).
                upstream_request
                    .extensions_mut()
                    .insert(pingora::protocols::http::v1::client::BodyFollows);
            }
        }
        Ok(())
    }

    fn upstream_reusable(&self, _session: &Session, ctx: &RequestCtx) -> bool {
        // A body streamed through keeps the client's framing, which corral does not vouch for:
        // that upstream connection is closed after the exchange, never handed to another client.
        ctx.admission
            .route
            .as_ref()
            .is_none_or(|m| m.kind.body() != BodyMode::Stream)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        match (&ctx.admission.body, body.as_ref()) {
            // The body was read before forwarding: send it now (again on a retry).
            (Some(held), None) if end_of_stream => *body = Some(held.bytes.clone()),
            (None, Some(chunk)) => ctx.outcome.bytes_in += chunk.len() as u64,
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
        let status = upstream_response.status.as_u16();
        // A node that cannot take the request (502, 503: its queue is full, it is shutting
        // down) before any byte of an answer: the next node that has the model takes it.
        if matches!(status, 502 | 503) {
            if self.attempt_failed(ctx, true) {
                let mut e = Error::explain(nodes::FAILOVER, format!("the node answered {status}"));
                e.as_up();
                e.set_retry(true);
                return Err(e);
            }
        } else {
            self.attempt_answered(ctx, status);
        }
        upstream_response.insert_header(headers::X_REQUEST_ID, ctx.request_id.as_str())?;
        self.cors_headers(ctx, upstream_response);
        // Ollama answered: the request will not be sent again, so a long conversation is not
        // kept in memory for the rest of a stream.
        ctx.admission.body = None;
        let head_only = session.req_header().method == http::Method::HEAD;
        response_body::prepare(ctx, upstream_response, head_only);
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if body.as_ref().is_some_and(|b| !b.is_empty()) {
            ctx.response
                .first_byte
                .get_or_insert_with(|| ctx.start.elapsed());
        }
        response_body::body_chunk(ctx, body, end_of_stream)?;
        if let Some(chunk) = body.as_ref() {
            ctx.outcome.bytes_out += chunk.len() as u64;
        }
        // Where the end marker is in what the client gets: once that many bytes are sent, the
        // client has the whole answer.
        if ctx.response.complete_at.is_none()
            && ctx.response.meter.as_ref().is_some_and(|m| m.complete())
        {
            ctx.response.complete_at = Some(ctx.outcome.bytes_out);
        }
        Ok(None)
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // A pooled connection Ollama has closed (it restarted, or dropped idle connections)
        // fails before any answer. corral holds the whole body, so the request can be sent again
        // on a fresh connection, POST or not. Nothing is retried once an answer has started.
        let replayable = ctx.admission.body.is_some() || session.as_mut().is_body_empty();
        if !replayable || session.response_written().is_some() {
            e.set_retry(false);
        } else if *e.etype() == nodes::FAILOVER {
            // Decided in response_filter: another node takes it.
        } else if client_reused {
            // A pooled connection the node had closed: the same node, on a fresh connection.
            e.retry.decide_reuse(true);
            ctx.nodes.next = ctx.nodes.node().cloned();
        } else if matches!(e.esource(), ErrorSource::Upstream)
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
        {
            // A fresh connection broke before the answer: the node is in trouble. (A timeout
            // is not retried elsewhere: the node may be loading the model.)
            let failover = self.attempt_failed(ctx, false);
            e.set_retry(failover);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (err, upstream_kind) = self.failure(e);
        // The body's end marker (`[DONE]`, `"done":true`, a closed document) was written to the
        // client: it has the whole answer, whatever the connection does now (a client that
        // closes as soon as it has `[DONE]`, an upstream that drops the connection instead of
        // ending the body). Nothing is appended, and the request is not a failure.
        let delivered = ctx
            .response
            .complete_at
            .is_some_and(|at| session.as_downstream().body_bytes_sent() as u64 >= at);
        if session.response_written().is_some() && delivered {
            if err.is_some() {
                // Ollama's side ended untidily: end the body properly for the client.
                let _ = session.write_response_body(None, true).await;
            }
            tracing::debug!(request_id = %ctx.request_id, error = %e, "connection ended after a complete answer");
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        ctx.outcome.upstream_fault = upstream_kind;
        let Some(err) = err else {
            ctx.outcome.failure = Some(Failure::ClientClosed);
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
            self.end_stream_with(session, ctx, &err).await;
        }
        FailToProxy {
            error_code: err.status(),
            can_reuse_downstream: false,
        }
    }

    fn request_refused(
        &self,
        session: &pingora::protocols::http::ServerSession,
        error: Option<&Error>,
        status: u16,
    ) -> Option<(ResponseHeader, Bytes)> {
        self.refused_unread(session, error, status)
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Every failure is in the access log, and upstream ones are logged above with detail.
        true
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        self.request_done(ctx);
        self.report(session, ctx);
    }
}
