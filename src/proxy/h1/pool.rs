//! Idle keep-alive connections to upstreams, per target authority.

use std::sync::Mutex;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

pub struct Pool {
    idle: Mutex<foldhash::HashMap<Box<str>, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle {
    stream: TcpStream,
    since: Instant,
    /// Ask the socket itself before reuse (one system call), not only the runtime.
    suspect: bool,
}

impl Idle {
    /// An idle upstream connection has nothing to say: if it became readable, the upstream
    /// closed it (or broke the protocol). Reads the readiness the runtime already has (no
    /// system call), and for a suspect connection peeks at the socket too.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        if now.duration_since(self.since) >= timeout {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if self.stream.poll_read_ready(&mut cx).is_ready() {
            return false;
        }
        if self.suspect {
            let mut byte = [std::mem::MaybeUninit::uninit()];
            let peeked = socket2::SockRef::from(&self.stream).peek(&mut byte);
            return matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        }
        true
    }
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently used idle connection to `target` that still looks open.
    pub fn take(&self, target: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().expect("not poisoned");
        let list = idle.get_mut(target)?;
        let now = Instant::now();
        while let Some(c) = list.pop() {
            if c.usable(now, self.idle_timeout) {
                return Some(c.stream);
            }
        }
        None
    }

    /// Keeps `stream` for the next request to `target`, unless enough are kept already.
    pub fn put(&self, target: &str, stream: TcpStream, suspect: bool) {
        if self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().expect("not poisoned");
        let list = match idle.get_mut(target) {
            Some(list) => list,
            None => idle.entry(target.into()).or_default(),
        };
        if list.len() >= self.max_idle {
            // The oldest goes.
            list.remove(0);
        }
        list.push(Idle {
            stream,
            since: Instant::now(),
            suspect,
        });
    }

    /// Closes connections idle for too long or closed by their upstream.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("not poisoned");
        idle.retain(|_, list| {
            list.retain(|c| c.usable(now, self.idle_timeout));
            !list.is_empty()
        });
    }

    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .expect("not poisoned")
            .values()
            .map(Vec::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn reuses_open_connections_and_drops_closed_stale_and_surplus_ones() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(2, Duration::from_secs(60));
        let (a, _a_srv) = pair(&l).await;
        let a_port = a.local_addr().unwrap().port();
        pool.put("t", a, false);
        let got = pool.take("t").expect("open connection reused");
        assert_eq!(got.local_addr().unwrap().port(), a_port);
        assert!(pool.take("t").is_none());
        assert!(pool.take("other").is_none());

        // The upstream closes an idle connection: not handed out again.
        let (b, mut b_srv) = pair(&l).await;
        pool.put("t", b, false);
        b_srv.shutdown().await.unwrap();
        drop(b_srv);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take("t").is_none(), "closed by the upstream");

        // At most two kept per target; the oldest goes first.
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (c, s) = pair(&l).await;
            servers.push(s);
            pool.put("t", c, false);
        }
        assert_eq!(pool.idle_count(), 2);

        let short = Pool::new(2, Duration::from_millis(10));
        let (c, _s) = pair(&l).await;
        short.put("t", c, false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        short.sweep();
        assert_eq!(short.idle_count(), 0, "idle past the timeout");

        // Stray bytes after a bodiless response: a suspect connection is looked at first.
        let (d, mut d_srv) = pair(&l).await;
        pool.take("t");
        pool.take("t");
        d_srv.write_all(b"stray").await.unwrap();
        pool.put("t", d, true);
        assert!(
            pool.take("t").is_none(),
            "stray bytes waiting on a suspect connection"
        );
    }
}
