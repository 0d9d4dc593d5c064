//! Replicas that agree: two corral processes share one real `redis-server` (persistence off, on a
//! reserved loopback port) for team limits, and a store that fails does what
//! `state.on_store_error` says, without hanging any request.

use crate::common::*;
use corral::config::{Config, OnStoreError, TeamConfig};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` for one test; killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = reserve_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        wait_for(Duration::from_secs(10), "redis-server", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Redis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_config(double: &OllamaDouble, redis: &Redis, on_error: OnStoreError) -> Config {
    let mut cfg = test_config(&double.url());
    cfg.state.store = redis.url();
    cfg.state.on_store_error = on_error;
    cfg.teams.insert(
        "limited".into(),
        TeamConfig {
            models: vec!["*".into()],
            rpm: 10,
            ..Default::default()
        },
    );
    cfg
}

/// Two replicas on one store, sharing the first's verification key.
async fn two_replicas(on_error: OnStoreError) -> (OllamaDouble, Redis, Corral, Corral) {
    let double = double_with(|c| c.token_delay = Duration::from_millis(1)).await;
    let redis = Redis::start();
    let a = Corral::start(replica_config(&double, &redis, on_error));
    let mut cfg = replica_config(&double, &redis, on_error);
    cfg.auth.verify_keys = a.cfg.auth.verify_keys.clone();
    let b = Corral::start(cfg);
    // Both connected to the store.
    for corral in [&a, &b] {
        wait_for_async(Duration::from_secs(10), "the store connected", || async {
            let m = corral.metrics().await;
            (metric_sum(&m, "corral_state_store_up", &[]) == 1.0).then_some(())
        })
        .await;
    }
    (double, redis, a, b)
}

async fn chat(corral: &Corral, key: &str) -> (u16, Duration) {
    let started = Instant::now();
    let status = corral
        .anonymous_client()
        .post(format!("{}/api/chat", corral.base()))
        .bearer_auth(key)
        .json(&json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_a_teams_rpm_between_them() {
    let (_double, _redis, a, b) = two_replicas(OnStoreError::Local).await;
    let key = a.issue("limited", None, None);
    let mut ok = 0;
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        match chat(replica, &key).await.0 {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 10, "rpm = 10 across both replicas, not 10 each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_does_what_on_store_error_says_and_nothing_hangs() {
    for (mode, expect) in [
        (OnStoreError::Deny, 503),
        (OnStoreError::Allow, 200),
        (OnStoreError::Local, 200),
    ] {
        let (_double, redis, a, _b) = two_replicas(mode).await;
        let key = a.issue("limited", None, None);
        drop(redis);
        let (status, took) = chat(&a, &key).await;
        assert_eq!(status, expect, "{mode:?}");
        assert!(took < Duration::from_secs(2), "{mode:?} took {took:?}");
        // The local fallback still limits: 10 a minute on this replica.
        if mode == OnStoreError::Local {
            let mut ok = 1;
            for _ in 0..12 {
                if chat(&a, &key).await.0 == 200 {
                    ok += 1;
                }
            }
            assert_eq!(ok, 10, "this replica's own rpm");
        }
        let m = a.metrics().await;
        assert_eq!(metric_sum(&m, "corral_state_store_up", &[]), 0.0);
        assert!(metric_sum(&m, "corral_state_store_errors_total", &[("op", "admit")]) >= 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_replica_is_refused_by_the_other_within_a_second() {
    let (_double, _redis, a, b) = two_replicas(OnStoreError::Local).await;
    let key = a.issue("limited", None, None);
    assert_eq!(chat(&b, &key).await.0, 200);
    // The operator revokes it with replica a's configuration (its own list, and the store).
    let out = Command::new(corral_bin())
        .args(["keys", "revoke", &key, "--config"])
        .arg(a.dir.path().join("corral.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("recorded in the state store"), "{said}");
    assert!(!said.contains(&key), "the key itself is never printed");
    let revoked_at = Instant::now();
    wait_for_async(Duration::from_secs(5), "b refuses the key", || async {
        (chat(&b, &key).await.0 == 401).then_some(())
    })
    .await;
    assert!(
        revoked_at.elapsed() < Duration::from_millis(2500),
        "{:?}",
        revoked_at.elapsed()
    );
    let line = wait_for(Duration::from_secs(10), "the refusal logged", || {
        b.access_log()
            .into_iter()
            .rev()
            .find(|l| l["status"] == 401)
    });
    assert_eq!(line["auth_failure"], "revoked");
}
