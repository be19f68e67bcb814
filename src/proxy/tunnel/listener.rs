//! The tunnel listener: TLS 1.3 (or plain TCP with `insecure`), one `Auth` frame checked
//! against the client's credential, `AuthOk`, then HTTP/2 with this proxy as the client and
//! the control stream; the session lives until its heartbeats stop, it is replaced, or it is
//! retired by a drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::Tunnels;
use super::session::{Full, H2Transport, Session};
use crate::proxy::ProxyBody;
use crate::store::{SessionRecord, SessionState};
use crate::tunnel::config::{ConfigAck, Health};
use crate::tunnel::frame::{self, Decoder};
use crate::tunnel::handshake::{self, HandshakeError};
use crate::tunnel::msg::{self, Auth, AuthErrorCode, AuthOk, Heartbeat, Kind, Leaving, Message};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Accepts agents until `stop`. `tls` is `None` only with `proxy.tunnel.insecure`.
pub async fn serve(
    tunnels: Arc<Tunnels>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    // Handshakes in progress count too: a flood of silent connections cannot exceed the cap.
    let slots = Arc::new(tokio::sync::Semaphore::new(
        tunnels.settings.max_sessions + tunnels.settings.per_client,
    ));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::proxy::stopped(&mut stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tunnels.metrics.event("refused", "max_sessions");
            tracing::warn!(%peer, "tunnel connection refused: proxy.tunnel.max_sessions reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let t = tunnels.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let within = t.settings.handshake_timeout;
            let io: Box<dyn Io> = match acceptor {
                None => Box::new(stream),
                Some(a) => match tokio::time::timeout(within, a.accept(stream)).await {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        t.metrics.event("refused", "tls");
                        tracing::warn!(%peer, error = %e, "tunnel connection refused: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        t.metrics.event("refused", "timeout");
                        tracing::warn!(%peer, ?within, "tunnel connection refused: no TLS handshake in time");
                        return;
                    }
                },
            };
            session(t, io, peer).await;
            drop(slot);
        });
    }
}

/// Refuses with `code` (a frame the agent reads), logs and counts it.
async fn refuse(t: &Tunnels, io: &mut Box<dyn Io>, code: AuthErrorCode, msg: &str) {
    refuse_to(t, io, code, msg, None).await;
}

/// [`refuse`], naming where the agent should dial instead.
async fn refuse_to(
    t: &Tunnels,
    io: &mut Box<dyn Io>,
    code: AuthErrorCode,
    msg: &str,
    reconnect_to: Option<String>,
) {
    t.metrics.event("refused", code.label());
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        handshake::refuse(io, code, msg.to_string(), reconnect_to),
    )
    .await;
}

fn limit_name(full: &Full) -> &'static str {
    match full {
        Full::Client => "proxy.tunnel.max_sessions_per_client reached",
        Full::Proxy => "proxy.tunnel.max_sessions reached",
    }
}

fn bounded(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

async fn session(t: Arc<Tunnels>, mut io: Box<dyn Io>, peer: SocketAddr) {
    let s = &t.settings;
    let auth: Auth = match handshake::read_auth(&mut io, s.handshake_timeout).await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "tunnel session refused: no valid Auth frame");
            if matches!(e, HandshakeError::Msg(_)) {
                refuse(
                    &t,
                    &mut io,
                    AuthErrorCode::BadRequest,
                    "the first frame must be Auth",
                )
                .await;
            } else {
                t.metrics.event("refused", "bad_request");
            }
            return;
        }
    };
    let client = auth.client_id.clone();
    if !bounded(&auth.client_id) || !bounded(&auth.instance) {
        tracing::warn!(%peer, "tunnel session refused: malformed client id or instance");
        refuse(
            &t,
            &mut io,
            AuthErrorCode::BadRequest,
            "malformed client_id or instance",
        )
        .await;
        return;
    }
    let cred = match t.registry.credential(&client).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, client_id = %client, error = %e, "tunnel session refused: cannot read the credential");
            refuse(
                &t,
                &mut io,
                AuthErrorCode::Unavailable,
                "credentials cannot be checked now",
            )
            .await;
            return;
        }
    };
    // One answer for an unknown client and a wrong token: no probing for client ids.
    let Some(cred) = cred.filter(|c| c.token_sha256.verify(&auth.token)) else {
        tracing::warn!(%peer, client_id = %client, "tunnel session refused: bad credentials");
        refuse(
            &t,
            &mut io,
            AuthErrorCode::BadCredentials,
            "unknown client or wrong token",
        )
        .await;
        return;
    };
    // The client's home set, else its business's DR set, by the one placement rule.
    // What the agent could not reach, bounded (every input is hostile).
    let unreachable: Vec<String> = auth
        .unreachable
        .iter()
        .filter(|a| a.len() <= 255)
        .take(msg::MAX_UNREACHABLE)
        .cloned()
        .collect();
    if let Err((why, to)) = t.placed(cred.placement.as_ref(), &unreachable) {
        tracing::info!(%peer, client_id = %client, reconnect_to = to.as_deref().unwrap_or("-"), "tunnel session refused: {why}");
        refuse_to(&t, &mut io, AuthErrorCode::OtherSet, &why, to).await;
        return;
    }
    if t.is_draining() {
        tracing::info!(%peer, client_id = %client, "tunnel session refused: draining");
        refuse(
            &t,
            &mut io,
            AuthErrorCode::Draining,
            "this proxy is draining",
        )
        .await;
        return;
    }
    let key = (auth.instance.clone(), auth.slot);
    if let Err(full) = t.local.check(&client, &key, s.per_client, s.max_sessions) {
        tracing::warn!(%peer, client_id = %client, limit = limit_name(&full), "tunnel session refused: too many sessions");
        refuse(
            &t,
            &mut io,
            AuthErrorCode::TooManySessions,
            limit_name(&full),
        )
        .await;
        return;
    }
    let session_id = ulid::Ulid::new().to_string();
    let ok = AuthOk {
        session_id: session_id.clone(),
        node_id: t.node_id.clone(),
        heartbeat_interval_ms: s.heartbeat.as_millis() as u64,
        max_streams: s.max_streams,
        peers: t.peer_tunnels().await,
    };
    if handshake::accept(&mut io, &ok).await.is_err() {
        return;
    }
    let mut h2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    // No HTTP/2 pings: the control stream's heartbeats are the liveness check.
    h2.timer(TokioTimer::new())
        .initial_stream_window_size(crate::tunnel::H2_STREAM_WINDOW)
        .initial_connection_window_size(crate::tunnel::H2_CONNECTION_WINDOW)
        .max_frame_size(crate::tunnel::H2_MAX_FRAME)
        .max_concurrent_reset_streams(64)
        .max_header_list_size(64 * 1024);
    let (send, conn) = match tokio::time::timeout(
        s.handshake_timeout,
        h2.handshake::<_, ProxyBody>(TokioIo::new(io)),
    )
    .await
    {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            t.metrics.event("refused", "http2");
            tracing::warn!(%peer, client_id = %client, error = %e, "tunnel session failed: HTTP/2 handshake");
            return;
        }
        Err(_) => {
            t.metrics.event("refused", "timeout");
            tracing::warn!(%peer, client_id = %client, "tunnel session failed: HTTP/2 handshake timed out");
            return;
        }
    };
    let mut conn_task = tokio::spawn(conn);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Bytes>(16);
    let out = futures::stream::unfold(ctl_rx, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, crate::proxy::BoxError>(hyper::body::Frame::data(b)),
                rx,
            )
        })
    });
    let mut sender = send.clone();
    let now = Utc::now();
    let ttl = s.heartbeat * 3;
    let record = SessionRecord {
        session_id: session_id.clone(),
        node_id: t.node_id.clone(),
        node_address: t.node_address.clone(),
        instance: auth.instance.clone(),
        slot: auth.slot,
        since: now,
        last_seen: now,
        expires_at: now + chrono::Duration::from_std(ttl).unwrap_or_default(),
        state: SessionState::Active,
        config: None,
        unhealthy: Vec::new(),
    };
    let session = Arc::new(Session::new(
        record.clone(),
        client.clone(),
        Box::new(H2Transport(send)),
        // The agent's own limit too: a stream beyond it would wait inside HTTP/2.
        s.max_streams
            .min(auth.max_streams.unwrap_or(u32::MAX).max(1)) as usize,
        ctl_tx,
    ));
    session.set_placement(cred.placement.clone(), unreachable);
    match t
        .local
        .insert(session.clone(), s.per_client, s.max_sessions)
    {
        Ok(Some(old)) => {
            t.metrics.event("replaced", "");
            tracing::info!(client_id = %client, old = %old.id, new = %session_id, "tunnel session replaced by its agent's reconnect");
            old.set_leaving();
            old.retire.notify_one();
        }
        Ok(None) => {}
        Err(full) => {
            let why = limit_name(&full);
            t.metrics.event("refused", "too_many_sessions");
            tracing::warn!(%peer, client_id = %client, limit = why, "tunnel session refused: too many sessions");
            conn_task.abort();
            return;
        }
    }
    t.metrics.sessions.inc();
    // Until this task ends (after a retired session's streams finish): shutdown waits for it.
    let _live = super::LiveSession::enter(&t);
    t.metrics.event("opened", "");
    tracing::info!(%peer, client_id = %client, session = %session_id, instance = %auth.instance, slot = auth.slot, "tunnel session opened");
    // Registered before the control stream opens: the agent counts a session as up when that
    // stream arrives, and then (make-before-break) retires its old one at once, so the new
    // record must already be where other proxies look.
    if let Err(e) = t.registry.put_session(&client, &record, ttl).await {
        tracing::warn!(client_id = %client, error = %e, "cannot register the tunnel session; retried at the next heartbeat");
    }
    t.registry.announce_session(&client).await;

    let control_req = Request::post(format!(
        "http://{}{}",
        t.node_id_authority(),
        crate::tunnel::CONTROL_PATH
    ))
    .header(crate::tunnel::CONTROL_HEADER, "1")
    .body(StreamBody::new(out).boxed())
    .expect("valid request");
    let opened = tokio::time::timeout(s.handshake_timeout, async {
        sender.ready().await?;
        sender.send_request(control_req).await
    })
    .await;
    let mut incoming = match opened {
        Ok(Ok(resp)) if resp.status().is_success() => resp.into_body(),
        other => {
            let why = match other {
                Ok(Ok(resp)) => format!("status {}", resp.status()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in time".into(),
            };
            t.metrics.event("refused", "control_stream");
            tracing::warn!(%peer, client_id = %client, %why, "tunnel session failed: control stream");
            t.local.remove(&client, &session_id);
            t.metrics.sessions.dec();
            let _ = t.registry.remove_session(&client, &record).await;
            conn_task.abort();
            return;
        }
    };

    // The agent's configuration, then again whenever it changes (`RemotePorts::apply`).
    t.push_config(&session);

    // The control loop.
    let mut tick = tokio::time::interval(s.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dead_after = s.heartbeat * crate::tunnel::HEARTBEAT_MISSES;
    let mut heard = tokio::time::Instant::now();
    let mut decoder = Decoder::default();
    let mut incoming_open = true;
    let outcome: &'static str = loop {
        tokio::select! {
            _ = tick.tick() => {
                let hb = Heartbeat { timestamp: Utc::now().timestamp(), status: String::new() };
                let _ = session.control.try_send(hb.to_frame().to_bytes());
                // A push the full queue deferred goes now.
                t.push_config(&session);
                if !refresh(&t, &session, ttl).await {
                    tracing::info!(client_id = %client, session = %session_id, "tunnel session superseded by a newer session of its agent");
                    break "superseded";
                }
                t.flush_report(&session).await;
            }
            f = incoming.frame(), if incoming_open => match f {
                Some(Ok(f)) => {
                    let Ok(data) = f.into_data() else { continue };
                    decoder.push(&data);
                    heard = tokio::time::Instant::now();
                    match read_frames(&t, &session, &mut decoder, ttl).await {
                        Ok(()) => {}
                        Err(why) => {
                            tracing::warn!(client_id = %client, session = %session_id, %why, "tunnel session closed: bad control frame");
                            break "closed";
                        }
                    }
                }
                // The agent ended its side: streams in flight may still finish.
                None | Some(Err(_)) => incoming_open = false,
            },
            () = tokio::time::sleep_until(heard + dead_after) => break "dead",
            () = session.retire.notified() => break "retired",
            _ = &mut conn_task => break "closed",
        }
    };
    session.set_leaving();
    t.local.remove(&client, &session_id);
    t.metrics.sessions.dec();
    t.metrics.event(outcome, "");
    let rec = session.record.lock().expect("not poisoned").clone();
    match t.registry.remove_session(&client, &rec).await {
        Ok(_) => t.registry.announce_session(&client).await,
        Err(e) => {
            tracing::warn!(client_id = %client, error = %e, "cannot deregister the tunnel session; it expires")
        }
    }
    tracing::info!(client_id = %client, session = %session_id, outcome, age = ?session.since.elapsed(), "tunnel session ended");
    if matches!(outcome, "retired" | "superseded") {
        // Streams in flight finish first (bounded by the grace period).
        let deadline = tokio::time::Instant::now() + s.grace;
        while session.open_streams() > 0 && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), session.idle.notified()).await;
        }
    }
    conn_task.abort();
}

/// Frames the agent sent on the control stream.
async fn read_frames(
    t: &Tunnels,
    session: &Arc<Session>,
    decoder: &mut Decoder,
    ttl: Duration,
) -> Result<(), String> {
    loop {
        if decoder.pending() > frame::HEADER_LEN + frame::MAX_FRAME {
            return Err("control stream buffer over its limit".into());
        }
        let Some(f) = decoder.next_frame().map_err(|e| e.to_string())? else {
            return Ok(());
        };
        match Kind::from_u8(f.kind) {
            Some(Kind::Heartbeat) => {}
            Some(Kind::ConfigAck) => match msg::decode::<ConfigAck>(&f) {
                Ok(ack) => t.acked(session, ack, ttl).await,
                Err(e) => return Err(e.to_string()),
            },
            Some(Kind::Health) => match msg::decode::<Health>(&f) {
                Ok(report) => t.health(session, report, ttl).await,
                Err(e) => return Err(e.to_string()),
            },
            Some(Kind::Leaving) => {
                let reason = msg::decode::<Leaving>(&f)
                    .map(|l| l.reason)
                    .unwrap_or_default();
                if session.set_leaving() {
                    tracing::info!(client_id = %session.client_id, session = %session.id, %reason, "tunnel session leaving");
                    session.record.lock().expect("not poisoned").state = SessionState::Leaving;
                    // Superseded or not, the next heartbeat decides.
                    let _ = refresh(t, session, ttl).await;
                }
            }
            other => {
                tracing::debug!(kind = f.kind, known = ?other.map(Kind::name), "control frame ignored");
            }
        }
    }
}

/// Re-registers the session (its expiry moves on; its state as known now). False when a newer
/// session of the same agent slot has taken its place in the store (the agent reconnected,
/// maybe to another node): this one is stale and must not write itself back.
pub(super) async fn refresh(t: &Tunnels, session: &Session, ttl: Duration) -> bool {
    let rec = {
        let mut r = session.record.lock().expect("not poisoned");
        let now = Utc::now();
        r.last_seen = now;
        r.expires_at = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        if session.is_leaving() {
            r.state = SessionState::Leaving;
        }
        r.clone()
    };
    // One atomic compare-and-write: a check then a write would let a replacement registered
    // in between be overwritten (the draining node's `leaving` write hid the new session).
    match t
        .registry
        .refresh_session(&session.client_id, &rec, ttl)
        .await
    {
        Ok(written) => written,
        Err(e) => {
            tracing::warn!(client_id = %session.client_id, error = %e, "cannot refresh the tunnel session");
            true
        }
    }
}

impl Tunnels {
    /// The `:authority` of requests on a session (the agent ignores it; `tunnox-target` says
    /// where a stream goes).
    fn node_id_authority(&self) -> &'static str {
        "tunnox.agent"
    }
}
