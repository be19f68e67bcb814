//! The tunnel protocol between `tunnox agent` and `tunnox proxy` (ARCHITECTURE §6,
//! docs/tunnels.md). Shared by both sides; each side's behaviour lives in `crate::agent` and
//! `crate::proxy::tunnel`.
//!
//! One session is one TCP connection the agent dials:
//!
//! 1. **TLS 1.3** (rustls), ALPN [`ALPN`]. The agent is the TLS client and verifies the proxy's
//!    certificate (a CA file or the system roots); plain TCP only with `agent.insecure`.
//! 2. **Authentication** before any multiplexing: the agent writes one [`frame::Frame`] of type
//!    [`msg::Kind::Auth`]; the proxy answers [`msg::Kind::AuthOk`] or [`msg::Kind::AuthError`]
//!    (and closes). Frames are read with exact reads, so no byte of what follows is consumed.
//!    An unauthenticated peer never gets HTTP/2 state on the proxy.
//! 3. **HTTP/2 with the roles reversed**: the proxy is the HTTP/2 *client* (it sends the
//!    connection preface right after `AuthOk`), the agent the HTTP/2 *server* (extended CONNECT
//!    enabled, fixed flow-control windows: [`H2_STREAM_WINDOW`], [`H2_CONNECTION_WINDOW`]).
//!    Every forwarded request is one stream.
//! 4. **The control stream**: the proxy's first stream, `POST` [`CONTROL_PATH`] with the header
//!    [`CONTROL_HEADER`] and no [`TARGET_HEADER`]. Its request body carries frames proxy → agent
//!    (heartbeat, `ServerShutdown`), its response body frames agent → proxy (heartbeat,
//!    `Leaving`). Either side that hears nothing for two heartbeat intervals declares the
//!    session dead.
//! 5. **Forwarded requests**: every other stream carries [`TARGET_HEADER`] `host:port`, the local
//!    target the mapping names. The agent serves it only when its own allow-list holds that
//!    target; otherwise it answers 502 with [`ERROR_HEADER`] `not_allowed`. WebSocket and other
//!    upgrades travel as extended CONNECT (RFC 8441) with `:protocol` set to the `Upgrade` token;
//!    the agent answers 200 carrying the local service's `101` headers, then the stream is the
//!    byte pipe. A plain CONNECT (no `:protocol`) is a raw TCP stream to the target (a
//!    tunnel's remote port); with `tunnox-transport: udp` it is a UDP flow of length-prefixed
//!    datagrams ([`udp`]).
//!
//! Drain: the proxy sends `ServerShutdown {reason, reconnect_to, grace_period}`; the agent dials
//! a new session first, then sends `Leaving` and shuts its HTTP/2 server down gracefully on the
//! old one (GOAWAY: streams in flight finish, no new ones start).

pub mod config;
pub mod credential;
pub mod frame;
pub mod handshake;
pub mod msg;
pub mod tls;
pub mod udp;

use http::HeaderName;

/// ALPN protocol id of a tunnel session.
pub const ALPN: &[u8] = b"tunnox/1";

/// Path of the control stream.
pub const CONTROL_PATH: &str = "/.tunnox/control";

/// Marks the control stream (with [`CONTROL_PATH`]); a forwarded request never carries it.
pub const CONTROL_HEADER: HeaderName = HeaderName::from_static("tunnox-control");

/// `host:port` of the agent-side target of a forwarded stream. Set by the proxy (any value a
/// client sent is removed first), checked against the agent's allow-list, never passed on.
pub const TARGET_HEADER: HeaderName = HeaderName::from_static("tunnox-target");

/// On a response the agent made itself (not the local service's): why, as a label
/// (`not_allowed`, `connect`, `timeout`, `bad_target`, `upstream`: the local service broke the
/// exchange after connecting; `too_many_streams` is reserved: streams beyond the agent's limit are
/// refused by HTTP/2 itself, `REFUSED_STREAM`).
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("tunnox-error");

/// Default heartbeat interval (seed 003: 5 s; two misses = dead).
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Heartbeats missed before a session is dead.
pub const HEARTBEAT_MISSES: u32 = 2;

/// Bytes each way are copied through a buffer this large: a raw stream through a tunnel
/// (remote-port connections, upgrades) moves in few large HTTP/2 frames and TLS records rather
/// than in tokio's default 8 KiB pieces.
pub const PIPE_BUFFER: usize = 64 * 1024;

/// Copies both ways between `a` and `b` until both are done (half-closes passed on); returns
/// the bytes a → b and b → a. The one byte pipe of every tunnel stream.
pub async fn pipe<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, PIPE_BUFFER, PIPE_BUFFER).await
}

/// Flow-control window of one stream on a session: what a stream whose reader stopped (a slow
/// client, a bandwidth limit) can hold of the session. Fixed, not adaptive: with adaptive
/// windows one stream's window grew to the whole connection's, and one client that stopped
/// reading stalled every other stream of the session.
pub const H2_STREAM_WINDOW: u32 = 1 << 20;

/// Flow-control window of a whole session: 32 streams at their full window before the others
/// wait, and the most a session buffers for readers that stopped (hyper's adaptive windows
/// stopped at 16 MiB).
pub const H2_CONNECTION_WINDOW: u32 = 32 << 20;

/// The largest HTTP/2 frame each side accepts on a session: a pipe's 64 KiB read travels as one
/// DATA frame instead of four.
pub const H2_MAX_FRAME: u32 = PIPE_BUFFER as u32;
