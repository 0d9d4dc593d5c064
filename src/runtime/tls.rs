//! TLS for the public listener: PEM loading with errors that name the file, a certificate store
//! that pingora's rustls listener asks on every handshake, and a watcher that swaps in a new
//! certificate when its files change (no restart, no dropped connections).

use crate::runtime::watch::{Snapshot, WATCH_INTERVAL};
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{key} = \"{path}\": cannot read the file: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} = \"{path}\": no PEM certificate in the file (expected \"-----BEGIN CERTIFICATE-----\")")]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("{key} = \"{path}\": no PEM private key in the file (expected PKCS#8, PKCS#1 or SEC1 \"-----BEGIN ... PRIVATE KEY-----\")")]
    NoKey { key: &'static str, path: PathBuf },
    #[error("{key} = \"{path}\": the private key cannot be used: {reason}")]
    BadKey {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("server.tls_key = \"{key}\" does not belong to the certificate in server.tls_cert = \"{cert}\"")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot make a self-signed certificate for the loopback listener: {0}")]
    Throwaway(String),
    #[error("cannot set up the TLS listener: {0}")]
    Listener(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks a certificate chain and its private key.
pub(crate) fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |k: &'static str, p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            key: k,
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_pem = read("server.tls_cert", cert)?;
    let key_pem = read("server.tls_key", key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            key: "server.tls_cert",
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
        key: "server.tls_key",
        path: key.to_path_buf(),
    })?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        },
        other => TlsError::BadKey {
            key: "server.tls_key",
            path: key.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// The names a client on this machine reaches corral by: what local certificates are for.
pub(crate) const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A self-signed certificate for the [`LOOPBACK_NAMES`], made at start-up when no certificate is
/// configured (loopback listeners only).
pub(crate) fn throwaway_localhost() -> Result<CertifiedKey, TlsError> {
    let names: Vec<String> = LOOPBACK_NAMES.iter().map(|n| n.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| TlsError::Throwaway(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    CertifiedKey::from_der(vec![generated.cert.der().clone()], key, &provider())
        .map_err(|e| TlsError::Throwaway(e.to_string()))
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    seen: Mutex<Snapshot>,
}

/// The certificate the TLS listener serves, swappable at run time.
pub(crate) struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    files: Option<Files>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.files.as_ref().map(|f| &f.cert))
            .finish()
    }
}

impl CertStore {
    pub(crate) fn from_files(cert: &Path, key: &Path) -> Result<CertStore, TlsError> {
        let seen = Snapshot::of([cert, key]);
        let pair = load_pair(cert, key)?;
        Ok(CertStore {
            current: RwLock::new(Arc::new(pair)),
            files: Some(Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                seen: Mutex::new(seen),
            }),
        })
    }

    pub(crate) fn throwaway() -> Result<CertStore, TlsError> {
        Ok(CertStore {
            current: RwLock::new(Arc::new(throwaway_localhost()?)),
            files: None,
        })
    }

    pub(crate) fn watches_files(&self) -> bool {
        self.files.is_some()
    }

    /// Reads the files again if they changed since last time. `Ok(true)`: a new certificate is
    /// in use. On error the old certificate stays in use.
    pub(crate) fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let now = Snapshot::of([&files.cert, &files.key]);
        {
            let mut seen = files.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return Ok(false);
            }
            // Remember this state even if loading fails: a half-written pair (certificate
            // replaced, key not yet) is retried as soon as the other file changes too.
            *seen = now;
        }
        self.reload_from(&files.cert, &files.key)?;
        Ok(true)
    }

    /// Reads the files again unconditionally (SIGHUP).
    pub(crate) fn reload(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        *files.seen.lock().unwrap_or_else(|e| e.into_inner()) =
            Snapshot::of([&files.cert, &files.key]);
        self.reload_from(&files.cert, &files.key)?;
        Ok(true)
    }

    fn reload_from(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let pair = Arc::new(load_pair(cert, key)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
        Ok(())
    }

    /// Listener settings: this store answers every handshake; ALPN offers h2 and http/1.1.
    pub(crate) fn tls_settings(self: &Arc<Self>) -> Result<TlsSettings, TlsError> {
        let mut settings =
            TlsSettings::intermediate("", "").map_err(|e| TlsError::Listener(e.to_string()))?;
        settings.set_cert_resolver(self.clone());
        settings.enable_h2();
        Ok(settings)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Logs what a reload of the certificate did.
pub(crate) fn log_reload(result: Result<bool, TlsError>) {
    match result {
        Ok(true) => tracing::info!("TLS certificate reloaded"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays in use")
        }
    }
}

/// Polls the certificate files and swaps in new ones.
pub(crate) struct CertWatcher(pub Arc<CertStore>);

#[async_trait]
impl BackgroundService for CertWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            if !crate::clock::pause(WATCH_INTERVAL, &mut shutdown).await {
                return;
            }
            log_reload(self.0.reload_if_changed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::devcert::DevCa;

    #[test]
    fn loads_a_matching_pair_and_names_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let (cert, key) = ca.issue("first", &["localhost"]).unwrap();
        let (other_cert, other_key) = ca.issue("second", &["localhost"]).unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("a.crt"), &cert).unwrap();
        std::fs::write(p("a.key"), &key).unwrap();
        std::fs::write(p("b.key"), &other_key).unwrap();
        std::fs::write(p("junk"), "hello").unwrap();
        let _ = other_cert;

        assert!(load_pair(&p("a.crt"), &p("a.key")).is_ok());
        let e = load_pair(&p("a.crt"), &p("b.key")).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        let e = load_pair(&p("missing.crt"), &p("a.key"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("server.tls_cert = \"") && e.contains("missing.crt"),
            "{e}"
        );
        let e = load_pair(&p("junk"), &p("a.key")).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = load_pair(&p("a.crt"), &p("junk")).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        // A key file holding a certificate is not a key.
        let e = load_pair(&p("a.crt"), &p("a.crt")).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
    }

    #[test]
    fn reload_swaps_only_on_change_and_keeps_the_old_pair_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let (c1, k1) = ca.issue("first", &["localhost"]).unwrap();
        let (c2, k2) = ca.issue("second", &["localhost"]).unwrap();
        let (cp, kp) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cp, &c1).unwrap();
        std::fs::write(&kp, &k1).unwrap();
        let store = CertStore::from_files(&cp, &kp).unwrap();
        let served = |s: &CertStore| s.current.read().unwrap().cert[0].clone();
        let first = served(&store);
        assert!(!store.reload_if_changed().unwrap());

        // Certificate replaced, key not yet: refused, old pair still served.
        std::fs::write(&cp, &c2).unwrap();
        assert!(store.reload_if_changed().is_err());
        assert_eq!(served(&store), first);
        // Key follows: swapped.
        std::fs::write(&kp, &k2).unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert_ne!(served(&store), first);
    }
}
