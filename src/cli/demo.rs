//! `corral demo`: the whole product on loopback, in one command, with no Ollama needed. It starts
//! the Ollama double, makes a development CA and certificate, writes the configuration it runs
//! (so it can be read and reused), and prints `curl` and Python examples that work as printed.

use crate::config::{Config, ListenAddr, LogFormat, Source, TeamConfig};
use crate::dev::devcert::DevCa;
use crate::dev::double::{DoubleConfig, OllamaDouble};
use crate::runtime::tls::LOOPBACK_NAMES;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) struct DemoOptions {
    pub(crate) listen: SocketAddr,
    pub(crate) metrics_listen: SocketAddr,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) token_delay: Duration,
}

/// Files the demo writes, and the API key it issued.
pub(crate) struct DemoFiles {
    pub(crate) dir: PathBuf,
    pub(crate) ca: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) signing_key: PathBuf,
    pub(crate) api_key: String,
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes the development CA, the server certificate, a signing key pair and the configuration
/// (one team, `demo`, allowed every model) into `dir`, and issues an API key for the team.
pub(crate) fn prepare(
    dir: &Path,
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    upstream: &str,
) -> Result<DemoFiles, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ca = DevCa::new("corral demo CA").map_err(|e| e.to_string())?;
    let (cert, key) = ca
        .issue("localhost", LOOPBACK_NAMES)
        .map_err(|e| e.to_string())?;
    let keys = dir.join("keys");
    let _ = std::fs::remove_dir_all(&keys);
    let (signing_key, verify_key) = crate::access::keys::init(&keys, "demo")?;
    let request = crate::access::keys::IssueRequest {
        team: "demo".into(),
        name: Some("corral demo".into()),
        ..Default::default()
    };
    let (api_key, _) =
        crate::access::keys::issue(&signing_key, &request, crate::clock::unix_now())?;
    let files = DemoFiles {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.pem"),
        config: dir.join("corral.toml"),
        signing_key,
        api_key,
    };
    write(&files.ca, &ca.cert_pem())?;
    write(&dir.join("tls.crt"), &cert)?;
    write(&dir.join("tls.key"), &key)?;
    restrict(&dir.join("tls.key"));

    let mut cfg = Config::default();
    cfg.server.listen = ListenAddr(Some(listen));
    cfg.server.metrics_listen = ListenAddr(Some(metrics_listen));
    cfg.server.tls_cert = dir.join("tls.crt");
    cfg.server.tls_key = dir.join("tls.key");
    cfg.server.grace_period = crate::config::HumanDuration::secs(5);
    cfg.upstream.url = Some(upstream.parse()?);
    cfg.auth.verify_keys = vec![verify_key];
    cfg.auth.revoked_file = dir.join("revoked.txt");
    cfg.teams.insert(
        "demo".into(),
        TeamConfig {
            models: vec!["*".into()],
            admin: true,
            ..Default::default()
        },
    );
    cfg.log.format = LogFormat::Pretty;
    // The configuration as TOML (serialized by the `toml` crate), under a comment saying how
    // to run it again.
    let toml = cfg.to_toml()?;
    let header = format!(
        "# Written by `corral demo`; run it with `corral serve --config {}`.",
        files.config.display()
    );
    write(&files.config, &format!("{header}\n\n{toml}"))?;
    Ok(files)
}

fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

/// The examples printed for the user (also checked by the tests).
pub(crate) fn examples(base: &str, metrics: SocketAddr, files: &DemoFiles) -> String {
    let ca = files.ca.display();
    let key = &files.api_key;
    // The binary's own path: under `cargo run` there is no `corral` on PATH.
    let corral = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "corral".into());
    format!(
        r#"
corral demo is running: a TLS gateway on {base} in front of a built-in Ollama double.
Files (CA certificate, server certificate, configuration): {dir}

An API key for the team `demo` (every model, admin routes too):

  export CORRAL_KEY={key}

Try it with curl:

  curl --cacert {ca} {base}/api/version
  curl --cacert {ca} {base}/api/chat -H "Authorization: Bearer $CORRAL_KEY" \
       -d '{{"model":"llama3.2","messages":[{{"role":"user","content":"Why is the sky blue?"}}]}}'
  curl --cacert {ca} {base}/v1/chat/completions -H "Authorization: Bearer $CORRAL_KEY" -H 'content-type: application/json' \
       -d '{{"model":"llama3.2","stream":true,"messages":[{{"role":"user","content":"Hello"}}]}}'
  curl --cacert {ca} {base}/api/tags   # no key: 401

More keys: {corral} keys issue --signing-key {signing} --config {config} --team demo --models 'llama3.2:*' --expires 7d

With the openai Python package (pip install openai):

  import httpx, openai, ssl
  tls = ssl.create_default_context(cafile="{ca}")
  client = openai.OpenAI(base_url="{base}/v1", api_key="{key}", http_client=httpx.Client(verify=tls))
  for chunk in client.chat.completions.create(model="llama3.2", stream=True,
                                              messages=[{{"role": "user", "content": "Why is the sky blue?"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

With the ollama Python package (pip install ollama):

  import ollama, ssl
  client = ollama.Client(host="{base}", verify=ssl.create_default_context(cafile="{ca}"),
                         headers={{"Authorization": "Bearer {key}"}})
  for part in client.chat(model="llama3.2", stream=True, messages=[{{"role": "user", "content": "Hello"}}]):
      print(part.message.content, end="", flush=True)

Models: llama3.2, qwen2.5-coder:7b, nomic-embed-text (embeddings), llama3.1:70b (slow to load).
Health: http://{metrics}/livez and http://{metrics}/readyz. Stop with Ctrl-C.
Requests are logged below, one line each.
"#,
        dir = files.dir.display(),
        signing = files.signing_key.display(),
        config = files.config.display(),
    )
}

pub(crate) fn run(opts: DemoOptions) -> Result<(), String> {
    // A folder of its own is deleted when the demo ends (its signing key included); one the
    // user named with --dir is theirs to keep.
    let dir = opts.dir.unwrap_or_else(|| {
        let dir = std::env::temp_dir().join(format!("corral-demo-{}", std::process::id()));
        crate::runtime::shutdown::remove_on_exit(dir.clone());
        dir
    });
    let result = serve(opts.listen, opts.metrics_listen, opts.token_delay, &dir);
    crate::runtime::shutdown::clean_up();
    result
}

fn serve(
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    token_delay: Duration,
    dir: &Path,
) -> Result<(), String> {
    let double = OllamaDouble::spawn(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DoubleConfig {
            token_delay,
            ..DoubleConfig::default()
        },
    )
    .map_err(|e| format!("cannot start the Ollama double: {e}"))?;
    let files = prepare(dir, listen, metrics_listen, &double.url())?;
    let source = Source::File(files.config.clone());
    let cfg = Config::load(&source).map_err(|e| e.to_string())?;
    crate::telemetry::init_logging(&cfg.log);
    let prepared = crate::runtime::server::prepare(source, cfg).map_err(|e| e.to_string())?;
    crate::runtime::server::check_binds(&prepared.cfg)
        .map_err(|e| format!("{e}\n(pick other ports with --listen and --metrics-listen)"))?;
    let host = if listen.ip().is_loopback() && listen.is_ipv4() {
        "localhost".to_string()
    } else {
        listen.ip().to_string()
    };
    println!(
        "{}",
        examples(
            &format!("https://{host}:{}", listen.port()),
            metrics_listen,
            &files
        )
    );
    crate::runtime::server::run(prepared, Default::default()).map_err(|e| e.to_string())?;
    drop(double);
    Ok(())
}
