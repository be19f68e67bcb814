//! Mapping identifiers: `hdm_<ulid>`, sortable by creation time.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PREFIX: &str = "hdm_";

/// The length of every mapping id: `hdm_` and a 26-character ULID.
const LEN: usize = 30;

/// A mapping id (`hdm_` + 26-character ULID). Lexical order is creation order. Held inline
/// (every id has the same 30 ASCII bytes): a route table of millions holds one per route and
/// saves an allocation each (issue: scale).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingId([u8; LEN]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mapping id {0:?}: expected hdm_ followed by a 26-character ULID")]
pub struct MappingIdError(pub String);

impl MappingId {
    /// A new id, strictly greater than every id this process generated before (ULIDs made in
    /// the same millisecond are ordered too, so listing order is creation order).
    pub fn generate() -> Self {
        static GENERATOR: std::sync::Mutex<Option<ulid::Generator>> = std::sync::Mutex::new(None);
        let mut guard = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
        let generator = guard.get_or_insert_with(ulid::Generator::new);
        // Overflow needs 2^80 ids in one millisecond; fall back to a fresh random ULID.
        let ulid = generator.generate().unwrap_or_else(|_| ulid::Ulid::new());
        Self::of(ulid)
    }

    fn of(ulid: ulid::Ulid) -> Self {
        let mut id = [0u8; LEN];
        id[..PREFIX.len()].copy_from_slice(PREFIX.as_bytes());
        // A ULID's text is always 26 characters of Crockford base32.
        let mut text = [0u8; ulid::ULID_LEN];
        id[PREFIX.len()..].copy_from_slice(ulid.array_to_str(&mut text).as_bytes());
        Self(id)
    }

    pub fn parse(raw: &str) -> Result<Self, MappingIdError> {
        let ulid = raw
            .strip_prefix(PREFIX)
            .ok_or_else(|| MappingIdError(raw.to_string()))?;
        let parsed = ulid::Ulid::from_string(ulid).map_err(|_| MappingIdError(raw.to_string()))?;
        // Canonical upper-case form, so two spellings never name two records.
        Ok(Self::of(parsed))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII (`of`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The 16 bytes of the id's ULID: half the size of its text, for tables of millions (a
    /// proxy's routes); [`MappingId::from_ulid_bytes`] gives the id back.
    pub fn ulid_bytes(&self) -> [u8; 16] {
        // Only ever built from a ULID (`of`).
        ulid::Ulid::from_string(&self.as_str()[PREFIX.len()..])
            .map(|u| u.to_bytes())
            .unwrap_or_default()
    }

    pub fn from_ulid_bytes(bytes: [u8; 16]) -> Self {
        Self::of(ulid::Ulid::from_bytes(bytes))
    }
}

impl fmt::Display for MappingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for MappingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MappingId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MappingId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::deserialize_parsed(d, MappingId::parse)
    }
}

/// A client id: what agents present and what `tunnox:client:{id}:session` is keyed by.
pub fn check_client_id(id: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} must be 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_comes_back_from_its_ulid_bytes() {
        for id in [
            MappingId::generate(),
            MappingId::parse("hdm_01arz3ndektsv4rrffq69g5fav").unwrap(),
        ] {
            assert_eq!(MappingId::from_ulid_bytes(id.ulid_bytes()), id);
        }
    }

    #[test]
    fn generated_ids_parse_and_sort_by_time() {
        let ids: Vec<MappingId> = (0..1000).map(|_| MappingId::generate()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids within one millisecond stay ordered"
        );
        let a = ids[0].clone();
        assert_eq!(MappingId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.as_str().len(), 30);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "hdm_",
            "abc",
            "hdm_xyz",
            "HDM_01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "hdm_01ARZ3NDEKTSV4RRFFQ69G5FA!",
        ] {
            assert!(MappingId::parse(bad).is_err(), "{bad}");
        }
        let lower = MappingId::parse("hdm_01arz3ndektsv4rrffq69g5fav").unwrap();
        assert_eq!(lower.as_str(), "hdm_01ARZ3NDEKTSV4RRFFQ69G5FAV");
    }
}
