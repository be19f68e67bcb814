//! Configuration push (docs/tunnelsets.md "Configuration push"): each client's tunnels, as this
//! node's remote-port table has them, sent to the agent with their hash at connect and on every
//! change; the agent's `ConfigAck` (the hash applied, the tunnels it refuses and why) goes into
//! the session's record in the store, where the controller reads it into `status.configHash`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::Tunnels;
use super::remote::RemoteTunnel;
use super::session::Session;
use crate::tunnel::config::{ConfigAck, ConfigPush, Health, PushedTunnel, Transport};
use crate::tunnel::msg::Message;

/// Least time between two writes of a session's record for what its agent reports.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Each client's configuration from the remote-port table.
pub fn configs_of(desired: &[RemoteTunnel]) -> HashMap<String, Arc<ConfigPush>> {
    let mut by_client: HashMap<String, Vec<PushedTunnel>> = HashMap::new();
    for t in desired {
        let transport = if t.udp_idle.is_some() {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        for b in &t.backends {
            by_client
                .entry(b.client_id.clone())
                .or_default()
                .push(PushedTunnel {
                    name: b.name.clone(),
                    transport,
                    target: b.target.clone(),
                    health_check: t.health_check.clone(),
                });
        }
    }
    by_client
        .into_iter()
        .map(|(c, tunnels)| (c, Arc::new(ConfigPush::new(tunnels))))
        .collect()
}

impl Tunnels {
    /// Takes the configurations of a new remote-port table and pushes the changed ones to this
    /// node's sessions of their clients.
    pub(super) fn set_configs(&self, desired: &[RemoteTunnel]) {
        let new = configs_of(desired);
        let changed: Vec<String> = {
            let mut cur = self.configs.write().expect("not poisoned");
            let mut changed: Vec<String> = new
                .iter()
                .filter(|(c, p)| cur.get(*c).map(|o| &o.hash) != Some(&p.hash))
                .map(|(c, _)| c.clone())
                .collect();
            changed.extend(cur.keys().filter(|c| !new.contains_key(*c)).cloned());
            *cur = new;
            changed
        };
        for client in changed {
            for s in self.local.of(&client) {
                self.push_config(&s);
            }
        }
    }

    /// The configuration of `client_id` (no tunnels when the table has none of it).
    fn config_of(&self, client_id: &str) -> Arc<ConfigPush> {
        self.configs
            .read()
            .expect("not poisoned")
            .get(client_id)
            .cloned()
            .unwrap_or_else(|| Arc::new(ConfigPush::new(Vec::new())))
    }

    /// Sends `session` its client's configuration unless it was the last one sent.
    pub(super) fn push_config(&self, session: &Session) {
        let push = self.config_of(&session.client_id);
        let mut last = session.pushed.lock().expect("not poisoned");
        if last.as_deref() == Some(push.hash.as_str()) {
            return;
        }
        let frame = push.to_frame();
        if !frame.fits() {
            tracing::error!(
                client_id = %session.client_id,
                tunnels = push.tunnels.len(),
                bytes = frame.body.len(),
                limit = crate::tunnel::frame::MAX_FRAME,
                "configuration too large for one frame; not pushed"
            );
            // Not tried again (and not logged again) until the configuration changes.
            *last = Some(push.hash.clone());
            return;
        }
        match session.control.try_send(frame.to_bytes()) {
            Ok(()) => {
                self.metrics.event("config_pushed", "");
                tracing::debug!(client_id = %session.client_id, session = %session.id, hash = %push.hash, "configuration pushed");
                *last = Some(push.hash.clone());
            }
            // The control stream's queue is full or closed: the next heartbeat tick tries again.
            Err(_) => {
                tracing::debug!(client_id = %session.client_id, "configuration push deferred")
            }
        }
    }

    /// The agent applied a configuration: kept in the session's record (the controller shows
    /// it) and announced so its TunnelSet is reconciled at once.
    pub(super) async fn acked(&self, session: &Session, ack: ConfigAck, ttl: Duration) {
        let ack = match ack.bounded() {
            Ok(a) => a,
            Err(why) => {
                self.metrics.event("config_ack_invalid", "");
                tracing::debug!(client_id = %session.client_id, session = %session.id, %why, "configuration acknowledgement ignored");
                return;
            }
        };
        // Only the hash this proxy pushed last is believed: an agent cannot show another.
        let pushed = session.pushed.lock().expect("not poisoned").clone();
        if pushed.as_deref() != Some(ack.hash.as_str()) {
            self.metrics.event("config_ack_stale", "");
            tracing::debug!(client_id = %session.client_id, hash = %ack.hash, "acknowledgement of a configuration not pushed last: ignored");
            return;
        }
        {
            let mut rec = session.record.lock().expect("not poisoned");
            if rec.config.as_ref() == Some(&ack) {
                return;
            }
            rec.config = Some(ack.clone());
        }
        let outcome = if ack.rejected.is_empty() {
            "config_applied"
        } else {
            "config_rejected"
        };
        self.metrics.event(outcome, "");
        for r in &ack.rejected {
            tracing::warn!(client_id = %session.client_id, tunnel = %r.name, reason = %r.reason, "agent refuses a tunnel");
        }
        self.report(session, ttl).await;
    }

    /// Writes the session's record and announces its client — at most once per
    /// [`REPORT_EVERY`]: what an agent says more often waits for the session's next heartbeat
    /// ([`Tunnels::flush_report`]), so a chatty agent cannot flood the store or the controller.
    async fn report(&self, session: &Session, ttl: Duration) {
        {
            let mut last = session.reported.lock().expect("not poisoned");
            if last.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
                session
                    .report_pending
                    .store(true, std::sync::atomic::Ordering::Release);
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if super::listener::refresh(self, session, ttl).await {
            self.registry.announce_session(&session.client_id).await;
        }
    }

    /// At a heartbeat (whose refresh has just written the record): announces a report that
    /// [`Tunnels::report`] held back.
    pub(super) async fn flush_report(&self, session: &Session) {
        if session
            .report_pending
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            *session.reported.lock().expect("not poisoned") = Some(std::time::Instant::now());
            self.registry.announce_session(&session.client_id).await;
        }
    }
}

impl Tunnels {
    /// The agent reports which tunnels' health checks fail: streams to those targets are not
    /// opened on this session any more (a group's other members take them); the names go into
    /// the session's record so the TunnelSet shows them.
    pub(super) async fn health(&self, session: &Session, report: Health, ttl: Duration) {
        let report = match report.bounded() {
            Ok(r) => r,
            Err(why) => {
                self.metrics.event("health_invalid", "");
                tracing::warn!(client_id = %session.client_id, session = %session.id, %why, "health report ignored");
                return;
            }
        };
        let targets: std::collections::HashSet<String> =
            report.down.iter().map(|d| d.target.clone()).collect();
        let mut names: Vec<String> = report.down.iter().map(|d| d.name.clone()).collect();
        names.sort();
        names.dedup();
        *session.down.write().expect("not poisoned") = targets;
        {
            let mut rec = session.record.lock().expect("not poisoned");
            if rec.unhealthy == names {
                return;
            }
            rec.unhealthy = names.clone();
        }
        self.metrics.event("health_report", "");
        tracing::info!(client_id = %session.client_id, session = %session.id, down = %names.join(","), "agent health report");
        self.report(session, ttl).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(client: &str, name: &str, port: u16, udp: bool) -> RemoteTunnel {
        RemoteTunnel {
            name: name.into(),
            backends: vec![super::super::Backend {
                client_id: client.into(),
                name: name.into(),
                target: format!("127.0.0.1:{port}"),
            }],
            balance: Default::default(),
            port: 20_000 + port,
            max_connections: None,
            max_bytes_per_second: None,
            health_check: None,
            udp_idle: udp.then(|| Duration::from_secs(60)),
        }
    }

    #[test]
    fn one_configuration_per_client_with_its_tunnels_only() {
        let table = [
            t("laptop", "ssh", 22, false),
            t("office", "dns", 53, true),
            t("laptop", "db", 5432, false),
        ];
        let c = configs_of(&table);
        assert_eq!(c.len(), 2);
        let names: Vec<&str> = c["laptop"]
            .tunnels
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, ["db", "ssh"]);
        assert_eq!(c["office"].tunnels[0].transport, Transport::Udp);
        // The same table in another order on another node: the same hash.
        let mut other = table.clone();
        other.reverse();
        assert_eq!(configs_of(&other)["laptop"].hash, c["laptop"].hash);
        // A limit is the proxy's business: it does not change what the agent is told.
        let mut limited = table.clone();
        limited[0].max_connections = Some(2);
        assert_eq!(configs_of(&limited)["laptop"].hash, c["laptop"].hash);
        // A moved local port does.
        let mut moved = table.clone();
        moved[0].backends[0].target = "127.0.0.1:2222".into();
        assert_ne!(configs_of(&moved)["laptop"].hash, c["laptop"].hash);
    }
}
