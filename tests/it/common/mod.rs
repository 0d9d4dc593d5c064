//! Test harness: runs the real `corral` binary with a temporary configuration in front of the
//! Ollama double, on loopback ports, and talks to it over TLS with a client that trusts a
//! throwaway CA.

pub mod raw;

use corral::config::{Config, HumanDuration, ListenAddr, LogFormat, TeamConfig};
use corral::dev::devcert::DevCa;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use corral::dev::double::{DoubleConfig, ModelSpec, OllamaDouble};

/// The name the test certificate is issued for (besides localhost); clients resolve it to
/// 127.0.0.1, so requests carry a non-local `Host` that Ollama would refuse.
pub const PUBLIC_NAME: &str = "gateway.example.com";

/// A free loopback port outside the kernel's ephemeral range (32768+), so no outgoing
/// connection can take it between this check and corral binding it.
pub fn reserve_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 600) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32700, "ran out of test ports");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub async fn wait_for_async<T, F: std::future::Future<Output = Option<T>>>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Certificates for a test: a CA and a server certificate for localhost and [`PUBLIC_NAME`].
pub struct Certs {
    pub ca: DevCa,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    pub fn new(dir: &Path) -> Certs {
        let ca = DevCa::new("corral test CA").unwrap();
        let (cert_pem, key_pem) = ca
            .issue("first", &["localhost", "127.0.0.1", PUBLIC_NAME])
            .unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let ca_pem = ca.cert_pem();
        Certs {
            ca,
            ca_pem,
            cert,
            key,
        }
    }
}

/// A running `corral serve`. Killed when dropped.
pub struct Corral {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub cfg: Config,
    pub certs: Certs,
    /// The signing key whose public half the gateway trusts (kid `test-2026`).
    pub signing_key: PathBuf,
    /// A key for the team `test` (all models, admin), when that team exists.
    pub key: String,
    pub port: u16,
    pub metrics_port: u16,
    pub plain_port: Option<u16>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// A configuration for a test: TLS and metrics on reserved loopback ports, JSON logs.
pub fn test_config(upstream: &str) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = ListenAddr(Some(loopback(reserve_port())));
    cfg.server.metrics_listen = ListenAddr(Some(loopback(reserve_port())));
    cfg.server.grace_period = HumanDuration::secs(30);
    cfg.upstream.url = Some(upstream.parse().expect("an upstream URL"));
    cfg.log.format = LogFormat::Json;
    cfg.log.level = "info".into();
    cfg
}

fn pipe_lines(r: impl std::io::Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
}

pub fn corral_bin() -> &'static str {
    env!("CARGO_BIN_EXE_corral")
}

/// The files of a test gateway, before it runs.
pub struct Setup {
    pub cfg: Config,
    pub dir: tempfile::TempDir,
    pub certs: Certs,
    pub signing_key: PathBuf,
}

impl Setup {
    /// Fills in what `cfg` leaves empty: the test certificate, a verification key (kid
    /// `test-2026`), a revocation file, and, if no team is configured, a team `test` allowed
    /// every model and the admin routes.
    pub fn new(mut cfg: Config) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::new(dir.path());
        if cfg.server.tls_cert.as_os_str().is_empty() {
            cfg.server.tls_cert = certs.cert.clone();
            cfg.server.tls_key = certs.key.clone();
        }
        let (signing_key, verify_key) =
            corral::access::keys::init(&dir.path().join("keys"), "test-2026").unwrap();
        if cfg.auth.verify_keys.is_empty() {
            cfg.auth.verify_keys = vec![verify_key];
        }
        if cfg.auth.revoked_file.as_os_str().is_empty() {
            cfg.auth.revoked_file = dir.path().join("revoked.txt");
        }
        if cfg.teams.is_empty() {
            let all = TeamConfig {
                models: vec!["*".into()],
                admin: true,
                ..Default::default()
            };
            cfg.teams.insert("test".into(), all);
        }
        Setup {
            cfg,
            dir,
            certs,
            signing_key,
        }
    }

    /// Writes the configuration file and returns its path.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.path().join("corral.toml");
        std::fs::write(&path, self.cfg.to_toml().unwrap()).unwrap();
        path
    }

    pub fn start(self) -> Corral {
        let mut corral = self.spawn(&[]);
        corral.wait_ready();
        corral
    }

    /// Starts the process without waiting (for start-up failures), with extra environment.
    pub fn spawn(self, env: &[(&str, &str)]) -> Corral {
        let path = self.write();
        self.spawn_with(&path, env)
    }

    /// Starts corral with another configuration file (e.g. one shipped in `config/`), its
    /// listeners, files and upstream overridden from the environment to this setup's.
    pub fn spawn_file(self, file: &Path, extra_env: &[(&str, &str)]) -> Corral {
        let c = &self.cfg;
        let addr = |a: corral::config::ListenAddr| a.0.map(|a| a.to_string()).unwrap_or_default();
        let verify_keys: Vec<String> = c
            .auth
            .verify_keys
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let owned = [
            ("CORRAL__SERVER__LISTEN", addr(c.server.listen)),
            (
                "CORRAL__SERVER__METRICS_LISTEN",
                addr(c.server.metrics_listen),
            ),
            (
                "CORRAL__SERVER__TLS_CERT",
                c.server.tls_cert.display().to_string(),
            ),
            (
                "CORRAL__SERVER__TLS_KEY",
                c.server.tls_key.display().to_string(),
            ),
            match &c.upstream.discover {
                Some(d) => ("CORRAL__UPSTREAM__DISCOVER__DNS", d.dns.clone()),
                None => ("CORRAL__UPSTREAM__URL", c.upstream.url().to_string()),
            },
            ("CORRAL__AUTH__VERIFY_KEYS", verify_keys.join(",")),
            (
                "CORRAL__AUTH__REVOKED_FILE",
                c.auth.revoked_file.display().to_string(),
            ),
        ];
        let mut env: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra_env);
        self.spawn_with(file, &env)
    }

    fn spawn_with(self, path: &Path, env: &[(&str, &str)]) -> Corral {
        let mut cmd = Command::new(corral_bin());
        cmd.arg("serve").arg("--config").arg(path);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.env_remove("CORRAL_CONFIG").env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("corral starts");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pipe_lines(child.stdout.take().unwrap(), stdout.clone());
        pipe_lines(child.stderr.take().unwrap(), stderr.clone());
        let Setup {
            cfg,
            dir,
            certs,
            signing_key,
        } = self;
        let key = match cfg.teams.contains_key("test") {
            true => issue_with(&signing_key, "test", None, None),
            false => String::new(),
        };
        Corral {
            port: cfg.server.listen.0.map_or(0, |a| a.port()),
            metrics_port: cfg.server.metrics_listen.0.map_or(0, |a| a.port()),
            plain_port: cfg.server.plain_listen.0.map(|a| a.port()),
            signing_key,
            key,
            child,
            dir,
            cfg,
            certs,
            stdout,
            stderr,
        }
    }
}

/// Issues a key with a signing key file.
pub fn issue_with(
    signing_key: &Path,
    team: &str,
    models: Option<&[&str]>,
    expires_in: Option<Duration>,
) -> String {
    let request = corral::access::keys::IssueRequest {
        team: team.into(),
        name: Some("test".into()),
        models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
        expires_in,
    };
    corral::access::keys::issue(signing_key, &request, corral::clock::unix_now())
        .unwrap()
        .0
}

impl Corral {
    /// Starts corral with `cfg` (see [`Setup::new`]) and waits until it serves.
    pub fn start(cfg: Config) -> Corral {
        Setup::new(cfg).start()
    }

    /// Issues a key with the test signing key.
    pub fn issue(
        &self,
        team: &str,
        models: Option<&[&str]>,
        expires_in: Option<Duration>,
    ) -> String {
        issue_with(&self.signing_key, team, models, expires_in)
    }

    pub fn wait_ready(&mut self) {
        let mut addrs = vec![loopback(self.metrics_port)];
        if self.port != 0 {
            addrs.push(loopback(self.port));
        }
        addrs.extend(self.plain_port.map(loopback));
        wait_for(Duration::from_secs(30), "corral to listen", || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "corral exited with {status} before serving:\n{}",
                    self.stderr_text()
                );
            }
            addrs
                .iter()
                .all(|a| TcpStream::connect(a).is_ok())
                .then_some(())
        });
    }

    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn public_base(&self) -> String {
        format!("https://{PUBLIC_NAME}:{}", self.port)
    }

    pub fn metrics_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// A client that trusts the test CA, resolves the test names to loopback, and sends the
    /// team `test` key.
    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().unwrap()
    }

    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut headers = reqwest::header::HeaderMap::new();
        if !self.key.is_empty() {
            headers.insert(
                "authorization",
                format!("Bearer {}", self.key).parse().unwrap(),
            );
        }
        self.anonymous_client_builder().default_headers(headers)
    }

    /// A client that sends no key.
    pub fn anonymous_client(&self) -> reqwest::Client {
        self.anonymous_client_builder().build().unwrap()
    }

    pub fn anonymous_client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.certs.ca_pem.as_bytes()).unwrap(),
            )
            .resolve("localhost", loopback(self.port))
            .resolve(PUBLIC_NAME, loopback(self.port))
            .timeout(Duration::from_secs(120))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for(timeout, "corral to exit", || self.child.try_wait().unwrap())
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Access-log lines written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the access-log line of the request with this id.
    pub fn log_line(&self, request_id: &str) -> serde_json::Value {
        wait_for(Duration::from_secs(10), "the access log line", || {
            self.access_log()
                .into_iter()
                .find(|l| l["request_id"] == request_id)
        })
    }
}

impl Drop for Corral {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The default double, started on the current runtime.
pub async fn double() -> OllamaDouble {
    OllamaDouble::start(DoubleConfig::default()).await.unwrap()
}

pub async fn double_with(f: impl FnOnce(&mut DoubleConfig)) -> OllamaDouble {
    let mut cfg = DoubleConfig::default();
    f(&mut cfg);
    OllamaDouble::start(cfg).await.unwrap()
}

/// Reads a streamed response body chunk by chunk.
pub async fn next_chunk(resp: &mut reqwest::Response) -> Option<bytes::Bytes> {
    resp.chunk().await.expect("stream readable")
}

/// Reads the rest of a body as text (errors end the read).
pub async fn rest_text(resp: &mut reqwest::Response) -> (String, bool) {
    let mut text = String::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => text.push_str(&String::from_utf8_lossy(&c)),
            Ok(None) => return (text, true),
            Err(_) => return (text, false),
        }
    }
}

/// Requests that reached the double on behalf of clients (corral's own health probe and
/// preloads, which say `User-Agent: corral/...`, are left out).
pub fn forwarded(double: &OllamaDouble) -> Vec<corral::dev::double::Recorded> {
    double
        .requests()
        .into_iter()
        .filter(|r| {
            !r.header("user-agent")
                .is_some_and(|ua| ua.starts_with("corral/"))
        })
        .collect()
}

impl Corral {
    /// The `/metrics` exposition text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.metrics_base()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The sum of `name`'s samples with `labels` once it equals `expected` (a request is
    /// counted by the report, which runs after its answer is out, so a client can read the
    /// metrics first); after 10 s, whatever it is, for the caller's assertion to show.
    pub async fn metric_settled(&self, name: &str, labels: &[(&str, &str)], expected: f64) -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let sum = metric_sum(&self.metrics().await, name, labels);
            if sum == expected || std::time::Instant::now() > deadline {
                return sum;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sums the samples of `name` whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Runs `corral check --config FILE`: whether it passed, and its report.
pub fn check_config(config: &Path) -> (bool, String) {
    let out = Command::new(corral_bin())
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("corral check runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
