//! Who may do what, and how much: verification keys, revocation list, teams and their policy,
//! per-team limits, and the caps on what the gateway holds at once. Uses `api`, `config`,
//! `ollama` and `clock`; knows nothing of pingora.
//!
//! `Access` is built whole from a [`Config`] and swapped whole on reload, so a request sees one
//! consistent version and a bad new configuration never half-applies.

pub mod auth;
pub(crate) mod caps;
pub mod keys;
pub mod limits;
pub(crate) mod oidc;
pub mod policy;
pub(crate) mod shared;

use crate::access::auth::{AuthFailure, Identity, Verifier};
use crate::access::oidc::{MakeFetch, Provider, Why};
use crate::access::policy::Team;
use crate::config::Config;
use crate::telemetry::metrics::Metrics;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub(crate) struct Access {
    pub(crate) verifier: Verifier,
    /// `[auth.oidc.*]`: identity providers whose tokens are accepted beside corral's keys.
    pub(crate) oidc: Vec<Provider>,
    pub(crate) teams: HashMap<String, Arc<Team>>,
    /// Where the revocation list was read from.
    pub(crate) revoked_file: PathBuf,
}

impl Access {
    /// Loads the key files and the revocation list. Every problem names its key and file.
    /// `make_fetch` makes what fetches each identity provider's keys.
    pub(crate) fn from_config(
        cfg: &Config,
        make_fetch: &MakeFetch,
    ) -> Result<(Access, Vec<String>), Vec<String>> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let mut keys = HashMap::new();
        for (i, path) in cfg.auth.verify_keys.iter().enumerate() {
            let at = format!("auth.verify_keys[{i}] = \"{}\"", path.display());
            let Some(kid) = crate::access::keys::kid_of(path) else {
                problems.push(format!(
                    "{at}: the file name must give the key id (ID.pub.pem)"
                ));
                continue;
            };
            match crate::access::keys::load_verify_key(path) {
                Ok(key) => {
                    if keys.insert(kid.clone(), key).is_some() {
                        problems.push(format!("{at}: a second key with the id `{kid}`"));
                    }
                }
                Err(e) => problems.push(format!("{at}: {e}")),
            }
        }
        let mut oidc = Vec::new();
        for (name, o) in &cfg.auth.oidc {
            match Provider::new(name, o, make_fetch) {
                Ok(p) => oidc.push(p),
                Err(e) => problems.push(e),
            }
        }
        if cfg.auth.verify_keys.is_empty() && oidc.is_empty() {
            warnings.push(
                "auth.verify_keys is empty: every API key is refused (only public routes work)"
                    .to_string(),
            );
        }
        if cfg.teams.is_empty() {
            warnings.push(
                "no [teams.*] configured: every API key is refused (only public routes work)"
                    .to_string(),
            );
        }
        let revoked = match read_revoked(&cfg.auth.revoked_file) {
            Ok(r) => r,
            Err(e) => {
                problems.push(e);
                HashSet::new()
            }
        };
        if !cfg.auth.revoked_file.as_os_str().is_empty() && !cfg.auth.revoked_file.exists() {
            warnings.push(format!(
                "auth.revoked_file = \"{}\" does not exist yet: no key is revoked (`corral keys revoke` creates it)",
                cfg.auth.revoked_file.display()
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let teams = cfg
            .teams
            .iter()
            .map(|(name, t)| (name.clone(), Arc::new(Team::new(name, t))))
            .collect();
        Ok((
            Access {
                verifier: Verifier::new(keys, revoked),
                oidc,
                teams,
                revoked_file: cfg.auth.revoked_file.clone(),
            },
            warnings,
        ))
    }

    /// Verifies a key (corral's, or an identity provider's token) and finds its team. A token
    /// whose provider's keys lack its `kid` (or have not loaded) has them fetched once more,
    /// within the provider's rate limit.
    pub(crate) async fn identify(
        &self,
        token: &str,
        now: u64,
        metrics: &Metrics,
    ) -> Result<(Arc<Identity>, Arc<Team>), AuthFailure> {
        let Some(provider) = self.provider_of(token)? else {
            return self.team_of(self.verifier.verify(token, now)?);
        };
        let identity = match provider.verify(token, now) {
            Err(AuthFailure::UnknownKid | AuthFailure::IdpUnavailable)
                if provider.keys.refresh(Why::UnknownKid, metrics).await =>
            {
                provider.verify(token, now)
            }
            verified => verified,
        };
        self.team_of(self.checked(identity)?)
    }

    /// The identity provider a token names as its issuer; `None` for corral's own keys.
    fn provider_of(&self, token: &str) -> Result<Option<&Provider>, AuthFailure> {
        if self.oidc.is_empty() || token.starts_with(crate::access::keys::KEY_PREFIX) {
            return Ok(None);
        }
        match oidc::claimed_issuer(token) {
            None => Ok(None),
            Some(iss) => self
                .oidc
                .iter()
                .find(|p| p.issues(&iss))
                .map(Some)
                .ok_or(AuthFailure::UnknownIssuer),
        }
    }

    /// A provider's verdict, with the revocation list applied (a token's `jti` may be revoked).
    fn checked(
        &self,
        verdict: Result<Arc<Identity>, AuthFailure>,
    ) -> Result<Arc<Identity>, AuthFailure> {
        let identity = verdict?;
        if self.verifier.is_revoked(&identity.key_id) {
            return Err(AuthFailure::Revoked);
        }
        Ok(identity)
    }

    fn team_of(&self, identity: Arc<Identity>) -> Result<(Arc<Identity>, Arc<Team>), AuthFailure> {
        let team = self
            .teams
            .get(&identity.team)
            .ok_or(AuthFailure::UnknownTeam)?;
        Ok((identity, team.clone()))
    }

    /// The files whose change means "reload".
    pub(crate) fn watched_files(cfg: &Config) -> Vec<PathBuf> {
        let mut files = cfg.auth.verify_keys.clone();
        if !cfg.auth.revoked_file.as_os_str().is_empty() {
            files.push(cfg.auth.revoked_file.clone());
        }
        files
    }
}

pub(crate) fn read_revoked(path: &std::path::Path) -> Result<HashSet<String>, String> {
    if path.as_os_str().is_empty() {
        return Ok(HashSet::new());
    }
    match std::fs::read_to_string(path) {
        // Key ids are lowercase hex; an id written by hand in capitals still counts.
        Ok(text) => Ok(crate::access::keys::read_revoked(&text)
            .map(str::to_ascii_lowercase)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(format!(
            "auth.revoked_file = \"{}\": cannot read: {e}",
            path.display()
        )),
    }
}

/// Revocation only grows while corral runs: a list that lost ids (deleted, mis-mounted, caught
/// half-way through a rewrite, edited by mistake) would otherwise bring those keys back to life.
/// `next` keeps every id `running` had revoked; the warning says how many its file dropped.
/// Clearing a revocation on purpose takes a restart.
pub(crate) fn keep_revocations(running: &Access, next: &mut Access) -> Option<String> {
    if next.revoked_file != running.revoked_file {
        return None;
    }
    let dropped = next.verifier.keep_revoked(&running.verifier);
    (dropped > 0).then(|| {
        format!(
            "auth.revoked_file = \"{}\" no longer lists {dropped} revoked key id(s); they stay revoked (restart corral to lift a revocation on purpose)",
            running.revoked_file.display()
        )
    })
}

/// Keeps the keys each identity provider fetched, where `next` has the same provider (issuer
/// and CA file): a reload does not make their tokens wait for a fetch.
pub(crate) fn keep_fetched_keys(running: &Access, next: &mut Access) {
    for provider in &mut next.oidc {
        for earlier in &running.oidc {
            provider.keep_keys(earlier);
        }
    }
}

/// The current [`Access`], shared by all requests and replaced on reload.
pub(crate) struct AccessHandle(RwLock<Arc<Access>>);

impl AccessHandle {
    pub(crate) fn new(access: Access) -> AccessHandle {
        AccessHandle(RwLock::new(Arc::new(access)))
    }

    pub(crate) fn current(&self) -> Arc<Access> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn replace(&self, access: Access) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(access);
    }
}
