//! corral's own small HTTP client for talking to Ollama outside the request path:
//! `corral check` (is Ollama up?) and the model preloader. It uses pingora's connector and the
//! same peer (address, timeouts, `Host`) as proxied requests. [`exchange`] is the one exchange
//! it makes, also used to fetch identity providers' keys (`runtime/oidc.rs`).

use crate::upstream::Upstream;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::upstreams::peer::HttpPeer;
use std::sync::Arc;
use std::time::Duration;

/// Answers are small JSON documents; anything larger is cut off here.
const MAX_ANSWER: usize = 4 << 20;

pub(crate) struct UpstreamClient {
    upstream: Arc<Upstream>,
    connector: Connector,
}

/// A complete answer from Ollama.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

impl Answer {
    pub(crate) fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// Ollama's `{"error": "..."}` message, or the body text.
    pub(crate) fn error_message(&self) -> String {
        self.json()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
                    .trim()
                    .to_string()
            })
    }
}

impl UpstreamClient {
    pub(crate) fn new(upstream: Arc<Upstream>) -> UpstreamClient {
        UpstreamClient {
            upstream,
            connector: Connector::new(None),
        }
    }

    pub(crate) fn url(&self) -> &crate::config::UpstreamUrl {
        &self.upstream.url
    }

    /// Sends one request and reads the whole answer. `read_timeout` bounds each read (a model
    /// load can take minutes).
    pub(crate) async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        read_timeout: Duration,
    ) -> Result<Answer, String> {
        let mut answer = BytesMut::new();
        let status = self
            .exchange(method, path, body, read_timeout, |chunk| {
                if answer.len() + chunk.len() > MAX_ANSWER {
                    return Err("the answer is too large".to_string());
                }
                answer.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok(Answer {
            status,
            body: answer.freeze(),
        })
    }

    /// Sends one request and hands each line of the answer (Ollama's NDJSON progress) to
    /// `on_line` as it arrives. Returns the status. Lines over 64 KiB are skipped.
    pub(crate) async fn lines(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        read_timeout: Duration,
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<u16, String> {
        const MAX_LINE: usize = 64 << 10;
        let mut partial = Vec::new();
        let status = self
            .exchange(method, path, body, read_timeout, |chunk| {
                for piece in chunk.split_inclusive(|&b| b == b'\n') {
                    match piece.strip_suffix(b"\n") {
                        Some(end) => {
                            if partial.len() + end.len() <= MAX_LINE {
                                partial.extend_from_slice(end);
                                on_line(&partial);
                            }
                            partial.clear();
                        }
                        None if partial.len() + piece.len() <= MAX_LINE => {
                            partial.extend_from_slice(piece)
                        }
                        // Too long to be a progress line: skipped to its end.
                        None => partial.resize(MAX_LINE + 1, 0),
                    }
                }
                Ok(())
            })
            .await?;
        if !partial.is_empty() && partial.len() <= MAX_LINE {
            on_line(&partial);
        }
        Ok(status)
    }

    /// One exchange: sends the request, then each piece of the answer's body to `on_body`.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        read_timeout: Duration,
        on_body: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<u16, String> {
        if self.upstream.addr().is_none() {
            self.upstream
                .resolve()
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", self.upstream.url.host))?;
        }
        let mut peer = self
            .upstream
            .peer()
            .ok_or("the upstream address is unknown")?;
        peer.options.read_timeout = Some(read_timeout);
        let body = body.map(|b| Bytes::from(b.to_string()));
        let mut req =
            RequestHeader::build(method, path.as_bytes(), None).map_err(|e| e.to_string())?;
        let _ = req.insert_header("host", self.upstream.url.authority());
        if body.is_some() {
            let _ = req.insert_header("content-type", "application/json");
        }
        let answer = exchange(&self.connector, &peer, req, body, on_body)
            .await
            .map_err(|e| match e {
                Failed::Connect(etype) => format!(
                    "cannot connect to {}: {etype}",
                    self.upstream.url.authority()
                ),
                Failed::Other(e) => e,
            })?;
        Ok(answer.status.as_u16())
    }
}

/// Why an [`exchange`] failed.
pub(crate) enum Failed {
    /// No connection (pingora's error type, e.g. `ConnectRefused`).
    Connect(&'static str),
    Other(String),
}

/// One HTTP exchange over pingora's connector: sends `req` (with `user-agent`, and
/// `content-length` for a body), then each piece of the answer's body to `on_body`; returns the
/// answer's header. The connection goes back to the connector's pool when the answer was whole.
pub(crate) async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    mut req: RequestHeader,
    body: Option<Bytes>,
    mut on_body: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<Box<ResponseHeader>, Failed> {
    let (mut session, _) = connector
        .get_http_session(peer)
        .await
        .map_err(|e| Failed::Connect(e.etype().as_str()))?;
    let _ = req.insert_header("user-agent", concat!("corral/", env!("CARGO_PKG_VERSION")));
    if let Some(b) = &body {
        let _ = req.insert_header("content-length", b.len().to_string());
    }
    let fail = |what: &str, e: Box<pingora::Error>| {
        Failed::Other(format!("{what}: {}", e.etype().as_str()))
    };
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(|e| fail("sending the request", e))?;
    if let Some(b) = body {
        session
            .write_request_body(b, true)
            .await
            .map_err(|e| fail("sending the body", e))?;
    }
    session
        .finish_request_body()
        .await
        .map_err(|e| fail("sending the body", e))?;
    session
        .read_response_header()
        .await
        .map_err(|e| fail("waiting for the answer", e))?;
    let header = session
        .response_header()
        .cloned()
        .ok_or_else(|| Failed::Other("no answer".into()))?;
    while let Some(chunk) = session
        .read_response_body()
        .await
        .map_err(|e| fail("reading the answer", e))?
    {
        on_body(&chunk).map_err(Failed::Other)?;
    }
    connector.release_http_session(session, peer, None).await;
    Ok(Box::new(header))
}
