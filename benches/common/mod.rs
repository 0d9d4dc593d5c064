//! What the load benchmarks share: ports, tools on PATH, and the canned upstream.
// A benchmark that cannot set itself up stops with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// nginx answering like Ollama with fixed bodies, for `--canned`: an upstream that costs next to
/// nothing, so the gateways' own costs are what the figures show.
pub fn canned_upstream(nginx_bin: &Path, dir: &Path, port: u16) -> Child {
    let d = dir.join("canned");
    std::fs::create_dir_all(&d).unwrap();
    let d = d.display();
    let show = r#"{"license":"","modelfile":"FROM llama3.2","parameters":"","template":"{{ .Prompt }}","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"3.2B","quantization_level":"Q4_K_M"},"model_info":{},"capabilities":["completion"]}"#;
    let tags = r#"{"models":[{"name":"llama3.2:latest","model":"llama3.2:latest","modified_at":"2026-11-01T00:00:00Z","size":2019393189,"digest":"a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72","details":{"format":"gguf","family":"llama","parameter_size":"3.2B","quantization_level":"Q4_K_M"}}]}"#;
    std::fs::write(
        dir.join("canned/nginx.conf"),
        format!(
            r#"worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  default_type application/json;
  server {{
    listen 127.0.0.1:{port};
    location = /api/tags {{ return 200 '{tags}'; }}
    location = /api/ps {{ return 200 '{{"models":[]}}'; }}
    location = /api/version {{ return 200 '{{"version":"0.33.0"}}'; }}
    location / {{ return 200 '{show}'; }}
  }}
}}
"#
        ),
    )
    .unwrap();
    let child = Command::new(nginx_bin)
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port, "the canned upstream (nginx)");
    child
}

/// Stops an nginx started by a benchmark. Its master stops its workers on SIGTERM; a SIGKILL
/// (`Child::kill`) leaves them running, still listening and taking CPU from the next run.
pub fn stop_nginx(nginx: &mut Child) {
    // SAFETY: signals a child process this benchmark started and has not yet waited for.
    unsafe {
        libc::kill(nginx.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = nginx.wait();
}

/// A certificate for `localhost` (`tls.crt`, `tls.key`) and an API key of team `bench`
/// (`keys/bench.{key,pub}.pem`) in `dir`: (the key, the CA certificate, the public key file).
pub fn identity(dir: &Path) -> (String, String, PathBuf) {
    let ca = corral::dev::devcert::DevCa::new("corral bench CA").unwrap();
    let (cert, key_pem) = ca.issue("localhost", &["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key_pem).unwrap();
    let (signing, public) = corral::access::keys::init(&dir.join("keys"), "bench").unwrap();
    let req = corral::access::keys::IssueRequest {
        team: "bench".into(),
        ..Default::default()
    };
    let (key, _) = corral::access::keys::issue(&signing, &req, corral::clock::unix_now()).unwrap();
    (key, ca.cert_pem(), public)
}
