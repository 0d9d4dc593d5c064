//! The access log: one line per request on stdout. It never holds prompts, completions, keys or
//! query strings.

use crate::config::LogFormat;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use std::io::{BufWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// One finished request.
#[derive(Debug, Default, Serialize)]
pub(crate) struct AccessRecord<'a> {
    pub(crate) ts: Timestamp,
    pub(crate) request_id: &'a str,
    pub(crate) team: Option<&'a str>,
    pub(crate) key_id: Option<&'a str>,
    /// Written as text (`203.0.113.7`), straight into the line.
    pub(crate) client_ip: Option<std::net::IpAddr>,
    /// `None` when the request could not be read.
    pub(crate) method: Option<&'a str>,
    pub(crate) path: Option<&'a str>,
    pub(crate) route: Option<&'static str>,
    pub(crate) model: Option<&'a str>,
    pub(crate) stream: Option<bool>,
    pub(crate) status: u16,
    pub(crate) duration_ms: u64,
    pub(crate) ttft_ms: Option<u64>,
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    /// The token counts are corral's estimate: the stream ended without Ollama's counts.
    pub(crate) tokens_estimated: bool,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) error: Option<&'a str>,
    /// Why an API key was refused (`revoked`, `expired`, `unknown_kid`, `bad_signature`, ...).
    pub(crate) auth_failure: Option<&'a str>,
    /// The id a refused key claims when its signature did not hold (anyone can write any id
    /// into an unsigned key); `key_id` holds ids whose signature held.
    pub(crate) claimed_key_id: Option<&'a str>,
    /// The node that answered (or was tried last); `None` when nothing was forwarded.
    pub(crate) node: Option<&'a str>,
    /// Nodes tried: more than 1 when a request failed over.
    pub(crate) attempts: u32,
    /// Time spent waiting for a slot on a node (`parallel`); `None` when it needed none.
    pub(crate) queued_ms: Option<u64>,
}

impl AccessRecord<'_> {
    fn pretty(&self) -> String {
        let mut line = format!(
            "{} {} {} {} {}ms",
            self.ts,
            self.status,
            self.method.unwrap_or("-"),
            self.path.unwrap_or("-"),
            self.duration_ms
        );
        let mut field = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                line.push_str(&format!(" {k}={v}"));
            }
        };
        field("team", self.team.map(str::to_string));
        field("model", self.model.map(str::to_string));
        field("node", self.node.map(str::to_string));
        field("queued", self.queued_ms.map(|q| format!("{q}ms")));
        field("ttft", self.ttft_ms.map(|t| format!("{t}ms")));
        field(
            "tokens",
            match (self.prompt_tokens, self.completion_tokens) {
                (None, None) => None,
                (p, c) => Some(format!(
                    "{}{}/{}",
                    if self.tokens_estimated { "~" } else { "" },
                    p.unwrap_or(0),
                    c.unwrap_or(0)
                )),
            },
        );
        field("error", self.error.map(str::to_string));
        field("key_refused", self.auth_failure.map(str::to_string));
        field("client", self.client_ip.map(|ip| ip.to_string()));
        field("id", Some(self.request_id.to_string()));
        line
    }
}

/// Lines are buffered and written out at least every [`FLUSH_INTERVAL`] (by
/// [`AccessLogFlusher`]) or when 64 KiB have gathered: one write per burst of requests instead of
/// one per request. Whatever is buffered is written out before corral exits.
pub(crate) struct AccessLog {
    format: LogFormat,
    out: Mutex<BufWriter<Box<dyn Write + Send>>>,
}

pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

impl AccessLog {
    pub(crate) fn stdout(format: LogFormat) -> AccessLog {
        Self::to_writer(format, Box::new(std::io::stdout()))
    }

    pub(crate) fn to_writer(format: LogFormat, w: Box<dyn Write + Send>) -> AccessLog {
        AccessLog {
            format,
            out: Mutex::new(BufWriter::with_capacity(64 * 1024, w)),
        }
    }

    pub(crate) fn write(&self, rec: &AccessRecord<'_>) {
        thread_local! {
            /// The line being written, kept per thread: no allocation per request once it has
            /// grown to the longest line.
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            match self.format {
                LogFormat::Json => {
                    if serde_json::to_writer(&mut *line, rec).is_err() {
                        return;
                    }
                }
                LogFormat::Pretty => line.extend_from_slice(rec.pretty().as_bytes()),
            }
            line.push(b'\n');
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            // A closed stdout must not take the gateway down; the line is lost.
            let _ = out.write_all(line);
        });
    }

    pub(crate) fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

/// Writes buffered access-log lines out every [`FLUSH_INTERVAL`].
pub(crate) struct AccessLogFlusher(pub Arc<AccessLog>);

#[async_trait]
impl BackgroundService for AccessLogFlusher {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // Flushing goes on through a graceful shutdown (streams may still be ending); the
        // runtime stops this loop when the process ends.
        loop {
            tokio::time::sleep(FLUSH_INTERVAL).await;
            self.0.flush();
        }
    }
}

/// RFC 3339 with milliseconds, UTC.
pub(crate) fn timestamp() -> Timestamp {
    Timestamp(SystemTime::now())
}

/// When a request ended, written as RFC 3339 UTC with milliseconds
/// (`2026-12-06T03:18:02.123Z`) straight into the line (no string made for it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timestamp(SystemTime);

impl Default for Timestamp {
    fn default() -> Timestamp {
        timestamp()
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        humantime::format_rfc3339_millis(self.0).fmt(f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_every_design_field() {
        let buf = Buf::default();
        let log = AccessLog::to_writer(LogFormat::Json, Box::new(buf.clone()));
        log.write(&AccessRecord {
            ts: timestamp(),
            request_id: "abc",
            method: Some("POST"),
            path: Some("/api/chat"),
            status: 200,
            ..Default::default()
        });
        assert!(buf.0.lock().unwrap().is_empty(), "buffered until flushed");
        log.flush();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        for f in [
            "ts",
            "request_id",
            "team",
            "key_id",
            "client_ip",
            "method",
            "path",
            "route",
            "model",
            "stream",
            "status",
            "duration_ms",
            "ttft_ms",
            "prompt_tokens",
            "completion_tokens",
            "tokens_estimated",
            "bytes_in",
            "bytes_out",
            "error",
            "auth_failure",
            "claimed_key_id",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        let ts = v["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
            "RFC 3339 with milliseconds, UTC: {ts}"
        );
    }

    #[test]
    fn pretty_lines_are_short_and_readable() {
        let rec = AccessRecord {
            ts: Timestamp(std::time::UNIX_EPOCH + Duration::from_millis(1_796_527_738_123)),
            request_id: "id1",
            method: Some("GET"),
            path: Some("/api/tags"),
            status: 401,
            duration_ms: 3,
            error: Some("unauthorized"),
            ..Default::default()
        };
        assert_eq!(
            rec.pretty(),
            "2026-12-06T03:28:58.123Z 401 GET /api/tags 3ms error=unauthorized id=id1"
        );
    }
}
