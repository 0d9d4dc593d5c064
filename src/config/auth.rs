//! `[auth]`: the keys that verify API keys and the revocation list, and their checks.

use super::units::comma_list;
use super::Problem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Ed25519 public keys (PEM) that verify API keys; the file name gives the key id (`kid`,
    /// see [`kid_of`]).
    #[serde(deserialize_with = "comma_list")]
    pub verify_keys: Vec<PathBuf>,
    /// Revoked key ids (`jti`), one per line. Empty: no revocation list.
    pub revoked_file: PathBuf,
    /// OpenID Connect providers whose tokens are accepted beside corral's own keys, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub oidc: BTreeMap<String, OidcConfig>,
}

/// `[auth.oidc.NAME]`: an identity provider whose access tokens (JWTs) teams may present.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The `iss` of its tokens; discovery at ISSUER/.well-known/openid-configuration. `https://`,
    /// or `http://` on a loopback address.
    pub issuer: String,
    /// What `aud` must hold.
    pub audience: String,
    /// The claim naming the caller's groups (a string or an array of strings); a dotted path
    /// reaches into objects (`realm_access.roles`).
    #[serde(default = "default_team_claim")]
    pub team_claim: String,
    /// Claim value -> corral team, tried in the table's order: the first match wins.
    #[serde(default, with = "ordered_map")]
    pub teams: Vec<(String, String)>,
    /// A PEM file of CA certificates to trust for the issuer (and its jwks_uri) instead of the
    /// system's.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub ca_file: PathBuf,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

fn default_team_claim() -> String {
    "groups".into()
}

/// A TOML table read and written in its order (which team a token with several groups gets).
mod ordered_map {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        pairs: &[(String, String)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(pairs.len()))?;
        for (k, v) in pairs {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, String)>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of claim value = \"team\"")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(pairs)
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// Whether `url` may be an issuer: `https://`, or `http://` on a loopback address.
pub(crate) fn issuer_problem(url: &str) -> Option<&'static str> {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return Some("is not a URL");
    };
    let host = uri.host().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        _ if host.is_empty() => Some("is not a URL with a host"),
        // It is logged and a metric label: no credentials in it.
        _ if uri.authority().is_some_and(|a| a.as_str().contains('@')) => {
            Some("must not hold a user or password")
        }
        Some("https") => None,
        Some("http") if loopback => None,
        Some("http") => Some("must be https:// (http:// only on a loopback address)"),
        _ => Some("must be an https:// URL"),
    }
    .or_else(|| {
        (uri.query().is_some() || url.contains('#')).then_some("must not have a query or fragment")
    })
}

/// The key id of a key file: its name without `.pem` and without `.pub`/`.key`
/// (`corral-2026.pub.pem` and `corral-2026.key.pem` are both `corral-2026`).
pub(crate) fn kid_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let name = name.strip_suffix(".pem").unwrap_or(name);
    let name = name
        .strip_suffix(".pub")
        .or_else(|| name.strip_suffix(".key"))
        .unwrap_or(name);
    (!name.is_empty()).then(|| name.to_string())
}

impl AuthConfig {
    /// Applies `fix` (which makes a relative path relative to the config file) to every path.
    pub(super) fn resolve_paths(&mut self, fix: impl Fn(&mut PathBuf)) {
        fix(&mut self.revoked_file);
        self.verify_keys.iter_mut().for_each(&fix);
        self.oidc.values_mut().for_each(|o| fix(&mut o.ca_file));
    }

    /// Every problem with `[auth]` (the files themselves are read, and checked, at start-up).
    /// `teams` are the configured teams, which the providers' tables must name.
    pub(super) fn check(&self, teams: &[&str], problems: &mut Vec<Problem>) {
        let mut issuers = BTreeMap::new();
        for (name, o) in &self.oidc {
            let key = format!("auth.oidc.{name}");
            if !super::valid_team_name(name) {
                problems.push(Problem::new(
                    &key,
                    "provider names are 1-64 lowercase letters, digits, '-' or '_'",
                ));
            }
            if let Some(why) = issuer_problem(&o.issuer) {
                problems.push(Problem::new(
                    format!("{key}.issuer"),
                    format!("`{}` {why}", o.issuer),
                ));
            }
            if let Some(other) = issuers.insert(o.issuer.trim_end_matches('/'), name) {
                problems.push(Problem::new(
                    format!("{key}.issuer"),
                    format!("auth.oidc.{other} has the same issuer"),
                ));
            }
            if o.audience.trim().is_empty() {
                problems.push(Problem::new(
                    format!("{key}.audience"),
                    "set the audience its tokens carry for corral (their `aud`)",
                ));
            }
            if o.team_claim.split('.').any(str::is_empty) {
                problems.push(Problem::new(
                    format!("{key}.team_claim"),
                    "name a claim, e.g. \"groups\" or \"realm_access.roles\"",
                ));
            }
            if o.teams.is_empty() {
                problems.push(Problem::new(
                    format!("{key}.teams"),
                    "map at least one claim value to a team, e.g. { \"ml-research\" = \"research\" }",
                ));
            }
            for (value, team) in &o.teams {
                if !teams.contains(&team.as_str()) {
                    problems.push(Problem::new(
                        format!("{key}.teams"),
                        format!("`{value}` maps to team `{team}`, which has no [teams.{team}]"),
                    ));
                }
            }
        }
        for (i, path) in self.verify_keys.iter().enumerate() {
            if kid_of(path).is_none() {
                problems.push(Problem::new(
                    format!("auth.verify_keys[{i}]"),
                    "needs a file name that gives the key id, like ID.pub.pem",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{keys, load_str};

    const TEAMS: &str = "[teams.research]\nmodels = [\"*\"]\n[teams.platform]\nmodels = [\"*\"]\n";

    #[test]
    fn an_oidc_provider_keeps_its_team_table_in_order_and_its_claim_values_verbatim() {
        let c = load_str(&format!(
            r#"{TEAMS}
[auth.oidc.corp]
issuer = "https://login.example.com/realms/main"
audience = "corral"
teams = {{ "ML-Research" = "research", "platform.admins" = "platform", "a" = "research" }}
"#
        ))
        .unwrap();
        let o = &c.auth.oidc["corp"];
        assert_eq!(o.team_claim, "groups");
        assert_eq!(
            o.teams,
            [
                ("ML-Research".to_string(), "research".to_string()),
                ("platform.admins".to_string(), "platform".to_string()),
                ("a".to_string(), "research".to_string()),
            ]
        );
        // Written back (corral demo) and read again, it is the same.
        let again = load_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.auth.oidc, c.auth.oidc);
    }

    #[test]
    fn oidc_providers_are_checked() {
        let provider = |issuer: &str, rest: &str| {
            format!("{TEAMS}[auth.oidc.corp]\nissuer = \"{issuer}\"\naudience = \"corral\"\n{rest}")
        };
        let ok = "teams = { g = \"research\" }\n";
        for good in [
            "https://login.example.com",
            "http://127.0.0.1:8080/realms/x",
            "http://localhost:9000",
            "http://[::1]:9000",
        ] {
            assert!(load_str(&provider(good, ok)).is_ok(), "{good}");
        }
        for bad in [
            "http://login.example.com",
            "ftp://x",
            "not a url",
            "https://user:secret@login.example.com",
            "https://x/?a=b",
        ] {
            let e = load_str(&provider(bad, ok)).unwrap_err();
            assert_eq!(keys(&e), ["auth.oidc.corp.issuer"], "{bad}: {e}");
        }
        let e = load_str(&provider("https://x", "teams = { g = \"nosuch\" }\n")).unwrap_err();
        assert_eq!(keys(&e), ["auth.oidc.corp.teams"]);
        assert!(e.to_string().contains("[teams.nosuch]"), "{e}");
        let e = load_str(&provider("https://x", "teams = {}\n")).unwrap_err();
        assert_eq!(keys(&e), ["auth.oidc.corp.teams"]);
        let e = load_str(&provider("https://x", "team_claim = \"a..b\"\n")).unwrap_err();
        assert!(keys(&e).contains(&"auth.oidc.corp.team_claim"), "{e}");
        let e = load_str(&provider(
            "https://x",
            "teams = { g = \"research\" }\nsecret = 1\n",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("secret"), "{e}");
    }
}
