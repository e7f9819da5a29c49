//! `QuantLayout`: how one block of `num_tokens x head_dim` values is stored at low precision.
//!
//! A block is one contiguous byte buffer (the bit-exact format is in `docs/layouts.md`):
//!
//! ```text
//!  0             codes_bytes   scales_offset           zeros_offset            nbytes
//!  | packed codes | pad (0..)  | scale[0..num_groups]  | zero[0..num_groups]   |
//!                  ^ only to align the metadata to its own size (2 or 4 bytes)
//! ```
//!
//! Groups are numbered in the order their codes appear:
//! * `GroupAxis::Channel` (per-token quantization, KIVI values): group `g = t * (D/G) + cg`
//!   holds `x[t, cg*G .. cg*G+G]`.
//! * `GroupAxis::Token` (per-channel quantization, KIVI keys): group `g = tg * D + c` holds
//!   `x[tg*G .. tg*G+G, c]`.
//!
//! Element `j` of group `g` is code number `g * G + j`; code `i` sits in byte `i * bits / 8`
//! at bit offset `(i % (8 / bits)) * bits` (least significant bits first).

use crate::error::{KvError, Result};

/// The axis along which the `group_size` consecutive elements of one group run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupAxis {
    /// Groups of consecutive channels inside one token (per-token quantization).
    Channel,
    /// Groups of consecutive tokens inside one channel (per-channel quantization).
    Token,
}

impl GroupAxis {
    /// Parses `"channel"` or `"token"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "channel" => Ok(GroupAxis::Channel),
            "token" => Ok(GroupAxis::Token),
            _ => Err(KvError::InvalidArgument(format!(
                "group axis must be 'channel' (groups of channels inside a token) or 'token' \
                 (groups of tokens inside a channel), got {s:?}"
            ))),
        }
    }

    /// The name accepted by [`GroupAxis::parse`].
    pub fn name(self) -> &'static str {
        match self {
            GroupAxis::Channel => "channel",
            GroupAxis::Token => "token",
        }
    }
}

/// The dtype of the per-group scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaDtype {
    /// IEEE binary16, little-endian, rounded to nearest even from float32.
    F16,
    /// IEEE binary32, little-endian.
    F32,
}

impl MetaDtype {
    /// Parses `"float16"` or `"float32"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float16" | "fp16" => Ok(MetaDtype::F16),
            "float32" | "fp32" => Ok(MetaDtype::F32),
            _ => Err(KvError::InvalidArgument(format!(
                "metadata dtype must be 'float16' or 'float32', got {s:?}"
            ))),
        }
    }

    /// The numpy name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            MetaDtype::F16 => "float16",
            MetaDtype::F32 => "float32",
        }
    }

    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            MetaDtype::F16 => 2,
            MetaDtype::F32 => 4,
        }
    }

    /// Rounds a float32 to the nearest value of this dtype (ties to even), as a float32.
    /// Values beyond the float16 range become infinite; the quantizer reports that as an error.
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            MetaDtype::F16 => half::f16::from_f32(v).to_f32(),
            MetaDtype::F32 => v,
        }
    }
}

/// A validated low-precision block format. See the module docs for the byte map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantLayout {
    bits: u32,
    group_size: usize,
    axis: GroupAxis,
    meta: MetaDtype,
    num_tokens: usize,
    head_dim: usize,
    codes_bytes: usize,
    scales_offset: usize,
    zeros_offset: usize,
    nbytes: usize,
}

impl QuantLayout {
    /// Validates and builds a layout.
    ///
    /// Errors (`InvalidArgument`): bits not 2, 4 or 8; a zero size; a group size that does not
    /// divide the grouped dimension (`num_tokens` for `Token`, `head_dim` for `Channel`); a
    /// group whose codes do not fill whole bytes (`group_size * bits % 8 != 0`).
    pub fn new(
        bits: u32,
        group_size: usize,
        axis: GroupAxis,
        meta: MetaDtype,
        num_tokens: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if !matches!(bits, 2 | 4 | 8) {
            return Err(KvError::InvalidArgument(format!(
                "bits must be 2, 4 or 8, got {bits}"
            )));
        }
        if group_size == 0 || num_tokens == 0 || head_dim == 0 {
            return Err(KvError::InvalidArgument(format!(
                "group_size, num_tokens and head_dim must be positive, got group_size={group_size}, \
                 num_tokens={num_tokens}, head_dim={head_dim}"
            )));
        }
        let (dim_name, dim) = match axis {
            GroupAxis::Channel => ("head_dim", head_dim),
            GroupAxis::Token => ("num_tokens", num_tokens),
        };
        if dim % group_size != 0 {
            return Err(KvError::InvalidArgument(format!(
                "group_size {group_size} does not divide {dim_name} {dim} (groups run along the \
                 {} axis)",
                axis.name()
            )));
        }
        if (group_size * bits as usize) % 8 != 0 {
            return Err(KvError::InvalidArgument(format!(
                "group_size {group_size} at {bits} bits does not fill whole bytes: group_size must \
                 be a multiple of {}",
                8 / bits
            )));
        }
        // A block's byte size must be representable (and below isize::MAX, the most one
        // buffer can hold), or `nbytes` and every buffer sized by it would be garbage.
        let checked = |v: Option<usize>, what: &str| {
            v.filter(|&b| b <= isize::MAX as usize).ok_or_else(|| {
                KvError::InvalidArgument(format!(
                    "num_tokens={num_tokens} x head_dim={head_dim} at {bits} bits is too large: \
                     {what} would exceed isize::MAX bytes"
                ))
            })
        };
        let n = checked(num_tokens.checked_mul(head_dim), "num_tokens * head_dim")?;
        let codes_bytes = checked(n.checked_mul(bits as usize), "the code bytes")? / 8;
        let num_groups = n / group_size;
        let m = meta.size();
        let scales_offset = checked(codes_bytes.checked_next_multiple_of(m), "the block")?;
        let meta_bytes = checked(num_groups.checked_mul(m), "the metadata")?;
        let zeros_offset = checked(scales_offset.checked_add(meta_bytes), "the block")?;
        let nbytes = checked(zeros_offset.checked_add(meta_bytes), "the block")?;
        Ok(QuantLayout {
            bits,
            group_size,
            axis,
            meta,
            num_tokens,
            head_dim,
            codes_bytes,
            scales_offset,
            zeros_offset,
            nbytes,
        })
    }

    /// Bits per code: 2, 4 or 8.
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Elements per group.
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    /// The axis the groups run along.
    pub fn axis(&self) -> GroupAxis {
        self.axis
    }
    /// The dtype of scale and zero point.
    pub fn meta(&self) -> MetaDtype {
        self.meta
    }
    /// Tokens per block.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    /// Channels per token.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Elements per block.
    pub fn num_elements(&self) -> usize {
        self.num_tokens * self.head_dim
    }
    /// Groups per block (one scale and one zero point each).
    pub fn num_groups(&self) -> usize {
        self.num_elements() / self.group_size
    }
    /// Largest code, `2^bits - 1`.
    pub fn qmax(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
    /// Bytes of packed codes (starting at offset 0).
    pub fn codes_bytes(&self) -> usize {
        self.codes_bytes
    }
    /// Byte offset of the scales.
    pub fn scales_offset(&self) -> usize {
        self.scales_offset
    }
    /// Byte offset of the zero points.
    pub fn zeros_offset(&self) -> usize {
        self.zeros_offset
    }
    /// Total bytes of one block, metadata and padding included.
    pub fn nbytes(&self) -> usize {
        self.nbytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_bytes() {
        // 2 bits, 32x128 per-token groups of 32: 4096 codes = 1024 bytes, 128 groups.
        let l = QuantLayout::new(2, 32, GroupAxis::Channel, MetaDtype::F16, 32, 128).unwrap();
        assert_eq!(l.codes_bytes(), 1024);
        assert_eq!(l.num_groups(), 128);
        assert_eq!(l.scales_offset(), 1024);
        assert_eq!(l.zeros_offset(), 1024 + 256);
        assert_eq!(l.nbytes(), 1024 + 512);
        // 1 token x 4 channels at 2 bits: 1 code byte, then padding to 4 for fp32 metadata.
        let l = QuantLayout::new(2, 4, GroupAxis::Channel, MetaDtype::F32, 1, 4).unwrap();
        assert_eq!((l.codes_bytes(), l.scales_offset(), l.nbytes()), (1, 4, 12));
    }

    #[test]
    fn bad_layouts() {
        let e = QuantLayout::new(2, 24, GroupAxis::Channel, MetaDtype::F16, 4, 64).unwrap_err();
        assert!(e.to_string().contains("does not divide head_dim 64"), "{e}");
        let e = QuantLayout::new(4, 8, GroupAxis::Token, MetaDtype::F16, 12, 64).unwrap_err();
        assert!(
            e.to_string().contains("does not divide num_tokens 12"),
            "{e}"
        );
        let e = QuantLayout::new(3, 8, GroupAxis::Token, MetaDtype::F16, 8, 8).unwrap_err();
        assert!(e.to_string().contains("bits must be 2, 4 or 8"), "{e}");
        let e = QuantLayout::new(2, 2, GroupAxis::Channel, MetaDtype::F16, 8, 8).unwrap_err();
        assert!(e.to_string().contains("multiple of 4"), "{e}");
        assert!(QuantLayout::new(8, 0, GroupAxis::Channel, MetaDtype::F16, 8, 8).is_err());
        assert!(GroupAxis::parse("row").is_err());
        assert!(MetaDtype::parse("bfloat16").is_err());
    }
}
