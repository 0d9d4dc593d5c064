//! Zero-downtime binary upgrade (pingora's socket hand-over) and daemon mode, as systemd drives
//! them (deploy/systemd/corral.service).

use crate::common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_corral_takes_over_the_sockets_while_the_old_one_finishes_its_streams() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(300)).await;
    let mut cfg = test_config(&double.url());
    let setup_dir = tempfile::tempdir().unwrap();
    cfg.server.upgrade_sock = setup_dir.path().join("upgrade.sock");
    let mut old = Corral::start(cfg);

    // A stream on the old process, started before the hand-over.
    let mut stream = old
        .client()
        .post(format!("{}/api/chat", old.base()))
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    next_chunk(&mut stream).await.unwrap();

    // A client opening a fresh connection every few milliseconds, all through the hand-over.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let hammer = {
        let client = old
            .client_builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!("{}/api/version", old.base());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // The new binary starts, waiting for the sockets; the old one is told to hand them over.
    let config_path = old.dir.path().join("corral.toml");
    let mut new = Command::new(corral_bin())
        .args(["serve", "--upgrade", "--config"])
        .arg(&config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let new_log = Arc::new(Mutex::new(Vec::<String>::new()));
    let new_stderr = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let out = new.stdout.take().unwrap();
        let log = new_log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        let err = new.stderr.take().unwrap();
        let log = new_stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    old.signal("QUIT");

    // The old process lets its stream finish, then exits by itself.
    let (rest, complete) = rest_text(&mut stream).await;
    assert!(
        complete && rest.contains("\"done\":true"),
        "the stream was cut by the hand-over: {rest}"
    );
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(60)));
    assert!(status.success(), "old corral: {status}");

    // The new process serves from now on.
    wait_for(
        Duration::from_secs(10),
        "the new process to log requests",
        || (!new_log.lock().unwrap().is_empty()).then_some(()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    hammer.await.unwrap();
    let failures = failed.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} requests failed during the hand-over: {failures:?}",
        failures.len()
    );
    assert!(
        ok.load(Ordering::SeqCst) > 50,
        "too little traffic to mean anything"
    );
    assert_eq!(new.try_wait().unwrap(), None, "the new corral died");
    // A hand-over is routine: neither side logs anything at ERROR (the new one waits for the
    // sockets, and says so at INFO).
    let errors: Vec<String> = new_stderr
        .lock()
        .unwrap()
        .iter()
        .chain(
            old.stderr_text()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
                .iter(),
        )
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .cloned()
        .collect();
    assert_eq!(errors, Vec::<String>::new());
    let resp = old
        .client()
        .get(format!("{}/api/version", old.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    new.kill().unwrap();
    new.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_mode_detaches_writes_its_pid_and_stops_on_sigterm() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    let run_dir = tempfile::tempdir().unwrap();
    cfg.server.pid_file = run_dir.path().join("corral.pid");
    let setup = Setup::new(cfg);
    let config_path = setup.write();
    let port = setup.cfg.server.listen.0.unwrap().port();
    // The foreground process returns once the daemon has started.
    let status = Command::new(corral_bin())
        .args(["serve", "--daemon", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let pid: u32 = wait_for(Duration::from_secs(10), "the pid file", || {
        std::fs::read_to_string(&setup.cfg.server.pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
    });
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid));
    wait_for(Duration::from_secs(20), "the daemon to listen", || {
        std::net::TcpStream::connect(loopback(port))
            .is_ok()
            .then_some(())
    });
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(setup.certs.ca_pem.as_bytes()).unwrap(),
        )
        .resolve("localhost", loopback(port))
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{port}/api/version"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    Command::new("kill").arg(pid.to_string()).status().unwrap();
    wait_for(Duration::from_secs(20), "the daemon to exit", || {
        (!alive(pid)).then_some(())
    });
}
