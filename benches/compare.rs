//! corral against direct access and the usual nginx recipe, side by side.
//!
//!   cargo bench --bench compare            (needs `oha` and `nginx` on PATH)
//!   cargo bench --bench compare -- --quick (one short round, to try it out)
//!   cargo bench --bench compare -- --canned (small requests only, against an upstream that costs
//!                                          next to nothing: nginx with fixed answers)
//!   cargo bench --bench compare -- --canned --http2 (the same with HTTP/2 clients; direct access
//!                                          stays HTTP/1.1, Ollama's only protocol)
//!   cargo bench --bench compare -- --streams (only the open streams' memory)
//!   cargo bench --bench compare -- --canned --hold (start everything, print where each gateway
//!                                          listens and the key, and wait: for profiling by hand)
//!   CORRAL_BENCH_BIN=path/to/corral cargo bench --bench compare (measure another build)
//!
//! Starts the Ollama double, corral (TLS, keys, access log, metrics: as in production), corral
//! with a pool of three nodes (the same double three times, so only the pool's own cost differs),
//! a bare pingora proxy (`corral bare-proxy`: the cost of pingora without corral's hooks) and nginx (TLS, a static key check with `map`, `proxy_buffering off`, long timeouts, access
//! log), then drives them and direct access with the same load generator, interleaved, over
//! several rounds, and prints one table of medians with every figure also as a ratio to direct
//! and nginx, and the pool's to one node.
// A benchmark that cannot set itself up stops with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{canned_upstream, free_port, identity, stop_nginx, wait_port, which};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RATES: [Option<u32>; 3] = [Some(500), Some(2000), None];
const OPEN_STREAMS: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Corral,
    /// corral with three nodes.
    Pool,
    /// corral with its team limits in a local Redis (`[state]`).
    Shared,
    /// pingora's minimal proxy with corral's TLS and runtime settings (`corral bare-proxy`).
    Bare,
    Nginx,
}

const TARGETS: [Target; 6] = [
    Target::Direct,
    Target::Corral,
    Target::Pool,
    Target::Shared,
    Target::Bare,
    Target::Nginx,
];
const GATEWAYS: [Target; 5] = [
    Target::Corral,
    Target::Pool,
    Target::Shared,
    Target::Bare,
    Target::Nginx,
];

struct Stack {
    dir: PathBuf,
    double: Child,
    corral: Child,
    pool: Child,
    shared: Child,
    redis: Child,
    bare: Child,
    nginx: Child,
    /// The canned upstream (`--canned`): nginx answering every request with a fixed body.
    canned: Option<Child>,
    /// Where the gateways send requests: the double, or the canned upstream.
    upstream_port: u16,
    corral_port: u16,
    pool_port: u16,
    shared_port: u16,
    bare_port: u16,
    nginx_port: u16,
    key: String,
    ca_pem: String,
    /// `--http2`: the load generator speaks HTTP/2 to the gateways.
    http2: bool,
}

impl Stack {
    fn url(&self, t: Target, path: &str) -> String {
        match t {
            Target::Direct => format!("http://127.0.0.1:{}{path}", self.upstream_port),
            Target::Corral => format!("https://localhost:{}{path}", self.corral_port),
            Target::Pool => format!("https://localhost:{}{path}", self.pool_port),
            Target::Shared => format!("https://localhost:{}{path}", self.shared_port),
            Target::Bare => format!("https://localhost:{}{path}", self.bare_port),
            Target::Nginx => format!("https://localhost:{}{path}", self.nginx_port),
        }
    }

    /// The gateway's processes (nginx: master and workers; direct: the upstream).
    fn pids(&self, t: Target) -> Vec<u32> {
        match t {
            Target::Direct => match &self.canned {
                Some(canned) => with_children(canned.id()),
                None => vec![self.double.id()],
            },
            Target::Corral => vec![self.corral.id()],
            Target::Pool => vec![self.pool.id()],
            Target::Shared => vec![self.shared.id()],
            Target::Bare => vec![self.bare.id()],
            Target::Nginx => with_children(self.nginx.id()),
        }
    }

    /// Resident memory of the gateway.
    fn rss_kib(&self, t: Target) -> u64 {
        self.pids(t).iter().map(|p| rss_of(*p)).sum()
    }

    /// CPU time the gateway has used so far (all its threads and processes), in seconds.
    fn cpu_secs(&self, t: Target) -> f64 {
        self.pids(t).iter().map(|p| cpu_of(*p)).sum()
    }

    fn client(&self, streams: usize) -> reqwest::Client {
        reqwest::Client::builder()
            .http1_only()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], 0)))
            .pool_max_idle_per_host(streams)
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in [
            &mut self.corral,
            &mut self.pool,
            &mut self.shared,
            &mut self.redis,
            &mut self.bare,
            &mut self.double,
        ] {
            let _ = c.kill();
            let _ = c.wait();
        }
        stop_nginx(&mut self.nginx);
        if let Some(c) = &mut self.canned {
            stop_nginx(c);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process and its children (nginx's master and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.push(pid);
    pids
}

/// User and system CPU time of a process, in seconds (`/proc/PID/stat`, clock ticks).
fn cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces), from the third: utime is the
    // 14th field, stime the 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf only reads a system constant.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_sec as f64
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn start(oha_ok: bool, canned: bool, http2: bool) -> Stack {
    let nginx_bin = which("nginx").expect("nginx is needed: apt-get install nginx");
    assert!(oha_ok, "oha is needed: cargo install oha");
    // CORRAL_BENCH_BIN compares another build of corral (A/B of a change).
    let corral_bin = std::env::var("CORRAL_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_corral").to_string());
    let corral_bin = corral_bin.as_str();
    let dir = std::env::temp_dir().join(format!("corral-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("nginx")).unwrap();

    let (key, ca_pem, public) = identity(&dir);

    // The double in "fast mode": no load time, 20 ms per token, 400 tokens unless limited.
    let double_port = free_port();
    let double = Command::new(corral_bin)
        .args([
            "double",
            "--listen",
            &format!("127.0.0.1:{double_port}"),
            "--token-delay",
            "20ms",
            "--tokens",
            "400",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(double_port, "the double");
    // Where every gateway (and "direct") sends its requests.
    let canned_port = free_port();
    let canned = canned.then(|| canned_upstream(&nginx_bin, &dir, canned_port));
    let upstream_port = if canned.is_some() {
        canned_port
    } else {
        double_port
    };

    let (corral_port, metrics_port, nginx_port) = (free_port(), free_port(), free_port());
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            r#"[server]
listen = "127.0.0.1:{corral_port}"
tls_cert = "tls.crt"
tls_key = "tls.key"
metrics_listen = "127.0.0.1:{metrics_port}"
# One loopback client stands for many: no per-address caps.
max_connections_per_ip = 0
max_requests_per_ip = 0
[upstream]
url = "http://127.0.0.1:{upstream_port}"
[auth]
verify_keys = ["{public}"]
revoked_file = "revoked.txt"
[teams.bench]
models = ["*"]
# A limit that never bites, so every request is admitted against it (in the store, for the
# corral+redis column).
rpm = 100000000
[log]
format = "json"
level = "warn"
"#,
            public = public.display()
        ),
    )
    .unwrap();
    let corral = Command::new(corral_bin)
        .args(["serve", "--config"])
        .arg(dir.join("corral.toml"))
        .stdout(std::fs::File::create(dir.join("corral-access.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(corral_port, "corral");

    // The same corral with a pool of three nodes: the same double three times, so the upstream's
    // capacity is the same and only the pool's routing differs.
    let (pool_port, pool_metrics_port) = (free_port(), free_port());
    let single = std::fs::read_to_string(dir.join("corral.toml")).unwrap();
    let nodes: String = ["a", "b", "c"]
        .iter()
        .map(|n| {
            format!(
                "[[upstream.nodes]]\nname = \"{n}\"\nurl = \"http://127.0.0.1:{upstream_port}\"\n"
            )
        })
        .collect();
    let pooled = single
        .replace(
            &format!("127.0.0.1:{corral_port}"),
            &format!("127.0.0.1:{pool_port}"),
        )
        .replace(
            &format!("127.0.0.1:{metrics_port}"),
            &format!("127.0.0.1:{pool_metrics_port}"),
        )
        .replace(&format!("url = \"http://127.0.0.1:{upstream_port}\"\n"), "")
        .replace("[auth]", &format!("{nodes}[auth]"));
    std::fs::write(dir.join("pool.toml"), pooled).unwrap();
    let pool = Command::new(corral_bin)
        .args(["serve", "--config"])
        .arg(dir.join("pool.toml"))
        .stdout(std::fs::File::create(dir.join("pool-access.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(pool_port, "corral with a pool");

    // The same corral with its team limits in a local Redis.
    let redis_port = free_port();
    let redis_bin =
        which("redis-server").expect("redis-server is needed: apt-get install redis-server");
    let redis = Command::new(redis_bin)
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(redis_port, "redis-server");
    let (shared_port, shared_metrics_port) = (free_port(), free_port());
    let with_store = single
        .replace(
            &format!("127.0.0.1:{corral_port}"),
            &format!("127.0.0.1:{shared_port}"),
        )
        .replace(
            &format!("127.0.0.1:{metrics_port}"),
            &format!("127.0.0.1:{shared_metrics_port}"),
        )
        + &format!("[state]\nstore = \"redis://127.0.0.1:{redis_port}/0\"\n");
    std::fs::write(dir.join("shared.toml"), with_store).unwrap();
    let shared = Command::new(corral_bin)
        .args(["serve", "--config"])
        .arg(dir.join("shared.toml"))
        .stdout(std::fs::File::create(dir.join("shared-access.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(shared_port, "corral with a shared store");

    // The recipe most Ollama users run today.
    let d = dir.display();
    std::fs::write(
        dir.join("nginx/nginx.conf"),
        format!(
            r#"worker_processes auto;
pid {d}/nginx/nginx.pid;
error_log {d}/nginx/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {d}/nginx/access.log;
  client_body_temp_path {d}/nginx/body;
  proxy_temp_path {d}/nginx/proxy;
  fastcgi_temp_path {d}/nginx/fastcgi;
  uwsgi_temp_path {d}/nginx/uwsgi;
  scgi_temp_path {d}/nginx/scgi;
  map_hash_bucket_size 512;
  map $http_authorization $api_key_ok {{
    "Bearer {key}" 1;
    default 0;
  }}
  upstream ollama {{
    server 127.0.0.1:{upstream_port};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{nginx_port} ssl http2;
    ssl_certificate {d}/tls.crt;
    ssl_certificate_key {d}/tls.key;
    client_max_body_size 32m;
    # As corral recycles a client connection after 10,000 requests.
    keepalive_requests 10000;
    location / {{
      if ($api_key_ok = 0) {{ return 401; }}
      proxy_pass http://ollama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host localhost:11434;
      proxy_set_header Authorization "";
      proxy_buffering off;
      proxy_cache off;
      proxy_connect_timeout 3s;
      proxy_read_timeout 15m;
      proxy_send_timeout 15m;
    }}
  }}
}}
"#
        ),
    )
    .unwrap();
    let nginx = Command::new(nginx_bin)
        .args([
            "-p",
            &format!("{d}/nginx"),
            "-c",
            &format!("{d}/nginx/nginx.conf"),
            "-g",
            "daemon off;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(nginx_port, "nginx");

    // pingora's minimal proxy, built and run like corral, with the same key.
    let bare_port = free_port();
    let bare = Command::new(corral_bin)
        .arg("bare-proxy")
        .args(["--listen", &format!("127.0.0.1:{bare_port}")])
        .args(["--upstream", &format!("127.0.0.1:{upstream_port}")])
        .arg("--tls-cert")
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"))
        .args(["--api-key", &key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(bare_port, "the bare pingora proxy");

    Stack {
        dir,
        double,
        corral,
        pool,
        shared,
        redis,
        bare,
        nginx,
        canned,
        upstream_port,
        corral_port,
        pool_port,
        shared_port,
        bare_port,
        nginx_port,
        key,
        ca_pem,
        http2,
    }
}

/// One oha run of small non-streaming requests (`POST /api/show`): (req/s, p50 ms, p99 ms, errors).
fn oha(stack: &Stack, t: Target, rate: Option<u32>, seconds: u32) -> (f64, f64, f64, u64) {
    let mut cmd = Command::new("oha");
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        // Let requests in flight at the end finish: cut ones are not gateway errors.
        "-w",
        "-z",
        &format!("{seconds}s"),
        "-c",
        "64",
        "-m",
        "POST",
    ]);
    cmd.args([
        "-T",
        "application/json",
        "-d",
        r#"{"model":"llama3.2"}"#,
        "--insecure",
    ]);
    cmd.args(["-H", &format!("Authorization: Bearer {}", stack.key)]);
    // HTTP/2 to the gateways (over TLS, by ALPN); Ollama itself speaks HTTP/1.1 only.
    if stack.http2 && t != Target::Direct {
        cmd.arg("--http2");
    }
    if let Some(r) = rate {
        cmd.args(["-q", &r.to_string(), "--latency-correction"]);
    }
    let out = cmd
        .arg(stack.url(t, "/api/show"))
        .output()
        .expect("oha runs");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oha output: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let ms = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok: u64 = codes.get("200").and_then(Value::as_u64).unwrap_or(0);
    let all: u64 = codes.values().filter_map(Value::as_u64).sum();
    // With `--http2` and a fixed rate, oha cuts requests it had not finished sending at the
    // deadline despite `-w` ("aborted due to deadline", nginx's column too): the load
    // generator's, not the gateway's.
    let errors = all - ok
        + v["errorDistribution"].as_object().map_or(0, |e| {
            e.iter()
                .filter(|(kind, _)| kind.as_str() != "aborted due to deadline")
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        });
    let rps =
        v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0) * ok as f64 / all.max(1) as f64;
    (rps, ms("p50"), ms("p99"), errors)
}

/// Streams of 20 tokens (20 ms apart): median time to first byte, and the offset of every chunk
/// from the request's start (to compare chunk by chunk with direct).
async fn stream_timings(stack: &Stack, t: Target, n: usize) -> (f64, Vec<f64>) {
    let client = stack.client(4);
    let mut ttfb = Vec::new();
    let mut offsets = vec![Vec::new(); 21];
    for _ in 0..n {
        let started = Instant::now();
        let mut resp = client
            .post(stack.url(t, "/api/generate"))
            .bearer_auth(&stack.key)
            .json(&json!({"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 20}}))
            .send()
            .await
            .unwrap();
        let mut i = 0;
        let mut carry = Vec::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            let at = started.elapsed().as_secs_f64() * 1000.0;
            if i == 0 {
                ttfb.push(at);
            }
            // One offset per NDJSON line, whatever the TCP chunking.
            carry.extend_from_slice(&chunk);
            while let Some(pos) = carry.iter().position(|&b| b == b'\n') {
                carry.drain(..=pos);
                if i < offsets.len() {
                    offsets[i].push(at);
                }
                i += 1;
            }
        }
    }
    (
        median(&mut ttfb),
        offsets.iter_mut().map(|o| median(o)).collect(),
    )
}

/// 1000 streams open at once: (RSS with all open in KiB, RSS before, failed streams).
async fn open_streams(stack: &Stack, t: Target) -> (u64, u64, usize) {
    let idle = stack.rss_kib(t);
    let client = stack.client(OPEN_STREAMS);
    let started = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..OPEN_STREAMS {
        let (client, started, failed) = (client.clone(), started.clone(), failed.clone());
        let url = stack.url(t, "/api/chat");
        let key = stack.key.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "llama3.2", "messages": [{"role": "user", "content": "tell me a long story"}]});
            let resp = client.post(url).bearer_auth(key).json(&body).send().await;
            let mut resp = match resp {
                Ok(r) if r.status() == 200 => r,
                _ => {
                    started.fetch_add(1, Ordering::SeqCst);
                    failed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            let first = resp.chunk().await;
            started.fetch_add(1, Ordering::SeqCst);
            let mut tail = Vec::new();
            let mut ok = matches!(first, Ok(Some(_)));
            loop {
                match resp.chunk().await {
                    Ok(Some(c)) => tail = c.to_vec(),
                    Ok(None) => break,
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok || !String::from_utf8_lossy(&tail).contains("\"done\":true") {
                failed.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while started.load(Ordering::SeqCst) < OPEN_STREAMS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = stack.rss_kib(t);
    for task in tasks {
        let _ = task.await;
    }
    (peak, idle, failed.load(Ordering::SeqCst))
}

/// `--hold`: what a profiler needs to drive the stack by hand, until Ctrl-C (which also stops it).
fn hold(stack: &Stack, runtime: &tokio::runtime::Runtime) {
    let dir = stack.dir.display();
    println!("key:         {}", stack.key);
    println!("CA:          {dir}/ca.pem");
    std::fs::write(stack.dir.join("ca.pem"), &stack.ca_pem).unwrap();
    for (name, t) in [
        ("direct", Target::Direct),
        ("corral", Target::Corral),
        ("bare", Target::Bare),
        ("nginx", Target::Nginx),
    ] {
        let pids: Vec<String> = stack.pids(t).iter().map(u32::to_string).collect();
        println!(
            "{name:<12} {}  pids {}",
            stack.url(t, "/api/show"),
            pids.join(",")
        );
    }
    println!("(Ctrl-C or SIGTERM stops everything)");
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).unwrap();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Figures per target, kept per round.
#[derive(Default)]
struct Results {
    rows: Vec<(String, [Vec<f64>; 6], bool)>,
}

impl Results {
    fn add(&mut self, row: &str, t: Target, value: f64, higher_is_better: bool) {
        let i = TARGETS.iter().position(|x| *x == t).unwrap();
        match self.rows.iter_mut().find(|(r, _, _)| r == row) {
            Some((_, v, _)) => v[i].push(value),
            None => {
                let mut v: [Vec<f64>; 6] = Default::default();
                v[i].push(value);
                self.rows.push((row.to_string(), v, higher_is_better));
            }
        }
    }

    fn print(&mut self) {
        const HEAD: [&str; 13] = [
            "",
            "direct",
            "corral",
            "pool of 3",
            "corral+redis",
            "bare pingora",
            "nginx",
            "corral/direct",
            "corral/nginx",
            "corral/bare",
            "bare/nginx",
            "pool/corral",
            "redis/corral",
        ];
        let line = |cells: &[String]| {
            let mut out = format!("{:<44}", cells[0]);
            for c in &cells[1..] {
                out.push_str(&format!(" {c:>13}"));
            }
            println!("{}", out.trim_end());
        };
        line(&HEAD.map(str::to_string));
        for (row, values, _) in &mut self.rows {
            let m: Vec<f64> = values.iter_mut().map(|v| median(v)).collect();
            let cell = |x: f64| {
                if x.is_nan() {
                    "-".to_string()
                } else if x >= 100.0 {
                    format!("{x:.0}")
                } else {
                    format!("{x:.2}")
                }
            };
            let ratio = |a: f64, b: f64| {
                if a.is_nan() || b.is_nan() || b == 0.0 {
                    "-".to_string()
                } else {
                    format!("{:.2}x", a / b)
                }
            };
            let [direct, corral, pool, redis, bare, nginx] = [m[0], m[1], m[2], m[3], m[4], m[5]];
            line(&[
                row.clone(),
                cell(direct),
                cell(corral),
                cell(pool),
                cell(redis),
                cell(bare),
                cell(nginx),
                ratio(corral, direct),
                ratio(corral, nginx),
                ratio(corral, bare),
                ratio(bare, nginx),
                ratio(pool, corral),
                ratio(redis, corral),
            ]);
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // cargo test --benches asks for the list of tests: none here.
    }
    let quick = args.iter().any(|a| a == "--quick");
    // An upstream that costs next to nothing (nginx with fixed answers): the gateways' own costs,
    // not the double's, bound the figures. Streams need the double, so only small requests run.
    let canned = args.iter().any(|a| a == "--canned");
    let (rounds, seconds, streams) = if quick { (1, 3, 10) } else { (3, 8, 40) };
    let oha_ok = Command::new("oha")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    // HTTP/2 clients (oha --http2) against the gateways, to compare with HTTP/1.1 ones.
    let http2 = args.iter().any(|a| a == "--http2");
    let stack = start(oha_ok, canned, http2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    eprintln!(
        "corral {} | {} | {rounds} round(s), interleaved",
        corral::LONG_VERSION,
        machine()
    );
    if args.iter().any(|a| a == "--hold") {
        hold(&stack, &runtime);
        return;
    }
    let only_streams = args.iter().any(|a| a == "--streams");
    let rounds = if only_streams { 0 } else { rounds };
    let mut results = Results::default();
    // Warm up connections, caches and the model.
    for t in TARGETS {
        oha(&stack, t, Some(200), 1);
    }
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: small requests");
        for rate in RATES {
            for t in TARGETS {
                let cpu_before = stack.cpu_secs(t);
                let (rps, p50, p99, errors) = oha(&stack, t, rate, seconds);
                let cpu = stack.cpu_secs(t) - cpu_before;
                let label = rate.map_or("saturation".to_string(), |r| format!("{r} rps"));
                // What a request costs the gateway at a fixed rate (the CPU it leaves to Ollama
                // on a shared machine); at saturation the load generator's share decides it.
                if rate.is_some() && rps > 0.0 {
                    results.add(
                        &format!("small requests, {label}: CPU µs per request"),
                        t,
                        cpu * 1e6 / (rps * f64::from(seconds)),
                        false,
                    );
                }
                if rate.is_none() {
                    results.add("small requests, saturation: req/s", t, rps, true);
                }
                results.add(&format!("small requests, {label}: p50 ms"), t, p50, false);
                results.add(&format!("small requests, {label}: p99 ms"), t, p99, false);
                results.add(
                    &format!("small requests, {label}: errors"),
                    t,
                    errors as f64,
                    false,
                );
            }
        }
        if canned {
            continue;
        }
        eprintln!("round {round}/{rounds}: streams");
        let direct = runtime.block_on(stream_timings(&stack, Target::Direct, streams));
        results.add(
            "stream: time to first byte, ms",
            Target::Direct,
            direct.0,
            false,
        );
        for t in GATEWAYS {
            let (ttfb, offsets) = runtime.block_on(stream_timings(&stack, t, streams));
            results.add("stream: time to first byte, ms", t, ttfb, false);
            results.add(
                "stream: added time to first byte, ms",
                t,
                ttfb - direct.0,
                false,
            );
            let mut added: Vec<f64> = offsets
                .iter()
                .zip(&direct.1)
                .skip(1)
                .map(|(a, b)| a - b)
                .collect();
            results.add(
                "stream: added delay per chunk (median), ms",
                t,
                median(&mut added),
                false,
            );
        }
    }
    eprintln!("{OPEN_STREAMS} concurrent streams");
    for t in GATEWAYS.into_iter().filter(|_| !canned) {
        let (peak, idle, failed) = runtime.block_on(open_streams(&stack, t));
        results.add(
            &format!("{OPEN_STREAMS} streams: gateway RSS, MiB"),
            t,
            peak as f64 / 1024.0,
            false,
        );
        results.add(
            &format!("{OPEN_STREAMS} streams: KiB per open stream"),
            t,
            (peak.saturating_sub(idle)) as f64 / OPEN_STREAMS as f64,
            false,
        );
        results.add(
            &format!("{OPEN_STREAMS} streams: failed"),
            t,
            failed as f64,
            false,
        );
    }
    println!(
        "\ncorral {} on {}; medians of {rounds} round(s)",
        corral::LONG_VERSION,
        machine()
    );
    if canned {
        println!("--canned: every gateway's upstream is nginx answering fixed bodies (a separate process, a worker per core); direct: plain HTTP to it;");
    } else {
        println!("direct: plain HTTP to the Ollama double;");
    }
    println!("corral and nginx: TLS (HTTP/1.1, keep-alive), key check, access log; bare pingora: pingora's minimal proxy, same TLS and runtime as corral, key check, no log;");
    println!(
        "pool of 3: corral with three nodes (the same double), each request routed among them;"
    );
    println!(
        "corral+redis: team limits in a local redis-server ([state]), one store call per admission"
    );
    results.print();
}
