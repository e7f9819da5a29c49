//! Plan builders, one rule each. Inputs are host arrays for one (layer, kv-head): keys
//! `n x d` row-major float32 and per-token scores. Cosines and weights are computed in
//! float64; a zero-norm key has cosine 0 with everything.

use super::MergePlan;
use crate::error::{KvError, Result};

fn check_rows(keys: &[f32], n: usize, d: usize, what: &str) -> Result<()> {
    if d == 0 || keys.len() != n * d {
        return Err(KvError::InvalidArgument(format!(
            "{what} must be n={n} x d={d} (d > 0), got {} elements",
            keys.len()
        )));
    }
    if let Some(i) = keys.iter().position(|v| !v.is_finite()) {
        return Err(KvError::InvalidArgument(format!(
            "{what} contain a non-finite value at token {}, channel {}",
            i / d,
            i % d
        )));
    }
    Ok(())
}

fn check_scores(s: &[f32], n: usize, what: &str) -> Result<()> {
    if s.len() != n {
        return Err(KvError::InvalidArgument(format!(
            "{what} must have one entry per token ({n}), got {}",
            s.len()
        )));
    }
    if let Some(v) = s.iter().find(|v| !v.is_finite() || **v < 0.0) {
        return Err(KvError::InvalidArgument(format!(
            "{what} must be finite and non-negative, got {v}"
        )));
    }
    Ok(())
}

fn row(x: &[f32], i: usize, d: usize) -> &[f32] {
    &x[i * d..(i + 1) * d]
}

/// Cosine similarity in float64 (0 if either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// A threshold compared with `>=`: NaN would silently compare false everywhere.
fn not_nan(v: f64, what: &str) -> Result<()> {
    if v.is_nan() {
        return Err(KvError::InvalidArgument(format!(
            "{what} must be a number, got NaN"
        )));
    }
    Ok(())
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum()
}

/// KVMerger: merging sets are maximal runs of consecutive tokens in `[0, mergeable)` whose
/// adjacent keys have cosine >= `eps`. Each set of two or more merges into its pivot (the
/// token with the largest `attn`, the first on ties) with Gaussian weights
/// `g_i = exp(-|k_p - k_i|^2 / (2 sigma^2))`, normalised to sum to 1.
///
/// `sigma = None` uses the root mean square distance of the set's tokens to the pivot
/// (**unverified**: the paper derives sigma from the set's distances; the exact rule was not
/// checked); a set whose keys are all equal gets equal weights. Tokens from `mergeable` on
/// (e.g. the recent window) are never merged.
pub fn kvmerger(
    keys: &[f32],
    attn: &[f32],
    d: usize,
    eps: f64,
    sigma: Option<f64>,
    mergeable: usize,
) -> Result<MergePlan> {
    let n = keys.len() / d.max(1);
    check_scores(attn, n, "attn")?;
    check_rows(keys, n, d, "keys")?;
    not_nan(eps, "eps")?;
    if let Some(s) = sigma.filter(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(KvError::InvalidArgument(format!(
            "sigma must be positive and finite, got {s}"
        )));
    }
    let mut plan = MergePlan::empty(n);
    let m = mergeable.min(n);
    let mut start = 0;
    while start < m {
        let mut end = start + 1;
        while end < m && cosine(row(keys, end - 1, d), row(keys, end, d)) >= eps {
            end += 1;
        }
        if end - start >= 2 {
            let set = start..end;
            let mut p = start;
            for i in set.clone() {
                if attn[i] > attn[p] {
                    p = i;
                }
            }
            let dist: Vec<f64> = set
                .clone()
                .map(|i| sq_dist(row(keys, p, d), row(keys, i, d)))
                .collect();
            let s2 = match sigma {
                Some(s) => s * s,
                None => dist.iter().sum::<f64>() / (dist.len() - 1) as f64,
            };
            let g: Vec<f64> = if s2 > 0.0 {
                dist.iter().map(|&q| (-q / (2.0 * s2)).exp()).collect()
            } else {
                vec![1.0; dist.len()]
            };
            let z: f64 = g.iter().sum();
            for (i, gi) in set.zip(g) {
                plan.src.push(i);
                plan.dst.push(p);
                plan.weight.push((gi / z) as f32);
            }
        }
        start = end;
    }
    Ok(plan)
}

fn sorted_unique(v: &[usize], n: usize, what: &str) -> Result<()> {
    if let Some(w) = v.windows(2).find(|w| w[0] >= w[1]) {
        return Err(KvError::InvalidPositions(format!(
            "{what} must be strictly increasing, got {} then {}",
            w[0], w[1]
        )));
    }
    if let Some(&p) = v.last().filter(|&&p| p >= n) {
        return Err(KvError::InvalidPositions(format!(
            "{what} position {p} is out of range for {n} tokens"
        )));
    }
    Ok(())
}

/// EMS evict-then-merge: each token not in `retained` merges into the retained token whose
/// key is most similar (cosine, the lowest index on ties) if that cosine is >= `threshold`,
/// otherwise it is evicted (the zero class). A center `c` that receives tokens `J` becomes
/// the attention-weighted mean `(a_c k_c + sum a_j k_j) / (a_c + sum a_j)` (equal weights when
/// all those scores are 0); same for values. **Unverified** against the paper: the weighting
/// and the threshold rule (no official code was found).
pub fn ems(
    keys: &[f32],
    attn: &[f32],
    d: usize,
    retained: &[usize],
    threshold: f64,
) -> Result<MergePlan> {
    let n = keys.len() / d.max(1);
    check_scores(attn, n, "attn")?;
    check_rows(keys, n, d, "keys")?;
    not_nan(threshold, "threshold")?;
    sorted_unique(retained, n, "retained")?;
    let mut plan = MergePlan::empty(n);
    let mut is_ret = vec![false; n];
    for &r in retained {
        is_ret[r] = true;
    }
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
    for j in (0..n).filter(|&j| !is_ret[j]) {
        let mut best: Option<(usize, f64)> = None;
        for &c in retained {
            let s = cosine(row(keys, j, d), row(keys, c, d));
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((c, s));
            }
        }
        match best {
            Some((c, s)) if s >= threshold => members[c].push(j),
            _ => plan.evicted.push(j),
        }
    }
    for &c in retained {
        if members[c].is_empty() {
            continue;
        }
        let z: f64 = std::iter::once(c)
            .chain(members[c].iter().copied())
            .map(|i| f64::from(attn[i]))
            .sum();
        let k = (members[c].len() + 1) as f64;
        for i in std::iter::once(c).chain(members[c].iter().copied()) {
            plan.src.push(i);
            plan.dst.push(c);
            plan.weight.push(if z > 0.0 {
                (f64::from(attn[i]) / z) as f32
            } else {
                (1.0 / k) as f32
            });
        }
    }
    Ok(plan)
}

/// RazorAttention for one non-retrieval head of `n` tokens: keep `sink` initial tokens and
/// the last `local_capacity - sink - 1` tokens; every token between them is folded into one
/// compensation token, the plain mean of the dropped keys (and values), stored in the slot
/// of the first dropped token. Nothing happens while `n <= local_capacity`. Defaults from
/// golden-stick `RAConfig`: `sink = 4`, `local_capacity = 256`. The dropped count is the
/// slot's mass, so the log-count bias gives the paper's `N_d`-weighted compensation token
/// (**unverified**: recalled, not checked in the paper).
pub fn razor(n: usize, sink: usize, local_capacity: usize) -> Result<MergePlan> {
    if local_capacity < sink + 2 {
        return Err(KvError::InvalidArgument(format!(
            "local_capacity must be at least sink + 2 (sinks, the compensation token and one \
             recent token), got local_capacity={local_capacity}, sink={sink}"
        )));
    }
    let mut plan = MergePlan::empty(n);
    if n <= local_capacity {
        return Ok(plan);
    }
    let end = n - (local_capacity - sink - 1);
    let w = 1.0 / (end - sink) as f64;
    for v in [&mut plan.src, &mut plan.dst] {
        crate::error::try_reserve(v, end - sink, "num_tokens")?;
    }
    crate::error::try_reserve(&mut plan.weight, end - sink, "num_tokens")?;
    for j in sink..end {
        plan.src.push(j);
        plan.dst.push(sink);
        plan.weight.push(w as f32);
    }
    Ok(plan)
}

/// CaM, one-shot form: each evicted token `e` (strictly increasing `evicted`) is merged with
/// probability `p_e = clamp(attn[e] / max(attn over kept tokens), 0, 1)` (merged when
/// `draws[e_index] < p_e`; `draws` are uniform [0, 1) numbers from the host, one per evicted
/// token) into the next `window` kept tokens after it, each receiving `V[e] / r` where `r` is
/// the number of such tokens (fewer than `window` near the end). Otherwise it is simply
/// evicted. Keys are not merged: apply the plan to values only and compact keys with
/// `kept_positions()`. **Unverified** simplification of the sliding-window port (KVCache-Factory
/// `CAMKVCluster`), which spreads into the window as it slides.
pub fn cam(attn: &[f32], evicted: &[usize], draws: &[f32], window: usize) -> Result<MergePlan> {
    let n = attn.len();
    check_scores(attn, n, "attn")?;
    sorted_unique(evicted, n, "evicted")?;
    if draws.len() != evicted.len() {
        return Err(KvError::InvalidArgument(format!(
            "draws must have one number per evicted token ({}), got {}",
            evicted.len(),
            draws.len()
        )));
    }
    if window == 0 {
        return Err(KvError::InvalidArgument("window must be positive".into()));
    }
    let mut is_ev = vec![false; n];
    for &e in evicted {
        is_ev[e] = true;
    }
    let kept: Vec<usize> = (0..n).filter(|&i| !is_ev[i]).collect();
    let amax = kept.iter().map(|&i| attn[i]).fold(0.0f32, f32::max);
    let mut plan = MergePlan::empty(n);
    let mut recipient = vec![false; n];
    for (&e, &u) in evicted.iter().zip(draws) {
        let p = if amax > 0.0 {
            (attn[e] / amax).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let first = kept.partition_point(|&k| k <= e);
        let rec = &kept[first..(first + window).min(kept.len())];
        if u < p && !rec.is_empty() {
            let w = 1.0 / rec.len() as f32;
            for &r in rec {
                plan.src.push(e);
                plan.dst.push(r);
                plan.weight.push(w);
                recipient[r] = true;
            }
        } else {
            plan.evicted.push(e);
        }
    }
    for r in (0..n).filter(|&r| recipient[r]) {
        plan.src.push(r);
        plan.dst.push(r);
        plan.weight.push(1.0);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvmerger_runs_and_weights() {
        // tokens 0,1,2 point the same way, 3 is orthogonal, 4 like 3.
        let keys = [1.0, 0.0, 2.0, 0.1, 1.0, 0.0, 0.0, 1.0, 0.0, 2.0];
        let attn = [0.1, 0.5, 0.2, 0.3, 0.1];
        let p = kvmerger(&keys, &attn, 2, 0.99, Some(1.0), 5).unwrap();
        assert_eq!(p.dst, vec![1, 1, 1, 3, 3]);
        let s: f32 = p.weight[..3].iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(p.kept_positions(), vec![1, 3]);
        // the recent window is protected
        let p = kvmerger(&keys, &attn, 2, 0.99, None, 3).unwrap();
        assert_eq!(p.kept_positions(), vec![1, 3, 4]);
    }

    #[test]
    fn ems_zero_class() {
        let keys = [1.0, 0.0, 0.0, 1.0, 0.9, 0.1, -1.0, 0.0];
        let attn = [1.0, 1.0, 1.0, 1.0];
        let p = ems(&keys, &attn, 2, &[0, 1], 0.5).unwrap();
        assert_eq!(p.evicted, vec![3]);
        assert_eq!(p.kept_positions(), vec![0, 1]);
        assert_eq!((p.src.clone(), p.dst.clone()), (vec![0, 2], vec![0, 0]));
    }

    #[test]
    fn razor_and_cam() {
        let p = razor(10, 2, 5).unwrap();
        assert_eq!(p.kept_positions(), vec![0, 1, 2, 8, 9]);
        assert_eq!(p.src, (2..8).collect::<Vec<_>>());
        assert!(razor(3, 2, 5).unwrap().src.is_empty());
        assert!(razor(10, 4, 5).is_err());
        let attn = [1.0, 0.2, 0.5, 1.0, 1.0];
        let p = cam(&attn, &[1, 2], &[0.0, 0.9], 2).unwrap();
        assert_eq!(p.evicted, vec![2]);
        assert_eq!(p.kept_positions(), vec![0, 3, 4]);
        let v = [0.0, 10.0, 5.0, 1.0, 1.0];
        let y = p.apply(&v, 1).unwrap();
        assert_eq!((y[3], y[4]), (6.0, 6.0));
    }
}
