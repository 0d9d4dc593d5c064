//! A bare pingora proxy, for `benches/compare.rs` only: pingora's minimal `ProxyHttp` (a
//! Bearer key compared with one expected value, one upstream) with the same TLS library
//! (rustls, HTTP/2 offered), the same release profile and the same runtime settings as
//! `corral serve` (one single-threaded runtime per core). Beside corral it separates the cost of
//! pingora from the cost of corral's own hooks. Never on corral's request path.

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use std::net::SocketAddr;
use std::path::Path;

struct Bare {
    upstream: SocketAddr,
    /// `Bearer <key>`.
    expected: Vec<u8>,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let authorized = session
            .req_header()
            .headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == self.expected.as_slice());
        if !authorized {
            session.respond_error(401).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

/// Serves until killed: TLS on `listen` with the PEM `cert` and `key`, forwarding requests that
/// carry `Bearer <api_key>` to `upstream` (plain HTTP/1.1).
pub fn run(
    listen: SocketAddr,
    upstream: SocketAddr,
    cert: &Path,
    key: &Path,
    api_key: &str,
) -> Result<(), String> {
    let conf = ServerConf {
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare {
            upstream,
            expected: format!("Bearer {api_key}").into_bytes(),
        },
    );
    let mut tls = TlsSettings::intermediate(
        cert.to_str().ok_or("the certificate path is not UTF-8")?,
        key.to_str().ok_or("the key path is not UTF-8")?,
    )
    .map_err(|e| e.to_string())?;
    tls.enable_h2();
    proxy.add_tls_with_settings(&listen.to_string(), None, tls);
    server.add_service(proxy);
    server.run_forever()
}
