//! The server: accept loop, request log, host guard, then routing (404, 405, slash redirects).

use super::reply::{empty, json_resp, method_not_allowed, text, Resp};
use super::state::State;
use super::{anthropic, golang, host_guard, manage, native, openai, Recorded, VERSION};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves connections from `listener` until `stop` turns true, then drops every open one.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((sock, _)) = accepted else { continue };
        let _ = sock.set_nodelay(true);
        let state = state.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(state.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn handle(state: Arc<State>, req: hyper::Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(empty(StatusCode::BAD_REQUEST)),
    };
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    state.log().push(Recorded {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if state.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if !host_guard::admits(&parts.headers, state.host_guard) {
        return Ok(empty(StatusCode::FORBIDDEN));
    }
    let path = target.split('?').next().unwrap_or_default();
    let r = Req {
        state: &state,
        method: &parts.method,
        path,
        headers: &parts.headers,
        body: &body,
    };
    Ok(route(r).await)
}

/// One request, borrowed.
pub(crate) struct Req<'a> {
    pub(super) state: &'a Arc<State>,
    pub(super) method: &'a Method,
    pub(super) path: &'a str,
    pub(super) headers: &'a HeaderMap,
    pub(super) body: &'a Bytes,
}

impl Req<'_> {
    /// The body as JSON, with Ollama's errors for empty and invalid bodies.
    pub(super) fn json(&self) -> Result<Value, String> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err("missing request body".into());
        }
        // Go's decoder turns invalid UTF-8 and lone surrogate escapes into U+FFFD.
        golang::value_like_go(self.body).map_err(|e| e.to_string())
    }
}

/// The methods a route answers; `None`: no such route.
fn methods(path: &str) -> Option<&'static [Method]> {
    const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];
    Some(match path {
        "/" | "/api/version" | "/api/tags" => GET_HEAD,
        "/api/ps" | "/v1/models" => &[Method::GET],
        "/api/delete" => &[Method::DELETE],
        "/api/generate"
        | "/api/chat"
        | "/api/embed"
        | "/api/embeddings"
        | "/api/show"
        | "/api/pull"
        | "/api/push"
        | "/api/create"
        | "/api/copy"
        | "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/embeddings"
        | "/v1/responses"
        | "/v1/messages" => &[Method::POST],
        _ => return None,
    })
}

async fn route(r: Req<'_>) -> Resp {
    let param_route = |prefix: &str| {
        r.path
            .strip_prefix(prefix)
            .filter(|p| !p.is_empty() && !p.contains('/'))
    };
    if let Some(model) = param_route("/v1/models/") {
        return match *r.method {
            Method::GET => openai::model(&r, model),
            _ => method_not_allowed("GET"),
        };
    }
    if let Some(digest) = param_route("/api/blobs/") {
        return match *r.method {
            Method::HEAD | Method::POST => manage::blob(&r, digest).unwrap_or_else(|early| early),
            _ => method_not_allowed("HEAD, POST"),
        };
    }
    let Some(methods) = methods(r.path) else {
        // gin redirects a trailing slash to the route without it.
        if let Some(trimmed) = r.path.strip_suffix('/').filter(|t| methods(t).is_some()) {
            let prefix = r
                .headers
                .get("x-forwarded-prefix")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let status = if r.method == Method::GET {
                StatusCode::MOVED_PERMANENTLY
            } else {
                StatusCode::TEMPORARY_REDIRECT
            };
            let mut resp = empty(status);
            if let Ok(location) = http::HeaderValue::from_str(&format!("{prefix}{trimmed}")) {
                resp.headers_mut().insert(http::header::LOCATION, location);
            }
            return resp;
        }
        return text(StatusCode::NOT_FOUND, "404 page not found");
    };
    if !methods.contains(r.method) {
        let allow = methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        return method_not_allowed(&allow);
    }
    let answer = match r.path {
        "/" => Ok(text(StatusCode::OK, "Ollama is running")),
        "/api/version" => Ok(json_resp(StatusCode::OK, &json!({ "version": VERSION }))),
        "/api/generate" => native::generate(&r).await,
        "/api/chat" => native::chat(&r).await,
        "/api/embed" => native::embed(&r).await,
        "/api/embeddings" => native::embeddings(&r).await,
        "/api/tags" => Ok(manage::tags(&r)),
        "/api/ps" => Ok(manage::ps(&r)),
        "/api/show" => manage::show(&r),
        "/api/pull" => manage::pull(&r).await,
        "/api/push" => manage::push(&r).await,
        "/api/create" => manage::create(&r).await,
        "/api/copy" => manage::copy(&r),
        "/api/delete" => manage::delete(&r),
        "/v1/chat/completions" => openai::chat_completions(&r).await,
        "/v1/completions" => openai::completions(&r).await,
        "/v1/embeddings" => openai::embeddings(&r).await,
        "/v1/responses" => openai::responses(&r).await,
        "/v1/messages" => anthropic::messages(&r).await,
        "/v1/models" => Ok(openai::models(&r)),
        _ => Ok(text(StatusCode::NOT_FOUND, "404 page not found")),
    };
    answer.unwrap_or_else(|early| early)
}
