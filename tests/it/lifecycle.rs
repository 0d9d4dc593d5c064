//! Start-up checks, graceful drain on SIGTERM, `corral check`, built-in defaults.

use crate::common::*;
use corral::config::{HumanDuration, ListenAddr};
use serde_json::json;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_streams_finish() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(250)).await;
    let mut corral = Corral::start(test_config(&double.url()));
    let mut resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    next_chunk(&mut resp).await.unwrap();

    corral.signal("TERM");
    wait_for(Duration::from_secs(10), "the listener to close", || {
        TcpStream::connect(loopback(corral.port))
            .is_err()
            .then_some(())
    });

    let (rest, complete) = rest_text(&mut resp).await;
    assert!(complete, "stream cut during drain: {rest}");
    assert!(rest
        .trim_end()
        .lines()
        .last()
        .unwrap()
        .contains("\"done\":true"));
    let status = corral.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_exits_at_once_on_sigterm() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.server.grace_period = HumanDuration::secs(600);
    let mut corral = Corral::start(cfg);
    corral.signal("TERM");
    // Well within the 10-minute grace period: nothing was in flight.
    let status = corral.wait_exit(Duration::from_secs(30));
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_longer_than_the_grace_period_are_cut_at_its_end() {
    let double = double_with(|c| {
        c.token_delay = Duration::from_secs(1);
        c.response_tokens = 60;
    })
    .await;
    let mut cfg = test_config(&double.url());
    cfg.server.grace_period = HumanDuration::secs(1);
    let mut corral = Corral::start(cfg);
    let mut resp = corral
        .client()
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.2", "prompt": "a long story"}))
        .send()
        .await
        .unwrap();
    next_chunk(&mut resp).await.unwrap();
    corral.signal("TERM");
    corral.wait_exit(Duration::from_secs(30));
    let (rest, _) = rest_text(&mut resp).await;
    assert!(
        !rest.contains("\"done\":true"),
        "a 60 s stream outlived a 1 s grace period"
    );
}

fn start_failure(cfg: corral::config::Config, edit: impl FnOnce(&std::path::Path)) -> String {
    let setup = Setup::new(cfg);
    edit(setup.dir.path());
    let mut corral = setup.spawn(&[]);
    let status = corral.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "corral started despite a broken setup");
    corral.stderr_text()
}

#[test]
fn a_bad_certificate_stops_start_up_naming_the_file() {
    let err = start_failure(test_config("http://127.0.0.1:9"), |dir| {
        std::fs::write(dir.join("tls.crt"), "junk").unwrap()
    });
    assert!(
        err.contains("server.tls_cert")
            && err.contains("tls.crt")
            && err.contains("no PEM certificate"),
        "{err}"
    );
    let err = start_failure(test_config("http://127.0.0.1:9"), |dir| {
        std::fs::remove_file(dir.join("tls.key")).unwrap()
    });
    assert!(
        err.contains("server.tls_key") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn a_taken_port_stops_start_up_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = test_config("http://127.0.0.1:9");
    cfg.server.metrics_listen = ListenAddr(Some(taken.local_addr().unwrap()));
    let err = start_failure(cfg, |_| {});
    assert!(
        err.contains("server.metrics_listen") && err.contains("in use"),
        "{err}"
    );
}

#[test]
fn a_bad_config_file_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corral.toml");
    std::fs::write(
        &path,
        "[server]\nmax_body = \"lots\"\n[upstream]\nurll = \"x\"\n",
    )
    .unwrap();
    let out = Command::new(corral_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("server.max_body") || err.contains("upstream"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_config_file_it_runs_loopback_defaults_and_says_so() {
    let double = double().await;
    let (port, metrics) = (reserve_port(), reserve_port());
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(corral_bin())
        .arg("serve")
        .current_dir(cwd.path())
        .env_remove("CORRAL_CONFIG")
        .env("CORRAL__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "CORRAL__SERVER__METRICS_LISTEN",
            format!("127.0.0.1:{metrics}"),
        )
        .env("CORRAL__UPSTREAM__URL", double.url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), "corral to listen", || {
        TcpStream::connect(loopback(port)).is_ok().then_some(())
    });
    // A throwaway self-signed certificate: clients must opt out of verification to talk to it.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://127.0.0.1:{port}/api/version"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no configuration file") && err.contains("throwaway self-signed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_problem_and_whether_ollama_answers() {
    let double = double().await;
    let setup = Setup::new(test_config(&double.url()));
    let path = setup.write();
    let (dir, certs) = (&setup.dir, &setup.certs);
    let check = |path: &std::path::Path| {
        let out = Command::new(corral_bin())
            .args(["check", "--config"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };

    let (ok, report) = check(&path);
    assert!(ok, "{report}");
    assert!(report.contains("Ollama 0.33.0 answers"), "{report}");

    double.stop();
    let (ok, report) = check(&path);
    assert!(!ok);
    assert!(
        report.contains("upstream.url") && report.contains("cannot connect"),
        "{report}"
    );

    std::fs::write(&certs.key, "junk").unwrap();
    let (ok, report) = check(&path);
    assert!(!ok);
    assert!(report.contains("server.tls_key"), "{report}");

    let out = Command::new(corral_bin())
        .args(["check", "--skip-upstream", "--config"])
        .arg(dir.path().join("none.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("file not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_overrides_beat_the_file() {
    let double = double().await;
    let url = double.url();
    let setup = Setup::new(test_config("http://127.0.0.1:9"));
    let mut corral = setup.spawn(&[("CORRAL__UPSTREAM__URL", url.as_str())]);
    corral.wait_ready();
    let resp = corral
        .client()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the file's dead upstream was used");
}
