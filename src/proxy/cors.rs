//! CORS on the request path (`[server.cors]`, rules in `api/cors.rs`): preflights answered here,
//! and the headers every answer to an allowed origin carries, whoever wrote it.

use super::{Gateway, RequestCtx};
use crate::api::cors::{Cors, EXPOSED_HEADERS};
use crate::api::error::GatewayError;
use crate::api::routes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

impl Gateway {
    /// Answers a preflight without a key and without Ollama: 204 with what the origin may do on
    /// this route, or a refusal with no CORS headers (the browser then blocks the page's call).
    pub(super) async fn preflight(&self, session: &mut Session, ctx: &mut RequestCtx, cors: &Cors) {
        let limit = self.limits.max_header_size;
        if let Err(e) = super::admit::check_header_size(session.req_header(), limit) {
            return self.respond(session, ctx, &e).await;
        }
        let req = session.req_header();
        let header =
            |name: http::header::HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
        let Some(origin) = ctx.cors_origin.clone() else {
            let origin = header(http::header::ORIGIN).unwrap_or("");
            let refusal = GatewayError::Forbidden(format!(
                "the origin `{}` may not call this gateway from a browser (server.cors.origins)",
                &origin[..origin.len().min(200)]
            ));
            return self.respond(session, ctx, &refusal).await;
        };
        let method = header(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| m.parse::<http::Method>().ok());
        let matched = match method {
            Some(m) => routes::classify(&m, req.raw_path())
                .map(|matched| (m, matched))
                .map_err(|e| super::admit::route_error(e, req, ctx)),
            None => Err(GatewayError::BadRequest(
                "Access-Control-Request-Method is not a method".into(),
            )),
        };
        let (method, matched) = match matched {
            Ok(m) => m,
            Err(e) => return self.respond(session, ctx, &e).await,
        };
        ctx.dialect = matched.kind.dialect();
        ctx.admission.route = Some(matched);
        let private_network = header(http::header::HeaderName::from_static(
            "access-control-request-private-network",
        ))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let answer = cors.preflight(
            origin.to_str().unwrap_or_default(),
            method.as_str(),
            header(http::header::ACCESS_CONTROL_REQUEST_HEADERS),
            private_network,
        );
        let Ok(mut resp) = ResponseHeader::build(204, Some(answer.len() + 1)) else {
            return;
        };
        for (name, value) in &answer {
            let _ = resp.insert_header(*name, value.as_str());
        }
        let _ = resp.insert_header(super::headers::X_REQUEST_ID, ctx.request_id.as_str());
        // A preflight has no body; one that sends some does not keep the connection.
        if !session.as_mut().is_body_empty() {
            session.set_keepalive(None);
        }
        let _ = session.write_response_header(Box::new(resp), true).await;
    }

    /// What an answer carries when CORS is on: `Vary: Origin` always (a cache must not give one
    /// origin's answer to another), the allowed origin and the headers its page may read.
    pub(super) fn cors_headers(&self, ctx: &RequestCtx, resp: &mut ResponseHeader) {
        if self.cors.is_none() {
            return;
        }
        let _ = resp.append_header(http::header::VARY, "origin");
        if let Some(origin) = &ctx.cors_origin {
            let _ = resp.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            let _ =
                resp.insert_header(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED_HEADERS);
        }
    }
}
