//! Identifiers shared by every message.

use std::fmt;
use std::str::FromStr;

/// A position in an account's metadata log. Offsets start at 0 and have no gaps.
pub type LogOffset = u64;

/// A message's identity: the BLAKE3-256 hash of its exact bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        BlobHash(*blake3::hash(bytes).as_bytes())
    }

    /// The 64-character lowercase hex form used in file names and on the command line.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for BlobHash {
    fn from(h: blake3::Hash) -> Self {
        BlobHash(*h.as_bytes())
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", &self.to_hex()[..16])
    }
}

/// Why a string is not a [`BlobHash`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a message hash is 64 lowercase hex characters")]
pub struct ParseHashError;

impl FromStr for BlobHash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ParseHashError);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseHashError)?;
        Ok(BlobHash(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let h = BlobHash::of(b"hello");
        assert_eq!(h.to_hex().parse::<BlobHash>(), Ok(h));
        assert_eq!(
            h.to_hex(),
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        assert!("abc".parse::<BlobHash>().is_err());
        assert!(h.to_hex().to_uppercase().parse::<BlobHash>().is_err());
        assert!(
            ("zz".to_string() + &h.to_hex()[2..])
                .parse::<BlobHash>()
                .is_err()
        );
    }
}
