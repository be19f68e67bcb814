//! Every upstream connection, on both HTTP paths: the target name resolved (a tenant's as an
//! absolute name), every address checked with the egress policy, and the connection made to a checked address
//! (no second lookup, so a name cannot resolve to something else between check and connect).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::domain::{Declarer, EgressPolicy, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("cannot resolve {name}: {source}")]
    Resolve { name: String, source: io::Error },
    #[error("{name} resolves to no address")]
    NoAddress { name: String },
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("no host in {0}")]
    NoHost(String),
}

/// Resolves `host` (a name, or an address literal with or without brackets), checks every
/// address for `who`, and connects to the first checked address that answers, all within
/// `timeout`.
pub async fn connect(
    policy: &EgressPolicy,
    host: &str,
    port: u16,
    who: Declarer,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, connect_unbounded(policy, host, port, who)).await {
        Ok(done) => done,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

async fn connect_unbounded(
    policy: &EgressPolicy,
    host: &str,
    port: u16,
    who: Declarer,
) -> Result<TcpStream, ConnectError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let (name, addrs) = match bare.parse::<IpAddr>() {
        Ok(ip) => (None, vec![SocketAddr::new(ip, port)]),
        Err(_) => (Some(bare), resolve(bare, port, who).await?),
    };
    // One refused address refuses the name: a name that also points at the metadata address
    // is not half trusted.
    for addr in &addrs {
        policy
            .check_connect(name, *addr, who)
            .map_err(ConnectError::Refused)?;
    }
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(source) => last = Some(ConnectError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::NoAddress {
        name: bare.to_string(),
    }))
}

/// The addresses of `name`. A tenant's name is looked up as an absolute name (a trailing dot),
/// so the resolver's search list (the proxy's own namespace in a pod) cannot complete it into
/// another name; the operator's own names (single-node file) are looked up as written, as the
/// operator's resolver configuration intends (`/etc/hosts` names do not match with the dot).
/// `localhost` and names below it are loopback without a lookup (RFC 6761).
async fn resolve(name: &str, port: u16, who: Declarer) -> Result<Vec<SocketAddr>, ConnectError> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Ok(vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]);
    }
    let query = lookup_name(&lower, who);
    let found = tokio::net::lookup_host((query.as_str(), port))
        .await
        .map_err(|source| ConnectError::Resolve {
            name: lower.clone(),
            source,
        })?;
    let addrs: Vec<SocketAddr> = found.collect();
    if addrs.is_empty() {
        return Err(ConnectError::NoAddress { name: lower });
    }
    Ok(addrs)
}

/// What is asked of the resolver for `name` (lower case, no trailing dot).
fn lookup_name(name: &str, who: Declarer) -> String {
    match who {
        Declarer::Tenant => format!("{name}."),
        Declarer::Operator => name.to_string(),
    }
}

/// The general path's connector (under TLS for `https` targets): [`connect`] for one declarer.
#[derive(Clone)]
pub struct EgressConnector {
    pub policy: Arc<EgressPolicy>,
    pub who: Declarer,
    pub timeout: Duration,
}

impl tower_service::Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = dst
                .host()
                .ok_or_else(|| ConnectError::NoHost(dst.to_string()))?;
            let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            connect(&this.policy, host, port, this.who, this.timeout)
                .await
                .map(TokioIo::new)
        })
    }
}

/// The egress refusal behind a connect error, if that is what it was.
pub fn refusal_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(ConnectError::Refused(r)) = err.downcast_ref::<ConnectError>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_the_resolver_for_absolute_names_for_tenants() {
        let cases = [
            ("web.team-b", Declarer::Tenant, "web.team-b."),
            ("web", Declarer::Tenant, "web."),
            ("api.example.com", Declarer::Tenant, "api.example.com."),
            ("myhost", Declarer::Operator, "myhost"),
        ];
        for (name, who, want) in cases {
            assert_eq!(lookup_name(name, who), want, "{name} by {who:?}");
        }
    }

    #[tokio::test]
    async fn refuses_before_connecting_and_connects_to_what_it_checked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = EgressPolicy::new(
            vec![crate::domain::egress::Rule::parse("127.0.0.0/8").unwrap()],
            vec![],
            "cluster.local",
        );
        let strict = EgressPolicy::default();
        let own = EgressPolicy::default()
            .with_own_listeners([SocketAddr::from(([127, 0, 0, 1], port))], []);
        let t = Duration::from_secs(2);
        // (policy, host, who, connects)
        let cases: [(&EgressPolicy, &str, Declarer, bool); 7] = [
            (&open, "127.0.0.1", Declarer::Tenant, true),
            (&strict, "127.0.0.1", Declarer::Tenant, false),
            (&strict, "127.0.0.1", Declarer::Operator, true),
            (&strict, "localhost", Declarer::Tenant, false),
            (&strict, "[::1]", Declarer::Tenant, false),
            (&own, "127.0.0.1", Declarer::Operator, false),
            (&own, "localhost", Declarer::Operator, false),
        ];
        for (policy, host, who, want) in cases {
            let got = connect(policy, host, port, who, t).await;
            match (&got, want) {
                (Ok(_), true) | (Err(ConnectError::Refused(_)), false) => {}
                _ => panic!("{host} by {who:?}: {got:?}"),
            }
        }
        let err = connect(&strict, "169.254.169.254", 80, Declarer::Tenant, t)
            .await
            .unwrap_err();
        assert_eq!(refusal_in(&err).map(Refusal::label), Some("reserved"));
    }
}
