//! Configuration of the proxy's side of tunnels: its tunnel listener (`proxy.tunnel`) and, in
//! single-node mode, the agents it admits (`tunnel_clients`). docs/tunnels.md and
//! docs/configuration.md are the reference.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Dur;

/// `proxy.tunnel`: where agents connect. Off unless `listen` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelListenerConfig {
    /// e.g. `0.0.0.0:7000`; `None`: no tunnel listener.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key of the listener (TLS 1.3). Required with `listen` unless
    /// `insecure`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Plain TCP, no TLS: for tests on loopback only; logged as a warning.
    pub insecure: bool,
    /// `host:port` agents are told to reconnect to (`ServerShutdown.reconnect_to` of other
    /// nodes); default `$POD_IP` with the listen port, else the listen address.
    pub advertise_address: Option<String>,
    /// A file holding the secret proxies present to each other when one forwards a request for
    /// a client whose session another holds. Cluster mode: without it a proxy does not forward
    /// to peers (and refuses forwarded requests).
    pub node_token_file: Option<PathBuf>,
    pub heartbeat_interval: Dur,
    /// Time an agent has to authenticate after connecting.
    pub handshake_timeout: Dur,
    /// Most concurrent streams the proxy opens on one session.
    pub max_streams_per_session: u32,
    /// Most live sessions one client may hold on this proxy.
    pub max_sessions_per_client: usize,
    /// Most sessions on this proxy.
    pub max_sessions: usize,
    /// Address the tunnels' remote ports listen on; default the IP of `proxy.listen`.
    pub remote_bind: Option<IpAddr>,
    /// Lowest and highest remote port a tunnel may ask for.
    pub remote_port_range: [u16; 2],
}

impl Default for TunnelListenerConfig {
    fn default() -> Self {
        Self {
            listen: None,
            cert_file: None,
            key_file: None,
            insecure: false,
            advertise_address: None,
            node_token_file: None,
            heartbeat_interval: Dur::secs(5),
            handshake_timeout: Dur::secs(5),
            max_streams_per_session: 1000,
            max_sessions_per_client: 8,
            max_sessions: 10_000,
            remote_bind: None,
            remote_port_range: [1024, 65535],
        }
    }
}

/// A client a single-node proxy admits (`tunnel_clients:`). Exactly one of `token` and
/// `token_file`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelClientEntry {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Services of this client published on remote ports of the proxy (seed 002's `tunnels:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tunnels: Vec<TunnelEntry>,
    /// Load-balancing groups this client serves for mappings (`mappings[].target_group`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// The members of group `name` among `clients`: their ids, sorted.
pub fn group_members(clients: &[TunnelClientEntry], name: &str) -> Vec<String> {
    let mut ids: Vec<String> = clients
        .iter()
        .filter(|c| c.groups.iter().any(|g| g == name))
        .map(|c| c.client_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// `tcp` or `udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    #[default]
    Tcp,
    Udp,
}

/// One service a client publishes: connections to `remote_port` on the proxy reach
/// `local_host:local_port` as the agent sees it (the agent's `allow` list must hold it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelEntry {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: TunnelKind,
    pub local_host: String,
    pub local_port: u16,
    pub remote_port: u16,
    /// Most connections (TCP) or flows (UDP) open at once; more are refused (TCP: closed at
    /// once; UDP: the datagram is dropped). TCP: unlimited if absent; UDP: 1024 if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Bytes per second this tunnel carries on this proxy, both directions and all its
    /// connections (or flows) together; unlimited if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes_per_second: Option<u64>,
    /// A load-balancing group: tunnels of several clients with the same group and
    /// `remote_port` share the port, connections spread over the members whose agents are up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// How the group spreads connections: `round_robin` (default) or `least_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<crate::domain::Balance>,
    /// Probed by the agent next to the service; while it fails the tunnel takes no new
    /// connections (its group's other members carry them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckEntry>,
    /// UDP only: a flow with no datagram either way for this long is closed (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_session_timeout: Option<Dur>,
}

/// `health_check` of a tunnel in the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckEntry {
    #[serde(rename = "type")]
    pub kind: crate::domain::CheckKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failed: Option<u32>,
}

impl HealthCheckEntry {
    /// The check as proxies push it, defaults filled in.
    pub fn to_check(&self) -> crate::domain::HealthCheck {
        use crate::domain::health;
        let ms = |d: Option<Dur>, default: u64| {
            d.map_or(default, |d| {
                u64::try_from(d.get().as_millis()).unwrap_or(u64::MAX)
            })
        };
        crate::domain::HealthCheck {
            kind: self.kind,
            path: self.path.clone(),
            interval_ms: ms(self.interval, health::DEFAULT_INTERVAL_MS),
            timeout_ms: ms(self.timeout, health::DEFAULT_TIMEOUT_MS),
            max_failed: self.max_failed.unwrap_or(health::DEFAULT_MAX_FAILED),
        }
    }
}

/// The smallest bandwidth limit: below, one UDP datagram or TCP read would wait for seconds.
pub const MIN_BYTES_PER_SECOND: u64 = 1024;
/// The largest bandwidth limit (a higher value is a typo, not a limit).
pub const MAX_BYTES_PER_SECOND: u64 = 100 << 30;

/// Flows of a UDP tunnel without `max_connections`: spoofed source addresses must not open
/// streams without end.
pub const DEFAULT_UDP_FLOWS: u32 = 1024;

/// A UDP flow's idle time when `udp_session_timeout` is absent.
pub const DEFAULT_UDP_SESSION_TIMEOUT: Dur = Dur::secs(60);

/// A tunnel name: what `TunnelSet.spec.tunnels[].name` allows (a DNS label).
fn check_tunnel_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'"
        ))
    }
}

/// A local host as the agent will dial it: a hostname or an IP, nothing else.
fn check_local_host(host: &str) -> Result<(), String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() || crate::domain::Hostname::parse(host).is_ok() {
        Ok(())
    } else {
        Err(format!("{host:?} is not a hostname or an IP address"))
    }
}

pub use crate::domain::check_client_id;

/// `proxy.tunnel`: what a listener cannot run with, named by field.
pub fn check_listener(t: &TunnelListenerConfig) -> Result<(), (String, String)> {
    let at = |f: &str| format!("proxy.tunnel.{f}");
    if t.listen.is_some() && !t.insecure {
        for (name, value) in [("cert_file", &t.cert_file), ("key_file", &t.key_file)] {
            if value.is_none() {
                return Err((
                    at(name),
                    "is required with proxy.tunnel.listen (TLS 1.3), unless proxy.tunnel.insecure"
                        .into(),
                ));
            }
        }
    }
    for (name, d) in [
        ("heartbeat_interval", t.heartbeat_interval),
        ("handshake_timeout", t.handshake_timeout),
    ] {
        if d.get().is_zero() {
            return Err((at(name), format!("must be greater than 0, got {d}")));
        }
    }
    for (name, n) in [
        (
            "max_streams_per_session",
            t.max_streams_per_session as usize,
        ),
        ("max_sessions_per_client", t.max_sessions_per_client),
        ("max_sessions", t.max_sessions),
    ] {
        if n == 0 {
            return Err((at(name), "must be at least 1, got 0".into()));
        }
    }
    if let Some(a) = &t.advertise_address {
        let port_ok = a
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err((at("advertise_address"), format!("{a:?} is not host:port")));
        }
    }
    Ok(())
}

/// `tunnel_clients` (single-node only) and the mappings that name them.
pub fn check_clients(
    clients: &[TunnelClientEntry],
    uses_redis: bool,
    mapping_clients: &[Option<String>],
    listener: &TunnelListenerConfig,
    own_ports: &[u16],
) -> Result<(), (String, String)> {
    if uses_redis && !clients.is_empty() {
        return Err((
            "tunnel_clients".into(),
            "is for single-node mode (no Redis); in a cluster, declare TunnelSets with a Secret"
                .into(),
        ));
    }
    let mut seen = std::collections::HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        let at = |f: &str| format!("tunnel_clients[{i}].{f}");
        check_client_id(&c.client_id).map_err(|m| (at("client_id"), m))?;
        match (&c.token, &c.token_file) {
            (Some(_), Some(_)) => {
                return Err((at("token"), "set token or token_file, not both".into()));
            }
            (None, None) => return Err((at("token"), "token or token_file is required".into())),
            (Some(t), None) if t.trim().is_empty() => {
                return Err((at("token"), "must not be empty".into()));
            }
            _ => {}
        }
        if let Some(first) = seen.insert(c.client_id.as_str(), i) {
            return Err((
                at("client_id"),
                format!(
                    "{} is already declared by tunnel_clients[{first}]",
                    c.client_id
                ),
            ));
        }
    }
    check_tunnels(clients, listener, own_ports)?;
    for (i, m) in mapping_clients.iter().enumerate() {
        if let Some(id) = m
            && !seen.contains_key(id.as_str())
        {
            return Err((
                format!("mappings[{i}].target_client_id"),
                format!("{id:?} is not declared in tunnel_clients"),
            ));
        }
    }
    Ok(())
}

/// Groups: each client's `groups` well-formed, and each mapping's `target_group` served by at
/// least one client (and at most [`MAX_GROUP_MEMBERS`](crate::domain::MAX_GROUP_MEMBERS)),
/// never beside `target_client_id`; `balance` only with a group.
pub fn check_group_targets(
    clients: &[TunnelClientEntry],
    mappings: &[super::MappingEntry],
) -> Result<(), (String, String)> {
    for (i, c) in clients.iter().enumerate() {
        if c.groups.len() > 32 {
            return Err((
                format!("tunnel_clients[{i}].groups"),
                format!("has {} groups; at most 32", c.groups.len()),
            ));
        }
        for (j, g) in c.groups.iter().enumerate() {
            let at = format!("tunnel_clients[{i}].groups[{j}]");
            check_tunnel_name(g).map_err(|m| (at.clone(), m))?;
            if c.groups[..j].contains(g) {
                return Err((at, format!("{g:?} is listed twice")));
            }
        }
    }
    for (i, m) in mappings.iter().enumerate() {
        let at = |f: &str| format!("mappings[{i}].{f}");
        let Some(g) = &m.target_group else {
            if m.balance.is_some() {
                return Err((at("balance"), "applies to a target_group only".into()));
            }
            continue;
        };
        if m.target_client_id.is_some() {
            return Err((
                at("target_group"),
                "set target_client_id or target_group, not both".into(),
            ));
        }
        let members = group_members(clients, g);
        if members.is_empty() {
            return Err((
                at("target_group"),
                format!("{g:?} is not in the groups of any tunnel_clients entry"),
            ));
        }
        if members.len() > crate::domain::MAX_GROUP_MEMBERS {
            return Err((
                at("target_group"),
                format!(
                    "{g:?} has {} members; at most {}",
                    members.len(),
                    crate::domain::MAX_GROUP_MEMBERS
                ),
            ));
        }
    }
    Ok(())
}

/// The clients' `tunnels`: well-formed, names unique per client, each remote port taken once,
/// inside `proxy.tunnel.remote_port_range`, and none of this proxy's own listener ports
/// (`own_ports`). Tunnels need the tunnel listener; UDP is not built yet.
fn check_tunnels(
    clients: &[TunnelClientEntry],
    listener: &TunnelListenerConfig,
    own_ports: &[u16],
) -> Result<(), (String, String)> {
    let [lo, hi] = listener.remote_port_range;
    if lo == 0 || lo > hi {
        return Err((
            "proxy.tunnel.remote_port_range".into(),
            format!("[{lo}, {hi}] is not a range of ports: give [lowest, highest], 1-65535"),
        ));
    }
    // Port → (the entry that declared it first, its group, its type, its client).
    type Taken<'a> = (String, Option<&'a str>, TunnelKind, usize);
    let mut ports: std::collections::HashMap<u16, Taken<'_>> = std::collections::HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        let mut names = std::collections::HashSet::new();
        for (j, t) in c.tunnels.iter().enumerate() {
            let here = format!("tunnel_clients[{i}].tunnels[{j}]");
            let at = |f: &str| format!("{here}.{f}");
            if listener.listen.is_none() {
                return Err((
                    here,
                    "needs the tunnel listener: set proxy.tunnel.listen".into(),
                ));
            }
            check_tunnel_name(&t.name).map_err(|m| (at("name"), m))?;
            if !names.insert(t.name.as_str()) {
                return Err((
                    at("name"),
                    format!("{} is already a tunnel of {}", t.name, c.client_id),
                ));
            }
            if let Some(d) = t.udp_session_timeout {
                if t.kind != TunnelKind::Udp {
                    return Err((
                        at("udp_session_timeout"),
                        "applies to udp tunnels only".into(),
                    ));
                }
                if d.get().is_zero() || d.get() > std::time::Duration::from_secs(86_400) {
                    return Err((
                        at("udp_session_timeout"),
                        format!("must be more than 0s and at most 24h, got {d}"),
                    ));
                }
            }
            check_local_host(&t.local_host).map_err(|m| (at("local_host"), m))?;
            if t.local_port == 0 {
                return Err((at("local_port"), "must be 1-65535, got 0".into()));
            }
            let p = t.remote_port;
            if !(lo..=hi).contains(&p) {
                return Err((
                    at("remote_port"),
                    format!("{p} is outside proxy.tunnel.remote_port_range [{lo}, {hi}]"),
                ));
            }
            if own_ports.contains(&p) {
                return Err((
                    at("remote_port"),
                    format!("{p} is one of this proxy's own listener ports"),
                ));
            }
            if let Some(g) = &t.group {
                check_tunnel_name(g).map_err(|m| (at("group"), m))?;
            } else if t.balance.is_some() {
                return Err((at("balance"), "applies to tunnels in a group only".into()));
            }
            let group = t.group.as_deref();
            match ports.get(&p) {
                None => {
                    ports.insert(p, (here.clone(), group, t.kind, i));
                }
                // Another client's member of the same group: it joins the port.
                Some((_, Some(g), kind, client))
                    if group == Some(*g) && *kind == t.kind && *client != i => {}
                Some((holder, g, _, _)) => {
                    let why = match (g, group) {
                        (Some(g), Some(mine)) if *g == mine => {
                            " (a group's members are tunnels of different clients, of one type)"
                                .to_string()
                        }
                        (Some(g), _) => format!(" (group {g})"),
                        _ => String::new(),
                    };
                    return Err((
                        at("remote_port"),
                        format!("{p} is already taken by {holder}{why}"),
                    ));
                }
            }
            if t.max_connections == Some(0) {
                return Err((at("max_connections"), "must be at least 1, got 0".into()));
            }
            if let Some((field, why)) = t.health_check.as_ref().and_then(|h| h.to_check().problem())
            {
                return Err((at(&format!("health_check.{field}")), why));
            }
            if let Some(b) = t.max_bytes_per_second
                && !(MIN_BYTES_PER_SECOND..=MAX_BYTES_PER_SECOND).contains(&b)
            {
                return Err((
                    at("max_bytes_per_second"),
                    format!(
                        "must be {MIN_BYTES_PER_SECOND}-{MAX_BYTES_PER_SECOND} (1 KiB/s to 100 GiB/s), got {b}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, token: Option<&str>, file: Option<&str>) -> TunnelClientEntry {
        TunnelClientEntry {
            client_id: id.into(),
            token: token.map(str::to_string),
            token_file: file.map(PathBuf::from),
            tunnels: Vec::new(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn checks_clients_and_the_mappings_naming_them() {
        let ok = || {
            vec![
                client("laptop", Some("t"), None),
                client("lan-1", None, Some("/f")),
            ]
        };
        type Case = (
            Vec<TunnelClientEntry>,
            bool,
            Vec<Option<String>>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (ok(), false, vec![None, Some("laptop".into())], None),
            (ok(), true, vec![], Some("tunnel_clients")),
            (
                vec![client("", Some("t"), None)],
                false,
                vec![],
                Some("tunnel_clients[0].client_id"),
            ),
            (
                vec![client("a/b", Some("t"), None)],
                false,
                vec![],
                Some("tunnel_clients[0].client_id"),
            ),
            (
                vec![client("a", Some("t"), Some("/f"))],
                false,
                vec![],
                Some("tunnel_clients[0].token"),
            ),
            (
                vec![client("a", None, None)],
                false,
                vec![],
                Some("tunnel_clients[0].token"),
            ),
            (
                vec![client("a", Some(" "), None)],
                false,
                vec![],
                Some("tunnel_clients[0].token"),
            ),
            (
                vec![client("a", Some("t"), None), client("a", Some("u"), None)],
                false,
                vec![],
                Some("tunnel_clients[1].client_id"),
            ),
            (
                ok(),
                false,
                vec![None, Some("ghost".into())],
                Some("mappings[1].target_client_id"),
            ),
        ];
        for (clients, redis, mappings, want) in cases {
            let got = check_clients(&clients, redis, &mappings, &Default::default(), &[]);
            assert_eq!(got.as_ref().err().map(|e| e.0.as_str()), want, "{got:?}");
        }
        let err = check_clients(
            &ok(),
            false,
            &[Some("ghost".into())],
            &Default::default(),
            &[],
        )
        .unwrap_err();
        assert!(err.1.contains("ghost"), "{err:?}");
    }

    #[test]
    fn checks_tunnels() {
        let tcp = |name: &str, remote: u16| TunnelEntry {
            name: name.into(),
            kind: TunnelKind::Tcp,
            local_host: "127.0.0.1".into(),
            local_port: 22,
            remote_port: remote,
            max_connections: None,
            max_bytes_per_second: None,
            group: None,
            balance: None,
            health_check: None,
            udp_session_timeout: None,
        };
        let with = |tunnels: Vec<TunnelEntry>| {
            let mut c = client("laptop", Some("t"), None);
            c.tunnels = tunnels;
            c
        };
        let on = TunnelListenerConfig {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            insecure: true,
            ..Default::default()
        };
        let edit = |f: &dyn Fn(&mut TunnelEntry)| {
            let mut t = tcp("ssh", 2222);
            f(&mut t);
            vec![with(vec![t])]
        };
        type Case = (Vec<TunnelClientEntry>, Option<&'static str>, &'static str);
        let grouped = |name: &str, group: Option<&str>| {
            let mut t = tcp(name, 2222);
            t.group = group.map(Into::into);
            t
        };
        let other = |tunnels: Vec<TunnelEntry>| {
            let mut c = with(tunnels);
            c.client_id = "other".into();
            c
        };
        let cases: Vec<Case> = vec![
            (
                vec![with(vec![tcp("ssh", 2222), tcp("db", 5433)])],
                None,
                "",
            ),
            // Two clients' tunnels of one group share the port.
            (
                vec![
                    with(vec![grouped("web", Some("web"))]),
                    other(vec![grouped("web", Some("web"))]),
                ],
                None,
                "",
            ),
            (
                vec![
                    with(vec![grouped("web", Some("web"))]),
                    other(vec![grouped("web", Some("api"))]),
                ],
                Some("tunnel_clients[1].tunnels[0].remote_port"),
                "(group web)",
            ),
            (
                vec![
                    with(vec![grouped("web", Some("web"))]),
                    other(vec![grouped("web", None)]),
                ],
                Some("tunnel_clients[1].tunnels[0].remote_port"),
                "(group web)",
            ),
            (
                vec![with(vec![
                    grouped("web", Some("web")),
                    grouped("web2", Some("web")),
                ])],
                Some("tunnel_clients[0].tunnels[1].remote_port"),
                "different clients",
            ),
            (
                vec![
                    with(vec![grouped("web", Some("web"))]),
                    other(vec![{
                        let mut t = grouped("web", Some("web"));
                        t.kind = TunnelKind::Udp;
                        t
                    }]),
                ],
                Some("tunnel_clients[1].tunnels[0].remote_port"),
                "of one type",
            ),
            (
                edit(&|t| t.group = Some("Web Group".into())),
                Some("tunnel_clients[0].tunnels[0].group"),
                "Web Group",
            ),
            (
                edit(&|t| t.balance = Some(crate::domain::Balance::LeastConnections)),
                Some("tunnel_clients[0].tunnels[0].balance"),
                "group only",
            ),
            (
                vec![with(vec![tcp("ssh", 2222), tcp("ssh", 2223)])],
                Some("tunnel_clients[0].tunnels[1].name"),
                "already",
            ),
            (
                vec![with(vec![tcp("ssh", 2222)]), {
                    let mut c = with(vec![tcp("web", 2222)]);
                    c.client_id = "other".into();
                    c
                }],
                Some("tunnel_clients[1].tunnels[0].remote_port"),
                "tunnel_clients[0].tunnels[0]",
            ),
            (
                edit(&|t| t.name = "SSH".into()),
                Some("tunnel_clients[0].tunnels[0].name"),
                "SSH",
            ),
            (edit(&|t| t.kind = TunnelKind::Udp), None, ""),
            (
                edit(&|t| t.udp_session_timeout = Some(Dur::secs(5))),
                Some("tunnel_clients[0].tunnels[0].udp_session_timeout"),
                "udp tunnels only",
            ),
            (
                edit(&|t| {
                    t.kind = TunnelKind::Udp;
                    t.udp_session_timeout = Some(Dur::secs(0));
                }),
                Some("tunnel_clients[0].tunnels[0].udp_session_timeout"),
                "0s",
            ),
            (
                edit(&|t| t.local_host = "a b".into()),
                Some("tunnel_clients[0].tunnels[0].local_host"),
                "a b",
            ),
            (edit(&|t| t.local_host = "[::1]".into()), None, ""),
            (
                edit(&|t| t.local_port = 0),
                Some("tunnel_clients[0].tunnels[0].local_port"),
                "0",
            ),
            (
                edit(&|t| t.remote_port = 80),
                Some("tunnel_clients[0].tunnels[0].remote_port"),
                "80",
            ),
            (
                edit(&|t| t.remote_port = 8080),
                Some("tunnel_clients[0].tunnels[0].remote_port"),
                "own",
            ),
            (
                edit(&|t| t.max_connections = Some(0)),
                Some("tunnel_clients[0].tunnels[0].max_connections"),
                "0",
            ),
            (
                edit(&|t| t.max_bytes_per_second = Some(10)),
                Some("tunnel_clients[0].tunnels[0].max_bytes_per_second"),
                "got 10",
            ),
        ];
        for (clients, want, says) in cases {
            let got = check_clients(&clients, false, &[], &on, &[8080, 9090, 7000]);
            assert_eq!(got.as_ref().err().map(|e| e.0.as_str()), want, "{got:?}");
            if let Err((_, msg)) = got {
                assert!(msg.contains(says), "{msg}");
            }
        }
        // Without the tunnel listener nothing can carry them.
        let got = check_clients(&edit(&|_| {}), false, &[], &Default::default(), &[]);
        assert_eq!(got.unwrap_err().0, "tunnel_clients[0].tunnels[0]");
        let bad_range = TunnelListenerConfig {
            remote_port_range: [3000, 2000],
            ..on.clone()
        };
        let got = check_clients(&edit(&|_| {}), false, &[], &bad_range, &[]);
        assert_eq!(got.unwrap_err().0, "proxy.tunnel.remote_port_range");
    }

    /// The checks run from `resolve` on a whole file, and name the field and the value.
    #[test]
    fn a_whole_file_is_checked() {
        let resolve = |yaml: &str| {
            let env: Vec<(String, String)> = Vec::new();
            crate::config::parse(yaml, "t.yaml", &env)
                .and_then(|c| crate::config::resolve(c, "t.yaml"))
        };
        let base = "storage: {type: memory}\nhttp_domain: {base_domains: [tunnox.net]}\n";
        let ok = format!(
            "{base}tunnel_clients: [{{client_id: laptop, token: t}}]\nmappings:\n  - {{subdomain: app, base_domain: tunnox.net, target_client_id: laptop, target_host: localhost, target_port: 3000}}\nproxy: {{tunnel: {{listen: \"127.0.0.1:7000\", insecure: true}}}}\n"
        );
        let s = resolve(&ok).unwrap();
        assert_eq!(s.config.tunnel_clients.len(), 1);
        let cases = [
            (
                ok.replace("target_client_id: laptop", "target_client_id: ghost"),
                "mappings[0].target_client_id",
                "ghost",
            ),
            (
                ok.replace(", insecure: true", ""),
                "proxy.tunnel.cert_file",
                "required",
            ),
            (
                ok.replace("listen: \"127.0.0.1:7000\", ", "heartbeat_interval: 0s, "),
                "proxy.tunnel.heartbeat_interval",
                "0s",
            ),
        ];
        for (yaml, field, what) in cases {
            let e = resolve(&yaml).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(what), "{field}: {e}");
        }

        // Group targets: served by the clients listing the group.
        let group = format!(
            "{base}tunnel_clients: [{{client_id: a, token: t, groups: [site]}}, {{client_id: b, token: t, groups: [site, other]}}]\nmappings:\n  - {{subdomain: app, base_domain: tunnox.net, target_group: site, balance: least_connections, target_host: localhost, target_port: 3000}}\nproxy: {{tunnel: {{listen: \"127.0.0.1:7000\", insecure: true}}}}\n"
        );
        let s = resolve(&group).unwrap();
        assert_eq!(group_members(&s.config.tunnel_clients, "site"), ["a", "b"]);
        assert_eq!(group_members(&s.config.tunnel_clients, "other"), ["b"]);
        let cases = [
            (
                group.replace("target_group: site", "target_group: nobody"),
                "mappings[0].target_group",
                "\"nobody\" is not in the groups",
            ),
            (
                group.replace(
                    "target_group: site",
                    "target_group: site, target_client_id: a",
                ),
                "mappings[0].target_group",
                "not both",
            ),
            (
                group.replace("target_group: site, ", ""),
                "mappings[0].balance",
                "target_group only",
            ),
            (
                group.replace("groups: [site, other]", "groups: [site, Site]"),
                "tunnel_clients[1].groups[1]",
                "\"Site\"",
            ),
            (
                group.replace("groups: [site, other]", "groups: [site, site]"),
                "tunnel_clients[1].groups[1]",
                "twice",
            ),
        ];
        for (yaml, field, what) in cases {
            let e = resolve(&yaml).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(what), "{field}: {e}");
        }
    }

    #[test]
    fn checks_the_listener() {
        let on = |f: &dyn Fn(&mut TunnelListenerConfig)| {
            let mut t = TunnelListenerConfig {
                listen: Some("127.0.0.1:7000".parse().unwrap()),
                cert_file: Some("/c".into()),
                key_file: Some("/k".into()),
                ..Default::default()
            };
            f(&mut t);
            check_listener(&t).err().map(|e| e.0)
        };
        type Edit<'a> = &'a dyn Fn(&mut TunnelListenerConfig);
        let cases: Vec<(Edit, Option<&str>)> = vec![
            (&|_| {}, None),
            (&|t| t.cert_file = None, Some("proxy.tunnel.cert_file")),
            (&|t| t.key_file = None, Some("proxy.tunnel.key_file")),
            (
                &|t| {
                    t.key_file = None;
                    t.cert_file = None;
                    t.insecure = true
                },
                None,
            ),
            (
                &|t| t.heartbeat_interval = Dur::secs(0),
                Some("proxy.tunnel.heartbeat_interval"),
            ),
            (
                &|t| t.handshake_timeout = Dur::secs(0),
                Some("proxy.tunnel.handshake_timeout"),
            ),
            (&|t| t.max_sessions = 0, Some("proxy.tunnel.max_sessions")),
            (
                &|t| t.max_streams_per_session = 0,
                Some("proxy.tunnel.max_streams_per_session"),
            ),
            (
                &|t| t.advertise_address = Some("nohost".into()),
                Some("proxy.tunnel.advertise_address"),
            ),
            (
                &|t| t.advertise_address = Some("10.0.0.1:7000".into()),
                None,
            ),
        ];
        for (i, (f, want)) in cases.into_iter().enumerate() {
            assert_eq!(on(f).as_deref(), want, "case {i}");
        }
        // Off: nothing is required.
        assert!(check_listener(&TunnelListenerConfig::default()).is_ok());
    }
}
