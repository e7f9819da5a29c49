//! Chained block hashes for prefix caching.
//!
//! ```text
//!   h_0 = H(ROOT, salt, tokens[0 .. bs])
//!   h_i = H(h_{i-1}, salt, tokens[i*bs .. (i+1)*bs])
//! ```
//!
//! H is 128-bit XXH3 over a fixed little-endian encoding: the parent hash (16 bytes), a salt
//! tag (`0`, or `1` followed by the salt's length as u64 and its bytes) and every token id as
//! i64. Chaining makes a block's hash name its whole prefix, so a lookup can stop at the first
//! miss. The salt separates contents that share token ids but not K/V: a LoRA adapter, or a
//! compression policy (a compressed prefix is not the uncompressed one). 128 bits keep the
//! chance of two different prefixes colliding negligible (a collision would serve wrong K/V).

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use super::pool::BlockHash;

/// Parent of the first block of every chain ("kvcore-prefix-v1" as bytes).
pub(crate) const ROOT_HASH: BlockHash = u128::from_le_bytes(*b"kvcore-prefix-v1");

/// Hashes one full block of token ids under its parent hash and an optional salt.
pub(crate) fn hash_block(parent: BlockHash, tokens: &[i64], salt: Option<&[u8]>) -> BlockHash {
    let salt_len = salt.map_or(1, |s| 9 + s.len());
    let total = 16 + salt_len + 8 * tokens.len();
    if total <= ONE_SHOT_BYTES {
        // Common case (block_size up to ~60 without a long salt): encode on the stack and
        // hash in one shot, which is several times faster than the streaming state for
        // inputs this small. Same bytes, so the same digest as the streaming path.
        let mut buf = [0u8; ONE_SHOT_BYTES];
        buf[..16].copy_from_slice(&parent.to_le_bytes());
        let mut at = 16;
        match salt {
            None => {
                buf[at] = 0;
                at += 1;
            }
            Some(s) => {
                buf[at] = 1;
                buf[at + 1..at + 9].copy_from_slice(&(s.len() as u64).to_le_bytes());
                buf[at + 9..at + 9 + s.len()].copy_from_slice(s);
                at += 9 + s.len();
            }
        }
        for (dst, t) in buf[at..total].chunks_exact_mut(8).zip(tokens) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        return xxh3_128(&buf[..total]);
    }
    let mut h = streaming_header(parent, salt);
    // Encode in chunks so the streaming hasher sees few, large updates.
    let mut buf = [0u8; 256];
    for chunk in tokens.chunks(buf.len() / 8) {
        for (dst, t) in buf.chunks_exact_mut(8).zip(chunk) {
            dst.copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 8]);
    }
    h.digest128()
}

/// A streaming hasher fed with the parent hash and the salt tag.
fn streaming_header(parent: BlockHash, salt: Option<&[u8]>) -> Xxh3 {
    let mut h = Xxh3::new();
    h.update(&parent.to_le_bytes());
    match salt {
        None => h.update(&[0u8]),
        Some(s) => {
            h.update(&[1u8]);
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s);
        }
    }
    h
}

/// Largest encoded block hashed in one shot from a stack buffer.
const ONE_SHOT_BYTES: usize = 512;

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
            let mut h = streaming_header(ROOT_HASH, salt);
            for t in &tokens {
                h.update(&t.to_le_bytes());
            }
            assert_eq!(hash_block(ROOT_HASH, &tokens, salt), h.digest128(), "n={n}");
        }
    }
}
