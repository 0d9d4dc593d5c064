//! Identity providers' keys, fetched over HTTPS (`[auth.oidc.*]`): the [`Fetch`] the access
//! layer uses, and the background service that fetches each provider's keys when due (at
//! start-up, when their cache time is up, after a failure with backoff).

use crate::access::oidc::{Fetch, Fetched, Why, MAX_DOCUMENT};
use crate::access::AccessHandle;
use crate::telemetry::metrics::Metrics;
use crate::upstream::client::{exchange, Failed};
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Connecting, and each read, of a fetch (the access layer bounds discovery and JWKS together).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches a provider's documents over pingora's connector, trusting the system's CAs or, with
/// `ca_file`, that file's only.
pub(crate) struct HttpFetch {
    connector: Connector,
}

/// The [`MakeFetch`](crate::access::oidc::MakeFetch) of a running gateway.
pub(crate) fn make_fetch(ca_file: &Path) -> Result<Arc<dyn Fetch>, String> {
    let mut options = ConnectorOptions::new(0);
    if !ca_file.as_os_str().is_empty() {
        check_ca_file(ca_file)?;
        options.ca_file = Some(ca_file.display().to_string());
    }
    Ok(Arc::new(HttpFetch {
        connector: Connector::new(Some(options)),
    }))
}

/// pingora panics on a CA file it cannot read; read it first, the same way, and say what is wrong.
fn check_ca_file(path: &Path) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let at = format!("ca_file = \"{}\"", path.display());
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{at}: cannot read it ({e})"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{at}: not PEM certificates ({e})"))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{at}: holds no CA certificate"));
    }
    Ok(())
}

#[async_trait]
impl Fetch for HttpFetch {
    async fn get(&self, url: &str) -> Result<Fetched, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let tls = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("{url}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {host} has no address"))?;
        let mut peer = HttpPeer::new(addr, tls, name.to_string());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.total_connection_timeout = Some(CONNECT_TIMEOUT);
        peer.options.read_timeout = Some(READ_TIMEOUT);
        peer.options.write_timeout = Some(READ_TIMEOUT);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = RequestHeader::build("GET", path.as_bytes(), None)
            .map_err(|e| format!("{url}: {e}"))?;
        let authority = uri.authority().map_or(host, |a| a.as_str());
        let _ = req.insert_header("host", authority);
        let _ = req.insert_header("accept", "application/json");
        let mut body = BytesMut::new();
        let answer = exchange(&self.connector, &peer, req, None, |chunk| {
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(format!("the answer is larger than {MAX_DOCUMENT} bytes"));
            }
            body.extend_from_slice(chunk);
            Ok(())
        })
        .await
        .map_err(|e| match e {
            Failed::Connect(etype) => format!("{url}: cannot connect ({etype})"),
            Failed::Other(e) => format!("{url}: {e}"),
        })?;
        if answer.status != 200 {
            return Err(format!("{url}: HTTP {}", answer.status.as_u16()));
        }
        let max_age = answer
            .headers
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(max_age);
        Ok(Fetched {
            body: body.freeze(),
            max_age,
        })
    }
}

/// `max-age=N` of a Cache-Control value (`no-store`/`no-cache` count as 0).
fn max_age(value: &str) -> Option<Duration> {
    value.split(',').map(str::trim).find_map(|d| {
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        let (name, secs) = d.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| secs.trim().trim_matches('"').parse().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

/// Fetches each provider's keys when due (checked every second).
pub(crate) struct KeyKeeper {
    pub(crate) access: Arc<AccessHandle>,
    pub(crate) metrics: Arc<Metrics>,
}

#[async_trait]
impl BackgroundService for KeyKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            // Each provider on its own: one that hangs delays no other. A fetch in progress holds
            // its provider's lock, so `due` is false for it meanwhile.
            for provider in &self.access.current().oidc {
                if provider.keys.due() {
                    let (keys, metrics) = (provider.keys.clone(), self.metrics.clone());
                    tokio::spawn(async move { keys.refresh(Why::Due, &metrics).await });
                }
            }
            if !crate::clock::pause(Duration::from_secs(1), &mut shutdown).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(max_age("MAX-AGE = 60"), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }

    #[test]
    fn a_ca_file_that_is_not_certificates_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, "not a certificate").unwrap();
        let e = make_fetch(&file).err().unwrap();
        assert!(e.contains("no CA certificate"), "{e}");
        let e = make_fetch(&dir.path().join("none.pem")).err().unwrap();
        assert!(e.contains("cannot read"), "{e}");
        let ca = crate::dev::devcert::DevCa::new("test CA").unwrap();
        std::fs::write(&file, ca.cert_pem()).unwrap();
        assert!(make_fetch(&file).is_ok());
    }
}
