//! What callers use: start an [`OllamaDouble`] from a [`DoubleConfig`], inspect and steer it.

use super::golang;
use super::models::{LoadedModel, ModelSpec, Store};
use super::server::serve;
use super::state::State;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How the double behaves.
#[derive(Clone, Debug)]
pub struct DoubleConfig {
    pub models: Vec<ModelSpec>,
    /// Delay between two generated tokens (and between progress lines).
    pub token_delay: Duration,
    /// Tokens generated when the request sets no limit.
    pub response_tokens: usize,
    /// Refuse non-local `Host` headers with an empty 403, as a loopback-bound Ollama does.
    pub(crate) host_guard: bool,
    /// Names the "registry" does not have: pulling them fails (`file does not exist`).
    pub unpullable: Vec<String>,
    /// This many pulls (any model) break off halfway with an error, before pulls work.
    pub failing_pulls: u32,
    /// `OLLAMA_NUM_PARALLEL`: runs at once per model, the rest wait in line; `None`: no limit.
    pub parallel: Option<usize>,
    /// `OLLAMA_MAX_QUEUE`: runs waiting in line beyond which Ollama answers 503 at once.
    pub max_queue: usize,
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
            parallel: None,
            max_queue: 512,
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
    pub(crate) headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub(crate) fn path(&self) -> &str {
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
    pub(crate) fn spawn(addr: SocketAddr, cfg: DoubleConfig) -> std::io::Result<OllamaDouble> {
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
            failing_pulls: AtomicU32::new(cfg.failing_pulls),
            pulls: AtomicU64::new(0),
            counter: AtomicU64::new(1),
            parallel: cfg.parallel,
            max_queue: cfg.max_queue,
            queued: AtomicUsize::new(0),
            slots: Mutex::default(),
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
        self.state.log().clone()
    }

    /// Requests received on `path` (without query).
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path() == path)
            .collect()
    }

    pub fn clear_requests(&self) {
        self.state.log().clear();
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
}

impl Drop for OllamaDouble {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
