//! Per-request state carried through pingora's hooks.

use crate::access::auth::Identity;
use crate::access::caps::{Held, Share};
use crate::access::Access;
use crate::api::routes::{Dialect, Matched};
use crate::runtime::lifecycle::InFlight;
use crate::usage::{Meter, UsageStripper};
use bytes::{Bytes, BytesMut};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the response body is, from its content type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyFormat {
    #[default]
    Other,
    /// `application/x-ndjson`: Ollama's native streams.
    Ndjson,
    /// `text/event-stream`: the `/v1` streams.
    Sse,
}

impl BodyFormat {
    pub fn from_content_type(ct: &[u8]) -> BodyFormat {
        let ct = ct.to_ascii_lowercase();
        if ct.starts_with(b"application/x-ndjson") {
            BodyFormat::Ndjson
        } else if ct.starts_with(b"text/event-stream") {
            BodyFormat::Sse
        } else {
            BodyFormat::Other
        }
    }
}

/// A request body read whole, with its part of `server.max_body_memory`.
pub struct HeldBody {
    pub bytes: Bytes,
    pub memory: Share,
}

pub struct RequestCtx {
    pub start: Instant,
    /// The request's place against `server.max_requests` and `server.max_requests_per_ip`.
    pub place: Option<Held>,
    pub request_id: String,
    pub client_ip: Option<IpAddr>,
    pub route: Option<Matched>,
    /// How errors are written for this caller (guessed from the path until a route matches).
    pub dialect: Dialect,
    /// The caller, once its key verified.
    pub identity: Option<Arc<Identity>>,
    /// The access rules the request was admitted under (kept for the response, e.g. list filtering).
    pub access: Option<Arc<Access>>,
    /// Why the key was refused (`corral_auth_failures_total{reason}`).
    pub auth_failure: Option<&'static str>,
    /// What the log may say about a refused key: never the key itself.
    pub refused_key: Option<crate::access::auth::RefusedKey>,
    /// The model the request names, normalized.
    pub model: Option<String>,
    pub stream: Option<bool>,
    /// The request body, read whole before forwarding; sent upstream as is.
    pub body: Option<HeldBody>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Time from the request's start to the first response body byte.
    pub first_byte: Option<Duration>,
    pub response_format: BodyFormat,
    /// A model list being collected whole to be filtered for the team.
    pub list_body: Option<BytesMut>,
    /// Reads usage and completeness from an inference response.
    pub meter: Option<Meter>,
    /// How many body bytes carry the answer up to its end marker, once the meter has seen it.
    pub complete_at: Option<u64>,
    /// corral asked Ollama for usage the client did not ask for; it is taken out again.
    pub strip_usage: bool,
    pub stripper: Option<UsageStripper>,
    /// What went wrong talking to Ollama (`corral_upstream_errors_total{kind}`).
    pub upstream_error: Option<&'static str>,
    /// The status Ollama answered with.
    pub status_from_upstream: u16,
    /// Ollama answered 5xx: the start of its body, for the log (the client gets corral's error).
    pub upstream_failure: Option<BytesMut>,
    /// Counts this request in `corral_inflight_requests{team}` while it lives.
    pub team_in_flight: Option<GaugeGuard>,
    /// The team's concurrency slot, held while the request lives.
    pub slot: Option<crate::access::limits::Slot>,
    /// Which limit refused the request (`corral_rate_limited_total{limit}`).
    pub rate_limited: Option<&'static str>,
    /// A short label of what went wrong, for the log.
    pub error: Option<&'static str>,
    _in_flight: InFlight,
}

impl RequestCtx {
    pub fn new(in_flight: InFlight) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            place: None,
            request_id: String::new(),
            client_ip: None,
            route: None,
            dialect: Dialect::Ollama,
            identity: None,
            access: None,
            auth_failure: None,
            refused_key: None,
            model: None,
            stream: None,
            body: None,
            bytes_in: 0,
            bytes_out: 0,
            first_byte: None,
            response_format: BodyFormat::Other,
            list_body: None,
            meter: None,
            complete_at: None,
            strip_usage: false,
            stripper: None,
            upstream_error: None,
            status_from_upstream: 0,
            upstream_failure: None,
            team_in_flight: None,
            slot: None,
            rate_limited: None,
            error: None,
            _in_flight: in_flight,
        }
    }
}

/// Holds a gauge up by one while alive.
pub struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    pub fn new(gauge: prometheus::IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The dialect of a path that matched no route (so even a 404 speaks the caller's language).
pub fn dialect_of_path(path: &[u8]) -> Dialect {
    if path.starts_with(b"/v1/messages") {
        Dialect::Anthropic
    } else if path.starts_with(b"/v1/") {
        Dialect::OpenAi
    } else {
        Dialect::Ollama
    }
}
