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
    // Short, so a killed replica's place comes back quickly here; renewed every 2 s, it leaves a
    // live request two missed renewals of room.
    cfg.state.lease_ttl = corral::config::HumanDuration::secs(6);
    // Exact counts must not depend on how busy this machine is: a call that misses its deadline
    // takes the on_store_error path. Deployments keep the 50 ms default.
    cfg.state.timeout = corral::config::HumanDuration::secs(1);
    cfg.teams.insert(
        "limited".into(),
        TeamConfig {
            models: vec!["*".into()],
            rpm: 10,
            ..Default::default()
        },
    );
    cfg.teams.insert(
        "one".into(),
        TeamConfig {
            models: vec!["*".into()],
            max_concurrent: 1,
            ..Default::default()
        },
    );
    cfg.teams.insert(
        "tokens".into(),
        TeamConfig {
            models: vec!["*".into()],
            tpm: 10,
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

/// A stream through `corral` with its first chunk read: it holds the team's place from then on.
async fn stream(corral: &Corral, key: &str) -> reqwest::Response {
    let mut resp = corral
        .anonymous_client()
        .post(format!("{}/api/chat", corral.base()))
        .bearer_auth(key)
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(next_chunk(&mut resp).await.is_some());
    resp
}

/// The requests an rpm of 10 admits over `elapsed`: a minute's allowance, then one every 6 s
/// (the bucket refills continuously). Exact counts would depend on this machine's speed.
fn ten_a_minute(elapsed: Duration) -> std::ops::RangeInclusive<u32> {
    10..=10 + (elapsed.as_secs_f64() / 6.0).ceil() as u32
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
    let started = Instant::now();
    let mut ok = 0;
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        match chat(replica, &key).await.0 {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    let allowed = ten_a_minute(started.elapsed());
    assert!(
        allowed.contains(&ok),
        "rpm = 10 across both replicas, not 10 each: {ok}"
    );
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
        let started = Instant::now();
        assert_eq!(status, expect, "{mode:?}");
        assert!(
            took < Duration::from_secs(3),
            "{mode:?} took {took:?}: past the deadline"
        );
        // The local fallback still limits: 10 a minute on this replica.
        if mode == OnStoreError::Local {
            let mut ok = 1;
            for _ in 0..12 {
                if chat(&a, &key).await.0 == 200 {
                    ok += 1;
                }
            }
            let allowed = ten_a_minute(took + started.elapsed());
            assert!(allowed.contains(&ok), "this replica's own rpm: {ok}");
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

    // Inside a pod the list is a read-only ConfigMap: the store alone revokes, and says so.
    let other = a.issue("limited", None, None);
    let text = std::fs::read_to_string(a.dir.path().join("corral.toml")).unwrap();
    let in_pod = a.dir.path().join("in-pod.toml");
    let revoked_line = text
        .lines()
        .find(|l| l.starts_with("revoked_file"))
        .unwrap()
        .to_string();
    std::fs::write(
        &in_pod,
        text.replace(
            &revoked_line,
            "revoked_file = \"/nonexistent/revoked/revoked.txt\"",
        ),
    )
    .unwrap();
    let out = Command::new(corral_bin())
        .args(["keys", "revoke", &other, "--config"])
        .arg(&in_pod)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("refused through the state store"), "{said}");
    wait_for_async(
        Duration::from_secs(5),
        "b refuses the other key",
        || async { (chat(&b, &other).await.0 == 401).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_are_shared_a_killed_replica_frees_them_and_a_live_stream_keeps_its_own() {
    let (double, _redis, mut a, b) = two_replicas(OnStoreError::Deny).await;
    let key = a.issue("one", None, None);
    // 12 tokens, a second apart: a stream of about 12 s, twice the lease time.
    double.set_token_delay(Duration::from_millis(1000));
    let held = stream(&a, &key).await;
    assert_eq!(
        chat(&b, &key).await.0,
        429,
        "max_concurrent = 1 across both"
    );
    // Replica a dies without a word: its place lapses within the lease time.
    a.child.kill().unwrap();
    drop(held);
    let killed = Instant::now();
    let mut live = wait_for_async(Duration::from_secs(20), "the place freed", || async {
        let mut resp = b
            .anonymous_client()
            .post(format!("{}/api/chat", b.base()))
            .bearer_auth(&key)
            .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        if resp.status() != 200 {
            return None;
        }
        next_chunk(&mut resp).await.map(|_| resp)
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(9),
        "within the lease time: {:?}",
        killed.elapsed()
    );
    // The live stream on b outlives its lease time: renewed, never lost, never cut.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            chat(&b, &key).await.0,
            429,
            "the stream still holds the place"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, complete) = rest_text(&mut live).await;
    assert!(complete, "the stream was never cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_used_through_one_replica_count_on_the_other() {
    let (_double, _redis, a, b) = two_replicas(OnStoreError::Deny).await;
    let key = a.issue("tokens", None, None);
    // 10 tokens a minute; one answer here uses 13 (1 prompt, 12 completion): it leaves the team
    // 3 tokens in debt, about 18 s of waiting.
    assert_eq!(chat(&a, &key).await.0, 200);
    // The charge is made when the answer has ended, in the background: wait for it to land.
    wait_for_async(
        Duration::from_secs(10),
        "the charge in the store",
        || async {
            let m = a.metrics().await;
            (metric_sum(&m, "corral_state_store_seconds_count", &[("op", "charge")]) >= 1.0)
                .then_some(())
        },
    )
    .await;
    // Replica b has served nothing, yet the team has nothing left there either.
    assert_eq!(chat(&b, &key).await.0, 429, "b knows what a used");
    // Counted by the report, which runs once the answer is out: the client may read the 429
    // first.
    wait_for_async(
        Duration::from_secs(10),
        "the refusal counted as tpm",
        || async {
            let m = b.metrics().await;
            let tpm = [("team", "tokens"), ("limit", "tpm")];
            (metric_sum(&m, "corral_rate_limited_total", &tpm) >= 1.0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_come_back_with_the_store() {
    let (_double, redis, a, b) = two_replicas(OnStoreError::Allow).await;
    let key = a.issue("limited", None, None);
    let port = redis.port;
    drop(redis);
    assert_eq!(
        chat(&a, &key).await.0,
        200,
        "allow: no limit while it is down"
    );
    // The store is back (empty, as after a restart without persistence).
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _redis = Redis { child, port };
    for replica in [&a, &b] {
        wait_for_async(Duration::from_secs(20), "limits shared again", || async {
            let m = replica.metrics().await;
            (metric_sum(&m, "corral_state_store_up", &[]) == 1.0).then_some(())
        })
        .await;
    }
    let started = Instant::now();
    let mut ok = 0;
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if chat(replica, &key).await.0 == 200 {
            ok += 1;
        }
    }
    let allowed = ten_a_minute(started.elapsed());
    assert!(allowed.contains(&ok), "rpm = 10 across both again: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_asks_the_store() {
    let (_double, redis, a, _b) = two_replicas(OnStoreError::Local).await;
    let config = a.dir.path().join("corral.toml");
    let check = || check_config(&config);
    let (ok, report) = check();
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!("state store {} answers", redis.url())),
        "{report}"
    );
    drop(redis);
    let (ok, report) = check();
    assert!(!ok, "{report}");
    assert!(report.contains("on_store_error"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_nodes_slots_and_a_killed_replicas_slot_comes_back() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(20)).await;
    let redis = Redis::start();
    let slotted = |verify_keys: Option<&Config>| {
        let mut cfg = replica_config(&double, &redis, OnStoreError::Deny);
        cfg.upstream.parallel = Some(1);
        if let Some(first) = verify_keys {
            cfg.auth.verify_keys = first.auth.verify_keys.clone();
        }
        cfg
    };
    let mut a = Corral::start(slotted(None));
    let b = Corral::start(slotted(Some(&a.cfg)));
    for corral in [&a, &b] {
        wait_for_async(Duration::from_secs(10), "the store connected", || async {
            let m = corral.metrics().await;
            (metric_sum(&m, "corral_state_store_up", &[]) == 1.0).then_some(())
        })
        .await;
    }
    let key = a.issue("limited", None, None);
    // Replica a's stream holds the node's one slot: b's request waits in b's line.
    let held = a
        .anonymous_client()
        .post(format!("{}/api/generate", a.base()))
        .bearer_auth(&key)
        .json(&json!({"model": "llama3.2", "prompt": "x", "options": {"num_predict": 100000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let (client, base, k) = (b.anonymous_client(), b.base(), key.clone());
    let waiting = tokio::spawn(async move {
        client
            .post(format!("{base}/api/chat"))
            .bearer_auth(&k)
            .json(&json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
    });
    wait_for_async(Duration::from_secs(10), "b's request in line", || async {
        let m = b.metrics().await;
        (metric_sum(&m, "corral_queue_depth", &[("team", "limited")]) == 1.0).then_some(())
    })
    .await;
    // Replica a dies without a word: its slot lapses within the lease time, and b's request
    // gets it.
    a.child.kill().unwrap();
    drop(held);
    let killed = Instant::now();
    assert_eq!(waiting.await.unwrap(), 200);
    assert!(
        killed.elapsed() < Duration::from_secs(9),
        "within the lease time: {:?}",
        killed.elapsed()
    );
    let generated = forwarded(&double)
        .iter()
        .filter(|r| r.target.starts_with("/api/"))
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(generated, 2, "one request at a time on the node");
}
