//! Control messages: a frame type and a JSON body each. Unknown fields are ignored (a newer
//! peer may add some); a body that is not the type's JSON is a protocol error naming the type.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::frame::Frame;

/// Frame types. Numbers are the wire contract; never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// agent → proxy, first frame of a session.
    Auth = 1,
    /// proxy → agent: authenticated; HTTP/2 starts after this frame.
    AuthOk = 2,
    /// proxy → agent: refused; the proxy closes the connection.
    AuthError = 3,
    /// Either way on the control stream, every heartbeat interval.
    Heartbeat = 4,
    /// proxy → agent: the client's tunnels and their hash (`crate::tunnel::config`).
    ConfigPush = 6,
    /// agent → proxy: the configuration hash applied and the tunnels refused.
    ConfigAck = 7,
    /// proxy → agent: this node is going away (seed 003 command 8).
    ServerShutdown = 8,
    /// agent → proxy: this session is being retired (its replacement is up): open no new
    /// streams on it.
    Leaving = 9,
    /// agent → proxy: the tunnels whose health check fails now (the whole set).
    Health = 10,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Auth,
            2 => Self::AuthOk,
            3 => Self::AuthError,
            4 => Self::Heartbeat,
            6 => Self::ConfigPush,
            7 => Self::ConfigAck,
            8 => Self::ServerShutdown,
            9 => Self::Leaving,
            10 => Self::Health,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auth => "Auth",
            Self::AuthOk => "AuthOk",
            Self::AuthError => "AuthError",
            Self::Heartbeat => "Heartbeat",
            Self::ConfigPush => "ConfigPush",
            Self::ConfigAck => "ConfigAck",
            Self::ServerShutdown => "ServerShutdown",
            Self::Leaving => "Leaving",
            Self::Health => "Health",
        }
    }
}

/// A message with its frame type.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: Kind;

    fn to_frame(&self) -> Frame {
        // Serialising these plain structs cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        Frame::new(Self::KIND as u8, body)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsgError {
    #[error("expected a {expected} frame, got type {got}")]
    UnexpectedKind { expected: &'static str, got: u8 },
    #[error("{kind} frame: {reason}")]
    BadBody { kind: &'static str, reason: String },
}

/// Decodes `frame` as `M`, refusing another type.
pub fn decode<M: Message>(frame: &Frame) -> Result<M, MsgError> {
    if frame.kind != M::KIND as u8 {
        return Err(MsgError::UnexpectedKind {
            expected: M::KIND.name(),
            got: frame.kind,
        });
    }
    serde_json::from_slice(&frame.body).map_err(|e| MsgError::BadBody {
        kind: M::KIND.name(),
        reason: e.to_string(),
    })
}

/// The agent's credentials and who it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub client_id: String,
    pub token: String,
    /// Random per agent process: with `slot`, names this session among the client's, so a
    /// reconnect replaces its own stale session at once and replicas of one client coexist.
    pub instance: String,
    /// Which of the agent's `sessions` this is (0-based).
    #[serde(default)]
    pub slot: u32,
    #[serde(default)]
    pub version: String,
    /// Addresses proxies sent the agent to this round (its serving set) that it could not
    /// reach: not offered again, and when no other is known a proxy of its business takes it
    /// (docs/sets.md "Agents"). At most [`MAX_UNREACHABLE`] are read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    /// The most streams the agent serves at once on this session (its HTTP/2
    /// `max_concurrent_streams`): the proxy opens no more than that, its own limit counted in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u32>,
}

/// The most `Auth.unreachable` addresses a proxy reads (more are ignored).
pub const MAX_UNREACHABLE: usize = 8;

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("client_id", &self.client_id)
            .field("token", &"<redacted>")
            .field("instance", &self.instance)
            .field("slot", &self.slot)
            .field("version", &self.version)
            .field("unreachable", &self.unreachable)
            .field("max_streams", &self.max_streams)
            .finish()
    }
}

impl Message for Auth {
    const KIND: Kind = Kind::Auth;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {
    pub session_id: String,
    pub node_id: String,
    pub heartbeat_interval_ms: u64,
    /// Most concurrent streams the proxy opens on this session.
    pub max_streams: u32,
    /// Tunnel addresses of other active proxies that may serve this client: where the agent
    /// can go when this one disappears without a `ServerShutdown`, and where its other
    /// sessions (`sessions: N`) can go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

impl Message for AuthOk {
    const KIND: Kind = Kind::AuthOk;
}

/// Why a session was refused; `code` is a stable label, `message` for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthError {
    pub code: AuthErrorCode,
    pub message: String,
    /// `other_set`: a tunnel listener of the set that serves the client, to dial next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_to: Option<String>,
}

impl Message for AuthError {
    const KIND: Kind = Kind::AuthError;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthErrorCode {
    /// Unknown client id or wrong token (one answer for both: no client-id probing).
    BadCredentials,
    /// The proxy is draining and takes no new sessions.
    Draining,
    /// `max_sessions_per_client` or the proxy's session cap is reached.
    TooManySessions,
    /// The first frame was not a valid `Auth`.
    BadRequest,
    /// The proxy cannot check credentials now (store unreachable).
    Unavailable,
    /// The client is placed on another proxy set (its home set, or its business's DR set while
    /// home is down), or on another business: `reconnect_to` names where, when known.
    OtherSet,
    /// A code this agent does not know (a newer proxy's): treated as retryable.
    #[serde(other)]
    Unknown,
}

impl AuthErrorCode {
    pub fn label(self) -> &'static str {
        match self {
            Self::BadCredentials => "bad_credentials",
            Self::Draining => "draining",
            Self::TooManySessions => "too_many_sessions",
            Self::BadRequest => "bad_request",
            Self::Unavailable => "unavailable",
            Self::OtherSet => "other_set",
            Self::Unknown => "unknown",
        }
    }

    /// Whether retrying the same credentials can succeed (a wrong token cannot).
    pub fn retryable(self) -> bool {
        !matches!(self, Self::BadCredentials | Self::BadRequest)
    }
}

/// Seed 002's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Unix seconds.
    pub timestamp: i64,
    #[serde(default)]
    pub status: String,
}

impl Message for Heartbeat {
    const KIND: Kind = Kind::Heartbeat;
}

/// Seed 003's `ServerShutdown` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerShutdown {
    /// e.g. `rolling_update`, `shutdown`.
    pub reason: String,
    /// A tunnel address of another node to dial, when the proxy knows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_to: Option<String>,
    /// Seconds the old session stays open for streams in flight.
    pub grace_period: u64,
}

impl Message for ServerShutdown {
    const KIND: Kind = Kind::ServerShutdown;
}

/// The agent retires this session (its replacement is registered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaving {
    pub reason: String,
}

impl Message for Leaving {
    const KIND: Kind = Kind::Leaving;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_its_own_kind_and_never_shows_the_token() {
        let auth = Auth {
            client_id: "laptop".into(),
            token: "s3cret".into(),
            instance: "i1".into(),
            slot: 0,
            version: "0.1.0".into(),
            unreachable: Vec::new(),
            max_streams: Some(1000),
        };
        let f = auth.to_frame();
        assert_eq!(f.kind, 1);
        assert_eq!(decode::<Auth>(&f).unwrap(), auth);
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert_eq!(
            decode::<AuthOk>(&f),
            Err(MsgError::UnexpectedKind {
                expected: "AuthOk",
                got: 1
            })
        );
        let bad = Frame::new(Kind::Auth as u8, &b"{\"client_id\":1}"[..]);
        assert!(matches!(
            decode::<Auth>(&bad),
            Err(MsgError::BadBody { kind: "Auth", .. })
        ));
        let shutdown = ServerShutdown {
            reason: "rolling_update".into(),
            reconnect_to: Some("10.0.0.2:7000".into()),
            grace_period: 10,
        };
        let json = String::from_utf8(shutdown.to_frame().body.to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"reason":"rolling_update","reconnect_to":"10.0.0.2:7000","grace_period":10}"#
        );
        for k in 0..=255u8 {
            if let Some(kind) = Kind::from_u8(k) {
                assert_eq!(kind as u8, k);
            }
        }
    }
}
