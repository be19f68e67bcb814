//! The Lua scripts (`src/store/lua/`) and how their replies and arguments are read.

use redis::{Script, Value};

use crate::domain::{Hostname, Mapping, MappingId};
use crate::store::{ChangeEvent, ChangeOp, StoreError};

pub(super) struct Scripts {
    pub create: Script,
    pub update: Script,
    pub delete: Script,
    pub lookup: Script,
    pub release_dangling: Script,
    pub record_access: Script,
    pub prune_nodes: Script,
    pub mark_rebuilt: Script,
    pub check_epoch: Script,
}

macro_rules! mutation_script {
    ($file:literal) => {
        Script::new(concat!(
            include_str!("../lua/common.lua"),
            "\n",
            include_str!($file)
        ))
    };
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            create: mutation_script!("../lua/create.lua"),
            update: mutation_script!("../lua/update.lua"),
            delete: mutation_script!("../lua/delete.lua"),
            lookup: Script::new(include_str!("../lua/lookup.lua")),
            release_dangling: Script::new(include_str!("../lua/release_dangling.lua")),
            record_access: Script::new(include_str!("../lua/record_access.lua")),
            prune_nodes: Script::new(include_str!("../lua/prune_nodes.lua")),
            mark_rebuilt: Script::new(include_str!("../lua/mark_rebuilt.lua")),
            check_epoch: Script::new(include_str!("../lua/check_epoch.lua")),
        }
    }
}

pub(super) fn flag(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

pub(super) fn expiry_arg(m: &Mapping) -> String {
    m.expires_at
        .map(|t| t.timestamp_millis().to_string())
        .unwrap_or_default()
}

/// What the mutation scripts answer.
#[derive(Debug)]
pub(super) enum ScriptReply {
    Ok(u64),
    Taken(String),
    Stale(u64),
    Missing,
    /// A quota is full: the owner's (else the group's) index holds `count` ids.
    Quota {
        owner: bool,
        count: u64,
    },
}

impl ScriptReply {
    pub fn parse(value: Value) -> Result<Self, StoreError> {
        let bad = |v: &Value| StoreError::Corrupt {
            at: "script reply".into(),
            detail: format!("{v:?}"),
        };
        let Value::Array(items) = &value else {
            return Err(bad(&value));
        };
        let tag = match items.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(bad(&value)),
        };
        let int = || match items.get(1) {
            Some(Value::Int(i)) => Ok(*i as u64),
            _ => Err(bad(&value)),
        };
        let text = || match items.get(1) {
            Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            _ => Err(bad(&value)),
        };
        match tag.as_str() {
            "ok" => Ok(Self::Ok(int()?)),
            "taken" => Ok(Self::Taken(text()?)),
            "stale" => Ok(Self::Stale(int()?)),
            "missing" => Ok(Self::Missing),
            "quota" => match (text()?.as_str(), items.get(2)) {
                (scope @ ("group" | "owner"), Some(Value::Int(n))) => Ok(Self::Quota {
                    owner: scope == "owner",
                    count: *n as u64,
                }),
                _ => Err(bad(&value)),
            },
            _ => Err(bad(&value)),
        }
    }

    /// The epoch a mutation was written in: the third item of an `ok` reply.
    pub fn epoch_of(value: &Value) -> Option<String> {
        match value {
            Value::Array(items) => match items.get(2) {
                Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                Some(Value::SimpleString(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn unexpected(self, script: &str) -> StoreError {
        StoreError::Corrupt {
            at: format!("{script} script"),
            detail: format!("unexpected reply {self:?}"),
        }
    }
}

/// A change-log entry (`0-<version>`, fields v/op/id/domain/prev) as an event.
pub(super) fn parse_entry(id: &str, fields: &[(String, String)]) -> Option<ChangeEvent> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let version: u64 = id.strip_prefix("0-")?.parse().ok()?;
    Some(ChangeEvent {
        op: ChangeOp::parse(field("op")?)?,
        version,
        mapping_id: MappingId::parse(field("id")?).ok()?,
        full_domain: Hostname::parse(field("domain")?).ok()?,
        previous_domain: field("prev").and_then(|p| Hostname::parse(p).ok()),
        epoch: field("e").map(str::to_string),
        after: field("a").and_then(|a| a.parse().ok()),
    })
}
