//! Allocations per request, corral against the bare pingora proxy, under the same load.
//!
//!   cargo bench --features count-allocations --bench allocations
//!
//! Both run from the corral binary built with the `count-allocations` feature (its global
//! allocator counts; SIGUSR2 writes the totals to `$CORRAL_ALLOC_REPORT`), in front of the canned
//! upstream (nginx with fixed answers), driven by `oha` (its own process, so none of its
//! allocations count): 32 keep-alive TLS connections, small non-streaming `POST /api/show`.
// A benchmark that cannot set itself up stops with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{canned_upstream, free_port, identity, stop_nginx, wait_port, which};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REQUESTS: u64 = 20_000;

struct Gateway {
    name: &'static str,
    child: Child,
    port: u16,
    report: PathBuf,
}

impl Gateway {
    /// (allocations, bytes) so far, as the process reports them on SIGUSR2.
    fn totals(&self) -> (u64, u64) {
        let _ = std::fs::remove_file(&self.report);
        let sent = Command::new("kill")
            .args(["-USR2", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.report) {
                let mut it = text.split_whitespace().filter_map(|n| n.parse().ok());
                if let (Some(count), Some(bytes)) = (it.next(), it.next()) {
                    return (count, bytes);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} reports no allocation counts: build with `--features count-allocations`",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(port: u16, key: &str, requests: u64) {
    let out = Command::new("oha")
        .args([
            "--no-tui",
            "-n",
            &requests.to_string(),
            "-c",
            "32",
            "--insecure",
        ])
        .args([
            "-m",
            "POST",
            "-T",
            "application/json",
            "-d",
            r#"{"model":"llama3.2"}"#,
        ])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .arg(format!("https://localhost:{port}/api/show"))
        .output()
        .expect("oha is needed: cargo install oha");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("[200] {requests} responses")),
        "every request answered 200:\n{text}"
    );
}

fn spawn(bin: &str, args: &[String], dir: &Path, name: &'static str, port: u16) -> Gateway {
    let report = dir.join(format!("{name}.alloc"));
    let child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("CORRAL_ALLOC_REPORT", &report)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port, name);
    Gateway {
        name,
        child,
        port,
        report,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for the list of tests: none here.
    }
    let bin = env!("CARGO_BIN_EXE_corral");
    let nginx = which("nginx").expect("nginx is needed: apt-get install nginx");
    let dir = std::env::temp_dir().join(format!("corral-allocs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (key, _, _) = identity(&dir);
    let upstream_port = free_port();
    let mut canned = canned_upstream(&nginx, &dir, upstream_port);

    let (port, metrics) = (free_port(), free_port());
    std::fs::write(
        dir.join("corral.toml"),
        format!(
            r#"[server]
listen = "127.0.0.1:{port}"
tls_cert = "tls.crt"
tls_key = "tls.key"
metrics_listen = "127.0.0.1:{metrics}"
max_connections_per_ip = 0
max_requests_per_ip = 0
[upstream]
url = "http://127.0.0.1:{upstream_port}"
[auth]
verify_keys = ["keys/bench.pub.pem"]
revoked_file = ""
[teams.bench]
models = ["*"]
rpm = 100000000
[log]
format = "json"
level = "warn"
"#
        ),
    )
    .unwrap();
    let corral = spawn(
        bin,
        &["serve".into(), "--config".into(), "corral.toml".into()],
        &dir,
        "corral",
        port,
    );
    let bare_port = free_port();
    let bare = spawn(
        bin,
        &[
            "bare-proxy".into(),
            "--listen".into(),
            format!("127.0.0.1:{bare_port}"),
            "--upstream".into(),
            format!("127.0.0.1:{upstream_port}"),
            "--tls-cert".into(),
            "tls.crt".into(),
            "--tls-key".into(),
            "tls.key".into(),
            "--api-key".into(),
            key.clone(),
        ],
        &dir,
        "bare pingora",
        bare_port,
    );

    println!(
        "\n{:<14} {:>16} {:>16}",
        "", "allocs/request", "bytes/request"
    );
    let mut per = Vec::new();
    for g in [&corral, &bare] {
        // Warm: connections, caches, the key's verification.
        load(g.port, &key, 2_000);
        let (c0, b0) = g.totals();
        load(g.port, &key, REQUESTS);
        let (c1, b1) = g.totals();
        let (allocs, bytes) = (
            (c1 - c0) as f64 / REQUESTS as f64,
            (b1 - b0) as f64 / REQUESTS as f64,
        );
        println!("{:<14} {allocs:>16.1} {bytes:>16.0}", g.name);
        per.push((allocs, bytes));
    }
    println!(
        "{:<14} {:>15.2}x {:>15.2}x",
        "corral/bare",
        per[0].0 / per[1].0,
        per[0].1 / per[1].1
    );
    drop((corral, bare));
    stop_nginx(&mut canned);
    let _ = std::fs::remove_dir_all(&dir);
}
