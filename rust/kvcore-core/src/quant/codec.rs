//! Asymmetric per-group quantize / dequantize, bit-exact and reproducible in torch.
//!
//! For one group with float32 minimum `lo` and maximum `hi` (inputs are first widened to
//! float32 exactly; float16 and bfloat16 widen without rounding), with `M(v)` = round `v` to
//! the metadata dtype (ties to even) and `qmax = 2^bits - 1`:
//!
//! ```text
//! zero  = M(lo) + 0                                     # + 0 maps -0 to +0
//! scale = M(max(hi - zero, 0) / qmax) + 0               # float32 subtract and divide
//! code  = 0                                    if scale == 0
//!       = rne(clamp((x - zero) / scale, 0, qmax))  otherwise (float32 ops, rne = round half to even)
//! x'    = code * scale + zero                           # two float32 ops, never fused
//! ```
//!
//! so `|x - x'| <= scale / 2` up to the rounding of `zero` and `scale` to the metadata dtype
//! (and a float32 ulp of the subtraction). NaN or infinite input, and groups whose metadata
//! does not fit the metadata dtype, are errors.

use super::layout::{GroupAxis, MetaDtype, QuantLayout};
use crate::error::{KvError, Result};

/// 2^23: adding and subtracting it rounds a float32 in [0, 2^22) to an integer, ties to even
/// (the float32 spacing at 2^23 is exactly 1), without a libm call.
const RNE_MAGIC: f32 = 8_388_608.0;

/// The code of `v` for a group with a non-zero `scale` (callers handle `scale == 0`).
/// `r + 2^23` has the integer `rne(r)` in its low mantissa bits, so the low byte of its bits
/// is the code: no float-to-int conversion, and the loop vectorizes.
#[inline(always)]
fn code_nz(v: f32, zero: f32, scale: f32, qmax: f32) -> u8 {
    let r = ((v - zero) / scale).clamp(0.0, qmax);
    ((r + RNE_MAGIC).to_bits() & 0xff) as u8
}

/// Codes of one contiguous group. Eight independent lanes at a time, so the compiler can
/// use vector instructions (the result is the same element by element).
#[inline(always)]
fn codes_of(vals: &[f32], zero: f32, scale: f32, qmax: f32, out: &mut [u8]) {
    if scale == 0.0 {
        out.fill(0);
        return;
    }
    let mut qs = out.chunks_exact_mut(8);
    let mut vs = vals.chunks_exact(8);
    for (q, v) in (&mut qs).zip(&mut vs) {
        for k in 0..8 {
            q[k] = code_nz(v[k], zero, scale, qmax);
        }
    }
    for (q, &v) in qs.into_remainder().iter_mut().zip(vs.remainder()) {
        *q = code_nz(v, zero, scale, qmax);
    }
}

/// Minimum, maximum and finiteness of a group, in eight independent lanes. Exact: min and
/// max do not depend on the order (a -0/+0 choice is erased by the `+ 0.0` on the metadata).
#[inline(always)]
fn min_max(vals: &[f32]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    let mut bad = [false; 8];
    let mut vs = vals.chunks_exact(8);
    for v in &mut vs {
        for k in 0..8 {
            bad[k] |= !v[k].is_finite();
            lo[k] = if v[k] < lo[k] { v[k] } else { lo[k] };
            hi[k] = if v[k] > hi[k] { v[k] } else { hi[k] };
        }
    }
    let (mut l, mut h, mut b) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for k in 0..8 {
        l = l.min(lo[k]);
        h = h.max(hi[k]);
        b |= bad[k];
    }
    for &v in vs.remainder() {
        b |= !v.is_finite();
        l = l.min(v);
        h = h.max(v);
    }
    (l, h, !b)
}

/// Scale and zero point of a group, or a message saying why they do not exist.
#[inline]
fn group_meta(
    lo: f32,
    hi: f32,
    qmax: f32,
    meta: MetaDtype,
) -> std::result::Result<(f32, f32), String> {
    // `+ 0.0` turns -0.0 into +0.0: min/max may pick either zero, the stored bytes must not.
    let zero = meta.round(lo) + 0.0;
    if !zero.is_finite() {
        return Err(format!(
            "a group minimum of {lo} does not fit the {} metadata",
            meta.name()
        ));
    }
    let range = hi - zero;
    if !range.is_finite() {
        return Err(format!("a group range [{lo}, {hi}] overflows float32"));
    }
    let scale = meta.round(range.max(0.0) / qmax) + 0.0;
    if !scale.is_finite() {
        return Err(format!(
            "a group range [{lo}, {hi}] gives a scale that does not fit the {} metadata",
            meta.name()
        ));
    }
    Ok((scale, zero))
}

#[inline]
fn put_meta(out: &mut [u8], meta: MetaDtype, offset: usize, g: usize, v: f32) {
    match meta {
        MetaDtype::F16 => {
            let b = half::f16::from_f32(v).to_bits().to_le_bytes();
            out[offset + 2 * g..offset + 2 * g + 2].copy_from_slice(&b);
        }
        MetaDtype::F32 => out[offset + 4 * g..offset + 4 * g + 4].copy_from_slice(&v.to_le_bytes()),
    }
}

#[inline]
fn get_meta(buf: &[u8], meta: MetaDtype, offset: usize, g: usize) -> f32 {
    match meta {
        MetaDtype::F16 => {
            let b = [buf[offset + 2 * g], buf[offset + 2 * g + 1]];
            half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
        }
        MetaDtype::F32 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&buf[offset + 4 * g..offset + 4 * g + 4]);
            f32::from_le_bytes(b)
        }
    }
}

fn nonfinite_error(block: usize, layout: &QuantLayout, idx: usize) -> KvError {
    let (t, c) = (idx / layout.head_dim(), idx % layout.head_dim());
    KvError::InvalidArgument(format!(
        "input contains a non-finite value (NaN or inf) at block {block}, token {t}, channel {c}"
    ))
}

fn meta_error(block: usize, msg: String) -> KvError {
    KvError::InvalidArgument(format!("cannot quantize block {block}: {msg}"))
}

/// Packs `codes.len()` codes (a whole group, byte aligned) into `out`, LSB first.
#[inline(always)]
fn pack<const BITS: u32>(codes: &[u8], out: &mut [u8]) {
    let per = (8 / BITS) as usize;
    for (byte, chunk) in out.iter_mut().zip(codes.chunks_exact(per)) {
        let mut b = 0u8;
        for (k, &q) in chunk.iter().enumerate() {
            b |= q << (k as u32 * BITS);
        }
        *byte = b;
    }
}

fn quantize_block<const BITS: u32>(
    x: &[f32],
    layout: &QuantLayout,
    block: usize,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    let gs = layout.group_size();
    let d = layout.head_dim();
    let qmax = layout.qmax() as f32;
    let meta = layout.meta();
    let gbytes = gs * BITS as usize / 8;
    let (so, zo) = (layout.scales_offset(), layout.zeros_offset());
    // Padding bytes between the codes and the scales are zero, so equal inputs give equal blocks.
    out[layout.codes_bytes()..so].fill(0);
    let codes = &mut scratch.codes;
    match layout.axis() {
        GroupAxis::Channel => {
            codes.resize(gs, 0);
            for g in 0..layout.num_groups() {
                let vals = &x[g * gs..(g + 1) * gs];
                let (lo, hi, finite) = min_max(vals);
                if !finite {
                    let j = vals.iter().position(|v| !v.is_finite()).unwrap_or(0);
                    return Err(nonfinite_error(block, layout, g * gs + j));
                }
                let (scale, zero) =
                    group_meta(lo, hi, qmax, meta).map_err(|m| meta_error(block, m))?;
                codes_of(vals, zero, scale, qmax, codes);
                pack::<BITS>(codes, &mut out[g * gbytes..(g + 1) * gbytes]);
                put_meta(out, meta, so, g, scale);
                put_meta(out, meta, zo, g, zero);
            }
        }
        GroupAxis::Token => {
            scratch.lo.resize(d, 0.0);
            scratch.hi.resize(d, 0.0);
            scratch.scale.resize(d, 0.0);
            scratch.zero.resize(d, 0.0);
            codes.resize(gs * d, 0);
            for tg in 0..layout.num_tokens() / gs {
                let rows = &x[tg * gs * d..(tg + 1) * gs * d];
                scratch.lo.fill(f32::INFINITY);
                scratch.hi.fill(f32::NEG_INFINITY);
                let mut finite = true;
                for row in rows.chunks_exact(d) {
                    for ((lo, hi), &v) in scratch.lo.iter_mut().zip(scratch.hi.iter_mut()).zip(row)
                    {
                        finite &= v.is_finite();
                        // compare-select (not f32::min) so the loop vectorizes; NaN is
                        // reported through `finite` anyway
                        *lo = if v < *lo { v } else { *lo };
                        *hi = if v > *hi { v } else { *hi };
                    }
                }
                if !finite {
                    let j = rows.iter().position(|v| !v.is_finite()).unwrap_or(0);
                    return Err(nonfinite_error(block, layout, tg * gs * d + j));
                }
                for c in 0..d {
                    let (s, z) = group_meta(scratch.lo[c], scratch.hi[c], qmax, meta)
                        .map_err(|m| meta_error(block, m))?;
                    scratch.scale[c] = s;
                    scratch.zero[c] = z;
                    put_meta(out, meta, so, tg * d + c, s);
                    put_meta(out, meta, zo, tg * d + c, z);
                }
                // Codes transposed to group order: codes[c * gs + j] = code of x[tg*gs + j, c].
                for (j, row) in rows.chunks_exact(d).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        let sc = scratch.scale[c];
                        codes[c * gs + j] = if sc == 0.0 {
                            0
                        } else {
                            code_nz(v, scratch.zero[c], sc, qmax)
                        };
                    }
                }
                let base = tg * d * gbytes;
                pack::<BITS>(codes, &mut out[base..base + d * gbytes]);
            }
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scratch {
    codes: Vec<u8>,
    xf: Vec<f32>,
    lo: Vec<f32>,
    hi: Vec<f32>,
    scale: Vec<f32>,
    zero: Vec<f32>,
}

fn check_sizes(len: usize, layout: &QuantLayout, out: &[u8]) -> Result<()> {
    let n = layout.num_elements();
    if len % n != 0 {
        return Err(KvError::InvalidArgument(format!(
            "input has {len} elements, not a multiple of the block's {} x {} = {n}",
            layout.num_tokens(),
            layout.head_dim()
        )));
    }
    let blocks = len / n;
    if out.len() != blocks * layout.nbytes() {
        return Err(KvError::InvalidArgument(format!(
            "output has {} bytes, expected {blocks} blocks x {} bytes",
            out.len(),
            layout.nbytes()
        )));
    }
    Ok(())
}

fn run_block(
    xb: &[f32],
    layout: &QuantLayout,
    b: usize,
    ob: &mut [u8],
    scratch: &mut Scratch,
) -> Result<()> {
    match layout.bits() {
        2 => quantize_block::<2>(xb, layout, b, ob, scratch),
        4 => quantize_block::<4>(xb, layout, b, ob, scratch),
        _ => quantize_block::<8>(xb, layout, b, ob, scratch),
    }
}

/// Quantizes `x.len() / layout.num_elements()` consecutive float32 blocks of `x` (row-major
/// `num_tokens x head_dim` each) into `out` (`layout.nbytes()` bytes per block).
pub fn quantize_f32_into(x: &[f32], layout: &QuantLayout, out: &mut [u8]) -> Result<()> {
    check_sizes(x.len(), layout, out)?;
    let mut scratch = Scratch::default();
    let n = layout.num_elements();
    for (b, (xb, ob)) in x
        .chunks_exact(n)
        .zip(out.chunks_exact_mut(layout.nbytes()))
        .enumerate()
    {
        run_block(xb, layout, b, ob, &mut scratch)?;
    }
    Ok(())
}

/// Like [`quantize_f32_into`] for any element type: each block is first widened to float32
/// with `widen(block, buffer)` (which must resize `buffer` to the block's length).
pub fn quantize_into_with<T: Copy>(
    x: &[T],
    widen: impl Fn(&[T], &mut Vec<f32>),
    layout: &QuantLayout,
    out: &mut [u8],
) -> Result<()> {
    check_sizes(x.len(), layout, out)?;
    let mut scratch = Scratch::default();
    let mut xf = std::mem::take(&mut scratch.xf);
    let n = layout.num_elements();
    for (b, (xb, ob)) in x
        .chunks_exact(n)
        .zip(out.chunks_exact_mut(layout.nbytes()))
        .enumerate()
    {
        widen(xb, &mut xf);
        run_block(&xf, layout, b, ob, &mut scratch)?;
    }
    Ok(())
}

/// Like [`quantize_f32_into`], widening every element with `conv`.
pub fn quantize_into<T: Copy>(
    x: &[T],
    conv: impl Fn(T) -> f32 + Copy,
    layout: &QuantLayout,
    out: &mut [u8],
) -> Result<()> {
    quantize_into_with(
        x,
        |xb, buf| {
            buf.clear();
            buf.extend(xb.iter().map(|&r| conv(r)));
        },
        layout,
        out,
    )
}

/// Widens a block of float16 bits (vectorized by `half` where the CPU supports it).
fn widen_f16(xb: &[u16], buf: &mut Vec<f32>) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    buf.resize(xb.len(), 0.0);
    let h: &[half::f16] = xb.reinterpret_cast();
    h.convert_to_f32_slice(buf);
}

/// Widens IEEE binary16 bits to float32 (exact).
#[inline(always)]
pub fn f16_bits_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Widens bfloat16 bits to float32 (exact: the bits become the high half).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Input element types accepted by [`quantize`].
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// float32 values.
    F32(&'a [f32]),
    /// float16 values as their raw bits.
    F16(&'a [u16]),
    /// bfloat16 values as their raw bits.
    Bf16(&'a [u16]),
}

impl Input<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::F16(x) | Input::Bf16(x) => x.len(),
        }
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Quantizes whole blocks into a new buffer of `blocks * layout.nbytes()` bytes.
pub fn quantize(x: Input<'_>, layout: &QuantLayout) -> Result<Vec<u8>> {
    let blocks = x.len() / layout.num_elements();
    let mut out = Vec::new();
    crate::error::try_reserve(&mut out, blocks * layout.nbytes(), "the quantized output")?;
    out.resize(blocks * layout.nbytes(), 0);
    match x {
        Input::F32(v) => quantize_f32_into(v, layout, &mut out)?,
        Input::F16(v) => quantize_into_with(v, widen_f16, layout, &mut out)?,
        Input::Bf16(v) => quantize_into(v, bf16_bits_to_f32, layout, &mut out)?,
    }
    Ok(out)
}

#[inline(always)]
fn unpack<const BITS: u32>(bytes: &[u8], codes: &mut [u8]) {
    let per = (8 / BITS) as usize;
    let mask = ((1u32 << BITS) - 1) as u8;
    for (&b, chunk) in bytes.iter().zip(codes.chunks_exact_mut(per)) {
        for (k, q) in chunk.iter_mut().enumerate() {
            *q = (b >> (k as u32 * BITS)) & mask;
        }
    }
}

fn dequantize_block<const BITS: u32>(
    buf: &[u8],
    layout: &QuantLayout,
    out: &mut [f32],
    codes: &mut Vec<u8>,
) {
    let gs = layout.group_size();
    let d = layout.head_dim();
    let meta = layout.meta();
    let gbytes = gs * BITS as usize / 8;
    let (so, zo) = (layout.scales_offset(), layout.zeros_offset());
    match layout.axis() {
        GroupAxis::Channel => {
            codes.resize(gs, 0);
            for g in 0..layout.num_groups() {
                let scale = get_meta(buf, meta, so, g);
                let zero = get_meta(buf, meta, zo, g);
                unpack::<BITS>(&buf[g * gbytes..(g + 1) * gbytes], codes);
                for (y, &q) in out[g * gs..(g + 1) * gs].iter_mut().zip(codes.iter()) {
                    *y = f32::from(q) * scale + zero;
                }
            }
        }
        GroupAxis::Token => {
            codes.resize(gs * d, 0);
            for tg in 0..layout.num_tokens() / gs {
                let base = tg * d * gbytes;
                unpack::<BITS>(&buf[base..base + d * gbytes], codes);
                let rows = &mut out[tg * gs * d..(tg + 1) * gs * d];
                for c in 0..d {
                    let scale = get_meta(buf, meta, so, tg * d + c);
                    let zero = get_meta(buf, meta, zo, tg * d + c);
                    for (j, &q) in codes[c * gs..(c + 1) * gs].iter().enumerate() {
                        rows[j * d + c] = f32::from(q) * scale + zero;
                    }
                }
            }
        }
    }
}

/// Dequantizes consecutive blocks of `buf` into float32 `out` (row-major per block).
pub fn dequantize_into(buf: &[u8], layout: &QuantLayout, out: &mut [f32]) -> Result<()> {
    if buf.len() % layout.nbytes() != 0 {
        return Err(KvError::InvalidArgument(format!(
            "buffer has {} bytes, not a multiple of the layout's {} bytes per block",
            buf.len(),
            layout.nbytes()
        )));
    }
    let blocks = buf.len() / layout.nbytes();
    if out.len() != blocks * layout.num_elements() {
        return Err(KvError::InvalidArgument(format!(
            "output has {} elements, expected {blocks} blocks x {}",
            out.len(),
            layout.num_elements()
        )));
    }
    let mut codes = Vec::new();
    for (bb, ob) in buf
        .chunks_exact(layout.nbytes())
        .zip(out.chunks_exact_mut(layout.num_elements()))
    {
        match layout.bits() {
            2 => dequantize_block::<2>(bb, layout, ob, &mut codes),
            4 => dequantize_block::<4>(bb, layout, ob, &mut codes),
            _ => dequantize_block::<8>(bb, layout, ob, &mut codes),
        }
    }
    Ok(())
}

/// Dequantizes whole blocks into a new float32 vector.
pub fn dequantize(buf: &[u8], layout: &QuantLayout) -> Result<Vec<f32>> {
    let blocks = buf.len() / layout.nbytes();
    let mut out = Vec::new();
    crate::error::try_reserve(
        &mut out,
        blocks * layout.num_elements(),
        "the dequantized output",
    )?;
    out.resize(blocks * layout.num_elements(), 0.0);
    dequantize_into(buf, layout, &mut out)?;
    Ok(out)
}

/// The scale and zero point of group `g` of one block (for tests and error bounds).
pub fn group_scale_zero(block: &[u8], layout: &QuantLayout, g: usize) -> (f32, f32) {
    (
        get_meta(block, layout.meta(), layout.scales_offset(), g),
        get_meta(block, layout.meta(), layout.zeros_offset(), g),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay(
        bits: u32,
        g: usize,
        axis: GroupAxis,
        meta: MetaDtype,
        t: usize,
        d: usize,
    ) -> QuantLayout {
        QuantLayout::new(bits, g, axis, meta, t, d).unwrap()
    }

    /// Simple deterministic pseudo-random floats (no rand dependency).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
            })
            .collect()
    }

    #[test]
    fn known_bytes_2bit() {
        // One token, 4 channels, one group: lo=0, hi=3 -> scale 1, codes 0,1,2,3.
        let l = lay(2, 4, GroupAxis::Channel, MetaDtype::F32, 1, 4);
        let buf = quantize(Input::F32(&[0.0, 1.0, 2.0, 3.0]), &l).unwrap();
        // codes LSB first: 0 | 1<<2 | 2<<4 | 3<<6 = 0b11100100
        assert_eq!(buf[0], 0b1110_0100);
        assert_eq!(&buf[1..4], &[0, 0, 0]);
        assert_eq!(&buf[4..8], &1.0f32.to_le_bytes());
        assert_eq!(&buf[8..12], &0.0f32.to_le_bytes());
        assert_eq!(dequantize(&buf, &l).unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn ties_round_to_even() {
        // lo=0, hi=6, 2 bits -> scale 2; 1.0 / 2 = 0.5 -> 0, 3.0/2 = 1.5 -> 2, 5/2 = 2.5 -> 2.
        let l = lay(2, 4, GroupAxis::Channel, MetaDtype::F32, 1, 4);
        let buf = quantize(Input::F32(&[0.0, 1.0, 3.0, 6.0]), &l).unwrap();
        assert_eq!(buf[0], 0b1110_0000); // codes 0, 0, 2, 3
        let buf = quantize(Input::F32(&[0.0, 5.0, 6.0, 6.0]), &l).unwrap();
        assert_eq!(buf[0] >> 2 & 3, 2);
    }

    #[test]
    fn round_trip_error_bound() {
        for &bits in &[2u32, 4, 8] {
            for &axis in &[GroupAxis::Channel, GroupAxis::Token] {
                for &meta in &[MetaDtype::F16, MetaDtype::F32] {
                    let l = lay(bits, 8, axis, meta, 16, 24);
                    let x = data(3 * l.num_elements(), bits as u64);
                    let buf = quantize(Input::F32(&x), &l).unwrap();
                    let y = dequantize(&buf, &l).unwrap();
                    for b in 0..3 {
                        let blk = &buf[b * l.nbytes()..(b + 1) * l.nbytes()];
                        for t in 0..16 {
                            for c in 0..24 {
                                let g = match axis {
                                    GroupAxis::Channel => t * 3 + c / 8,
                                    GroupAxis::Token => (t / 8) * 24 + c,
                                };
                                let (s, _) = group_scale_zero(blk, &l, g);
                                let i = b * 384 + t * 24 + c;
                                // Metadata rounding: the zero point moves by at most half an
                                // fp16 ulp of |lo| <= 4, each of the <= qmax scale steps by
                                // half an ulp of the scale (2^-11 relative).
                                let bound = match meta {
                                    MetaDtype::F16 => {
                                        s / 2.0 + 4.0 / 2048.0 + l.qmax() as f32 * s / 2048.0 + 1e-5
                                    }
                                    MetaDtype::F32 => s / 2.0 + 1e-5,
                                };
                                assert!(
                                    (x[i] - y[i]).abs() <= bound,
                                    "bits {bits} {axis:?} {meta:?} x {} y {} s {s}",
                                    x[i],
                                    y[i]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn negative_zero_is_stored_as_positive_zero() {
        let l = lay(2, 4, GroupAxis::Channel, MetaDtype::F16, 1, 4);
        for x in [[-0.0f32, 0.0, 0.0, 0.0], [0.0, -0.0, -0.0, -0.0]] {
            let buf = quantize(Input::F32(&x), &l).unwrap();
            assert_eq!(buf, vec![0u8; l.nbytes()]);
        }
    }

    #[test]
    fn constant_group_is_exact_in_fp32() {
        let l = lay(4, 8, GroupAxis::Token, MetaDtype::F32, 8, 2);
        let x = vec![1.25f32; 16];
        let buf = quantize(Input::F32(&x), &l).unwrap();
        assert_eq!(dequantize(&buf, &l).unwrap(), x);
    }

    #[test]
    fn nonfinite_and_overflow_are_errors() {
        let l = lay(8, 4, GroupAxis::Channel, MetaDtype::F16, 2, 4);
        let mut x = vec![0.5f32; 8];
        x[6] = f32::NAN;
        let e = quantize(Input::F32(&x), &l).unwrap_err();
        assert!(e.to_string().contains("token 1, channel 2"), "{e}");
        x[6] = f32::INFINITY;
        assert!(quantize(Input::F32(&x), &l).is_err());
        x[6] = 1e6; // scale 1e6/255 fits fp16? no: the group min 0.5 fits, range/255 ~ 3921 fits.
        assert!(quantize(Input::F32(&x), &l).is_ok());
        x[6] = -1e6; // the minimum does not fit fp16
        let e = quantize(Input::F32(&x), &l).unwrap_err();
        assert!(e.to_string().contains("does not fit the float16"), "{e}");
        let l = lay(8, 4, GroupAxis::Channel, MetaDtype::F32, 1, 4);
        let e = quantize(Input::F32(&[-3e38, 3e38, 0.0, 0.0]), &l).unwrap_err();
        assert!(e.to_string().contains("overflows float32"), "{e}");
    }

    #[test]
    fn f16_and_bf16_inputs_widen_exactly() {
        let l = lay(8, 4, GroupAxis::Channel, MetaDtype::F32, 1, 4);
        let v = [0.5f32, -1.0, 2.0, 3.5];
        let h: Vec<u16> = v
            .iter()
            .map(|&a| half::f16::from_f32(a).to_bits())
            .collect();
        let b: Vec<u16> = v.iter().map(|&a| (a.to_bits() >> 16) as u16).collect();
        let r = quantize(Input::F32(&v), &l).unwrap();
        assert_eq!(quantize(Input::F16(&h), &l).unwrap(), r);
        assert_eq!(quantize(Input::Bf16(&b), &l).unwrap(), r);
    }
}
