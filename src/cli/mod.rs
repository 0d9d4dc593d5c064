//! The `corral` command line: arguments, and one file per command that needs more than a few
//! lines (`check`, `demo`, `keys`). The top layer: uses every layer below it.

pub(crate) mod check;
pub(crate) mod demo;
pub(crate) mod keys;

use keys::KeysCommand;

use crate::config::{Config, HumanDuration, Source};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "corral", version = crate::LONG_VERSION, about = "A hardened gateway in front of Ollama: TLS, per-team API keys, request log, metrics, pinned models.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file (else $CORRAL_CONFIG, else ./config/corral.toml, else built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run in the background, writing server.pid_file (for systemd Type=forking).
        #[arg(long, short)]
        daemon: bool,
        /// Take the listening sockets over from the corral running now (send it SIGQUIT): a
        /// binary upgrade or restart without refusing a single connection.
        #[arg(long, short)]
        upgrade: bool,
    },
    /// Validate the configuration, certificate and keys, and ask the upstream whether it answers.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not contact the upstream (e.g. in ExecStartPre, before Ollama is up).
        #[arg(long)]
        skip_upstream: bool,
    },
    /// A working gateway on loopback in front of the built-in Ollama double, with examples.
    Demo {
        /// TLS listener of the demo gateway.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// /livez, /readyz and /metrics.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_listen: SocketAddr,
        /// Where to write the certificate, keys and configuration (default: a new temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Delay between generated tokens.
        #[arg(long, default_value = "50ms")]
        token_delay: HumanDuration,
    },
    /// Run a bare pingora proxy (pingora's minimal proxy, corral's TLS and runtime settings), the
    /// baseline `cargo bench --bench compare` measures corral against.
    #[command(hide = true)]
    BareProxy {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long)]
        tls_cert: PathBuf,
        #[arg(long)]
        tls_key: PathBuf,
        /// The one API key it accepts (as `Authorization: Bearer KEY`).
        #[arg(long)]
        api_key: String,
    },
    /// Make signing keys and API keys, inspect and revoke keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run only the Ollama double (the fake Ollama used by tests, benchmarks and the demo).
    #[command(hide = true)]
    Double {
        #[arg(long, default_value = "127.0.0.1:11434")]
        listen: SocketAddr,
        #[arg(long, default_value = "20ms")]
        token_delay: HumanDuration,
        /// Tokens per answer when the request sets no limit.
        #[arg(long, default_value_t = 12)]
        tokens: usize,
        /// Also serve a model whose streams break off after 3 tokens (to see truncated streams).
        #[arg(long)]
        failing_model: Option<String>,
        /// OLLAMA_NUM_PARALLEL: runs at once per model; the rest wait in line.
        #[arg(long)]
        parallel: Option<usize>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            daemon,
            upgrade,
        } => serve(config, crate::runtime::server::RunMode { daemon, upgrade }),
        Command::Check {
            config,
            skip_upstream,
        } => {
            let findings =
                crate::cli::check::run(&Source::locate(config.as_deref()), !skip_upstream);
            for f in &findings {
                println!("{f}");
            }
            if findings
                .iter()
                .any(|f| matches!(f, crate::cli::check::Finding::Error(_)))
            {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Demo {
            listen,
            metrics_listen,
            dir,
            token_delay,
        } => {
            let opts = crate::cli::demo::DemoOptions {
                listen,
                metrics_listen,
                dir,
                token_delay: token_delay.0,
            };
            match crate::cli::demo::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Double {
            listen,
            token_delay,
            tokens,
            failing_model,
            parallel,
        } => double(listen, token_delay, tokens, failing_model, parallel),
        Command::BareProxy {
            listen,
            upstream,
            tls_cert,
            tls_key,
            api_key,
        } => match crate::dev::bare_proxy::run(listen, upstream, &tls_cert, &tls_key, &api_key) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Keys(cmd) => match keys::keys(cmd) {
            Ok(code) => code,
            Err(e) => fail(&e),
        },
    }
}

fn fail(message: &str) -> ExitCode {
    for line in message.lines() {
        eprintln!("corral: {line}");
    }
    ExitCode::FAILURE
}

fn serve(config: Option<PathBuf>, mode: crate::runtime::server::RunMode) -> ExitCode {
    let source = Source::locate(config.as_deref());
    let cfg = match Config::load(&source) {
        Ok(cfg) => cfg,
        Err(e) => return fail(&e.to_string()),
    };
    crate::telemetry::init_logging(&cfg.log);
    if source == Source::BuiltIn {
        eprintln!(
            "corral: no configuration file (looked at --config, $CORRAL_CONFIG and ./{}); running on built-in defaults:\n\
             corral:   TLS on {} with a throwaway self-signed certificate, upstream {}, metrics on {};\n\
             corral:   no verification keys and no teams, so every API key is refused. See config/corral.toml.",
            crate::config::DEFAULT_CONFIG_PATH,
            cfg.server.listen.0.map(|a| a.to_string()).unwrap_or_default(),
            cfg.upstream.url(),
            cfg.server.metrics_listen.0.map(|a| a.to_string()).unwrap_or_default(),
        );
    }
    let prepared = match crate::runtime::server::prepare(source, cfg) {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string()),
    };
    match crate::runtime::server::run(prepared, mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

fn double(
    listen: SocketAddr,
    token_delay: HumanDuration,
    tokens: usize,
    failing_model: Option<String>,
    parallel: Option<usize>,
) -> ExitCode {
    let mut cfg = crate::dev::double::DoubleConfig {
        token_delay: token_delay.0,
        response_tokens: tokens,
        parallel,
        ..Default::default()
    };
    if let Some(name) = failing_model {
        cfg.models
            .push(crate::dev::double::ModelSpec::chat(&name).failing_after(3));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    runtime.block_on(async {
        let double = match crate::dev::double::OllamaDouble::start_on(listen, cfg).await {
            Ok(d) => d,
            Err(e) => return fail(&format!("cannot listen on {listen}: {e}")),
        };
        // The first line on stdout is the address, for scripts.
        println!("{}", double.url());
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}
