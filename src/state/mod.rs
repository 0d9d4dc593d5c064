//! State replicas share: team limits (rpm, tpm), in-flight leases (`max_concurrent`, node
//! slots) and revocations. WORK IN PROGRESS (issue 16), not yet wired into the request path.
//!
//! The plan, for the next step:
//! - `Store::Local` is today's `access::limits::Limiter`; `Store::Redis` holds a `redis`
//!   `ConnectionManager` (async, reconnects by itself), created by a background task so a store
//!   that is down at start does not stop corral.
//! - Admission: one `ADMIT` script call (one round trip) under `state.timeout`; on error or
//!   deadline, `on_store_error` decides (this replica's `Limiter`, 503, or no limit), the error is
//!   counted in `corral_state_store_errors_total{op}`, `corral_state_store_up` goes 0, and a
//!   warning is logged at most once a minute.
//! - `Slot` holds the lease id; a per-replica task renews every live lease every 10 s (ttl 30 s,
//!   `RENEW`, which takes a lapsed lease again) and a dropped `Slot` releases its lease (`ZREM`,
//!   spawned). A replica killed with SIGKILL frees its slots when they lapse.
//! - `charge` runs `CHARGE` when an answer ends; `refund` runs `REFUND`.
//! - Revocations: `keys revoke` also `SADD {prefix}revoked id`; every replica reads the set each
//!   second and unions it with the file (a store that lost its data cannot un-revoke a key the
//!   file lists; ids seen once stay revoked until restart, as with the file).

pub(crate) mod redis;
pub(crate) mod scripts;
