//! Unit tests of `access::oidc`: a provider whose documents a test serves.

use super::*;
use crate::clock::unix_now;
use base64::Engine;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

const ISSUER: &str = "https://idp.example.com/realms/main";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public JWK.
struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

fn ed25519(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    Signer {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(pair.serialized_der()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key_raw())}),
    }
}

fn p256(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    Signer {
        kid: kid.into(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                    "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
    }
}

impl Signer {
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// The provider's documents, changeable by the test; counts JWKS fetches.
struct Served {
    issuer: Mutex<String>,
    jwks: Mutex<Value>,
    down: std::sync::atomic::AtomicBool,
    jwks_fetches: AtomicUsize,
}

#[async_trait]
impl Fetch for Served {
    async fn get(&self, url: &str) -> Result<Fetched, String> {
        if self.down.load(Ordering::Relaxed) {
            return Err("connection refused".into());
        }
        let body = if url.ends_with("/.well-known/openid-configuration") {
            json!({"issuer": *self.issuer.lock().unwrap(), "jwks_uri": format!("{ISSUER}/certs")})
        } else {
            assert_eq!(url, format!("{ISSUER}/certs"));
            self.jwks_fetches.fetch_add(1, Ordering::Relaxed);
            self.jwks.lock().unwrap().clone()
        };
        Ok(Fetched {
            body: body.to_string().into(),
            max_age: None,
        })
    }
}

fn provider(keys: &[&Signer], teams: &[(&str, &str)], claim: &str) -> (Arc<Served>, Provider) {
    let served = Arc::new(Served {
        issuer: Mutex::new(ISSUER.into()),
        jwks: Mutex::new(json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})),
        down: Default::default(),
        jwks_fetches: AtomicUsize::new(0),
    });
    let cfg = OidcConfig {
        issuer: ISSUER.into(),
        audience: "corral".into(),
        team_claim: claim.into(),
        teams: teams
            .iter()
            .map(|(v, t)| (v.to_string(), t.to_string()))
            .collect(),
        ca_file: PathBuf::new(),
    };
    let fetch: Arc<dyn Fetch> = served.clone();
    let provider = Provider::new("corp", &cfg, &move |_| Ok(fetch.clone())).unwrap();
    (served, provider)
}

fn claims(groups: Value) -> Value {
    let now = unix_now();
    json!({"iss": ISSUER, "aud": "corral", "exp": now + 300, "iat": now, "jti": "tok-1", "groups": groups})
}

fn metrics() -> Metrics {
    Metrics::new(&crate::config::Config::default())
}

#[tokio::test]
async fn tokens_map_to_the_first_team_of_the_table_and_are_refused_for_what_is_wrong() {
    let (ed, ec) = (ed25519("ed-1"), p256("ec-1"));
    let teams = [("ml", "research"), ("ops", "platform"), ("all", "research")];
    let (_, p) = provider(&[&ed, &ec], &teams, "groups");
    let now = unix_now();
    assert_eq!(
        p.verify(&ed.sign(&claims(json!("ml"))), now).unwrap_err(),
        AuthFailure::IdpUnavailable,
        "no keys yet"
    );
    assert!(p.keys.refresh(Why::Due, &metrics()).await);

    for signer in [&ed, &ec] {
        let id = p
            .verify(&signer.sign(&claims(json!(["ops", "ml"]))), now)
            .unwrap();
        assert_eq!(id.team, "research", "the table's order, not the token's");
        assert_eq!(id.key_id, "tok-1");
    }
    let id = p.verify(&ed.sign(&claims(json!("ops"))), now).unwrap();
    assert_eq!(id.team, "platform");

    let refused = |c: &Value| p.verify(&ed.sign(c), now).unwrap_err();
    assert_eq!(refused(&claims(json!(["nobody"]))), AuthFailure::NoTeam);
    assert_eq!(refused(&claims(json!(7))), AuthFailure::NoTeam);
    let mut c = claims(json!("ml"));
    c["aud"] = json!("other");
    assert_eq!(refused(&c), AuthFailure::WrongAudience);
    c["aud"] = json!(["other", "corral"]);
    assert!(p.verify(&ed.sign(&c), now).is_ok(), "aud may be a list");
    let mut c = claims(json!("ml"));
    c["exp"] = json!(now - 3600);
    assert_eq!(refused(&c), AuthFailure::Expired);
    let mut c = claims(json!("ml"));
    c["nbf"] = json!(now + 3600);
    assert_eq!(refused(&c), AuthFailure::NotYetValid);
    let mut c = claims(json!("ml"));
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(refused(&c), AuthFailure::Malformed, "exp is required");

    // A token under a kid the keys do not have, and one whose header lies about the algorithm.
    let stranger = ed25519("ed-2");
    assert_eq!(
        p.verify(&stranger.sign(&claims(json!("ml"))), now)
            .unwrap_err(),
        AuthFailure::UnknownKid
    );
    let forged = ed25519("ec-1");
    assert_eq!(
        p.verify(&forged.sign(&claims(json!("ml"))), now)
            .unwrap_err(),
        AuthFailure::WrongAlgorithm
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("ed-1".into());
    let hmac = jsonwebtoken::encode(
        &hs,
        &claims(json!("ml")),
        &EncodingKey::from_secret(b"public"),
    )
    .unwrap();
    assert_eq!(
        p.verify(&hmac, now).unwrap_err(),
        AuthFailure::WrongAlgorithm
    );
}

#[tokio::test]
async fn a_nested_claim_path_and_a_jti_that_is_not_plain() {
    let ed = ed25519("k");
    let (_, p) = provider(&[&ed], &[("admins", "platform")], "realm_access.roles");
    assert!(p.keys.refresh(Why::Due, &metrics()).await);
    let mut c = claims(json!(null));
    c["realm_access"] = json!({"roles": ["users", "admins"]});
    c["jti"] = json!("has spaces and / slashes");
    let token = ed.sign(&c);
    let id = p.verify(&token, unix_now()).unwrap();
    assert_eq!(id.team, "platform");
    assert_eq!(id.key_id.len(), 32, "a hash of the token: {}", id.key_id);
    assert!(!token.contains(&id.key_id));
}

#[tokio::test]
async fn rotation_is_picked_up_and_unknown_kids_fetch_at_most_once_per_interval() {
    let (old, new) = (ed25519("old"), ed25519("new"));
    let (served, p) = provider(&[&old], &[("ml", "research")], "groups");
    let m = metrics();
    assert!(p.keys.refresh(Why::Due, &m).await);
    assert_eq!(served.jwks_fetches.load(Ordering::Relaxed), 1);

    // The provider rotates: the first token under the new kid fetches the keys again.
    *served.jwks.lock().unwrap() = json!({"keys": [new.jwk.clone()]});
    let token = new.sign(&claims(json!("ml")));
    assert_eq!(
        p.verify(&token, unix_now()).unwrap_err(),
        AuthFailure::UnknownKid
    );
    let before = old.sign(&claims(json!("ml")));
    assert!(
        p.verify(&before, unix_now()).is_ok(),
        "verified (and cached) before the rotation"
    );
    assert!(p.keys.refresh(Why::UnknownKid, &m).await);
    assert!(p.verify(&token, unix_now()).is_ok());
    assert_eq!(served.jwks_fetches.load(Ordering::Relaxed), 2);
    // The old key is gone from the provider's set: tokens it signed are not taken from the cache.
    assert_eq!(
        p.verify(&before, unix_now()).unwrap_err(),
        AuthFailure::UnknownKid
    );

    // A flood of made-up kids right after: no more fetches.
    for i in 0..50 {
        let bogus = ed25519(&format!("bogus-{i}"));
        let t = bogus.sign(&claims(json!("ml")));
        assert_eq!(
            p.verify(&t, unix_now()).unwrap_err(),
            AuthFailure::UnknownKid
        );
        assert!(!p.keys.refresh(Why::UnknownKid, &m).await);
    }
    assert_eq!(served.jwks_fetches.load(Ordering::Relaxed), 2);
    assert_eq!(m.oidc_refresh.with_label_values(&[ISSUER, "ok"]).get(), 2);
}

#[tokio::test]
async fn keys_that_loaded_survive_the_provider_going_down_and_a_lying_discovery_is_refused() {
    let ed = ed25519("k");
    let (served, p) = provider(&[&ed], &[("ml", "research")], "groups");
    let m = metrics();
    assert!(p.keys.refresh(Why::Due, &m).await);
    served.down.store(true, Ordering::Relaxed);
    assert!(!p.keys.refresh(Why::UnknownKid, &m).await);
    assert_eq!(m.oidc_up.with_label_values(&[ISSUER]).get(), 0);
    assert!(
        p.verify(&ed.sign(&claims(json!("ml"))), unix_now()).is_ok(),
        "keys kept"
    );

    // Discovery naming another issuer is not believed (its keys would sign anything).
    let (served, p) = provider(&[&ed], &[("ml", "research")], "groups");
    *served.issuer.lock().unwrap() = "https://evil.example.com".into();
    assert!(!p.keys.refresh(Why::Due, &m).await);
    assert_eq!(served.jwks_fetches.load(Ordering::Relaxed), 0);
    assert!(!p.keys.loaded());
}

#[test]
fn only_usable_signing_keys_are_taken_from_a_jwks() {
    let ed = ed25519("sig");
    let set = json!({"keys": [
        {"kty": "RSA", "use": "enc", "kid": "enc-1", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "Ed25519", "x": "AA"},
        ed.jwk,
    ]});
    let keys = parse_jwks(set.to_string().as_bytes()).unwrap();
    assert_eq!(keys.keys.keys().collect::<Vec<_>>(), ["sig"]);
    assert!(parse_jwks(b"{\"keys\": []}").is_err());
    assert!(parse_jwks(b"<html>").is_err());
}

/// A provider that never answers.
struct Hangs;

#[async_trait]
impl Fetch for Hangs {
    async fn get(&self, _url: &str) -> Result<Fetched, String> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_request_never_waits_for_a_fetch_it_did_not_start() {
    let cfg = OidcConfig {
        issuer: ISSUER.into(),
        audience: "corral".into(),
        team_claim: "groups".into(),
        teams: vec![("ml".into(), "research".into())],
        ca_file: PathBuf::new(),
    };
    let hangs: Arc<dyn Fetch> = Arc::new(Hangs);
    let p = Provider::new("corp", &cfg, &move |_| Ok(hangs.clone())).unwrap();
    let m = Arc::new(metrics());
    // The background fetch hangs (until its deadline) holding the provider's fetch lock.
    let (keys, bg) = (p.keys.clone(), m.clone());
    let background = tokio::spawn(async move { keys.refresh(Why::Due, &bg).await });
    while p.keys.due() {
        tokio::task::yield_now().await;
    }
    // A token naming an unknown kid, or coming before the keys loaded, is answered at once
    // (the guard below fails the test instead of hanging it; it is not a timing condition).
    let answered =
        tokio::time::timeout(Duration::from_secs(60), p.keys.refresh(Why::UnknownKid, &m)).await;
    assert_eq!(answered, Ok(false));
    let token = ed25519("k").sign(&claims(json!("ml")));
    assert_eq!(
        p.verify(&token, unix_now()).unwrap_err(),
        AuthFailure::IdpUnavailable
    );
    background.abort();
}

#[tokio::test]
async fn a_reload_applies_a_new_audience_and_team_table_to_tokens_already_seen() {
    let ed = ed25519("k");
    let (served, first) = provider(&[&ed], &[("ml", "research")], "groups");
    assert!(first.keys.refresh(Why::Due, &metrics()).await);
    let token = ed.sign(&claims(json!("ml")));
    assert_eq!(first.verify(&token, unix_now()).unwrap().team, "research");
    // The reloaded provider maps `ml` elsewhere; it keeps the fetched keys, not the verdicts.
    let cfg = OidcConfig {
        issuer: ISSUER.into(),
        audience: "corral".into(),
        team_claim: "groups".into(),
        teams: vec![("ml".into(), "platform".into())],
        ca_file: PathBuf::new(),
    };
    let fetch: Arc<dyn Fetch> = served.clone();
    let mut second = Provider::new("corp", &cfg, &move |_| Ok(fetch.clone())).unwrap();
    second.keep_keys(&first);
    assert!(second.keys.loaded(), "no fetch needed");
    assert_eq!(second.verify(&token, unix_now()).unwrap().team, "platform");
    let mut cfg = cfg;
    cfg.audience = "other".into();
    let fetch: Arc<dyn Fetch> = served.clone();
    let mut third = Provider::new("corp", &cfg, &move |_| Ok(fetch.clone())).unwrap();
    third.keep_keys(&first);
    assert_eq!(
        third.verify(&token, unix_now()).unwrap_err(),
        AuthFailure::WrongAudience
    );
}
