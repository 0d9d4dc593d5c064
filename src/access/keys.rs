//! Key management: Ed25519 signing key pairs, issuing API keys, reading them back, revoking them.
//! The signing key stays with the operator; gateways get only the public half.

use crate::access::auth::Claims;
pub(crate) use crate::config::kid_of;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A key id for `keys init`: letters, digits, '.', '-', '_'.
pub(crate) fn valid_kid(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Writes `DIR/ID.key.pem` (PKCS#8, mode 0600) and `DIR/ID.pub.pem`; never overwrites.
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
    write_new(&private, pair.serialize_pem().as_bytes(), 0o600)?;
    write_new(&public, pair.public_key_pem().as_bytes(), 0o644)?;
    Ok((private, public))
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
    header.kid = Some(kid);
    let token = jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())?;
    Ok((token, claims))
}

/// 128 random bits, hex: the `jti` of a new key.
pub fn new_key_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("the system gave no randomness: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The header and claims of a key, NOT verified (for `inspect` and `revoke`).
pub fn peek(token: &str) -> Result<(Header, Claims), String> {
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

/// Appends a key id to the revocation list (creating it). `Ok(false)` if it was already there.
pub(crate) fn revoke(file: &Path, key_id: &str) -> Result<bool, String> {
    // Key ids are what `keys issue` makes: 32 hex digits (written lowercase).
    if key_id.len() != 32 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`{key_id}` is neither an API key nor a key id (32 hex digits, as `corral keys inspect` shows)"
        ));
    }
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

    #[test]
    fn revocation_list_appends_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revoked.txt");
        let (a, d) = ("a".repeat(32), "d".repeat(32));
        assert!(revoke(&file, &a).unwrap());
        assert!(!revoke(&file, &a).unwrap());
        assert!(!revoke(&file, &a.to_uppercase()).unwrap(), "the same id");
        std::fs::write(&file, format!("# comment\n{a} # first\n\nxyz")).unwrap();
        assert!(revoke(&file, &d.to_uppercase()).unwrap());
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(read_revoked(&text).collect::<Vec<_>>(), [&a, "xyz", &d]);
        for bad in ["has space", "notakey", "abc", &"g".repeat(32)] {
            assert!(revoke(&file, bad).is_err(), "{bad}");
        }
    }
}
