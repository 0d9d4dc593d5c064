//! Pinned models: loaded at start-up by the right route, kept loaded across Ollama restarts, and
//! protected from clients' keep_alive.

use crate::common::*;
use corral::config::{HumanDuration, KeepAlivePolicy};
use corral::ollama::KeepAlive;
use serde_json::{json, Value};
use std::time::Duration;

fn preload_config(upstream: &str, models: &[&str]) -> corral::config::Config {
    let mut cfg = test_config(upstream);
    cfg.preload.models = models.iter().map(|m| m.to_string()).collect();
    cfg.preload.watch_interval = HumanDuration::secs(1);
    cfg
}

async fn readyz(corral: &Corral) -> (u16, Value) {
    let resp = reqwest::get(format!("{}/readyz", corral.metrics_base()))
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn until_ready(corral: &Corral) {
    wait_for_async(Duration::from_secs(20), "readiness", || async {
        (readyz(corral).await.0 == 200).then_some(())
    })
    .await;
}

fn is_loaded(double: &OllamaDouble, model: &str) -> bool {
    double.loaded().iter().any(|m| m.name == model)
}

/// Requests to `path` corral itself sent (preloads, probes, watch rounds).
fn own(double: &OllamaDouble, path: &str) -> Vec<corral::dev::double::Recorded> {
    double
        .requests_to(path)
        .into_iter()
        .filter(|r| {
            r.header("user-agent")
                .is_some_and(|ua| ua.starts_with("corral/"))
        })
        .collect()
}

/// The JSON bodies of the requests corral itself sent to `path`.
fn own_requests(double: &OllamaDouble, path: &str) -> Vec<Value> {
    own(double, path).iter().filter_map(|r| r.json()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_models_load_at_start_by_the_route_their_capabilities_need() {
    let double = double().await;
    let corral = Corral::start(preload_config(
        &double.url(),
        &["llama3.2", "nomic-embed-text"],
    ));
    until_ready(&corral).await;

    assert_eq!(
        own_requests(&double, "/api/generate"),
        [json!({"model": "llama3.2:latest", "keep_alive": -1})]
    );
    assert_eq!(
        own_requests(&double, "/api/embed"),
        [json!({"model": "nomic-embed-text:latest", "keep_alive": -1})]
    );
    for m in ["llama3.2:latest", "nomic-embed-text:latest"] {
        let loaded = double.loaded().into_iter().find(|l| l.name == m).expect(m);
        assert_eq!(loaded.keep_alive, KeepAlive::Forever, "{m}");
    }
    let (_, body) = readyz(&corral).await;
    assert_eq!(
        body["models"],
        json!({"llama3.2:latest": "loaded", "nomic-embed-text:latest": "loaded"})
    );
    wait_for_async(Duration::from_secs(10), "the loaded gauges", || async {
        let m = corral.metrics().await;
        (metric_sum(&m, "corral_model_loaded", &[]) == 2.0).then_some(())
    })
    .await;
    let m = corral.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("corral_model_preload_duration_seconds{")
                && l.contains("model=\"llama3.2:latest\"")
                && l.contains("node=\"default\"")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_someone_else_loaded_for_a_while_is_pinned_for_good() {
    let double = double().await;
    // Loaded before corral starts, by a client, for ten minutes.
    let resp = reqwest::Client::new()
        .post(format!("{}/api/generate", double.url()))
        .json(&json!({"model": "llama3.2", "keep_alive": "10m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(is_loaded(&double, "llama3.2:latest"));

    let corral = Corral::start(preload_config(&double.url(), &["llama3.2"]));
    until_ready(&corral).await;
    assert_eq!(
        own_requests(&double, "/api/generate"),
        [json!({"model": "llama3.2:latest", "keep_alive": -1})]
    );
    let loaded = double
        .loaded()
        .into_iter()
        .find(|l| l.name == "llama3.2:latest");
    assert_eq!(loaded.unwrap().keep_alive, KeepAlive::Forever);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_a_slow_load_then_turns_ready() {
    let double = double().await; // llama3.1:70b takes 3 s to load
    let corral = Corral::start(preload_config(&double.url(), &["llama3.1:70b"]));
    let (status, body) = readyz(&corral).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["models"]["llama3.1:70b"], "loading");
    // Live all along: only readiness waits.
    assert_eq!(
        reqwest::get(format!("{}/livez", corral.metrics_base()))
            .await
            .unwrap()
            .status(),
        200
    );
    wait_for_async(Duration::from_secs(30), "readiness", || async {
        (readyz(&corral).await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_started_after_corral_is_picked_up_by_the_retries() {
    let port = reserve_port();
    let corral = Corral::start(preload_config(
        &format!("http://127.0.0.1:{port}"),
        &["llama3.2"],
    ));
    wait_for(Duration::from_secs(20), "a retry in the log", || {
        corral
            .stderr_text()
            .contains("Ollama not reachable for preloading")
            .then_some(())
    });
    assert_eq!(readyz(&corral).await.0, 503);
    let double = OllamaDouble::start_on(loopback(port), DoubleConfig::default())
        .await
        .unwrap();
    wait_for_async(
        Duration::from_secs(40),
        "readiness after Ollama came up",
        || async { (readyz(&corral).await.0 == 200).then_some(()) },
    )
    .await;
    assert!(is_loaded(&double, "llama3.2:latest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_ollama_is_preloaded_again() {
    let double = double().await;
    let addr = double.addr();
    let corral = Corral::start(preload_config(&double.url(), &["llama3.2"]));
    until_ready(&corral).await;

    // Ollama restarts: everything it had loaded is gone.
    double.shutdown().await;
    let restarted = OllamaDouble::start_on(addr, DoubleConfig::default())
        .await
        .unwrap();
    assert!(!is_loaded(&restarted, "llama3.2:latest"));
    wait_for_async(
        Duration::from_secs(20),
        "the pinned model to be loaded again",
        || async { is_loaded(&restarted, "llama3.2:latest").then_some(()) },
    )
    .await;
    assert_eq!(
        own_requests(&restarted, "/api/generate"),
        [json!({"model": "llama3.2:latest", "keep_alive": -1})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_keep_alive_cannot_unload_a_pinned_model_under_pin() {
    let double = double().await;
    let corral = Corral::start(preload_config(&double.url(), &["llama3.2"]));
    until_ready(&corral).await;
    let client = corral.client();
    // The unload request Ollama documents: empty prompt, keep_alive 0.
    let resp = client
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.2", "keep_alive": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = forwarded(&double).last().unwrap().json().unwrap();
    assert_eq!(
        seen["keep_alive"], -1,
        "the client's keep_alive reached Ollama"
    );
    assert!(
        is_loaded(&double, "llama3.2:latest"),
        "a client unloaded a pinned model"
    );
    // A shorter keep_alive with a real prompt is replaced too; other models pass untouched.
    client.post(format!("{}/api/chat", corral.base())).json(&json!({"model": "llama3.2", "keep_alive": "1s", "stream": false, "messages": [{"role": "user", "content": "x"}]})).send().await.unwrap();
    assert_eq!(
        forwarded(&double).last().unwrap().json().unwrap()["keep_alive"],
        -1
    );
    client
        .post(format!("{}/api/generate", corral.base()))
        .json(
            &json!({"model": "qwen2.5-coder:7b", "prompt": "x", "keep_alive": 0, "stream": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        forwarded(&double).last().unwrap().json().unwrap()["keep_alive"],
        0
    );
    assert!(!is_loaded(&double, "qwen2.5-coder:7b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_name_for_a_pinned_model_cannot_unload_it_either() {
    let double = double().await;
    let corral = Corral::start(preload_config(&double.url(), &["llama3.2"]));
    until_ready(&corral).await;
    let client = corral.client();
    // An admin makes a second name for the pinned model (Ollama: same manifest, same runner).
    let resp = client
        .post(format!("{}/api/copy", corral.base()))
        .json(&json!({"source": "llama3.2", "destination": "team-llama"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // corral learns the new name from /api/tags: wait until its probe has read a list with it
    // (the second probe after the copy starts only once the first one's answer was handled).
    let probes = || own(&double, "/api/tags").len();
    let seen = probes();
    wait_for(Duration::from_secs(30), "two more upstream probes", || {
        (probes() >= seen + 2).then_some(())
    });
    let resp = client
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "team-llama", "keep_alive": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        forwarded(&double).last().unwrap().json().unwrap()["keep_alive"],
        -1,
        "keep_alive 0 through the other name reached Ollama"
    );
    assert!(
        is_loaded(&double, "llama3.2:latest"),
        "the pinned model was unloaded"
    );

    // Ollama restarted (here: the model unloaded behind corral's back) and a client loaded it
    // through the other name first: /api/ps lists it under that name, and corral counts it.
    let resp = reqwest::Client::new()
        .post(format!("{}/api/generate", double.url()))
        .json(&json!({"model": "llama3.2", "keep_alive": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!is_loaded(&double, "llama3.2:latest"));
    let resp = client
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "team-llama", "prompt": "hi", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(is_loaded(&double, "team-llama:latest"));
    // Three watch rounds later: no preload of llama3.2 again, and it counts as loaded.
    let preloads = own_requests(&double, "/api/generate").len();
    let rounds = || own(&double, "/api/ps").len();
    let seen = rounds();
    wait_for(Duration::from_secs(30), "three more watch rounds", || {
        (rounds() >= seen + 3).then_some(())
    });
    assert_eq!(own_requests(&double, "/api/generate").len(), preloads);
    assert_eq!(readyz(&corral).await.0, 200);
    let m = corral.metrics().await;
    assert_eq!(
        metric_sum(&m, "corral_model_loaded", &[("model", "llama3.2:latest")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_pass_a_clients_keep_alive_goes_through() {
    let double = double().await;
    let mut cfg = preload_config(&double.url(), &["llama3.2"]);
    cfg.preload.keep_alive_policy = KeepAlivePolicy::Pass;
    let corral = Corral::start(cfg);
    until_ready(&corral).await;
    let resp = corral
        .client()
        .post(format!("{}/api/generate", corral.base()))
        .json(&json!({"model": "llama3.2", "keep_alive": 0}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["done_reason"], "unload");
    assert!(!is_loaded(&double, "llama3.2:latest"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_is_reported_and_does_not_block_the_others() {
    let double = double().await;
    let setup = Setup::new(preload_config(&double.url(), &["not-pulled", "llama3.2"]));
    let config = setup.write();
    let corral = setup.start();
    wait_for_async(Duration::from_secs(20), "the good model", || async {
        is_loaded(&double, "llama3.2:latest").then_some(())
    })
    .await;
    let (status, body) = wait_for_async(
        Duration::from_secs(20),
        "the failure in /readyz",
        || async {
            let (s, b) = readyz(&corral).await;
            b["models"]["not-pulled:latest"]
                .as_str()
                .is_some_and(|v| v.starts_with("failed"))
                .then_some((s, b))
        },
    )
    .await;
    assert_eq!(status, 503);
    assert!(
        body["models"]["not-pulled:latest"]
            .as_str()
            .unwrap()
            .contains("pull it first"),
        "{body}"
    );
    assert_eq!(body["models"]["llama3.2:latest"], "loaded");
    assert!(corral
        .stderr_text()
        .contains("pinned model cannot be loaded"));
    // Still serving, not crash-looping.
    let resp = corral
        .client()
        .get(format!("{}/api/version", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let out = std::process::Command::new(corral_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        report.contains("preload.models[0] = \"not-pulled\": Ollama does not have it"),
        "{report}"
    );
    assert!(
        report.contains("preload.models[1] = \"llama3.2\": Ollama has it"),
        "{report}"
    );
}

fn pull_progress(corral: &Corral) -> Vec<String> {
    corral
        .stderr_text()
        .lines()
        .filter(|l| l.contains("\"pulling\"") || l.contains("\"pulled\""))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_pinned_models_are_pulled_with_progress_then_loaded() {
    // Ollama starts with nothing pulled; each progress line takes 200 ms.
    let double = double_with(|c| {
        c.models = vec![];
        c.token_delay = Duration::from_millis(200);
    })
    .await;
    let mut cfg = preload_config(&double.url(), &["llama3.2", "nomic-embed-text"]);
    cfg.preload.pull_missing = true;
    let corral = Corral::start(cfg);

    // While it pulls, /readyz says how far along it is.
    let seen = wait_for_async(Duration::from_secs(20), "a pull in progress", || async {
        let (status, body) = readyz(&corral).await;
        let state = body["models"]["llama3.2:latest"]
            .as_str()
            .unwrap_or("")
            .to_string();
        (status == 503 && state.starts_with("pulling ")).then_some(state)
    })
    .await;
    assert!(seen.ends_with('%'), "{seen}");
    until_ready(&corral).await;
    assert!(is_loaded(&double, "llama3.2:latest"));
    assert!(is_loaded(&double, "nomic-embed-text:latest"));
    let pulls = own_requests(&double, "/api/pull");
    assert_eq!(
        pulls,
        [
            json!({"model": "llama3.2:latest", "stream": true}),
            json!({"model": "nomic-embed-text:latest", "stream": true})
        ]
    );
    // The embedding model was loaded through /api/embed once pulled.
    assert_eq!(own_requests(&double, "/api/embed").len(), 1);
    let metrics = corral.metrics().await;
    let bytes = |kind| {
        metric_sum(
            &metrics,
            "corral_model_pull_bytes",
            &[("model", "llama3.2:latest"), ("kind", kind)],
        )
    };
    assert!(bytes("total") > 1e9, "{metrics}");
    assert_eq!(bytes("completed"), bytes("total"));
    // The log reports every 10% of each pull, and its end.
    let log = wait_for(Duration::from_secs(10), "both pulls in the log", || {
        let log = pull_progress(&corral);
        (log.iter().filter(|l| l.contains("\"pulled\"")).count() == 2).then_some(log)
    });
    let percents: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("llama3.2") && l.contains("\"percent\""))
        .collect();
    assert!(percents.len() >= 3, "{log:?}");
    assert!(
        percents.last().unwrap().contains("\"percent\":100"),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_is_reported_and_retried_and_never_stops_the_gateway() {
    let double = double_with(|c| {
        c.models = vec![];
        c.failing_pulls = 1;
        c.unpullable = vec!["nosuch-model".into()];
    })
    .await;
    let mut cfg = preload_config(&double.url(), &["llama3.2", "nosuch-model"]);
    cfg.preload.pull_missing = true;
    let corral = Corral::start(cfg);

    // The first pull of llama3.2 breaks off: reported, then pulled again after its backoff.
    let first = wait_for_async(Duration::from_secs(20), "the failed pull", || async {
        let (_, body) = readyz(&corral).await;
        let state = body["models"]["llama3.2:latest"]
            .as_str()
            .unwrap_or("")
            .to_string();
        state.starts_with("failed: pull failed").then_some(state)
    })
    .await;
    assert!(first.contains("connection reset"), "{first}");
    wait_for_async(
        Duration::from_secs(60),
        "llama3.2 pulled on a retry",
        || async {
            let (_, body) = readyz(&corral).await;
            (body["models"]["llama3.2:latest"] == "loaded").then_some(())
        },
    )
    .await;
    // A model the registry does not have stays failed, with Ollama's reason, and the gateway
    // keeps serving (not ready, since a pinned model is missing).
    let (status, body) = readyz(&corral).await;
    assert_eq!(status, 503);
    let state = body["models"]["nosuch-model:latest"].as_str().unwrap();
    assert!(state.contains("file does not exist"), "{state}");
    let resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(corral
        .stderr_text()
        .contains("pinned model could not be pulled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_config_becomes_ready_from_an_empty_model_store() {
    let double = double_with(|c| {
        c.models = vec![];
        c.token_delay = Duration::from_millis(5);
    })
    .await;
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes.toml");
    // The Ollama StatefulSet's headless Service, here a name that resolves to the double.
    let mut cfg = test_config(&double.url());
    cfg.upstream.url = None;
    cfg.upstream.discover = Some(corral::config::DiscoverConfig {
        dns: format!("localhost:{}", double.addr().port()),
        parallel: None,
    });
    let setup = Setup::new(cfg);
    let mut corral = setup.spawn_file(&file, &[]);
    corral.wait_ready();
    until_ready(&corral).await;
    let (_, body) = readyz(&corral).await;
    assert_eq!(
        body["models"],
        json!({
            "llama3.2:latest": {"127-0-0-1": "loaded"},
            "nomic-embed-text:latest": {"127-0-0-1": "loaded"},
        })
    );
    assert_eq!(own_requests(&double, "/api/pull").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pull_does_not_hold_up_the_other_pinned_models() {
    // llama3.2 must be pulled, slowly (half a second per progress line); nomic-embed-text is there.
    let double = double_with(|c| {
        c.models = vec![ModelSpec::embedding("nomic-embed-text")];
        c.token_delay = Duration::from_millis(500);
    })
    .await;
    let mut cfg = preload_config(&double.url(), &["llama3.2", "nomic-embed-text"]);
    cfg.preload.pull_missing = true;
    let corral = Corral::start(cfg);
    let models = wait_for_async(
        Duration::from_secs(20),
        "the present model loaded",
        || async {
            let (_, body) = readyz(&corral).await;
            (body["models"]["nomic-embed-text:latest"] == "loaded")
                .then_some(body["models"].clone())
        },
    )
    .await;
    let llama = models["llama3.2:latest"].as_str().unwrap();
    assert!(
        llama.starts_with("pulling"),
        "loaded while the other pulls: {models}"
    );
    until_ready(&corral).await;
}
