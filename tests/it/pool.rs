//! A pool of Ollama nodes behind one corral: requests go to a node that has their model (warm and
//! free first), a dead or full node is skipped before the answer starts, admin routes name their
//! node, and a model no node has is a 404 while one only a dead node has is a 503.

use crate::common::*;
use corral::config::{Config, NodeConfig};
use serde_json::{json, Value};
use std::time::Duration;

fn pool_config(nodes: &[(&str, &OllamaDouble, Option<u32>)]) -> Config {
    let mut cfg = test_config("http://127.0.0.1:1");
    cfg.upstream.url = None;
    cfg.upstream.nodes = nodes
        .iter()
        .map(|(name, double, parallel)| NodeConfig {
            name: name.to_string(),
            url: double.url().parse().unwrap(),
            parallel: *parallel,
            models: vec![],
        })
        .collect();
    cfg
}

/// Waits until every node's probe has answered (and its model lists are known).
async fn until_nodes_up(corral: &Corral, names: &[&str]) {
    wait_for_async(Duration::from_secs(20), "every node up", || async {
        let m = corral.metrics().await;
        names
            .iter()
            .all(|n| metric_sum(&m, "corral_upstream_up", &[("node", n)]) == 1.0)
            .then_some(())
    })
    .await;
}

fn double_of(models: &[&str]) -> DoubleConfig {
    let mut cfg = DoubleConfig::default();
    cfg.models = models.iter().map(|m| ModelSpec::chat(m)).collect();
    cfg
}

/// Loads `model` on a double directly (as another client of that Ollama would).
async fn load_directly(double: &OllamaDouble, model: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/generate", double.url()))
        .json(&json!({"model": model, "keep_alive": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

async fn chat(corral: &Corral, model: &str) -> reqwest::Response {
    corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

/// Starts a chat stream through corral and reads its first chunk (it holds a slot from then on).
async fn open_stream(corral: &Corral) -> reqwest::Response {
    let mut resp = corral
        .client()
        .post(format!("{}/api/chat", corral.base()))
        .json(&json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert!(next_chunk(&mut resp).await.is_some(), "the stream runs");
    resp
}

/// Two doubles with these models behind one corral, every node up.
async fn two_nodes(a: &[&str], b: &[&str]) -> (OllamaDouble, OllamaDouble, Corral) {
    let a = OllamaDouble::start(double_of(a)).await.unwrap();
    let b = OllamaDouble::start(double_of(b)).await.unwrap();
    let corral = Corral::start(pool_config(&[("a", &a, None), ("b", &b, None)]));
    until_nodes_up(&corral, &["a", "b"]).await;
    (a, b, corral)
}

fn chats(double: &OllamaDouble) -> usize {
    forwarded(double)
        .iter()
        .filter(|r| r.target == "/api/chat")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_goes_to_the_node_that_has_it_and_one_no_node_has_is_a_404() {
    let (a, b, corral) = two_nodes(&["llama3.2"], &["qwen2.5-coder:7b"]).await;

    for _ in 0..3 {
        let resp = chat(&corral, "qwen2.5-coder:7b").await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!((chats(&a), chats(&b)), (0, 3), "only b has it");
    let resp = chat(&corral, "llama3.2").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.status(), 200);
    assert_eq!((chats(&a), chats(&b)), (1, 3));
    let line = corral.log_line(&id);
    assert_eq!((&line["node"], &line["attempts"]), (&json!("a"), &json!(1)));

    // No node has it: Ollama's own 404, in each dialect, and nothing forwarded.
    let resp = chat(&corral, "nosuch").await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "model 'nosuch:latest' not found");
    let resp = corral
        .client()
        .post(format!("{}/v1/chat/completions", corral.base()))
        .json(&json!({"model": "nosuch", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    assert_eq!((chats(&a), chats(&b)), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_node_takes_requests_while_it_has_a_free_slot_then_they_spill() {
    let a = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let b = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    load_directly(&a, "llama3.2").await;
    let corral = Corral::start(pool_config(&[("a", &a, Some(1)), ("b", &b, Some(1))]));
    until_nodes_up(&corral, &["a", "b"]).await;

    // Warm and free: every request goes to a, one after another.
    for _ in 0..3 {
        assert_eq!(chat(&corral, "llama3.2").await.status(), 200);
    }
    assert_eq!((chats(&a), chats(&b)), (3, 0), "the warm node first");

    // a's one slot is taken by a slow stream: the next request goes to b, which is free.
    a.set_token_delay(Duration::from_millis(300));
    let mut long = open_stream(&corral).await;
    assert_eq!(chats(&a), 4);
    let resp = chat(&corral, "llama3.2").await;
    assert_eq!(resp.status(), 200);
    assert_eq!((chats(&a), chats(&b)), (4, 1), "spilled to the free node");
    let m = corral.metrics().await;
    assert_eq!(
        metric_sum(&m, "corral_upstream_inflight", &[("node", "a")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "corral_upstream_slots", &[("node", "a")]),
        1.0
    );
    let (_, complete) = rest_text(&mut long).await;
    assert!(complete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_skipped_without_a_client_error_and_taken_back_when_it_returns() {
    let a = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let b = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    // Warm on both: they take turns.
    load_directly(&a, "llama3.2").await;
    load_directly(&b, "llama3.2").await;
    let a_addr = a.addr();
    let corral = Corral::start(pool_config(&[("a", &a, None), ("b", &b, None)]));
    until_nodes_up(&corral, &["a", "b"]).await;

    a.shutdown().await;
    for _ in 0..6 {
        let resp = chat(&corral, "llama3.2").await;
        assert_eq!(resp.status(), 200, "no client sees the dead node");
    }
    assert_eq!(chats(&b), 6);
    let m = corral.metrics().await;
    assert!(
        metric_sum(
            &m,
            "corral_upstream_attempts_total",
            &[("node", "a"), ("outcome", "failover")]
        ) >= 1.0,
        "{m}"
    );
    assert!(corral
        .access_log()
        .iter()
        .any(|l| l["route"] == "/api/chat" && l["attempts"] == 2 && l["node"] == "b"));
    wait_for_async(Duration::from_secs(30), "a marked down", || async {
        let m = corral.metrics().await;
        (metric_sum(&m, "corral_upstream_up", &[("node", "a")]) == 0.0).then_some(())
    })
    .await;

    // Back on the same address (and warm again): its probe takes it back, and it gets
    // requests again.
    let a = OllamaDouble::start_on(a_addr, double_of(&["llama3.2"]))
        .await
        .unwrap();
    load_directly(&a, "llama3.2").await;
    until_nodes_up(&corral, &["a", "b"]).await;
    wait_for_async(Duration::from_secs(20), "requests on a again", || async {
        assert_eq!(chat(&corral, "llama3.2").await.status(), 200);
        (chats(&a) > 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_line_is_full_hands_the_request_to_the_next_one() {
    // a runs one request at a time and queues none: a second one is Ollama's 503 "server busy".
    let mut full = double_of(&["llama3.2"]);
    full.parallel = Some(1);
    full.max_queue = 0;
    let a = OllamaDouble::start(full).await.unwrap();
    let b = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    load_directly(&a, "llama3.2").await;
    // corral is not told a's slots: it learns of the full line from the 503.
    let corral = Corral::start(pool_config(&[("a", &a, None), ("b", &b, None)]));
    until_nodes_up(&corral, &["a", "b"]).await;
    a.set_token_delay(Duration::from_millis(300));
    let long = open_stream(&corral).await;
    let resp = chat(&corral, "llama3.2").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        resp.status(),
        200,
        "the busy node's 503 never reaches the client"
    );
    let line = corral.log_line(&id);
    assert_eq!((&line["node"], &line["attempts"]), (&json!("b"), &json!(2)));
    assert_eq!(chats(&a), 2, "a was asked and said busy");
    assert_eq!(chats(&b), 1);
    let m = corral.metrics().await;
    let a_said = |outcome| {
        metric_sum(
            &m,
            "corral_upstream_attempts_total",
            &[("node", "a"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (a_said("ok"), a_said("failover"), a_said("unavailable")),
        (1.0, 1.0, 0.0),
        "the stream, then the 503 counted once"
    );
    drop(long);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_only_a_dead_node_has_is_a_503_with_retry_after() {
    let (a, _b, corral) = two_nodes(&["llama3.2"], &["qwen2.5-coder:7b"]).await;
    a.shutdown().await;
    // Three failures in a row (requests or probes) take a down; until then the request fails as
    // a single upstream's would (no other node has the model).
    let mut resp = chat(&corral, "llama3.2").await;
    for _ in 0..3 {
        if resp.status() == 503 {
            break;
        }
        assert_eq!(resp.status(), 502);
        resp = chat(&corral, "llama3.2").await;
    }
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("llama3.2"),
        "{body}"
    );
    assert_eq!(chat(&corral, "nosuch").await.status(), 404);
    assert_eq!(chat(&corral, "qwen2.5-coder:7b").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_go_to_the_node_the_header_names() {
    let (a, b, corral) = two_nodes(&["llama3.2"], &["llama3.2"]).await;
    let copy = json!({"source": "llama3.2", "destination": "team-llama"});
    let send = |node: Option<&str>| {
        let mut req = corral
            .client()
            .post(format!("{}/api/copy", corral.base()))
            .json(&copy);
        if let Some(n) = node {
            req = req.header("x-corral-node", n);
        }
        req.send()
    };
    for node in [None, Some("c")] {
        let resp = send(node).await.unwrap();
        assert_eq!(resp.status(), 400, "{node:?}");
        let body: Value = resp.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("x-corral-node") && message.contains("a, b"),
            "{message}"
        );
    }
    assert_eq!(send(Some("b")).await.unwrap().status(), 200);
    let copies_on = |d: &OllamaDouble| {
        forwarded(d)
            .iter()
            .filter(|r| r.target == "/api/copy")
            .map(|r| r.header("x-corral-node").map(str::to_string))
            .collect::<Vec<_>>()
    };
    assert_eq!(copies_on(&a), Vec::<Option<String>>::new());
    assert_eq!(
        copies_on(&b),
        [None],
        "once, and the header stays with corral"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_lists_merge_every_node_each_model_once_filtered_for_the_key() {
    let a = OllamaDouble::start(double_of(&["llama3.2", "qwen2.5-coder:7b"]))
        .await
        .unwrap();
    let b = OllamaDouble::start(double_of(&["qwen2.5-coder:7b", "mistral"]))
        .await
        .unwrap();
    load_directly(&b, "mistral").await;
    let corral = Corral::start(pool_config(&[("a", &a, None), ("b", &b, None)]));
    until_nodes_up(&corral, &["a", "b"]).await;
    let names = |doc: &Value, list: &str, field: &str| -> Vec<String> {
        doc[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[field].as_str().unwrap().to_string())
            .collect()
    };
    let get = |client: reqwest::Client, path: &str| {
        let url = format!("{}{path}", corral.base());
        async move {
            let resp = client.get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };
    let tags = get(corral.client(), "/api/tags").await;
    assert_eq!(
        names(&tags, "models", "name"),
        ["llama3.2:latest", "mistral:latest", "qwen2.5-coder:7b"]
    );
    assert!(
        tags["models"][0]["digest"].is_string(),
        "Ollama's own entries"
    );
    let models = get(corral.client(), "/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(
        names(&models, "data", "id"),
        ["llama3.2:latest", "mistral:latest", "qwen2.5-coder:7b"]
    );
    let ps = get(corral.client(), "/api/ps").await;
    assert_eq!(names(&ps, "models", "name"), ["mistral:latest"]);

    // A key narrowed to some models sees only those, on every list.
    let narrow = corral.issue("test", Some(&["qwen*"]), None);
    let client = corral
        .anonymous_client_builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {narrow}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let tags = get(client.clone(), "/api/tags").await;
    assert_eq!(names(&tags, "models", "name"), ["qwen2.5-coder:7b"]);
    let ps = get(client.clone(), "/api/ps").await;
    assert_eq!(names(&ps, "models", "name"), Vec::<String>::new());
    let head = client
        .head(format!("{}/api/tags", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert!(head.headers().get("content-length").is_none());
    assert!(
        forwarded(&a)
            .iter()
            .chain(&forwarded(&b))
            .all(|r| r.target != "/api/tags"),
        "answered from the nodes' lists"
    );
}

async fn readyz(corral: &Corral) -> (u16, Value) {
    let resp = reqwest::get(format!("{}/readyz", corral.metrics_base()))
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Requests corral itself sent to `path` on a double (preloads, probes).
fn own(double: &OllamaDouble, path: &str) -> usize {
    double
        .requests_to(path)
        .iter()
        .filter(|r| {
            r.header("user-agent")
                .is_some_and(|ua| ua.starts_with("corral/"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_models_load_on_every_node_that_has_them_and_readiness_needs_one_healthy_holder() {
    let mut on_a = double_of(&["llama3.2"]);
    on_a.models.push(ModelSpec::embedding("nomic-embed-text"));
    let a = OllamaDouble::start(on_a).await.unwrap();
    let b = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let mut cfg = pool_config(&[("a", &a, None), ("b", &b, None)]);
    cfg.preload.models = vec!["llama3.2".into(), "nomic-embed-text".into()];
    cfg.preload.watch_interval = corral::config::HumanDuration::secs(1);
    let corral = Corral::start(cfg);
    let body = wait_for_async(Duration::from_secs(20), "ready", || async {
        let (status, body) = readyz(&corral).await;
        let settled = body["models"]["llama3.2:latest"]["b"] == "loaded"
            && body["models"]["nomic-embed-text:latest"]["b"] == "not on this node";
        (status == 200 && settled).then_some(body)
    })
    .await;
    assert_eq!(
        body["models"],
        json!({
            "llama3.2:latest": {"a": "loaded", "b": "loaded"},
            "nomic-embed-text:latest": {"a": "loaded", "b": "not on this node"},
        })
    );
    let m = corral.metrics().await;
    for (node, model, loaded) in [
        ("a", "llama3.2:latest", 1.0),
        ("b", "llama3.2:latest", 1.0),
        ("a", "nomic-embed-text:latest", 1.0),
    ] {
        let labels = [("node", node), ("model", model)];
        assert_eq!(
            metric_sum(&m, "corral_model_loaded", &labels),
            loaded,
            "{node} {model}"
        );
    }
    assert_eq!(
        own(&b, "/api/embed"),
        0,
        "b was never asked to load what it lacks"
    );
    assert!(
        !m.contains("corral_model_loaded{model=\"nomic-embed-text:latest\",node=\"b\"}"),
        "no series where the model is not meant to be (the alert would fire):\n{m}"
    );

    // The only node holding the embedding model goes away: not ready until it is back.
    a.shutdown().await;
    wait_for_async(Duration::from_secs(30), "not ready", || async {
        (readyz(&corral).await.0 == 503).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_loads_a_pinned_model_only_where_it_is_placed() {
    let a = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let b = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let mut cfg = pool_config(&[("a", &a, None), ("b", &b, None)]);
    cfg.upstream.nodes[0].models = vec!["llama3.2".into()];
    cfg.preload.models = vec!["llama3.2".into()];
    let corral = Corral::start(cfg);
    let body = wait_for_async(Duration::from_secs(20), "ready", || async {
        let (status, body) = readyz(&corral).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body["models"], json!({"llama3.2:latest": {"a": "loaded"}}));
    assert_eq!(own(&a, "/api/generate"), 1);
    assert_eq!(own(&b, "/api/generate"), 0, "not placed on b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_found_in_dns_are_probed_and_routed_to() {
    let a = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let mut cfg = test_config("http://127.0.0.1:1");
    cfg.upstream.url = None;
    cfg.upstream.discover = Some(corral::config::DiscoverConfig {
        dns: format!("localhost:{}", a.addr().port()),
        parallel: Some(2),
    });
    let corral = Corral::start(cfg);
    until_nodes_up(&corral, &["127-0-0-1"]).await;
    let resp = chat(&corral, "llama3.2").await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.status(), 200);
    assert_eq!(corral.log_line(&id)["node"], "127-0-0-1");
    let m = corral.metrics().await;
    assert_eq!(
        metric_sum(&m, "corral_upstream_slots", &[("node", "127-0-0-1")]),
        2.0
    );
    assert_eq!(chats(&a), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_asks_every_node() {
    let a = OllamaDouble::start(double_of(&["llama3.2"])).await.unwrap();
    let b = OllamaDouble::start(double_of(&["qwen2.5-coder:7b"]))
        .await
        .unwrap();
    let mut cfg = pool_config(&[("a", &a, None), ("b", &b, None)]);
    cfg.preload.models = vec!["llama3.2".into()];
    let setup = Setup::new(cfg);
    let config = setup.write();
    let check = || check_config(&config);
    let (ok, report) = check();
    assert!(ok, "{report}");
    for line in [
        format!("upstream.nodes[0] (a) = \"{}\": Ollama", a.url()),
        format!("upstream.nodes[1] (b) = \"{}\": Ollama", b.url()),
        "upstream.nodes[0] (a): preload.models[0] = \"llama3.2\": Ollama has it".to_string(),
        "upstream.nodes[1] (b): preload.models[0] = \"llama3.2\": this node does not have it"
            .to_string(),
    ] {
        assert!(report.contains(&line), "{line}\n{report}");
    }
    b.shutdown().await;
    let (ok, report) = check();
    assert!(!ok, "a node that does not answer fails the check");
    assert!(report.contains("upstream.nodes[1] (b)"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_is_not_a_node_failure_and_is_not_sent_elsewhere() {
    let (a, b, corral) = two_nodes(&["llama3.2"], &["llama3.2"]).await;
    // Answers take seconds: each client gives up long before.
    a.set_token_delay(Duration::from_millis(300));
    b.set_token_delay(Duration::from_millis(300));
    // HTTP/1.1: the client's leaving is a closed connection, as with most SDKs.
    let client = corral.client_builder().http1_only().build().unwrap();
    for _ in 0..4 {
        let gave_up = client
            .post(format!("{}/api/chat", corral.base()))
            .timeout(Duration::from_millis(400))
            .json(&json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await;
        assert!(
            gave_up.is_err(),
            "the client left first: {:?}",
            gave_up.map(|r| r.status())
        );
    }
    wait_for_async(Duration::from_secs(10), "the requests logged", || async {
        (corral
            .access_log()
            .iter()
            .filter(|l| l["route"] == "/api/chat")
            .count()
            == 4)
            .then_some(())
    })
    .await;
    assert_eq!(chats(&a) + chats(&b), 4, "each reached one node, once");
    let m = corral.metrics().await;
    for node in ["a", "b"] {
        assert_eq!(
            metric_sum(&m, "corral_upstream_up", &[("node", node)]),
            1.0,
            "{node} is fine"
        );
        let failovers = [("node", node), ("outcome", "failover")];
        assert_eq!(
            metric_sum(&m, "corral_upstream_attempts_total", &failovers),
            0.0
        );
        let errors = [("node", node), ("outcome", "connect_error")];
        assert_eq!(
            metric_sum(&m, "corral_upstream_attempts_total", &errors),
            0.0
        );
    }
}
