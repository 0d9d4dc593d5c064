//! `corral keys`: signing keys, API keys, inspecting and revoking them (in the revocation list,
//! and in the shared state store when one is configured).

use crate::config::{Config, HumanDuration, Source};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Make an Ed25519 signing key pair: DIR/ID.key.pem (mode 0600, keep it secret) and
    /// DIR/ID.pub.pem (for auth.verify_keys on every gateway).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Key id; API keys signed with it name it as their `kid`. Default: corral-YEAR.
        #[arg(long)]
        id: Option<String>,
    },
    /// Print a new API key on stdout (only the key; everything else goes to stderr).
    Issue {
        /// The private key made by `keys init` (ID.key.pem).
        #[arg(long)]
        signing_key: PathBuf,
        /// The team the key belongs to (a [teams.NAME] table in the gateway's config).
        #[arg(long)]
        team: String,
        /// A label for humans (who or what uses the key).
        #[arg(long)]
        name: Option<String>,
        /// Narrow the team's models for this key, e.g. 'llama3.2:*,nomic-embed-text'.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Expire after this long, e.g. 90d, 12h. Default: never.
        #[arg(long)]
        expires: Option<HumanDuration>,
        /// The gateway's configuration, to check that the team exists (else $CORRAL_CONFIG,
        /// else ./config/corral.toml; without any, the team is not checked).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the keys issued with a signing key (from its ledger, ID.issued.jsonl beside it) and
    /// whether each is active, expired, or, with a configuration, revoked (its
    /// auth.revoked_file and shared state store) or of a team it no longer has.
    List {
        /// The private key the keys were issued with (ID.key.pem).
        #[arg(long)]
        signing_key: PathBuf,
        /// Only this team's keys.
        #[arg(long)]
        team: Option<String>,
        /// The gateway's configuration (else $CORRAL_CONFIG, else ./config/corral.toml; without
        /// any, revocations are not shown).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON object per line (the ledger's record and a `status`), for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show a key's claims and whether the configuration accepts it (and why not).
    /// Give the key as an argument, or `-` to read it from stdin.
    Inspect {
        key: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Add a key (or a key id) to a revocation list: the one auth.revoked_file names, or
    /// --file. Gateways reading that file refuse the key within a second; in Kubernetes the list
    /// reaches them through a ConfigMap (--kubernetes).
    Revoke {
        key_or_id: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The revocation list to add to, instead of the configuration's auth.revoked_file (for
        /// example config/revoked.txt, which the Kubernetes ConfigMap is made from).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The kustomize overlay whose ConfigMap carries the list given with --file (e.g.
        /// deploy/kubernetes/overlays/production): prints how to apply the change.
        #[arg(long, value_name = "OVERLAY", requires = "file")]
        kubernetes: Option<PathBuf>,
        /// With --kubernetes: run `kubectl apply -k OVERLAY` now.
        #[arg(long, requires = "kubernetes")]
        apply: bool,
        /// KEY_OR_ID is the id of a single sign-on token ([auth.oidc.*]), as the access log's
        /// key_id shows it, rather than a corral key id.
        #[arg(long)]
        sso: bool,
    },
}

/// The revocation list `keys revoke` adds to: `--file`, or the configuration's
/// `auth.revoked_file` when it is on this machine.
fn revocation_list(
    file: Option<PathBuf>,
    config: Option<&std::path::Path>,
    id: &str,
) -> Result<PathBuf, String> {
    if let Some(f) = file {
        return Ok(f);
    }
    let source = Source::locate(config);
    let cfg = Config::load(&source).map_err(|e| e.to_string())?;
    if cfg.auth.revoked_file.as_os_str().is_empty() {
        return Err(format!(
            "{}: auth.revoked_file is not set; set it (or give --file) to revoke keys",
            source.describe()
        ));
    }
    let list = cfg.auth.revoked_file;
    if list.parent().is_some_and(|d| !d.is_dir()) {
        return Err(format!(
            "{}: auth.revoked_file = \"{}\" is where the gateway reads its list, and that folder is not on this machine.\n\
             If the gateway runs in Kubernetes, revoke into the list its ConfigMap is made from:\n\
             corral keys revoke {id} --file config/revoked.txt --kubernetes deploy/kubernetes/overlays/production",
            source.describe(),
            list.display()
        ));
    }
    Ok(list)
}

/// Records a revoked key id in the shared state store.
fn record_revocation(url: &str, prefix: &str, id: &str) -> Result<(), String> {
    with_store(url, prefix, async |store| store.revoke(id).await)
}

pub(crate) fn keys(cmd: KeysCommand) -> Result<ExitCode, String> {
    use crate::access::keys;
    match cmd {
        KeysCommand::Init { dir, id } => {
            let id = id.unwrap_or_else(|| format!("corral-{}", current_year()));
            let (private, public) = keys::init(&dir, &id)?;
            eprintln!(
                "signing key (keep it secret, off the gateways): {}",
                private.display()
            );
            eprintln!(
                "verification key (add to auth.verify_keys):     {}",
                public.display()
            );
            eprintln!(
                "issue API keys with: corral keys issue --signing-key {} --team TEAM",
                private.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Issue {
            signing_key,
            team,
            name,
            models,
            expires,
            config,
        } => {
            if !crate::config::valid_team_name(&team) {
                return Err(format!(
                    "--team `{team}`: team names are lowercase letters, digits, '-' and '_'"
                ));
            }
            check_team(&team, config.as_deref())?;
            if expires.is_some_and(|d| d.0.as_secs() < 60) {
                return Err(
                    "--expires: a key must live at least a minute (e.g. 90d, 12h, 30m)".into(),
                );
            }
            let request = keys::IssueRequest {
                team,
                name,
                models,
                expires_in: expires.map(|d| d.0),
            };
            let (key, claims) = keys::issue(&signing_key, &request, crate::clock::unix_now())?;
            println!("{key}");
            let expiry = claims.exp.map_or("never expires".to_string(), |e| {
                format!("expires at {}", rfc3339(e))
            });
            eprintln!(
                "issued key {} for team `{}`; it {expiry}",
                claims.jti, claims.sub
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::List {
            signing_key,
            team,
            config,
            json,
        } => list(&signing_key, team.as_deref(), config.as_deref(), json),
        KeysCommand::Inspect { key, config } => {
            let key = read_key_arg(key)?;
            if let Some(issuer) = crate::access::oidc::claimed_issuer(&key) {
                // A single sign-on token: its claims are the provider's, not a corral key's.
                let claims = token_claims(&key)?;
                let text = |name: &str| match &claims[name] {
                    serde_json::Value::Null => "-".to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                println!("issuer:  {issuer}");
                println!("subject: {}", text("sub"));
                println!("audience: {}", text("aud"));
                println!("token id: {}", text("jti"));
                println!(
                    "expires: {}",
                    claims["exp"].as_u64().map_or("-".to_string(), rfc3339)
                );
                return verdict(&key, config.as_deref());
            }
            let (header, claims) = keys::peek(&key)?;
            println!("kid:     {}", header.kid.as_deref().unwrap_or("(none)"));
            println!("alg:     {:?}", header.alg);
            println!("team:    {}", claims.sub);
            println!("key id:  {}", claims.jti);
            println!("name:    {}", claims.name.as_deref().unwrap_or("-"));
            println!("issued:  {}", rfc3339(claims.iat));
            println!(
                "expires: {}",
                claims.exp.map_or("never".to_string(), rfc3339)
            );
            println!(
                "models:  {}",
                claims
                    .models
                    .as_ref()
                    .map_or("(the team's)".to_string(), |m| m.join(", "))
            );
            verdict(&key, config.as_deref())
        }
        KeysCommand::Revoke {
            key_or_id,
            config,
            file,
            kubernetes,
            apply,
            sso,
        } => {
            let arg = read_key_arg(key_or_id)?;
            let (id, sso) = match crate::access::oidc::claimed_issuer(&arg) {
                // A single sign-on token: its jti.
                Some(_) => (token_claims(&arg)?["jti"].as_str().map(str::to_string).ok_or(
                    "the token has no `jti`, so it cannot be revoked by id; remove its team mapping or wait for it to expire",
                )?, true),
                None if arg.matches('.').count() == 2 => (keys::peek(&arg)?.1.jti, false),
                None => (arg, sso),
            };
            keys::check_key_id(&id, sso)?;
            // Ids are kept lowercase, wherever they are kept.
            let id = id.to_ascii_lowercase();
            // With a configuration that names a shared store, the id goes there first: every
            // replica refuses the key within a second, even where the file cannot be written
            // (inside a pod, where it is a ConfigMap).
            let stored = match (&file, &config) {
                (Some(_), None) => false,
                _ => match Config::load(&Source::locate(config.as_deref())) {
                    Ok(cfg) => match crate::runtime::server::state_store_url(&cfg.state)? {
                        Some(url) => {
                            record_revocation(&url, &cfg.state.key_prefix, &id)?;
                            eprintln!(
                                "recorded in the state store {}: every gateway that shares it refuses the key within a second",
                                crate::config::redact_store_url(&url)
                            );
                            true
                        }
                        None => false,
                    },
                    // Reported below, where the file is looked for.
                    Err(_) => false,
                },
            };
            let list = match revocation_list(file, config.as_deref(), &id) {
                Ok(list) => list,
                Err(e) if stored => {
                    eprintln!("warning: {e}\nthe key is refused through the state store; add it to the list too, so it stays revoked if the store is emptied");
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e),
            };
            let shown = list.display();
            match keys::revoke(&list, &id, sso) {
                Ok(true) => eprintln!("revoked key {id} in {shown}"),
                Ok(false) => eprintln!("key {id} was already revoked in {shown}"),
                Err(e) if stored => {
                    eprintln!("warning: {e}\nthe key is refused through the state store; add it to {shown} too, so it stays revoked if the store is emptied");
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e),
            }
            match kubernetes {
                None => eprintln!(
                    "gateways that read {shown} (their auth.revoked_file) refuse the key within a second"
                ),
                Some(overlay) if apply => {
                    // The overlay must really carry this list: apply nothing that would not
                    // revoke the key.
                    let rendered = std::process::Command::new("kubectl")
                        .arg("kustomize")
                        .arg(&overlay)
                        .output()
                        .map_err(|e| format!("cannot run kubectl: {e}"))?;
                    if !rendered.status.success()
                        || !String::from_utf8_lossy(&rendered.stdout).contains(&id.to_ascii_lowercase())
                    {
                        return Err(format!(
                            "{} does not carry {shown} (the rendered overlay has no {id}); nothing applied. Give the list the overlay's ConfigMap is made from (config/revoked.txt for the shipped overlays) with --file",
                            overlay.display()
                        ));
                    }
                    let status = std::process::Command::new("kubectl")
                        .arg("apply")
                        .arg("-k")
                        .arg(&overlay)
                        .status()
                        .map_err(|e| format!("cannot run kubectl: {e}"))?;
                    if !status.success() {
                        return Err(format!("kubectl apply -k {} failed ({status})", overlay.display()));
                    }
                    eprintln!("{KUBELET_DELAY}");
                }
                Some(overlay) => eprintln!(
                    "to apply it, run: kubectl apply -k {}\n{KUBELET_DELAY}",
                    overlay.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Whether the gateway's configuration accepts a key or token, and why not (a token of an
/// identity provider has that provider's keys fetched, as the gateway would: `identify` does).
fn verdict(key: &str, config: Option<&std::path::Path>) -> Result<ExitCode, String> {
    let source = Source::locate(config);
    let cfg = Config::load(&source).map_err(|e| e.to_string())?;
    let (access, _) = crate::access::Access::from_config(&cfg, &crate::runtime::oidc::make_fetch)
        .map_err(|p| p.join("\n"))?;
    let metrics = crate::telemetry::metrics::Metrics::new(&cfg);
    let verdict = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?
        .block_on(access.identify(key, crate::clock::unix_now(), &metrics));
    match verdict {
        Ok((_, team)) => {
            let globs = cfg.teams[&team.name].models.join(", ");
            println!(
                "verdict: accepted by {} as team {} (team models: {globs}; admin: {})",
                source.describe(),
                team.name,
                team.admin
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            println!(
                "verdict: refused by {}: {} ({})",
                source.describe(),
                failure.message(),
                failure.reason()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The claims of a token, not verified (to show them).
fn token_claims(token: &str) -> Result<serde_json::Value, String> {
    jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
        .map(|d| d.claims)
        .map_err(|e| format!("the token's claims cannot be read: {e}"))
}

/// `keys list`: the ledger, with each key's status.
fn list(
    signing_key: &std::path::Path,
    team: Option<&str>,
    config: Option<&std::path::Path>,
    json: bool,
) -> Result<ExitCode, String> {
    use crate::access::keys;
    if !signing_key.is_file() {
        return Err(format!("{}: no such signing key", signing_key.display()));
    }
    let ledger = keys::ledger_of(signing_key);
    let issued = keys::read_ledger(&ledger)?;
    let gateway = gateway_view(config)?;
    let now = crate::clock::unix_now();
    let mut shown = 0;
    if !json {
        println!(
            "{:<32}  {:<16}  {:<16}  {:<20}  {:<20}  STATUS",
            "ID", "TEAM", "NAME", "ISSUED", "EXPIRES"
        );
    }
    for key in issued.iter().filter(|k| team.is_none_or(|t| k.team == t)) {
        let status = match &gateway {
            Some(g) if g.revoked.contains(&key.id) => "revoked",
            _ if key.expired(now) => "expired",
            Some(g) if !g.teams.contains(&key.team) => "no-team",
            _ => "active",
        };
        shown += 1;
        if json {
            let mut record = serde_json::to_value(key).map_err(|e| e.to_string())?;
            record["status"] = status.into();
            println!("{record}");
        } else {
            println!(
                "{:<32}  {:<16}  {:<16}  {:<20}  {:<20}  {status}",
                key.id,
                key.team,
                key.name.as_deref().unwrap_or("-"),
                key.issued_at,
                key.expires_at.as_deref().unwrap_or("never"),
            );
        }
    }
    eprintln!(
        "{shown} key(s) issued with {} (ledger: {}){}",
        signing_key.display(),
        ledger.display(),
        if gateway.is_some() {
            ""
        } else {
            "; no configuration found, so revocations are not shown (--config)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// What a gateway's configuration says about keys: its teams and every revoked id.
struct GatewayView {
    teams: std::collections::HashSet<String>,
    revoked: std::collections::HashSet<String>,
}

fn gateway_view(config: Option<&std::path::Path>) -> Result<Option<GatewayView>, String> {
    let source = Source::locate(config);
    if source == Source::BuiltIn {
        return Ok(None);
    }
    let cfg = Config::load(&source).map_err(|e| e.to_string())?;
    let mut revoked = crate::access::read_revoked(&cfg.auth.revoked_file)?;
    if let Some(url) = crate::runtime::server::state_store_url(&cfg.state)? {
        match store_revocations(&url, &cfg.state.key_prefix) {
            Ok(ids) => revoked.extend(ids),
            Err(e) => eprintln!(
                "warning: state store {}: {e}; revocations recorded only there are not shown",
                crate::config::redact_store_url(&url)
            ),
        }
    }
    Ok(Some(GatewayView {
        teams: cfg.teams.keys().cloned().collect(),
        revoked,
    }))
}

/// Runs one call on the shared state store, on a runtime of its own (the CLI has none).
fn with_store<T>(
    url: &str,
    prefix: &str,
    call: impl AsyncFnOnce(
        &crate::state::redis::RedisStore,
    ) -> Result<T, crate::state::redis::StoreError>,
) -> Result<T, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(async {
        let timeout = std::time::Duration::from_secs(5);
        let store = crate::state::redis::RedisStore::connect(url, prefix, timeout)
            .await
            .map_err(|e| format!("state store {}: {e}", crate::config::redact_store_url(url)))?;
        call(&store)
            .await
            .map_err(|e| format!("state store {}: {e}", crate::config::redact_store_url(url)))
    })
}

fn store_revocations(url: &str, prefix: &str) -> Result<Vec<String>, String> {
    with_store(url, prefix, async |store| store.revoked().await)
}

/// What happens after a revocation list's ConfigMap changes.
const KUBELET_DELAY: &str = "the kubelet updates the file in every corral pod within about a minute \
(its sync period plus its ConfigMap cache); each gateway refuses the key within a second after that";

/// Refuses a team the gateway's configuration does not have (a key for it would be refused).
fn check_team(team: &str, config: Option<&std::path::Path>) -> Result<(), String> {
    let source = Source::locate(config);
    if source == Source::BuiltIn {
        eprintln!(
            "note: no configuration found (--config, $CORRAL_CONFIG, ./config/corral.toml): team `{team}` is not checked"
        );
        return Ok(());
    }
    let cfg = Config::load(&source).map_err(|e| e.to_string())?;
    if cfg.teams.contains_key(team) {
        return Ok(());
    }
    let known: Vec<&str> = cfg.teams.keys().map(String::as_str).collect();
    Err(format!(
        "--team `{team}`: {} has no [teams.{team}], so gateways would refuse the key; its teams: {}",
        source.describe(),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// A key from the command line, or from stdin for `-` (keeps keys out of shell history).
fn read_key_arg(arg: String) -> Result<String, String> {
    if arg != "-" {
        return Ok(arg.trim().to_string());
    }
    let mut key = String::new();
    std::io::stdin()
        .read_line(&mut key)
        .map_err(|e| e.to_string())?;
    Ok(key.trim().to_string())
}

use crate::access::keys::rfc3339;

fn current_year() -> String {
    rfc3339(crate::clock::unix_now())[..4].to_string()
}
