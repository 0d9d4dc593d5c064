//! Unit tests of `access::auth` (kept apart: the module alone is long enough).

use super::*;
use crate::clock::unix_now;
use http::HeaderValue;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

#[test]
fn finds_the_key_in_each_carrier() {
    assert_eq!(
        key_from_headers(&headers(&[("authorization", "Bearer abc")])).unwrap(),
        "abc"
    );
    assert_eq!(
        key_from_headers(&headers(&[("authorization", "bearer  abc ")])).unwrap(),
        "abc"
    );
    assert_eq!(
        key_from_headers(&headers(&[("x-api-key", "abc")])).unwrap(),
        "abc"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("anyone:abc");
    assert_eq!(
        key_from_headers(&headers(&[("authorization", &format!("Basic {basic}"))])).unwrap(),
        "abc"
    );
    // The same key twice is fine (some SDKs send both headers).
    assert_eq!(
        key_from_headers(&headers(&[
            ("authorization", "Bearer abc"),
            ("x-api-key", "abc")
        ]))
        .unwrap(),
        "abc"
    );
}

fn verifier_with_key(revoked: &[&str]) -> (tempfile::TempDir, Verifier) {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = crate::access::keys::init(dir.path(), "k1").unwrap();
    let key = crate::access::keys::load_verify_key(&public).unwrap();
    let revoked = revoked.iter().map(|s| s.to_string()).collect();
    (
        dir,
        Verifier::new([("k1".to_string(), key)].into(), revoked),
    )
}

fn issue(dir: &tempfile::TempDir, expires_in: Option<u64>, now: u64) -> (String, Claims) {
    let req = crate::access::keys::IssueRequest {
        team: "t".into(),
        expires_in: expires_in.map(std::time::Duration::from_secs),
        ..Default::default()
    };
    crate::access::keys::issue(&dir.path().join("k1.key.pem"), &req, now).unwrap()
}

#[test]
fn a_verified_key_is_served_from_the_cache_until_it_expires() {
    let (dir, v) = verifier_with_key(&[]);
    let now = unix_now();
    let (token, claims) = issue(&dir, Some(3600), now);
    for _ in 0..5 {
        assert_eq!(v.verify(&token, now).unwrap().key_id, claims.jti);
    }
    assert_eq!(
        v.signature_checks(),
        1,
        "verified from scratch more than once"
    );
    // Still cached, but past its expiry (plus leeway): refused.
    assert_eq!(
        v.verify(&token, now + 3600 + LEEWAY + 1),
        Err(AuthFailure::Expired)
    );
    assert_eq!(v.signature_checks(), 1);
}

#[test]
fn revoked_and_failed_keys_are_refused_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = crate::access::keys::init(dir.path(), "k1").unwrap();
    let now = unix_now();
    let req = crate::access::keys::IssueRequest {
        team: "t".into(),
        ..Default::default()
    };
    let (token, claims) =
        crate::access::keys::issue(&dir.path().join("k1.key.pem"), &req, now).unwrap();
    let key = crate::access::keys::load_verify_key(&public).unwrap();
    let v = Verifier::new(
        [("k1".to_string(), key)].into(),
        [claims.jti.clone()].into(),
    );
    assert_eq!(v.verify(&token, now), Err(AuthFailure::Revoked));
    assert_eq!(v.verify(&token, now), Err(AuthFailure::Revoked));
    // A different byte in the middle of the signature (the last character only carries
    // padding bits, so changing it may make the base64 invalid rather than the signature).
    let sig_start = token.rfind('.').unwrap() + 1;
    let mut tampered = token.clone().into_bytes();
    tampered[sig_start + 10] = if tampered[sig_start + 10] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_eq!(v.verify(&tampered, now), Err(AuthFailure::BadSignature));
    assert_eq!(
        v.verify(&"x".repeat(MAX_KEY_LEN + 1), now),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(v.verify("not.a.jwt", now), Err(AuthFailure::Malformed));
}

/// Signs arbitrary claims with the test key `k1` (what an attacker holding a leaked signing
/// key, or a buggy issuer, could make).
fn sign(dir: &tempfile::TempDir, claims: serde_json::Value) -> String {
    let pem = std::fs::read(dir.path().join("k1.key.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[test]
fn a_cached_key_expires_exactly_at_its_expiry_plus_leeway() {
    let (dir, v) = verifier_with_key(&[]);
    let now = unix_now();
    let (token, _) = issue(&dir, Some(3600), now);
    let exp = now + 3600;
    assert!(v.verify(&token, now).is_ok());
    assert!(
        v.verify(&token, exp + LEEWAY).is_ok(),
        "the last valid second"
    );
    assert_eq!(
        v.verify(&token, exp + LEEWAY + 1),
        Err(AuthFailure::Expired)
    );
}

#[test]
fn expired_and_premature_keys_are_told_apart_on_first_sight() {
    let (dir, v) = verifier_with_key(&[]);
    let now = unix_now();
    let old = sign(
        &dir,
        serde_json::json!({"sub": "t", "jti": "a", "iat": now - 7200, "exp": now - 3600}),
    );
    assert_eq!(v.verify(&old, now), Err(AuthFailure::Expired));
    let early = sign(
        &dir,
        serde_json::json!({"sub": "t", "jti": "b", "iat": now, "nbf": now + 3600}),
    );
    assert_eq!(v.verify(&early, now), Err(AuthFailure::NotYetValid));
    for claims in [
        serde_json::json!({"sub": "t", "jti": "", "iat": now}),
        serde_json::json!({"sub": "", "jti": "c", "iat": now}),
    ] {
        assert_eq!(
            v.verify(&sign(&dir, claims.clone()), now),
            Err(AuthFailure::Malformed),
            "{claims}"
        );
    }
}

#[test]
fn oversized_and_non_ascii_keys_are_refused_before_any_signature_check() {
    let (_dir, v) = verifier_with_key(&[]);
    let now = unix_now();
    assert_eq!(
        v.verify(&"x".repeat(MAX_KEY_LEN + 1), now),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(v.verify("clé.clé.clé", now), Err(AuthFailure::Malformed));
    assert_eq!(v.signature_checks(), 0);
    // A key of exactly the longest length is looked at.
    assert_eq!(
        v.verify(&"x".repeat(MAX_KEY_LEN), now),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(v.signature_checks(), 1);
}

#[test]
fn many_keys_stay_cached_side_by_side() {
    let (dir, v) = verifier_with_key(&[]);
    let now = unix_now();
    let (a, _) = issue(&dir, None, now);
    let (b, _) = issue(&dir, None, now);
    for _ in 0..3 {
        assert!(v.verify(&a, now).is_ok() && v.verify(&b, now).is_ok());
    }
    assert_eq!(v.signature_checks(), 2);
    assert_eq!(v.key_ids().collect::<Vec<_>>(), ["k1"]);
    assert_eq!(v.revoked_count(), 0);
    let (_, revoking) = verifier_with_key(&["r1", "r2"]);
    assert_eq!(revoking.revoked_count(), 2);
}

#[test]
fn every_refusal_has_its_own_reason_and_a_message() {
    use AuthFailure::*;
    let all = AuthFailure::ALL;
    let reasons: HashSet<&str> = all.iter().map(|f| f.reason()).collect();
    assert_eq!(reasons.len(), all.len(), "reasons are distinct");
    assert!(reasons
        .iter()
        .all(|r| r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    assert_eq!(Revoked.reason(), "revoked");
    assert_eq!(Expired.reason(), "expired");
    for f in all {
        assert!(f.message().len() > 20, "{f:?}: {}", f.message());
    }
    assert!(Revoked.message().contains("revoked"));
    assert!(Missing.message().contains("Authorization: Bearer"));
    assert!(UnknownTeam.message().contains("team"));
}

#[test]
fn a_refused_key_tells_its_id_and_its_team_only_when_signed() {
    let (dir, _) = verifier_with_key(&[]);
    let now = unix_now();
    let key = |jti: &str| {
        sign(
            &dir,
            serde_json::json!({"sub": "research", "jti": jti, "iat": now}),
        )
    };
    let r = refused_key(&key("a1.b_c-2"), AuthFailure::Revoked);
    assert_eq!(
        r,
        RefusedKey {
            key_id: Some("a1.b_c-2".into()),
            team: Some("research".into()),
            signed: true
        }
    );
    let r = refused_key(&key("a1"), AuthFailure::BadSignature);
    assert_eq!(
        (r.key_id.as_deref(), r.team, r.signed),
        (Some("a1"), None, false)
    );
    for odd in ["", "has space", "new\nline", "quote\"", &"x".repeat(65)] {
        assert_eq!(
            refused_key(&key(odd), AuthFailure::Expired).key_id,
            None,
            "{odd:?}"
        );
    }
    assert_eq!(
        refused_key(&"x".repeat(64), AuthFailure::Revoked).key_id,
        None,
        "not a JWT"
    );
    // The longest key corral reads is still read; one byte more is not.
    let pem = std::fs::read(dir.path().join("k1.key.pem")).unwrap();
    let signing = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let token = |pad: usize, cty: Option<&str>| {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.cty = cty.map(str::to_string);
        let claims =
            serde_json::json!({"sub": "t", "jti": "a1", "iat": now, "pad": "p".repeat(pad)});
        jsonwebtoken::encode(&header, &claims, &signing).unwrap()
    };
    // Base64 grows 4 characters per 3 bytes: start from the estimate, and try the header
    // with and without one more field (some lengths cannot be hit otherwise).
    let estimate = (MAX_KEY_LEN - token(0, None).len()) * 3 / 4;
    let longest = (estimate.saturating_sub(8)..estimate + 8)
        .flat_map(|pad| [token(pad, None), token(pad, Some("x"))])
        .find(|t| t.len() == MAX_KEY_LEN)
        .expect("a key of exactly the longest length");
    assert_eq!(
        refused_key(&longest, AuthFailure::Revoked)
            .key_id
            .as_deref(),
        Some("a1")
    );
    let long = format!("{}{}", key("a1"), "x".repeat(MAX_KEY_LEN));
    assert_eq!(refused_key(&long, AuthFailure::Revoked).key_id, None);
    assert_eq!(
        refused_key("ключ.ключ.ключ", AuthFailure::Malformed).key_id,
        None
    );
    for (failure, signed) in [
        (AuthFailure::Expired, true),
        (AuthFailure::NotYetValid, true),
        (AuthFailure::UnknownTeam, true),
        (AuthFailure::UnknownKid, false),
        (AuthFailure::WrongAlgorithm, false),
    ] {
        assert_eq!(
            refused_key(&key("a1"), failure).signed,
            signed,
            "{failure:?}"
        );
    }
}

#[test]
fn refuses_missing_ambiguous_and_odd_carriers() {
    assert_eq!(key_from_headers(&headers(&[])), Err(AuthFailure::Missing));
    assert_eq!(
        key_from_headers(&headers(&[
            ("authorization", "Bearer a"),
            ("x-api-key", "b")
        ])),
        Err(AuthFailure::Ambiguous)
    );
    assert_eq!(
        key_from_headers(&headers(&[
            ("authorization", "Bearer a"),
            ("authorization", "Bearer b")
        ])),
        Err(AuthFailure::Ambiguous)
    );
    assert_eq!(
        key_from_headers(&headers(&[("authorization", "Token abc")])),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(
        key_from_headers(&headers(&[("authorization", "Bearer")])),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(
        key_from_headers(&headers(&[("authorization", "Basic !!!")])),
        Err(AuthFailure::Malformed)
    );
    assert_eq!(
        key_from_headers(&headers(&[("x-api-key", "")])),
        Err(AuthFailure::Malformed)
    );
}

#[test]
fn a_reloaded_list_keeps_earlier_revocations_and_counts_what_it_dropped() {
    let (dir, running) = verifier_with_key(&["r1", "r2", "r3"]);
    let now = unix_now();
    let (token, claims) = issue(&dir, None, now);
    // The new list lost r2 and r3 (a shorter file, a rewrite caught half-way) and adds the key.
    let key = crate::access::keys::load_verify_key(&dir.path().join("k1.pub.pem")).unwrap();
    let mut next = Verifier::new(
        [("k1".to_string(), key)].into(),
        ["r1".to_string(), claims.jti.clone()].into(),
    );
    assert_eq!(next.keep_revoked(&running), 2, "r2 and r3 were dropped");
    assert_eq!(next.revoked_count(), 4);
    assert_eq!(next.verify(&token, now), Err(AuthFailure::Revoked));
    let (_, mut same) = verifier_with_key(&["r1", "r2", "r3"]);
    assert_eq!(same.keep_revoked(&running), 0, "nothing dropped");
    assert_eq!(same.revoked_count(), 3);
}

#[test]
fn each_failure_has_its_own_reason_and_answer() {
    use crate::api::error::GatewayError;
    let reasons: HashSet<&str> = AuthFailure::ALL.iter().map(|f| f.reason()).collect();
    assert_eq!(
        reasons.len(),
        AuthFailure::ALL.len(),
        "two failures share a reason"
    );
    for failure in AuthFailure::ALL {
        let error = failure.error();
        let expected = match failure {
            AuthFailure::NoTeam => 403,
            AuthFailure::IdpUnavailable => 503,
            _ => 401,
        };
        assert_eq!(error.status(), expected, "{failure:?}");
        assert_eq!(error.to_string(), failure.message(), "{failure:?}");
    }
    assert_eq!(AuthFailure::NoTeam.reason(), "no_team");
    assert_eq!(AuthFailure::IdpUnavailable.reason(), "idp_unavailable");
    assert_eq!(AuthFailure::UnknownIssuer.reason(), "unknown_issuer");
    assert_eq!(AuthFailure::WrongAudience.reason(), "wrong_audience");
    let rendered = AuthFailure::IdpUnavailable
        .error()
        .render(crate::api::routes::Dialect::OpenAi);
    assert!(rendered.headers.contains(&("retry-after", "5".to_string())));
    assert!(matches!(
        AuthFailure::NoTeam.error(),
        GatewayError::Forbidden(_)
    ));
}

#[test]
fn a_refused_identity_provider_token_never_names_its_sub_as_a_team() {
    let claims = serde_json::json!({"iss": "https://idp.example", "sub": "app-client", "jti": "t-1", "exp": 1});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    let refused = refused_key(&token, AuthFailure::Expired);
    assert_eq!(refused.key_id.as_deref(), Some("t-1"));
    assert_eq!(refused.team, None);
    assert!(refused.signed);
    // A corral key's team is named when its signature held, prefixed or not.
    let corral = serde_json::json!({"sub": "research", "jti": "k-1", "iat": 1});
    let key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &corral,
        &jsonwebtoken::EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    for k in [key.clone(), format!("corral_{key}")] {
        assert_eq!(
            refused_key(&k, AuthFailure::Expired).team.as_deref(),
            Some("research")
        );
        assert_eq!(refused_key(&k, AuthFailure::BadSignature).team, None);
    }
}

#[test]
fn revocation_names_key_ids_exactly() {
    let (_dir, v) = verifier_with_key(&["abc123"]);
    assert!(v.is_revoked("abc123"));
    assert!(
        v.is_revoked("ABC123"),
        "an identity provider's jti, as it wrote it"
    );
    assert!(!v.is_revoked("abc12"));
    assert!(!v.is_revoked("other"));
}
