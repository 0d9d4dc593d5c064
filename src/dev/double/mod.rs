//! The Ollama double: an in-process fake Ollama server, faithful to
//! `reference/ollama-protocol.md` for the routes corral serves. Tests, benchmarks and
//! `corral demo` use it as the upstream.
//!
//! It speaks real HTTP/1.1 (hyper): NDJSON and SSE streams with a configurable per-token delay,
//! per-dialect `stream` defaults, usage fields, preload/unload replies, `/api/ps` keep-alive
//! tracking, the admin routes, Ollama's error shapes, the loopback `Host` guard and CORS check,
//! models that are slow to load, and a request log plus a disconnect counter for tests.

// Handlers return a finished response as their early-exit error; its size does not matter here.
#![allow(clippy::result_large_err)]

mod golang;
mod models;
mod native;
mod openai;

pub use models::{LoadedModel, ModelSpec, DEFAULT_KEEP_ALIVE};

use crate::ollama::KeepAlive;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use models::Store;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The version `/api/version` reports.
pub const VERSION: &str = "0.33.0";

type Body = BoxBody<Bytes, Infallible>;
type Resp = hyper::Response<Body>;

/// How the double behaves.
#[derive(Clone, Debug)]
pub struct DoubleConfig {
    pub models: Vec<ModelSpec>,
    /// Delay between two generated tokens (and between progress lines).
    pub token_delay: Duration,
    /// Tokens generated when the request sets no limit.
    pub response_tokens: usize,
    /// Refuse non-local `Host` headers with an empty 403, as a loopback-bound Ollama does.
    pub host_guard: bool,
    /// Names the "registry" does not have: pulling them fails (`file does not exist`).
    pub unpullable: Vec<String>,
    /// This many pulls (any model) break off halfway with an error, before pulls work.
    pub failing_pulls: u32,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            models: default_models(),
            token_delay: Duration::from_millis(20),
            response_tokens: 12,
            host_guard: true,
            unpullable: Vec::new(),
            failing_pulls: 0,
        }
    }
}

/// The models a fresh double has "pulled".
pub fn default_models() -> Vec<ModelSpec> {
    vec![
        ModelSpec::chat("llama3.2"),
        ModelSpec::chat("qwen2.5-coder:7b"),
        ModelSpec::embedding("nomic-embed-text"),
        // Slow to load, like a 70B model coming off disk.
        ModelSpec::chat("llama3.1:70b").with_load_time(Duration::from_secs(3)),
    ]
}

/// One request as the double received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as Ollama's Go decoder reads it.
    pub fn json(&self) -> Option<Value> {
        golang::value_like_go(&self.body).ok()
    }
}

pub(crate) struct State {
    store: Mutex<Store>,
    blobs: Mutex<std::collections::HashSet<String>>,
    log: Mutex<Vec<Recorded>>,
    disconnects: AtomicU64,
    completed: AtomicU64,
    token_delay_us: AtomicU64,
    hang: AtomicBool,
    response_tokens: usize,
    host_guard: bool,
    unpullable: Vec<String>,
    failing_pulls: std::sync::atomic::AtomicU32,
    pulls: AtomicU64,
    counter: AtomicU64,
}

impl State {
    fn token_delay(&self) -> Duration {
        Duration::from_micros(self.token_delay_us.load(Ordering::Relaxed))
    }

    fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running double. Dropping it stops it.
pub struct OllamaDouble {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl OllamaDouble {
    /// Starts on `127.0.0.1` with an ephemeral port, on the current tokio runtime.
    pub async fn start(cfg: DoubleConfig) -> std::io::Result<OllamaDouble> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
    }

    /// Starts on `addr` on the current tokio runtime (restart on the same port with the old
    /// address: all state is lost, as when Ollama restarts).
    pub async fn start_on(addr: SocketAddr, cfg: DoubleConfig) -> std::io::Result<OllamaDouble> {
        let listener = TcpListener::bind(addr).await?;
        let (mut double, stop_rx) = Self::prepare(listener.local_addr()?, cfg);
        double.task = Some(tokio::spawn(serve(listener, double.state.clone(), stop_rx)));
        Ok(double)
    }

    /// Starts on `addr` with its own runtime thread, for callers without a tokio runtime.
    pub fn spawn(addr: SocketAddr, cfg: DoubleConfig) -> std::io::Result<OllamaDouble> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ollama-double")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind(addr))?;
        let (mut double, stop_rx) = Self::prepare(listener.local_addr()?, cfg);
        let state = double.state.clone();
        double.thread = Some(std::thread::spawn(move || {
            runtime.block_on(serve(listener, state, stop_rx));
        }));
        Ok(double)
    }

    fn prepare(addr: SocketAddr, cfg: DoubleConfig) -> (OllamaDouble, watch::Receiver<bool>) {
        let state = Arc::new(State {
            store: Mutex::new(Store::new(cfg.models)),
            blobs: Mutex::default(),
            log: Mutex::default(),
            disconnects: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            token_delay_us: AtomicU64::new(cfg.token_delay.as_micros() as u64),
            hang: AtomicBool::new(false),
            response_tokens: cfg.response_tokens,
            host_guard: cfg.host_guard,
            unpullable: cfg.unpullable,
            failing_pulls: std::sync::atomic::AtomicU32::new(cfg.failing_pulls),
            pulls: AtomicU64::new(0),
            counter: AtomicU64::new(1),
        });
        let (stop, stop_rx) = watch::channel(false);
        (
            OllamaDouble {
                addr,
                state,
                stop,
                thread: None,
                task: None,
            },
            stop_rx,
        )
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and drops every open connection, like a crashed Ollama.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops, and returns once the port is free again (to start a new double on it).
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests received on `path` (without query).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Model runs that ended early because the client went away (Ollama cancels them).
    pub fn disconnects(&self) -> u64 {
        self.state.disconnects.load(Ordering::SeqCst)
    }

    /// Pulls started (failed ones included).
    pub fn pulls(&self) -> u64 {
        self.state.pulls.load(Ordering::SeqCst)
    }

    /// Model runs that completed.
    pub fn completed(&self) -> u64 {
        self.state.completed.load(Ordering::SeqCst)
    }

    pub fn set_token_delay(&self, d: Duration) {
        self.state
            .token_delay_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// While set, requests are read and logged but never answered (a wedged Ollama).
    pub fn set_hang(&self, hang: bool) {
        self.state.hang.store(hang, Ordering::SeqCst);
    }

    /// What `/api/ps` would list now.
    pub fn loaded(&self) -> Vec<LoadedModel> {
        self.state
            .store()
            .loaded(Instant::now())
            .into_iter()
            .map(|(_, l)| l)
            .collect()
    }

    pub fn add_model(&self, spec: ModelSpec) {
        self.state.store().add(spec);
    }
}

impl Drop for OllamaDouble {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
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
    state
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Recorded {
            method: parts.method.to_string(),
            target: target.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    if state.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    // Middlewares, in Ollama's order: CORS, then the Host guard; both answer 403 with no body.
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if let Some(origin) = parts
        .headers
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    {
        if !origin_allowed(origin, host) {
            return Ok(empty(StatusCode::FORBIDDEN));
        }
    }
    if state.host_guard && !host_allowed(host) {
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
    state: &'a Arc<State>,
    method: &'a Method,
    path: &'a str,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

impl Req<'_> {
    /// The body as JSON, with Ollama's errors for empty and invalid bodies.
    fn json(&self) -> Result<Value, String> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err("missing request body".into());
        }
        // Go's decoder turns invalid UTF-8 and lone surrogate escapes into U+FFFD.
        golang::value_like_go(self.body).map_err(|e| e.to_string())
    }
}

const ROUTES: &[(&str, &[Method])] = &[
    ("/", &[Method::GET, Method::HEAD]),
    ("/api/version", &[Method::GET, Method::HEAD]),
    ("/api/generate", &[Method::POST]),
    ("/api/chat", &[Method::POST]),
    ("/api/embed", &[Method::POST]),
    ("/api/embeddings", &[Method::POST]),
    ("/api/tags", &[Method::GET, Method::HEAD]),
    ("/api/ps", &[Method::GET]),
    ("/api/show", &[Method::POST]),
    ("/api/pull", &[Method::POST]),
    ("/api/push", &[Method::POST]),
    ("/api/create", &[Method::POST]),
    ("/api/copy", &[Method::POST]),
    ("/api/delete", &[Method::DELETE]),
    ("/v1/chat/completions", &[Method::POST]),
    ("/v1/completions", &[Method::POST]),
    ("/v1/embeddings", &[Method::POST]),
    ("/v1/responses", &[Method::POST]),
    ("/v1/messages", &[Method::POST]),
    ("/v1/models", &[Method::GET]),
];

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
            Method::HEAD | Method::POST => native::blob(&r, digest),
            _ => method_not_allowed("HEAD, POST"),
        };
    }
    let Some((_, methods)) = ROUTES.iter().find(|(p, _)| *p == r.path) else {
        // gin redirects a trailing slash to the route without it.
        if let Some(trimmed) = r
            .path
            .strip_suffix('/')
            .filter(|t| ROUTES.iter().any(|(p, _)| p == t))
        {
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
            resp.headers_mut().insert(
                http::header::LOCATION,
                format!("{prefix}{trimmed}").parse().expect("ascii"),
            );
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
    match r.path {
        "/" => text(StatusCode::OK, "Ollama is running"),
        "/api/version" => json_resp(StatusCode::OK, &json!({ "version": VERSION })),
        "/api/generate" => native::generate(&r).await,
        "/api/chat" => native::chat(&r).await,
        "/api/embed" => native::embed(&r).await,
        "/api/embeddings" => native::embeddings(&r).await,
        "/api/tags" => native::tags(&r),
        "/api/ps" => native::ps(&r),
        "/api/show" => native::show(&r),
        "/api/pull" => native::pull(&r).await,
        "/api/push" => native::push(&r).await,
        "/api/create" => native::create(&r).await,
        "/api/copy" => native::copy(&r),
        "/api/delete" => native::delete(&r),
        "/v1/chat/completions" => openai::chat_completions(&r).await,
        "/v1/completions" => openai::completions(&r).await,
        "/v1/embeddings" => openai::embeddings(&r).await,
        "/v1/responses" => openai::responses(&r).await,
        "/v1/messages" => openai::messages(&r).await,
        "/v1/models" => openai::models(&r),
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// A loopback-bound Ollama accepts only local-looking `Host` headers (anti DNS rebinding).
fn host_allowed(host: &str) -> bool {
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or_default()
    } else {
        host
    };
    if name.is_empty() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    if [".localhost", ".local", ".internal"]
        .iter()
        .any(|s| lower.ends_with(s))
    {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_unspecified(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xfe00) == 0xfc00
        }
        Err(_) => false,
    }
}

/// Ollama's default `OLLAMA_ORIGINS`.
fn origin_allowed(origin: &str, host: &str) -> bool {
    if origin == format!("http://{host}") || origin == format!("https://{host}") {
        return true;
    }
    let local = ["localhost", "127.0.0.1", "0.0.0.0"];
    for scheme in ["http://", "https://"] {
        if let Some(rest) = origin.strip_prefix(scheme) {
            let name = rest.split(':').next().unwrap_or_default();
            if local.contains(&name)
                && rest[name.len()..]
                    .chars()
                    .all(|c| c == ':' || c.is_ascii_digit())
            {
                return true;
            }
        }
    }
    [
        "app://",
        "file://",
        "tauri://",
        "vscode-webview://",
        "vscode-file://",
    ]
    .iter()
    .any(|s| origin.starts_with(s))
}

// ---- responses -------------------------------------------------------------------------------

fn full(status: StatusCode, content_type: Option<&str>, body: impl Into<Bytes>) -> Resp {
    let mut resp = hyper::Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.parse().expect("ascii"));
    }
    resp
}

fn empty(status: StatusCode) -> Resp {
    full(status, None, Bytes::new())
}

fn text(status: StatusCode, body: &'static str) -> Resp {
    full(status, Some("text/plain; charset=utf-8"), body)
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    full(
        status,
        Some("application/json; charset=utf-8"),
        v.to_string(),
    )
}

/// Ollama's native error shape.
fn native_error(status: StatusCode, message: impl Into<String>) -> Resp {
    json_resp(status, &json!({ "error": message.into() }))
}

fn method_not_allowed(allow: &str) -> Resp {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed");
    resp.headers_mut()
        .insert(http::header::ALLOW, allow.parse().expect("ascii"));
    resp
}

/// A streamed response whose frames come from a task (NDJSON or SSE).
fn streamed(content_type: &str) -> (StreamTx, Resp) {
    let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
    let (gone_tx, gone) = tokio::sync::oneshot::channel();
    let body = Watched {
        inner: body,
        _gone: gone_tx,
    };
    let mut resp = hyper::Response::new(body.boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        content_type.parse().expect("ascii"),
    );
    (StreamTx { tx, gone }, resp)
}

/// The sending half of a streamed response. Like Ollama (whose request context is cancelled
/// when the client goes away), it notices a departed client while it waits between tokens, not
/// only at its next write.
struct StreamTx {
    tx: http_body_util::channel::Sender<Bytes>,
    gone: tokio::sync::oneshot::Receiver<()>,
}

impl StreamTx {
    async fn send_data(&mut self, data: Bytes) -> Result<(), ()> {
        self.tx.send_data(data).await.map_err(|_| ())
    }

    /// Waits `d`; `Err` if the client went away meanwhile.
    async fn pause(&mut self, d: Duration) -> Result<(), ()> {
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

fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- the generation engine -------------------------------------------------------------------

const WORDS: &[&str] = &[
    "The",
    "sky",
    "is",
    "blue",
    "because",
    "molecules",
    "in",
    "the",
    "air",
    "scatter",
    "blue",
    "light",
    "from",
    "the",
    "sun",
    "more",
    "than",
    "they",
    "scatter",
    "red",
    "light.",
    "This",
    "is",
    "called",
    "Rayleigh",
    "scattering.",
];

/// Words of text, as the double counts prompt tokens.
pub(crate) fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Token timings reported in Ollama's final object (nanoseconds).
pub(crate) struct Metrics {
    pub prompt_eval_count: u64,
    pub eval_count: u64,
    pub total_duration: u128,
    pub load_duration: u128,
    pub prompt_eval_duration: u128,
    pub eval_duration: u128,
    pub done_reason: &'static str,
}

/// One model run: holds the model busy, yields tokens, and counts a disconnect if it is dropped
/// before it finished (the client went away and Ollama cancels the work).
pub(crate) struct Run {
    state: Arc<State>,
    /// The digest of the model's runner.
    runner: String,
    started: Instant,
    loaded_at: Instant,
    pub prompt_tokens: u64,
    pub tokens: Vec<String>,
    limited: bool,
    finished: bool,
    fail_after: Option<usize>,
}

impl Run {
    /// Waits for the model to be loaded (cancelled if the client leaves), then is ready to
    /// generate `max_tokens` tokens (`None`: the double's default).
    async fn start(
        state: &Arc<State>,
        spec: &ModelSpec,
        keep_alive: Option<KeepAlive>,
        prompt_tokens: u64,
        max_tokens: Option<i64>,
    ) -> Run {
        let started = Instant::now();
        let ready_at = state.store().begin(spec, keep_alive, started);
        let mut run = Run {
            state: state.clone(),
            runner: spec.digest.clone(),
            started,
            loaded_at: started,
            prompt_tokens,
            tokens: Vec::new(),
            limited: false,
            finished: false,
            fail_after: spec.fail_after,
        };
        tokio::time::sleep_until(ready_at.into()).await;
        run.loaded_at = Instant::now();
        let n = match max_tokens {
            Some(n) if n >= 0 => {
                run.limited = (n as usize) < state.response_tokens;
                (n as usize).min(state.response_tokens)
            }
            _ => state.response_tokens,
        };
        run.tokens = (0..n)
            .map(|i| {
                let w = WORDS[i % WORDS.len()];
                if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                }
            })
            .collect();
        run
    }

    fn delay(&self) -> Duration {
        self.state.token_delay()
    }

    /// Waits as long as generating every token takes (non-streaming answers).
    async fn generate_all(&self) {
        let n = self.tokens.len().saturating_sub(1) as u32;
        tokio::time::sleep(self.delay() * n).await;
    }

    fn text(&self) -> String {
        self.tokens.concat()
    }

    /// Ends the run with a failure (not a disconnect, not a completion).
    fn fail(mut self) {
        self.finished = true;
    }

    /// Marks the run complete and returns its metrics.
    fn finish(mut self) -> Metrics {
        self.finished = true;
        self.state.completed.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let load = self.loaded_at - self.started;
        let eval = now - self.loaded_at;
        Metrics {
            prompt_eval_count: self.prompt_tokens,
            eval_count: self.tokens.len() as u64,
            total_duration: (now - self.started).as_nanos().max(1),
            load_duration: load.as_nanos().max(1),
            prompt_eval_duration: 1_000_000,
            eval_duration: eval.as_nanos().max(1),
            done_reason: if self.limited { "length" } else { "stop" },
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            self.state.disconnects.fetch_add(1, Ordering::SeqCst);
        }
        self.state.store().end(&self.runner, Instant::now());
    }
}

/// Sends `frame(i, token)` for each token, `token_delay` apart, then the frames of `last`.
/// Stops (and the dropped [`Run`] counts a disconnect) when the client goes away.
fn stream_run(
    run: Run,
    content_type: &str,
    mut frame: impl FnMut(usize, &str) -> Vec<Bytes> + Send + 'static,
    last: impl FnOnce(&Metrics, String) -> Vec<Bytes> + Send + 'static,
) -> Resp {
    let sse = content_type == "text/event-stream";
    let (mut tx, resp) = streamed(content_type);
    tokio::spawn(async move {
        for (i, token) in run.tokens.iter().enumerate() {
            // The delay is read per token: a test can stall a stream that is under way.
            if i > 0 && tx.pause(run.delay()).await.is_err() {
                return;
            }
            if run.fail_after == Some(i) {
                // The runner died: an in-band error, then the stream ends without its marker.
                let message = "an error was encountered while running the model: unexpected EOF";
                let frame = if sse {
                    format!(
                        "data: {}\n\n",
                        json!({"error": {"message": message, "type": "api_error", "param": null, "code": null}})
                    )
                } else {
                    format!("{}\n", json!({ "error": message }))
                };
                let _ = tx.send_data(Bytes::from(frame)).await;
                run.fail();
                return;
            }
            for f in frame(i, token) {
                if tx.send_data(f).await.is_err() {
                    return;
                }
            }
        }
        let text = run.text();
        let metrics = run.finish();
        for f in last(&metrics, text) {
            if tx.send_data(f).await.is_err() {
                return;
            }
        }
    });
    resp
}

/// Deterministic unit-length-ish embedding of `text`.
pub(crate) fn embed_text(text: &str, dims: usize) -> Vec<f32> {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(text.as_bytes());
    (0..dims)
        .map(|i| (hash[i % hash.len()] as f32 / 255.0) * 2.0 - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_guard_matches_ollama() {
        for ok in [
            "",
            "localhost",
            "localhost:11434",
            "127.0.0.1:11434",
            "[::1]:11434",
            "10.0.0.5",
            "gpu.local",
            "ollama.internal:11434",
            "0.0.0.0",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "example.com",
            "corral.example.com:8443",
            "8.8.8.8:11434",
            "[2001:db8::1]:11434",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn default_origins_match_ollama() {
        assert!(origin_allowed("http://localhost:3000", "x"));
        assert!(origin_allowed("https://127.0.0.1", "x"));
        assert!(origin_allowed("app://anything", "x"));
        assert!(origin_allowed("https://gw.example.com", "gw.example.com"));
        assert!(!origin_allowed("https://evil.example", "127.0.0.1:11434"));
        assert!(!origin_allowed("http://localhost.evil.example", "x"));
    }
}
