//! What corral tells operators: the JSON access log on stdout (one line per request), its own
//! operational log on stderr, and the Prometheus metrics. Uses `config` and `ollama` (model
//! names, for bounded labels).

pub(crate) mod access_log;
pub(crate) mod metrics;

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Operational logging on stderr, in JSON or for humans. pingora's own `log` records are bridged
/// in and kept at `warn` unless the filter names them.
pub(crate) fn init_logging(cfg: &LogConfig) {
    let mut filter = cfg.level.clone();
    if !filter.contains("pingora") {
        filter.push_str(",pingora=warn,pingora_core=warn,pingora_proxy=warn");
    }
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // A second init in one process (tests) keeps the first subscriber.
    let _ = result;
}

/// Flushes buffered log output before the process exits.
pub(crate) fn flush() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}
