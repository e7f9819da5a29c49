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

use xxhash_rust::xxh3::Xxh3;

use super::pool::BlockHash;

/// Parent of the first block of every chain ("kvcore-prefix-v1" as bytes).
pub(crate) const ROOT_HASH: BlockHash = u128::from_le_bytes(*b"kvcore-prefix-v1");

/// Hashes one full block of token ids under its parent hash and an optional salt.
pub(crate) fn hash_block(parent: BlockHash, tokens: &[i64], salt: Option<&[u8]>) -> BlockHash {
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
}
