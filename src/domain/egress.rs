//! Where a mapping may send traffic: the egress policy the controller applies when it admits a
//! target and the proxy applies again to every address it is about to connect to (the last
//! line: a record planted in the store never reaches what the policy denies). Pure; see
//! docs/security.md for the threat model.
//!
//! Order of the checks (the first that matches decides):
//! 1. the proxy's own listeners: refused always, whoever declared the target;
//! 2. `egress.deny` entries;
//! 3. `egress.allow` entries;
//! 4. addresses no tenant should reach: unspecified (`0.0.0.0/8`, `::`), loopback, link-local
//!    (incl. the cloud metadata address `169.254.169.254`), multicast, broadcast — refused for
//!    tenants; loopback is open to the operator's own single-node file mappings;
//! 5. in cluster mode, a name of a Service in another namespace (`svc.ns.svc[.cluster-domain]`);
//! 6. everything else is allowed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Who declared a target. Tenants (custom resources, the API) get every denial; the operator's
/// own single-node file mappings may reach loopback, which is the point of a single-node proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declarer {
    Tenant,
    Operator,
}

/// One `egress.allow` / `egress.deny` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// A CIDR or a single address, optionally with one port.
    Net { net: IpNet, port: Option<u16> },
    /// A host name (`api.example.com`) or every name below a suffix (`*.example.com`),
    /// optionally with one port. Matches names as declared, not addresses.
    Host { pattern: String, port: Option<u16> },
}

impl Rule {
    /// Parses `10.0.0.0/8`, `10.1.2.3:8080`, `[fd00::/8]:80`, `::1`, `api.example.com`,
    /// `*.example.com:443`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let text = raw.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        if let Some(net) = parse_net(text) {
            return Ok(Self::Net { net, port: None });
        }
        let (body, port) = split_port(text)?;
        if let Some(net) = parse_net(body.trim_start_matches('[').trim_end_matches(']')) {
            return Ok(Self::Net { net, port });
        }
        let pattern = body.to_ascii_lowercase();
        let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{raw:?} is neither a CIDR, an address nor a host name pattern (e.g. 10.0.0.0/8, \
                 192.0.2.7:8080, api.example.com, *.example.com:443)"
            ));
        }
        Ok(Self::Host { pattern, port })
    }

    fn port_matches(port: Option<u16>, want: u16) -> bool {
        port.is_none_or(|p| p == want)
    }

    fn matches_addr(&self, addr: SocketAddr) -> bool {
        match self {
            Self::Net { net, port } => {
                Self::port_matches(*port, addr.port()) && net.contains(&canonical(addr.ip()))
            }
            Self::Host { .. } => false,
        }
    }

    fn matches_name(&self, host: &str, port: u16) -> bool {
        match self {
            Self::Host { pattern, port: p } => {
                Self::port_matches(*p, port)
                    && match pattern.strip_prefix("*.") {
                        Some(suffix) => host
                            .strip_suffix(suffix)
                            .is_some_and(|rest| rest.ends_with('.')),
                        None => host == pattern,
                    }
            }
            Self::Net { .. } => false,
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Net { net, port: None } => write!(f, "{net}"),
            Self::Net {
                net: IpNet::V6(n),
                port: Some(p),
            } => write!(f, "[{n}]:{p}"),
            Self::Net { net, port: Some(p) } => write!(f, "{net}:{p}"),
            Self::Host {
                pattern,
                port: None,
            } => write!(f, "{pattern}"),
            Self::Host {
                pattern,
                port: Some(p),
            } => write!(f, "{pattern}:{p}"),
        }
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// `body:port`; a bare IPv6 address has colons of its own and no port unless bracketed.
fn split_port(text: &str) -> Result<(&str, Option<u16>), String> {
    let Some((body, port)) = text.rsplit_once(':') else {
        return Ok((text, None));
    };
    if body.contains(':') && !body.ends_with(']') {
        return Ok((text, None));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?}: port {port:?} is not 1-65535"))?;
    Ok((body, Some(port)))
}

/// Why a target is refused. Names the target and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{target} is one of the proxy's own listeners")]
    OwnListener { target: String },
    #[error("{target} is denied by egress.deny entry {rule}")]
    Denied { target: String, rule: String },
    #[error(
        "{target} is a {kind} address, which mappings may not reach (an operator can allow it with egress.allow)"
    )]
    Reserved { target: String, kind: &'static str },
    #[error(
        "{target} names a Service in namespace {namespace}; an address target may only name Services of its own namespace ({own})"
    )]
    OtherNamespace {
        target: String,
        namespace: String,
        own: String,
    },
}

impl Refusal {
    /// A bounded label for metrics and the status reason's detail.
    pub fn label(&self) -> &'static str {
        match self {
            Self::OwnListener { .. } => "own_listener",
            Self::Denied { .. } => "denied",
            Self::Reserved { .. } => "reserved",
            Self::OtherNamespace { .. } => "other_namespace",
        }
    }
}

/// The egress policy of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    /// Addresses this process listens on; an unspecified IP stands for every local address.
    own: Vec<SocketAddr>,
    /// Local addresses besides loopback (e.g. the pod IP), for own listeners bound to all.
    local_ips: Vec<IpAddr>,
    /// Kubernetes cluster domain (`cluster.local`) for recognising Service names.
    cluster_domain: String,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            own: Vec::new(),
            local_ips: Vec::new(),
            cluster_domain: "cluster.local".into(),
        }
    }
}

impl EgressPolicy {
    pub fn new(allow: Vec<Rule>, deny: Vec<Rule>, cluster_domain: &str) -> Self {
        Self {
            allow,
            deny,
            cluster_domain: cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
            ..Self::default()
        }
    }

    /// Adds this process's listeners (refused as targets whatever else says).
    pub fn with_own_listeners(
        mut self,
        listeners: impl IntoIterator<Item = SocketAddr>,
        local_ips: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        self.own.extend(listeners);
        self.local_ips.extend(local_ips.into_iter().map(canonical));
        self
    }

    /// The Kubernetes cluster domain Service names end in (`cluster.local`).
    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    pub fn allow(&self) -> &[Rule] {
        &self.allow
    }

    pub fn deny(&self) -> &[Rule] {
        &self.deny
    }

    /// A target as declared (a name or an address literal), before anything is resolved. With
    /// `namespace` (cluster mode: the mapping's namespace), Service names of other namespaces
    /// are refused. Names are checked again by address when the proxy connects.
    pub fn check_declared(
        &self,
        host: &str,
        port: u16,
        namespace: Option<&str>,
        who: Declarer,
    ) -> Result<(), Refusal> {
        let name = normalise(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.check_connect(None, SocketAddr::new(ip, port), who);
        }
        let target = || format!("{name}:{port}");
        if let Some(rule) = self.deny.iter().find(|r| r.matches_name(&name, port)) {
            return Err(Refusal::Denied {
                target: target(),
                rule: rule.to_string(),
            });
        }
        if self.allow.iter().any(|r| r.matches_name(&name, port)) {
            return Ok(());
        }
        if name == "localhost" || name.ends_with(".localhost") {
            if who == Declarer::Operator {
                return Ok(());
            }
            return Err(Refusal::Reserved {
                target: target(),
                kind: "loopback",
            });
        }
        if let (Some(own), Some(theirs)) = (namespace, self.service_namespace(&name))
            && own != theirs
        {
            return Err(Refusal::OtherNamespace {
                target: target(),
                namespace: theirs.to_string(),
                own: own.to_string(),
            });
        }
        Ok(())
    }

    /// An address the proxy is about to connect to, resolved from `host` (`None` when the
    /// target was an address literal). Host rules match the declared name.
    pub fn check_connect(
        &self,
        host: Option<&str>,
        addr: SocketAddr,
        who: Declarer,
    ) -> Result<(), Refusal> {
        let ip = canonical(addr.ip());
        let addr = SocketAddr::new(ip, addr.port());
        let name = host.map(normalise);
        let target = || match &name {
            Some(n) => format!("{n}:{} ({})", addr.port(), addr.ip()),
            None => addr.to_string(),
        };
        if self.is_own(addr) {
            return Err(Refusal::OwnListener { target: target() });
        }
        let by_name = |r: &Rule| {
            name.as_deref()
                .is_some_and(|n| r.matches_name(n, addr.port()))
        };
        if let Some(rule) = self
            .deny
            .iter()
            .find(|r| r.matches_addr(addr) || by_name(r))
        {
            return Err(Refusal::Denied {
                target: target(),
                rule: rule.to_string(),
            });
        }
        if self
            .allow
            .iter()
            .any(|r| r.matches_addr(addr) || by_name(r))
        {
            return Ok(());
        }
        match reserved_kind(ip) {
            Some("loopback") if who == Declarer::Operator => Ok(()),
            Some(kind) => Err(Refusal::Reserved {
                target: target(),
                kind,
            }),
            None => Ok(()),
        }
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip();
        // Connecting to 0.0.0.0 or :: reaches local listeners too.
        let local = |ip: IpAddr| ip.is_loopback() || ip.is_unspecified();
        self.own.iter().any(|o| {
            o.port() == addr.port()
                && (canonical(o.ip()) == ip
                    || (local(ip) && local(canonical(o.ip())))
                    || (o.ip().is_unspecified() && self.local_ips.contains(&ip)))
        })
    }

    /// The namespace a Service name points into: `svc.ns.svc`, `svc.ns.svc.<cluster domain>`,
    /// and the pod forms below them (`pod.svc.ns.svc…`).
    fn service_namespace<'a>(&self, name: &'a str) -> Option<&'a str> {
        let base = name
            .strip_suffix(&format!(".{}", self.cluster_domain))
            .unwrap_or(name);
        let rest = base.strip_suffix(".svc")?;
        let ns = rest.rsplit('.').next()?;
        (ns != rest).then_some(ns)
    }
}

/// Lower case, no trailing dot, no IPv6 brackets.
fn normalise(host: &str) -> String {
    host.trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// IPv4-mapped and NAT64 IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96 (RFC 6052) embeds an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// The kind of address no tenant may reach by default, if `ip` is one.
fn reserved_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.octets()[0] == 0 {
                // 0.0.0.0/8 ("this network"): connecting to it reaches local listeners.
                Some("unspecified")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if is_v6_link_local(v6) {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn is_v6_link_local(v6: Ipv6Addr) -> bool {
    (v6.segments()[0] & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[&str]) -> Vec<Rule> {
        list.iter().map(|r| Rule::parse(r).unwrap()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy::new(rules(allow), rules(deny), "cluster.local").with_own_listeners(
            [
                "0.0.0.0:8080".parse().unwrap(),
                "127.0.0.1:9090".parse().unwrap(),
            ],
            ["10.244.1.7".parse().unwrap()],
        )
    }

    #[test]
    fn parses_rules() {
        let ok = [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("10.1.2.3:8080", "10.1.2.3/32:8080"),
            ("10.1.2.9/24", "10.1.2.0/24"),
            ("::1", "::1/128"),
            ("[fd00::/8]:80", "[fd00::/8]:80"),
            ("Api.Example.com", "api.example.com"),
            ("*.example.com:443", "*.example.com:443"),
        ];
        for (raw, want) in ok {
            assert_eq!(Rule::parse(raw).unwrap().to_string(), want, "{raw}");
        }
        for bad in [
            "",
            "10.0.0.0/33",
            "a..b",
            "x.com:0",
            "x.com:99999",
            "*.",
            "a b",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn decides_addresses() {
        use Declarer::{Operator, Tenant};
        let p = policy(&["127.0.0.1:3000", "169.254.10.0/24"], &["10.96.0.0/12"]);
        // (address, declarer, expected label or "" for allowed)
        let cases = [
            ("127.0.0.1:9090", Tenant, "own_listener"),
            ("127.0.0.1:9090", Operator, "own_listener"),
            ("127.0.0.5:8080", Operator, "own_listener"),
            ("0.0.0.0:8080", Operator, "own_listener"),
            ("[::ffff:127.0.0.1]:9090", Operator, "own_listener"),
            ("10.244.1.7:8080", Tenant, "own_listener"),
            ("10.244.1.7:8081", Tenant, ""),
            ("127.0.0.1:6379", Tenant, "reserved"),
            ("127.0.0.1:6379", Operator, ""),
            ("127.0.0.1:3000", Tenant, ""),
            ("[::1]:80", Tenant, "reserved"),
            ("[::ffff:127.0.0.1]:80", Tenant, "reserved"),
            ("[64:ff9b::7f00:1]:80", Tenant, "reserved"),
            ("169.254.169.254:80", Tenant, "reserved"),
            ("169.254.169.254:80", Operator, "reserved"),
            ("169.254.10.20:80", Tenant, ""),
            ("[fe80::1]:80", Tenant, "reserved"),
            ("0.1.2.3:80", Tenant, "reserved"),
            ("[::]:80", Tenant, "reserved"),
            ("224.0.0.1:80", Tenant, "reserved"),
            ("255.255.255.255:80", Tenant, "reserved"),
            ("10.96.0.10:53", Tenant, "denied"),
            ("10.1.2.3:80", Tenant, ""),
            ("93.184.216.34:443", Tenant, ""),
        ];
        for (addr, who, want) in cases {
            let got = match p.check_connect(None, addr.parse().unwrap(), who) {
                Ok(()) => "",
                Err(e) => e.label(),
            };
            assert_eq!(got, want, "{addr} as {who:?}");
        }
    }

    #[test]
    fn decides_declared_names() {
        use Declarer::{Operator, Tenant};
        let p = policy(&["*.trusted.example"], &["evil.example.com"]);
        let ns = Some("team-a");
        let cases = [
            ("web.team-a.svc.cluster.local", 80, ns, Tenant, ""),
            (
                "web.team-b.svc.cluster.local",
                80,
                ns,
                Tenant,
                "other_namespace",
            ),
            (
                "WEB.team-b.svc.cluster.local.",
                80,
                ns,
                Tenant,
                "other_namespace",
            ),
            ("web.team-b.svc", 80, ns, Tenant, "other_namespace"),
            (
                "pod-1.web.team-b.svc.cluster.local",
                80,
                ns,
                Tenant,
                "other_namespace",
            ),
            // Single-node has no namespaces.
            ("web.team-b.svc.cluster.local", 80, None, Tenant, ""),
            ("localhost", 80, ns, Tenant, "reserved"),
            ("a.localhost", 80, ns, Tenant, "reserved"),
            ("localhost", 80, None, Operator, ""),
            ("evil.example.com", 80, ns, Tenant, "denied"),
            ("x.trusted.example", 80, ns, Tenant, ""),
            ("127.0.0.1", 9090, ns, Tenant, "own_listener"),
            ("[::1]", 80, ns, Tenant, "reserved"),
            ("169.254.169.254", 80, ns, Tenant, "reserved"),
            ("api.example.com", 443, ns, Tenant, ""),
        ];
        for (host, port, ns, who, want) in cases {
            let got = match p.check_declared(host, port, ns, who) {
                Ok(()) => "",
                Err(e) => e.label(),
            };
            assert_eq!(got, want, "{host}:{port} ns {ns:?} as {who:?}");
        }
    }

    #[test]
    fn names_apply_to_resolved_addresses() {
        let p = policy(&["metadata.internal"], &["*.blocked.example"]);
        let meta: SocketAddr = "169.254.169.254:80".parse().unwrap();
        assert!(
            p.check_connect(Some("metadata.internal"), meta, Declarer::Tenant)
                .is_ok()
        );
        assert!(p.check_connect(None, meta, Declarer::Tenant).is_err());
        let public: SocketAddr = "93.184.216.34:80".parse().unwrap();
        let err = p
            .check_connect(Some("a.blocked.example"), public, Declarer::Tenant)
            .unwrap_err();
        assert!(err.to_string().contains("a.blocked.example:80"), "{err}");
        // Own listeners cannot be allowed by name.
        let own: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let p = policy(&["localhost", "127.0.0.0/8"], &[]);
        assert_eq!(
            p.check_connect(Some("localhost"), own, Declarer::Operator)
                .unwrap_err()
                .label(),
            "own_listener"
        );
    }
}
