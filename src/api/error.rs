//! The one error type of the request path. Each error knows its status, its message, its metric
//! label, and how to render itself in the caller's dialect, so `openai` raises the right exception
//! class and `ollama` raises `ResponseError` with the status.

use crate::api::routes::Dialect;
use crate::config::{ByteSize, HumanDuration};
use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed here; use {allow}")]
    MethodNotAllowed { allow: String },
    #[error("request timed out: the request was not received in time; send it again")]
    RequestTimeout,
    #[error("request body is larger than the {limit} limit of this gateway")]
    PayloadTooLarge { limit: ByteSize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("request headers are too large")]
    HeadersTooLarge,
    /// The gateway holds as much as it may at once (requests in flight, body memory).
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u64,
    },
    /// Too many requests wait for a slot on a node (the team's `max_queued`, or the gateway's).
    #[error("{0}")]
    QueueFull(String),
    /// No slot on a node freed within `scheduler.queue_timeout`.
    #[error("every model server that has the model stayed busy for {0}; try again shortly")]
    QueueTimeout(HumanDuration),
    #[error("the model server is not reachable right now; try again shortly")]
    UpstreamUnavailable,
    /// An OpenID Connect token, and its provider's keys have not loaded yet.
    #[error("{0}")]
    IdentityProviderUnavailable(String),
    /// Every node that has the model is down (a pool of nodes).
    #[error("no model server that has model '{0}' is up right now; try again shortly")]
    ModelUnavailable(String),
    #[error("the model server did not answer within {0}")]
    UpstreamTimeout(HumanDuration),
    #[error("the request took longer than the {0} limit of this gateway")]
    RequestTooLong(HumanDuration),
    /// Ollama answered with a server error; its own body (file paths, internals) is not shown.
    #[error("{}", upstream_failed_message(*.0))]
    UpstreamFailed(u16),
    #[error("internal error in the gateway; the request id identifies it in the log")]
    Internal,
}

fn upstream_failed_message(status: u16) -> String {
    match status {
        503 => "the model server is busy (its queue is full); try again shortly".into(),
        _ => format!(
            "the model server failed to answer (HTTP {status}); the request id identifies the details in the gateway log"
        ),
    }
}

/// An error response ready to write: status, headers, body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rendered {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Bytes,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::BadRequest(_) => 400,
            GatewayError::Unauthorized(_) => 401,
            GatewayError::Forbidden(_) => 403,
            GatewayError::NotFound(_) => 404,
            GatewayError::MethodNotAllowed { .. } => 405,
            GatewayError::RequestTimeout => 408,
            GatewayError::PayloadTooLarge { .. } => 413,
            GatewayError::UnsupportedMediaType(_) => 415,
            GatewayError::RateLimited { .. } | GatewayError::QueueFull(_) => 429,
            GatewayError::HeadersTooLarge => 431,
            GatewayError::Internal => 500,
            GatewayError::UpstreamUnavailable => 502,
            GatewayError::Overloaded { .. }
            | GatewayError::IdentityProviderUnavailable(_)
            | GatewayError::ModelUnavailable(_)
            | GatewayError::QueueTimeout(_) => 503,
            GatewayError::UpstreamTimeout(_) | GatewayError::RequestTooLong(_) => 504,
            GatewayError::UpstreamFailed(status) => *status,
        }
    }

    /// A short, bounded label for logs and metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::PayloadTooLarge { .. } => "body_too_large",
            GatewayError::UnsupportedMediaType(_) => "unsupported_media_type",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::HeadersTooLarge => "headers_too_large",
            GatewayError::Internal => "internal",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::QueueFull(_) => "queue_full",
            GatewayError::QueueTimeout(_) => "queue_timeout",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::IdentityProviderUnavailable(_) => "idp_unavailable",
            GatewayError::ModelUnavailable(_) => "model_unavailable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::RequestTooLong(_) => "request_too_long",
            GatewayError::UpstreamFailed(_) => "upstream_failed",
        }
    }

    fn openai_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500.. => "api_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        if let GatewayError::Overloaded { .. } | GatewayError::QueueTimeout(_) = self {
            return "overloaded_error";
        }
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            502 | 504 => "api_error",
            500.. => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON error object in the caller's dialect (also used in-band in streams).
    pub(crate) fn json(&self, dialect: Dialect) -> serde_json::Value {
        let message = self.to_string();
        match dialect {
            Dialect::Ollama => json!({ "error": message }),
            Dialect::OpenAi => json!({
                "error": {
                    "message": message,
                    "type": self.openai_type(),
                    "param": null,
                    "code": self.label(),
                }
            }),
            Dialect::Anthropic => json!({
                "type": "error",
                "error": { "type": self.anthropic_type(), "message": message },
            }),
        }
    }

    /// The whole error response in the caller's dialect.
    pub(crate) fn render(&self, dialect: Dialect) -> Rendered {
        let body = Bytes::from(self.json(dialect).to_string());
        let mut headers = vec![
            (
                "content-type",
                "application/json; charset=utf-8".to_string(),
            ),
            ("content-length", body.len().to_string()),
        ];
        match self {
            GatewayError::Unauthorized(_) => {
                headers.push(("www-authenticate", "Bearer realm=\"corral\"".to_string()))
            }
            GatewayError::MethodNotAllowed { allow } => headers.push(("allow", allow.clone())),
            GatewayError::RateLimited {
                retry_after_secs, ..
            }
            | GatewayError::Overloaded {
                retry_after_secs, ..
            } => headers.push(("retry-after", retry_after_secs.max(&1).to_string())),
            // A node is probed every 5 s; one that answers is back in routing at once. A full
            // line empties at the pace of generations: seconds.
            GatewayError::ModelUnavailable(_)
            | GatewayError::IdentityProviderUnavailable(_)
            | GatewayError::QueueFull(_)
            | GatewayError::QueueTimeout(_) => headers.push(("retry-after", "5".to_string())),
            _ => {}
        }
        Rendered {
            status: self.status(),
            headers,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(e: &GatewayError, d: Dialect) -> serde_json::Value {
        serde_json::from_slice(&e.render(d).body).unwrap()
    }

    #[test]
    fn ollama_dialect_is_a_plain_error_string() {
        let e = GatewayError::NotFound("no such route".into());
        assert_eq!(body(&e, Dialect::Ollama), json!({"error": "no such route"}));
        assert_eq!(e.render(Dialect::Ollama).status, 404);
    }

    #[test]
    fn openai_dialect_carries_the_type_the_sdk_maps_to_exceptions() {
        let cases = [
            (
                GatewayError::Unauthorized("x".into()),
                401,
                "authentication_error",
            ),
            (GatewayError::Forbidden("x".into()), 403, "permission_error"),
            (GatewayError::NotFound("x".into()), 404, "not_found_error"),
            (
                GatewayError::RateLimited {
                    message: "x".into(),
                    retry_after_secs: 3,
                },
                429,
                "rate_limit_error",
            ),
            (GatewayError::UpstreamUnavailable, 502, "api_error"),
            (
                GatewayError::UpstreamTimeout(HumanDuration::secs(900)),
                504,
                "api_error",
            ),
            (
                GatewayError::PayloadTooLarge {
                    limit: ByteSize::mib(32),
                },
                413,
                "invalid_request_error",
            ),
        ];
        for (e, status, ty) in cases {
            let r = e.render(Dialect::OpenAi);
            assert_eq!(r.status, status);
            let b = body(&e, Dialect::OpenAi);
            assert_eq!(b["error"]["type"], ty, "{e:?}");
            assert_eq!(b["error"]["message"], e.to_string());
            assert!(b["error"]["param"].is_null());
        }
    }

    #[test]
    fn anthropic_dialect_has_the_error_envelope() {
        let e = GatewayError::Forbidden("model not allowed".into());
        assert_eq!(
            body(&e, Dialect::Anthropic),
            json!({"type": "error", "error": {"type": "permission_error", "message": "model not allowed"}})
        );
    }

    #[test]
    fn status_specific_headers() {
        let r = GatewayError::RateLimited {
            message: "slow down".into(),
            retry_after_secs: 7,
        }
        .render(Dialect::OpenAi);
        assert!(r.headers.contains(&("retry-after", "7".into())));
        let r = GatewayError::Overloaded {
            message: "full".into(),
            retry_after_secs: 0,
        }
        .render(Dialect::Anthropic);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "1".into())));
        let r = GatewayError::Unauthorized("no key".into()).render(Dialect::Ollama);
        assert!(r.headers.iter().any(|(k, _)| *k == "www-authenticate"));
        let r = GatewayError::MethodNotAllowed {
            allow: "POST".into(),
        }
        .render(Dialect::Ollama);
        assert!(r.headers.contains(&("allow", "POST".into())));
        // Waiting for a slot: the openai SDK maps these to RateLimitError and
        // InternalServerError, and both carry when to come back.
        let r = GatewayError::QueueFull("line full".into()).render(Dialect::OpenAi);
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "5".into())));
        assert_eq!(
            body(&GatewayError::QueueFull("x".into()), Dialect::OpenAi)["error"]["type"],
            "rate_limit_error"
        );
        let r = GatewayError::QueueTimeout(HumanDuration::secs(60)).render(Dialect::Anthropic);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "5".into())));
        assert_eq!(
            body(
                &GatewayError::QueueTimeout(HumanDuration::secs(1)),
                Dialect::Anthropic
            )["error"]["type"],
            "overloaded_error"
        );
    }

    #[test]
    fn upstream_failures_never_name_an_address() {
        for e in [
            GatewayError::UpstreamUnavailable,
            GatewayError::UpstreamTimeout(HumanDuration::secs(5)),
            GatewayError::Internal,
        ] {
            let text = String::from_utf8(e.render(Dialect::OpenAi).body.to_vec()).unwrap();
            assert!(
                !text.contains("127.0.0.1") && !text.contains("11434"),
                "{text}"
            );
        }
    }
}
