//! Reload without restart: on SIGHUP, and when the configuration file, a verification key or the
//! revocation list changes. Teams, keys, revocations and `[scheduler]` are swapped whole; requests and streams in
//! flight are not touched. A bad new configuration is refused with its reasons logged, and the
//! running one stays in force. SIGHUP also re-reads the TLS certificate.

use crate::access::{Access, AccessHandle};
use crate::config::{Config, Source};
use crate::runtime::tls::CertStore;
use crate::runtime::watch::{Snapshot, WATCH_INTERVAL};
use crate::telemetry::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Installs corral's SIGHUP handler at once, so a SIGHUP that arrives before the reloader runs
/// does not kill the process (the default action) but is remembered.
pub(crate) fn claim_sighup() {
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        rt.block_on(async {
            let _ = signal(SignalKind::hangup());
        });
    }
}

pub(crate) struct Reloader {
    pub(crate) source: Source,
    /// The configuration the process started with (what a reload cannot change).
    pub(crate) started: Config,
    pub(crate) access: Arc<AccessHandle>,
    pub(crate) certs: Option<Arc<CertStore>>,
    pub(crate) metrics: Arc<Metrics>,
    /// `[scheduler]` applies to the next requests that wait.
    pub(crate) scheduler: Arc<crate::upstream::queue::Scheduler>,
}

/// What the files a reload reads held: the configuration file, keys and revocation list.
fn snapshot(source: &Source, cfg: &Config) -> Snapshot {
    let mut files = Access::watched_files(cfg);
    if let Source::File(p) = source {
        files.push(p.clone());
    }
    Snapshot::of(files)
}

impl Reloader {
    /// Loads and applies the configuration now. Returns the new configuration.
    pub(crate) fn reload(&self) -> Result<Config, Vec<String>> {
        let cfg = Config::load(&self.source).map_err(|e| {
            e.to_string()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })?;
        let (mut access, warnings) = Access::from_config(&cfg, &crate::runtime::oidc::make_fetch)?;
        let running = self.access.current();
        if let Some(why) = crate::access::keep_revocations(&running, &mut access) {
            tracing::warn!("{why}");
        }
        crate::access::keep_fetched_keys(&running, &mut access);
        for w in warnings {
            tracing::warn!("{w}");
        }
        let teams = access.teams.len();
        let keys = access.verifier.key_ids().count();
        let revoked = access.verifier.revoked_count();
        self.access.replace(access);
        self.metrics.set_config_models(&cfg);
        self.scheduler.reconfigure(cfg.scheduler.clone());
        tracing::info!(teams, verify_keys = keys, revoked, "configuration reloaded");
        let fixed = [
            ("server", self.started.server != cfg.server),
            ("upstream", self.started.upstream != cfg.upstream),
            ("preload", self.started.preload != cfg.preload),
            ("log", self.started.log != cfg.log),
            ("state", self.started.state != cfg.state),
        ];
        let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(s, _)| *s).collect();
        if !changed.is_empty() {
            tracing::warn!(sections = ?changed, "these sections changed; they take effect only after a restart");
        }
        Ok(cfg)
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP; reload on file change only");
            return;
        };
        let mut current = self.started.clone();
        let mut seen = snapshot(&self.source, &current);
        loop {
            let forced = tokio::select! {
                _ = hup.recv() => true,
                _ = tokio::time::sleep(WATCH_INTERVAL) => false,
                _ = shutdown.changed() => return,
            };
            if forced {
                tracing::info!("SIGHUP: reloading configuration, keys and certificate");
                if let Some(certs) = &self.certs {
                    crate::runtime::tls::log_reload(certs.reload());
                }
            } else if snapshot(&self.source, &current) == seen {
                continue;
            }
            let result = self.reload();
            let label = if result.is_ok() { "ok" } else { "error" };
            self.metrics.reloads.with_label_values(&[label]).inc();
            match result {
                Ok(cfg) => current = cfg,
                Err(problems) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "configuration not reloaded; the running one stays in force");
                    }
                }
            }
            // Files named by the new configuration are watched from now on.
            seen = snapshot(&self.source, &current);
        }
    }
}
