//! A mapping compiled for the request path (parsed once when cached), the pure decision
//! whether this proxy serves it (ARCHITECTURE §7), and whether the egress policy lets its
//! declared target through (kept once it passed).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderName, HeaderValue};

use super::ProxyError;
use crate::domain::{
    Balance, Decision, Declarer, EgressPolicy, Mapping, MappingId, MappingStatus, MappingTls,
    RESERVED_HEADERS, Refusal, Scheme, SetName, TargetGroup, decide,
};

/// The `source` of mappings declared in a single-node configuration file.
pub const CONFIG_SOURCE: &str = "config";

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directly reachable upstream.
    Direct {
        scheme: UriScheme,
        authority: Authority,
    },
    /// A service behind a tunnel client: `authority` is the agent-side `host:port` (sent as
    /// `tunnox-target`; the agent's allow-list judges it, not this proxy's egress policy).
    Tunnel {
        client_id: Box<str>,
        authority: Authority,
    },
    /// A service behind each member of a load-balancing group of tunnel clients.
    TunnelGroup {
        group: Arc<GroupRoute>,
        authority: Authority,
    },
    /// A record that cannot be routed (should have been refused at write time).
    Invalid { reason: Box<str> },
}

/// A group target's members and how requests are spread over them; the turn counter lives as
/// long as the route (a new version of the mapping starts it again).
#[derive(Debug)]
pub struct GroupRoute {
    pub name: String,
    pub clients: Vec<String>,
    pub balance: Balance,
    pub turn: AtomicUsize,
}

impl GroupRoute {
    pub fn new(g: &TargetGroup) -> Self {
        Self {
            name: g.name.clone(),
            clients: g.clients.clone(),
            balance: g.balance,
            // A route is rebuilt whenever it is loaded again (cache expiry, a new version):
            // starting each at a random member keeps one member from taking every first turn.
            turn: AtomicUsize::new(random_start()),
        }
    }
}

fn random_start() -> usize {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now()) as usize
}

/// Equal when they route alike: the turn counter is state, not identity.
impl PartialEq for GroupRoute {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, &self.clients, self.balance) == (&other.name, &other.clients, other.balance)
    }
}

impl Eq for GroupRoute {}

/// A table holds millions of routes (issue: scale; docs/proxy.md "Route memory"). A route is
/// one 64-byte struct (an 80-byte allocation with its reference counts) and one string: the
/// host followed by the target's `host:port`. The id is its ULID's 16 bytes, the namespace an
/// index into one shared copy of each name, the target one byte of kind; what most routes lack
/// (a tunnel client, a group, custom headers, a placement, TLS, an upstream protocol) is behind
/// one box.
///
/// In declared order: what a cache lookup reads (the host, when the route was taken in) comes
/// first, next to the reference counts, so a lookup of a route not in the CPU's cache mostly
/// touches one cache line of it.
#[derive(Debug)]
#[repr(C)]
pub struct Route {
    /// The host, then the target's `host:port` (empty for an invalid target).
    text: Box<str>,
    /// When the route cache took the route in: microseconds from its clock base.
    loaded_at: AtomicU64,
    /// The length of the host at the start of `text` (a hostname has at most 253 bytes).
    host_len: u8,
    kind: Kind,
    flags: u8,
    /// Set once the egress policy let the declared target through: judged at the first request
    /// and kept when it passed; a refusal is judged again at each request (rare, and it fails
    /// its request anyway).
    admitted: AtomicBool,
    /// The namespace of the resource the record came from (`k8s:…` sources), for the egress
    /// rule on other namespaces' Services: an index into [`NAMES`] (0: none, or kept in the
    /// extras once the names are full).
    namespace: u32,
    version: u64,
    /// What most routes lack; `None` when they have none of it.
    extras: Option<Box<Extras>>,
    /// The mapping id's ULID ([`Route::mapping_id`] writes it out again).
    id: [u8; 16],
}

// A route's host length is held in one byte.
const _: () = assert!(crate::domain::MAX_HOSTNAME_LEN <= u8::MAX as usize);

/// The target's kind; a tunnel's client, a group's members and an invalid record's reason are
/// in the extras.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Https,
    Tunnel,
    Group,
    Invalid,
}

const ACTIVE: u8 = 1;
/// Declared in a single-node configuration file (the operator's own, when the proxy runs
/// without Redis).
const FROM_CONFIG: u8 = 2;

/// Equal when they route alike: when it was cached and the egress verdict are state.
impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.text,
            self.id,
            self.version,
            &self.extras,
            self.namespace,
            self.host_len,
            self.kind,
            self.flags,
        ) == (
            &other.text,
            other.id,
            other.version,
            &other.extras,
            other.namespace,
            other.host_len,
            other.kind,
            other.flags,
        )
    }
}

impl Eq for Route {}

/// The settings of a route that most routes lack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Extras {
    /// The mapping's custom headers, validated.
    headers: Box<[(HeaderName, HeaderValue)]>,
    placement: Option<SetName>,
    /// HTTPS settings: the certificate's source, the redirect of plain requests.
    tls: Option<MappingTls>,
    /// How a direct target is spoken to when not HTTP/1.1 with the public roots.
    upstream: Option<Arc<super::upstream::UpstreamRoute>>,
    /// What the target's kind needs besides its `host:port`.
    detail: Option<Detail>,
    /// The namespace, when the shared names were full.
    namespace: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Detail {
    Client(Box<str>),
    Group(Arc<GroupRoute>),
    Invalid(Box<str>),
}

impl Extras {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One shared copy of each namespace name, found by its index: a cluster's routes name a few
/// namespaces many times. Bounded: past `MAX_NAMES` names a route keeps its own copy in its
/// extras. Names are never dropped (names of deleted namespaces stay, up to the bound).
struct Names {
    index: std::collections::HashMap<Arc<str>, u32>,
    /// `names[i - 1]` is the name of index `i`.
    names: Vec<Arc<str>>,
}

const MAX_NAMES: usize = 1 << 16;

static NAMES: std::sync::RwLock<Option<Names>> = std::sync::RwLock::new(None);

/// The index of `namespace`'s shared copy; `None` when the names are full.
fn intern(namespace: &str) -> Option<u32> {
    if let Some(names) = &*NAMES.read().unwrap_or_else(|p| p.into_inner())
        && let Some(&i) = names.index.get(namespace)
    {
        return Some(i);
    }
    let mut guard = NAMES.write().unwrap_or_else(|p| p.into_inner());
    let names = guard.get_or_insert_with(|| Names {
        index: Default::default(),
        names: Vec::new(),
    });
    if let Some(&i) = names.index.get(namespace) {
        return Some(i);
    }
    if names.names.len() >= MAX_NAMES {
        return None;
    }
    let name: Arc<str> = Arc::from(namespace);
    names.names.push(name.clone());
    let i = u32::try_from(names.names.len()).ok()?;
    names.index.insert(name, i);
    Some(i)
}

fn interned(i: u32) -> Option<Arc<str>> {
    let guard = NAMES.read().unwrap_or_else(|p| p.into_inner());
    guard
        .as_ref()?
        .names
        .get(usize::try_from(i).ok()?.checked_sub(1)?)
        .cloned()
}

impl Route {
    pub fn from_mapping(m: &Mapping) -> Self {
        let (upstream, direct) = match super::upstream::UpstreamRoute::build(&m.upstream) {
            Ok(u) => (u.map(Arc::new), direct_target(m)),
            Err(e) => (
                None,
                Target::Invalid {
                    reason: format!("upstream: {e}").into(),
                },
            ),
        };
        let target = match (&m.target_client_id, &m.target_group, direct) {
            (_, _, invalid @ Target::Invalid { .. }) => invalid,
            (Some(_), Some(_), _) => Target::Invalid {
                reason: "the record names both a tunnel client and a group".into(),
            },
            (Some(client), None, Target::Direct { authority, .. }) => Target::Tunnel {
                client_id: client.as_str().into(),
                authority,
            },
            (None, Some(g), Target::Direct { authority, .. }) if !g.clients.is_empty() => {
                Target::TunnelGroup {
                    group: Arc::new(GroupRoute::new(g)),
                    authority,
                }
            }
            (None, Some(g), _) => Target::Invalid {
                reason: format!("tunnel group {} has no members", g.name).into(),
            },
            (None, None, direct) => direct,
            (_, _, other) => other,
        };
        let headers = m
            .custom_headers
            .iter()
            .filter_map(|(k, v)| {
                let name = HeaderName::from_bytes(k.as_bytes()).ok()?;
                let value = HeaderValue::from_str(v).ok()?;
                // Refused at write time; older records are filtered here. The hop header is the
                // proxy's own: a mapping that set it could hide a loop.
                (!RESERVED_HEADERS.contains(&name.as_str()) && name != super::policy::HOPS)
                    .then_some((name, value))
            })
            .collect();
        let (kind, authority, detail) = match target {
            Target::Direct { scheme, authority } if scheme == UriScheme::HTTPS => {
                (Kind::Https, Some(authority), None)
            }
            Target::Direct { authority, .. } => (Kind::Http, Some(authority), None),
            Target::Tunnel {
                client_id,
                authority,
            } => (
                Kind::Tunnel,
                Some(authority),
                Some(Detail::Client(client_id)),
            ),
            Target::TunnelGroup { group, authority } => {
                (Kind::Group, Some(authority), Some(Detail::Group(group)))
            }
            Target::Invalid { reason } => (Kind::Invalid, None, Some(Detail::Invalid(reason))),
        };
        let host = m.full_domain.as_str();
        let text = format!("{host}{}", authority.as_ref().map_or("", |a| a.as_str()));
        let namespace = m.source.as_deref().and_then(source_namespace);
        let shared = namespace.and_then(intern);
        let extras = Extras {
            headers,
            placement: m.placement.clone(),
            tls: m.tls.clone(),
            upstream,
            detail,
            namespace: namespace.filter(|_| shared.is_none()).map(Arc::from),
        };
        let mut flags = 0;
        if m.status == MappingStatus::Active {
            flags |= ACTIVE;
        }
        if m.source.as_deref() == Some(CONFIG_SOURCE) {
            flags |= FROM_CONFIG;
        }
        Self {
            text: text.into_boxed_str(),
            id: m.mapping_id.ulid_bytes(),
            version: m.version,
            extras: (!extras.is_empty()).then(|| Box::new(extras)),
            loaded_at: AtomicU64::new(0),
            namespace: shared.unwrap_or(0),
            // At most `MAX_HOSTNAME_LEN` bytes, which fits (checked below, at compile time).
            host_len: u8::try_from(host.len()).unwrap_or(u8::MAX),
            kind,
            flags,
            admitted: AtomicBool::new(false),
        }
    }

    /// The host this route serves.
    pub fn host(&self) -> &str {
        &self.text[..usize::from(self.host_len)]
    }

    /// The target's `host:port` as written (empty for an invalid target).
    fn authority(&self) -> &str {
        &self.text[usize::from(self.host_len)..]
    }

    pub fn mapping_id(&self) -> MappingId {
        MappingId::from_ulid_bytes(self.id)
    }

    /// The mapping id's ULID, as held (for comparing without writing the id out).
    pub(super) fn ulid_bytes(&self) -> [u8; 16] {
        self.id
    }

    /// The version of the record the route was compiled from.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_active(&self) -> bool {
        self.flags & ACTIVE != 0
    }

    /// Declared in a single-node configuration file.
    pub fn from_config(&self) -> bool {
        self.flags & FROM_CONFIG != 0
    }

    /// The namespace of the resource the record came from, if it came from one.
    pub fn namespace(&self) -> Option<Arc<str>> {
        match self.namespace {
            0 => self.extras.as_ref()?.namespace.clone(),
            i => interned(i),
        }
    }

    /// Where requests go, built again at each request from what the route holds (the
    /// `host:port` was checked when the route was compiled).
    pub fn target(&self) -> Target {
        let detail = self.extras.as_ref().and_then(|e| e.detail.as_ref());
        let authority = match (self.kind, detail) {
            (Kind::Invalid, Some(Detail::Invalid(reason))) => {
                return Target::Invalid {
                    reason: reason.clone(),
                };
            }
            _ => match Authority::try_from(self.authority()) {
                Ok(a) => a,
                Err(e) => {
                    return Target::Invalid {
                        reason: format!("target {}: {e}", self.authority()).into(),
                    };
                }
            },
        };
        match (self.kind, detail) {
            (Kind::Http, _) => Target::Direct {
                scheme: UriScheme::HTTP,
                authority,
            },
            (Kind::Https, _) => Target::Direct {
                scheme: UriScheme::HTTPS,
                authority,
            },
            (Kind::Tunnel, Some(Detail::Client(client_id))) => Target::Tunnel {
                client_id: client_id.clone(),
                authority,
            },
            (Kind::Group, Some(Detail::Group(group))) => Target::TunnelGroup {
                group: group.clone(),
                authority,
            },
            _ => Target::Invalid {
                reason: "the route lost its target".into(),
            },
        }
    }

    /// When the route cache took this route in (microseconds from its clock base).
    pub(super) fn loaded_at(&self) -> u64 {
        self.loaded_at.load(Ordering::Relaxed)
    }

    pub(super) fn set_loaded_at(&self, micros: u64) {
        self.loaded_at.store(micros, Ordering::Relaxed);
    }

    /// The mapping's custom headers, validated.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        self.extras.as_ref().map_or(&[], |e| &e.headers)
    }

    /// The set the mapping is placed in, if any.
    pub fn placed_in(&self) -> Option<&SetName> {
        self.extras.as_ref()?.placement.as_ref()
    }

    /// HTTPS settings: the certificate's source, the redirect of plain requests.
    pub fn tls(&self) -> Option<&MappingTls> {
        self.extras.as_ref()?.tls.as_ref()
    }

    /// How a direct target is spoken to when not HTTP/1.1 with the public roots.
    pub fn upstream(&self) -> Option<&super::upstream::UpstreamRoute> {
        self.extras.as_ref()?.upstream.as_deref()
    }

    /// Whether plain HTTP requests for this route are redirected to HTTPS.
    pub fn redirects_http(&self) -> bool {
        self.tls().is_some_and(|t| t.redirect_http)
    }

    /// Whether `policy` lets the declared target through for `who` (literal addresses are
    /// judged fully here; names again by address when connected). `who` is the same at every
    /// request of a route (see `Ctx::declarer`): once let through, a route is not judged
    /// again.
    pub fn check_declared(&self, policy: &EgressPolicy, who: Declarer) -> Result<(), Refusal> {
        if self.admitted.load(Ordering::Relaxed) {
            return Ok(());
        }
        let verdict = match self.kind {
            Kind::Http | Kind::Https => match Authority::try_from(self.authority()) {
                Ok(authority) => policy.check_declared(
                    authority.host(),
                    authority.port_u16().unwrap_or(80),
                    self.namespace().as_deref(),
                    who,
                ),
                // Not routed anyway (`target` answers invalid).
                Err(_) => Ok(()),
            },
            Kind::Tunnel | Kind::Group | Kind::Invalid => Ok(()),
        };
        if verdict.is_ok() {
            self.admitted.store(true, Ordering::Relaxed);
        }
        verdict
    }

    /// Where a proxy of set `me` sends this route's request (`domain::decide`): `None` to serve
    /// it here, or the set to forward it to. `healthy`: the sets with a healthy node, asked for
    /// only when the route has a placement (most do not); `forwarded`: a node of the fleet sent
    /// it here.
    pub fn placement<H: AsRef<[SetName]>>(
        &self,
        me: &SetName,
        healthy: impl FnOnce() -> H,
        forwarded: bool,
    ) -> Result<Option<SetName>, ProxyError> {
        let host = || self.host().to_string();
        if !self.is_active() {
            return Err(ProxyError::Inactive(host()));
        }
        let Some(placement) = self.placed_in() else {
            return Ok(None);
        };
        match decide(Some(placement), me, healthy().as_ref(), forwarded) {
            Decision::Here => Ok(None),
            Decision::Forward(set) => Ok(Some(set)),
            Decision::OtherBusiness => Err(ProxyError::OtherBusiness {
                host: host(),
                business: placement.business().to_string(),
            }),
            Decision::Unserved => Err(ProxyError::Unserved {
                host: host(),
                placement: placement.clone(),
            }),
        }
    }
}

/// The namespace in a record's `source`: `k8s:<namespace>/<name>`, or
/// `k8s:<cluster>/<namespace>/<name>` when the source carries a cluster identity.
pub fn source_namespace(source: &str) -> Option<&str> {
    let rest = source.strip_prefix("k8s:")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let ns = match parts.as_slice() {
        [ns, _name] | [_, ns, _name] => *ns,
        _ => return None,
    };
    (!ns.is_empty()).then_some(ns)
}

fn direct_target(m: &Mapping) -> Target {
    let host = match m.target_host.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]"),
        Err(_) => m.target_host.clone(),
    };
    let scheme = match (m.target_scheme, m.upstream.protocol) {
        // HTTP/2 over TLS whatever the scheme says.
        (_, crate::domain::Protocol::H2) | (Scheme::Https, _) => UriScheme::HTTPS,
        (Scheme::Http, _) => UriScheme::HTTP,
    };
    match Authority::try_from(format!("{host}:{}", m.target_port)) {
        Ok(authority) => Target::Direct { scheme, authority },
        Err(e) => Target::Invalid {
            reason: format!("target {host}:{}: {e}", m.target_port).into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MappingSpec;

    fn mapping(spec: MappingSpec) -> Mapping {
        let full = spec.validate().unwrap();
        Mapping::from_spec(MappingId::generate(), spec, full, "n", chrono::Utc::now())
    }

    fn set(s: &str) -> SetName {
        SetName::parse(s).unwrap()
    }

    #[test]
    fn compiles_targets() {
        let cases = [
            ("127.0.0.1", 80, Scheme::Http, "http", "127.0.0.1:80"),
            ("::1", 8080, Scheme::Http, "http", "[::1]:8080"),
            (
                "svc.ns.svc.cluster.local",
                443,
                Scheme::Https,
                "https",
                "svc.ns.svc.cluster.local:443",
            ),
        ];
        for (host, port, scheme, want_scheme, want_auth) in cases {
            let mut spec = MappingSpec::new("a", "tunnox.net", host, port);
            spec.target_scheme = scheme;
            spec.custom_headers = [("X-Env".to_string(), "dev".to_string())].into();
            let mut m = mapping(spec);
            // A record written before reserved names were refused.
            m.custom_headers.insert("Content-Length".into(), "0".into());
            let r = Route::from_mapping(&m);
            match &r.target() {
                Target::Direct { scheme, authority } => {
                    assert_eq!(scheme.as_str(), want_scheme);
                    assert_eq!(authority.as_str(), want_auth);
                }
                other => panic!("{host}: {other:?}"),
            }
            assert_eq!(r.headers().len(), 1);
            assert_eq!(r.headers()[0].0.as_str(), "x-env");
        }
        let mut tunnel = MappingSpec::new("a", "tunnox.net", "127.0.0.1", 80);
        tunnel.target_client_id = Some("laptop".into());
        assert_eq!(
            Route::from_mapping(&mapping(tunnel)).target(),
            Target::Tunnel {
                client_id: "laptop".into(),
                authority: Authority::from_static("127.0.0.1:80"),
            }
        );
        let mut group = MappingSpec::new("a", "tunnox.net", "localhost", 3000);
        group.target_group = Some(TargetGroup {
            name: "team/web".into(),
            clients: vec!["a".into(), "b".into()],
            balance: Balance::LeastConnections,
        });
        let mut m = mapping(group);
        match &Route::from_mapping(&m).target() {
            Target::TunnelGroup { group, authority } => {
                assert_eq!(group.clients, ["a", "b"]);
                assert_eq!(group.balance, Balance::LeastConnections);
                assert_eq!(authority.as_str(), "localhost:3000");
            }
            other => panic!("{other:?}"),
        }
        // Records the store refuses to write are still not routed somewhere.
        m.target_client_id = Some("a".into());
        assert!(matches!(
            Route::from_mapping(&m).target(),
            Target::Invalid { .. }
        ));
        m.target_client_id = None;
        m.target_group.as_mut().unwrap().clients.clear();
        assert!(matches!(
            Route::from_mapping(&m).target(),
            Target::Invalid { .. }
        ));
    }

    #[test]
    fn reads_the_namespace_from_the_source() {
        let cases = [
            ("k8s:team-a/web", Some("team-a")),
            ("k8s:c-123/team-a/web", Some("team-a")),
            ("k8s:/web", None),
            ("k8s:web", None),
            ("k8s:a/b/c/d", None),
            ("config", None),
            ("api", None),
        ];
        for (source, want) in cases {
            assert_eq!(source_namespace(source), want, "{source}");
        }
    }

    #[test]
    fn judges_the_declared_target_once_with_its_namespace() {
        let policy = EgressPolicy::default();
        let cases = [
            ("169.254.169.254", None, Declarer::Tenant, Some("reserved")),
            ("127.0.0.1", None, Declarer::Tenant, Some("reserved")),
            ("127.0.0.1", None, Declarer::Operator, None),
            ("localhost", None, Declarer::Tenant, Some("reserved")),
            (
                "db.other.svc.cluster.local",
                Some("k8s:team-a/web"),
                Declarer::Tenant,
                Some("other_namespace"),
            ),
            (
                "db.team-a.svc",
                Some("k8s:c1/team-a/web"),
                Declarer::Tenant,
                None,
            ),
            ("192.0.2.10", None, Declarer::Tenant, None),
        ];
        for (host, source, who, want) in cases {
            let mut m = mapping(MappingSpec::new("a", "tunnox.net", host, 80));
            m.source = source.map(str::to_string);
            let r = Route::from_mapping(&m);
            let got = r.check_declared(&policy, who).err().map(|r| r.label());
            assert_eq!(got, want, "{host} from {source:?} by {who:?}");
        }
    }

    #[test]
    fn routes_of_one_namespace_share_its_name() {
        let named = |sub: &str, source: &str| {
            let mut m = mapping(MappingSpec::new(sub, "tunnox.net", "192.0.2.1", 80));
            m.source = Some(source.into());
            Route::from_mapping(&m).namespace().expect("a namespace")
        };
        let (a, b) = (
            named("a", "k8s:team-a/web"),
            named("b", "k8s:c1/team-a/api"),
        );
        assert_eq!(&*a, "team-a");
        assert!(Arc::ptr_eq(&a, &b), "one copy of the name");
    }

    /// With its reference counts a route fills one 80-byte allocation (an allocator size
    /// class); a field added inline must push another out to `Extras` (docs/proxy.md "Route
    /// memory").
    #[test]
    fn a_route_stays_within_its_allocation_class() {
        assert!(
            std::mem::size_of::<Route>() <= 64,
            "{}",
            std::mem::size_of::<Route>()
        );
        let mut m = mapping(MappingSpec::new("a", "tunnox.net", "::1", 80));
        m.source = Some("k8s:team-a/web".into());
        let plain = Route::from_mapping(&m);
        assert!(plain.extras.is_none(), "a plain route has no extras");
        assert_eq!(
            (
                plain.host(),
                plain.authority(),
                plain.mapping_id(),
                plain.version()
            ),
            ("a.tunnox.net", "[::1]:80", m.mapping_id.clone(), m.version)
        );
        assert_eq!(plain.namespace().as_deref(), Some("team-a"));
    }

    #[test]
    fn drops_a_mapping_header_that_would_reset_the_hop_count() {
        let mut m = mapping(MappingSpec::new("a", "tunnox.net", "192.0.2.1", 80));
        m.custom_headers.insert("Tunnox-Hops".into(), "0".into());
        assert!(Route::from_mapping(&m).headers().is_empty());
    }

    #[test]
    fn decides_who_serves() {
        // (placement, healthy sets other than me, my set, forwarded, want: a set to forward
        // to, "" for here, or the refusal's status)
        type Case<'a> = (
            Option<&'a str>,
            Vec<&'a str>,
            &'a str,
            bool,
            Result<&'a str, u16>,
        );
        let cases: Vec<Case> = vec![
            (None, vec![], "novel.sh", false, Ok("")),
            (Some("novel.sh"), vec![], "novel.sh", false, Ok("")),
            (
                Some("game.sh"),
                vec!["game.sh"],
                "novel.sh",
                false,
                Err(421),
            ),
            (
                Some("novel.sz"),
                vec!["novel.sz"],
                "novel.sh",
                false,
                Ok("novel.sz"),
            ),
            (Some("novel.sz"), vec!["novel.sz"], "novel.sh", true, Ok("")),
            // Home set down: the DR set serves.
            (Some("novel.sz"), vec![], "novel.*", false, Ok("")),
            // Home set up: the DR set sends it home.
            (
                Some("novel.sz"),
                vec!["novel.sz"],
                "novel.*",
                false,
                Ok("novel.sz"),
            ),
            // Never another region of the business.
            (Some("novel.sz"), vec![], "novel.sh", false, Err(503)),
        ];
        for (placement, healthy, mine, forwarded, want) in cases {
            let mut spec = MappingSpec::new("a", "tunnox.net", "127.0.0.1", 80);
            spec.placement = placement.map(set);
            let r = Route::from_mapping(&mapping(spec));
            let healthy: Vec<SetName> = healthy.into_iter().map(set).collect();
            let got = r
                .placement(&set(mine), || &healthy, forwarded)
                .map(|to| to.map(|s| s.to_string()).unwrap_or_default())
                .map_err(|e| e.status().as_u16());
            assert_eq!(
                got,
                want.map(str::to_string),
                "placement {placement:?} on {mine} with {healthy:?}"
            );
        }
        let mut inactive = mapping(MappingSpec::new("a", "tunnox.net", "127.0.0.1", 80));
        inactive.status = MappingStatus::Inactive;
        assert_eq!(
            Route::from_mapping(&inactive)
                .placement(&set("novel.sh"), Vec::new, false)
                .unwrap_err()
                .status(),
            503
        );
    }
}
