//! The state a double's requests share: model store, blobs, request log, counters, knobs.

use super::api::Recorded;
use super::models::Store;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub(crate) struct State {
    pub(super) store: Mutex<Store>,
    pub(super) blobs: Mutex<HashSet<String>>,
    pub(super) log: Mutex<Vec<Recorded>>,
    pub(super) disconnects: AtomicU64,
    pub(super) completed: AtomicU64,
    pub(super) token_delay_us: AtomicU64,
    pub(super) hang: AtomicBool,
    pub(super) response_tokens: usize,
    pub(super) host_guard: bool,
    pub(super) unpullable: Vec<String>,
    pub(super) failing_pulls: AtomicU32,
    pub(super) pulls: AtomicU64,
    pub(super) counter: AtomicU64,
    /// `OLLAMA_NUM_PARALLEL`: runs at once per model; `None`: no limit.
    pub(super) parallel: Option<usize>,
    /// `OLLAMA_MAX_QUEUE`: runs waiting for a slot, beyond which a run is refused with 503.
    pub(super) max_queue: usize,
    pub(super) queued: AtomicUsize,
    /// Each model runner's slots, by digest.
    pub(super) slots: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl State {
    pub(super) fn token_delay(&self) -> Duration {
        Duration::from_micros(self.token_delay_us.load(Ordering::Relaxed))
    }

    pub(super) fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Digests (lowercase hex) of the blobs uploaded to `/api/blobs`.
    pub(super) fn blobs(&self) -> MutexGuard<'_, HashSet<String>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slots of the runner with `digest`, when runs are limited.
    pub(super) fn slots(&self, digest: &str) -> Option<Arc<tokio::sync::Semaphore>> {
        let n = self.parallel?;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let sem = slots
            .entry(digest.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(n)));
        Some(sem.clone())
    }

    /// Every request received, in order.
    pub(super) fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}
