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
pub mod policy;
pub(crate) mod shared;

use crate::access::auth::{AuthFailure, Identity, Verifier};
use crate::access::policy::Team;
use crate::config::Config;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub(crate) struct Access {
    pub(crate) verifier: Verifier,
    pub(crate) teams: HashMap<String, Arc<Team>>,
    /// Where the revocation list was read from.
    pub(crate) revoked_file: PathBuf,
}

impl Access {
    /// Loads the key files and the revocation list. Every problem names its key and file.
    pub(crate) fn from_config(cfg: &Config) -> Result<(Access, Vec<String>), Vec<String>> {
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
        if cfg.auth.verify_keys.is_empty() {
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
                teams,
                revoked_file: cfg.auth.revoked_file.clone(),
            },
            warnings,
        ))
    }

    /// Verifies a key and finds its team.
    pub(crate) fn authenticate(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(Arc<Identity>, Arc<Team>), AuthFailure> {
        let identity = self.verifier.verify(token, now)?;
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

fn read_revoked(path: &std::path::Path) -> Result<HashSet<String>, String> {
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
