//! What open connections cost corral in memory, and whether it gives the memory back.
//!
//!   cargo bench --bench connections             (10 000 connections)
//!   cargo bench --bench connections -- 2000     (another number)
//!   CORRAL_BENCH_BIN=path/to/corral cargo bench --bench connections   (another build)
//!
//! Starts the Ollama double and corral (release build, TLS), then measures corral's resident
//! memory (RSS): idle; with N TCP connections that never start a TLS handshake; with N finished
//! TLS handshakes that never send a request (what an idle keep-alive client costs); and every
//! second after all of them closed, until it is back within 30 MiB of idle; then with 1,000
//! streaming generations open at once (each a TLS connection to corral, a request corral holds,
//! and a connection from corral to the double), the figure the performance target names (at
//! most 48 KiB per open stream). Prints the figures.
// A benchmark that cannot set itself up stops with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, identity, wait_port};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Streams held open at once in the last phase.
const STREAMS: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

struct Running(Vec<Child>, std::path::PathBuf);

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

const BODY: &str = r#"{"model":"llama3.2","prompt":"Tell me a long story.","stream":true}"#;

/// RSS once it has stopped moving (two equal readings 200 ms apart, at most 5 s).
fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_kib(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let bin = std::env::var("CORRAL_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_corral").to_string());
    let dir = std::env::temp_dir().join(format!("corral-conn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, ca_pem, public) = identity(&dir);
    let (double_port, port, metrics_port) = (free_port(), free_port(), free_port());
    // Slow, long answers: a stream stays open for minutes unless its client leaves.
    let double = Command::new(&bin)
        .args(["double", "--listen", &format!("127.0.0.1:{double_port}")])
        .args(["--token-delay", "200ms", "--tokens", "2000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\nheader_timeout = \"10m\"\n\
             max_connections = 0\nmax_connections_per_ip = 0\nmax_requests = 0\nmax_requests_per_ip = 0\n\
             [upstream]\nurl = \"http://127.0.0.1:{double_port}\"\n[log]\nlevel = \"warn\"\n\
             [auth]\nverify_keys = [\"{}\"]\n[teams.bench]\nmodels = [\"*\"]\n",
            public.display()
        ),
    )
    .unwrap();
    let corral = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(dir.join("corral.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = corral.id();
    let _running = Running(vec![corral, double], dir);
    wait_port(port, "corral");
    wait_port(metrics_port, "corral's metrics listener");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let idle = settled_rss(pid);
    println!("corral connection memory, {n} connections (RSS in MiB; per connection in KiB)");
    println!(
        "  idle:                               {:>7.1}",
        idle as f64 / 1024.0
    );

    let config = tls_config(&ca_pem);
    let tls = runtime.block_on(async {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            v.push(connector.connect(name, tcp).await.unwrap());
        }
        v
    });
    let with_tls = settled_rss(pid);
    println!(
        "  {n} TLS, handshake done, idle:   {:>7.1}   {:>5.1} KiB each",
        with_tls as f64 / 1024.0,
        (with_tls.saturating_sub(idle)) as f64 / n as f64
    );
    let closed_at = Instant::now();
    drop(tls);
    let target = idle + 30 * 1024;
    let mut back_after = None;
    for s in 1..=40 {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss_kib(pid);
        if s % 10 == 0 || (back_after.is_none() && now <= target) {
            println!(
                "  {s:>2} s after they closed:            {:>7.1}",
                now as f64 / 1024.0
            );
        }
        if now <= target && back_after.is_none() {
            back_after = Some(closed_at.elapsed());
        }
        if back_after.is_some() && s >= 30 {
            break;
        }
    }
    let base = settled_rss(pid);
    let raw: Vec<TcpStream> = runtime.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        v
    });
    let with_raw = settled_rss(pid);
    println!(
        "  {n} TCP, no handshake (after):   {:>7.1}   {:>5.1} KiB each",
        with_raw as f64 / 1024.0,
        (with_raw.saturating_sub(base)) as f64 / n as f64
    );
    drop(raw);

    // Streams: each client waits until its first token has come through, then holds the stream.
    let base = settled_rss(pid);
    let request = format!(
        "POST /api/generate HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        BODY.len(),
        BODY
    );
    let open: Vec<_> = runtime.block_on(async {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..STREAMS {
            let (connector, request) = (connector.clone(), request.clone());
            tasks.spawn(async move {
                let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, tcp).await.unwrap();
                tls.write_all(request.as_bytes()).await.unwrap();
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&seen).contains("\"done\":false") {
                    let n = tls.read(&mut buf).await.unwrap();
                    assert!(
                        n > 0,
                        "the stream ended: {}",
                        String::from_utf8_lossy(&seen)
                    );
                    seen.extend_from_slice(&buf[..n]);
                }
                assert!(
                    seen.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&seen)
                );
                tls
            });
        }
        tasks.join_all().await
    });
    let with_streams = settled_rss(pid);
    println!(
        "  {STREAMS} open streams (after):          {:>7.1}   {:>5.1} KiB each (target: 48)",
        with_streams as f64 / 1024.0,
        (with_streams.saturating_sub(base)) as f64 / STREAMS as f64
    );
    drop(open);
    match back_after {
        Some(t) => println!(
            "  back within 30 MiB of idle after {:.0} s (target: 30 s)",
            t.as_secs_f64()
        ),
        None => println!("  NOT back within 30 MiB of idle after 40 s (target: 30 s)"),
    }
}
