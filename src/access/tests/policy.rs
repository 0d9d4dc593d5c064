//! Unit tests of `access::policy` (kept apart: the module alone is long enough).

use super::*;
use serde_json::json;

fn team(models: &[&str]) -> Team {
    Team::new(
        "research",
        &TeamConfig {
            models: models.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

fn id(models: Option<&[&str]>) -> Identity {
    Identity {
        team: "research".into(),
        key_id: "k".into(),
        kid: "v".into(),
        models: models.map(|m| m.iter().map(|s| s.to_string()).collect()),
        expires_at: None,
    }
}

fn only(models: &[ModelRef]) -> Refs {
    Refs {
        models: models.to_vec(),
        unprovable: None,
        remote: false,
    }
}

fn m(name: &str) -> ModelName {
    ModelName::parse(name).unwrap()
}

#[test]
fn globs_match_normalized_names() {
    let t = team(&["llama3.2:*", "nomic-embed-text*", "qwen2.5"]);
    for ok in [
        "llama3.2",
        "llama3.2:3b",
        "LLAMA3.2:latest",
        "library/llama3.2",
        "nomic-embed-text",
        "qwen2.5:latest",
    ] {
        assert!(t.allows(&id(None), &m(ok)), "{ok}");
    }
    for no in [
        "llama3.1",
        "qwen2.5:7b",
        "mistral",
        "hf.co/x/llama3.2",
        "evil/llama3.2",
    ] {
        assert!(!t.allows(&id(None), &m(no)), "{no}");
    }
    assert!(team(&["*"]).allows(&id(None), &m("anything:at-all")));
    assert!(
        !team(&[]).allows(&id(None), &m("llama3.2")),
        "no globs, no models"
    );
}

#[test]
fn wildcard_matching_is_linear_and_correct() {
    assert!(wildcard(b"a*b*c", b"aXXbYYc"));
    assert!(!wildcard(b"a*b*c", b"aXXbYY"));
    assert!(wildcard(b"*", b""));
    assert!(!wildcard(b"abc", b"abcd"));
    let long = "a".repeat(10_000);
    assert!(!wildcard(
        format!("{}b", "*a".repeat(50)).as_bytes(),
        long.as_bytes()
    ));
}

#[test]
fn a_key_claim_narrows_and_never_widens() {
    let t = team(&["llama3.2:*"]);
    assert!(t.allows(&id(Some(&["llama3.2:1b"])), &m("llama3.2:1b")));
    assert!(
        !t.allows(&id(Some(&["llama3.2:1b"])), &m("llama3.2:3b")),
        "narrowed"
    );
    assert!(
        !t.allows(&id(Some(&["*"])), &m("qwen2.5")),
        "a wide claim does not widen"
    );
}

#[test]
fn cloud_models_need_the_cloud_flag() {
    let mut t = team(&["*"]);
    assert!(!t.allows(&id(None), &m("gpt-oss:120b-cloud")));
    let cloud = [ModelRef {
        field: "model",
        name: m("gpt-oss:120b-cloud"),
    }];
    let e = authorize(&t, &id(None), RouteKind::Chat, &only(&cloud)).unwrap_err();
    assert!(e.to_string().contains("runs on ollama.com"), "{e}");
    t.cloud = true;
    assert!(t.allows(&id(None), &m("gpt-oss:120b-cloud")));
    assert!(authorize(&t, &id(None), RouteKind::Chat, &only(&cloud)).is_ok());
}

#[test]
fn admin_routes_need_the_admin_flag() {
    let mut t = team(&["*"]);
    let refs = [ModelRef {
        field: "model",
        name: m("llama3.2"),
    }];
    let e = authorize(&t, &id(None), RouteKind::Pull, &only(&refs)).unwrap_err();
    assert_eq!(e.status(), 403);
    t.admin = true;
    assert!(authorize(&t, &id(None), RouteKind::Pull, &only(&refs)).is_ok());
    let cloud = [ModelRef {
        field: "model",
        name: m("x:cloud"),
    }];
    assert_eq!(
        authorize(&t, &id(None), RouteKind::Pull, &only(&cloud))
            .unwrap_err()
            .status(),
        403
    );
}

#[test]
fn admin_routes_are_not_bound_by_team_globs_but_by_the_key_claim() {
    let mut t = team(&["llama3.2:*"]);
    t.admin = true;
    let r = |name: &str, field| ModelRef {
        field,
        name: m(name),
    };
    // The team may pull a model it does not list yet...
    assert!(authorize(
        &t,
        &id(None),
        RouteKind::Pull,
        &only(&[r("mistral", "model")])
    )
    .is_ok());
    // ...but a key narrowed to llama3.2 may not delete or copy anything else.
    let narrow = id(Some(&["llama3.2:*"]));
    assert!(authorize(
        &t,
        &narrow,
        RouteKind::Delete,
        &only(&[r("llama3.2", "model")])
    )
    .is_ok());
    let e = authorize(
        &t,
        &narrow,
        RouteKind::Delete,
        &only(&[r("mistral", "model")]),
    )
    .unwrap_err();
    assert_eq!(e.status(), 403);
    let copy = [r("llama3.2", "source"), r("mistral", "destination")];
    let e = authorize(&t, &narrow, RouteKind::Copy, &only(&copy)).unwrap_err();
    assert_eq!(e.status(), 403);
}

#[test]
fn a_narrowed_admin_key_cannot_create_from_what_its_claim_cannot_cover() {
    let mut t = team(&[]);
    t.admin = true;
    let narrow = id(Some(&["llama3.2:*"]));
    let decide = |who: &Identity, body: &str| {
        let obj = JsonObject::parse(body.as_bytes()).unwrap();
        let refs = referenced(RouteKind::Create, Some(&obj), None).unwrap();
        authorize(&t, who, RouteKind::Create, &refs).map_err(|e| e.status())
    };
    // Inside the claim: a model made from a model the key names.
    assert_eq!(
        decide(&narrow, r#"{"model":"llama3.2:alias","from":"llama3.2"}"#),
        Ok(())
    );
    assert_eq!(
        decide(&narrow, r#"{"model":"llama3.2:alias","from":"qwen2.5:7b"}"#),
        Err(403)
    );
    // Blobs name no model: refused for a narrowed key, in every field that can carry them,
    // and so is any field corral does not know.
    let digest = format!("sha256:{}", "a".repeat(64));
    for body in [
        format!(r#"{{"model":"llama3.2:alias","files":{{"m.gguf":"{digest}"}}}}"#),
        format!(r#"{{"model":"llama3.2:alias","from":"llama3.2","draft_files":{{"d.gguf":"{digest}"}}}}"#),
        r#"{"model":"llama3.2:alias","from":"llama3.2","something_new":1}"#.to_string(),
        format!(r#"{{"model":"llama3.2:alias","from":"llama3.2","adapters":{{"a.gguf":"{digest}"}}}}"#),
        format!(r#"{{"model":"llama3.2:alias","Files":{{"m.gguf":"{digest}"}}}}"#),
        r#"{"model":"llama3.2:alias","modelfile":"FROM qwen2.5:7b"}"#.to_string(),
        r#"{"model":"llama3.2:alias","modelfile":"  from \"qwen2.5:7b\"\nSYSTEM hi"}"#.to_string(),
        r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\nADAPTER ./lora.gguf"}"#.to_string(),
        format!(r#"{{"model":"llama3.2:alias","modelfile":"FROM /root/.ollama/models/blobs/{digest}"}}"#),
        r#"{"model":"llama3.2:alias","modelfile":"FROM ./model.gguf"}"#.to_string(),
        r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\nTEMPLATE \"\"\"\nFROM qwen2.5\n\"\"\""}"#.to_string(),
    ] {
        assert_eq!(decide(&narrow, &body), Err(403), "{body}");
        // A key without a claim may (its team is admin).
        assert_eq!(decide(&id(None), &body), Ok(()), "{body}");
    }
    // Ollama's parser also ends lines at \r, and skips a byte-order mark or anything
    // unprintable before a command.
    for body in [
        r#"{"model":"llama3.2:alias","modelfile":"SYSTEM hi\rFROM /etc/passwd"}"#,
        r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\n# c\rADAPTER /x.gguf"}"#,
        "{\"model\":\"llama3.2:alias\",\"modelfile\":\"\u{feff}FROM /x.gguf\"}",
        r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2\n\u0000ADAPTER /x"}"#,
        r#"{"model":"llama3.2:alias","from":"llama3.2","path":"/tmp/Modelfile"}"#,
    ] {
        assert_eq!(decide(&narrow, body), Err(403), "{body}");
    }
    // A model served from another host needs the cloud flag, whatever the key.
    let remote = r#"{"model":"llama3.2:x","from":"llama3.2","remote_host":"https://ollama.com"}"#;
    assert_eq!(decide(&id(None), remote), Err(403));
    let mut cloudy = t.clone();
    cloudy.cloud = true;
    let obj = JsonObject::parse(remote.as_bytes()).unwrap();
    let refs = referenced(RouteKind::Create, Some(&obj), None).unwrap();
    assert!(authorize(&cloudy, &id(None), RouteKind::Create, &refs).is_ok());
    // A narrowed key may not upload blobs; another admin key may.
    let blob = Refs::default();
    assert_eq!(
        authorize(&t, &narrow, RouteKind::Blobs, &blob).map_err(|e| e.status()),
        Err(403)
    );
    assert!(authorize(&t, &id(None), RouteKind::Blobs, &blob).is_ok());
    // A modelfile whose FROM is a model the claim names is fine.
    assert_eq!(
        decide(
            &narrow,
            r#"{"model":"llama3.2:alias","modelfile":"FROM llama3.2:1b\nSYSTEM be brief"}"#
        ),
        Ok(())
    );
    // A blob digest where a model name should be: refused even for a key whose claim
    // matches every name.
    let everything = id(Some(&["*"]));
    for from in [digest.as_str(), &digest.replace(':', "-")] {
        let body = format!(r#"{{"model":"x","modelfile":"FROM {from}"}}"#);
        assert_eq!(decide(&everything, &body), Err(403), "{body}");
    }
    // Empty blob maps name nothing.
    assert_eq!(
        decide(
            &narrow,
            r#"{"model":"llama3.2:alias","from":"llama3.2","files":{},"adapters":null}"#
        ),
        Ok(())
    );
}

#[test]
fn inference_needs_an_allowed_model() {
    let t = team(&["llama3.2:*"]);
    assert_eq!(
        authorize(&t, &id(None), RouteKind::Chat, &only(&[]))
            .unwrap_err()
            .status(),
        400
    );
    let ok = [ModelRef {
        field: "model",
        name: m("llama3.2"),
    }];
    assert!(authorize(&t, &id(None), RouteKind::Chat, &only(&ok)).is_ok());
    let no = [ModelRef {
        field: "model",
        name: m("mistral"),
    }];
    let e = authorize(&t, &id(None), RouteKind::ChatCompletions, &only(&no)).unwrap_err();
    assert_eq!(e.status(), 403);
    assert!(e.to_string().contains("mistral:latest"));
    // Info routes with no model name (lists) pass; named ones are checked.
    assert!(authorize(&t, &id(None), RouteKind::Tags, &only(&[])).is_ok());
    assert_eq!(
        authorize(&t, &id(None), RouteKind::Show, &only(&no))
            .unwrap_err()
            .status(),
        403
    );
}

#[test]
fn models_are_read_from_the_fields_ollama_reads() {
    let refs = |kind, body: &str| {
        let obj = JsonObject::parse(body.as_bytes()).unwrap();
        referenced_models(kind, Some(&obj), None)
            .unwrap()
            .into_iter()
            .map(|r| (r.field, r.name.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        refs(RouteKind::Chat, r#"{"model":"llama3.2"}"#),
        [("model", "llama3.2:latest".to_string())]
    );
    assert_eq!(
        refs(RouteKind::Show, r#"{"name":"qwen2.5"}"#),
        [("name", "qwen2.5:latest".to_string())]
    );
    assert_eq!(
        refs(RouteKind::Show, r#"{"model":"a","name":"b"}"#),
        [("model", "a:latest".to_string())]
    );
    assert_eq!(
        refs(RouteKind::Copy, r#"{"source":"a","destination":"b"}"#).len(),
        2
    );
    assert_eq!(
        refs(RouteKind::Create, r#"{"model":"mine","from":"llama3.2"}"#).len(),
        2
    );
    assert_eq!(
        referenced_models(RouteKind::Model, None, Some("llama3.2")).unwrap()[0]
            .name
            .to_string(),
        "llama3.2:latest"
    );
    let obj = JsonObject::parse(br#"{"model":"../../etc"}"#).unwrap();
    assert_eq!(
        referenced_models(RouteKind::Chat, Some(&obj), None)
            .unwrap_err()
            .status(),
        400
    );
}

#[test]
fn lists_only_show_the_teams_models() {
    let t = team(&["llama3.2:*"]);
    let tags = json!({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}, {"name": "qwen2.5:7b", "model": "qwen2.5:7b"}]});
    let out: Value = serde_json::from_slice(
        &filter_list(RouteKind::Tags, &t, &id(None), tags.to_string().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(out["models"].as_array().unwrap().len(), 1);
    assert_eq!(out["models"][0]["name"], "llama3.2:latest");
    let models = json!({"object": "list", "data": [{"id": "qwen2.5:7b"}, {"id": "llama3.2:3b"}]});
    let out: Value = serde_json::from_slice(
        &filter_list(
            RouteKind::Models,
            &t,
            &id(None),
            models.to_string().as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(out["data"], json!([{"id": "llama3.2:3b"}]));
    let none = json!({"object": "list", "data": null});
    let out: Value = serde_json::from_slice(
        &filter_list(
            RouteKind::Models,
            &t,
            &id(None),
            none.to_string().as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(out["data"], json!([]));
    assert!(filter_list(RouteKind::Tags, &t, &id(None), b"not json").is_none());
}
