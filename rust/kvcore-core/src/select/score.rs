//! Score providers: small per-token statistics in, one f32 per (row, token) out.
//!
//! The torch layer computes the heavy part (softmax of a few query rows against all keys)
//! where the tensors live and hands these functions small float32 arrays. Sums are
//! accumulated in f64 and rounded once to f32, so results do not depend on summation order.

use super::topk::{check_finite, Csr};
use crate::error::{try_filled, KvError, Result};

/// How to reduce several values to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
}

fn check_len(data: &[f32], dims: &[usize], what: &str) -> Result<()> {
    let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if want != Some(data.len()) {
        return Err(KvError::InvalidArgument(format!(
            "{what} must have shape {dims:?} ({} values), got {} values",
            want.map(|w| w.to_string())
                .unwrap_or_else(|| "overflow".into()),
            data.len()
        )));
    }
    check_finite(data, *dims.last().unwrap_or(&1), what)
}

fn reduce(vals: impl Iterator<Item = f32>, count: usize, how: Reduce) -> f32 {
    match how {
        Reduce::Max => vals.fold(f32::NEG_INFINITY, f32::max),
        Reduce::Sum => vals.map(f64::from).sum::<f64>() as f32,
        Reduce::Mean => (vals.map(f64::from).sum::<f64>() / count as f64) as f32,
    }
}

/// SnapKV / P-1: reduces window attention `(rows, w, n)` over its `w` query rows
/// (`Sum` as SnapKV/PyramidKV, `Mean` as Ada-KV/HeadKV, or `Max`) to `(rows, n)`.
pub fn window_reduce(
    probs: &[f32],
    rows: usize,
    w: usize,
    n: usize,
    how: Reduce,
) -> Result<Vec<f32>> {
    check_len(probs, &[rows, w, n], "window attention")?;
    if w == 0 {
        return Err(KvError::InvalidArgument(
            "the observation window w must be positive".into(),
        ));
    }
    let mut out = Vec::with_capacity(rows * n);
    for r in 0..rows {
        let base = r * w * n;
        for i in 0..n {
            out.push(reduce((0..w).map(|q| probs[base + q * n + i]), w, how));
        }
    }
    Ok(out)
}

/// P-3: reduces `(num_q_heads, n)` scores over each GQA group of `num_q_heads / num_kv_heads`
/// consecutive query heads to `(num_kv_heads, n)`, by mean (default) or max.
pub fn group_reduce(
    scores: &[f32],
    num_q_heads: usize,
    num_kv_heads: usize,
    n: usize,
    how: Reduce,
) -> Result<Vec<f32>> {
    if num_kv_heads == 0 || num_q_heads % num_kv_heads != 0 {
        return Err(KvError::InvalidArgument(format!(
            "num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )));
    }
    check_len(scores, &[num_q_heads, n], "scores")?;
    let g = num_q_heads / num_kv_heads;
    let mut out = Vec::with_capacity(num_kv_heads * n);
    for h in 0..num_kv_heads {
        for i in 0..n {
            out.push(reduce((0..g).map(|q| scores[(h * g + q) * n + i]), g, how));
        }
    }
    Ok(out)
}

/// SnapKV pooling: 1-D pooling along the tokens of each row, stride 1, odd `kernel`,
/// padding `kernel // 2`. `Mean` divides by `kernel` with zero padding (torch
/// `avg_pool1d`, `count_include_pad=True`); `Max` ignores the padding.
pub fn pool1d(
    scores: &[f32],
    rows: usize,
    n: usize,
    kernel: usize,
    how: Reduce,
) -> Result<Vec<f32>> {
    if kernel == 0 || kernel % 2 == 0 {
        return Err(KvError::InvalidArgument(format!(
            "kernel must be a positive odd number, got {kernel}"
        )));
    }
    if how == Reduce::Sum {
        return Err(KvError::InvalidArgument(
            "pooling is mean (avg) or max".into(),
        ));
    }
    check_len(scores, &[rows, n], "scores")?;
    let half = kernel / 2;
    let mut out = Vec::with_capacity(rows * n);
    for r in 0..rows {
        let row = &scores[r * n..(r + 1) * n];
        for i in 0..n {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(n);
            out.push(reduce(row[lo..hi].iter().copied(), kernel, how));
        }
    }
    Ok(out)
}

/// TOVA: last-query attention `(num_layers, num_q_heads, n)` averaged over the heads of each
/// layer: `(num_layers, n)`, one score row per layer.
pub fn tova(
    last_attn: &[f32],
    num_layers: usize,
    num_q_heads: usize,
    n: usize,
) -> Result<Vec<f32>> {
    check_len(
        last_attn,
        &[num_layers, num_q_heads, n],
        "last-query attention",
    )?;
    if num_q_heads == 0 {
        return Err(KvError::InvalidArgument(
            "num_q_heads must be positive".into(),
        ));
    }
    let mut out = Vec::with_capacity(num_layers * n);
    for l in 0..num_layers {
        for i in 0..n {
            let v = (0..num_q_heads).map(|h| last_attn[(l * num_q_heads + h) * n + i]);
            out.push(reduce(v, num_q_heads, Reduce::Mean));
        }
    }
    Ok(out)
}

/// K-norm: `-||k||_2` for keys `(rows, n, d)` (the lowest norms score highest).
pub fn key_norm(keys: &[f32], rows: usize, n: usize, d: usize) -> Result<Vec<f32>> {
    check_len(keys, &[rows, n, d], "keys")?;
    Ok(keys
        .chunks_exact(d.max(1))
        .take(rows * n)
        .map(|k| {
            -(k.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt() as f32)
        })
        .collect())
}

/// RazorAttention echo and induction scores of one head's calibration attention map
/// `(s, s)` (row = query). The calibration input is `prefix` tokens (BOS) followed by a
/// random sequence of `period` tokens repeated. For queries `i` and keys `j < i` after the
/// prefix with `i - j` a multiple of `period`: echo adds `P[i, j]`, induction adds
/// `P[i, j + 1]`. Both are divided by `s * s` (a mean over the whole map, as the vendor code).
pub fn razor_head_scores(
    map: &[f32],
    s: usize,
    period: usize,
    prefix: usize,
) -> Result<(f32, f32)> {
    check_len(map, &[s, s], "attention map")?;
    if period == 0 {
        return Err(KvError::InvalidArgument("period must be positive".into()));
    }
    let (mut echo, mut ind) = (0f64, 0f64);
    for i in prefix..s {
        let mut j = i;
        while j >= prefix + period {
            j -= period;
            echo += f64::from(map[i * s + j]);
            ind += f64::from(map[i * s + j + 1]);
        }
    }
    let denom = (s as f64) * (s as f64);
    Ok(((echo / denom) as f32, (ind / denom) as f32))
}

/// RazorAttention retrieval heads over all `(layer, head)` rows: the top
/// `ceil(echo_ratio * rows)` by echo score plus the top `ceil(induction_ratio * rows)` by
/// induction score (ties: the lower row). Returns one flag per row.
pub fn razor_retrieval_heads(
    echo: &[f32],
    induction: &[f32],
    echo_ratio: f64,
    induction_ratio: f64,
) -> Result<Vec<bool>> {
    let rows = echo.len();
    if induction.len() != rows {
        return Err(KvError::InvalidArgument(format!(
            "echo and induction must have one score per head, got {} and {}",
            rows,
            induction.len()
        )));
    }
    for r in [echo_ratio, induction_ratio] {
        if !(0.0..=1.0).contains(&r) {
            return Err(KvError::InvalidArgument(format!(
                "ratios must be in [0, 1], got {r}"
            )));
        }
    }
    check_finite(echo, rows, "echo scores")?;
    check_finite(induction, rows, "induction scores")?;
    let mut out = vec![false; rows];
    for (s, ratio) in [(echo, echo_ratio), (induction, induction_ratio)] {
        // Rounded to 1e-9 first: 0.14 * 100 is 14.000000000000002 in f64, and must give 14.
        let k = (((ratio * rows as f64 * 1e9).round() / 1e9).ceil() as usize).min(rows);
        let mut idx: Vec<usize> = (0..rows).collect();
        // Equal scores (-0.0 and 0.0 included: total_cmp would order them) go to the lower
        // head index; the scores are finite (checked above), so partial_cmp never fails.
        idx.sort_by(|&a, &b| {
            s[b].partial_cmp(&s[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        for &r in &idx[..k] {
            out[r] = true;
        }
    }
    Ok(out)
}

/// Per-row score state that lives with the tokens (H2O accumulators, Locret's CIS, any
/// external score) and is compacted by the same CSR plan as the cache.
#[derive(Clone, Debug, Default)]
pub struct ScoreState {
    rows: Vec<Vec<f32>>,
}

impl ScoreState {
    /// `num_rows` empty rows.
    pub fn new(num_rows: usize) -> Self {
        ScoreState {
            rows: vec![Vec::new(); num_rows],
        }
    }
    /// `num_rows` empty rows, or `InvalidArgument` when they cannot be allocated.
    pub fn try_new(num_rows: usize) -> Result<Self> {
        Ok(ScoreState {
            rows: try_filled(num_rows, Vec::new(), "num_rows")?,
        })
    }
    /// The number of rows.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }
    /// Row `r`'s scores.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.rows[r]
    }
    /// The lengths of every row.
    pub fn lengths(&self) -> Vec<usize> {
        self.rows.iter().map(Vec::len).collect()
    }
    /// The state as CSR `(indptr, values)`.
    pub fn to_csr(&self) -> (Vec<i64>, Vec<f32>) {
        let mut indptr = vec![0i64];
        let mut vals = Vec::new();
        for r in &self.rows {
            vals.extend_from_slice(r);
            indptr.push(vals.len() as i64);
        }
        (indptr, vals)
    }

    /// H2O step: `new` is `(rows, m)` attention mass received by each of the `m` tokens
    /// now cached (every row must have `m >= len`). Old tokens become
    /// `decay * old + new`; tokens beyond the old length start at `new`. `decay = 1`
    /// is plain H2O.
    pub fn accumulate(&mut self, new: &[f32], m: usize, decay: f32) -> Result<()> {
        let rows = self.rows.len();
        check_len(new, &[rows, m], "attention scores")?;
        if !(decay.is_finite() && (0.0..=1.0).contains(&decay)) {
            return Err(KvError::InvalidArgument(format!(
                "decay must be in [0, 1], got {decay}"
            )));
        }
        if let Some((r, row)) = self.rows.iter().enumerate().find(|(_, row)| row.len() > m) {
            return Err(KvError::InvalidArgument(format!(
                "row {r} holds {} tokens but the new scores cover only {m}",
                row.len()
            )));
        }
        for (r, row) in self.rows.iter_mut().enumerate() {
            let add = &new[r * m..(r + 1) * m];
            for (x, &a) in row.iter_mut().zip(add) {
                *x = decay * *x + a;
            }
            let old = row.len();
            row.extend_from_slice(&add[old..]);
        }
        Ok(())
    }

    /// Appends `(rows, q)` scores for `q` new tokens (Locret's CIS, external scores).
    pub fn append(&mut self, new: &[f32], q: usize) -> Result<()> {
        let rows = self.rows.len();
        check_len(new, &[rows, q], "scores")?;
        for (r, row) in self.rows.iter_mut().enumerate() {
            row.extend_from_slice(&new[r * q..(r + 1) * q]);
        }
        Ok(())
    }

    /// Keeps only the positions of `csr` (one row per state row, ascending, in range).
    pub fn compact(&mut self, csr: &Csr) -> Result<()> {
        if csr.num_rows() != self.rows.len() {
            return Err(KvError::InvalidArgument(format!(
                "the plan has {} rows but the state has {}",
                csr.num_rows(),
                self.rows.len()
            )));
        }
        check_csr(&csr.indptr, &csr.positions, &self.lengths())?;
        for (r, row) in self.rows.iter_mut().enumerate() {
            let keep = csr.row(r);
            for (dst, &p) in keep.iter().enumerate() {
                row[dst] = row[p as usize];
            }
            row.truncate(keep.len());
        }
        Ok(())
    }
}

/// Validates a CSR plan against row lengths: indptr monotone from 0 to `positions.len()`,
/// positions strictly ascending and below the row's length.
pub fn check_csr(indptr: &[i64], positions: &[i64], lengths: &[usize]) -> Result<()> {
    if indptr.len() != lengths.len() + 1
        || indptr[0] != 0
        || *indptr.last().unwrap() != positions.len() as i64
    {
        return Err(KvError::InvalidArgument(format!(
            "keep_indptr must have {} entries from 0 to len(keep_positions) = {}",
            lengths.len() + 1,
            positions.len()
        )));
    }
    if indptr.windows(2).any(|w| w[0] > w[1]) {
        return Err(KvError::InvalidArgument(
            "keep_indptr must be non-decreasing".into(),
        ));
    }
    for (r, &len) in lengths.iter().enumerate() {
        let (a, b) = (indptr[r], indptr[r + 1]);
        let row = &positions[a as usize..b as usize];
        let mut prev = -1i64;
        for &p in row {
            if p <= prev || p >= len as i64 {
                return Err(KvError::InvalidPositions(format!(
                    "row {r}: keep positions must be strictly ascending in [0, {len}), got {p} after {prev}"
                )));
            }
            prev = p;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_matches_hand_values() {
        let s = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(
            pool1d(&s, 1, 4, 3, Reduce::Mean).unwrap(),
            vec![1.0, 2.0, 3.0, 7.0 / 3.0]
        );
        assert_eq!(
            pool1d(&s, 1, 4, 3, Reduce::Max).unwrap(),
            vec![2.0, 3.0, 4.0, 4.0]
        );
        assert!(pool1d(&s, 1, 4, 2, Reduce::Max).is_err());
    }

    #[test]
    fn h2o_accumulates_with_decay_and_compacts() {
        let mut st = ScoreState::new(1);
        st.accumulate(&[1.0, 2.0], 2, 1.0).unwrap();
        st.accumulate(&[1.0, 1.0, 5.0], 3, 0.5).unwrap();
        assert_eq!(st.row(0), &[1.5, 2.0, 5.0]);
        let csr = Csr {
            indptr: vec![0, 2],
            positions: vec![0, 2],
        };
        st.compact(&csr).unwrap();
        assert_eq!(st.row(0), &[1.5, 5.0]);
        assert!(st.accumulate(&[1.0], 1, 1.0).is_err());
        let bad = Csr {
            indptr: vec![0, 1],
            positions: vec![7],
        };
        assert!(st.compact(&bad).is_err());
    }

    #[test]
    fn razor_scores_on_a_perfect_echo_head() {
        // prefix 1, period 2, s = 5: queries 3, 4 echo to keys 1, 2 (and 4 -> 2 only).
        let s = 5;
        let mut map = vec![0f32; s * s];
        map[3 * s + 1] = 1.0;
        map[4 * s + 2] = 1.0;
        let (e, i) = razor_head_scores(&map, s, 2, 1).unwrap();
        assert_eq!(e, 2.0 / 25.0);
        assert_eq!(i, 0.0);
        let heads = razor_retrieval_heads(&[0.1, 0.9, 0.2], &[0.3, 0.1, 0.3], 0.01, 0.3).unwrap();
        assert_eq!(heads, vec![true, true, false]);
    }

    #[test]
    fn razor_signed_zeros_tie_and_go_to_the_lower_head() {
        // -0.0 == 0.0: the first of the tied heads is taken, as with any other tie.
        let heads = razor_retrieval_heads(&[-0.0, 0.0], &[0.0, 0.0], 0.5, 0.0).unwrap();
        assert_eq!(heads, vec![true, false]);
    }
}
