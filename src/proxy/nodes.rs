//! Which node each attempt of a request goes to: chosen at admission (so "no node has it" is
//! answered like any refusal), tried once per node, failed over before the first byte of an
//! answer, and recorded for the access log and `corral_upstream_attempts_total`.

use super::{Gateway, RequestCtx};
use crate::access::policy;
use crate::api::error::GatewayError;
use crate::api::routes::{RouteClass, RouteKind};
use crate::telemetry::metrics::AttemptOutcome;
use crate::upstream::node::{List, Node};
use crate::upstream::Pick;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::ErrorType;
use std::sync::Arc;

/// The header that names the node of an admin request in a pool.
pub(crate) const NODE_HEADER: &str = "x-corral-node";

/// The upstream's host name has not resolved (yet).
pub(super) const UNRESOLVED: ErrorType = ErrorType::Custom("upstream_unresolved");
/// Ollama answered 502 or 503 before any byte, and another node can take the request.
pub(super) const FAILOVER: ErrorType = ErrorType::Custom("upstream_failover");

impl Gateway {
    /// Chooses the node for the request's first attempt. Outside a pool there is one node and
    /// nothing to decide.
    pub(super) fn place(
        &self,
        req: &RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<(), GatewayError> {
        if !self.pool.is_pool() {
            // One node takes everything: its first attempt needs no model lookup.
            if let Pick::Node(node) = self.pool.pick(None, &[]) {
                ctx.nodes.next = Some(node);
            }
            return Ok(());
        }
        let Some(route) = &ctx.admission.route else {
            return Ok(());
        };
        if merged_list(route.kind).is_some() {
            // Answered from every node's lists (see `answer_merged`).
            return Ok(());
        }
        if route.kind.class() == RouteClass::Admin {
            // The model store of which node? The operator says.
            let named = req
                .headers
                .get(NODE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|name| self.pool.get(name.trim()));
            let node = named.ok_or_else(|| {
                GatewayError::BadRequest(format!(
                    "{} changes one node's models: name it in the {NODE_HEADER} header (one of: {})",
                    route.kind.name(),
                    self.pool.names()
                ))
            })?;
            ctx.nodes.fixed = Some(node.clone());
            return Ok(());
        }
        let model = ctx
            .admission
            .model
            .as_deref()
            .and_then(crate::ollama::ModelName::parse);
        let key = model.as_ref().map(|m| m.key());
        match self.pool.pick(key.as_deref(), &[]) {
            Pick::Node(node) => {
                ctx.nodes.next = Some(node);
                Ok(())
            }
            Pick::Missing => Err(GatewayError::NotFound(format!(
                "model '{}' not found",
                ctx.admission.model.as_deref().unwrap_or("")
            ))),
            Pick::Down if model.is_some() => Err(GatewayError::ModelUnavailable(
                ctx.admission.model.clone().unwrap_or_default(),
            )),
            Pick::Down | Pick::Exhausted => Err(GatewayError::UpstreamUnavailable),
        }
    }

    /// In a pool, corral answers the model lists itself, from every healthy node's (each model
    /// once, filtered for the team). Returns whether it answered.
    pub(super) async fn answer_merged(&self, session: &mut Session, ctx: &mut RequestCtx) -> bool {
        let which = match &ctx.admission.route {
            Some(route) if self.pool.is_pool() => merged_list(route.kind),
            _ => None,
        };
        let (Some(which), Some(caller)) = (which, &ctx.admission.caller) else {
            return false;
        };
        let Some(doc) = self.pool.merged(which) else {
            self.respond(session, ctx, &GatewayError::UpstreamUnavailable)
                .await;
            return true;
        };
        let kind = ctx
            .admission
            .route
            .as_ref()
            .map_or(RouteKind::Tags, |r| r.kind);
        let body = serde_json::to_vec(&doc)
            .ok()
            .and_then(|all| policy::filter_list(kind, &caller.team, &caller.identity, &all))
            .unwrap_or_default();
        let Ok(mut resp) = ResponseHeader::build(200, Some(3)) else {
            return false;
        };
        let _ = resp.insert_header("content-type", "application/json; charset=utf-8");
        let _ = resp.insert_header("x-request-id", ctx.request_id.as_str());
        self.cors_headers(ctx, &mut resp);
        let head_only = session.req_header().method == http::Method::HEAD;
        if !head_only {
            // A HEAD answer has no length: the list's would tell what the team may not see.
            let _ = resp.insert_header("content-length", body.len().to_string());
        }
        if session
            .write_response_header(Box::new(resp), head_only)
            .await
            .is_ok()
            && !head_only
        {
            let len = body.len() as u64;
            if session
                .write_response_body(Some(body.into()), true)
                .await
                .is_ok()
            {
                ctx.outcome.bytes_out += len;
            }
        }
        true
    }

    /// The node of the next attempt, counted in flight there until the attempt ends.
    pub(super) fn next_node(&self, ctx: &mut RequestCtx) -> Result<Arc<Node>> {
        let node = match (ctx.nodes.next.take(), &ctx.nodes.fixed) {
            (Some(node), _) => node,
            (None, Some(fixed)) => fixed.clone(),
            (None, None) => {
                let key = self.model_key(ctx);
                match self.pool.pick(key.as_deref(), &ctx.nodes.tried) {
                    Pick::Node(node) => node,
                    // The nodes changed since the last attempt decided to fail over.
                    _ => {
                        let mut e =
                            Error::explain(ErrorType::ConnectNoRoute, "no node is left to try");
                        e.as_up();
                        return Err(e);
                    }
                }
            }
        };
        ctx.nodes.count += 1;
        // The previous attempt's place is given back first.
        ctx.nodes.current = None;
        let gauge = node.series(&self.metrics).inflight.clone();
        ctx.nodes.current = Some((node.lease(), super::ctx::GaugeGuard::new(gauge)));
        Ok(node)
    }

    /// The key of the model the request runs (none for admin routes, which name a model they
    /// change rather than run).
    pub(super) fn model_key(&self, ctx: &RequestCtx) -> Option<String> {
        let named = ctx.admission.model.as_deref()?;
        let admin = ctx
            .admission
            .route
            .as_ref()
            .is_some_and(|r| r.kind.class() == RouteClass::Admin);
        (!admin)
            .then(|| crate::ollama::ModelName::parse(named).map(|m| m.key()))
            .flatten()
    }

    /// Whether another node could take this request after the current one failed.
    pub(super) fn can_fail_over(&self, ctx: &RequestCtx) -> bool {
        // An admin request changes one node's model store: it is never sent to another.
        let admin = ctx
            .admission
            .route
            .as_ref()
            .is_some_and(|r| r.kind.class() == RouteClass::Admin);
        if admin || !self.pool.is_pool() || ctx.nodes.fixed.is_some() {
            return false;
        }
        let mut tried = ctx.nodes.tried.clone();
        tried.extend(ctx.nodes.node().cloned());
        matches!(
            self.pool.pick(self.model_key(ctx).as_deref(), &tried),
            Pick::Node(_)
        )
    }

    /// The current attempt failed on its node: counts it against the node's health, and
    /// returns whether the request fails over to another node. `unavailable`: Ollama answered
    /// 502/503 (the node is alive); otherwise it could not be reached.
    pub(super) fn attempt_failed(&self, ctx: &mut RequestCtx, unavailable: bool) -> bool {
        let Some(node) = ctx.nodes.node().cloned() else {
            return false;
        };
        if !unavailable && node.failed() && self.pool.is_pool() {
            tracing::warn!(node = %node.name, "node failed 3 times in a row; out of routing until its probe answers");
        }
        if unavailable {
            // It answered: alive, only full.
            node.succeeded();
        }
        let failover = self.can_fail_over(ctx);
        let outcome = match (failover, unavailable) {
            (true, _) => AttemptOutcome::Failover,
            (false, true) => AttemptOutcome::Unavailable,
            (false, false) => AttemptOutcome::ConnectError,
        };
        self.count_attempt(&node, outcome);
        if failover {
            ctx.nodes.tried.push(node);
            // The slot held there goes to the next request in line; the next node is tried
            // without one (it answers or fails over in turn).
            ctx.nodes.slot = None;
        }
        failover
    }

    /// The current attempt got an answer.
    pub(super) fn attempt_answered(&self, ctx: &RequestCtx, status: u16) {
        let Some(node) = ctx.nodes.node() else {
            return;
        };
        node.succeeded();
        self.count_attempt(node, AttemptOutcome::Ok);
        let runs_model = ctx
            .admission
            .route
            .as_ref()
            .is_some_and(|r| r.kind.class() == RouteClass::Inference);
        if runs_model && (200..300).contains(&status) {
            if let Some(key) = self.model_key(ctx) {
                node.mark_loaded(&key);
            }
        }
    }

    /// The request is over: an admin request may have changed its node's model store, so the
    /// node's lists are read again now rather than at its next probe.
    pub(super) fn request_done(&self, ctx: &RequestCtx) {
        let admin = ctx
            .admission
            .route
            .as_ref()
            .is_some_and(|r| r.kind.class() == RouteClass::Admin);
        if let (true, Some(node)) = (admin, ctx.nodes.node()) {
            node.refresh.notify_one();
        }
    }

    fn count_attempt(&self, node: &Node, outcome: AttemptOutcome) {
        node.series(&self.metrics).attempt(outcome).inc();
    }
}

/// The list a pool merges for a route, if it is one of the model lists.
fn merged_list(kind: RouteKind) -> Option<List> {
    match kind {
        RouteKind::Tags => Some(List::Tags),
        RouteKind::Ps => Some(List::Ps),
        RouteKind::Models => Some(List::OpenAi),
        _ => None,
    }
}
