//! Health checks the agent runs on its tunnels' local services (docs/tunnelsets.md "Health
//! checks"): one task per checked tunnel of the configuration applied, a TCP connection or an
//! HTTP `GET` every interval; the set of tunnels found down goes to the proxies on every
//! session's control stream, which then give their connections to the group's other members.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::domain::health::{CheckKind, HealthCheck, Verdict};
use crate::tunnel::frame::Frame;
use crate::tunnel::msg::Message;

pub use crate::tunnel::config::{Down, Health};

/// One check to run: the tunnel as the proxy names it (`down`), the address to probe (the
/// allow-list entry its target matched: the agent never dials anything else), and the check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Planned {
    pub down: Down,
    pub dial: String,
    pub check: HealthCheck,
}

/// The checks running now, and what they found.
pub struct Checks {
    down: watch::Sender<BTreeSet<Down>>,
    tasks: Mutex<HashMap<Planned, JoinHandle<()>>>,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            down: watch::channel(BTreeSet::new()).0,
            tasks: Mutex::new(HashMap::new()),
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, t) in self.tasks.lock().expect("not poisoned").drain() {
            t.abort();
        }
    }
}

impl Checks {
    /// Runs exactly `checks`: those already running go on with what they found (a new
    /// configuration does not bring a down member back), the others stop and are forgotten,
    /// new ones start with their service up. Outside a runtime (unit tests) nothing starts.
    pub fn replace(&self, checks: Vec<Planned>) {
        let mut tasks = self.tasks.lock().expect("not poisoned");
        tasks.retain(|planned, task| {
            let keep = checks.contains(planned);
            if !keep {
                task.abort();
            }
            keep
        });
        self.down.send_if_modified(|set| {
            let before = set.len();
            set.retain(|d| tasks.keys().any(|p| &p.down == d));
            set.len() != before
        });
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for planned in checks {
            if tasks.contains_key(&planned) {
                continue;
            }
            tracing::info!(tunnel = %planned.down.name, target = %planned.dial, kind = ?planned.check.kind, interval_ms = planned.check.interval_ms, "health check started");
            let task = rt.spawn(run(planned.clone(), self.down.clone()));
            tasks.insert(planned, task);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<Down>> {
        self.down.subscribe()
    }
}

async fn run(planned: Planned, down: watch::Sender<BTreeSet<Down>>) {
    let Planned {
        down: tunnel,
        dial,
        check,
    } = planned;
    let mut verdict = Verdict::default();
    let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(&dial, &check).await;
        if let Some(up) = verdict.record(result.is_ok(), check.max_failed) {
            if up {
                tracing::info!(tunnel = %tunnel.name, target = %tunnel.target, "health check passes again");
                down.send_modify(|s| {
                    s.remove(&tunnel);
                });
            } else {
                tracing::warn!(tunnel = %tunnel.name, target = %tunnel.target, error = %result.err().unwrap_or_default(), "health check fails: the tunnel takes no new connections");
                down.send_modify(|s| {
                    s.insert(tunnel.clone());
                });
            }
        }
    }
}

/// One probe: a TCP connection, and for HTTP a `GET` answered 2xx or 3xx, within the timeout.
async fn probe(target: &str, check: &HealthCheck) -> Result<(), String> {
    let within = Duration::from_millis(check.timeout_ms);
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if check.kind == CheckKind::Tcp {
            return Ok(());
        }
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("http: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(check.path())
            .header(http::header::HOST, target)
            .header(http::header::USER_AGENT, "tunnox-agent-health")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// Tells one session's proxy what is down, now and on every change, until the session's
/// control stream is gone (`out` is weak: it must not keep that stream open).
pub async fn report(out: mpsc::WeakSender<Frame>, mut down: watch::Receiver<BTreeSet<Down>>) {
    let mut sent: Option<BTreeSet<Down>> = None;
    loop {
        let now = down.borrow_and_update().clone();
        // A new session starts with everything up: nothing to say until something is down.
        if sent.as_ref() != Some(&now) && !(sent.is_none() && now.is_empty()) {
            let Some(tx) = out.upgrade() else { return };
            let msg = Health {
                down: now.iter().cloned().collect(),
            };
            let sent_in_time =
                tokio::time::timeout(Duration::from_secs(2), tx.send(msg.to_frame())).await;
            if !matches!(sent_in_time, Ok(Ok(()))) {
                return;
            }
        }
        sent = Some(now);
        // Wakes at a change, and now and then to end once the session is gone.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), down.changed()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) if out.upgrade().is_none() => return,
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[tokio::test]
    async fn probes_say_what_is_up() {
        let tcp_check = HealthCheck {
            kind: CheckKind::Tcp,
            path: None,
            interval_ms: 1000,
            timeout_ms: 500,
            max_failed: 1,
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // An HTTP service: /ok answers 200, anything else 503.
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |r: Request<hyper::body::Incoming>| async move {
                            let status = if r.uri().path() == "/ok" {
                                StatusCode::OK
                            } else {
                                StatusCode::SERVICE_UNAVAILABLE
                            };
                            let mut resp = http::Response::new(Empty::<bytes::Bytes>::new());
                            *resp.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        assert_eq!(probe(&addr, &tcp_check).await, Ok(()));
        let http = |path: &str| HealthCheck {
            kind: CheckKind::Http,
            path: Some(path.into()),
            ..tcp_check.clone()
        };
        assert_eq!(probe(&addr, &http("/ok")).await, Ok(()));
        let e = probe(&addr, &http("/down")).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(
            probe(&closed, &tcp_check)
                .await
                .unwrap_err()
                .starts_with("connect")
        );
    }
}
