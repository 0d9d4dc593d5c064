//! For development, tests, benchmarks and `corral demo`: a throwaway certificate authority and the
//! Ollama double. Not on the request path; uses only `ollama` and `clock`.

pub mod devcert;
pub mod double;
