//! Assembles and runs the pingora server from a validated [`Config`]: the public listeners
//! (TLS, optional cleartext), the operator listener, and the background services.
//!
//! Everything that can fail is checked before pingora starts (pingora would otherwise panic on a
//! bad PEM or only log a failed bind): certificate files, the upstream URL, and every listening
//! address. Each problem names the key at fault.

use crate::access::auth::AuthFailure;
use crate::access::caps::{Budget, Caps, Counter};
use crate::access::limits::Limiter;
use crate::access::shared::{SharedLimits, StoreKeeper};
use crate::access::{Access, AccessHandle};
use crate::config::{Config, Source};
use crate::proxy::Traffic;
use crate::proxy::{ClientLimits, Full, Gateway};
use crate::runtime::admin::AdminApp;
use crate::runtime::connections::Gate;
use crate::runtime::reload::Reloader;
use crate::runtime::shutdown::{Drainer, Signals};
use crate::runtime::tls::{CertStore, CertWatcher};
use crate::state::store::Store;
use crate::telemetry::access_log::{AccessLog, AccessLogFlusher};
use crate::telemetry::metrics::Metrics;
use crate::upstream::pins::Pins;
use crate::upstream::queue::{LineKeeper, Scheduler};
use crate::upstream::supervise::Supervisor;
use crate::upstream::Pool;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Why corral could not start: one line per problem, each naming the key at fault.
#[derive(Debug)]
pub(crate) struct StartError(pub Vec<String>);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

/// What start-up needs, loaded and checked.
pub(crate) struct Prepared {
    pub(crate) source: Source,
    pub(crate) cfg: Config,
    pub(crate) certs: Option<Arc<CertStore>>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) access: Access,
    /// Things that work but are probably not what the operator wants.
    pub(crate) warnings: Vec<String>,
}

/// Loads certificates, keys and the upstream; collects every problem.
pub(crate) fn prepare(source: Source, cfg: Config) -> Result<Prepared, StartError> {
    let mut problems = Vec::new();
    let (access, warnings) = match Access::from_config(&cfg, &crate::runtime::oidc::make_fetch) {
        Ok((a, w)) => (Some(a), w),
        Err(p) => {
            problems.extend(p);
            (None, vec![])
        }
    };
    let certs = match cfg.server.listen.0 {
        None => None,
        Some(_) if cfg.server.tls_cert.as_os_str().is_empty() => match CertStore::throwaway() {
            Ok(store) => Some(Arc::new(store)),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        },
        Some(_) => match CertStore::from_files(&cfg.server.tls_cert, &cfg.server.tls_key) {
            Ok(store) => Some(Arc::new(store)),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        },
    };
    let pool = Arc::new(Pool::new(&cfg.upstream));
    match access {
        Some(access) if problems.is_empty() => Ok(Prepared {
            source,
            cfg,
            certs,
            pool,
            access,
            warnings,
        }),
        _ => Err(StartError(problems)),
    }
}

/// The shared store's URL: `state.store`, or the contents of `state.store_file`; `None` for
/// `local`.
pub(crate) fn state_store_url(cfg: &crate::config::StateConfig) -> Result<Option<String>, String> {
    if !cfg.store_file.as_os_str().is_empty() {
        let text = std::fs::read_to_string(&cfg.store_file).map_err(|e| {
            format!(
                "state.store_file = \"{}\": cannot read it ({e})",
                cfg.store_file.display()
            )
        })?;
        let url = text.trim().to_string();
        return match crate::config::state_url_problem(&url) {
            Some(why) => Err(format!(
                "state.store_file = \"{}\": {why}",
                cfg.store_file.display()
            )),
            None => Ok(Some(url)),
        };
    }
    Ok(cfg.shared().then(|| cfg.store.clone()))
}

/// Socket buffers of a client connection. pingora puts a 64 KiB read buffer under every
/// connection by default, which it keeps (resident) for the connection's life. Under TLS it is
/// pure waste: rustls reads whole records into its own buffer. On the cleartext listener one
/// TLS-record-sized buffer saves a few system calls on large uploads.
fn client_buffers(tls: bool) -> L4BufferSettings {
    L4BufferSettings::default().read(if tls { 0 } else { 16 * 1024 + 512 })
}

/// Listeners by config key, for checks and messages.
pub(crate) fn listeners(cfg: &Config) -> Vec<(&'static str, SocketAddr)> {
    [
        ("server.listen", cfg.server.listen.0),
        ("server.plain_listen", cfg.server.plain_listen.0),
        ("server.metrics_listen", cfg.server.metrics_listen.0),
    ]
    .into_iter()
    .filter_map(|(k, a)| a.map(|a| (k, a)))
    .collect()
}

/// Tries to bind every listening address (then lets go), so a taken port is reported before
/// pingora starts instead of being logged while it runs without that listener.
pub(crate) fn check_binds(cfg: &Config) -> Result<(), StartError> {
    let problems: Vec<String> = listeners(cfg)
        .into_iter()
        .filter_map(|(key, addr)| {
            let err = std::net::TcpListener::bind(addr).err()?;
            let hint = match err.kind() {
                std::io::ErrorKind::AddrInUse => "the address is in use: another program (or corral) listens there",
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE (see deploy/systemd)"
                }
                std::io::ErrorKind::AddrNotAvailable => "no network interface has this address",
                _ => "cannot listen there",
            };
            Some(format!("{key} = \"{addr}\": {hint} ({err})"))
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StartError(problems))
    }
}

/// How the process runs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RunMode {
    /// Detach and write `server.pid_file` (the parent exits once the daemon is ready).
    pub(crate) daemon: bool,
    /// Take the listening sockets over from a running corral through `server.upgrade_sock`.
    pub(crate) upgrade: bool,
}

/// Runs the gateway until it is told to stop. Returns after a fast shutdown; a graceful one
/// exits the process once the last request is done.
pub(crate) fn run(prepared: Prepared, mode: RunMode) -> Result<(), StartError> {
    if !mode.upgrade {
        // An upgrade takes the ports over from the running corral that holds them.
        check_binds(&prepared.cfg)?;
    }
    if !mode.daemon {
        crate::runtime::reload::claim_sighup();
    }
    let (source, cfg, certs, pool) = (prepared.source, prepared.cfg, prepared.certs, prepared.pool);
    for w in &prepared.warnings {
        tracing::warn!("{w}");
    }
    let access = Arc::new(AccessHandle::new(prepared.access));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());

    let conf = ServerConf {
        version: 1,
        threads,
        grace_period_seconds: Some(cfg.server.grace_period.0.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        // One single-threaded runtime per core, as nginx runs one worker per core: measurably
        // faster for a proxy than tokio's work stealing (benches/compare.rs).
        work_stealing: false,
        daemon: mode.daemon,
        daemon_wait_for_ready: mode.daemon,
        // Upstream connections are pooled per runtime thread (upstream/mod.rs): room for each.
        upstream_keepalive_pool_size: 128 * threads,
        pid_file: cfg.server.pid_file.display().to_string(),
        upgrade_sock: cfg.server.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: mode.upgrade,
        daemon: mode.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // Bootstrap (receiving sockets on --upgrade, telling the parent of a daemon it is ready) runs
    // as a service, after daemonizing; the listeners wait for it.
    let bootstrap = server.bootstrap_as_a_service();
    let phases = server.watch_execution_phase();

    let traffic = Arc::new(Traffic::default());
    let metrics = Arc::new(Metrics::new(&cfg));
    let holders: Vec<_> = pool
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), n.placement.clone()))
        .collect();
    let per_node = holders.len() > 1 || cfg.upstream.discover.is_some();
    let pins = Arc::new(Pins::new(&cfg.preload, &holders, per_node));
    let access_log = Arc::new(AccessLog::stdout(cfg.log.format));
    // Every reason is exported from the start (as 0), so a rate over it is never missing.
    for full in Full::ALL {
        metrics.requests_refused.with_label_values(&[full.label()]);
    }
    for failure in AuthFailure::ALL {
        metrics.auth_failures.with_label_values(&[failure.reason()]);
    }
    let body_memory = cfg.server.body_memory();
    if body_memory > cfg.server.max_body_memory.0 && cfg.server.max_body_memory.0 > 0 {
        tracing::warn!(
            max_body_memory = %cfg.server.max_body_memory,
            max_body = %cfg.server.max_body,
            "server.max_body_memory is less than server.max_body: using max_body, so one body of the largest size can be read"
        );
    }
    let limiter = Arc::new(Limiter::default());
    let store = match state_store_url(&cfg.state) {
        Ok(Some(url)) => Some(Store::new(url, cfg.state.clone(), metrics.clone())),
        Ok(None) => None,
        Err(e) => return Err(StartError(vec![e])),
    };
    let shared = store
        .as_ref()
        .map(|store| SharedLimits::new(store.clone(), limiter.clone()));
    let scheduler = Scheduler::new(cfg.scheduler.clone(), store.clone(), metrics.clone());
    let gateway = Gateway {
        pins: pins.clone(),
        metrics: metrics.clone(),
        pool: pool.clone(),
        access: access.clone(),
        limits: ClientLimits {
            max_body: cfg.server.max_body,
            max_header_size: cfg.server.max_header_size,
            body_timeout: cfg.server.body_timeout.0,
            header_timeout: cfg.server.header_timeout.0,
        },
        limiter: limiter.clone(),
        shared: shared.clone(),
        scheduler: scheduler.clone(),
        cors: cfg
            .server
            .cors
            .as_ref()
            .map(|c| Arc::new(crate::api::cors::Cors::new(c))),
        requests: Counter::new(Caps {
            total: cfg.server.max_requests,
            per_ip: cfg.server.requests_per_ip(),
        }),
        body_memory: Budget::new(
            body_memory,
            // One team may hold half (but always one body of the largest size).
            if body_memory == 0 {
                0
            } else {
                (body_memory / 2).max(cfg.server.max_body.0)
            },
            Some(metrics.body_memory.clone()),
        ),
        traffic: traffic.clone(),
        access_log: access_log.clone(),
    };
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "corral");
    let mut options = HttpServerOptions::default();
    // No h2c on the cleartext listener: pingora waits for a full HTTP/2 preface with no deadline
    // before it reads a request, so a client sending one byte would hold a connection forever.
    options.h2c = false;
    // Idle HTTP/2 connections close like idle HTTP/1.1 ones.
    options.h2_idle_timeout = Some(cfg.server.header_timeout.0);
    // Recycle long-lived connections now and then (as nginx's keepalive_requests does).
    options.keepalive_request_limit = Some(10_000);
    if let Some(app) = proxy.app_logic_mut() {
        app.server_options = Some(options);
        app.request_header_timeout = Some(cfg.server.header_timeout.0);
        app.upstream_request_timeout = Some(cfg.upstream.request_timeout.0);
    }
    // The TLS handshake gets the same deadline as the request header that follows it.
    let caps = Caps {
        total: cfg.server.max_connections,
        per_ip: cfg.server.max_connections_per_ip,
    };
    let gate = Gate::new(caps, cfg.server.header_timeout.0, &metrics);
    proxy.set_connection_gate(Arc::new(gate));
    if let (Some(addr), Some(certs)) = (cfg.server.listen.0, &certs) {
        let tls = certs
            .tls_settings()
            .map_err(|e| StartError(vec![e.to_string()]))?;
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string())
                .tls(tls)
                .l4_buffer(client_buffers(true)),
        );
    }
    if let Some(addr) = cfg.server.plain_listen.0 {
        proxy.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(client_buffers(false)));
    }
    server.add_service(proxy).add_dependency(&bootstrap);

    if let Some(addr) = cfg.server.metrics_listen.0 {
        let mut admin = Service::new(
            "corral admin".to_string(),
            AdminApp {
                traffic: traffic.clone(),
                metrics: metrics.clone(),
                pins: pins.clone(),
                pool: pool.clone(),
            },
        );
        admin.add_tcp(&addr.to_string());
        admin.threads = Some(1);
        server.add_service(admin).add_dependency(&bootstrap);
    }
    let reloader = Reloader {
        source,
        started: cfg.clone(),
        access: access.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        scheduler: scheduler.clone(),
    };
    server.add_service(background_service(
        "nodes",
        Supervisor {
            pool: pool.clone(),
            pins: pins.clone(),
            metrics: metrics.clone(),
            preload: cfg.preload.clone(),
        },
    ));
    server.add_service(background_service(
        "access log",
        AccessLogFlusher(access_log.clone()),
    ));
    let drainer = Drainer {
        access_log: access_log.clone(),
        traffic: traffic.clone(),
        phases: Mutex::new(Some(phases)),
    };
    server.add_service(background_service("drain", drainer));
    server.add_service(background_service("config reload", reloader));
    server.add_service(background_service(
        "identity provider keys",
        crate::runtime::oidc::KeyKeeper {
            access: access.clone(),
            metrics: metrics.clone(),
        },
    ));
    if let Some(shared) = shared {
        server.add_service(background_service("state store", StoreKeeper(shared)));
    }
    server.add_service(background_service(
        "slot line",
        LineKeeper {
            scheduler: scheduler.clone(),
            pool: pool.clone(),
        },
    ));
    if let Some(certs) = certs.filter(|c| c.watches_files()) {
        server.add_service(background_service("tls reload", CertWatcher(certs)));
    }

    for (key, addr) in listeners(&cfg) {
        tracing::info!(%addr, listener = key, "listening");
    }
    let nodes: Vec<String> = pool
        .nodes()
        .iter()
        .map(|n| format!("{}={}", n.name, n.upstream.url))
        .collect();
    tracing::info!(upstream = %nodes.join(" "), version = env!("CARGO_PKG_VERSION"), "corral started");
    crate::runtime::shutdown::note_stop_signals();
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals),
    });
    access_log.flush();
    Ok(())
}
