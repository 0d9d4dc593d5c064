//! The shared store as the rest of corral uses it: connected in the background (until it
//! answers), every call timed and counted, failures reported at most once a minute, and the
//! leases this replica holds (team places, node slots) renewed while their requests live.

use super::redis::{RedisStore, StoreError};
use crate::config::{OnStoreError, StateConfig};
use crate::telemetry::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A store that fails is reported in the log at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Store {
    url: String,
    cfg: StateConfig,
    conn: RwLock<Option<Arc<RedisStore>>>,
    metrics: Arc<Metrics>,
    /// Live leases: lease id → the set it is in.
    leases: Mutex<HashMap<String, String>>,
    next_lease: AtomicU64,
    /// This process's part of every lease id.
    instance: String,
    warned: Mutex<Option<Instant>>,
}

impl Store {
    pub(crate) fn new(url: String, cfg: StateConfig, metrics: Arc<Metrics>) -> Arc<Store> {
        // Lease ids must differ between replicas: random, else the clock and the process id.
        let mut id = [0u8; 6];
        if getrandom::fill(&mut id).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mixed = nanos ^ (u64::from(std::process::id()) << 32);
            id.copy_from_slice(&mixed.to_le_bytes()[..6]);
        }
        Arc::new(Store {
            url,
            cfg,
            conn: RwLock::default(),
            metrics,
            leases: Mutex::default(),
            next_lease: AtomicU64::new(0),
            instance: id.iter().map(|b| format!("{b:02x}")).collect(),
            warned: Mutex::default(),
        })
    }

    pub(crate) fn on_error(&self) -> OnStoreError {
        self.cfg.on_store_error
    }

    pub(crate) fn lease_ttl(&self) -> Duration {
        self.cfg.lease_ttl.0
    }

    /// The connection, once made.
    pub(crate) fn redis(&self) -> Option<Arc<RedisStore>> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lease id no other request of any replica has.
    pub(crate) fn new_lease(&self) -> String {
        let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    /// The store took `lease` in the set `key`: it is renewed until [`let_go`](Self::let_go).
    pub(crate) fn hold(&self, lease: &str, key: String) {
        self.lock_leases().insert(lease.to_string(), key);
    }

    /// The request holding `lease` ended: its place is given back (in the background).
    pub(crate) fn let_go(self: &Arc<Self>, lease: String) {
        if let Some(key) = self.lock_leases().remove(&lease) {
            self.spawn("release", move |store| async move {
                store.release(&key, &lease).await
            });
        }
    }

    /// A call that would have taken `lease` in the set `key` got no answer in time: the store
    /// may have taken it all the same, so it is released rather than left to lapse.
    pub(crate) fn let_go_late(self: &Arc<Self>, lease: &str, key: String) {
        self.hold(lease, key);
        self.let_go(lease.to_string());
    }

    /// A store call failed: counted, the gauge down, a warning at most once a minute.
    pub(crate) fn failed(&self, op: &str, e: &StoreError) {
        self.metrics.store_errors.with_label_values(&[op]).inc();
        self.metrics.store_up.set(0);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(op, error = %e, on_store_error = ?self.cfg.on_store_error, "the state store failed; limits follow state.on_store_error until it answers");
        }
    }

    /// A store call ended: its time, and the store's health.
    pub(crate) fn observe(&self, op: &str, started: Instant, error: Option<&StoreError>) {
        self.metrics
            .store_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        match error {
            Some(e) => self.failed(op, e),
            None => self.metrics.store_up.set(1),
        }
    }

    /// Runs a store call in the background (charges, refunds, releases), timed and counted.
    pub(crate) fn spawn<F, Fut>(self: &Arc<Self>, op: &'static str, call: F)
    where
        F: FnOnce(Arc<RedisStore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), StoreError>> + Send,
    {
        let Some(store) = self.redis() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = call(store).await;
            this.observe(op, started, result.as_ref().err());
        });
    }

    /// Connects to the store; false while it does not answer.
    pub(crate) async fn connect(&self) -> bool {
        match RedisStore::connect(&self.url, &self.cfg.key_prefix, self.cfg.timeout.0).await {
            Ok(store) => {
                *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(store));
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
    pub(crate) async fn renew_all(&self) {
        let Some(store) = self.redis() else {
            return;
        };
        let live: Vec<(String, String)> = self
            .lock_leases()
            .iter()
            .map(|(l, k)| (l.clone(), k.clone()))
            .collect();
        for (lease, key) in live {
            // Ended meanwhile: renewing would bring its place back.
            if !self.lock_leases().contains_key(&lease) {
                continue;
            }
            let started = Instant::now();
            let result = store.renew(&key, &lease, self.cfg.lease_ttl.0).await;
            self.observe("renew", started, result.as_ref().err());
            if result.is_err() {
                // The store is failing: the next pass tries again, without waiting out one
                // deadline per live request.
                return;
            }
        }
    }
}
