//! The Redis/Valkey store: one connection manager (it reconnects by itself), the scripts of
//! [`scripts`](super::scripts) loaded by hash (`EVALSHA`, falling back to `EVAL` once after the
//! store restarted), and a deadline on every call.

use super::scripts;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// Why a store call failed: the store said no, or it did not answer in time.
#[derive(Debug)]
pub(crate) enum StoreError {
    Redis(redis::RedisError),
    Deadline,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Deadline => f.write_str("no answer within state.timeout"),
        }
    }
}

/// The outcome of an admission in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admitted {
    Yes,
    /// Refused by rpm (1), tpm (2) or concurrency (3), retry after this many milliseconds.
    No {
        limit: u8,
        retry_after_ms: u64,
    },
}

/// What one admission asks of the store.
pub(crate) struct Ask<'a> {
    pub(crate) team: &'a str,
    pub(crate) rpm: u32,
    pub(crate) tpm: u64,
    pub(crate) max_concurrent: u32,
    pub(crate) inference: bool,
    pub(crate) lease: &'a str,
    pub(crate) lease_ttl: Duration,
}

pub(crate) struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    admit: redis::Script,
    charge: redis::Script,
    refund: redis::Script,
    renew: redis::Script,
    take_slot: redis::Script,
}

impl RedisStore {
    /// Connects (within `timeout` per attempt); later failures reconnect in the background.
    pub(crate) async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::Redis)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(timeout));
        let conn = tokio::time::timeout(
            timeout.max(Duration::from_secs(1)),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Deadline)?
        .map_err(StoreError::Redis)?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
            timeout,
            admit: redis::Script::new(scripts::ADMIT),
            charge: redis::Script::new(scripts::CHARGE),
            refund: redis::Script::new(scripts::REFUND),
            renew: redis::Script::new(scripts::RENEW),
            take_slot: redis::Script::new(scripts::TAKE_SLOT),
        })
    }

    fn key(&self, team: &str, what: &str) -> String {
        // `{team}` keeps a team's keys in one hash slot (Redis Cluster).
        format!("{}{{{team}}}:{what}", self.prefix)
    }

    /// The set of a team's leases (`max_concurrent`).
    pub(crate) fn team_leases(&self, team: &str) -> String {
        self.key(team, "leases")
    }

    /// The set of leases on a node's slots (`parallel`). Every node's set shares one hash slot
    /// (`{@nodes}`, which no team name can be), so one script can look at several nodes.
    pub(crate) fn node_slots(&self, node: &str) -> String {
        format!("{}{{@nodes}}:{node}", self.prefix)
    }

    async fn deadline<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map_err(StoreError::Redis),
            Err(_) => Err(StoreError::Deadline),
        }
    }

    /// One admission: one script call, one round trip.
    pub(crate) async fn admit(&self, ask: &Ask<'_>) -> Result<Admitted, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.key(ask.team, "rpm"))
            .key(self.key(ask.team, "tpm"))
            .key(self.team_leases(ask.team))
            .arg(ask.rpm)
            .arg(ask.tpm)
            .arg(ask.max_concurrent)
            .arg(if ask.inference { "1" } else { "0" })
            .arg(ask.lease)
            .arg(ask.lease_ttl.as_millis() as u64);
        let (limit, retry_after_ms): (u8, u64) = self.deadline(inv.invoke_async(&mut conn)).await?;
        Ok(match limit {
            0 => Admitted::Yes,
            limit => Admitted::No {
                limit,
                retry_after_ms,
            },
        })
    }

    /// Charges the tokens a finished answer used.
    pub(crate) async fn charge(&self, team: &str, tpm: u64, tokens: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.charge.prepare_invoke();
        inv.key(self.key(team, "tpm")).arg(tpm).arg(tokens);
        self.deadline(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Gives back one request of a refused request's charge.
    pub(crate) async fn refund(&self, team: &str, rpm: u32) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.refund.prepare_invoke();
        inv.key(self.key(team, "rpm")).arg(rpm);
        self.deadline(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Renews a live request's lease in the set `key`; `false` when it had lapsed.
    pub(crate) async fn renew(
        &self,
        key: &str,
        lease: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.renew.prepare_invoke();
        inv.key(key).arg(lease).arg(ttl.as_millis() as u64);
        self.deadline(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|had| had == 1)
    }

    /// Records a revoked key id; every replica reads the set (see [`revoked`](Self::revoked)).
    pub(crate) async fn revoke(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = format!("{}revoked", self.prefix);
        self.deadline(
            redis::cmd("SADD")
                .arg(key)
                .arg(id)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(|_| ())
    }

    /// Every key id revoked through the store.
    pub(crate) async fn revoked(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let key = format!("{}revoked", self.prefix);
        self.deadline(
            redis::cmd("SMEMBERS")
                .arg(key)
                .query_async::<Vec<String>>(&mut conn),
        )
        .await
    }

    /// Takes a slot on the first of `nodes` (name, parallel) with one free, in that order, for
    /// `lease`: the index of the node, or `None` when every one is full. One round trip.
    pub(crate) async fn take_slot(
        &self,
        nodes: &[(&str, u32)],
        lease: &str,
        ttl: Duration,
    ) -> Result<Option<usize>, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.take_slot.prepare_invoke();
        inv.arg(lease).arg(ttl.as_millis() as u64);
        for (name, parallel) in nodes {
            inv.key(self.node_slots(name)).arg(*parallel);
        }
        let taken: usize = self.deadline(inv.invoke_async(&mut conn)).await?;
        Ok(taken.checked_sub(1))
    }

    /// Lets a finished request's lease in the set `key` go.
    pub(crate) async fn release(&self, key: &str, lease: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.deadline(
            redis::cmd("ZREM")
                .arg(key)
                .arg(lease)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `redis-server` on a free loopback port, persistence off; killed when dropped.
    struct Server {
        child: std::process::Child,
        port: u16,
    }

    impl Server {
        fn start() -> Option<Server> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .ok()?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(Server { child, port })
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Two replicas' connections to one store.
    async fn two_replicas(server: &Server) -> (RedisStore, RedisStore) {
        let timeout = Duration::from_millis(500);
        let a = RedisStore::connect(&server.url(), "t:", timeout).await;
        let b = RedisStore::connect(&server.url(), "t:", timeout).await;
        (a.unwrap(), b.unwrap())
    }

    fn ask<'a>(lease: &'a str, inference: bool) -> Ask<'a> {
        Ask {
            team: "research",
            rpm: 10,
            tpm: 0,
            max_concurrent: 2,
            inference,
            lease,
            lease_ttl: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn two_replicas_share_one_minute_of_requests_and_the_concurrent_places() {
        let server = Server::start().expect("redis-server is installed (.ci/run installs it)");
        let (a, b) = two_replicas(&server).await;
        // 10 rpm across both: 10 admitted, then refused on either.
        let mut admitted = 0;
        for i in 0..30 {
            let store = if i % 2 == 0 { &a } else { &b };
            if store.admit(&ask(&format!("l{i}"), false)).await.unwrap() == Admitted::Yes {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 10);
        let refused = a.admit(&ask("x", false)).await.unwrap();
        assert!(
            matches!(refused, Admitted::No { limit: 1, retry_after_ms } if retry_after_ms <= 6000),
            "{refused:?}"
        );
        // A refund gives one back.
        a.refund("research", 10).await.unwrap();
        assert_eq!(b.admit(&ask("y", false)).await.unwrap(), Admitted::Yes);

        // Two concurrent places, shared; a released one is free again.
        let ask2 = |lease| Ask {
            rpm: 0,
            ..ask(lease, true)
        };
        assert_eq!(a.admit(&ask2("c1")).await.unwrap(), Admitted::Yes);
        assert_eq!(b.admit(&ask2("c2")).await.unwrap(), Admitted::Yes);
        assert!(matches!(
            a.admit(&ask2("c3")).await.unwrap(),
            Admitted::No { limit: 3, .. }
        ));
        b.release(&b.team_leases("research"), "c2").await.unwrap();
        assert_eq!(a.admit(&ask2("c3")).await.unwrap(), Admitted::Yes);
        assert!(
            b.renew(&b.team_leases("research"), "c1", Duration::from_secs(30))
                .await
                .unwrap(),
            "still held"
        );
    }

    #[tokio::test]
    async fn a_lapsed_lease_frees_its_place_and_tokens_are_charged_across_replicas() {
        let server = Server::start().expect("redis-server is installed (.ci/run installs it)");
        let (a, b) = two_replicas(&server).await;
        let short = |lease| Ask {
            rpm: 0,
            max_concurrent: 1,
            lease_ttl: Duration::from_millis(200),
            ..ask(lease, true)
        };
        assert_eq!(a.admit(&short("dies")).await.unwrap(), Admitted::Yes);
        assert!(matches!(
            b.admit(&short("waits")).await.unwrap(),
            Admitted::No { limit: 3, .. }
        ));
        // Replica a is killed: it never renews, and the lease lapses.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(b.admit(&short("waits")).await.unwrap(), Admitted::Yes);

        // 600 tokens a minute; a 900-token answer charged on a puts b's team in debt.
        let tokens = |lease| Ask {
            rpm: 0,
            tpm: 600,
            max_concurrent: 0,
            ..ask(lease, true)
        };
        assert_eq!(b.admit(&tokens("t1")).await.unwrap(), Admitted::Yes);
        a.charge("research", 600, 900).await.unwrap();
        match b.admit(&tokens("t2")).await.unwrap() {
            Admitted::No {
                limit: 2,
                retry_after_ms,
            } => {
                assert!(
                    (29_000..=31_000).contains(&retry_after_ms),
                    "{retry_after_ms}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn replicas_share_a_nodes_slots_and_take_the_first_node_with_one_free() {
        let server = Server::start().expect("redis-server is installed (.ci/run installs it)");
        let (a, b) = two_replicas(&server).await;
        let ttl = Duration::from_secs(30);
        let nodes = [("gpu-a", 1), ("gpu-b", 2)];
        assert_eq!(a.take_slot(&nodes, "a1", ttl).await.unwrap(), Some(0));
        assert_eq!(b.take_slot(&nodes, "b1", ttl).await.unwrap(), Some(1));
        assert_eq!(a.take_slot(&nodes, "a2", ttl).await.unwrap(), Some(1));
        assert_eq!(
            b.take_slot(&nodes, "b2", ttl).await.unwrap(),
            None,
            "3 slots, 3 taken"
        );
        b.release(&b.node_slots("gpu-a"), "a1").await.unwrap();
        assert_eq!(b.take_slot(&nodes, "b2", ttl).await.unwrap(), Some(0));
        // A replica that stops renewing loses its slot when the lease lapses.
        let short = Duration::from_millis(200);
        assert_eq!(
            a.take_slot(&[("gpu-c", 1)], "dies", short).await.unwrap(),
            Some(0)
        );
        assert_eq!(
            b.take_slot(&[("gpu-c", 1)], "w", short).await.unwrap(),
            None
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            b.take_slot(&[("gpu-c", 1)], "w", short).await.unwrap(),
            Some(0)
        );
    }

    #[tokio::test]
    async fn a_dead_store_is_an_error_within_the_deadline() {
        let server = Server::start().expect("redis-server is installed (.ci/run installs it)");
        let url = server.url();
        let store = RedisStore::connect(&url, "t:", Duration::from_millis(50))
            .await
            .unwrap();
        drop(server);
        let started = std::time::Instant::now();
        assert!(store.admit(&ask("l", false)).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}
