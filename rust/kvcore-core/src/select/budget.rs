//! Splitting a token budget into per-(layer, head) budgets.
//!
//! Every split is **exact**: the row budgets sum to `min(total, sum of caps)` where a row's
//! cap is its number of tokens `n`. Nothing goes over, and nothing is left unused while a
//! row still has tokens to keep.
//!
//! Rounding rule (largest remainder with water-filling), used by every weighted split:
//! 1. rows whose proportional share reaches their cap get the cap, and the rest is
//!    re-split among the others, until no share reaches its cap;
//! 2. every other row gets `floor(share)`;
//! 3. the tokens still left go one each to the rows with the largest fractional parts
//!    (compared at 2^-30 resolution); equal fractional parts: the lower row index first.
//!
//! So a uniform split of 10 over 4 rows is `[3, 3, 2, 2]`.

use super::topk::{check_finite, Csr, ForceKeep, Scratch};
use crate::error::{try_filled, try_reserve, KvError, Result};

/// Splits `total` over rows in proportion to `weights`, each row capped at `caps[r]`, with
/// the module's rounding rule. All-zero weights split uniformly.
pub fn split_exact(total: usize, weights: &[f64], caps: &[usize]) -> Result<Vec<usize>> {
    let rows = weights.len();
    if caps.len() != rows {
        return Err(KvError::InvalidArgument(format!(
            "weights and caps must have the same length, got {rows} and {}",
            caps.len()
        )));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(KvError::InvalidArgument(format!(
            "weights must be finite and non-negative, got {w}"
        )));
    }
    let cap_sum: usize = caps.iter().sum();
    if total >= cap_sum {
        return Ok(caps.to_vec());
    }
    let uniform = weights.iter().all(|&w| w == 0.0);
    let w = |r: usize| if uniform { 1.0 } else { weights[r] };
    let mut out = vec![0usize; rows];
    let mut active: Vec<usize> = (0..rows).filter(|&r| caps[r] > 0).collect();
    let mut remaining = total;
    // 1. Water-filling: rows whose share reaches their cap are saturated.
    loop {
        let wsum: f64 = active.iter().map(|&r| w(r)).sum();
        let mut saturated = false;
        active.retain(|&r| {
            let share = if wsum > 0.0 {
                remaining as f64 * w(r) / wsum
            } else {
                0.0
            };
            if share >= caps[r] as f64 {
                out[r] = caps[r];
                saturated = true;
                false
            } else {
                true
            }
        });
        if !saturated {
            break;
        }
        remaining = total - out.iter().sum::<usize>();
    }
    // 2. Floors, 3. largest remainders.
    let wsum: f64 = active.iter().map(|&r| w(r)).sum();
    let mut fracs: Vec<(f64, usize)> = Vec::with_capacity(active.len());
    let mut given = 0usize;
    for &r in &active {
        let share = if wsum > 0.0 {
            remaining as f64 * w(r) / wsum
        } else {
            0.0
        };
        let f = (share.floor() as usize).min(caps[r]);
        out[r] = f;
        given += f;
        fracs.push((share - share.floor(), r));
    }
    let mut left = remaining.saturating_sub(given);
    // Fractional parts are compared at 2^-30 resolution, so that float noise (129 * 4 / 9
    // vs 129 * 1 / 9) does not break the documented lower-row-first tie rule.
    let q = |f: f64| (f * (1u64 << 30) as f64).round() as i64;
    fracs.sort_by(|a, b| q(b.0).cmp(&q(a.0)).then(a.1.cmp(&b.1)));
    // Floating-point shares can leave more than one token per row in rare cases: cycle.
    while left > 0 {
        let before = left;
        for &(_, r) in &fracs {
            if left == 0 {
                break;
            }
            if out[r] < caps[r] {
                out[r] += 1;
                left -= 1;
            }
        }
        if left == before {
            break;
        }
    }
    Ok(out)
}

/// `total` tokens over `num_rows` rows of `n` tokens, uniformly.
pub fn uniform(total: usize, num_rows: usize, n: usize) -> Result<Vec<usize>> {
    split_exact(
        total,
        &try_filled(num_rows, 1.0, "num_rows")?,
        &try_filled(num_rows, n, "num_rows")?,
    )
}

/// PyramidKV per-layer budgets, *including* the window, for a prompt of `n` tokens.
///
/// `capacity` is the average per-layer budget `C` including the window `w`
/// (KVCache-Factory's `max_capacity_prompt`). With `C' = C - w` (seed_algorithms.md 11.4):
/// * `n < C`: no compression, every layer keeps `n`;
/// * `n < 2 C'`: uniform `C` (SnapKV fallback);
/// * otherwise `min = C' // beta`, `max = 2 C' - min`; if `max >= n - w` then `max = n - w`
///   and `min = 2 C' - max`; layer `l` gets `max - l * ((max - min) // (L - 1))` plus `w`.
///
/// Exactness fix (ours): the floored step makes the reference schedule sum to more than
/// `L * C`; the excess is taken back one token per layer starting from layer 0 (the
/// largest), repeatedly, so the schedule stays non-increasing and sums to `L * C`.
pub fn pyramid(
    num_layers: usize,
    n: usize,
    capacity: usize,
    window: usize,
    beta: usize,
) -> Result<Vec<usize>> {
    if beta == 0 {
        return Err(KvError::InvalidArgument("beta must be positive".into()));
    }
    if window > capacity {
        return Err(KvError::InvalidArgument(format!(
            "window ({window}) must not exceed the per-layer capacity ({capacity})"
        )));
    }
    let fits = num_layers
        .checked_mul(capacity)
        .and_then(|t| t.checked_mul(2))
        .and(num_layers.checked_mul(n));
    if fits.is_none() {
        return Err(KvError::InvalidArgument(format!(
            "num_layers * capacity * 2 and num_layers * n must fit in 64 bits, got num_layers={num_layers}, \
             capacity={capacity}, n={n}"
        )));
    }
    let c1 = capacity - window;
    if n < capacity {
        return try_filled(num_layers, n, "num_layers");
    }
    if n < 2 * c1 || num_layers <= 1 {
        return try_filled(num_layers, capacity, "num_layers");
    }
    let mut min_num = c1 / beta;
    let mut max_num = 2 * c1 - min_num;
    if max_num >= n - window {
        max_num = n - window;
        min_num = 2 * c1 - max_num;
    }
    let steps = (max_num - min_num) / (num_layers - 1);
    let mut caps = try_filled(num_layers, 0, "num_layers")?;
    for (l, c) in caps.iter_mut().enumerate() {
        *c = max_num - l * steps;
    }
    let target = num_layers * c1;
    let mut excess = caps.iter().sum::<usize>().saturating_sub(target);
    while excess > 0 {
        // Whole sweeps at once (each takes one token from every non-empty layer), so the
        // loop is bounded by the number of layers, not by the excess.
        let positive = caps.iter().filter(|&&c| c > 0).count();
        let smallest = caps.iter().copied().filter(|&c| c > 0).min().unwrap_or(0);
        let sweeps = (excess / positive.max(1)).min(smallest);
        if sweeps > 0 {
            caps.iter_mut()
                .filter(|c| **c > 0)
                .for_each(|c| *c -= sweeps);
            excess -= sweeps * positive;
            continue;
        }
        for c in caps.iter_mut() {
            if excess == 0 {
                break;
            }
            if *c > 0 {
                *c -= 1;
                excess -= 1;
            }
        }
    }
    Ok(caps.into_iter().map(|c| (c + window).min(n)).collect())
}

/// HeadKV-style budgets from caller head weights over all `(layer, head)` rows.
///
/// Each row gets the base `C - C // head_beta` and the pool `(C // head_beta) * rows` is
/// split by `weights` (normalised) with the module's rounding rule; rows are capped at `n`.
/// The total is exactly `min(C * rows, n * rows)`. (KVCache-Factory rounds each row
/// independently, which can miss the total by a few tokens.)
pub fn head_weighted(
    capacity: usize,
    weights: &[f64],
    n: usize,
    head_beta: f64,
) -> Result<Vec<usize>> {
    if !(head_beta.is_finite() && head_beta >= 1.0) {
        return Err(KvError::InvalidArgument(format!(
            "head_beta must be a finite number >= 1, got {head_beta}"
        )));
    }
    let rows = weights.len();
    let pool_per = (capacity as f64 / head_beta).floor() as usize;
    let base = (capacity - pool_per).min(n);
    let total = (capacity * rows).min(n * rows);
    let caps = vec![n - base; rows];
    let extra = split_exact(total - base * rows, weights, &caps)?;
    Ok(extra.into_iter().map(|e| e + base).collect())
}

/// Ada-KV per-head budgets of one or more layers, *including* forced tokens.
///
/// `scores` is `(num_layers * num_heads, n)`; `budget` is the average per-head budget (so a
/// layer keeps `num_heads * min(budget, n)` tokens in all). Per layer, with `F` forced
/// tokens per head (`force`) and `B' = budget - F`:
/// * every head keeps its forced tokens and its own top `floor(alpha * B')` (the floor);
/// * the remaining `H * B' - H * floor(alpha * B')` slots go to the best scores left across
///   all heads of the layer (ties: lower head, then lower position).
///
/// This is kvpress' exact form of the Ada-KV safeguard; the official code rounds
/// `n_h (1 - alpha) + alpha B` per head, which does not always sum to `H * B`.
pub fn adakv(
    scores: &[f32],
    num_layers: usize,
    num_heads: usize,
    n: usize,
    budget: usize,
    alpha: f64,
    force: &ForceKeep,
) -> Result<Vec<usize>> {
    adakv_select(scores, num_layers, num_heads, n, budget, alpha, force).map(|(b, _)| b)
}

/// [`adakv`] and the matching selection in one pass: returns the per-row budgets and the
/// kept positions (the same as `select_topk` with those budgets and `force`).
pub fn adakv_select(
    scores: &[f32],
    num_layers: usize,
    num_heads: usize,
    n: usize,
    budget: usize,
    alpha: f64,
    force: &ForceKeep,
) -> Result<(Vec<usize>, Csr)> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(KvError::InvalidArgument(format!(
            "alpha must be in [0, 1], got {alpha}"
        )));
    }
    let rows = num_layers * num_heads;
    if rows.checked_mul(n) != Some(scores.len()) {
        return Err(KvError::InvalidArgument(format!(
            "scores must hold num_layers * num_heads * n = {num_layers} * {num_heads} * {n} values, got {}",
            scores.len()
        )));
    }
    if num_heads.saturating_mul(n) > u32::MAX as usize {
        return Err(KvError::InvalidArgument(
            "num_heads * n must be below 2**32".into(),
        ));
    }
    check_finite(scores, n, "scores")?;
    force.validate()?;
    let mut csr = Csr::new();
    if budget >= n {
        try_reserve(&mut csr.positions, rows * n, "keep positions")?;
        for _ in 0..rows {
            csr.positions.extend(0..n as i64);
            csr.indptr.push(csr.positions.len() as i64);
        }
        return Ok((vec![n; rows], csr));
    }
    let mut row_mark = vec![false; n];
    let forced = force.mark(n, budget, &mut row_mark);
    let b1 = budget - forced;
    let floor = (alpha * b1 as f64).floor() as usize;
    let pool = num_heads * (b1 - floor);
    let free = num_heads * (n - forced - floor);
    let mut scratch = Scratch::default();
    let mut mark = vec![false; num_heads * n];
    let mut out = Vec::with_capacity(rows);
    try_reserve(&mut csr.positions, rows * budget, "keep positions")?;
    for l in 0..num_layers {
        let layer = &scores[l * num_heads * n..(l + 1) * num_heads * n];
        for h in 0..num_heads {
            let m = &mut mark[h * n..(h + 1) * n];
            m.copy_from_slice(&row_mark);
            // Each head's own floor first (its safeguard) ...
            scratch.mark_top(&layer[h * n..(h + 1) * n], m, floor, n - forced);
        }
        // ... then the best of what is left across the layer's heads. Index h * n + i
        // makes ties go to the lower head, then the lower position.
        scratch.mark_top(layer, &mut mark, pool, free);
        for h in 0..num_heads {
            let before = csr.positions.len();
            csr.positions.extend(
                mark[h * n..(h + 1) * n]
                    .iter()
                    .enumerate()
                    .filter(|(_, &m)| m)
                    .map(|(i, _)| i as i64),
            );
            out.push(csr.positions.len() - before);
            csr.indptr.push(csr.positions.len() as i64);
        }
    }
    Ok((out, csr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_remainder_goes_to_low_rows() {
        assert_eq!(uniform(10, 4, 100).unwrap(), vec![3, 3, 2, 2]);
        assert_eq!(uniform(10, 4, 2).unwrap(), vec![2, 2, 2, 2]);
        assert_eq!(uniform(0, 3, 5).unwrap(), vec![0, 0, 0]);
        assert_eq!(uniform(5, 0, 5).unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn split_is_exact_with_caps() {
        let w = [10.0, 1.0, 1.0, 0.0];
        let caps = [3, 50, 50, 50];
        let got = split_exact(20, &w, &caps).unwrap();
        assert_eq!(got.iter().sum::<usize>(), 20);
        assert_eq!(got[0], 3);
        assert!(got.iter().zip(caps).all(|(g, c)| *g <= c));
        assert_eq!(got[3], 0);
    }

    #[test]
    fn pyramid_sums_to_l_times_c_and_decreases() {
        for &(l, n, c, w) in &[
            (32, 8000, 512, 32),
            (7, 3000, 300, 8),
            (3, 100000, 2048, 32),
        ] {
            let b = pyramid(l, n, c, w, 20).unwrap();
            assert_eq!(b.iter().sum::<usize>(), l * c, "{b:?}");
            assert!(b.windows(2).all(|p| p[0] >= p[1]), "{b:?}");
        }
        assert_eq!(pyramid(4, 100, 200, 8, 20).unwrap(), vec![100; 4]);
        assert_eq!(pyramid(4, 300, 200, 8, 20).unwrap(), vec![200; 4]);
        // max clipped to n - w
        let b = pyramid(4, 450, 300, 100, 20).unwrap();
        assert_eq!(b, vec![450, 350, 250, 150]);
    }

    #[test]
    fn adakv_is_exact_and_respects_floor() {
        let (l, h, n) = (2, 3, 40);
        let scores: Vec<f32> = (0..l * h * n).map(|i| ((i * 37) % 101) as f32).collect();
        let f = ForceKeep::new(2, 4);
        let b = adakv(&scores, l, h, n, 12, 0.2, &f).unwrap();
        for layer in 0..l {
            assert_eq!(b[layer * h..(layer + 1) * h].iter().sum::<usize>(), 3 * 12);
        }
        assert!(b.iter().all(|&x| (6 + 1..=n).contains(&x)));
        let (b2, csr) = adakv_select(&scores, l, h, n, 12, 0.2, &f).unwrap();
        assert_eq!(b2, b);
        let again = super::super::topk::select_topk(&scores, l * h, n, &b, &f).unwrap();
        assert_eq!(csr, again);
    }

    #[test]
    fn head_weighted_is_exact() {
        let w = [0.5, 0.25, 0.125, 0.125];
        let b = head_weighted(100, &w, 1000, 1.01).unwrap();
        assert_eq!(b.iter().sum::<usize>(), 400);
        let b = head_weighted(100, &w, 120, 1.01).unwrap();
        assert_eq!(b.iter().sum::<usize>(), 400);
        assert!(b.iter().all(|&x| x <= 120));
    }
}
