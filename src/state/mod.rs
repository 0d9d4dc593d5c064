//! The store corral's replicas share (`[state]`, Redis or Valkey): the scripts that change team
//! limits and leases atomically on the store's clock (`scripts`), and the client with a
//! deadline on every call (`redis`), and the connection as corral uses it: kept, timed,
//! counted, with the leases this replica holds renewed (`store`). `access::shared` (team limits)
//! and `upstream::queue` (node slots) decide with it; this layer knows nothing of teams or
//! requests. Uses `config` and `telemetry`.

pub(crate) mod redis;
pub(crate) mod scripts;
pub(crate) mod store;
