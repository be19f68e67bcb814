//! Where the store's connections point: the one configured server, or the master the
//! sentinels name. Behind sentinels, a connection error or a READONLY reply (and, without
//! either, a periodic check) makes the store ask them again; when the master moved, a new pool
//! replaces the old one and the change feed is told to subscribe again. Until the sentinels
//! have confirmed it, a server that failed is not used at all: a dead master restarted from
//! its own data answers (as a replica, before it resyncs) with writes the new master never had.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::sentinel::SentinelClient;
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use tokio::sync::{mpsc, watch};

use super::connect::{RedisOptions, direct_client, manager_config, sentinel_client};
use crate::store::{Backoff, StoreError};

/// Without any error the sentinels are asked again this often, so a master replaced while this
/// process only read (or could still reach the old one) is left within this time.
const RECHECK: Duration = Duration::from_secs(5);
/// While a failover is under way the sentinels are asked at most this far apart, so the new
/// master is found soon after they promote it.
const REDISCOVER_MAX: Duration = Duration::from_secs(1);

/// True for errors that say this server may no longer be the master: it is unreachable or
/// silent, or it answers as a replica (READONLY), or as one that lost its master.
pub(super) fn points_elsewhere(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading,
        ) => true,
        // A MULTI whose queued writes a replica refused.
        ErrorKind::Server(ServerErrorKind::ExecAbort) => e.to_string().contains("READONLY"),
        _ => false,
    }
}

/// One server's connections.
struct Pool {
    client: redis::Client,
    managers: Vec<ConnectionManager>,
    /// The server's address: tells a moved master from a confirmed one, and names it in logs.
    addr: String,
    /// Behind sentinels: false from an error that says the server may not be the master until
    /// the sentinels name it again. Always true for a fixed server.
    confirmed: AtomicBool,
}

impl Pool {
    async fn connect(client: redis::Client, opts: &RedisOptions) -> Result<Self, StoreError> {
        let n = opts.pool_size.max(1);
        let mut managers = Vec::with_capacity(n);
        for _ in 0..n {
            managers.push(
                client
                    .get_connection_manager_with_config(manager_config(opts))
                    .await?,
            );
        }
        let addr = client.get_connection_info().addr().to_string();
        Ok(Self {
            client,
            managers,
            addr,
            confirmed: AtomicBool::new(true),
        })
    }
}

struct Shared {
    pool: RwLock<Arc<Pool>>,
    next: AtomicUsize,
    /// Counts the moves to another master; the change feed watches it.
    moved: watch::Sender<u64>,
    opts: RedisOptions,
}

impl Shared {
    fn pool(&self) -> Arc<Pool> {
        self.pool.read().expect("not poisoned").clone()
    }

    /// Asks the sentinels for the master; moves the pool there when it is another server.
    async fn follow_master(&self, sentinels: &mut Sentinels) -> Result<(), StoreError> {
        let client = sentinels.ask().await?;
        let addr = client.get_connection_info().addr().to_string();
        let old = self.pool();
        if addr == old.addr {
            if !old.confirmed.swap(true, Ordering::AcqRel) {
                tracing::info!(master = %old.addr, "the sentinels confirm the Redis master");
            }
            return Ok(());
        }
        let pool = Pool::connect(client, &self.opts).await?;
        tracing::warn!(from = %old.addr, to = %pool.addr, "the sentinels name another Redis master; following it");
        *self.pool.write().expect("not poisoned") = Arc::new(pool);
        self.moved.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// The sentinels, asked for the master (the client checks it with `ROLE`). The client takes
/// answers in the configured order, so a sentinel that accepts connections but never answers
/// would hold every lookup: after a lookup that timed out, the next starts one sentinel later.
struct Sentinels {
    client: SentinelClient,
    opts: RedisOptions,
    first: usize,
}

impl Sentinels {
    fn new(opts: &RedisOptions) -> Result<Self, StoreError> {
        let s = opts.sentinel.as_ref().expect("sentinel options");
        Ok(Self {
            client: sentinel_client(opts, s)?,
            opts: opts.clone(),
            first: 0,
        })
    }

    fn count(&self) -> usize {
        self.opts
            .sentinel
            .as_ref()
            .map_or(1, |s| s.addrs.len().max(1))
    }

    /// The current master. Each lookup gets the connect and response timeouts; one that
    /// timed out is tried again one sentinel later, until each sentinel had its turn first.
    /// Errors name the master name and the sentinels asked.
    async fn ask(&mut self) -> Result<redis::Client, StoreError> {
        let within = self.opts.connect_timeout + self.opts.response_timeout;
        let mut turns = self.count();
        let (kind, detail) = loop {
            turns -= 1;
            match tokio::time::timeout(within, self.client.async_get_client()).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => break (e.kind(), e.to_string()),
                Err(_) => {
                    self.rotate()?;
                    if turns == 0 {
                        break (ErrorKind::Io, format!("no answer within {within:?}"));
                    }
                    tracing::warn!(timeout = ?within, "a sentinel did not answer; asking the next one first");
                }
            }
        };
        let (name, addrs) = self
            .opts
            .sentinel
            .as_ref()
            .map(|s| (s.master_name.as_str(), s.addrs.join(", ")))
            .unwrap_or_default();
        Err(RedisError::from((
            kind,
            "no reachable master",
            format!("master_name {name:?} through the sentinels {addrs}: {detail}"),
        ))
        .into())
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        self.first = (self.first + 1) % self.count();
        let mut s = self.opts.sentinel.clone().expect("sentinel options");
        s.addrs.rotate_left(self.first);
        self.client = sentinel_client(&self.opts, &s)?;
        Ok(())
    }
}

/// Asks the sentinels again whenever a connection reports a suspicious error, and every
/// [`RECHECK`]; ends when the store is dropped.
async fn rediscover(
    shared: Weak<Shared>,
    mut sentinels: Sentinels,
    mut suspicion: mpsc::Receiver<()>,
) {
    let mut backoff = Backoff::capped(REDISCOVER_MAX);
    loop {
        if let Ok(None) = tokio::time::timeout(RECHECK, suspicion.recv()).await {
            return;
        }
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let result = shared.follow_master(&mut sentinels).await;
            drop(shared);
            match result {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot find the Redis master through the sentinels");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        backoff.reset();
        // Errors reported meanwhile were about the server just checked or left.
        while suspicion.try_recv().is_ok() {}
    }
}

/// The store's connections and where they point. Dropping it stops the rediscovery task.
pub(super) struct Link {
    shared: Arc<Shared>,
    /// Wakes the rediscovery task; `None` for a fixed server.
    suspect: Option<mpsc::Sender<()>>,
}

impl Link {
    /// Connects the pool (fails fast when Redis or every sentinel is unreachable, or the
    /// password is wrong).
    pub(super) async fn connect(opts: RedisOptions) -> Result<Self, StoreError> {
        let Some(s) = opts.sentinel.clone() else {
            let pool = Pool::connect(direct_client(&opts)?, &opts).await?;
            return Ok(Self::new(pool, None, opts));
        };
        let mut sentinels = Sentinels::new(&opts)?;
        let pool = Pool::connect(sentinels.ask().await?, &opts).await?;
        tracing::info!(master = %pool.addr, master_name = %s.master_name, "connected to the Redis master the sentinels name");
        let (tx, rx) = mpsc::channel(1);
        let link = Self::new(pool, Some(tx), opts);
        tokio::spawn(rediscover(Arc::downgrade(&link.shared), sentinels, rx));
        Ok(link)
    }

    fn new(pool: Pool, suspect: Option<mpsc::Sender<()>>, opts: RedisOptions) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool: RwLock::new(Arc::new(pool)),
                next: AtomicUsize::new(0),
                moved: watch::channel(0).0,
                opts,
            }),
            suspect,
        }
    }

    /// A connection of the current pool, round-robin.
    pub(super) fn conn(&self) -> Conn {
        let pool = self.shared.pool();
        let i = self.shared.next.fetch_add(1, Ordering::Relaxed) % pool.managers.len();
        let o = &self.shared.opts;
        Conn {
            manager: pool.managers[i].clone(),
            pool,
            suspect: self.suspect.clone(),
            wait: (o.wait_replicas > 0).then_some((o.wait_replicas, o.wait_timeout)),
        }
    }

    /// The current server's client, for connections outside the pool (pub/sub); an error
    /// while the server waits for the sentinels' confirmation.
    pub(super) fn client(&self) -> RedisResult<redis::Client> {
        let pool = self.shared.pool();
        if !pool.confirmed.load(Ordering::Acquire) {
            return Err(unconfirmed(&pool));
        }
        Ok(pool.client.clone())
    }

    /// Changes whenever the pool moves to another master.
    pub(super) fn moved(&self) -> watch::Receiver<u64> {
        self.shared.moved.subscribe()
    }

    /// Reports that the server may be gone (say, the change feed lost it): behind sentinels,
    /// they are asked again.
    pub(super) fn suspect(&self) {
        if let Some(tx) = &self.suspect {
            let _ = tx.try_send(());
        }
    }
}

fn unconfirmed(pool: &Pool) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "not used until the sentinels confirm it as the master",
        format!("Redis at {} failed", pool.addr),
    ))
}

/// One pooled connection. Errors that say the server may no longer be the master wake the
/// rediscovery and stop the pool's use until it is confirmed; the error itself still goes to
/// the caller (a write that failed is not retried here: it may have been applied).
#[derive(Clone)]
pub(super) struct Conn {
    manager: ConnectionManager,
    pool: Arc<Pool>,
    suspect: Option<mpsc::Sender<()>>,
    /// `storage.redis.wait_replicas` and `wait_timeout`, when set.
    wait: Option<(u32, Duration)>,
}

impl Conn {
    /// Behind sentinels: the pool's server failed and has not been confirmed since.
    fn refused(&self) -> Option<RedisError> {
        (self.suspect.is_some() && !self.pool.confirmed.load(Ordering::Acquire))
            .then(|| unconfirmed(&self.pool))
    }

    fn observe<T>(&self, result: &RedisResult<T>) {
        if let (Err(e), Some(tx)) = (result, &self.suspect)
            && points_elsewhere(e)
        {
            self.pool.confirmed.store(false, Ordering::Release);
            let _ = tx.try_send(());
        }
    }

    /// After a mutation on this connection: with `storage.redis.wait_replicas` set, waits
    /// (`WAIT`) until that many replicas have every write this connection sent, so a failover
    /// cannot lose an acknowledged mutation. Fewer within the timeout is an error: the caller
    /// must not report the mutation as done (a create is taken back; an update or delete
    /// stays applied, and a retry finds it so).
    pub(super) async fn replicated(&mut self) -> Result<(), StoreError> {
        let Some((wanted, timeout)) = self.wait else {
            return Ok(());
        };
        let timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let acked: u64 = redis::cmd("WAIT")
            .arg(wanted)
            .arg(timeout_ms)
            .query_async(self)
            .await?;
        if acked < u64::from(wanted) {
            // A master without its replicas may have just been failed over.
            if let Some(tx) = &self.suspect {
                let _ = tx.try_send(());
            }
            return Err(StoreError::Unreplicated {
                acked,
                wanted,
                timeout,
            });
        }
        Ok(())
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            if let Some(e) = self.refused() {
                self.observe::<()>(&Err(e.clone()));
                return Err(e);
            }
            let result = self.manager.req_packed_command(cmd).await;
            self.observe(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            if let Some(e) = self.refused() {
                self.observe::<()>(&Err(e.clone()));
                return Err(e);
            }
            let result = self
                .manager
                .req_packed_commands(pipeline, offset, count)
                .await;
            self.observe(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(resp: &str) -> RedisError {
        match redis::parse_redis_value(resp.as_bytes()).expect("valid RESP") {
            Value::ServerError(e) => e.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn errors_that_send_the_store_back_to_the_sentinels() {
        let io = |kind| RedisError::from(std::io::Error::new(kind, "test"));
        let cases: Vec<(&str, RedisError, bool)> = vec![
            ("refused", io(std::io::ErrorKind::ConnectionRefused), true),
            ("reset", io(std::io::ErrorKind::ConnectionReset), true),
            ("timeout", io(std::io::ErrorKind::TimedOut), true),
            ("eof", io(std::io::ErrorKind::UnexpectedEof), true),
            (
                "readonly",
                server_error(
                    "-READONLY You can't write against a read only replica. script: 88c9\r\n",
                ),
                true,
            ),
            (
                "masterdown",
                server_error("-MASTERDOWN Link with MASTER is down\r\n"),
                true,
            ),
            (
                "loading",
                server_error("-LOADING Redis is loading\r\n"),
                true,
            ),
            // Answers about the data or the request, from a server that is the master.
            (
                "wrongtype",
                server_error("-WRONGTYPE Operation against a key holding the wrong kind\r\n"),
                false,
            ),
            (
                "script",
                server_error("-ERR user_script:1: boom\r\n"),
                false,
            ),
            (
                "noreplicas",
                server_error("-NOREPLICAS Not enough good replicas to write.\r\n"),
                false,
            ),
            (
                "noauth",
                server_error("-NOAUTH Authentication required.\r\n"),
                false,
            ),
            (
                "type",
                RedisError::from((ErrorKind::UnexpectedReturnType, "not a number")),
                false,
            ),
        ];
        for (name, err, want) in cases {
            assert_eq!(points_elsewhere(&err), want, "{name}: {err}");
        }
    }
}
