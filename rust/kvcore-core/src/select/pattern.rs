//! Static and rule-based keep patterns: StreamingLLM, LongGen, RazorAttention, InfiniPot.

use super::score::check_csr;
use super::topk::{check_rows, Csr, ForceKeep, Scratch};
use crate::error::{try_reserve, KvError, Result};

fn push_row(out: &mut Csr, positions: impl Iterator<Item = i64>) {
    out.positions.extend(positions);
    out.indptr.push(out.positions.len() as i64);
}

/// `[0, sinks) ∪ [n - window, n)` (everything when `sinks + window >= n`), ascending.
fn sink_window(n: usize, sinks: usize, window: usize) -> impl Iterator<Item = i64> {
    let s = sinks.min(n);
    let w0 = n.saturating_sub(window).max(s);
    (0..s as i64).chain(w0 as i64..n as i64)
}

/// StreamingLLM: every row keeps the first `sinks` and the newest `window` tokens.
pub fn streaming(num_rows: usize, n: usize, sinks: usize, window: usize) -> Result<Csr> {
    let mut out = Csr::new();
    try_reserve(
        &mut out.positions,
        num_rows.saturating_mul((sinks + window).min(n)),
        "keep positions",
    )?;
    for _ in 0..num_rows {
        push_row(&mut out, sink_window(n, sinks, window));
    }
    Ok(out)
}

/// What a LongGen layer keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Full attention: no eviction.
    Full,
    /// Attention sink + window.
    Sink,
    /// Block-sparse: block `j` (of `block` tokens) is kept if it is one of the
    /// `local_blocks` newest or `j % stride == 0`; plus the sinks.
    BlockSparse,
}

/// LongGen's static pattern parameters.
#[derive(Clone, Copy, Debug)]
pub struct LongGenParams {
    pub sinks: usize,
    pub window: usize,
    pub block: usize,
    pub stride: usize,
    pub local_blocks: usize,
}

/// LongGen: per-layer static pattern (`kinds[l]`), the same for every head of a layer.
pub fn longgen(kinds: &[LayerKind], num_heads: usize, n: usize, p: &LongGenParams) -> Result<Csr> {
    if p.block == 0 || p.stride == 0 {
        return Err(KvError::InvalidArgument(
            "block and stride must be positive".into(),
        ));
    }
    let kept = |i: usize| {
        let b = i / p.block;
        i < p.sinks || b % p.stride == 0 || b + p.local_blocks >= n.div_ceil(p.block)
    };
    // One row per kind (at most `n` positions each), then the exact output size, so that a
    // huge `n` or `num_heads` is refused before the output is allocated or looped over.
    let mut rows: [Option<Vec<i64>>; 3] = [None, None, None];
    let mut total = 0usize;
    for &k in kinds {
        let row = &mut rows[k as usize];
        if row.is_none() {
            let mut r = Vec::new();
            try_reserve(&mut r, n, "n")?;
            match k {
                LayerKind::Full => r.extend(0..n as i64),
                LayerKind::Sink => r.extend(sink_window(n, p.sinks, p.window)),
                LayerKind::BlockSparse => r.extend((0..n).filter(|&i| kept(i)).map(|i| i as i64)),
            }
            *row = Some(r);
        }
        let len = row.as_ref().map_or(0, Vec::len);
        total = len
            .checked_mul(num_heads)
            .and_then(|t| t.checked_add(total))
            .ok_or_else(|| too_large("n * num_heads"))?;
    }
    let mut out = Csr::new();
    try_reserve(
        &mut out.indptr,
        kinds.len().saturating_mul(num_heads),
        "num_heads",
    )?;
    try_reserve(&mut out.positions, total, "n * num_heads")?;
    for &k in kinds {
        let row = rows[k as usize].as_deref().unwrap_or_default();
        for _ in 0..num_heads {
            push_row(&mut out, row.iter().copied());
        }
    }
    Ok(out)
}

fn too_large(what: &str) -> KvError {
    KvError::InvalidArgument(format!("{what} is too large: it overflows 64 bits"))
}

/// RazorAttention plan: retrieval rows keep everything; the others keep `sinks` and the
/// newest `local_capacity - sinks - 1` tokens, and the one remaining slot holds the
/// compensation token built by the caller from the dropped tokens (mean of their K and V).
/// A row of `n <= local_capacity` tokens keeps everything. With `compensation = false`
/// (the vendor's `use_virtual_token=False`) the window takes the slot instead.
///
/// Returns the plan and, per row, how many tokens were dropped (`N_d`, the weight of the
/// compensation token; 0 means no compensation slot is used).
pub fn razor(
    retrieval: &[bool],
    n: usize,
    sinks: usize,
    local_capacity: usize,
    compensation: bool,
) -> Result<(Csr, Vec<i64>)> {
    let slot = usize::from(compensation);
    if local_capacity < sinks + slot {
        return Err(KvError::InvalidArgument(format!(
            "local_capacity ({local_capacity}) must be at least sinks + {slot} ({})",
            sinks + slot
        )));
    }
    let window = local_capacity - sinks - slot;
    let row_len = |full: bool| {
        if full || n <= local_capacity {
            n
        } else {
            n.min(sinks + window)
        }
    };
    let total = retrieval
        .iter()
        .try_fold(0usize, |t, &full| t.checked_add(row_len(full)))
        .ok_or_else(|| too_large("n * len(retrieval)"))?;
    let mut out = Csr::new();
    try_reserve(&mut out.positions, total, "n * len(retrieval)")?;
    let mut dropped = Vec::with_capacity(retrieval.len());
    for &full in retrieval {
        if full || n <= local_capacity {
            push_row(&mut out, 0..n as i64);
            dropped.push(0);
        } else {
            push_row(&mut out, sink_window(n, sinks, window));
            // Without a compensation token the dropped count is still reported (for the
            // caller's statistics); nothing is built from it.
            dropped.push((n - sinks - window) as i64);
        }
    }
    Ok((out, dropped))
}

/// InfiniPot distillation: `compressed` tokens per row, of which the `floor(nuc_ratio *
/// compressed)` best by the token-level novelty score `nuc` `(n,)` are shared by every row,
/// and the rest are each row's best by catalyst score `cap` `(rows, n)` (ties: lower
/// position). Protected spans and sinks in `force` are kept first, taken from the
/// catalyst share.
pub fn infinipot(
    cap: &[f32],
    num_rows: usize,
    n: usize,
    nuc: &[f32],
    compressed: usize,
    nuc_ratio: f64,
    force: &ForceKeep,
) -> Result<Csr> {
    if !(0.0..=1.0).contains(&nuc_ratio) {
        return Err(KvError::InvalidArgument(format!(
            "nuc_ratio must be in [0, 1], got {nuc_ratio}"
        )));
    }
    check_rows(nuc, 1, n, &[0])?;
    let budgets = vec![compressed.min(n); num_rows];
    check_rows(cap, num_rows, n, &budgets)?;
    force.validate()?;
    let k_nuc = ((nuc_ratio * compressed as f64).floor() as usize)
        .min(compressed)
        .min(n);
    // The shared novelty set, by the same order as everywhere (score desc, position asc).
    let shared = super::topk::select_topk(nuc, 1, n, &[k_nuc], &ForceKeep::default())?;
    let mut force2 = force.clone();
    force2.protected.splice(
        0..0,
        shared
            .positions
            .iter()
            .map(|&p| (p as usize, p as usize + 1)),
    );
    // The novelty set has priority over the caller's ranges: put it first.
    let sinks = std::mem::take(&mut force2.sinks);
    let window = std::mem::take(&mut force2.window);
    if sinks > 0 {
        force2.protected.push((0, sinks));
    }
    if window > 0 {
        force2.protected.push((n.saturating_sub(window), n));
    }
    let mut out = Csr::new();
    let mut s = Scratch::default();
    for (r, &b) in budgets.iter().enumerate() {
        s.select_row(&cap[r * n..(r + 1) * n], b, &force2, &mut out)?;
    }
    Ok(out)
}

/// Checks that a CSR has `num_rows` rows over `n` tokens (helper for callers and tests).
pub fn validate(csr: &Csr, n: usize) -> Result<()> {
    check_csr(&csr.indptr, &csr.positions, &vec![n; csr.num_rows()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_and_short_rows() {
        let c = streaming(2, 10, 2, 3).unwrap();
        assert_eq!(c.row(1), &[0, 1, 7, 8, 9]);
        let c = streaming(1, 4, 2, 3).unwrap();
        assert_eq!(c.row(0), &[0, 1, 2, 3]);
    }

    #[test]
    fn longgen_layers() {
        let p = LongGenParams {
            sinks: 1,
            window: 2,
            block: 2,
            stride: 3,
            local_blocks: 1,
        };
        let kinds = [LayerKind::Full, LayerKind::Sink, LayerKind::BlockSparse];
        let c = longgen(&kinds, 1, 10, &p).unwrap();
        assert_eq!(c.row(0).len(), 10);
        assert_eq!(c.row(1), &[0, 8, 9]);
        // blocks 0..5: keep 0, 3 (stride), 4 (local)
        assert_eq!(c.row(2), &[0, 1, 6, 7, 8, 9]);
    }

    #[test]
    fn razor_rows() {
        let (c, d) = razor(&[true, false], 20, 2, 6, true).unwrap();
        assert_eq!(c.row(0).len(), 20);
        assert_eq!(c.row(1), &[0, 1, 17, 18, 19]);
        assert_eq!(d, vec![0, 15]);
        let (c, _) = razor(&[false], 20, 2, 6, false).unwrap();
        assert_eq!(c.row(0), &[0, 1, 16, 17, 18, 19]);
        assert!(razor(&[false], 20, 3, 3, true).is_err());
    }

    #[test]
    fn infinipot_shares_the_novelty_set() {
        let n = 8;
        let nuc = [0.0f32, 9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0];
        let cap = [
            1.0f32, 0.0, 5.0, 0.0, 0.0, 0.0, 4.0, 0.0, /**/ 0.0, 0.0, 0.0, 7.0, 0.0, 6.0, 0.0,
            0.0,
        ];
        let c = infinipot(&cap, 2, n, &nuc, 4, 0.5, &ForceKeep::default()).unwrap();
        assert_eq!(c.row(0), &[1, 2, 4, 6]);
        assert_eq!(c.row(1), &[1, 3, 4, 5]);
    }
}
