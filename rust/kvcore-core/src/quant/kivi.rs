//! KIVI storage for one (layer, kv-head): keys quantized per channel, values per token, with a
//! full-precision (float16) residual window of the last `residual` tokens.
//!
//! ```text
//! keys   : [ block 0 (R tokens, Token-axis groups of G) | block 1 | ... ] [ fp16 tail: n mod R ]
//! values : [ token 0 (Channel-axis groups of G) | token 1 | ... ]        [ fp16 FIFO: min(n, R) ]
//! ```
//!
//! Keys are flushed a whole block of `R` tokens at a time, when the tail reaches `R` tokens
//! (so `R` must be a multiple of `G`); values one token at a time, when the FIFO would exceed
//! `R`. Both therefore hold `floor(n / R) * R` quantized keys and `max(n - R, 0)` quantized
//! values after `n` appended tokens, however the tokens were split into `append` calls.

use super::codec::{dequantize_into, f16_bits_to_f32, quantize_into};
use super::layout::{GroupAxis, MetaDtype, QuantLayout};
use crate::error::{KvError, Result};

/// KIVI's defaults (`jy-yuan/KIVI` `example.py`): 2 bits, group 32, residual 32.
pub const KIVI_DEFAULT_BITS: u32 = 2;
/// Default group size.
pub const KIVI_DEFAULT_GROUP: usize = 32;
/// Default residual window.
pub const KIVI_DEFAULT_RESIDUAL: usize = 32;

/// Bytes of a float16 residual value.
const FP_BYTES: usize = 2;

/// The two block layouts of a KIVI configuration, validated.
fn layouts(
    head_dim: usize,
    bits: u32,
    group_size: usize,
    residual: usize,
    meta: MetaDtype,
) -> Result<(QuantLayout, QuantLayout)> {
    if residual == 0 || residual % group_size.max(1) != 0 {
        return Err(KvError::InvalidArgument(format!(
            "KIVI needs a residual window that is a positive multiple of group_size (keys are \
             flushed a whole window at a time), got residual={residual}, group_size={group_size}"
        )));
    }
    let k = QuantLayout::new(bits, group_size, GroupAxis::Token, meta, residual, head_dim)?;
    let v = QuantLayout::new(bits, group_size, GroupAxis::Channel, meta, 1, head_dim)?;
    Ok((k, v))
}

/// Exact bytes held by a KIVI cache of one head after `num_tokens` tokens.
pub fn kivi_nbytes(
    num_tokens: usize,
    head_dim: usize,
    bits: u32,
    group_size: usize,
    residual: usize,
    meta: MetaDtype,
) -> Result<usize> {
    let (kl, vl) = layouts(head_dim, bits, group_size, residual, meta)?;
    let kq = num_tokens / residual;
    let vq = num_tokens.saturating_sub(residual);
    let fp = |tokens: usize| tokens.checked_mul(head_dim)?.checked_mul(FP_BYTES);
    let total = (|| {
        kq.checked_mul(kl.nbytes())?
            .checked_add(fp(num_tokens - kq * residual)?)?
            .checked_add(vq.checked_mul(vl.nbytes())?)?
            .checked_add(fp(num_tokens - vq)?)
    })();
    total.ok_or_else(|| {
        KvError::InvalidArgument(format!(
            "{num_tokens} tokens of head_dim {head_dim} overflow a byte count"
        ))
    })
}

/// A growing KIVI cache for one (layer, kv-head).
#[derive(Debug, Clone)]
pub struct KiviCache {
    head_dim: usize,
    residual: usize,
    key_layout: QuantLayout,
    value_layout: QuantLayout,
    key_blocks: Vec<u8>,
    key_tail: Vec<u16>,
    value_codes: Vec<u8>,
    /// FIFO of float16 bits; the oldest token starts at `value_head * head_dim`.
    value_fifo: Vec<u16>,
    num_tokens: usize,
}

impl KiviCache {
    /// An empty cache. Errors as [`QuantLayout::new`], or when `residual` is not a positive
    /// multiple of `group_size`.
    pub fn new(
        head_dim: usize,
        bits: u32,
        group_size: usize,
        residual: usize,
        meta: MetaDtype,
    ) -> Result<Self> {
        let (key_layout, value_layout) = layouts(head_dim, bits, group_size, residual, meta)?;
        Ok(KiviCache {
            head_dim,
            residual,
            key_layout,
            value_layout,
            key_blocks: Vec::new(),
            key_tail: Vec::new(),
            value_codes: Vec::new(),
            value_fifo: Vec::new(),
            num_tokens: 0,
        })
    }

    /// The per-channel key block layout (`residual x head_dim`).
    pub fn key_layout(&self) -> &QuantLayout {
        &self.key_layout
    }
    /// The per-token value layout (`1 x head_dim`).
    pub fn value_layout(&self) -> &QuantLayout {
        &self.value_layout
    }
    /// Tokens appended so far.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    /// Keys held quantized.
    pub fn num_quantized_keys(&self) -> usize {
        self.key_blocks.len() / self.key_layout.nbytes() * self.residual
    }
    /// Values held quantized.
    pub fn num_quantized_values(&self) -> usize {
        self.value_codes.len() / self.value_layout.nbytes()
    }

    /// Exact bytes held: quantized blocks with their metadata plus the float16 windows.
    pub fn nbytes(&self) -> usize {
        self.key_blocks.len()
            + self.key_tail.len() * FP_BYTES
            + self.value_codes.len()
            + self.value_fifo.len() * FP_BYTES
    }

    /// Appends `n` tokens: `keys` and `values` are row-major `n x head_dim` float32. The
    /// values are rounded to float16 first (the residual dtype); quantization starts from them.
    ///
    /// Errors: mismatched lengths, or NaN/inf (nothing is appended then).
    pub fn append(&mut self, keys: &[f32], values: &[f32]) -> Result<()> {
        let d = self.head_dim;
        if keys.len() != values.len() || keys.len() % d != 0 {
            return Err(KvError::InvalidArgument(format!(
                "keys and values must both be n x head_dim={d}, got {} and {} elements",
                keys.len(),
                values.len()
            )));
        }
        if let Some(i) = keys.iter().chain(values).position(|v| !v.is_finite()) {
            let which = if i < keys.len() { "keys" } else { "values" };
            let i = i % keys.len().max(1);
            return Err(KvError::InvalidArgument(format!(
                "{which} contain a non-finite value (NaN or inf) at token {}, channel {}",
                i / d,
                i % d
            )));
        }
        let to16 = |v: &f32| half::f16::from_f32(*v).to_bits();
        // A value beyond the fp16 range cannot live in the residual window.
        if let Some(i) = keys
            .iter()
            .chain(values)
            .position(|v| !f16_bits_to_f32(to16(v)).is_finite())
        {
            return Err(KvError::InvalidArgument(format!(
                "a key or value ({}) overflows the float16 residual window",
                if i < keys.len() {
                    keys[i]
                } else {
                    values[i - keys.len()]
                }
            )));
        }
        let n = keys.len() / d;
        let r = self.residual;
        let kb = self.key_layout.nbytes();
        let vb = self.value_layout.nbytes();
        // Validate the work first so an error leaves the cache unchanged: quantize into
        // scratch buffers, then commit.
        let mut tail = self.key_tail.clone();
        let mut new_blocks: Vec<u8> = Vec::new();
        for row in keys.chunks_exact(d) {
            tail.extend(row.iter().map(to16));
            if tail.len() == r * d {
                let start = new_blocks.len();
                new_blocks.resize(start + kb, 0);
                quantize_into(
                    &tail,
                    f16_bits_to_f32,
                    &self.key_layout,
                    &mut new_blocks[start..],
                )?;
                tail.clear();
            }
        }
        let mut fifo = self.value_fifo.clone();
        fifo.extend(values.iter().map(to16));
        let spill = (fifo.len() / d).saturating_sub(r);
        let mut new_values = vec![0u8; spill * vb];
        quantize_into(
            &fifo[..spill * d],
            f16_bits_to_f32,
            &self.value_layout,
            &mut new_values,
        )?;
        fifo.drain(..spill * d);
        self.key_blocks.extend_from_slice(&new_blocks);
        self.key_tail = tail;
        self.value_codes.extend_from_slice(&new_values);
        self.value_fifo = fifo;
        self.num_tokens += n;
        Ok(())
    }

    /// All keys, dequantized, as row-major `num_tokens x head_dim` float32.
    pub fn keys(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.num_tokens * self.head_dim];
        let q = self.num_quantized_keys() * self.head_dim;
        dequantize_into(&self.key_blocks, &self.key_layout, &mut out[..q])?;
        for (o, &b) in out[q..].iter_mut().zip(&self.key_tail) {
            *o = f16_bits_to_f32(b);
        }
        Ok(out)
    }

    /// All values, dequantized, as row-major `num_tokens x head_dim` float32.
    pub fn values(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.num_tokens * self.head_dim];
        let q = self.num_quantized_values() * self.head_dim;
        dequantize_into(&self.value_codes, &self.value_layout, &mut out[..q])?;
        for (o, &b) in out[q..].iter_mut().zip(&self.value_fifo) {
            *o = f16_bits_to_f32(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_rules_and_bytes() {
        let d = 8;
        let mut c = KiviCache::new(d, 2, 4, 8, MetaDtype::F16).unwrap();
        let x: Vec<f32> = (0..20 * d).map(|i| (i as f32 * 0.37).sin()).collect();
        // Appending in uneven pieces gives the same state as one call.
        c.append(&x[..3 * d], &x[..3 * d]).unwrap();
        assert_eq!((c.num_quantized_keys(), c.num_quantized_values()), (0, 0));
        c.append(&x[3 * d..9 * d], &x[3 * d..9 * d]).unwrap();
        assert_eq!((c.num_quantized_keys(), c.num_quantized_values()), (8, 1));
        c.append(&x[9 * d..], &x[9 * d..]).unwrap();
        assert_eq!((c.num_quantized_keys(), c.num_quantized_values()), (16, 12));
        let mut one = KiviCache::new(d, 2, 4, 8, MetaDtype::F16).unwrap();
        one.append(&x, &x).unwrap();
        assert_eq!(one.keys().unwrap(), c.keys().unwrap());
        assert_eq!(one.values().unwrap(), c.values().unwrap());
        for n in 0..40 {
            let mut k = KiviCache::new(d, 2, 4, 8, MetaDtype::F16).unwrap();
            let y: Vec<f32> = (0..n * d).map(|i| i as f32 * 0.01).collect();
            k.append(&y, &y).unwrap();
            assert_eq!(
                k.nbytes(),
                kivi_nbytes(n, d, 2, 4, 8, MetaDtype::F16).unwrap()
            );
        }
    }

    #[test]
    fn errors_leave_the_cache_unchanged() {
        let mut c = KiviCache::new(4, 2, 4, 4, MetaDtype::F16).unwrap();
        c.append(&[1.0; 8], &[1.0; 8]).unwrap();
        let mut bad = [1.0f32; 8];
        bad[5] = f32::NAN;
        assert!(c.append(&bad, &[1.0; 8]).is_err());
        assert!(c.append(&[1e6; 8], &[1.0; 8]).is_err());
        assert_eq!(c.num_tokens(), 2);
        assert!(KiviCache::new(4, 2, 4, 6, MetaDtype::F16).is_err());
    }
}
