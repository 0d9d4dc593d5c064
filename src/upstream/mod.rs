//! The Ollama servers corral forwards to: the [`Pool`] of nodes (one for `upstream.url`), each
//! with its URL, its resolved address, and the pingora peer (with corral's timeouts) for each
//! request; which node a request goes to (`choose`), their probes, and pinned models.

pub mod choose;
pub(crate) mod client;
pub(crate) mod fair;
pub(crate) mod node;
pub(crate) mod pins;
pub(crate) mod pool;
pub(crate) mod preload;
pub(crate) mod probe;
pub(crate) mod pull;
pub mod queue;
pub(crate) mod show;
pub(crate) mod supervise;

pub(crate) use pool::{Pick, Pool};

use crate::config::{UpstreamConfig, UpstreamUrl};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Duration;

/// How long a body write to Ollama may block; Ollama reads request bodies eagerly.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pooled upstream connections are closed after this long unused.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a DNS upstream name is resolved again (pods and containers move).
const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);

/// The upstream Ollama, with its current address.
pub(crate) struct Upstream {
    pub(crate) url: UpstreamUrl,
    pub(crate) connect_timeout: Duration,
    pub(crate) read_timeout: Duration,
    /// `Host` toward it (`host:port`), made once: each request shares it.
    pub(crate) host_header: http::HeaderValue,
    addr: RwLock<Option<SocketAddr>>,
}

impl Upstream {
    pub(crate) fn new(url: UpstreamUrl, cfg: &UpstreamConfig) -> Upstream {
        let addr = RwLock::new(url.literal());
        // The URL was parsed as a URI: its authority is a valid header value.
        let host_header = http::HeaderValue::from_str(&url.authority())
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        Upstream {
            host_header,
            url,
            connect_timeout: cfg.connect_timeout.0,
            read_timeout: cfg.read_timeout.0,
            addr,
        }
    }

    /// Whether the host is a DNS name that must be resolved (and re-resolved).
    pub(crate) fn needs_dns(&self) -> bool {
        self.url.literal().is_none()
    }

    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        *self.addr.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves the host name now (a no-op for IP literals).
    pub(crate) async fn resolve(&self) -> std::io::Result<SocketAddr> {
        if let Some(a) = self.url.literal() {
            return Ok(a);
        }
        let mut addrs = tokio::net::lookup_host((self.url.host.as_str(), self.url.port)).await?;
        let addr = addrs
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
        *self.addr.write().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        Ok(addr)
    }

    /// The peer for one request, or `None` while the host name has not resolved yet.
    pub(crate) fn peer(&self) -> Option<HttpPeer> {
        let addr = self.addr()?;
        // The host name also names the peer in pingora's errors (and so in corral's logs), TLS
        // or not.
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.connect_timeout);
        o.total_connection_timeout = Some(self.connect_timeout * 2);
        // Each read (the response header included, i.e. a cold model load) may take up to
        // read_timeout; the whole exchange is capped by request_timeout (server.rs sets the cap
        // on the proxy, a corral patch of pingora-proxy).
        o.read_timeout = Some(self.read_timeout);
        o.write_timeout = Some(WRITE_TIMEOUT);
        o.idle_timeout = Some(POOL_IDLE_TIMEOUT);
        // Ollama never upgrades a connection; nobody gets a WebSocket tunnel through corral.
        o.http_upstream_request_policy = HttpUpstreamRequestPolicy::deny_upgrades();
        // Each runtime thread keeps its own pooled connections: a connection is registered with
        // the I/O driver of the thread that opened it, and used from another thread every
        // readiness event would cost a cross-thread wake-up (an eventfd write and a context
        // switch) on both.
        peer.group_key = runtime_thread_key();
        Some(peer)
    }
}

/// This thread's key for the upstream connection pool (see [`Upstream::peer`]).
fn runtime_thread_key() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    KEY.with(|k| *k)
}

/// Keeps a DNS upstream's address fresh.
pub(crate) struct Resolver(pub std::sync::Arc<Upstream>);

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut failures = 0u32;
        loop {
            match self.0.resolve().await {
                Ok(addr) => {
                    if failures > 0 {
                        tracing::info!(host = %self.0.url.host, %addr, "upstream name resolves again");
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 30 == 0 {
                        tracing::warn!(host = %self.0.url.host, error = %e, "cannot resolve the upstream name; requests get 502 until it resolves");
                    }
                }
            }
            let wait = if self.0.addr().is_some() {
                RESOLVE_INTERVAL
            } else {
                Duration::from_secs(1)
            };
            if !crate::clock::pause(wait, &mut shutdown).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_carry_the_configured_timeouts() {
        let cfg = UpstreamConfig {
            connect_timeout: crate::config::HumanDuration::secs(3),
            read_timeout: crate::config::HumanDuration::secs(900),
            request_timeout: crate::config::HumanDuration::secs(60),
            ..Default::default()
        };
        let up = Upstream::new(UpstreamUrl::parse("http://127.0.0.1:11434").unwrap(), &cfg);
        assert!(!up.needs_dns());
        let peer = up.peer().unwrap();
        assert_eq!(
            peer.options.connection_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            peer.options.read_timeout,
            Some(Duration::from_secs(900)),
            "per read; the whole exchange is capped separately"
        );
        let named = Upstream::new(
            UpstreamUrl::parse("http://ollama.invalid:11434").unwrap(),
            &cfg,
        );
        assert!(named.needs_dns());
        assert!(named.peer().is_none(), "no peer before the name resolves");
    }

    /// The pool finds a connection by a hash of its peer; the address the connection was made
    /// to is checked again before it is reused (vendored pingora-core, `HttpPeer::matches_stream`:
    /// the address recorded at connect time, not a `getpeername`).
    #[tokio::test]
    async fn a_pooled_connection_serves_only_the_address_it_was_made_to() {
        use pingora::connectors::TransportConnector;
        use pingora::upstreams::peer::Peer;
        use tokio::net::TcpListener;
        let (a, b) = (
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        );
        let cfg = UpstreamConfig::default();
        let peer_of = |l: &TcpListener| {
            let url = format!("http://{}", l.local_addr().unwrap());
            Upstream::new(UpstreamUrl::parse(&url).unwrap(), &cfg)
                .peer()
                .unwrap()
        };
        let (to_a, to_b) = (peer_of(&a), peer_of(&b));
        let connector = TransportConnector::new(None);

        let stream = connector.new_stream(&to_a).await.unwrap();
        let recorded = stream.get_socket_digest().unwrap().peer_addr.get().cloned();
        assert_eq!(
            recorded.flatten().as_ref(),
            Some(to_a.address()),
            "the address is known without asking the kernel"
        );
        assert!(to_a.matches_stream(&stream));
        assert!(!to_b.matches_stream(&stream));
        let _open = a.accept().await.unwrap();
        connector.release_stream(stream, to_a.reuse_hash(), None);
        assert!(connector.reused_stream(&to_a).await.is_some(), "reused");

        // Filed under b's key, as if the two peers' hashes collided.
        let stream = connector.new_stream(&to_a).await.unwrap();
        let _open = a.accept().await.unwrap();
        connector.release_stream(stream, to_b.reuse_hash(), None);
        assert!(
            connector.reused_stream(&to_b).await.is_none(),
            "a connection to a is never handed out for b"
        );

        // Reset by the server while pooled.
        let stream = connector.new_stream(&to_a).await.unwrap();
        let (server, _) = a.accept().await.unwrap();
        connector.release_stream(stream, to_a.reuse_hash(), None);
        server.set_zero_linger().unwrap();
        drop(server);
        assert!(
            connector.reused_stream(&to_a).await.is_none(),
            "a reset connection is not reused"
        );
    }
}
