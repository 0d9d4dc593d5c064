//! A request that runs a model takes a slot on its node before it is forwarded, waiting in its
//! team's line when every node that has its model is busy (`upstream::queue`). Waiting is not
//! counted against `upstream.read_timeout`; a client that leaves while waiting is taken out of
//! line and never reaches Ollama.

use super::ctx::Failure;
use super::{Gateway, RequestCtx};
use crate::api::error::GatewayError;
use crate::api::routes::RouteClass;
use crate::upstream::queue::{Asker, NoSlot};
use pingora::proxy::Session;

impl Gateway {
    /// Takes the request's slot. `Err(None)`: the client left while waiting (nothing to answer).
    pub(super) async fn take_slot(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), Option<GatewayError>> {
        let runs_model = ctx
            .admission
            .route
            .as_ref()
            .is_some_and(|r| r.kind.class() == RouteClass::Inference);
        // The node admission chose has no slot limit: nothing to take, nothing to wait for.
        let limited = ctx
            .nodes
            .next
            .as_ref()
            .is_some_and(|n| n.parallel.is_some());
        let (true, true, Some(caller)) = (runs_model, limited, &ctx.admission.caller) else {
            return Ok(());
        };
        let model = self.model_key(ctx);
        let Some(first) = &ctx.nodes.next else {
            return Ok(());
        };
        let ranked = if self.pool.is_pool() {
            self.pool.ranked(model.as_deref(), first)
        } else {
            vec![first.clone()]
        };
        let team = caller.team.clone();
        let asker = Asker {
            team: &team.name,
            weight: team.weight,
            max_queued: team.max_queued,
        };
        // Resolves when the client closes the connection (or resets the HTTP/2 stream) while
        // waiting. Bytes it sends meanwhile (a pipelined request, a stray CRLF) are no sign it
        // left: the connection is just not reused.
        let downstream = &mut session.downstream_session;
        let gone = async move {
            if let Err(e) = downstream.read_body_or_idle(true).await {
                if e.etype() == &pingora::ErrorType::ConnectError {
                    downstream.set_keepalive(None);
                    std::future::pending::<()>().await;
                }
            }
        };
        let granted = self
            .scheduler
            .acquire(&ranked, model.as_deref(), &asker, gone)
            .await;
        match granted {
            Ok(granted) => {
                ctx.nodes.next = Some(granted.node);
                ctx.nodes.slot = granted.slot;
                ctx.outcome.queued = Some(granted.waited);
                Ok(())
            }
            Err(why) => {
                let err = match why {
                    NoSlot::Gone => {
                        ctx.outcome.failure = Some(Failure::ClientClosed);
                        return Err(None);
                    }
                    NoSlot::Full => GatewayError::QueueFull(format!(
                        "too many requests are waiting for a model server (team '{}'); try again shortly",
                        team.name
                    )),
                    NoSlot::Timeout => {
                        GatewayError::QueueTimeout(crate::config::HumanDuration(
                            self.scheduler.queue_timeout(),
                        ))
                    }
                    NoSlot::StoreDown => self.full(super::Full::StateStore),
                };
                // Nothing reached Ollama: the team's charge is given back.
                if let Some(slot) = ctx.admission.slot.take() {
                    slot.refund();
                }
                Err(Some(err))
            }
        }
    }
}
