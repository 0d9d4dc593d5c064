//! What corral answers itself: refusals before forwarding, and failures of the upstream, in the
//! caller's dialect; a failure mid-stream ends the stream with an in-band error.

use super::ctx::{Failure, UpstreamFault};
use super::nodes::UNRESOLVED;
use super::{Gateway, RequestCtx, REQUEST_TIMEOUT};
use crate::api::error::GatewayError;
use crate::api::routes::Dialect;
use crate::config::HumanDuration;
use crate::usage::BodyFormat;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};

impl Gateway {
    /// Writes an error response in the caller's dialect.
    pub(super) async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: &GatewayError,
    ) {
        ctx.outcome.failure = Some(Failure::Answered(err.clone()));
        let rendered = err.render(ctx.dialect);
        let Ok(mut resp) = ResponseHeader::build(rendered.status, Some(rendered.headers.len() + 1))
        else {
            return;
        };
        for (k, v) in &rendered.headers {
            let _ = resp.insert_header(*k, v.as_str());
        }
        let _ = resp.insert_header("x-request-id", ctx.request_id.as_str());
        self.cors_headers(ctx, &mut resp);
        // The request body may be unread: don't reuse the connection.
        session.set_keepalive(None);
        // A full gateway does not wait on the client: the answer goes out at once, read or not.
        if !matches!(err, GatewayError::Overloaded { .. }) {
            drain_body(session).await;
        }
        let head_only = session.req_header().method == http::Method::HEAD;
        if session
            .write_response_header(Box::new(resp), head_only)
            .await
            .is_ok()
            && !head_only
        {
            let len = rendered.body.len() as u64;
            if session
                .write_response_body(Some(rendered.body), true)
                .await
                .is_ok()
            {
                ctx.outcome.bytes_out += len;
            }
        }
    }

    /// Ends a stream that broke off with an error line its client library raises (as Ollama does
    /// for its own mid-stream failures). Bodies that are not streams just end.
    pub(super) async fn end_stream_with(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: &GatewayError,
    ) {
        ctx.outcome.failure = Some(Failure::Answered(err.clone()));
        let frame = match (ctx.response.format, ctx.dialect) {
            (BodyFormat::Ndjson, _) => format!("{}\n", err.json(Dialect::Ollama)),
            (BodyFormat::Sse, Dialect::Anthropic) => {
                format!("event: error\ndata: {}\n\n", err.json(Dialect::Anthropic))
            }
            (BodyFormat::Sse, _) => format!("data: {}\n\n", err.json(Dialect::OpenAi)),
            (BodyFormat::Other, _) => return,
        };
        let len = frame.len() as u64;
        if session
            .write_response_body(Some(Bytes::from(frame)), true)
            .await
            .is_ok()
        {
            ctx.outcome.bytes_out += len;
        }
    }

    /// What the client is told about a pingora failure (`None`: the client is gone), and the
    /// fault to count in `corral_upstream_errors_total`, if Ollama is at fault.
    pub(super) fn failure(&self, e: &Error) -> (Option<GatewayError>, Option<UpstreamFault>) {
        let etype = e.etype();
        // The timeouts are the same on every node.
        let (connect_timeout, read_timeout, request_timeout) = self.pool.timeouts();
        if *etype == REQUEST_TIMEOUT {
            return (
                Some(GatewayError::RequestTooLong(HumanDuration(request_timeout))),
                Some(UpstreamFault::RequestTimeout),
            );
        }
        match e.esource() {
            ErrorSource::Upstream => {
                let read_limit = HumanDuration(read_timeout);
                let (err, kind) = match etype {
                    ErrorType::ConnectTimedout => (
                        GatewayError::UpstreamTimeout(HumanDuration(connect_timeout)),
                        UpstreamFault::ConnectTimeout,
                    ),
                    ErrorType::ReadTimedout => (
                        GatewayError::UpstreamTimeout(read_limit),
                        UpstreamFault::ReadTimeout,
                    ),
                    ErrorType::WriteTimedout => (
                        GatewayError::UpstreamTimeout(read_limit),
                        UpstreamFault::WriteTimeout,
                    ),
                    ErrorType::ConnectRefused | ErrorType::ConnectNoRoute => (
                        GatewayError::UpstreamUnavailable,
                        UpstreamFault::ConnectRefused,
                    ),
                    ErrorType::ConnectError | ErrorType::SocketError => (
                        GatewayError::UpstreamUnavailable,
                        UpstreamFault::ConnectError,
                    ),
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => (
                        GatewayError::UpstreamUnavailable,
                        UpstreamFault::ConnectionLost,
                    ),
                    _ => (GatewayError::UpstreamUnavailable, UpstreamFault::Other),
                };
                (Some(err), Some(kind))
            }
            ErrorSource::Downstream => match etype {
                ErrorType::ReadTimedout => (Some(GatewayError::RequestTimeout), None),
                // An HTTP/2 client that resets its stream has left, like a closed connection.
                ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed
                | ErrorType::H2Error => (None, None),
                _ => (
                    Some(GatewayError::BadRequest("malformed request".into())),
                    None,
                ),
            },
            ErrorSource::Internal | ErrorSource::Unset if *etype == UNRESOLVED => (
                Some(GatewayError::UpstreamUnavailable),
                Some(UpstreamFault::Unresolved),
            ),
            ErrorSource::Internal | ErrorSource::Unset => (Some(GatewayError::Internal), None),
        }
    }
}

/// A client still sending its body when the refusal comes can lose the answer: HTTP/2 clients
/// (curl, Node) drop an answer whose stream is reset, and over HTTP/1.1 closing a connection
/// with unread bytes resets it, which can destroy the answer before the client reads it. A small
/// body is read and thrown away first (at most 1 MiB within a second); a larger or slower one
/// still gets the reset.
async fn drain_body(session: &mut Session) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut budget: usize = 1 << 20;
    while !session.as_downstream_mut().is_body_done() {
        match tokio::time::timeout_at(deadline, session.as_downstream_mut().read_request_body())
            .await
        {
            Ok(Ok(Some(chunk))) if chunk.len() <= budget => budget -= chunk.len(),
            _ => return,
        }
    }
}
