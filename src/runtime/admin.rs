//! The operator listener (`server.metrics_listen`): `/livez`, `/readyz` and `/metrics`. It is
//! separate from the public listener and carries no API routes.

use crate::proxy::Traffic;
use crate::telemetry::metrics::Metrics;
use crate::upstream::pins::Pins;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::Arc;

pub(crate) struct AdminApp {
    pub(crate) traffic: Arc<Traffic>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pins: Arc<Pins>,
    pub(crate) pool: Arc<crate::upstream::Pool>,
}

impl AdminApp {
    /// `(status, content type, body)` for a method and path.
    pub(crate) fn answer(
        &self,
        method: &Method,
        path: &str,
    ) -> (StatusCode, &'static str, Vec<u8>) {
        const JSON: &str = "application/json";
        if method != Method::GET && method != Method::HEAD {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                JSON,
                br#"{"error":"use GET"}"#.to_vec(),
            );
        }
        match path {
            "/livez" => (StatusCode::OK, JSON, br#"{"status":"ok"}"#.to_vec()),
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.encode(),
            ),
            "/readyz" => {
                // Not ready while draining, or while a pinned model is not loaded yet.
                let draining = self.traffic.is_draining();
                let ready = !draining
                    && self.pins.ready(|node| {
                        // One node is never out of routing; in a pool a holder must be up.
                        !self.pool.is_pool() || self.pool.get(node).is_some_and(|n| n.is_up())
                    });
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = json!({
                    "ready": ready,
                    "draining": draining,
                    "in_flight": self.traffic.in_flight(),
                    "models": self.pins.report(),
                });
                (status, JSON, body.to_string().into_bytes())
            }
            _ => (
                StatusCode::NOT_FOUND,
                JSON,
                br#"{"error":"not found; try /livez, /readyz or /metrics"}"#.to_vec(),
            ),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let (status, content_type, body) = self.answer(&req.method, req.uri.path());
        let length = http::HeaderValue::from(body.len());
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        headers.insert(http::header::CONTENT_LENGTH, length);
        headers.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_and_everything_else_is_404() {
        let app = AdminApp {
            traffic: Arc::new(Traffic::default()),
            metrics: Arc::new(Metrics::new(&crate::config::Config::default())),
            pins: Arc::new(Pins::new(&Default::default(), &[], false)),
            pool: Arc::new(crate::upstream::Pool::new(&Default::default())),
        };
        assert_eq!(app.answer(&Method::GET, "/livez").0, StatusCode::OK);
        let (status, _, body) = app.answer(&Method::GET, "/readyz");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["ready"],
            true
        );
        assert_eq!(
            app.answer(&Method::GET, "/api/chat").0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            app.answer(&Method::POST, "/livez").0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
