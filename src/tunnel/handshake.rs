//! The authentication exchange at the start of a session, before HTTP/2 (see the module docs of
//! `crate::tunnel`): one `Auth` frame from the agent, one `AuthOk` or `AuthError` back. Both
//! sides bound it with a deadline; neither reads past its frame.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{self, FrameError};
use super::msg::{self, Auth, AuthError, AuthErrorCode, AuthOk, Message, MsgError};

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Msg(#[from] MsgError),
    #[error("refused by the server: {} ({})", .0.message, .0.code.label())]
    Refused(AuthError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("write: {0}")]
    Io(#[from] std::io::Error),
}

/// The agent's side: sends `auth`, returns the proxy's `AuthOk` (or why not).
pub async fn agent_hello<S>(
    io: &mut S,
    auth: &Auth,
    within: Duration,
) -> Result<AuthOk, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        frame::write_frame(io, &auth.to_frame()).await?;
        let reply = frame::read_frame(io).await?;
        if reply.kind == msg::Kind::AuthError as u8 {
            return Err(HandshakeError::Refused(msg::decode::<AuthError>(&reply)?));
        }
        Ok(msg::decode::<AuthOk>(&reply)?)
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(within))?
}

/// The proxy's side, first half: the agent's `Auth`, read within `within`. On an error the
/// caller answers with [`refuse`] where the peer speaks frames, and closes.
pub async fn read_auth<S>(io: &mut S, within: Duration) -> Result<Auth, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let first = tokio::time::timeout(within, frame::read_frame(io))
        .await
        .map_err(|_| HandshakeError::Timeout(within))??;
    Ok(msg::decode::<Auth>(&first)?)
}

/// The proxy's answer: accepted.
pub async fn accept<S: AsyncWrite + Unpin>(io: &mut S, ok: &AuthOk) -> std::io::Result<()> {
    frame::write_frame(io, &ok.to_frame()).await
}

/// The proxy's answer: refused (the caller closes the connection after it).
pub async fn refuse<S: AsyncWrite + Unpin>(
    io: &mut S,
    code: AuthErrorCode,
    message: impl Into<String>,
    reconnect_to: Option<String>,
) -> std::io::Result<()> {
    let e = AuthError {
        code,
        message: message.into(),
        reconnect_to,
    };
    frame::write_frame(io, &e.to_frame()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth {
            client_id: "laptop".into(),
            token: "t".into(),
            instance: "i".into(),
            slot: 0,
            version: String::new(),
            unreachable: Vec::new(),
            max_streams: None,
        }
    }

    #[tokio::test]
    async fn agent_and_proxy_agree() {
        let (mut a, mut p) = tokio::io::duplex(1024);
        let proxy = tokio::spawn(async move {
            let got = read_auth(&mut p, Duration::from_secs(1)).await.unwrap();
            assert_eq!(got, auth());
            let ok = AuthOk {
                session_id: "s1".into(),
                node_id: "n1".into(),
                heartbeat_interval_ms: 5000,
                max_streams: 100,
                peers: vec![],
            };
            accept(&mut p, &ok).await.unwrap();
            // What follows the frame is the HTTP/2 preface, untouched.
            tokio::io::AsyncWriteExt::write_all(&mut p, b"PRI")
                .await
                .unwrap();
            p
        });
        let ok = agent_hello(&mut a, &auth(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(ok.session_id, "s1");
        let mut rest = [0u8; 3];
        tokio::io::AsyncReadExt::read_exact(&mut a, &mut rest)
            .await
            .unwrap();
        assert_eq!(&rest, b"PRI");
        drop(proxy.await.unwrap());
    }

    #[tokio::test]
    async fn refusals_and_silence_end_the_handshake() {
        let (mut a, mut p) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let _ = read_auth(&mut p, Duration::from_secs(1)).await;
            refuse(&mut p, AuthErrorCode::BadCredentials, "wrong token", None)
                .await
                .unwrap();
        });
        let err = agent_hello(&mut a, &auth(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, HandshakeError::Refused(e) if e.code == AuthErrorCode::BadCredentials),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "refused by the server: wrong token (bad_credentials)"
        );

        let (_silent, mut p) = tokio::io::duplex(1024);
        let err = read_auth(&mut p, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout(_)));

        let (mut a, mut p) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let err = read_auth(&mut p, Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(err, HandshakeError::Frame(FrameError::Magic(_))),
            "{err}"
        );
    }
}
