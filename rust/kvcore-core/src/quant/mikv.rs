//! MiKV-style mixed precision: every token of one (layer, kv-head) has a precision tier, and a
//! token can be demoted later (when its importance falls) instead of being evicted.
//!
//! Quantized tiers use per-token groups (`GroupAxis::Channel`, `1 x head_dim` blocks) with the
//! codec of [`super::codec`]. A demotion re-quantizes the token's *current* reconstruction,
//! so the error after a chain of demotions is at most the sum of the half-scales of the tiers
//! it went through (plus metadata rounding); nothing else is lost. Promotion is refused: the
//! precision that was rounded away cannot be restored.

use super::codec::{dequantize_into, f16_bits_to_f32, quantize_f32_into};
use super::layout::{GroupAxis, MetaDtype, QuantLayout};
use crate::error::{KvError, Result};

/// A token's storage precision, from most to least precise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// IEEE float16 (2 bytes per element, no metadata).
    F16,
    /// 8-bit asymmetric groups.
    Int8,
    /// 4-bit asymmetric groups.
    Int4,
    /// 2-bit asymmetric groups.
    Int2,
}

impl Tier {
    /// Parses `"float16"`, `"int8"`, `"int4"` or `"int2"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float16" | "fp16" => Ok(Tier::F16),
            "int8" => Ok(Tier::Int8),
            "int4" => Ok(Tier::Int4),
            "int2" => Ok(Tier::Int2),
            _ => Err(KvError::InvalidArgument(format!(
                "tier must be 'float16', 'int8', 'int4' or 'int2', got {s:?}"
            ))),
        }
    }
    /// The name accepted by [`Tier::parse`].
    pub fn name(self) -> &'static str {
        match self {
            Tier::F16 => "float16",
            Tier::Int8 => "int8",
            Tier::Int4 => "int4",
            Tier::Int2 => "int2",
        }
    }
    fn bits(self) -> Option<u32> {
        match self {
            Tier::F16 => None,
            Tier::Int8 => Some(8),
            Tier::Int4 => Some(4),
            Tier::Int2 => Some(2),
        }
    }
}

/// Mixed-precision token store for one (layer, kv-head).
#[derive(Debug, Clone)]
pub struct MixedPrecisionStore {
    head_dim: usize,
    layouts: [QuantLayout; 3],
    tiers: Vec<Tier>,
    data: Vec<Box<[u8]>>,
}

impl MixedPrecisionStore {
    /// An empty store; `group_size` must divide `head_dim` (and fill whole bytes at 2 bits).
    pub fn new(head_dim: usize, group_size: usize, meta: MetaDtype) -> Result<Self> {
        let l = |b| QuantLayout::new(b, group_size, GroupAxis::Channel, meta, 1, head_dim);
        Ok(MixedPrecisionStore {
            head_dim,
            layouts: [l(8)?, l(4)?, l(2)?],
            tiers: Vec::new(),
            data: Vec::new(),
        })
    }

    fn layout(&self, t: Tier) -> Option<&QuantLayout> {
        match t {
            Tier::F16 => None,
            Tier::Int8 => Some(&self.layouts[0]),
            Tier::Int4 => Some(&self.layouts[1]),
            Tier::Int2 => Some(&self.layouts[2]),
        }
    }

    /// Bytes one token takes in tier `t`, metadata included.
    pub fn token_nbytes(&self, t: Tier) -> usize {
        self.layout(t).map_or(self.head_dim * 2, |l| l.nbytes())
    }

    fn encode(&self, row: &[f32], t: Tier) -> Result<Box<[u8]>> {
        if let Some(i) = row.iter().position(|v| !v.is_finite()) {
            return Err(KvError::InvalidArgument(format!(
                "token contains a non-finite value (NaN or inf) at channel {i}"
            )));
        }
        match self.layout(t) {
            None => {
                let mut out = Vec::with_capacity(row.len() * 2);
                for &v in row {
                    let h = half::f16::from_f32(v);
                    if !h.is_finite() {
                        return Err(KvError::InvalidArgument(format!(
                            "value {v} overflows the float16 tier"
                        )));
                    }
                    out.extend_from_slice(&h.to_bits().to_le_bytes());
                }
                Ok(out.into_boxed_slice())
            }
            Some(l) => {
                let mut out = vec![0u8; l.nbytes()];
                quantize_f32_into(row, l, &mut out)?;
                Ok(out.into_boxed_slice())
            }
        }
    }

    fn decode(&self, i: usize, out: &mut [f32]) -> Result<()> {
        match self.layout(self.tiers[i]) {
            None => {
                for (o, b) in out.iter_mut().zip(self.data[i].chunks_exact(2)) {
                    *o = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
                Ok(())
            }
            Some(l) => dequantize_into(&self.data[i], l, out),
        }
    }

    /// Appends tokens (row-major `n x head_dim` float32), all in tier `t`.
    pub fn append(&mut self, x: &[f32], t: Tier) -> Result<()> {
        if x.len() % self.head_dim != 0 {
            return Err(KvError::InvalidArgument(format!(
                "tokens must be n x head_dim={}, got {} elements",
                self.head_dim,
                x.len()
            )));
        }
        let rows: Result<Vec<_>> = x
            .chunks_exact(self.head_dim)
            .map(|r| self.encode(r, t))
            .collect();
        let rows = rows?;
        self.tiers.extend(std::iter::repeat_n(t, rows.len()));
        self.data.extend(rows);
        Ok(())
    }

    /// Demotes the tokens at `positions` to tier `t` (re-quantizing their current values).
    /// A token already at `t` is left alone. Errors: a position out of range, or a move to a
    /// more precise tier; nothing changes then.
    pub fn demote(&mut self, positions: &[usize], t: Tier) -> Result<()> {
        for &p in positions {
            let cur = *self.tiers.get(p).ok_or_else(|| {
                KvError::InvalidArgument(format!(
                    "position {p} out of range for {} tokens",
                    self.tiers.len()
                ))
            })?;
            if t < cur {
                return Err(KvError::InvalidArgument(format!(
                    "cannot promote token {p} from {} to {}: demotion only goes to lower precision",
                    cur.name(),
                    t.name()
                )));
            }
        }
        let mut row = vec![0.0f32; self.head_dim];
        for &p in positions {
            if self.tiers[p] == t {
                continue;
            }
            self.decode(p, &mut row)?;
            self.data[p] = self.encode(&row, t)?;
            self.tiers[p] = t;
        }
        Ok(())
    }

    /// Number of tokens.
    pub fn num_tokens(&self) -> usize {
        self.tiers.len()
    }
    /// The tier of every token.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }
    /// Exact bytes held by the token data (metadata included).
    pub fn nbytes(&self) -> usize {
        self.data.iter().map(|d| d.len()).sum()
    }
    /// Bits of a tier, `None` for float16.
    pub fn tier_bits(t: Tier) -> Option<u32> {
        t.bits()
    }
    /// Every token reconstructed, row-major `num_tokens x head_dim` float32.
    pub fn read(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.num_tokens() * self.head_dim];
        for (i, row) in out.chunks_exact_mut(self.head_dim).enumerate() {
            self.decode(i, row)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demotion_error_is_bounded_and_bytes_exact() {
        let d = 16;
        let x: Vec<f32> = (0..4 * d)
            .map(|i| ((i * 7919) % 97) as f32 / 10.0 - 4.0)
            .collect();
        let mut s = MixedPrecisionStore::new(d, 8, MetaDtype::F32).unwrap();
        s.append(&x[..2 * d], Tier::Int8).unwrap();
        s.append(&x[2 * d..], Tier::F16).unwrap();
        assert_eq!(s.nbytes(), 2 * (16 + 2 * 2 * 4) + 2 * 32);
        s.demote(&[0, 3], Tier::Int2).unwrap();
        assert_eq!(s.tiers(), &[Tier::Int2, Tier::Int8, Tier::F16, Tier::Int2]);
        assert!(s.demote(&[0], Tier::Int4).is_err());
        assert!(s.demote(&[9], Tier::Int2).is_err());
        let y = s.read().unwrap();
        // range of x is <= 9.6: int8 step <= 9.6/255, int2 step <= 9.6/3.
        for (a, b) in x.iter().zip(&y) {
            assert!(
                (a - b).abs() <= 9.7 / 255.0 / 2.0 + 9.7 / 3.0 / 2.0 + 1e-3,
                "{a} {b}"
            );
        }
        assert_eq!(s.nbytes(), 2 * (4 + 2 * 2 * 4) + (16 + 16) + 32);
    }
}
