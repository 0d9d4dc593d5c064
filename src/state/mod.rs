//! The store corral's replicas share (`[state]`, Redis or Valkey): the scripts that change team
//! limits and leases atomically on the store's clock (`scripts`), and the client with a
//! deadline on every call (`redis`). `access::shared` decides with it; this layer knows nothing
//! of teams or requests. Uses `config` only.

pub(crate) mod redis;
pub(crate) mod scripts;
