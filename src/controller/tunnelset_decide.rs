//! Pure deciding for TunnelSet: which TunnelSet holds a client id, the token its Secret holds,
//! whether a credential already in the store may be overwritten, and the status. No I/O.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::decide::{condition, holder_display};
use crate::crd::{TunnelSet, TunnelSetStatus};
use crate::domain::SetName;
use crate::store::SessionRecord;
use crate::tunnel::credential::{ClientCredential, TokenHash};

/// A token longer than this is not a token but a mistake (a certificate or a file pasted into
/// the Secret); it would not fit an `Auth` frame beside the client id either.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Why a TunnelSet is not accepted (`Accepted=False`): a fixed reason and a message naming the
/// field, Secret or holder. Never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// Creation time, then namespace/name: the order in which TunnelSets get a client id.
fn age(meta: &ObjectMeta) -> (i64, String, String) {
    (
        meta.creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond())
            .unwrap_or(i64::MAX),
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The TunnelSet that holds `me`'s client id instead of `me`: the oldest other one with the same
/// `clientId` that is not being deleted, if it is older than `me`.
pub fn holder_of<'a>(
    me: &TunnelSet,
    all: impl IntoIterator<Item = &'a TunnelSet>,
) -> Option<&'a TunnelSet> {
    all.into_iter()
        .filter(|o| {
            o.spec.client_id == me.spec.client_id
                && o.metadata.uid != me.metadata.uid
                && o.metadata.deletion_timestamp.is_none()
                && age(&o.metadata) < age(&me.metadata)
        })
        .min_by_key(|o| age(&o.metadata))
}

/// The placement, or why it is refused.
pub fn placement(ts: &TunnelSet) -> Result<SetName, Refusal> {
    let p = &ts.spec.placement;
    SetName::new(&p.business, &p.region)
        .map_err(|e| Refusal::new("InvalidPlacement", format!("spec.placement: {e}")))
}

/// The hash of the token in `secret` (the Secret `ns/name` named by `spec.auth.secretRef`) under
/// `key`. As with the agent's `token_file`, trailing line breaks are dropped, so a Secret made
/// with `--from-file` holds the same token as the file.
pub fn token_hash(
    secret: Option<&Secret>,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<TokenHash, Refusal> {
    let Some(secret) = secret else {
        return Err(Refusal::new(
            "SecretNotFound",
            format!("Secret {ns}/{name} (spec.auth.secretRef) does not exist"),
        ));
    };
    let Some(value) = secret.data.as_ref().and_then(|d| d.get(key)) else {
        return Err(Refusal::new(
            "SecretKeyMissing",
            format!("Secret {ns}/{name} has no key {key:?} (spec.auth.secretRef.key)"),
        ));
    };
    let invalid = |why: &str| {
        Refusal::new(
            "InvalidToken",
            format!("Secret {ns}/{name} key {key:?}: the token {why}"),
        )
    };
    let bytes = &value.0;
    if bytes.len() > MAX_TOKEN_BYTES + 2 {
        return Err(invalid(&format!(
            "is {} bytes, more than {MAX_TOKEN_BYTES}",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("is not UTF-8 text"))?;
    let token = text.trim_end_matches(['\r', '\n']);
    if token.is_empty() {
        return Err(invalid("is empty"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(invalid(&format!(
            "is {} bytes, more than {MAX_TOKEN_BYTES}",
            token.len()
        )));
    }
    Ok(TokenHash::of(token))
}

/// Who the credential already in the store for a client id belongs to, seen from the
/// TunnelSet whose source is `mine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// None, or this TunnelSet's: write.
    Free,
    /// Another TunnelSet of this cluster (one deleted while the controller was away, or one
    /// the creation order has now put behind): the order among this cluster's TunnelSets was
    /// decided from the cache, so write.
    OursElsewhere,
    /// Someone else's (another cluster sharing the store, or not from Kubernetes): refuse,
    /// naming it.
    Foreign(String),
}

pub fn existing(cred: Option<&ClientCredential>, mine: &str, cluster: &str) -> Existing {
    let Some(source) = cred.map(|c| c.source.as_deref()) else {
        return Existing::Free;
    };
    match source {
        Some(s) if s == mine => Existing::Free,
        Some(s)
            if s.strip_prefix("k8s:")
                .and_then(|r| r.strip_prefix(cluster))
                .is_some_and(|r| r.starts_with('/')) =>
        {
            Existing::OursElsewhere
        }
        Some(s) => Existing::Foreign(holder_display(Some(s), "", cluster)),
        None => Existing::Foreign("a credential with no source".into()),
    }
}

/// What one reconcile decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The credential is in the store.
    Accepted { client_id: String, set: SetName },
    /// No credential of this TunnelSet is in the store.
    Refused {
        refusal: Refusal,
        set: Option<SetName>,
    },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Refused { .. } => "refused",
        }
    }
}

/// The status: `Accepted`, and `online`/`node`/`connectedSince` with an `Online` condition from
/// the client's live sessions as of this reconcile (an agent's coming or going triggers one),
/// and `configHash`, the configuration its newest live session acknowledged. Tunnels and the
/// endpoint are the caller's.
pub fn status(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&TunnelSetStatus>,
    sessions: &[SessionRecord],
    now: DateTime<Utc>,
) -> TunnelSetStatus {
    let now_t = Time(
        jiff::Timestamp::from_millisecond(now.timestamp_millis())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    );
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let mut s = previous.cloned().unwrap_or_default();
    s.observed_generation = generation;
    let (accepted, set) = match outcome {
        Outcome::Accepted { client_id, set } => {
            s.client_id = Some(client_id.clone());
            (
                (
                    true,
                    "CredentialWritten",
                    format!("client {client_id} is admitted with the token of its Secret"),
                ),
                Some(set),
            )
        }
        Outcome::Refused { refusal, set } => {
            s.client_id = None;
            (
                (false, refusal.reason, refusal.message.clone()),
                set.as_ref(),
            )
        }
    };
    s.set = set.map(ToString::to_string);
    let live: Vec<&SessionRecord> = sessions.iter().filter(|r| r.live_at(now)).collect();
    s.online = !live.is_empty();
    s.node = live
        .iter()
        .min_by_key(|r| r.since)
        .map(|r| r.node_id.clone());
    s.connected_since = live.iter().map(|r| r.since).min().map(|t| {
        Time(
            jiff::Timestamp::from_millisecond(t.timestamp_millis())
                .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        )
    });
    let online = if live.is_empty() {
        (
            false,
            "NoSession",
            "no live session of this client".to_string(),
        )
    } else {
        let mut nodes: Vec<&str> = live.iter().map(|r| r.node_id.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        (
            true,
            "SessionsSeen",
            format!(
                "{} live session(s) on {} (as of the last reconcile)",
                live.len(),
                nodes.join(", ")
            ),
        )
    };
    s.config_hash = acknowledged(sessions, now).map(|a| a.hash.clone());
    s.conditions = vec![
        condition(
            "Accepted", accepted.0, accepted.1, accepted.2, generation, &now_t, prev,
        ),
        condition(
            "Online", online.0, online.1, online.2, generation, &now_t, prev,
        ),
    ];
    s
}

/// The client's newest live session that acknowledged a configuration: its agent's latest view.
fn newest_acknowledging(sessions: &[SessionRecord], now: DateTime<Utc>) -> Option<&SessionRecord> {
    sessions
        .iter()
        .filter(|r| r.live_at(now) && r.config.is_some())
        .max_by_key(|r| r.since)
}

fn listening<'a>(
    tunnels: &'a mut [crate::crd::TunnelStatus],
    name: &str,
) -> Option<&'a mut crate::crd::TunnelStatus> {
    tunnels
        .iter_mut()
        .find(|t| t.name == name && t.state == "Listening")
}

/// The configuration the client's newest live session acknowledged.
fn acknowledged(
    sessions: &[SessionRecord],
    now: DateTime<Utc>,
) -> Option<&crate::tunnel::config::ConfigAck> {
    newest_acknowledging(sessions, now).and_then(|r| r.config.as_ref())
}

/// What the agent says of its tunnels (its newest live session): a `Listening` tunnel it
/// refuses becomes `Rejected` with its reason, one whose health check fails `Unhealthy`; other
/// states say more already.
pub fn agent_states(
    tunnels: &mut [crate::crd::TunnelStatus],
    sessions: &[SessionRecord],
    now: DateTime<Utc>,
) {
    let Some(rec) = newest_acknowledging(sessions, now) else {
        return;
    };
    let refused = rec.config.iter().flat_map(|c| &c.rejected);
    for r in refused {
        if let Some(t) = listening(tunnels, &r.name) {
            t.state = "Rejected".into();
            t.message = Some(format!("the agent refuses it: {}", r.reason));
        }
    }
    for name in &rec.unhealthy {
        if let Some(t) = listening(tunnels, name) {
            t.state = "Unhealthy".into();
            t.message =
                Some("its health check fails on the agent: it takes no new connections".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Placement, SecretKeyRef, TunnelAuth, TunnelSetSpec};
    use k8s_openapi::ByteString;

    fn ts(ns: &str, name: &str, client: &str, created_ms: i64) -> TunnelSet {
        let mut t = TunnelSet::new(
            name,
            TunnelSetSpec {
                client_id: client.into(),
                auth: TunnelAuth {
                    secret_ref: SecretKeyRef {
                        name: "tok".into(),
                        key: "token".into(),
                    },
                },
                placement: Placement {
                    business: "b".into(),
                    region: "r".into(),
                },
                groups: vec![],
                tunnels: vec![],
            },
        );
        t.metadata.namespace = Some(ns.into());
        t.metadata.uid = Some(format!("{ns}-{name}"));
        t.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_millisecond(created_ms).unwrap()));
        t
    }

    fn secret(pairs: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn the_oldest_tunnelset_holds_a_client_id() {
        let a = ts("a", "first", "laptop", 1000);
        let b = ts("b", "second", "laptop", 2000);
        let c = ts("c", "other", "desk", 500);
        let mut gone = ts("d", "gone", "laptop", 10);
        gone.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let tie = ts("0", "tie", "laptop", 2000);
        let all = [a.clone(), b.clone(), c.clone(), gone, tie.clone()];
        // (me, holder's name or "" when me holds it)
        let cases = [(&a, ""), (&b, "first"), (&c, ""), (&tie, "first")];
        for (me, want) in cases {
            let got = holder_of(me, &all).and_then(|h| h.metadata.name.clone());
            assert_eq!(got.unwrap_or_default(), want, "{:?}", me.metadata.name);
        }
        // Same time: namespace/name decides, so exactly one of two holds it.
        let pair = [b.clone(), ts("0", "tie", "laptop", 2000)];
        assert!(holder_of(&b, &pair).is_some());
        assert!(holder_of(&pair[1], &pair).is_none());
    }

    #[test]
    fn secrets_give_a_token_hash_or_a_reason_naming_secret_and_key() {
        let long = vec![b'x'; MAX_TOKEN_BYTES + 1];
        let max = vec![b'x'; MAX_TOKEN_BYTES];
        let s_ok = secret(&[("token", b"s3cret")]);
        let s_nl = secret(&[("token", b"s3cret\r\n")]);
        let s_other = secret(&[("other", b"s3cret")]);
        let s_empty = secret(&[("token", b"\n")]);
        let s_long = secret(&[("token", &long)]);
        let s_max = secret(&[("token", &max)]);
        let s_bin = secret(&[("token", &[0xff, 0xfe])]);
        let no_data = Secret::default();
        // (secret, key, Ok(token) or Err((reason, message fragment)))
        type Want<'a> = Result<&'a [u8], (&'a str, &'a str)>;
        let cases: Vec<(Option<&Secret>, &str, Want)> = vec![
            (Some(&s_ok), "token", Ok(b"s3cret")),
            (Some(&s_nl), "token", Ok(b"s3cret")),
            (Some(&s_max), "token", Ok(&max)),
            (
                None,
                "token",
                Err((
                    "SecretNotFound",
                    "Secret ns/tok (spec.auth.secretRef) does not exist",
                )),
            ),
            (
                Some(&s_other),
                "token",
                Err(("SecretKeyMissing", "Secret ns/tok has no key \"token\"")),
            ),
            (
                Some(&no_data),
                "token",
                Err(("SecretKeyMissing", "Secret ns/tok has no key \"token\"")),
            ),
            (
                Some(&s_empty),
                "token",
                Err((
                    "InvalidToken",
                    "Secret ns/tok key \"token\": the token is empty",
                )),
            ),
            (
                Some(&s_long),
                "token",
                Err(("InvalidToken", "more than 4096")),
            ),
            (Some(&s_bin), "token", Err(("InvalidToken", "not UTF-8"))),
        ];
        for (s, key, want) in cases {
            let got = token_hash(s, "ns", "tok", key);
            match (got, want) {
                (Ok(h), Ok(token)) => {
                    assert_eq!(h, TokenHash::of(std::str::from_utf8(token).unwrap()))
                }
                (Err(r), Err((reason, fragment))) => {
                    assert_eq!(r.reason, reason);
                    assert!(r.message.contains(fragment), "{}", r.message);
                    assert!(!r.message.contains("s3cret"), "never the token");
                }
                (got, want) => panic!("{got:?} / {want:?}"),
            }
        }
    }

    #[test]
    fn only_credentials_of_this_cluster_are_overwritten() {
        let cred = |source: Option<&str>| ClientCredential {
            client_id: "laptop".into(),
            token_sha256: TokenHash::of("t"),
            placement: None,
            source: source.map(str::to_string),
        };
        let mine = "k8s:c1/a/ts";
        let cases = [
            (None, Existing::Free),
            (Some(cred(Some(mine))), Existing::Free),
            (Some(cred(Some("k8s:c1/b/old"))), Existing::OursElsewhere),
            (
                Some(cred(Some("k8s:c10/a/ts"))),
                Existing::Foreign("c10/a/ts".into()),
            ),
            (
                Some(cred(Some("k8s:c2/a/ts"))),
                Existing::Foreign("c2/a/ts".into()),
            ),
            (
                Some(cred(Some("config"))),
                Existing::Foreign("config".into()),
            ),
            (
                Some(cred(None)),
                Existing::Foreign("a credential with no source".into()),
            ),
        ];
        for (c, want) in cases {
            assert_eq!(existing(c.as_ref(), mine, "c1"), want, "{c:?}");
        }
    }

    #[test]
    fn status_shows_acceptance_placement_and_sessions() {
        let now = Utc::now();
        let set = SetName::new("b", "r").unwrap();
        let accepted = Outcome::Accepted {
            client_id: "laptop".into(),
            set: set.clone(),
        };
        let s1 = status(&accepted, Some(2), None, &[], now);
        assert_eq!(s1.set.as_deref(), Some("b.r"));
        assert_eq!(s1.client_id.as_deref(), Some("laptop"));
        assert_eq!(s1.observed_generation, Some(2));
        assert!(!s1.online);
        let cond = |s: &TunnelSetStatus, t: &str| {
            let c = s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
            (c.status, c.reason)
        };
        assert_eq!(
            cond(&s1, "Accepted"),
            ("True".into(), "CredentialWritten".into())
        );
        assert_eq!(cond(&s1, "Online"), ("False".into(), "NoSession".into()));
        // Unchanged inputs later: an equal status (no write).
        assert_eq!(status(&accepted, Some(2), Some(&s1), &[], Utc::now()), s1);

        let since = now - chrono::Duration::seconds(30);
        let rec = |id: &str, node: &str, since: DateTime<Utc>, ttl: i64| SessionRecord {
            session_id: id.into(),
            node_id: node.into(),
            node_address: "127.0.0.1:1".into(),
            instance: id.into(),
            slot: 0,
            since,
            last_seen: now,
            expires_at: now + chrono::Duration::seconds(ttl),
            state: Default::default(),
            config: None,
            unhealthy: Vec::new(),
        };
        let sessions = [
            rec("s1", "n2", now, 15),
            rec("s2", "n1", since, 15),
            rec("s3", "n0", since - chrono::Duration::seconds(60), -1),
        ];
        let s2 = status(&accepted, Some(2), Some(&s1), &sessions, now);
        assert!(s2.online);
        assert_eq!(s2.node.as_deref(), Some("n1"), "the oldest live session");
        assert_eq!(
            s2.connected_since.as_ref().map(|t| t.0.as_millisecond()),
            Some(since.timestamp_millis())
        );
        assert_eq!(cond(&s2, "Online"), ("True".into(), "SessionsSeen".into()));

        let refused = Outcome::Refused {
            refusal: Refusal::new("SecretNotFound", "Secret a/tok ...".into()),
            set: Some(set),
        };
        let s3 = status(&refused, Some(3), Some(&s2), &[], now);
        assert_eq!(s3.client_id, None, "no credential held");
        assert_eq!(
            cond(&s3, "Accepted"),
            ("False".into(), "SecretNotFound".into())
        );
        assert_eq!(s3.set.as_deref(), Some("b.r"));
    }

    #[test]
    fn the_newest_live_acknowledgement_gives_the_hash_and_the_refusals() {
        use crate::crd::TunnelStatus;
        use crate::tunnel::config::{ConfigAck, Rejected};
        let now = Utc::now();
        let ack = |hash: &str, refused: &[&str]| ConfigAck {
            hash: hash.into(),
            rejected: refused
                .iter()
                .map(|n| Rejected {
                    name: (*n).into(),
                    reason: "local target localhost:5432 is not in this agent's allow list".into(),
                })
                .collect(),
        };
        let rec = |id: &str, age: i64, ttl: i64, config: Option<ConfigAck>| SessionRecord {
            session_id: id.into(),
            node_id: "n1".into(),
            node_address: "127.0.0.1:1".into(),
            instance: id.into(),
            slot: 0,
            since: now - chrono::Duration::seconds(age),
            last_seen: now,
            expires_at: now + chrono::Duration::seconds(ttl),
            state: Default::default(),
            config,
            unhealthy: Vec::new(),
        };
        let sessions = [
            rec("old", 60, 15, Some(ack("sha256:1111111111111111", &[]))),
            rec(
                "new",
                5,
                15,
                Some(ack("sha256:2222222222222222", &["db", "dns"])),
            ),
            rec("newest-no-ack", 1, 15, None),
            rec(
                "expired",
                0,
                -1,
                Some(ack("sha256:3333333333333333", &["ssh"])),
            ),
        ];
        let accepted = Outcome::Accepted {
            client_id: "laptop".into(),
            set: SetName::new("b", "r").unwrap(),
        };
        let s = status(&accepted, Some(1), None, &sessions, now);
        assert_eq!(s.config_hash.as_deref(), Some("sha256:2222222222222222"));
        assert_eq!(status(&accepted, Some(1), None, &[], now).config_hash, None);

        let ts = |name: &str, state: &str| TunnelStatus {
            name: name.into(),
            state: state.into(),
            ..Default::default()
        };
        let mut tunnels = vec![
            ts("ssh", "Listening"),
            ts("db", "Listening"),
            ts("dns", "Conflict"),
            ts("web", "Listening"),
        ];
        let mut sessions = sessions;
        sessions[1].unhealthy = vec!["web".into()];
        agent_states(&mut tunnels, &sessions, now);
        let states: Vec<&str> = tunnels.iter().map(|t| t.state.as_str()).collect();
        assert_eq!(states, ["Listening", "Rejected", "Conflict", "Unhealthy"]);
        assert!(
            tunnels[1]
                .message
                .as_deref()
                .unwrap()
                .contains("not in this agent's allow list")
        );
    }
}
