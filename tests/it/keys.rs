//! API keys: an adversarial suite (every bad key refused, none reaching Ollama), per-team policy,
//! model lists, and reloads that revoke without cutting streams.

use crate::common::*;
use base64::Engine;
use corral::access::auth::Claims;
use corral::config::TeamConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn team(models: &[&str], admin: bool) -> TeamConfig {
    TeamConfig {
        models: models.iter().map(|s| s.to_string()).collect(),
        admin,
        ..Default::default()
    }
}

/// A gateway with two teams: `research` (llama3.2 and nomic-embed-text) and `ops` (all, admin).
async fn gateway() -> (OllamaDouble, Corral) {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.teams.insert(
        "research".into(),
        team(&["llama3.2:*", "nomic-embed-text*"], false),
    );
    cfg.teams.insert("ops".into(), team(&["*"], true));
    (double, Corral::start(cfg))
}

fn chat() -> Value {
    json!({"model": "llama3.2", "stream": false, "messages": [{"role": "user", "content": "hi"}]})
}

/// Signs arbitrary claims with a header of our choosing using the gateway's own signing key.
fn sign(corral: &Corral, header: &Header, claims: &Value) -> String {
    let pem = std::fs::read(&corral.signing_key).unwrap();
    jsonwebtoken::encode(header, claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
}

fn claims(team: &str) -> Value {
    let now = corral::clock::unix_now();
    json!({"sub": team, "jti": corral::access::keys::new_key_id().unwrap(), "iat": now})
}

fn eddsa() -> Header {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("test-2026".into());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_key_is_refused_and_never_reaches_ollama() {
    let (double, corral) = gateway().await;
    let good = corral.issue("research", None, None);
    let parts: Vec<&str> = good.split('.').collect();
    let public_pem = std::fs::read(&corral.cfg.auth.verify_keys[0]).unwrap();
    let now = corral::clock::unix_now();

    // A payload for another team under the original signature.
    let mut payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    payload["sub"] = json!("ops");
    let tampered_payload = format!(
        "{}.{}.{}",
        parts[0],
        b64(payload.to_string().as_bytes()),
        parts[2]
    );
    let mut sig = parts[2].as_bytes().to_vec();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let tampered_signature = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );

    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"test-2026"}"#),
        parts[1]
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("test-2026".into());
    let hs256 =
        jsonwebtoken::encode(&hs, &claims("ops"), &EncodingKey::from_secret(&public_pem)).unwrap();
    let rs256 = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT","kid":"test-2026"}"#),
        parts[1],
        parts[2]
    );

    // Signed by a key the gateway does not trust, once under an unknown kid and once under ours.
    let rogue_dir = tempfile::tempdir().unwrap();
    let (rogue_unknown, _) = corral::access::keys::init(rogue_dir.path(), "rogue").unwrap();
    let (rogue_same_kid, _) =
        corral::access::keys::init(&rogue_dir.path().join("x"), "test-2026").unwrap();
    let unknown_kid = issue_with(&rogue_unknown, "research", None, None);
    let forged_same_kid = issue_with(&rogue_same_kid, "research", None, None);
    let mut no_kid_header = Header::new(Algorithm::EdDSA);
    no_kid_header.kid = None;
    let no_kid = sign(&corral, &no_kid_header, &claims("research"));

    let expired = {
        let req = corral::access::keys::IssueRequest {
            team: "research".into(),
            expires_in: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        corral::access::keys::issue(&corral.signing_key, &req, now - 3600)
            .unwrap()
            .0
    };
    let mut future = claims("research");
    future["nbf"] = json!(now + 3600);
    let not_yet_valid = sign(&corral, &eddsa(), &future);
    let unknown_team = corral.issue("ghosts", None, None);
    let no_jti = sign(&corral, &eddsa(), &json!({"sub": "research", "iat": now}));

    let cases: Vec<(&str, String)> = vec![
        ("garbage", "hello".into()),
        ("truncated", good[..good.len() - 12].into()),
        ("tampered payload", tampered_payload),
        ("tampered signature", tampered_signature),
        ("alg none", none),
        ("HS256 with the public key as secret", hs256),
        ("RS256", rs256),
        ("unknown kid", unknown_kid),
        ("forged under our kid", forged_same_kid),
        ("no kid", no_kid),
        ("expired", expired),
        ("not yet valid", not_yet_valid),
        ("unknown team", unknown_team),
        ("no jti", no_jti),
    ];
    let client = corral.anonymous_client();
    for (what, key) in &cases {
        for (path, kind) in [
            ("/api/chat", "ollama"),
            ("/v1/chat/completions", "openai"),
            ("/v1/messages", "anthropic"),
        ] {
            let resp = client
                .post(format!("{}{path}", corral.base()))
                .bearer_auth(key)
                .json(&chat())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401, "{what} on {path}");
            assert!(resp.headers().contains_key("www-authenticate"));
            let body: Value = resp.json().await.unwrap();
            match kind {
                "openai" => assert_eq!(body["error"]["type"], "authentication_error", "{what}"),
                "anthropic" => assert_eq!(body["error"]["type"], "authentication_error", "{what}"),
                _ => assert!(body["error"].is_string(), "{what}"),
            }
        }
    }
    // The key in forms corral does not read, or no key at all.
    let wrong_forms = [
        ("authorization", good.clone()),
        ("authorization", format!("Token {good}")),
        ("api-key", good.clone()),
        ("x-api-key", format!("Bearer {good}")),
    ];
    for (header, value) in &wrong_forms {
        let resp = client
            .post(format!("{}/api/chat", corral.base()))
            .header(*header, value)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{header}: {value:.20}");
    }
    let resp = client
        .post(format!("{}/api/chat?api_key={good}", corral.base()))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "key in the query string");
    let resp = client
        .get(format!("{}/api/tags", corral.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    assert!(
        forwarded(&double).is_empty(),
        "a refused request reached Ollama: {:?}",
        forwarded(&double)
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );

    // Every failure is in the log, without the key.
    let log = corral.stdout_lines().join("\n");
    assert!(!log.contains(&good[good.len() - 40..]), "a key was logged");

    // And the good key, in every accepted form, works.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("anyone:{good}"));
    for (header, value) in [
        ("authorization", format!("Bearer {good}")),
        ("x-api-key", good.clone()),
        ("authorization", format!("Basic {basic}")),
    ] {
        let resp = client
            .post(format!("{}/api/chat", corral.base()))
            .header(header, value)
            .json(&chat())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{header}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_key_is_logged_with_its_reason_and_its_id() {
    let (double, corral) = gateway().await;
    let now = corral::clock::unix_now();
    let jti = |key: &str| corral::access::keys::peek(key).unwrap().1.jti;
    let good = corral.issue("research", None, None);
    let revoked = corral.issue("research", None, None);
    std::fs::write(
        &corral.cfg.auth.revoked_file,
        format!("{}\n", jti(&revoked)),
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the revocation to load", || {
        corral.stderr_text().contains("\"revoked\":1").then_some(())
    });
    let expired = {
        let req = corral::access::keys::IssueRequest {
            team: "research".into(),
            expires_in: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        corral::access::keys::issue(&corral.signing_key, &req, now - 3600)
            .unwrap()
            .0
    };
    let mut future = claims("research");
    future["nbf"] = json!(now + 3600);
    let not_yet_valid = sign(&corral, &eddsa(), &future);
    let rogue_dir = tempfile::tempdir().unwrap();
    let (rogue, _) = corral::access::keys::init(rogue_dir.path(), "rogue").unwrap();
    let unknown_kid = issue_with(&rogue, "research", None, None);
    let parts: Vec<&str> = good.split('.').collect();
    let mut sig = parts[2].as_bytes().to_vec();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let bad_signature = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );
    // An unverified key can claim any id; one that is not plain is not logged.
    let mut odd = claims("research");
    odd["jti"] = json!("a\"b\nfake log line");
    let mut rogue_header = eddsa();
    rogue_header.kid = Some("rogue".into());
    let odd_id = jsonwebtoken::encode(
        &rogue_header,
        &odd,
        &EncodingKey::from_ed_pem(&std::fs::read(&rogue).unwrap()).unwrap(),
    )
    .unwrap();
    let ghosts = corral.issue("ghosts", None, None);

    /// What is sent, and what the log must say.
    type Case<'a> = (
        &'a str,
        Option<String>,
        &'a str,
        Option<String>,
        Option<&'a str>,
    );
    // (what, Authorization header, reason, key id logged, team logged)
    let cases: Vec<Case> = vec![
        ("no key", None, "missing", None, None),
        ("garbage", Some("hello".into()), "malformed", None, None),
        (
            "bad signature",
            Some(bad_signature),
            "bad_signature",
            Some(jti(&good)),
            None,
        ),
        (
            "unknown kid",
            Some(unknown_kid.clone()),
            "unknown_kid",
            Some(jti(&unknown_kid)),
            None,
        ),
        (
            "expired",
            Some(expired.clone()),
            "expired",
            Some(jti(&expired)),
            Some("research"),
        ),
        (
            "not yet valid",
            Some(not_yet_valid.clone()),
            "not_yet_valid",
            Some(future["jti"].as_str().unwrap().into()),
            Some("research"),
        ),
        (
            "revoked",
            Some(revoked.clone()),
            "revoked",
            Some(jti(&revoked)),
            Some("research"),
        ),
        (
            "unknown team",
            Some(ghosts.clone()),
            "unknown_team",
            Some(jti(&ghosts)),
            Some("ghosts"),
        ),
        (
            "an id that is not plain",
            Some(odd_id),
            "unknown_kid",
            None,
            None,
        ),
    ];
    let client = corral.anonymous_client();
    for (i, (what, key, reason, key_id, team)) in cases.iter().enumerate() {
        let id = format!("refused-{i}");
        let mut req = client
            .post(format!("{}/api/chat", corral.base()))
            .header("x-request-id", &id)
            .json(&chat());
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let line = corral.log_line(&id);
        assert_eq!(line["auth_failure"], *reason, "{what}: {line}");
        assert_eq!(line["error"], "unauthorized", "{what}");
        // An id whose signature held is the key's; any other is only what the key claims.
        let (verified, claimed) = if team.is_some() {
            (key_id.as_deref(), None)
        } else {
            (None, key_id.as_deref())
        };
        assert_eq!(line["key_id"].as_str(), verified, "{what}: {line}");
        assert_eq!(line["claimed_key_id"].as_str(), claimed, "{what}: {line}");
        assert_eq!(line["team"].as_str(), *team, "{what}: {line}");
    }
    // Two different keys at once.
    let resp = client
        .post(format!("{}/api/chat", corral.base()))
        .header("x-request-id", "refused-two")
        .bearer_auth(&good)
        .header("x-api-key", &revoked)
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(corral.log_line("refused-two")["auth_failure"], "ambiguous");
    let out = corral.stdout_lines().join("\n") + &corral.stderr_text();
    for key in [&good, &revoked, &expired, &ghosts] {
        assert!(!out.contains(&key[key.len() - 40..]), "a key was logged");
    }
    assert!(forwarded(&double).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_claim_narrows_the_team_and_never_widens_it() {
    let (double, corral) = gateway().await;
    let wide = corral.issue("research", Some(&["*"]), None);
    let narrow = corral.issue("research", Some(&["llama3.2:1b"]), None);
    let client = corral.anonymous_client();
    let status = |key: &str, model: &str| {
        let req = client
            .post(format!("{}/api/generate", corral.base()))
            .bearer_auth(key)
            .json(&json!({"model": model, "prompt": "hi", "stream": false}))
            .send();
        async move { req.await.unwrap().status().as_u16() }
    };
    assert_eq!(status(&wide, "llama3.2").await, 200);
    assert_eq!(
        status(&wide, "qwen2.5-coder:7b").await,
        403,
        "the claim widened the team"
    );
    assert_eq!(
        status(&narrow, "llama3.2:latest").await,
        403,
        "the claim did not narrow"
    );
    let generated = double.requests_to("/api/generate");
    assert_eq!(generated.len(), 1);
    assert_eq!(generated[0].json().unwrap()["model"], "llama3.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_are_for_admin_teams_only() {
    let (double, corral) = gateway().await;
    let research = corral.issue("research", None, None);
    let ops = corral.issue("ops", None, None);
    let client = corral.anonymous_client();
    let digest = format!("sha256:{}", "0".repeat(64));
    let admin_calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::POST,
            "/api/pull".into(),
            Some(json!({"model": "tinyllama", "stream": false})),
        ),
        (
            reqwest::Method::POST,
            "/api/push".into(),
            Some(json!({"model": "llama3.2", "stream": false})),
        ),
        (
            reqwest::Method::POST,
            "/api/create".into(),
            Some(json!({"model": "mine", "from": "llama3.2", "stream": false})),
        ),
        (
            reqwest::Method::POST,
            "/api/copy".into(),
            Some(json!({"source": "llama3.2", "destination": "llama-copy"})),
        ),
        (
            reqwest::Method::DELETE,
            "/api/delete".into(),
            Some(json!({"model": "llama-copy"})),
        ),
        (reqwest::Method::HEAD, format!("/api/blobs/{digest}"), None),
    ];
    for (method, path, body) in &admin_calls {
        let mut req = client
            .request(method.clone(), format!("{}{path}", corral.base()))
            .bearer_auth(&research);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 403, "{method} {path} for a non-admin team");
    }
    assert!(forwarded(&double).is_empty());
    for (method, path, body) in &admin_calls {
        let mut req = client
            .request(method.clone(), format!("{}{path}", corral.base()))
            .bearer_auth(&ops);
        if let Some(b) = body {
            req = req.json(b);
        }
        let status = req.send().await.unwrap().status();
        let expected = if path.starts_with("/api/blobs") {
            404
        } else {
            200
        };
        assert_eq!(status, expected, "{method} {path} for the admin team");
    }
    // The DELETE body arrived as sent.
    assert_eq!(
        double.requests_to("/api/delete")[0].json().unwrap(),
        json!({"model": "llama-copy"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_models_are_refused_unless_the_team_allows_them() {
    let double = double().await;
    let mut cfg = test_config(&double.url());
    cfg.teams.insert("local".into(), team(&["*"], true));
    cfg.teams.insert(
        "cloudy".into(),
        TeamConfig {
            cloud: true,
            ..team(&["*"], false)
        },
    );
    let corral = Corral::start(cfg);
    let (local, cloudy) = (
        corral.issue("local", None, None),
        corral.issue("cloudy", None, None),
    );
    let client = corral.anonymous_client();
    for (model, path) in [
        ("gpt-oss:120b-cloud", "/api/chat"),
        ("qwen3-coder:480b-cloud", "/v1/chat/completions"),
        ("kimi:cloud", "/api/pull"),
    ] {
        let resp = client
            .post(format!("{}{path}", corral.base()))
            .bearer_auth(&local)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{model} via {path}");
        assert!(resp.text().await.unwrap().contains("ollama.com"));
    }
    assert!(forwarded(&double).is_empty());
    // A cloud team gets through to Ollama (the double does not know the model: 404).
    let resp = client
        .post(format!("{}/api/chat", corral.base()))
        .bearer_auth(&cloudy)
        .json(&json!({"model": "gpt-oss:120b-cloud", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_lists_and_lookups_show_only_the_teams_models() {
    let (_double, corral) = gateway().await;
    let research = corral.issue("research", None, None);
    let client = corral.anonymous_client();
    let get = |path: &str| {
        client
            .get(format!("{}{path}", corral.base()))
            .bearer_auth(&research)
            .send()
    };

    let tags: Value = get("/api/tags").await.unwrap().json().await.unwrap();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama3.2:latest", "nomic-embed-text:latest"]);
    let models: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama3.2:latest", "nomic-embed-text:latest"]);
    assert_eq!(
        get("/v1/models/llama3.2:latest").await.unwrap().status(),
        200
    );
    assert_eq!(
        get("/v1/models/qwen2.5-coder:7b").await.unwrap().status(),
        403
    );
    let show = client
        .post(format!("{}/api/show", corral.base()))
        .bearer_auth(&research)
        .json(&json!({"name": "qwen2.5-coder:7b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        show.status(),
        403,
        "the deprecated `name` field is checked too"
    );

    // Loaded models too.
    client
        .post(format!("{}/api/generate", corral.base()))
        .bearer_auth(corral.issue("ops", None, None))
        .json(&json!({"model": "qwen2.5-coder:7b"}))
        .send()
        .await
        .unwrap();
    let ps: Value = get("/api/ps").await.unwrap().json().await.unwrap();
    assert!(ps["models"].as_array().unwrap().is_empty(), "{ps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_team_removal_apply_on_reload_without_cutting_streams() {
    let double = double_with(|c| c.token_delay = Duration::from_millis(200)).await;
    let mut cfg = test_config(&double.url());
    cfg.teams.insert("research".into(), team(&["*"], false));
    cfg.teams.insert("ops".into(), team(&["*"], false));
    let setup = Setup::new(cfg);
    let config_path = setup.write();
    let corral = setup.start();
    let research = corral.issue("research", None, None);
    let ops = corral.issue("ops", None, None);
    let client = corral.anonymous_client();
    let chat_with = |key: &str, stream: bool| {
        client
            .post(format!("{}/api/chat", corral.base()))
            .bearer_auth(key)
            .json(&json!({"model": "llama3.2", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };

    // A stream starts, then its key is revoked with the real CLI.
    let mut stream = chat_with(&research, true).await.unwrap();
    next_chunk(&mut stream).await.unwrap();
    let out = std::process::Command::new(corral_bin())
        .args(["keys", "revoke", &research, "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_async(
        Duration::from_secs(20),
        "the revocation to apply",
        || async { (chat_with(&research, false).await.unwrap().status() == 401).then_some(()) },
    )
    .await;
    let (rest, complete) = rest_text(&mut stream).await;
    assert!(
        complete && rest.contains("\"done\":true"),
        "the stream was cut: {rest}"
    );
    assert_eq!(
        chat_with(&ops, false).await.unwrap().status(),
        200,
        "other keys unaffected"
    );

    // The revocation list vanishes (deleted, a volume not mounted): revocation fails closed.
    let revoked_file = corral.cfg.auth.revoked_file.clone();
    assert!(revoked_file.is_file(), "{}", revoked_file.display());
    std::fs::remove_file(&revoked_file).unwrap();
    wait_for(Duration::from_secs(20), "the refusal in the log", || {
        corral
            .stderr_text()
            .contains("they stay revoked")
            .then_some(())
    });
    assert_eq!(chat_with(&research, false).await.unwrap().status(), 401);
    // A list rewritten with some ids lost (another id only): the lost ones stay revoked too.
    std::fs::write(
        &revoked_file,
        format!("{}\n", corral::access::keys::new_key_id().unwrap()),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the rewritten list to load",
        || (corral.stderr_text().matches("they stay revoked").count() >= 2).then_some(()),
    );
    assert_eq!(chat_with(&research, false).await.unwrap().status(), 401);
    // Put it back as it was.
    let out = std::process::Command::new(corral_bin())
        .args(["keys", "revoke", &research, "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(out.status.success());

    // A team removed from the file: its keys stop working, without a restart.
    let mut stream = chat_with(&ops, true).await.unwrap();
    next_chunk(&mut stream).await.unwrap();
    let mut edited = corral.cfg.clone();
    edited.teams.remove("ops");
    std::fs::write(&config_path, edited.to_toml().unwrap()).unwrap();
    wait_for_async(
        Duration::from_secs(20),
        "the team removal to apply",
        || async { (chat_with(&ops, false).await.unwrap().status() == 401).then_some(()) },
    )
    .await;
    let (rest, complete) = rest_text(&mut stream).await;
    assert!(
        complete && rest.contains("\"done\":true"),
        "the stream was cut: {rest}"
    );

    // A broken configuration is refused and the running one stays in force.
    std::fs::write(&config_path, "[teams.x]\nmodels = 7\n").unwrap();
    wait_for(Duration::from_secs(20), "the refusal in the log", || {
        corral
            .stderr_text()
            .contains("teams.x.models")
            .then_some(())
    });
    let fresh = corral.issue("research", None, None);
    assert_eq!(chat_with(&fresh, false).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_new_verification_key_rotates_in() {
    let double = double().await;
    let setup = Setup::new(test_config(&double.url()));
    let config_path = setup.write();
    let corral = setup.start();

    // A new signing key pair; its key is refused until the gateway trusts its public half.
    let (new_signing, new_public) =
        corral::access::keys::init(&corral.dir.path().join("keys"), "test-2027").unwrap();
    let new_key = issue_with(&new_signing, "test", None, None);
    let client = corral.anonymous_client();
    let tags = |key: String| {
        client
            .get(format!("{}/api/tags", corral.base()))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(tags(new_key.clone()).await.unwrap().status(), 401);

    let mut edited = corral.cfg.clone();
    edited.auth.verify_keys.push(new_public);
    // The file changes and SIGHUP arrives; either makes corral reload.
    std::fs::write(&config_path, edited.to_toml().unwrap()).unwrap();
    corral.signal("HUP");
    wait_for_async(Duration::from_secs(20), "the new key to verify", || async {
        (tags(new_key.clone()).await.unwrap().status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        tags(corral.key.clone()).await.unwrap().status(),
        200,
        "the old key still works during rotation"
    );
    assert!(corral.stderr_text().contains("SIGHUP"));
}

#[test]
fn keys_cli_issues_inspects_and_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(corral_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let keys_dir = dir.path().join("keys");
    let out = run(&[
        "keys",
        "init",
        "--dir",
        keys_dir.to_str().unwrap(),
        "--id",
        "ops-1",
    ]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty(), "init prints to stderr only");
    let signing = keys_dir.join("ops-1.key.pem");
    // Standard tools read the signing key (OpenSSL 3.0 reads only PKCS#8 v1 Ed25519 keys).
    let openssl = std::process::Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(&signing)
        .output()
        .expect("openssl (CI installs it)");
    assert!(
        openssl.status.success(),
        "openssl pkey: {}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    let out = run(&[
        "keys",
        "issue",
        "--signing-key",
        signing.to_str().unwrap(),
        "--team",
        "research",
        "--name",
        "ci",
        "--models",
        "llama3.2:*,nomic-embed-text",
        "--expires",
        "90d",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the key on stdout: {stdout}"
    );
    let key = stdout.trim().to_string();
    assert!(key.starts_with("corral_eyJ"), "{key}");
    let (header, claims): (_, Claims) = corral::access::keys::peek(&key).unwrap();
    assert_eq!(header.kid.as_deref(), Some("ops-1"));
    assert_eq!(claims.models.unwrap(), ["llama3.2:*", "nomic-embed-text"]);
    assert!(claims.exp.unwrap() - claims.iat == 90 * 86400);

    let config = dir.path().join("corral.toml");
    let toml = "[auth]\nverify_keys = [\"keys/ops-1.pub.pem\"]\nrevoked_file = \"revoked.txt\"\n[teams.research]\nmodels = [\"*\"]\n";
    std::fs::write(&config, toml).unwrap();
    let out = run(&[
        "keys",
        "inspect",
        &key,
        "--config",
        config.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("verdict: accepted"),
        "{text}"
    );
    assert!(text.contains("team:    research"));

    // A typo is refused rather than "revoked".
    let out = run(&[
        "keys",
        "revoke",
        "notakey",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither an API key nor a key id"));
    // The id in capitals is the same key.
    let upper = claims.jti.to_uppercase();
    let out = run(&[
        "keys",
        "revoke",
        &upper,
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let revoked = std::fs::read_to_string(dir.path().join("revoked.txt")).unwrap();
    assert_eq!(revoked.trim(), claims.jti);
    let out = run(&["keys", "revoke", &key, "--config", config.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already revoked"));

    // The ledger lists what was issued, and the configuration says what is revoked.
    let with_ops = dir.path().join("with-ops.toml");
    std::fs::write(&with_ops, format!("{toml}[teams.ops]\nmodels = [\"*\"]\n")).unwrap();
    let other = run(&[
        "keys",
        "issue",
        "--signing-key",
        signing.to_str().unwrap(),
        "--team",
        "ops",
        "--config",
        with_ops.to_str().unwrap(),
    ]);
    let other_id = corral::access::keys::peek(String::from_utf8_lossy(&other.stdout).trim())
        .unwrap()
        .1
        .jti;
    let list = |extra: &[&str]| {
        let mut args = vec!["keys", "list", "--signing-key", signing.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status_of = |text: &str, id: &str| {
        text.lines()
            .find(|l| l.starts_with(id))
            .map(|l| l.split_whitespace().last().unwrap().to_string())
    };
    let table = list(&["--config", config.to_str().unwrap()]);
    assert_eq!(
        status_of(&table, &claims.jti).as_deref(),
        Some("revoked"),
        "{table}"
    );
    // `ops` is not a team of this configuration: its key would be refused.
    assert_eq!(
        status_of(&table, &other_id).as_deref(),
        Some("no-team"),
        "{table}"
    );
    assert!(
        table.contains("research") && table.contains(" ci "),
        "{table}"
    );
    assert!(
        !table.contains(key.trim_start_matches("corral_")),
        "a key in the list"
    );
    let only_ops = list(&[
        "--team",
        "ops",
        "--json",
        "--config",
        with_ops.to_str().unwrap(),
    ]);
    let records: Vec<Value> = only_ops
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{only_ops}");
    assert_eq!(records[0]["id"], other_id);
    assert_eq!(records[0]["status"], "active");
    // A key that would be born expired is not issued.
    let out = run(&[
        "keys",
        "issue",
        "--signing-key",
        signing.to_str().unwrap(),
        "--team",
        "research",
        "--expires",
        "0d",
    ]);
    assert!(!out.status.success() && out.stdout.is_empty());
    let out = run(&[
        "keys",
        "inspect",
        &key,
        "--config",
        config.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("revoked"), "{text}");

    let out = run(&[
        "keys",
        "issue",
        "--signing-key",
        signing.to_str().unwrap(),
        "--team",
        "Bad Team",
    ]);
    assert!(!out.status.success());
    let out = run(&[
        "keys",
        "init",
        "--dir",
        keys_dir.to_str().unwrap(),
        "--id",
        "ops-1",
    ]);
    assert!(!out.status.success(), "init overwrote a key");
}

#[test]
fn keys_cli_checks_the_team_and_says_truthfully_how_a_revocation_lands() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], path: Option<&str>| {
        let mut cmd = std::process::Command::new(corral_bin());
        cmd.args(args)
            .current_dir(dir.path())
            .env_remove("CORRAL_CONFIG");
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (signing, public) = corral::access::keys::init(&dir.path().join("keys"), "ops-1").unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nverify_keys = [\"{}\"]\n[teams.research]\nmodels = [\"*\"]\n[teams.ops]\nadmin = true\n",
            public.display()
        ),
    )
    .unwrap();
    let (signing, config) = (signing.to_str().unwrap(), config.to_str().unwrap());

    // A team the gateway does not have: refused, with the teams it has.
    let (ok, stdout, stderr) = run(
        &[
            "keys",
            "issue",
            "--signing-key",
            signing,
            "--team",
            "nosuchteam",
            "--config",
            config,
        ],
        None,
    );
    assert!(!ok && stdout.is_empty(), "{stderr}");
    assert!(
        stderr.contains("no [teams.nosuchteam]") && stderr.contains("ops, research"),
        "{stderr}"
    );
    let (ok, stdout, _) = run(
        &[
            "keys",
            "issue",
            "--signing-key",
            signing,
            "--team",
            "research",
            "--config",
            config,
        ],
        None,
    );
    assert!(ok && stdout.trim().matches('.').count() == 2);
    // With no configuration anywhere, the team cannot be checked, and the key is issued.
    let (ok, stdout, stderr) = run(
        &[
            "keys",
            "issue",
            "--signing-key",
            signing,
            "--team",
            "anyone",
        ],
        None,
    );
    assert!(ok && !stdout.is_empty(), "{stderr}");
    assert!(stderr.contains("is not checked"), "{stderr}");
    let key = stdout.trim().to_string();
    let id = corral::access::keys::peek(&key).unwrap().1.jti;

    // The Kubernetes configuration names a list that lives in a pod: the command says what to
    // do instead of failing to write it.
    let k8s = concat!(env!("CARGO_MANIFEST_DIR"), "/config/kubernetes.toml");
    let (ok, _, stderr) = run(&["keys", "revoke", &key, "--config", k8s], None);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("not on this machine")
            && stderr.contains("--file config/revoked.txt --kubernetes"),
        "{stderr}"
    );

    // Into the list the ConfigMap is made from, with the way to apply it and how long it takes.
    let list = dir.path().join("revoked.txt");
    let list = list.to_str().unwrap();
    let overlay = "deploy/kubernetes/overlays/production";
    let (ok, _, stderr) = run(
        &[
            "keys",
            "revoke",
            &key,
            "--file",
            list,
            "--kubernetes",
            overlay,
        ],
        None,
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!("kubectl apply -k {overlay}")),
        "{stderr}"
    );
    assert!(stderr.contains("within about a minute"), "{stderr}");
    assert_eq!(std::fs::read_to_string(list).unwrap().trim(), id);

    // --apply runs kubectl (a stand-in here that records its arguments).
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let record = dir.path().join("kubectl-args");
    // `kubectl kustomize` renders the list (as the shipped overlays do); `apply` is recorded.
    std::fs::write(
        bin.join("kubectl"),
        format!(
            "#!/bin/sh\nif [ \"$1\" = kustomize ]; then cat {list}; exit 0; fi\necho \"$@\" > {}\n",
            record.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("kubectl"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let other = corral::access::keys::new_key_id().unwrap();
    let (ok, _, stderr) = run(
        &[
            "keys",
            "revoke",
            &other,
            "--file",
            list,
            "--kubernetes",
            overlay,
            "--apply",
        ],
        Some(&path),
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap().trim(),
        format!("apply -k {overlay}")
    );
    // A list the overlay does not carry is not applied: the key would stay valid.
    std::fs::remove_file(&record).unwrap();
    let elsewhere = dir.path().join("elsewhere.txt");
    let elsewhere = elsewhere.to_str().unwrap();
    let new_id = corral::access::keys::new_key_id().unwrap();
    let args = [
        "keys",
        "revoke",
        &new_id,
        "--file",
        elsewhere,
        "--kubernetes",
        overlay,
        "--apply",
    ];
    let (ok, _, stderr) = run(&args, Some(&path));
    assert!(!ok && stderr.contains("nothing applied"), "{stderr}");
    assert!(!record.exists());
    // --kubernetes says which list to change: it needs --file.
    let (ok, _, stderr) = run(&["keys", "revoke", &key, "--kubernetes", overlay], None);
    assert!(!ok && stderr.contains("--file"), "{stderr}");
    // A plain list on this machine: gateways reading it refuse the key within a second.
    let (ok, _, stderr) = run(
        &[
            "keys",
            "revoke",
            &corral::access::keys::new_key_id().unwrap(),
            "--file",
            list,
        ],
        None,
    );
    assert!(ok && stderr.contains("within a second"), "{stderr}");
}
