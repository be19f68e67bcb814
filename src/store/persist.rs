//! JSON-file persistence for the memory store: atomic writes (temp file, fsync, rename) and a
//! strict load: a file that cannot be read is an error naming it, never an empty store.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::Mapping;

const FORMAT: u32 = 1;

/// Read with boxed records (as the memory store keeps them: no second copy of the list), written
/// from references to them (no clone of every record under the store's lock).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Snapshot<M = Box<Mapping>> {
    pub format: u32,
    pub version: u64,
    /// The store epoch the file's history belongs to (files written before epochs have none;
    /// a new one is made when they are opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    pub mappings: Vec<M>,
}

impl<M> Snapshot<M> {
    pub(crate) fn new(version: u64, epoch: String, mappings: Vec<M>) -> Self {
        Self {
            format: FORMAT,
            version,
            epoch: Some(epoch),
            mappings,
        }
    }
}

fn err(path: &Path, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Persist {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Reads a snapshot; `Ok(None)` only when the file does not exist.
pub(crate) fn load(path: &Path) -> Result<Option<Snapshot>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(path, format!("cannot read: {e}"))),
    };
    let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| {
        err(
            path,
            format!(
                "is not a valid tunnox data file ({e}); fix or move it away, it was left untouched"
            ),
        )
    })?;
    if snap.format != FORMAT {
        return Err(err(
            path,
            format!(
                "has format {}, this build reads format {FORMAT}",
                snap.format
            ),
        ));
    }
    Ok(Some(snap))
}

/// Writes `bytes` to `path` atomically: a crash leaves either the old or the new file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(path, format!("cannot create directory: {e}")))?;
    // Unique per write: concurrent writers never share (and truncate) one temp file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tunnox-data"),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(path, format!("cannot write: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_file_is_an_error_naming_it_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        std::fs::write(&path, b"{\"format\":1,\"version\":3,\"mappings\":[{oops").unwrap();
        let e = load(&path)
            .err()
            .expect("corrupt file must fail")
            .to_string();
        assert!(e.contains("data.json"), "{e}");
        assert!(e.contains("not a valid tunnox data file"), "{e}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"format\":1,\"version\":3,\"mappings\":[{oops"
        );
    }

    #[test]
    fn missing_file_is_empty_and_roundtrip_works() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/data.json");
        assert!(load(&path).unwrap().is_none());
        let snap = Snapshot::<Mapping>::new(7, "e1".into(), Vec::new());
        write_atomic(&path, &serde_json::to_vec(&snap).unwrap()).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().version, 7);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp file left behind");
    }

    #[test]
    fn unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        std::fs::write(&path, br#"{"format":9,"version":1,"mappings":[]}"#).unwrap();
        assert!(load(&path).err().unwrap().to_string().contains("format 9"));
    }
}
