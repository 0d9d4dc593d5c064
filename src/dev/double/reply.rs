//! Writing replies: plain, JSON and error responses, and streamed NDJSON and SSE bodies.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;

pub(super) type Body = BoxBody<Bytes, Infallible>;
pub(super) type Resp = hyper::Response<Body>;
/// What a route handler returns. `Err` is an answer given early (a refusal), so that `?` can end
/// a handler; both sides are sent as they are.
pub(super) type Answer = Result<Resp, Resp>;

pub(super) const NDJSON: &str = "application/x-ndjson";
pub(super) const SSE: &str = "text/event-stream";

fn full(status: StatusCode, content_type: Option<&'static str>, body: impl Into<Bytes>) -> Resp {
    let mut resp = hyper::Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
    }
    resp
}

pub(super) fn empty(status: StatusCode) -> Resp {
    full(status, None, Bytes::new())
}

pub(super) fn text(status: StatusCode, body: &'static str) -> Resp {
    full(status, Some("text/plain; charset=utf-8"), body)
}

pub(super) fn json_resp(status: StatusCode, v: &Value) -> Resp {
    full(
        status,
        Some("application/json; charset=utf-8"),
        v.to_string(),
    )
}

/// Ollama's native error shape.
pub(super) fn native_error(status: StatusCode, message: impl Into<String>) -> Resp {
    json_resp(status, &json!({ "error": message.into() }))
}

pub(super) fn method_not_allowed(allow: &str) -> Resp {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed");
    if let Ok(allow) = http::HeaderValue::from_str(allow) {
        resp.headers_mut().insert(http::header::ALLOW, allow);
    }
    resp
}

/// One NDJSON line.
pub(super) fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// One SSE `data:` frame.
pub(super) fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// One SSE frame with an `event:` name.
pub(super) fn sse_event(event: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {v}\n\n"))
}

/// The OpenAI stream's end marker.
pub(super) fn sse_done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A streamed response whose frames come from a task (NDJSON or SSE).
pub(super) fn streamed(content_type: &'static str) -> (StreamTx, Resp) {
    let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
    let (gone_tx, gone) = tokio::sync::oneshot::channel();
    let body = Watched {
        inner: body,
        _gone: gone_tx,
    };
    let mut resp = hyper::Response::new(body.boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    (StreamTx { tx, gone }, resp)
}

/// The sending half of a streamed response. Like Ollama (whose request context is cancelled
/// when the client goes away), it notices a departed client while it waits between tokens, not
/// only at its next write.
pub(super) struct StreamTx {
    tx: http_body_util::channel::Sender<Bytes>,
    gone: tokio::sync::oneshot::Receiver<()>,
}

impl StreamTx {
    pub(super) async fn send_data(&mut self, data: Bytes) -> Result<(), ()> {
        self.tx.send_data(data).await.map_err(|_| ())
    }

    /// Waits `d`; `Err` if the client went away meanwhile.
    pub(super) async fn pause(&mut self, d: Duration) -> Result<(), ()> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = &mut self.gone => Err(()),
        }
    }
}

/// A response body that tells its [`StreamTx`] when hyper drops it (the client went away).
struct Watched {
    inner: http_body_util::channel::Channel<Bytes, Infallible>,
    _gone: tokio::sync::oneshot::Sender<()>,
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
