//! API key → identity.
//!
//! An API key is a JWT signed with Ed25519 (`corral keys issue`). The gateway holds only public
//! verification keys, so a compromised gateway cannot mint keys. Only EdDSA is accepted (no
//! `none`, no HS*/RS* confusion), the header's `kid` picks the verification key, `exp` and `nbf`
//! are enforced, revoked key ids (`jti`) are refused. A key verified once is cached (by its
//! SHA-256, never the key itself) until it expires; revocation is checked on every request.

use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Longest key accepted (a corral key is about 300 bytes).
const MAX_KEY_LEN: usize = 4096;
/// Verified keys remembered at most; the cache only ever holds keys that verified.
const CACHE_CAPACITY: usize = 16_384;
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub(crate) const LEEWAY: u64 = 60;

/// The claims of a corral API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The team.
    pub(crate) sub: String,
    /// The key id, what revocation names.
    pub jti: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nbf: Option<u64>,
    /// Narrows the team's model allow-list (never widens it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// A label for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub(crate) team: String,
    pub(crate) key_id: String,
    /// The verification key that accepted it.
    pub(crate) kid: String,
    pub(crate) models: Option<Vec<String>>,
    pub(crate) expires_at: Option<u64>,
}

/// Why a request's key was refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    /// More than one key in the request, differing.
    Ambiguous,
    Malformed,
    /// Not EdDSA (`none`, HS256, RS256, ...).
    WrongAlgorithm,
    /// Signed by a key this gateway does not trust (unknown or missing `kid`).
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    Revoked,
    /// Its team is not in the configuration.
    UnknownTeam,
    /// An OpenID Connect token whose issuer no `[auth.oidc.*]` names.
    UnknownIssuer,
    /// An OpenID Connect token for another audience.
    WrongAudience,
    /// An OpenID Connect token whose groups map to no team (403).
    NoTeam,
    /// An OpenID Connect token, and its provider's keys have not loaded yet (503).
    IdpUnavailable,
}

impl AuthFailure {
    pub(crate) const ALL: [AuthFailure; 14] = [
        AuthFailure::Missing,
        AuthFailure::Ambiguous,
        AuthFailure::Malformed,
        AuthFailure::WrongAlgorithm,
        AuthFailure::UnknownKid,
        AuthFailure::BadSignature,
        AuthFailure::Expired,
        AuthFailure::NotYetValid,
        AuthFailure::Revoked,
        AuthFailure::UnknownTeam,
        AuthFailure::UnknownIssuer,
        AuthFailure::WrongAudience,
        AuthFailure::NoTeam,
        AuthFailure::IdpUnavailable,
    ];

    /// The `reason` label of `corral_auth_failures_total`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Ambiguous => "ambiguous",
            AuthFailure::Malformed => "malformed",
            AuthFailure::WrongAlgorithm => "wrong_algorithm",
            AuthFailure::UnknownKid => "unknown_kid",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::Revoked => "revoked",
            AuthFailure::UnknownTeam => "unknown_team",
            AuthFailure::UnknownIssuer => "unknown_issuer",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::NoTeam => "no_team",
            AuthFailure::IdpUnavailable => "idp_unavailable",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => {
                "missing API key: send it as `Authorization: Bearer <key>`, as `x-api-key: <key>`, or as the password of HTTP Basic auth"
            }
            AuthFailure::Ambiguous => "more than one API key in the request: send exactly one",
            AuthFailure::Malformed | AuthFailure::WrongAlgorithm | AuthFailure::BadSignature => {
                "the API key is not valid; check that it was copied whole"
            }
            AuthFailure::UnknownKid => "the API key was signed by a key this gateway does not trust; ask for a new key",
            AuthFailure::Expired => "the API key has expired; ask for a new key",
            AuthFailure::NotYetValid => "the API key is not valid yet",
            AuthFailure::Revoked => "the API key has been revoked",
            AuthFailure::UnknownTeam => "the API key's team is not configured on this gateway",
            AuthFailure::UnknownIssuer => "the token's issuer is not trusted by this gateway",
            AuthFailure::WrongAudience => "the token is for another audience, not this gateway",
            AuthFailure::NoTeam => "the token's groups map to no team on this gateway",
            AuthFailure::IdpUnavailable => {
                "the identity provider's signing keys have not loaded yet; try again shortly"
            }
        }
    }

    /// The answer: 401, except a token that proves who it is but has no team here (403) and one
    /// that cannot be checked yet (503).
    pub(crate) fn error(self) -> crate::api::error::GatewayError {
        use crate::api::error::GatewayError;
        let message = self.message().to_string();
        match self {
            AuthFailure::NoTeam => GatewayError::Forbidden(message),
            AuthFailure::IdpUnavailable => GatewayError::IdentityProviderUnavailable(message),
            _ => GatewayError::Unauthorized(message),
        }
    }
}

/// Finds the API key in the request: `Authorization: Bearer`, `x-api-key`, or the password of
/// `Authorization: Basic`. Several carriers are fine only if they carry the same key.
pub fn key_from_headers<'h>(headers: &'h HeaderMap) -> Result<Cow<'h, str>, AuthFailure> {
    // Borrowed from the header where it is written as is; only a Basic password is decoded.
    let mut found: Option<Cow<'h, str>> = None;
    let mut take = |key: Cow<'h, str>| -> Result<(), AuthFailure> {
        let key = match key {
            Cow::Borrowed(k) => Cow::Borrowed(k.trim()),
            Cow::Owned(k) => Cow::Owned(k.trim().to_string()),
        };
        if key.is_empty() {
            return Err(AuthFailure::Malformed);
        }
        match &found {
            Some(k) if *k != key => Err(AuthFailure::Ambiguous),
            _ => {
                found = Some(key);
                Ok(())
            }
        }
    };
    for value in headers.get_all(http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthFailure::Malformed)?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
        if scheme.eq_ignore_ascii_case("bearer") {
            take(Cow::Borrowed(rest))?;
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| AuthFailure::Malformed)?;
            let text = String::from_utf8(decoded).map_err(|_| AuthFailure::Malformed)?;
            let (_user, password) = text.split_once(':').ok_or(AuthFailure::Malformed)?;
            take(Cow::Owned(password.to_string()))?;
        } else {
            return Err(AuthFailure::Malformed);
        }
    }
    for value in headers.get_all("x-api-key") {
        take(Cow::Borrowed(
            value.to_str().map_err(|_| AuthFailure::Malformed)?,
        ))?;
    }
    found.ok_or(AuthFailure::Missing)
}

/// Keys whose signature held, by their SHA-256 (never the key itself), so a key is verified
/// once. Holds at most [`CACHE_CAPACITY`]; only keys that verified get in.
#[derive(Default)]
pub(crate) struct VerifiedCache {
    map: RwLock<HashMap<[u8; 32], Arc<Identity>>>,
    signature_checks: AtomicU64,
}

impl VerifiedCache {
    /// The identity of `token`, from the cache or from `verify` (counted as a signature check).
    /// `generation` names the keys that verify it: a token is found only under the same one.
    pub(crate) fn get_or_insert(
        &self,
        generation: u64,
        token: &str,
        verify: impl FnOnce() -> Result<Identity, AuthFailure>,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let digest: [u8; 32] = Sha256::new()
            .chain_update(generation.to_le_bytes())
            .chain_update(token.as_bytes())
            .finalize()
            .into();
        let cached = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned();
        if let Some(identity) = cached {
            return Ok(identity);
        }
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let identity = Arc::new(verify()?);
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CACHE_CAPACITY {
            map.clear();
        }
        map.insert(digest, identity.clone());
        Ok(identity)
    }

    #[cfg(test)]
    pub(crate) fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }
}

/// The verification keys and revocation list, with a cache of verified keys.
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    revoked: HashSet<String>,
    validation: Validation,
    cache: VerifiedCache,
}

impl Verifier {
    pub fn new(keys: HashMap<String, DecodingKey>, revoked: HashSet<String>) -> Verifier {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        validation.set_required_spec_claims(&["sub"]);
        Verifier {
            keys,
            revoked,
            validation,
            cache: VerifiedCache::default(),
        }
    }

    pub(crate) fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub(crate) fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// Keeps revoked every key `earlier` revoked; returns how many this list had dropped.
    pub(crate) fn keep_revoked(&mut self, earlier: &Verifier) -> usize {
        let before = self.revoked.len();
        self.revoked.extend(earlier.revoked.iter().cloned());
        self.revoked.len() - before
    }

    /// How many keys had their signature checked (cache misses).
    #[cfg(test)]
    pub(crate) fn signature_checks(&self) -> u64 {
        self.cache.signature_checks()
    }

    /// Whether a key id is on the revocation list (which holds them lowercase; an identity
    /// provider's `jti` may not be).
    pub(crate) fn is_revoked(&self, key_id: &str) -> bool {
        self.revoked.contains(&key_id.to_ascii_lowercase())
    }

    /// Verifies a key at unix time `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<Identity>, AuthFailure> {
        let token = crate::access::keys::unprefixed(token);
        if token.len() > MAX_KEY_LEN || !token.is_ascii() {
            return Err(AuthFailure::Malformed);
        }
        let identity = self
            .cache
            .get_or_insert(0, token, || self.verify_signature(token))?;
        // Checked on every use: a cached key still expires and can still be revoked.
        if identity
            .expires_at
            .is_some_and(|exp| now > exp.saturating_add(LEEWAY))
        {
            return Err(AuthFailure::Expired);
        }
        if self.revoked.contains(&identity.key_id) {
            return Err(AuthFailure::Revoked);
        }
        Ok(identity)
    }

    fn verify_signature(&self, token: &str) -> Result<Identity, AuthFailure> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthFailure::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(AuthFailure::UnknownKid)?;
        let key = self.keys.get(&kid).ok_or(AuthFailure::UnknownKid)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            match e.kind() {
                ErrorKind::InvalidSignature => AuthFailure::BadSignature,
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                // The header's `alg` was checked above, so no other error is an algorithm's.
                _ => AuthFailure::Malformed,
            }
        })?;
        let c = data.claims;
        if c.sub.is_empty() || c.jti.is_empty() {
            return Err(AuthFailure::Malformed);
        }
        Ok(Identity {
            team: c.sub,
            key_id: c.jti,
            kid,
            models: c.models,
            expires_at: c.exp,
        })
    }
}

/// What the access log may say about a refused key (never the key itself): its id (`jti`)
/// whenever the key parses, and whether its signature held (a revoked, expired, premature or
/// unknown-team key), in which case its id and team are the issuer's. Otherwise the id is only
/// what the key claims: anyone can write any id into an unsigned key. Ids and team names that
/// are not plain (1-64 of `[A-Za-z0-9._-]`) are left out, so the log line stays readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefusedKey {
    pub(crate) key_id: Option<String>,
    pub(crate) team: Option<String>,
    /// The signature held: `key_id` and `team` are the issuer's, not just claimed.
    pub(crate) signed: bool,
}

pub(crate) fn refused_key(token: &str, failure: AuthFailure) -> RefusedKey {
    let unknown = RefusedKey {
        key_id: None,
        team: None,
        signed: false,
    };
    let token = crate::access::keys::unprefixed(token);
    if token.len() > MAX_KEY_LEN || !token.is_ascii() {
        return unknown;
    }
    let Ok(data) = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token) else {
        return unknown;
    };
    let plain = |v: &serde_json::Value| {
        v.as_str()
            .filter(|s| {
                (1..=64).contains(&s.len())
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            })
            .map(str::to_string)
    };
    let signed = matches!(
        failure,
        AuthFailure::Revoked
            | AuthFailure::Expired
            | AuthFailure::NotYetValid
            | AuthFailure::UnknownTeam
    );
    // An identity provider's `sub` is a user or client, not a team.
    let corral_key = data.claims.get("iss").is_none();
    RefusedKey {
        key_id: plain(&data.claims["jti"]),
        team: (signed && corral_key)
            .then(|| plain(&data.claims["sub"]))
            .flatten(),
        signed,
    }
}

#[cfg(test)]
#[path = "tests/auth.rs"]
mod tests;
