//! Team limits held in a shared store (`[state]`), so replicas agree: one script call per
//! admission and per charge, leases for requests in flight renewed while they live, and what to
//! do while the store fails (`state.on_store_error`).

use crate::access::limits::{Limit, Limiter, Refused, Slot};
use crate::access::policy::Team;
use crate::config::{OnStoreError, StateConfig};
use crate::state::redis::{Admitted, Ask, RedisStore, StoreError};
use crate::telemetry::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Revocations recorded in the store are read this often.
const REVOKED_EVERY: Duration = Duration::from_secs(1);
/// A store that fails is reported in the log at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why admission refused, beyond a team limit.
#[derive(Debug)]
pub(crate) enum Refusal {
    Limited(Refused),
    /// The store failed and `on_store_error = "deny"`.
    StoreDown,
}

pub(crate) struct SharedLimits {
    url: String,
    cfg: StateConfig,
    store: RwLock<Option<Arc<RedisStore>>>,
    /// This replica's own limits, for `on_store_error = "local"`.
    local: Arc<Limiter>,
    metrics: Arc<Metrics>,
    /// Live leases: lease id → team.
    leases: Mutex<HashMap<String, String>>,
    next_lease: AtomicU64,
    /// This process's part of every lease id.
    instance: String,
    warned: Mutex<Option<Instant>>,
    /// Key ids revoked through the store, as last read (they stay revoked until restart, like
    /// ids removed from the file: a store that loses its data un-revokes nothing).
    revoked: RwLock<std::collections::HashSet<String>>,
}

/// What a request holds in the store: its charge (refunded if refused) and its lease.
pub(crate) struct Held {
    shared: Arc<SharedLimits>,
    team: String,
    rpm: u32,
    lease: Option<String>,
}

impl Held {
    /// Gives back the request a refused request was charged.
    pub(crate) fn refund(mut self) {
        let shared = self.shared.clone();
        let (team, rpm) = (self.team.clone(), self.rpm);
        self.release();
        if rpm > 0 {
            shared.spawn("refund", move |store| async move {
                store.refund(&team, rpm).await
            });
        }
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.shared.lock_leases().remove(&lease);
            let team = self.team.clone();
            self.shared.spawn("release", move |store| async move {
                store.release(&team, &lease).await
            });
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

impl SharedLimits {
    pub(crate) fn new(
        url: String,
        cfg: StateConfig,
        local: Arc<Limiter>,
        metrics: Arc<Metrics>,
    ) -> Arc<SharedLimits> {
        // Lease ids must differ between replicas: random, else the clock and the process id.
        let mut id = [0u8; 6];
        if getrandom::fill(&mut id).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mixed = nanos ^ (u64::from(std::process::id()) << 32);
            id.copy_from_slice(&mixed.to_le_bytes()[..6]);
        }
        Arc::new(SharedLimits {
            url,
            cfg,
            store: RwLock::default(),
            local,
            metrics,
            leases: Mutex::default(),
            next_lease: AtomicU64::new(0),
            instance: id.iter().map(|b| format!("{b:02x}")).collect(),
            warned: Mutex::default(),
            revoked: RwLock::default(),
        })
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self) -> Option<Arc<RedisStore>> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A store call failed: counted, the gauge down, a warning at most once a minute.
    fn failed(&self, op: &str, e: &StoreError) {
        self.metrics.store_errors.with_label_values(&[op]).inc();
        self.metrics.store_up.set(0);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(op, error = %e, on_store_error = ?self.cfg.on_store_error, "the state store failed; limits follow state.on_store_error until it answers");
        }
    }

    /// Runs a store call in the background (charges, refunds, releases), timed and counted.
    fn spawn<F, Fut>(self: &Arc<Self>, op: &'static str, call: F)
    where
        F: FnOnce(Arc<RedisStore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), StoreError>> + Send,
    {
        let Some(store) = self.store() else {
            return;
        };
        let shared = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = call(store).await;
            shared.observe(op, started, result.as_ref().err());
        });
    }

    fn observe(&self, op: &str, started: Instant, error: Option<&StoreError>) {
        self.metrics
            .store_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        match error {
            Some(e) => self.failed(op, e),
            None => self.metrics.store_up.set(1),
        }
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
        let lease = concurrent.then(|| {
            let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
            format!("{}-{n}", self.instance)
        });
        let ask = Ask {
            team: &team.name,
            rpm: team.rpm,
            tpm: team.tpm,
            max_concurrent: team.max_concurrent,
            inference,
            lease: lease.as_deref().unwrap_or(""),
            lease_ttl: self.cfg.lease_ttl.0,
        };
        let started = Instant::now();
        let answer = match self.store() {
            Some(store) => store.admit(&ask).await,
            None => Err(StoreError::Deadline),
        };
        self.observe("admit", started, answer.as_ref().err());
        match answer {
            Ok(Admitted::Yes) => {
                if let Some(lease) = &lease {
                    self.lock_leases().insert(lease.clone(), team.name.clone());
                }
                let mut slot = Slot::free();
                slot.shared = Some(Held {
                    shared: self.clone(),
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
                if let Some(lease) = lease {
                    let team = team.name.clone();
                    self.spawn("release", move |store| async move {
                        store.release(&team, &lease).await
                    });
                }
                self.fallback(team, inference)
            }
        }
    }

    /// Admission while the store fails, as `on_store_error` says.
    fn fallback(&self, team: &Team, inference: bool) -> Result<Slot, Refusal> {
        match self.cfg.on_store_error {
            OnStoreError::Local => self
                .local
                .admit(team, inference, Instant::now())
                .map_err(Refusal::Limited),
            OnStoreError::Deny => Err(Refusal::StoreDown),
            OnStoreError::Allow => Ok(Slot::free()),
        }
    }

    /// Charges the tokens a finished answer used (in the background; the local limiter too, so
    /// a fallback after a store failure knows the team's recent use).
    pub(crate) fn charge(self: &Arc<Self>, team: &Team, tokens: u64) {
        self.local.charge(team, tokens, Instant::now());
        if team.tpm == 0 || tokens == 0 {
            return;
        }
        let (name, tpm) = (team.name.clone(), team.tpm);
        self.spawn("charge", move |store| async move {
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
        let Some(store) = self.store() else {
            return;
        };
        let started = Instant::now();
        let ids = store.revoked().await;
        self.observe("revoked", started, ids.as_ref().err());
        if let Ok(ids) = ids {
            let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
            revoked.extend(ids.into_iter().map(|id| id.to_ascii_lowercase()));
        }
    }

    /// Connects to the store until it answers.
    async fn connect(&self) -> bool {
        match RedisStore::connect(&self.url, &self.cfg.key_prefix, self.cfg.timeout.0).await {
            Ok(store) => {
                *self.store.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(store));
                self.metrics.store_up.set(1);
                tracing::info!(store = %crate::config::redact_store_url(&self.url), "state store connected");
                true
            }
            Err(e) => {
                self.failed("connect", &e);
                false
            }
        }
    }

    /// Renews every live lease (a lease the store lost is taken again).
    async fn renew_all(&self) {
        let Some(store) = self.store() else {
            return;
        };
        let live: Vec<(String, String)> = self
            .lock_leases()
            .iter()
            .map(|(l, t)| (l.clone(), t.clone()))
            .collect();
        for (lease, team) in live {
            // Ended meanwhile: renewing would bring its place back.
            if !self.lock_leases().contains_key(&lease) {
                continue;
            }
            let started = Instant::now();
            let result = store.renew(&team, &lease, self.cfg.lease_ttl.0).await;
            self.observe("renew", started, result.as_ref().err());
            if result.is_err() {
                // The store is failing: the next pass tries again, without waiting out one
                // deadline per live request.
                return;
            }
        }
    }
}

/// Connects to the store (retrying until it answers) and renews live leases.
pub(crate) struct StoreKeeper(pub(crate) Arc<SharedLimits>);

#[async_trait]
impl BackgroundService for StoreKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut wait = Duration::from_millis(200);
        while !self.0.connect().await {
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
        while crate::clock::pause(self.0.cfg.lease_ttl.0 / 3, &mut shutdown).await {
            self.0.renew_all().await;
        }
        revocations.abort();
    }
}
