//! Content digests (`algorithm:hex`) and the running hashes that produce them.
//! Pure code: no I/O. Only sha256 and sha512 are accepted, in canonical lowercase hex.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
    /// Length of the raw hash in bytes.
    pub fn size(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
    fn tag(self) -> u8 {
        match self {
            Algorithm::Sha256 => 1,
            Algorithm::Sha512 => 2,
        }
    }
    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Algorithm::Sha256),
            2 => Some(Algorithm::Sha512),
            _ => None,
        }
    }
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// A validated digest. Stored as raw bytes; `Display` gives the canonical string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algo: Algorithm,
    bytes: Box<[u8]>,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algo
    }
    pub fn hex(&self) -> String {
        let mut buf = [0u8; 128];
        self.hex_str(&mut buf).to_owned()
    }

    /// The hex encoding in `buf` (large enough for sha512). `hex::encode` and `hex::decode`
    /// go through generic iterators that cost about a microsecond per digest; every RPC
    /// parses one and most print one (measured 3% of Info's CPU), so the slice forms are used.
    fn hex_str<'b>(&self, buf: &'b mut [u8; 128]) -> &'b str {
        let out = &mut buf[..self.bytes.len() * 2];
        hex::encode_to_slice(&self.bytes, out).expect("128 bytes hold any digest's hex");
        std::str::from_utf8(out).expect("hex is ASCII")
    }

    /// Parses `algorithm:hex`, rejecting unknown algorithms, wrong lengths and non-canonical
    /// (uppercase or non-hex) encodings with a message that names the problem.
    pub fn parse(s: &str) -> Result<Digest> {
        let Some((algo, hex_part)) = s.split_once(':') else {
            return Err(Error::invalid(format!(
                "invalid digest {s:?}: expected the form algorithm:hex"
            )));
        };
        let algo = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            "" => {
                return Err(Error::invalid(format!(
                    "invalid digest {s:?}: empty algorithm"
                )));
            }
            other => {
                return Err(Error::invalid(format!(
                    "invalid digest {s:?}: unsupported digest algorithm {other:?} (sha256 and sha512 are supported)"
                )));
            }
        };
        if hex_part.len() != algo.size() * 2 {
            return Err(Error::invalid(format!(
                "invalid digest {s:?}: {} needs {} hex characters, got {}",
                algo.name(),
                algo.size() * 2,
                hex_part.len()
            )));
        }
        if !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::invalid(format!(
                "invalid digest {s:?}: the encoded part must be lowercase hex"
            )));
        }
        let mut bytes = [0u8; 64];
        let bytes = &mut bytes[..algo.size()];
        hex::decode_to_slice(hex_part, bytes)
            .map_err(|e| Error::invalid(format!("invalid digest {s:?}: {e}")))?;
        Ok(Digest {
            algo,
            bytes: Box::from(&*bytes),
        })
    }

    /// Fixed-width binary key: one algorithm tag byte followed by the raw hash.
    pub fn key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + self.bytes.len());
        k.push(self.algo.tag());
        k.extend_from_slice(&self.bytes);
        k
    }

    /// Decodes a key written by [`Digest::key`]; returns the digest and the bytes after it.
    pub fn from_key(key: &[u8]) -> Option<(Digest, &[u8])> {
        let algo = Algorithm::from_tag(*key.first()?)?;
        let end = 1 + algo.size();
        if key.len() < end {
            return None;
        }
        Some((
            Digest {
                algo,
                bytes: key[1..end].into(),
            },
            &key[end..],
        ))
    }

    /// Digest of `data` with `algo`.
    pub fn of(algo: Algorithm, data: &[u8]) -> Digest {
        let mut h = algo.hasher();
        h.update(data);
        h.digest()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 128];
        f.write_str(self.algo.name())?;
        f.write_str(":")?;
        f.write_str(self.hex_str(&mut buf))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Digest::parse(s)
    }
}

/// A running hash. Cloning it snapshots the state, so the digest of the bytes so far can be
/// reported after every write without disturbing the stream.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    /// The digest of everything written so far.
    pub fn digest(&self) -> Digest {
        let bytes: Box<[u8]> = match self {
            Hasher::Sha256(h) => h.clone().finalize().to_vec().into_boxed_slice(),
            Hasher::Sha512(h) => h.clone().finalize().to_vec().into_boxed_slice(),
        };
        Digest {
            algo: self.algorithm(),
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_canonical_forms() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Algorithm::Sha256.hasher().digest(), d);
        let s512 = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(Digest::parse(&s512.to_string()).unwrap(), s512);
        assert!(s512.to_string().starts_with("sha512:ddaf35a1"));
    }

    #[test]
    fn rejects_malformed_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855a",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            let err = Digest::parse(bad).unwrap_err();
            assert_eq!(err.kind(), Kind::InvalidArgument, "{bad}");
            assert!(
                err.message().contains("invalid digest"),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn key_round_trips() {
        let d = Digest::of(Algorithm::Sha512, b"x");
        let mut k = d.key();
        k.extend_from_slice(b"rest");
        let (back, rest) = Digest::from_key(&k).unwrap();
        assert_eq!(back, d);
        assert_eq!(rest, b"rest");
        assert!(Digest::from_key(&[1, 2, 3]).is_none());
    }

    #[test]
    fn running_digest_snapshots() {
        let mut h = Algorithm::Sha256.hasher();
        h.update(b"foo");
        let mid = h.digest();
        h.update(b"bar");
        assert_eq!(mid, Digest::of(Algorithm::Sha256, b"foo"));
        assert_eq!(h.digest(), Digest::of(Algorithm::Sha256, b"foobar"));
    }
}
