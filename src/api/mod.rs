//! What corral serves, as its callers see it: the route table (deny by default) and the one error
//! type, rendered in each caller's dialect. Uses only `config`'s units.

pub(crate) mod cors;
pub(crate) mod error;
pub mod routes;
