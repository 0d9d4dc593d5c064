//! The Ollama double: an in-process fake Ollama server, faithful to
//! `docs/ollama-protocol.md` for the routes corral serves. Tests, benchmarks and
//! `corral demo` use it as the upstream.
//!
//! It speaks real HTTP/1.1 (hyper): NDJSON and SSE streams with a configurable per-token delay,
//! per-dialect `stream` defaults, usage fields, preload/unload replies, `/api/ps` keep-alive
//! tracking, the admin routes, Ollama's error shapes, the loopback `Host` guard and CORS check,
//! models that are slow to load, `OLLAMA_NUM_PARALLEL` slots per model with a line behind them
//! (`OLLAMA_MAX_QUEUE`, then 503 "server busy"), and a request log plus a disconnect counter for
//! tests. Several instances make a pool.
//!
//! Layout, from the outside in:
//! - `api`: what callers use: [`OllamaDouble`], [`DoubleConfig`], [`Recorded`].
//! - `state`: the state every request sees (model store, blobs, request log, counters).
//! - `server`: the accept loop, the request log, the route table.
//! - `host_guard`: Ollama's CORS and `Host` checks, run before any route.
//! - `native` (generate, chat, embed), `manage` (tags, ps, show, pull, push, create, copy,
//!   delete, blobs), `openai` (`/v1/*`), `anthropic` (`/v1/messages`): the routes.
//! - `engine`: one model run: load wait, tokens, their timing, the statistics it reports.
//! - `reply`: responses, Ollama's error shape, streamed bodies (NDJSON, SSE).
//! - `models`: the catalog and the loaded runners with keep-alive timers.
//! - `golang`: JSON as Ollama's Go decoder reads it.

// Handlers return a finished response as their early-exit error; its size does not matter here.
#![allow(clippy::result_large_err)]

mod anthropic;
mod api;
mod engine;
mod golang;
mod host_guard;
mod manage;
mod models;
mod native;
mod openai;
mod reply;
mod server;
mod state;

pub use api::{default_models, DoubleConfig, OllamaDouble, Recorded};
pub use models::{LoadedModel, ModelSpec, DEFAULT_KEEP_ALIVE};

/// The version `/api/version` reports.
pub const VERSION: &str = "0.33.0";
