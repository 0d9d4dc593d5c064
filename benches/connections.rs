//! What open connections cost corral in memory, and whether it gives the memory back.
//!
//!   cargo bench --bench connections             (10 000 connections)
//!   cargo bench --bench connections -- 2000     (another number)
//!   CORRAL_BENCH_BIN=path/to/corral cargo bench --bench connections   (another build)
//!
//! Starts the Ollama double and corral (release build, TLS), then measures corral's resident
//! memory (RSS): idle; with N TCP connections that never start a TLS handshake; with N finished
//! TLS handshakes that never send a request (what an idle keep-alive client costs); and every
//! second after all of them closed, until it is back within 30 MiB of idle. Prints the figures.
// A benchmark that cannot set itself up stops with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral::dev::devcert::DevCa;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let ca = DevCa::new("bench CA").unwrap();
    let (cert, key) = ca.issue("localhost", &["localhost"]).unwrap();
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    let (double_port, port, metrics_port) = (free_port(), free_port(), free_port());
    let double = Command::new(&bin)
        .args(["double", "--listen", &format!("127.0.0.1:{double_port}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\nheader_timeout = \"10m\"\n\
             max_connections = 0\nmax_connections_per_ip = 0\nmax_requests = 0\nmax_requests_per_ip = 0\n\
             [upstream]\nurl = \"http://127.0.0.1:{double_port}\"\n[log]\nlevel = \"warn\"\n"
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
    wait_port(port);
    wait_port(metrics_port);

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

    let config = tls_config(&ca.cert_pem());
    let tls = runtime.block_on(async {
        let connector = tokio_rustls::TlsConnector::from(config);
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
    match back_after {
        Some(t) => println!(
            "  back within 30 MiB of idle after {:.0} s (target: 30 s)",
            t.as_secs_f64()
        ),
        None => println!("  NOT back within 30 MiB of idle after 40 s (target: 30 s)"),
    }
}
