//! Key management: Ed25519 signing key pairs, issuing API keys, reading them back, revoking them,
//! and the ledger of issued keys. The signing key stays with the operator; gateways get only the
//! public half.

use crate::access::auth::Claims;
pub(crate) use crate::config::kid_of;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What every issued key starts with, so secret scanners can tell a leaked corral key (README,
/// "Keys and secret scanners"). Gateways strip it before verifying; keys without it still work.
pub const KEY_PREFIX: &str = "corral_";

/// The key without [`KEY_PREFIX`].
pub(crate) fn unprefixed(key: &str) -> &str {
    key.strip_prefix(KEY_PREFIX).unwrap_or(key)
}

/// A key id for `keys init`: letters, digits, '.', '-', '_'.
pub(crate) fn valid_kid(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Writes `DIR/ID.key.pem` (PKCS#8 v1, mode 0600) and `DIR/ID.pub.pem`; never overwrites.
pub fn init(dir: &Path, id: &str) -> Result<(PathBuf, PathBuf), String> {
    if !valid_kid(id) {
        return Err(format!(
            "--id `{id}`: use letters, digits, '.', '-' and '_'"
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (private, public) = (
        dir.join(format!("{id}.key.pem")),
        dir.join(format!("{id}.pub.pem")),
    );
    for p in [&private, &public] {
        if p.exists() {
            return Err(format!(
                "{} exists; pick another --id (keys are never overwritten)",
                p.display()
            ));
        }
    }
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| e.to_string())?;
    let der = pkcs8_v1(&pair.serialize_der())?;
    write_new(&private, pem("PRIVATE KEY", &der).as_bytes(), 0o600)?;
    write_new(&public, pair.public_key_pem().as_bytes(), 0o644)?;
    Ok((private, public))
}

/// The PKCS#8 v1 form (RFC 8410 section 7: the seed alone) of an Ed25519 key in PKCS#8 v2 (seed
/// and public key, what ring writes). OpenSSL 3.0 and Python's `cryptography` read only v1;
/// jsonwebtoken reads both, so keys written before stay usable.
fn pkcs8_v1(v2: &[u8]) -> Result<Vec<u8>, String> {
    // SEQUENCE { INTEGER version, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
    const V1_HEAD: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    // The same fields in v2 (ring's), after the outer SEQUENCE's tag and length: version 1, the
    // algorithm, the seed; the public key follows.
    const V2_FIELDS: [u8; 14] = [
        0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let seed = v2
        .strip_prefix(&[0x30])
        .and_then(|rest| rest.get(1..))
        .and_then(|rest| rest.strip_prefix(&V2_FIELDS))
        .and_then(|rest| rest.get(..32))
        .ok_or("the generated Ed25519 key has an unexpected encoding")?;
    Ok([&V1_HEAD[..], seed].concat())
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Loads a public verification key (`auth.verify_keys`).
pub fn load_verify_key(path: &Path) -> Result<DecodingKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))?;
    DecodingKey::from_ed_pem(&pem)
        .map_err(|_| "not an Ed25519 public key in PEM (`corral keys init` writes one)".to_string())
}

/// What `keys issue` puts in a key.
#[derive(Debug, Default, Clone)]
pub struct IssueRequest {
    pub team: String,
    pub name: Option<String>,
    pub models: Option<Vec<String>>,
    pub expires_in: Option<Duration>,
}

/// Signs a new API key with the signing key file; its kid is the file's.
pub fn issue(signing_key: &Path, req: &IssueRequest, now: u64) -> Result<(String, Claims), String> {
    let kid = kid_of(signing_key).ok_or("the signing key file needs a name like ID.key.pem")?;
    let pem = std::fs::read(signing_key)
        .map_err(|e| format!("{}: cannot read: {e}", signing_key.display()))?;
    let key = EncodingKey::from_ed_pem(&pem).map_err(|_| {
        format!(
            "{}: not an Ed25519 private key in PEM (`corral keys init` writes one)",
            signing_key.display()
        )
    })?;
    let claims = Claims {
        sub: req.team.clone(),
        jti: new_key_id()?,
        iat: now,
        exp: req.expires_in.map(|d| now + d.as_secs()),
        nbf: None,
        models: req.models.clone(),
        name: req.name.clone(),
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())?;
    // Recorded before the key is handed out: a key nobody can list is never issued.
    let ledger = ledger_of(signing_key);
    append_line(&ledger, &Issued::of(&claims, &kid))
        .map_err(|e| format!("{e}; the key was not issued"))?;
    Ok((format!("{KEY_PREFIX}{token}"), claims))
}

/// One line of the ledger beside a signing key: what was issued, never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub id: String,
    pub kid: String,
    pub team: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// RFC 3339, UTC.
    pub issued_at: String,
    /// RFC 3339, UTC; `None`: never expires.
    #[serde(default)]
    pub expires_at: Option<String>,
}

impl Issued {
    fn of(claims: &Claims, kid: &str) -> Issued {
        Issued {
            id: claims.jti.clone(),
            kid: kid.to_string(),
            team: claims.sub.clone(),
            name: claims.name.clone(),
            models: claims.models.clone(),
            issued_at: rfc3339(claims.iat),
            expires_at: claims.exp.map(rfc3339),
        }
    }

    /// Whether the key has expired at unix time `now`.
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .is_some_and(|exp| now > exp.as_secs())
    }
}

/// Unix seconds as RFC 3339 (UTC, seconds).
pub(crate) fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The ledger of keys issued with a signing key: `DIR/ID.issued.jsonl` beside `DIR/ID.key.pem`.
pub fn ledger_of(signing_key: &Path) -> PathBuf {
    let id = kid_of(signing_key).unwrap_or_default();
    signing_key.with_file_name(format!("{id}.issued.jsonl"))
}

/// Appends one JSON line in a single write (mode 0600 when it creates the file).
fn append_line(file: &Path, record: &Issued) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut line = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| {
            format!(
                "{}: cannot write the ledger of issued keys: {e}",
                file.display()
            )
        })?;
    f.write_all(&line).map_err(|e| {
        format!(
            "{}: cannot write the ledger of issued keys: {e}",
            file.display()
        )
    })
}

/// Reads a ledger. A missing file is an empty ledger; a line that is not a record is an error
/// naming its line.
pub fn read_ledger(file: &Path) -> Result<Vec<Issued>, String> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: cannot read: {e}", file.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: not a key record: {e}", file.display(), i + 1))
        })
        .collect()
}

/// 128 random bits, hex: the `jti` of a new key.
pub fn new_key_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("the system gave no randomness: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The header and claims of a key, NOT verified (for `inspect` and `revoke`).
pub fn peek(token: &str) -> Result<(Header, Claims), String> {
    let token = unprefixed(token);
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| "not a corral API key (not a JWT)".to_string())?;
    let data = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
        .map_err(|e| format!("the key's claims cannot be read: {e}"))?;
    Ok((header, data.claims))
}

/// Reads a revocation list: one key id per line; blank lines and `#` comments ignored.
pub(crate) fn read_revoked(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

/// Refuses what cannot be a key id: a corral key's id is what `keys issue` makes, 32 hex digits;
/// with `sso`, the id of a single sign-on token as the access log shows it (its `jti`: 1-64 of
/// letters, digits, '.', '-', '_').
pub(crate) fn check_key_id(key_id: &str, sso: bool) -> Result<(), String> {
    let corral = key_id.len() == 32 && key_id.bytes().all(|b| b.is_ascii_hexdigit());
    let plain = (1..=64).contains(&key_id.len())
        && key_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if corral || (sso && plain) {
        Ok(())
    } else if sso {
        Err(format!(
            "`{key_id}` is not a token id (1-64 letters, digits, '.', '-', '_', as the access log's key_id shows)"
        ))
    } else {
        Err(format!(
            "`{key_id}` is neither an API key nor a key id (32 hex digits, as `corral keys inspect` shows; a single sign-on token's id needs --sso)"
        ))
    }
}

/// Appends a key id to the revocation list (creating it). `Ok(false)` if it was already there.
/// `sso`: the id of a single sign-on token (see [`check_key_id`]).
pub(crate) fn revoke(file: &Path, key_id: &str, sso: bool) -> Result<bool, String> {
    check_key_id(key_id, sso)?;
    // Ids are kept lowercase (and compared so).
    let key_id = &key_id.to_ascii_lowercase();
    let existing = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: cannot read: {e}", file.display())),
    };
    if read_revoked(&existing).any(|id| id == key_id) {
        return Ok(false);
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| format!("{}: cannot write: {e}", file.display()))?;
    let sep = if existing.is_empty() || existing.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    f.write_all(format!("{sep}{key_id}\n").as_bytes())
        .map_err(|e| format!("{}: cannot write: {e}", file.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_is_the_file_name_without_suffixes() {
        assert_eq!(
            kid_of(Path::new("/etc/corral/keys/corral-2026.pub.pem")).as_deref(),
            Some("corral-2026")
        );
        assert_eq!(
            kid_of(Path::new("corral-2026.key.pem")).as_deref(),
            Some("corral-2026")
        );
        assert_eq!(kid_of(Path::new("k1.pem")).as_deref(), Some("k1"));
        assert_eq!(kid_of(Path::new(".pem")), None);
    }

    #[test]
    fn init_issue_and_verify_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = init(dir.path(), "test-1").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(init(dir.path(), "test-1").unwrap_err().contains("exists"));

        let req = IssueRequest {
            team: "research".into(),
            models: Some(vec!["llama3.2:*".into()]),
            ..Default::default()
        };
        let (token, claims) = issue(&private, &req, crate::clock::unix_now()).unwrap();
        assert_eq!(claims.sub, "research");
        assert_eq!(claims.jti.len(), 32);
        let (header, peeked) = peek(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("test-1"));
        assert_eq!(peeked, claims);

        let key = load_verify_key(&public).unwrap();
        let verifier = crate::access::auth::Verifier::new(
            [("test-1".to_string(), key)].into(),
            Default::default(),
        );
        let id = verifier.verify(&token, crate::clock::unix_now()).unwrap();
        assert_eq!(id.team, "research");
        assert_eq!(id.key_id, claims.jti);
    }

    /// A signing key `keys init` wrote before it wrote PKCS#8 v1 (ring's v2, with the public
    /// key), made for this test only.
    const V2_KEY: &str = "-----BEGIN PRIVATE KEY-----
MFECAQEwBQYDK2VwBCIEIJGe0af4flwzLpMGlThhBo5M8TFGHGqWRGFHrZ8GTz1w
gSEAxqg7pWVDg3MIXVLz+73pwBQMfQ1/immpe+4dbTfGgW8=
-----END PRIVATE KEY-----
";
    const V2_PUB: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAxqg7pWVDg3MIXVLz+73pwBQMfQ1/immpe+4dbTfGgW8=
-----END PUBLIC KEY-----
";

    #[test]
    fn new_signing_keys_are_pkcs8_v1_and_v2_keys_still_sign() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = init(dir.path(), "v1").unwrap();
        let text = std::fs::read_to_string(&private).unwrap();
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        // RFC 8410: SEQUENCE of 46 bytes, version 0, the Ed25519 OID, the 32-byte seed; no more.
        assert_eq!(der.len(), 48);
        assert_eq!(&der[..5], [0x30, 0x2e, 0x02, 0x01, 0x00]);

        std::fs::write(dir.path().join("old.key.pem"), V2_KEY).unwrap();
        std::fs::write(dir.path().join("old.pub.pem"), V2_PUB).unwrap();
        let req = IssueRequest {
            team: "t".into(),
            ..Default::default()
        };
        let now = crate::clock::unix_now();
        let (token, claims) = issue(&dir.path().join("old.key.pem"), &req, now).unwrap();
        let key = load_verify_key(&dir.path().join("old.pub.pem")).unwrap();
        let verifier = crate::access::auth::Verifier::new(
            [("old".to_string(), key)].into(),
            Default::default(),
        );
        assert_eq!(verifier.verify(&token, now).unwrap().key_id, claims.jti);
    }

    #[test]
    fn issued_keys_carry_the_prefix_and_verify_with_or_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = init(dir.path(), "k").unwrap();
        let now = crate::clock::unix_now();
        let req = IssueRequest {
            team: "t".into(),
            ..Default::default()
        };
        let (token, claims) = issue(&private, &req, now).unwrap();
        let bare = token.strip_prefix(KEY_PREFIX).unwrap();
        assert!(bare.starts_with("eyJ"), "a JWT follows the prefix");
        let key = load_verify_key(&public).unwrap();
        let verifier =
            crate::access::auth::Verifier::new([("k".to_string(), key)].into(), Default::default());
        for t in [token.as_str(), bare] {
            assert_eq!(verifier.verify(t, now).unwrap().key_id, claims.jti);
            assert_eq!(peek(t).unwrap().1, claims);
        }
        // The prefix is stripped once: a key with it twice is not a key.
        assert!(verifier
            .verify(&format!("{KEY_PREFIX}{token}"), now)
            .is_err());
    }

    #[test]
    fn the_ledger_records_every_issued_key_and_never_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = init(dir.path(), "k").unwrap();
        let now = crate::clock::unix_now();
        let mut keys = Vec::new();
        for (team, expires) in [("a", Some(60)), ("b", None)] {
            let req = IssueRequest {
                team: team.into(),
                name: Some(format!("{team}-app")),
                models: Some(vec!["llama3.2:*".into()]),
                expires_in: expires.map(Duration::from_secs),
            };
            keys.push(issue(&private, &req, now).unwrap());
        }
        let ledger = ledger_of(&private);
        assert_eq!(ledger, dir.path().join("k.issued.jsonl"));
        let text = std::fs::read_to_string(&ledger).unwrap();
        for (token, _) in &keys {
            let signature = token.rsplit('.').next().unwrap();
            assert!(!text.contains(signature), "the ledger holds a key");
        }
        let records = read_ledger(&ledger).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].id, keys[0].1.jti);
        assert_eq!(
            (records[0].team.as_str(), records[0].kid.as_str()),
            ("a", "k")
        );
        assert_eq!(records[0].name.as_deref(), Some("a-app"));
        assert!(!records[0].expired(now) && records[0].expired(now + 61));
        assert!(records[1].expires_at.is_none() && !records[1].expired(u64::MAX / 2));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&ledger).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A damaged line is named, not skipped.
        std::fs::write(&ledger, format!("{text}not json\n")).unwrap();
        assert!(read_ledger(&ledger)
            .unwrap_err()
            .contains("k.issued.jsonl:3"));
        assert!(read_ledger(&dir.path().join("none.jsonl"))
            .unwrap()
            .is_empty());
    }

    fn revoke_id(file: &Path, id: &str) -> Result<bool, String> {
        revoke(file, id, false)
    }

    #[test]
    fn single_sign_on_token_ids_are_revoked_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revoked.txt");
        assert!(
            revoke(&file, "AT.Okta_jti-1", false).is_err(),
            "a typo guard for corral ids"
        );
        assert!(revoke(&file, "AT.Okta_jti-1", true).unwrap());
        assert!(
            !revoke(&file, "at.okta_JTI-1", true).unwrap(),
            "the same id"
        );
        for bad in ["has space", "", &"a".repeat(65), "a/b"] {
            assert!(revoke(&file, bad, true).is_err(), "{bad}");
        }
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(read_revoked(&text).collect::<Vec<_>>(), ["at.okta_jti-1"]);
    }

    #[test]
    fn revocation_list_appends_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revoked.txt");
        let (a, d) = ("a".repeat(32), "d".repeat(32));
        assert!(revoke_id(&file, &a).unwrap());
        assert!(!revoke_id(&file, &a).unwrap());
        assert!(!revoke_id(&file, &a.to_uppercase()).unwrap(), "the same id");
        std::fs::write(&file, format!("# comment\n{a} # first\n\nxyz")).unwrap();
        assert!(revoke_id(&file, &d.to_uppercase()).unwrap());
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(read_revoked(&text).collect::<Vec<_>>(), [&a, "xyz", &d]);
        for bad in ["has space", "notakey", "abc", &"g".repeat(32)] {
            assert!(revoke_id(&file, bad).is_err(), "{bad}");
        }
    }
}
