//! Chained block hashes for prefix caching.
//!
//! ```text
//!   h_0 = H(ROOT, salt, tokens[0 .. bs])
//!   h_i = H(h_{i-1}, salt, tokens[i*bs .. (i+1)*bs])
//! ```
//!
//! H is 128-bit XXH3 over a fixed little-endian encoding: the parent hash (16 bytes), a salt
//! tag (`0`, or `1` followed by the salt's length as u64 and its bytes) and every token id as
//! i64. A block can instead be named by a key the engine computed itself (its own block
//! hash, any fixed number of bytes): the encoding is then the parent, the salt tag plus 2
//! (`2`, or `3` with the salt), and the key's bytes. The tags keep the two kinds of block
//! apart, so a key can never collide with a block of token ids by construction. Chaining makes a block's hash name its whole prefix, so a lookup can stop at the first
//! miss. The salt separates contents that share token ids but not K/V: a LoRA adapter, or a
//! compression policy (a compressed prefix is not the uncompressed one). 128 bits keep the
//! chance of two different prefixes colliding negligible (a collision would serve wrong K/V).

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::pool::BlockHash;

/// Parent of the first block of every chain ("kvcore-prefix-v1" as bytes).
pub(crate) const ROOT_HASH: BlockHash = u128::from_le_bytes(*b"kvcore-prefix-v1");

/// What names the contents of a table's full blocks, for registering and adopting prefixes.
#[derive(Clone, Copy, Debug)]
pub enum BlockKeys<'a> {
    /// One token id per position; block `i` is `tokens[i * block_size..(i + 1) * block_size]`.
    Tokens(&'a [i64]),
    /// One key per block, computed by the engine (its own block hash): row `i` is
    /// `bytes[i * width..(i + 1) * width]`. Chained and salted like token blocks.
    Hashes { bytes: &'a [u8], width: usize },
}

impl<'a> BlockKeys<'a> {
    /// Units of `len()`: positions for token ids, blocks for engine keys.
    pub(crate) fn len(&self) -> usize {
        match *self {
            BlockKeys::Tokens(t) => t.len(),
            BlockKeys::Hashes { bytes, width } => bytes.len() / width.max(1),
        }
    }

    /// Full blocks these keys name (a partial block of token ids does not count).
    pub(crate) fn num_blocks(&self, bs: usize) -> usize {
        match *self {
            BlockKeys::Tokens(t) => t.len() / bs,
            BlockKeys::Hashes { .. } => self.len(),
        }
    }

    /// Units a table of `num_tokens` tokens must be given to register every full block.
    pub(crate) fn units_for(&self, num_tokens: usize, bs: usize) -> usize {
        match self {
            BlockKeys::Tokens(_) => num_tokens,
            BlockKeys::Hashes { .. } => num_tokens / bs,
        }
    }

    /// The keys of units `start..end` (positions or rows, see `len`).
    pub(crate) fn slice(&self, start: usize, end: usize) -> BlockKeys<'a> {
        match *self {
            BlockKeys::Tokens(t) => BlockKeys::Tokens(&t[start..end]),
            BlockKeys::Hashes { bytes, width } => BlockKeys::Hashes {
                bytes: &bytes[start * width..end * width],
                width,
            },
        }
    }

    /// The chained hash of block `i` under `parent`.
    #[inline]
    pub(crate) fn hash(
        &self,
        i: usize,
        bs: usize,
        parent: BlockHash,
        salt: Option<&[u8]>,
    ) -> BlockHash {
        match *self {
            BlockKeys::Tokens(t) => hash_block(parent, &t[i * bs..(i + 1) * bs], salt),
            BlockKeys::Hashes { bytes, width } => {
                hash_key(parent, &bytes[i * width..(i + 1) * width], salt)
            }
        }
    }

    /// The name of the argument, for error messages.
    pub(crate) fn what(&self) -> &'static str {
        match self {
            BlockKeys::Tokens(_) => "token_ids",
            BlockKeys::Hashes { .. } => "block_hashes",
        }
    }
}

/// Hashes one full block of token ids under its parent hash and an optional salt.
#[inline]
pub(crate) fn hash_block(parent: BlockHash, tokens: &[i64], salt: Option<&[u8]>) -> BlockHash {
    // The common block (16 tokens, no salt): every copy has a fixed length, so the encoding
    // is a few vector moves instead of a call to memcpy over a zeroed buffer. Same bytes.
    if let (None, Ok(block)) = (salt, <&[i64; 16]>::try_from(tokens)) {
        let mut buf = [0u8; 16 + 1 + 16 * 8];
        buf[..16].copy_from_slice(&parent.to_le_bytes());
        // buf[16] = 0: the tag of a block of token ids without a salt.
        for (dst, t) in buf[17..].chunks_exact_mut(8).zip(block) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        return xxh3_128(&buf);
    }
    hash_encoded(
        parent,
        salt,
        0,
        tokens.len() * 8,
        tokens.chunks(32),
        |buf, chunk| {
            for (dst, t) in buf.chunks_exact_mut(8).zip(chunk) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            chunk.len() * 8
        },
    )
}

/// Hashes one block named by an engine's key (raw bytes) under its parent and salt.
pub(crate) fn hash_key(parent: BlockHash, key: &[u8], salt: Option<&[u8]>) -> BlockHash {
    hash_encoded(parent, salt, 2, key.len(), key.chunks(256), |buf, chunk| {
        buf[..chunk.len()].copy_from_slice(chunk);
        chunk.len()
    })
}

/// The shared encoding: parent, salt tag (`kind`, or `kind + 1` with the salt) and a payload
/// of `payload_len` bytes that `encode` writes piece by piece (at most 256 bytes a piece).
#[inline]
fn hash_encoded<P>(
    parent: BlockHash,
    salt: Option<&[u8]>,
    kind: u8,
    payload_len: usize,
    pieces: impl Iterator<Item = P>,
    encode: impl Fn(&mut [u8], P) -> usize,
) -> BlockHash {
    let salt_len = salt.map_or(1, |s| 9 + s.len());
    let total = 16 + salt_len + payload_len;
    if total <= SMALL_BYTES {
        // block_size 16 without a long salt: a smaller buffer to clear.
        return one_shot::<SMALL_BYTES, P>(parent, salt, kind, total, pieces, encode);
    }
    if total <= ONE_SHOT_BYTES {
        return one_shot::<ONE_SHOT_BYTES, P>(parent, salt, kind, total, pieces, encode);
    }
    let mut h = streaming_header(parent, salt, kind);
    // Encode in pieces so the streaming hasher sees few, large updates.
    let mut buf = [0u8; 256];
    for piece in pieces {
        let n = encode(&mut buf, piece);
        h.update(&buf[..n]);
    }
    h.digest128()
}

/// Encodes on the stack and hashes in one shot, which is several times faster than the
/// streaming state for inputs this small (block_size up to ~60 without a long salt). Same
/// bytes, so the same digest as the streaming path.
#[inline]
fn one_shot<const N: usize, P>(
    parent: BlockHash,
    salt: Option<&[u8]>,
    kind: u8,
    total: usize,
    pieces: impl Iterator<Item = P>,
    encode: impl Fn(&mut [u8], P) -> usize,
) -> BlockHash {
    {
        let mut buf = [0u8; N];
        buf[..16].copy_from_slice(&parent.to_le_bytes());
        let mut at = 16;
        match salt {
            None => {
                buf[at] = kind;
                at += 1;
            }
            Some(s) => {
                buf[at] = kind + 1;
                buf[at + 1..at + 9].copy_from_slice(&(s.len() as u64).to_le_bytes());
                buf[at + 9..at + 9 + s.len()].copy_from_slice(s);
                at += 9 + s.len();
            }
        }
        for piece in pieces {
            at += encode(&mut buf[at..], piece);
        }
        debug_assert_eq!(at, total);
        xxh3_128(&buf[..total])
    }
}

/// A streaming hasher fed with the parent hash and the salt tag.
fn streaming_header(parent: BlockHash, salt: Option<&[u8]>, kind: u8) -> Xxh3 {
    let mut h = Xxh3::new();
    h.update(&parent.to_le_bytes());
    match salt {
        None => h.update(&[kind]),
        Some(s) => {
            h.update(&[kind + 1]);
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s);
        }
    }
    h
}

/// Largest encoded block hashed in one shot from a stack buffer.
const ONE_SHOT_BYTES: usize = 512;
/// The smaller stack buffer: 16 token ids, the parent and a salt of up to 22 bytes.
const SMALL_BYTES: usize = 192;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaining_salt_and_tokens_all_change_the_hash() {
        let a = hash_block(ROOT_HASH, &[1, 2, 3, 4], None);
        assert_eq!(a, hash_block(ROOT_HASH, &[1, 2, 3, 4], None));
        assert_ne!(a, hash_block(ROOT_HASH, &[1, 2, 3, 5], None));
        assert_ne!(a, hash_block(a, &[1, 2, 3, 4], None));
        assert_ne!(a, hash_block(ROOT_HASH, &[1, 2, 3, 4], Some(b"")));
        assert_ne!(
            hash_block(ROOT_HASH, &[1, 2, 3, 4], Some(b"lora-1")),
            hash_block(ROOT_HASH, &[1, 2, 3, 4], Some(b"lora-2"))
        );
        // Long blocks cross the 32-token encoding chunk.
        let long: Vec<i64> = (0..100).collect();
        let mut other = long.clone();
        other[99] = -1;
        assert_ne!(
            hash_block(ROOT_HASH, &long, None),
            hash_block(ROOT_HASH, &other, None)
        );
    }

    /// The one-shot path and the streaming path hash the same bytes: check the one-shot
    /// result against a streaming hash of the documented encoding.
    #[test]
    fn one_shot_matches_the_streaming_encoding() {
        for (n, salt) in [
            (16usize, None),
            (4, Some(&b"lora-7"[..])),
            (60, None),
            (63, Some(&b""[..])),
        ] {
            let tokens: Vec<i64> = (0..n as i64).map(|i| i * 1_000_003 - 77).collect();
            let mut h = streaming_header(ROOT_HASH, salt, 0);
            for t in &tokens {
                h.update(&t.to_le_bytes());
            }
            assert_eq!(hash_block(ROOT_HASH, &tokens, salt), h.digest128(), "n={n}");
        }
    }

    #[test]
    fn engine_keys_chain_salt_and_never_alias_token_blocks() {
        let key = 7u128.to_le_bytes();
        let a = hash_key(ROOT_HASH, &key, None);
        assert_eq!(a, hash_key(ROOT_HASH, &key, None));
        assert_ne!(a, hash_key(a, &key, None));
        assert_ne!(a, hash_key(ROOT_HASH, &key, Some(b"")));
        // Two token ids encode to the same 16 payload bytes as the key: the tag differs.
        assert_ne!(a, hash_block(ROOT_HASH, &[7, 0], None));
        let long = [3u8; 600];
        let mut h = streaming_header(ROOT_HASH, Some(b"s"), 2);
        h.update(&long);
        assert_eq!(hash_key(ROOT_HASH, &long, Some(b"s")), h.digest128());
    }
}
