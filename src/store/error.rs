//! Errors at the store boundary.

use std::path::PathBuf;

use super::QuotaScope;
use crate::domain::{Hostname, MappingId, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("domain {domain} is already claimed by mapping {holder}{}", holder_source.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    DomainTaken {
        domain: Hostname,
        holder: MappingId,
        holder_source: Option<String>,
    },
    #[error("quota reached: {scope} already holds {count} mappings (limit {limit})")]
    QuotaExceeded {
        scope: QuotaScope,
        count: u64,
        limit: usize,
    },
    #[error("mapping {id} not found")]
    NotFound { id: MappingId },
    #[error("mapping {id} changed concurrently: expected version {expected}, found {actual}")]
    VersionConflict {
        id: MappingId,
        expected: u64,
        actual: u64,
    },
    #[error("invalid mapping: {0}")]
    Invalid(#[from] SpecError),
    #[error("{0}")]
    InvalidChallenge(String),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error(
        "write reached {acked} of {wanted} replicas within {timeout:?} (storage.redis.wait_replicas): not acknowledged, a failover could lose it"
    )]
    Unreplicated {
        acked: u64,
        wanted: u32,
        timeout: std::time::Duration,
    },
    #[error("corrupt data at {at}: {detail}")]
    Corrupt { at: String, detail: String },
    #[error("persistence file {}: {detail}", path.display())]
    Persist { path: PathBuf, detail: String },
}

impl StoreError {
    /// The compare-and-set check: passes when the caller expected nothing or `actual`.
    pub(crate) fn check_version(
        id: &MappingId,
        expected: Option<u64>,
        actual: u64,
    ) -> Result<(), Self> {
        match expected {
            Some(expected) if expected != actual => Err(Self::VersionConflict {
                id: id.clone(),
                expected,
                actual,
            }),
            _ => Ok(()),
        }
    }

    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::DomainTaken { .. } => "domain_taken",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::NotFound { .. } => "not_found",
            Self::VersionConflict { .. } => "version_conflict",
            Self::Invalid(_) => "invalid",
            Self::InvalidChallenge(_) => "invalid_challenge",
            Self::Redis(_) => "redis",
            Self::Unreplicated { .. } => "unreplicated",
            Self::Corrupt { .. } => "corrupt",
            Self::Persist { .. } => "persist",
        }
    }

    /// True for errors that a retry may cure (the backend was unreachable, or a replica too
    /// slow to confirm a write), as opposed to answers about the data (conflict, not found,
    /// invalid).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Redis(_) | Self::Unreplicated { .. })
    }
}
