//! OpenID Connect access tokens, beside corral's own keys (`[auth.oidc.NAME]`).
//!
//! A token names its issuer (`iss`); a configured provider with that issuer verifies it against
//! the keys it publishes (its JWKS, found through discovery): RS256, ES256 or EdDSA, the key its
//! `kid` names, `aud`, `exp` and `nbf` with corral's leeway. Its team is the first entry of the
//! provider's `teams` table whose claim value the token's `team_claim` holds.
//!
//! The keys are fetched by a [`Fetch`] the runtime gives (this layer does no I/O of its own):
//! at start-up, again when their cache headers say, and when a token names a `kid` they do not
//! have (at most once per [`UNKNOWN_KID_INTERVAL`], so a flood of made-up kids cannot hammer the
//! provider). Until the keys first load, the provider's tokens are refused with 503; keys that
//! loaded once are kept while the provider is down.

use crate::access::auth::{AuthFailure, Identity, VerifiedCache, LEEWAY};
use crate::config::OidcConfig;
use crate::telemetry::metrics::Metrics;
use async_trait::async_trait;
use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A token naming an unknown `kid` fetches the keys again at most this often.
pub(crate) const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(10);
/// Keys are fetched again after their `Cache-Control: max-age`, within these bounds, or after
/// [`DEFAULT_MAX_AGE`] when the provider sends none.
const MIN_MAX_AGE: Duration = Duration::from_secs(60);
const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);
/// After a failed fetch, the next one waits 1 s, 2 s, 4 s, 8 s, then 16 s each time.
const MAX_DOUBLINGS: u32 = 4;
/// A JWKS or discovery document larger than this is refused (the fetcher enforces it).
pub(crate) const MAX_DOCUMENT: usize = 1 << 20;
/// Discovery and the JWKS together, so a provider that hangs holds nothing for long.
const FETCH_DEADLINE: Duration = Duration::from_secs(15);

/// What a [`Fetch`] got.
pub(crate) struct Fetched {
    pub(crate) body: Bytes,
    /// From `Cache-Control: max-age`.
    pub(crate) max_age: Option<Duration>,
}

/// GETs a provider's documents (HTTP over TLS in the runtime; canned in tests).
#[async_trait]
pub(crate) trait Fetch: Send + Sync {
    async fn get(&self, url: &str) -> Result<Fetched, String>;
}

/// Makes the [`Fetch`] for a provider, given its optional CA file.
pub(crate) type MakeFetch =
    dyn Fn(&std::path::Path) -> Result<Arc<dyn Fetch>, String> + Send + Sync;

/// A provider's published keys, by `kid`.
struct KeySet {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
    /// Which fetch this is: tokens verified with these keys are cached under it, so a token
    /// checked against keys the provider has since dropped is never taken from the cache.
    generation: u64,
}

/// The keys of one issuer and when to fetch them, kept across reloads while the issuer and its
/// CA file stay the same.
pub(crate) struct Keys {
    issuer: String,
    ca_file: PathBuf,
    fetch: Arc<dyn Fetch>,
    set: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching: one fetch at a time per issuer.
    timing: tokio::sync::Mutex<Timing>,
}

struct Timing {
    /// Successful fetches so far (the [`KeySet::generation`] of the next one, less one).
    generation: u64,
    /// When the next scheduled fetch is due.
    due: Instant,
    failures: u32,
    last_unknown_kid: Option<Instant>,
}

/// Why the keys are fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Due (first load, cache expiry, retry after a failure).
    Due,
    /// A token named a `kid` the keys do not have, or came before the keys loaded.
    UnknownKid,
}

impl Keys {
    fn new(issuer: &str, ca_file: std::path::PathBuf, fetch: Arc<dyn Fetch>) -> Keys {
        Keys {
            issuer: issuer.to_string(),
            ca_file,
            fetch,
            set: RwLock::new(None),
            timing: tokio::sync::Mutex::new(Timing {
                generation: 0,
                due: Instant::now(),
                failures: 0,
                last_unknown_kid: None,
            }),
        }
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn loaded(&self) -> bool {
        self.current().is_some()
    }

    /// Whether a scheduled fetch is due (false while one runs).
    pub(crate) fn due(&self) -> bool {
        self.timing
            .try_lock()
            .is_ok_and(|t| Instant::now() >= t.due)
    }

    /// Fetches the keys, unless `why` is an unknown kid and one was fetched for that within
    /// [`UNKNOWN_KID_INTERVAL`], or a fetch is running (a request never waits for a fetch it
    /// did not start). Returns whether this call fetched new keys.
    pub(crate) async fn refresh(&self, why: Why, metrics: &Metrics) -> bool {
        let mut timing = match why {
            Why::UnknownKid => match self.timing.try_lock() {
                Ok(timing) => timing,
                Err(_) => return false,
            },
            Why::Due => self.timing.lock().await,
        };
        let now = Instant::now();
        match why {
            Why::UnknownKid
                if timing
                    .last_unknown_kid
                    .is_some_and(|at| now.duration_since(at) < UNKNOWN_KID_INTERVAL) =>
            {
                return false
            }
            Why::UnknownKid => timing.last_unknown_kid = Some(now),
            Why::Due if now < timing.due => return false,
            Why::Due => {}
        }
        let outcome = self.fetch_keys().await;
        let label = [self.issuer.as_str()];
        match outcome {
            Ok((mut set, max_age)) => {
                timing.generation += 1;
                set.generation = timing.generation;
                *self.set.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
                timing.failures = 0;
                timing.due = Instant::now() + max_age;
                metrics.oidc_up.with_label_values(&label).set(1);
                metrics
                    .oidc_refresh
                    .with_label_values(&[self.issuer.as_str(), "ok"])
                    .inc();
                true
            }
            Err(e) => {
                timing.failures += 1;
                let backoff = Duration::from_secs(1 << (timing.failures - 1).min(MAX_DOUBLINGS));
                timing.due = Instant::now() + backoff;
                metrics.oidc_up.with_label_values(&label).set(0);
                metrics
                    .oidc_refresh
                    .with_label_values(&[self.issuer.as_str(), "error"])
                    .inc();
                tracing::warn!(
                    issuer = %self.issuer,
                    error = %e,
                    keys_kept = self.loaded(),
                    "cannot fetch the OpenID provider's keys"
                );
                false
            }
        }
    }

    /// Fetches the keys once, keeping nothing (`corral check`): how many are usable, or why none.
    pub(crate) async fn check(&self) -> Result<usize, String> {
        self.fetch_keys().await.map(|(set, _)| set.keys.len())
    }

    /// Discovery, then the JWKS it names, within [`FETCH_DEADLINE`].
    async fn fetch_keys(&self) -> Result<(KeySet, Duration), String> {
        tokio::time::timeout(FETCH_DEADLINE, self.discover_and_fetch())
            .await
            .unwrap_or_else(|_| Err(format!("no keys within {FETCH_DEADLINE:?}")))
    }

    async fn discover_and_fetch(&self) -> Result<(KeySet, Duration), String> {
        let base = self.issuer.trim_end_matches('/');
        let url = format!("{base}/.well-known/openid-configuration");
        let discovery = self.fetch.get(&url).await?;
        let doc: Value = serde_json::from_slice(&discovery.body)
            .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
        let claimed = doc["issuer"].as_str().unwrap_or("");
        if claimed.trim_end_matches('/') != base {
            return Err(format!(
                "{url}: names the issuer `{claimed}`, not `{}`",
                self.issuer
            ));
        }
        let jwks_uri = doc["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{url}: has no jwks_uri"))?;
        if let Some(why) = crate::config::issuer_problem(jwks_uri) {
            return Err(format!("{url}: jwks_uri `{jwks_uri}` {why}"));
        }
        let jwks = self.fetch.get(jwks_uri).await?;
        let set = parse_jwks(&jwks.body).map_err(|e| format!("{jwks_uri}: {e}"))?;
        let max_age = jwks
            .max_age
            .map_or(DEFAULT_MAX_AGE, |a| a.clamp(MIN_MAX_AGE, MAX_MAX_AGE));
        Ok((set, max_age))
    }
}

/// The signing keys of a JWKS that corral can use; others (encryption keys, other algorithms)
/// are skipped. None usable is an error.
fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
    let mut keys = HashMap::new();
    for raw in set.keys {
        if raw["use"].as_str().is_some_and(|u| u != "sig") {
            continue;
        }
        let Some(kid) = raw["kid"].as_str().map(str::to_string) else {
            continue;
        };
        let Some(alg) = algorithm_of(&raw) else {
            continue;
        };
        let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(raw) else {
            continue;
        };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            keys.insert(kid, (alg, key));
        }
    }
    if keys.is_empty() {
        return Err("no RS256, ES256 or EdDSA signing key with a kid".into());
    }
    Ok(KeySet {
        keys,
        generation: 0,
    })
}

/// The algorithm a JWK is for: its `alg`, else what its type implies; only RS256, ES256, EdDSA.
fn algorithm_of(jwk: &Value) -> Option<Algorithm> {
    let implied = match (jwk["kty"].as_str()?, jwk["crv"].as_str()) {
        ("RSA", _) => Algorithm::RS256,
        ("EC", Some("P-256")) => Algorithm::ES256,
        ("OKP", Some("Ed25519")) => Algorithm::EdDSA,
        _ => return None,
    };
    match jwk["alg"].as_str() {
        None => Some(implied),
        Some("RS256") if implied == Algorithm::RS256 => Some(implied),
        Some("ES256") if implied == Algorithm::ES256 => Some(implied),
        Some("EdDSA") if implied == Algorithm::EdDSA => Some(implied),
        Some(_) => None,
    }
}

/// One `[auth.oidc.NAME]`.
pub(crate) struct Provider {
    pub(crate) name: String,
    audience: String,
    claim_path: Vec<String>,
    teams: Vec<(String, String)>,
    pub(crate) keys: Arc<Keys>,
    /// Tokens verified under this provider's settings (a reload makes a new provider, so a
    /// changed audience or team table applies to every token at once), by key generation.
    verified: VerifiedCache,
}

impl Provider {
    pub(crate) fn new(name: &str, cfg: &OidcConfig, make: &MakeFetch) -> Result<Provider, String> {
        let fetch = make(&cfg.ca_file).map_err(|e| format!("auth.oidc.{name}: {e}"))?;
        Ok(Provider {
            name: name.to_string(),
            audience: cfg.audience.clone(),
            claim_path: cfg.team_claim.split('.').map(str::to_string).collect(),
            teams: cfg.teams.clone(),
            keys: Arc::new(Keys::new(&cfg.issuer, cfg.ca_file.clone(), fetch)),
            verified: VerifiedCache::default(),
        })
    }

    /// Whether `iss` is this provider's issuer (a trailing slash aside).
    pub(crate) fn issues(&self, iss: &str) -> bool {
        iss.trim_end_matches('/') == self.keys.issuer.trim_end_matches('/')
    }

    /// Keeps the keys `earlier` fetched when it has the same issuer and CA file.
    pub(crate) fn keep_keys(&mut self, earlier: &Provider) {
        if earlier.keys.issuer == self.keys.issuer && earlier.keys.ca_file == self.keys.ca_file {
            self.keys = earlier.keys.clone();
        }
    }

    /// Verifies a token with the keys at hand: no fetch. `IdpUnavailable` until keys loaded,
    /// `UnknownKid` for a kid they do not have.
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<Arc<Identity>, AuthFailure> {
        let set = self.keys.current().ok_or(AuthFailure::IdpUnavailable)?;
        let identity = self
            .verified
            .get_or_insert(set.generation, token, || self.verify_signature(&set, token))?;
        if identity
            .expires_at
            .is_some_and(|exp| now > exp.saturating_add(LEEWAY))
        {
            return Err(AuthFailure::Expired);
        }
        Ok(identity)
    }

    fn verify_signature(&self, set: &KeySet, token: &str) -> Result<Identity, AuthFailure> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        if !matches!(
            header.alg,
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA
        ) {
            return Err(AuthFailure::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(AuthFailure::UnknownKid)?;
        let (alg, key) = set.keys.get(&kid).ok_or(AuthFailure::UnknownKid)?;
        if *alg != header.alg {
            return Err(AuthFailure::WrongAlgorithm);
        }
        let mut validation = Validation::new(*alg);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthFailure::BadSignature,
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
                _ => AuthFailure::Malformed,
            })?;
        let claims = Value::Object(data.claims);
        // The issuer was matched on the unverified token; now the signature holds, check again.
        if !claims["iss"].as_str().is_some_and(|iss| self.issues(iss)) {
            return Err(AuthFailure::UnknownIssuer);
        }
        let team = self.team_of(&claims).ok_or(AuthFailure::NoTeam)?;
        Ok(Identity {
            team,
            key_id: key_id(&claims, token),
            kid: format!("oidc:{}:{kid}", self.name),
            models: None,
            expires_at: claims["exp"].as_u64(),
        })
    }

    /// The first team of the table whose claim value the token holds.
    fn team_of(&self, claims: &Value) -> Option<String> {
        let held = self
            .claim_path
            .iter()
            .try_fold(claims, |v, part| v.get(part))?;
        let values: Vec<&str> = match held {
            Value::String(s) => vec![s.as_str()],
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            _ => return None,
        };
        self.teams
            .iter()
            .find(|(value, _)| values.contains(&value.as_str()))
            .map(|(_, team)| team.clone())
    }
}

/// The id the log and revocation use: the token's `jti` when it is plain, else the first 32 hex
/// digits of the token's SHA-256.
fn key_id(claims: &Value, token: &str) -> String {
    match claims["jti"].as_str() {
        Some(jti)
            if (1..=64).contains(&jti.len())
                && jti
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
        {
            jti.to_string()
        }
        _ => Sha256::digest(token.as_bytes())[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

/// The `iss` a token claims, unverified (to find its provider); `None` for a token without one
/// (corral's own keys) or that is not a JWT.
pub(crate) fn claimed_issuer(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    jsonwebtoken::dangerous::insecure_decode::<Iss>(token)
        .ok()?
        .claims
        .iss
}

#[cfg(test)]
#[path = "tests/oidc.rs"]
mod tests;
