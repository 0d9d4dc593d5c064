//! Per-request state carried through pingora's hooks.

use super::traffic::InFlight;
use crate::access::auth::{AuthFailure, Identity, RefusedKey};
use crate::access::caps::{Held, Share};
use crate::access::limits::{Limit, Slot};
use crate::access::policy::Team;
use crate::api::error::GatewayError;
use crate::api::routes::{Dialect, Matched};
use crate::upstream::node::{Lease, Node};
use crate::usage::{BodyFormat, Meter, UsageStripper};
use bytes::{Bytes, BytesMut};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request body read whole, with its part of `server.max_body_memory`.
pub(crate) struct HeldBody {
    pub(crate) bytes: Bytes,
    pub(crate) memory: Share,
}

/// The verified caller: its key and its team (looked up once, when the key is verified).
pub(crate) struct Caller {
    pub(crate) identity: Arc<Identity>,
    pub(crate) team: Arc<Team>,
}

/// Per-request state carried through pingora's hooks, in three parts: what admission decided,
/// what the response path keeps, and how the request went (for the report).
pub(crate) struct RequestCtx {
    pub(crate) start: Instant,
    pub(crate) request_id: String,
    pub(crate) client_ip: Option<IpAddr>,
    /// How errors are written for this caller (guessed from the path until a route matches).
    pub(crate) dialect: Dialect,
    /// The request's `Origin` when `[server.cors]` allows it.
    pub(crate) cors_origin: Option<http::HeaderValue>,
    pub(crate) admission: Admission,
    pub(crate) nodes: Attempts,
    pub(crate) response: ResponseState,
    pub(crate) outcome: Outcome,
    _in_flight: InFlight,
}

/// What admission decided, and what it holds while the request lives.
#[derive(Default)]
pub(crate) struct Admission {
    /// The request's place against `server.max_requests` and `server.max_requests_per_ip`.
    pub(crate) place: Option<Held>,
    pub(crate) route: Option<Matched>,
    /// The caller, once its key verified.
    pub(crate) caller: Option<Caller>,
    /// The model the request names, normalized.
    pub(crate) model: Option<String>,
    pub(crate) stream: Option<bool>,
    /// The request body, read whole before forwarding and sent upstream as is; dropped once
    /// Ollama answers.
    pub(crate) body: Option<HeldBody>,
    /// corral asked Ollama for usage the client did not ask for; it is taken out again.
    pub(crate) strip_usage: bool,
    /// The team's concurrency slot, held while the request lives.
    pub(crate) slot: Option<Slot>,
    /// Counts this request in `corral_inflight_requests{team}` while it lives.
    pub(crate) team_in_flight: Option<GaugeGuard>,
}

/// Which node the request goes to, and the nodes it tried.
#[derive(Default)]
pub(crate) struct Attempts {
    /// Where the next attempt goes: chosen at admission, or the same node again after a pooled
    /// connection it had closed.
    pub(crate) next: Option<Arc<Node>>,
    /// The node `x-corral-node` named (admin routes in a pool): every attempt goes there.
    pub(crate) fixed: Option<Arc<Node>>,
    /// Nodes this request tried and failed on: it tries each once.
    pub(crate) tried: Vec<Arc<Node>>,
    /// The current attempt's place on its node (`corral_upstream_inflight{node}`).
    pub(crate) current: Option<(Lease, GaugeGuard)>,
    /// Attempts made (the access log's `attempts`).
    pub(crate) count: u32,
    /// The slot the request holds on its first node (`parallel`), until it ends.
    pub(crate) slot: Option<crate::upstream::queue::SlotHold>,
}

impl Attempts {
    pub(crate) fn node(&self) -> Option<&Arc<Node>> {
        self.current.as_ref().map(|(lease, _)| lease.node())
    }
}

/// What the response path keeps between chunks.
#[derive(Default)]
pub(crate) struct ResponseState {
    /// What the response body is, from its content type.
    pub(crate) format: BodyFormat,
    /// The status Ollama answered with.
    pub(crate) status_from_upstream: u16,
    /// Time from the request's start to the first response body byte.
    pub(crate) first_byte: Option<Duration>,
    /// Reads usage and completeness from an inference response.
    pub(crate) meter: Option<Meter>,
    /// How many body bytes carry the answer up to its end marker, once the meter has seen it.
    pub(crate) complete_at: Option<u64>,
    pub(crate) stripper: Option<UsageStripper>,
    /// A model list being collected whole to be filtered for the team.
    pub(crate) list_body: Option<BytesMut>,
    /// Ollama answered 5xx: the start of its body, for the log (the client gets corral's error).
    pub(crate) upstream_failure: Option<BytesMut>,
}

/// How the request went: what the access log and the metrics say about it. Kept as enums; they
/// become label strings only in the report.
#[derive(Default)]
pub struct Outcome {
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// What went wrong, if anything.
    pub(crate) failure: Option<Failure>,
    /// Why the key was refused (`corral_auth_failures_total{reason}`).
    pub(crate) auth_failure: Option<AuthFailure>,
    /// What the log may say about a refused key: never the key itself.
    pub(crate) refused_key: Option<RefusedKey>,
    /// Which limit refused the request (`corral_rate_limited_total{limit}`).
    pub(crate) rate_limited: Option<Limit>,
    /// How long it waited for a slot on a node (the access log's `queued_ms`).
    pub(crate) queued: Option<Duration>,
    /// What went wrong talking to Ollama (`corral_upstream_errors_total{kind}`).
    pub(crate) upstream_fault: Option<UpstreamFault>,
}

/// What went wrong with a request (the access log's `error`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// corral answered with this error, or ended a stream with it.
    Answered(GatewayError),
    /// The client went away before the answer was complete.
    ClientClosed,
    /// The stream ended without its end marker.
    Truncated,
    /// The stream carried an error from Ollama and no end marker.
    ErrorInStream,
}

impl Failure {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Failure::Answered(e) => e.label(),
            Failure::ClientClosed => "client_closed",
            Failure::Truncated => "truncated",
            Failure::ErrorInStream => "error_in_stream",
        }
    }
}

/// A failure talking to Ollama (`corral_upstream_errors_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamFault {
    ConnectTimeout,
    ReadTimeout,
    WriteTimeout,
    ConnectRefused,
    ConnectError,
    ConnectionLost,
    /// `upstream.request_timeout` passed.
    RequestTimeout,
    /// The upstream's host name has not resolved (yet).
    Unresolved,
    /// Ollama answered 5xx.
    ServerError,
    Other,
}

impl UpstreamFault {
    pub(crate) fn label(self) -> &'static str {
        match self {
            UpstreamFault::ConnectTimeout => "connect_timeout",
            UpstreamFault::ReadTimeout => "read_timeout",
            UpstreamFault::WriteTimeout => "write_timeout",
            UpstreamFault::ConnectRefused => "connect_refused",
            UpstreamFault::ConnectError => "connect_error",
            UpstreamFault::ConnectionLost => "connection_lost",
            UpstreamFault::RequestTimeout => "request_timeout",
            UpstreamFault::Unresolved => "unresolved",
            UpstreamFault::ServerError => "server_error",
            UpstreamFault::Other => "other",
        }
    }
}

impl RequestCtx {
    pub(crate) fn new(in_flight: InFlight) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: String::new(),
            client_ip: None,
            dialect: Dialect::Ollama,
            cors_origin: None,
            admission: Admission::default(),
            nodes: Attempts::default(),
            response: ResponseState::default(),
            outcome: Outcome::default(),
            _in_flight: in_flight,
        }
    }

    /// The caller's team name, `none` for public routes and refused keys.
    pub(crate) fn team_label(&self) -> &str {
        self.admission
            .caller
            .as_ref()
            .map_or("none", |c| c.team.name.as_str())
    }
}

/// Holds a gauge up by one while alive.
pub(crate) struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: prometheus::IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
