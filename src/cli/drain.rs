//! `tunnox drain`: asks the proxy in this pod to drain (the chart's preStop hook) with
//! `POST /drain` on its admin port, with the bearer token when one is configured, and says
//! clearly why not when it cannot.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::AdminToken;

/// Time to connect to the admin port (it is local: a refusal is immediate).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for the answer beyond the requested wait.
const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// The admin port answers a few lines; anything longer is not it.
const MAX_RESPONSE: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct DrainRequest {
    pub admin: SocketAddr,
    /// `None`: the proxy's `proxy.drain.propagation_delay`.
    pub wait: Option<Duration>,
    pub token: Option<AdminToken>,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(
        "cannot reach the proxy's admin port {addr}: {source} (is `tunnox proxy` running with proxy.admin_listen there? see --admin)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the proxy's admin port {addr} did not answer within {}", humantime::format_duration(*.within))]
    Timeout { addr: SocketAddr, within: Duration },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr} did not answer HTTP: {reason}")]
    Malformed { addr: SocketAddr, reason: String },
    #[error("{addr} refused to drain: {status} {}", .body.trim())]
    Refused {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
}

impl DrainError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Io { .. } => "io",
            Self::Malformed { .. } => "malformed",
            Self::Refused { .. } => "refused",
        }
    }
}

/// Where to send the request when `--admin` is not given: the configured admin listener,
/// reached over loopback when it listens on every address (as in the chart).
pub fn default_admin(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Parses `--wait` by the proxy's own rule, so a bad value fails before anything is sent.
pub use crate::proxy::parse_drain_wait as parse_wait;

/// The request bytes. The token goes in a header, never the URL (URLs end up in logs).
fn request(req: &DrainRequest) -> Vec<u8> {
    let query = req
        .wait
        .map(|w| format!("?wait={}ms", w.as_millis()))
        .unwrap_or_default();
    let mut head = format!(
        "POST /drain{query} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\nUser-Agent: tunnox-drain\r\n",
        req.admin
    );
    if let Some(t) = &req.token {
        head.push_str("Authorization: Bearer ");
        head.push_str(t.expose());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Status and body of a complete HTTP/1.1 response (the server closes the connection).
fn parse_response(bytes: &[u8]) -> Result<(u16, String), String> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response head")?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "response head is not text")?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unexpected status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("unexpected status line {status_line:?}"))?;
    let body = String::from_utf8_lossy(&bytes[end + 4..]).into_owned();
    Ok((status, body))
}

/// Sends the request and returns the proxy's answer on 200.
pub async fn drain(req: &DrainRequest) -> Result<String, DrainError> {
    let addr = req.admin;
    let mut stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(DrainError::Connect { addr, source }),
            Err(_) => {
                return Err(DrainError::Timeout {
                    addr,
                    within: CONNECT_TIMEOUT,
                });
            }
        };
    let within = req
        .wait
        .unwrap_or(Duration::from_secs(5))
        .max(Duration::from_secs(5))
        + ANSWER_SLACK;
    let exchange = async {
        stream.write_all(&request(req)).await?;
        let mut buf = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut buf)
            .await?;
        Ok::<_, std::io::Error>(buf)
    };
    let bytes = match tokio::time::timeout(within, exchange).await {
        Ok(Ok(b)) => b,
        Ok(Err(source)) => return Err(DrainError::Io { addr, source }),
        Err(_) => return Err(DrainError::Timeout { addr, within }),
    };
    let (status, body) =
        parse_response(&bytes).map_err(|reason| DrainError::Malformed { addr, reason })?;
    if status == 200 {
        Ok(body)
    } else {
        Err(DrainError::Refused { addr, status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_address_defaults_to_loopback() {
        let cases = [
            ("0.0.0.0:9090", "127.0.0.1:9090"),
            ("[::]:9090", "[::1]:9090"),
            ("127.0.0.2:9", "127.0.0.2:9"),
            ("10.0.0.1:9090", "10.0.0.1:9090"),
        ];
        for (listen, want) in cases {
            assert_eq!(
                default_admin(listen.parse().unwrap()),
                want.parse::<SocketAddr>().unwrap()
            );
        }
    }

    #[test]
    fn request_carries_wait_and_token_in_the_header() {
        let req = DrainRequest {
            admin: "127.0.0.1:9090".parse().unwrap(),
            wait: Some(Duration::from_secs(15)),
            token: Some(AdminToken::new("sekret")),
        };
        let text = String::from_utf8(request(&req)).unwrap();
        assert!(
            text.starts_with("POST /drain?wait=15000ms HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAuthorization: Bearer sekret\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        let bare = DrainRequest {
            wait: None,
            token: None,
            ..req
        };
        let text = String::from_utf8(request(&bare)).unwrap();
        assert!(text.starts_with("POST /drain HTTP/1.1\r\n"));
        assert!(!text.contains("Authorization"));
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap(),
            (200, "ok\n".to_string())
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 401 Unauthorized\r\n\r\nrefused\n")
                .unwrap()
                .0,
            401
        );
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 999 What\r\n\r\n",
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }
}
