//! Team limits held in a shared store (`[state]`), so replicas agree: one script call per
//! admission and per charge, leases for requests in flight renewed while they live, and what to
//! do while the store fails (`state.on_store_error`).

use crate::access::limits::{Limit, Limiter, Refused, Slot};
use crate::access::policy::Team;
use crate::config::OnStoreError;
use crate::state::redis::{Admitted, Ask};
use crate::state::store::Store;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Revocations recorded in the store are read this often.
const REVOKED_EVERY: Duration = Duration::from_secs(1);

/// Why admission refused, beyond a team limit.
#[derive(Debug)]
pub(crate) enum Refusal {
    Limited(Refused),
    /// The store failed and `on_store_error = "deny"`.
    StoreDown,
}

pub(crate) struct SharedLimits {
    pub(crate) store: Arc<Store>,
    /// This replica's own limits, for `on_store_error = "local"`.
    local: Arc<Limiter>,
    /// Key ids revoked through the store, as last read (they stay revoked until restart, like
    /// ids removed from the file: a store that loses its data un-revokes nothing).
    revoked: RwLock<HashSet<String>>,
}

/// What a request holds in the store: its charge (refunded if refused) and its lease.
pub(crate) struct Held {
    store: Arc<Store>,
    team: String,
    rpm: u32,
    lease: Option<String>,
}

impl Held {
    /// Gives back the request a refused request was charged.
    pub(crate) fn refund(mut self) {
        let (team, rpm) = (self.team.clone(), self.rpm);
        if let Some(lease) = self.lease.take() {
            self.store.let_go(lease);
        }
        if rpm > 0 {
            self.store.spawn("refund", move |store| async move {
                store.refund(&team, rpm).await
            });
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.store.let_go(lease);
        }
    }
}

impl SharedLimits {
    pub(crate) fn new(store: Arc<Store>, local: Arc<Limiter>) -> Arc<SharedLimits> {
        Arc::new(SharedLimits {
            store,
            local,
            revoked: RwLock::default(),
        })
    }

    /// Admits a request of `team` against the shared limits.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        team: &Team,
        inference: bool,
    ) -> Result<Slot, Refusal> {
        let concurrent = inference && team.max_concurrent > 0;
        let needs_store = team.rpm > 0 || (inference && (team.tpm > 0 || concurrent));
        if !needs_store {
            return Ok(Slot::free());
        }
        let lease = concurrent.then(|| self.store.new_lease());
        let ask = Ask {
            team: &team.name,
            rpm: team.rpm,
            tpm: team.tpm,
            max_concurrent: team.max_concurrent,
            inference,
            lease: lease.as_deref().unwrap_or(""),
            lease_ttl: self.store.lease_ttl(),
        };
        let started = Instant::now();
        let redis = self.store.redis();
        let answer = match &redis {
            Some(store) => store.admit(&ask).await,
            None => Err(crate::state::redis::StoreError::Deadline),
        };
        self.store.observe("admit", started, answer.as_ref().err());
        match answer {
            Ok(Admitted::Yes) => {
                if let (Some(lease), Some(redis)) = (&lease, &redis) {
                    self.store.hold(lease, redis.team_leases(&team.name));
                }
                let mut slot = Slot::free();
                slot.shared = Some(Held {
                    store: self.store.clone(),
                    team: team.name.clone(),
                    rpm: team.rpm,
                    lease,
                });
                Ok(slot)
            }
            Ok(Admitted::No {
                limit,
                retry_after_ms,
            }) => Err(Refusal::Limited(Refused {
                limit: match limit {
                    1 => Limit::Rpm,
                    2 => Limit::Tpm,
                    _ => Limit::Concurrency,
                },
                retry_after: Duration::from_millis(retry_after_ms),
            })),
            Err(_) => {
                // The script may have run after all (the answer came too late): its lease would
                // hold a place for nothing until it lapses.
                if let (Some(lease), Some(redis)) = (lease, &redis) {
                    self.store
                        .let_go_late(&lease, redis.team_leases(&team.name));
                }
                self.fallback(team, inference)
            }
        }
    }

    /// Admission while the store fails, as `on_store_error` says.
    fn fallback(&self, team: &Team, inference: bool) -> Result<Slot, Refusal> {
        match self.store.on_error() {
            OnStoreError::Local => self.local.admit(team, inference).map_err(Refusal::Limited),
            OnStoreError::Deny => Err(Refusal::StoreDown),
            OnStoreError::Allow => Ok(Slot::free()),
        }
    }

    /// Charges the tokens a finished answer used (in the background; the local limiter too, so
    /// a fallback after a store failure knows the team's recent use).
    pub(crate) fn charge(self: &Arc<Self>, team: &Team, tokens: u64) {
        self.local.charge(team, tokens);
        if team.tpm == 0 || tokens == 0 {
            return;
        }
        let (name, tpm) = (team.name.clone(), team.tpm);
        self.store.spawn("charge", move |store| async move {
            store.charge(&name, tpm, tokens).await
        });
    }

    /// Whether a key id was revoked through the store.
    pub(crate) fn is_revoked(&self, id: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id.to_ascii_lowercase())
    }

    /// Reads the revoked ids again (every second).
    async fn refresh_revoked(&self) {
        let Some(store) = self.store.redis() else {
            return;
        };
        let started = Instant::now();
        let ids = store.revoked().await;
        self.store.observe("revoked", started, ids.as_ref().err());
        if let Ok(ids) = ids {
            let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
            revoked.extend(ids.into_iter().map(|id| id.to_ascii_lowercase()));
        }
    }
}

/// Connects to the store (retrying until it answers) and renews live leases.
pub(crate) struct StoreKeeper(pub(crate) Arc<SharedLimits>);

#[async_trait]
impl BackgroundService for StoreKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut wait = Duration::from_millis(200);
        while !self.0.store.connect().await {
            if !crate::clock::pause(wait, &mut shutdown).await {
                return;
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        // Revocations are read on their own schedule, whatever renewals take.
        let shared = self.0.clone();
        let mut revoked_shutdown = shutdown.clone();
        let revocations = tokio::spawn(async move {
            loop {
                shared.refresh_revoked().await;
                if !crate::clock::pause(REVOKED_EVERY, &mut revoked_shutdown).await {
                    return;
                }
            }
        });
        // Three renewals per lease time: one lost call never costs a live request its place.
        while crate::clock::pause(self.0.store.lease_ttl() / 3, &mut shutdown).await {
            self.0.store.renew_all().await;
        }
        revocations.abort();
    }
}
