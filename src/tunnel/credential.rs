//! Agent tokens. The store and the proxies hold only a SHA-256 of a token (the controller hashes
//! the Secret's value; a single-node proxy hashes its configuration's), and a presented token is
//! checked by hashing it and comparing the digests in constant time.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::SetName;

/// The SHA-256 of a token, stored as lower-case hex.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `token` hashes to this, in time independent of where the digests differ.
    pub fn verify(&self, token: &str) -> bool {
        let presented = Self::of(token);
        let diff = self
            .0
            .iter()
            .zip(presented.0.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash of a weak token can be guessed offline: not printed whole.
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl TryFrom<String> for TokenHash {
    type Error = String;

    fn try_from(hex: String) -> Result<Self, String> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(format!(
                "token hash must be 64 hex digits, got {}",
                bytes.len()
            ));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| "token hash is not hex".to_string())?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| "token hash is not hex".to_string())?;
        }
        Ok(Self(out))
    }
}

impl From<TokenHash> for String {
    fn from(h: TokenHash) -> String {
        h.to_hex()
    }
}

/// What a proxy needs to admit a client's sessions (Redis `tunnox:tunnel:client:{id}:auth`,
/// docs/redis-schema.md; in single-node mode built from `tunnel_clients:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCredential {
    pub client_id: String,
    pub token_sha256: TokenHash,
    /// The client's home set (its TunnelSet's placement); `None`: any set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<SetName>,
    /// Who declared it, e.g. `k8s:team-a/laptop` or `config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_same_token_and_round_trips_as_hex() {
        let h = TokenHash::of("s3cret");
        let cases = [
            ("s3cret", true),
            ("s3cre", false),
            ("s3cret ", false),
            ("", false),
            ("S3cret", false),
        ];
        for (token, want) in cases {
            assert_eq!(h.verify(token), want, "{token:?}");
        }
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json.len(), 66);
        let back: TokenHash = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
        for bad in ["\"abc\"", &format!("\"{}\"", "zz".repeat(32))] {
            assert!(serde_json::from_str::<TokenHash>(bad).is_err(), "{bad}");
        }
    }
}
