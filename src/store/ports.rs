//! Remote ports of tunnels in a cluster: which TunnelSet holds which port of a business, and
//! what the port carries. One port space per business (not per set): the business's DR set can
//! then take over any set's ports without a clash (docs/sets.md "Remote ports"). The controller
//! claims and releases (atomically, per TunnelSet); the proxies of the business read the whole
//! table when its version moves and listen on the ports their set serves now.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::SetName;

/// What one claimed port carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortClaim {
    /// The claiming TunnelSet (`k8s:<cluster>/<ns>/<name>`).
    pub holder: String,
    /// The TunnelSet's home set: proxies of this set listen on the port, or of the business's
    /// DR set while this one has no healthy node. `None`: every proxy of the business.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<SetName>,
    pub client_id: String,
    /// The tunnel's name in its TunnelSet.
    pub name: String,
    /// `host:port` as the agent dials it.
    pub target: String,
    #[serde(default)]
    pub udp: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Bandwidth per proxy, both directions together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    /// UDP: a flow's idle time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_idle_ms: Option<u64>,
    /// A load-balancing group (`<namespace>/<group>`): TunnelSets of one namespace naming the same
    /// group and port share the port, each a member of the record (`holder` is then
    /// `group:<group>`, the limits and `balance` those of the member written last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<crate::domain::Balance>,
    /// Probed by the agent of each member; a failing member is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::domain::HealthCheck>,
    /// A group's members, in holder order (empty for a tunnel of its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<GroupMember>,
}

/// One TunnelSet's tunnel in a group's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    pub holder: String,
    pub client_id: String,
    pub name: String,
    pub target: String,
}

/// One tunnel a TunnelSet asks a port for: `port` 0 means any free port of the range (the one
/// it already holds under the same tunnel name, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRequest {
    pub port: u16,
    pub claim: PortClaim,
}

/// What became of one [`PortRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortOutcome {
    /// Held by the requester on this port.
    Held(u16),
    /// Held by another TunnelSet.
    Conflict { port: u16, holder: String },
    /// `port` 0 and no free port left in the range.
    Exhausted,
}

/// The table of one business, and the version it was read at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortTable {
    pub version: u64,
    pub ports: Vec<(u16, PortClaim)>,
}

#[async_trait]
pub trait PortRegistry: Send + Sync + 'static {
    /// In one atomic step: claims every request for `holder` (a port another holder has is a
    /// conflict, left as it is), then frees the ports `holder` held in `set`'s business that no
    /// request names any more. Automatic ports come from `range` (inclusive). Returns one
    /// outcome per request, in order. The table's version moves when anything changed. Every
    /// method names a set and works on the table of the set's business.
    async fn claim_ports(
        &self,
        set: &SetName,
        holder: &str,
        requests: &[PortRequest],
        range: (u16, u16),
    ) -> Result<Vec<PortOutcome>, StoreError>;

    /// Frees every port `holder` holds in `set`'s business.
    async fn release_ports(&self, set: &SetName, holder: &str) -> Result<(), StoreError>;

    /// The set's table version (0 when it never had a port).
    async fn port_version(&self, set: &SetName) -> Result<u64, StoreError>;

    /// The set's whole table.
    async fn port_table(&self, set: &SetName) -> Result<PortTable, StoreError>;

    /// A proxy says it could not listen on `port` (`None`: it listens now). Kept for a while so
    /// the holder's status can show it.
    async fn report_port(
        &self,
        set: &SetName,
        port: u16,
        node_id: &str,
        error: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Ports some proxy of `set` could not listen on: port → "node: why".
    async fn port_errors(&self, set: &SetName) -> Result<Vec<(u16, String)>, StoreError>;

    /// Adds what one connection (or UDP flow) through `port` carried, when it ended.
    async fn add_port_traffic(
        &self,
        set: &SetName,
        port: u16,
        traffic: PortTraffic,
    ) -> Result<(), StoreError>;

    /// What each port of `set` carried since it was last claimed by a new holder.
    async fn port_traffic(
        &self,
        set: &SetName,
    ) -> Result<std::collections::HashMap<u16, PortTraffic>, StoreError>;
}

/// Connections (TCP) or flows (UDP) carried through a remote port, and their bytes: `bytes_in`
/// towards the agent's service, `bytes_out` back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortTraffic {
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}
