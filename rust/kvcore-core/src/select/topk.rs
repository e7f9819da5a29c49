//! Force-keep ranges and per-row top-k selection, with the result in CSR form.
//!
//! A *row* is one (layer, kv-head) pair, `row = layer * num_heads + head`. Every row holds
//! `n` scores (one per cached token, higher means keep) and gets its own budget.
//!
//! ```text
//!   n = 12, sinks = 2, window = 3, budget = 7
//!
//!   position   0  1  2  3  4  5  6  7  8  9 10 11
//!   forced     S  S                      W  W  W        (5 forced, 2 left for top-k)
//!   scores     .  .  9  1  4  9  2  0  3  .  .  .
//!   kept       x  x  x        x           x  x  x       (tie 9/9: both fit; 4 loses)
//! ```
//!
//! Rules, fixed here and repeated in the Python docs:
//! * **Order**: higher score first; equal scores: the lower position wins. `-0.0 == 0.0`.
//!   This is a total order, so the kept set does not depend on the algorithm.
//! * **Force-keep priority** when the budget is smaller than the forced set: sinks first
//!   (from position 0 upwards), then the recent window (from the newest token backwards),
//!   then the protected spans in the order given. So `budget < sinks + window` keeps the
//!   first `min(budget, sinks)` tokens and the newest `budget - min(budget, sinks)`.
//! * **Budget >= n** keeps every token.
//! * Scores must be finite: NaN or +-inf is an `InvalidArgument` naming the row and position.
//! * Output positions are strictly ascending per row: exactly the `keep_indptr` /
//!   `keep_positions` pair that `BlockAllocator::compact_batch` takes.
//!
//! Cost: O(n) per row. A 2048-bucket histogram of the top bits of an order-preserving key
//! finds the bucket that holds the k-th score; only that bucket's entries go through
//! `select_nth_unstable` (also O(n), so a bucket holding every score is still linear).

use crate::error::{try_reserve, KvError, Result};

/// Ascending keep positions per row: row `r` keeps `positions[indptr[r]..indptr[r+1]]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Csr {
    pub indptr: Vec<i64>,
    pub positions: Vec<i64>,
}

impl Csr {
    /// An empty CSR with zero rows.
    pub fn new() -> Self {
        Csr {
            indptr: vec![0],
            positions: Vec::new(),
        }
    }
    /// The number of rows.
    pub fn num_rows(&self) -> usize {
        self.indptr.len() - 1
    }
    /// Row `r`'s positions.
    pub fn row(&self, r: usize) -> &[i64] {
        &self.positions[self.indptr[r] as usize..self.indptr[r + 1] as usize]
    }
    fn close_row(&mut self) {
        self.indptr.push(self.positions.len() as i64);
    }
}

/// Tokens that are kept whatever their score (see the module docs for the priority).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForceKeep {
    /// The first `sinks` tokens (attention sinks).
    pub sinks: usize,
    /// The newest `window` tokens (recent window, Locret's stabilizers).
    pub window: usize,
    /// Half-open spans `[start, end)` protected by the caller; clipped to `n`.
    pub protected: Vec<(usize, usize)>,
}

impl ForceKeep {
    /// Sinks and window only.
    pub fn new(sinks: usize, window: usize) -> Self {
        ForceKeep {
            sinks,
            window,
            protected: Vec::new(),
        }
    }

    /// Marks up to `budget` forced tokens of a row of length `n` in `mark`, in priority
    /// order, and returns how many were marked.
    pub(crate) fn mark(&self, n: usize, budget: usize, mark: &mut [bool]) -> usize {
        let mut left = budget;
        let mut take = |i: usize, mark: &mut [bool]| {
            if left > 0 && !mark[i] {
                mark[i] = true;
                left -= 1;
            }
        };
        for i in 0..self.sinks.min(n) {
            take(i, mark);
        }
        for i in (n - self.window.min(n)..n).rev() {
            take(i, mark);
        }
        for &(s, e) in &self.protected {
            for i in s.min(n)..e.min(n) {
                take(i, mark);
            }
        }
        budget - left
    }

    /// Checks the spans.
    pub fn validate(&self) -> Result<()> {
        for &(s, e) in &self.protected {
            if s > e {
                return Err(KvError::InvalidArgument(format!(
                    "protected span [{s}, {e}) has start > end"
                )));
            }
        }
        Ok(())
    }
}

/// Maps a finite f32 to a u32 whose unsigned order is the float order (`-0.0` as `0.0`).
#[inline]
pub(crate) fn order_key(x: f32) -> u32 {
    let x = if x == 0.0 { 0.0 } else { x };
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The inverse of [`order_key`] (for keys of finite floats).
#[inline]
fn key_to_f32(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// Fails on the first non-finite score, naming its row and position.
pub fn check_finite(scores: &[f32], n: usize, what: &str) -> Result<()> {
    // A branch-free fold per chunk vectorizes; the position is searched only on failure.
    let all_finite = scores
        .chunks(256)
        .all(|c| c.iter().fold(true, |a, x| a & x.is_finite()));
    if all_finite {
        return Ok(());
    }
    if let Some(i) = scores.iter().position(|x| !x.is_finite()) {
        let (r, p) = i.checked_div(n).map_or((0, i), |r| (r, i % n));
        return Err(KvError::InvalidArgument(format!(
            "{what} must be finite: found {} at row {r}, position {p}",
            scores[i]
        )));
    }
    Ok(())
}

/// Reusable buffers, so that a batch allocates nothing per row.
#[derive(Default)]
pub(crate) struct Scratch {
    mark: Vec<bool>,
    hist: Vec<u32>,
    cand: Vec<u64>,
    /// Scratch of the sampled path; only ever grows.
    buf: Vec<u64>,
}

const BUCKET_SHIFT: u32 = 21; // 2^(32-21) = 2048 buckets
/// Rows with at least this many free entries try the sampled threshold first.
const SAMPLE_MIN_FREE: usize = 1024;
/// Sample size of the threshold estimate.
const SAMPLE_SIZE: usize = 1024;

impl Scratch {
    /// Marks, among the unmarked entries of `scores`, the `k` best by (score desc,
    /// position asc). `k` must not exceed the number of unmarked entries.
    pub(crate) fn mark_top(&mut self, scores: &[f32], mark: &mut [bool], k: usize, free: usize) {
        if k == 0 {
            return;
        }
        if k == free {
            mark.iter_mut().for_each(|m| *m = true);
            return;
        }
        if free >= SAMPLE_MIN_FREE && self.mark_top_sampled(scores, mark, k, free) {
            return;
        }
        self.hist.clear();
        self.hist.resize(1 << (32 - BUCKET_SHIFT), 0);
        for (i, &s) in scores.iter().enumerate() {
            if !mark[i] {
                self.hist[(order_key(s) >> BUCKET_SHIFT) as usize] += 1;
            }
        }
        // Walk down from the best bucket to the one that holds the k-th best score.
        let mut above = 0usize;
        let mut t = self.hist.len() - 1;
        loop {
            let c = self.hist[t] as usize;
            if above + c >= k {
                break;
            }
            above += c;
            t -= 1;
        }
        let need = k - above;
        self.cand.clear();
        for (i, &s) in scores.iter().enumerate() {
            if mark[i] {
                continue;
            }
            let key = order_key(s);
            let b = (key >> BUCKET_SHIFT) as usize;
            if b > t {
                mark[i] = true;
            } else if b == t {
                // Ascending u64 order = score descending, then position ascending.
                self.cand.push(((!key as u64) << 32) | i as u64);
            }
        }
        if need < self.cand.len() {
            self.cand.select_nth_unstable(need - 1);
        }
        for &c in &self.cand[..need] {
            mark[(c & 0xffff_ffff) as usize] = true;
        }
    }

    /// Fast path: estimates, from a strided sample, a threshold key that at least `k` unmarked
    /// entries reach, then one pass collects the entries at or above it and
    /// `select_nth_unstable` picks the exact top `k` among them. Every entry equal to the
    /// threshold is a candidate, so the result is the same as the exact method's. Returns
    /// false (nothing marked) when the sample underestimated and fewer than `k` qualify.
    fn mark_top_sampled(
        &mut self,
        scores: &[f32],
        mark: &mut [bool],
        k: usize,
        free: usize,
    ) -> bool {
        let n = scores.len();
        let stride = (n / SAMPLE_SIZE).max(1);
        self.cand.clear();
        let mut sample: Vec<u32> = Vec::with_capacity(SAMPLE_SIZE + 1);
        for i in (0..n).step_by(stride) {
            if !mark[i] {
                sample.push(order_key(scores[i]));
            }
        }
        let m = sample.len();
        if m < 64 {
            return false;
        }
        // Expected rank of the k-th best in the sample, plus a margin of ~3 sigma.
        let r = k as f64 * m as f64 / free as f64;
        let r_hi = (r + 3.0 * r.sqrt() + 8.0).ceil() as usize;
        if r_hi >= m {
            return false;
        }
        // The r_hi-th best sample key (0-based, descending).
        let (_, &mut thr, _) = sample.select_nth_unstable_by(r_hi, |a, b| b.cmp(a));
        // Branch-free compaction: every entry is written at `len`, and `len` advances only
        // for the qualifying ones (a data-dependent branch here mispredicts ~10% of the
        // time). The float comparison agrees with `order_key` on finite values (+-0 equal).
        let thr_f = key_to_f32(thr);
        if self.buf.len() < n + 1 {
            self.buf.resize(n + 1, 0); // grows only: no per-row memset
        }
        let buf = &mut self.buf[..n + 1];
        let mut len = 0usize;
        for (i, (&x, &m)) in scores.iter().zip(mark.iter()).enumerate() {
            buf[len] = ((!order_key(x) as u64) << 32) | i as u64;
            len += usize::from((x >= thr_f) & !m);
        }
        if len < k {
            return false;
        }
        let cand = &mut buf[..len];
        if k < len {
            cand.select_nth_unstable(k - 1);
        }
        for &c in &cand[..k] {
            mark[(c & 0xffff_ffff) as usize] = true;
        }
        true
    }

    /// Selects one row into `out` (forced tokens first, then the top scores).
    pub(crate) fn select_row(
        &mut self,
        scores: &[f32],
        budget: usize,
        force: &ForceKeep,
        out: &mut Csr,
    ) -> Result<()> {
        let n = scores.len();
        if budget >= n {
            try_reserve(&mut out.positions, n, "keep positions")?;
            out.positions.extend(0..n as i64);
            out.close_row();
            return Ok(());
        }
        let mut mark = std::mem::take(&mut self.mark);
        mark.clear();
        mark.resize(n, false);
        let forced = force.mark(n, budget, &mut mark);
        self.mark_top(scores, &mut mark, budget - forced, n - forced);
        self.mark = mark;
        try_reserve(&mut out.positions, budget, "keep positions")?;
        out.positions.extend(
            self.mark
                .iter()
                .enumerate()
                .filter(|(_, &m)| m)
                .map(|(i, _)| i as i64),
        );
        out.close_row();
        Ok(())
    }
}

/// Checks that `scores` is `num_rows * n` long and finite, and that there is one budget
/// per row.
pub(crate) fn check_rows(
    scores: &[f32],
    num_rows: usize,
    n: usize,
    budgets: &[usize],
) -> Result<()> {
    if num_rows.checked_mul(n) != Some(scores.len()) {
        return Err(KvError::InvalidArgument(format!(
            "scores must hold num_rows * n = {num_rows} * {n} values, got {}",
            scores.len()
        )));
    }
    if budgets.len() != num_rows {
        return Err(KvError::InvalidArgument(format!(
            "budgets must hold one entry per row ({num_rows}), got {}",
            budgets.len()
        )));
    }
    if n > u32::MAX as usize {
        return Err(KvError::InvalidArgument(format!(
            "n = {n} tokens is too large (at most 2**32 - 1)"
        )));
    }
    check_finite(scores, n, "scores")
}

/// Per-row top-k with force-keep ranges.
///
/// Args: `scores` is `(num_rows, n)` row-major; `budgets[r]` is row `r`'s number of kept
/// tokens (clipped to `n`).
///
/// Returns the kept positions of every row, ascending, as CSR.
pub fn select_topk(
    scores: &[f32],
    num_rows: usize,
    n: usize,
    budgets: &[usize],
    force: &ForceKeep,
) -> Result<Csr> {
    check_rows(scores, num_rows, n, budgets)?;
    force.validate()?;
    let mut out = Csr::new();
    try_reserve(&mut out.indptr, num_rows, "keep indptr")?;
    let mut s = Scratch::default();
    for (r, &b) in budgets.iter().enumerate() {
        s.select_row(&scores[r * n..(r + 1) * n], b, force, &mut out)?;
    }
    Ok(out)
}

/// [`select_topk`] with the rows split over `num_threads` scoped threads (1 = serial).
pub fn select_topk_parallel(
    scores: &[f32],
    num_rows: usize,
    n: usize,
    budgets: &[usize],
    force: &ForceKeep,
    num_threads: usize,
) -> Result<Csr> {
    let t = num_threads.max(1).min(num_rows.max(1));
    if t <= 1 {
        return select_topk(scores, num_rows, n, budgets, force);
    }
    check_rows(scores, num_rows, n, budgets)?;
    force.validate()?;
    let per = num_rows.div_ceil(t);
    let parts: Vec<Result<Csr>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..t)
            .map(|i| {
                let lo = (i * per).min(num_rows);
                let hi = ((i + 1) * per).min(num_rows);
                let sc_scores = &scores[lo * n..hi * n];
                let sc_budgets = &budgets[lo..hi];
                sc.spawn(move || select_topk(sc_scores, hi - lo, n, sc_budgets, force))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(KvError::InvariantViolation(
                        "selection thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut out = Csr::new();
    for p in parts {
        let p = p?;
        let base = out.positions.len() as i64;
        out.positions.extend_from_slice(&p.positions);
        out.indptr.extend(p.indptr[1..].iter().map(|&x| x + base));
    }
    Ok(out)
}

/// One index set per layer (TOVA): `scores` is `(num_layers, n)`; the layer's kept set is
/// repeated for each of its `num_heads` rows.
pub fn select_per_layer(
    scores: &[f32],
    num_layers: usize,
    num_heads: usize,
    n: usize,
    budgets: &[usize],
    force: &ForceKeep,
) -> Result<Csr> {
    let per_layer = select_topk(scores, num_layers, n, budgets, force)?;
    broadcast_rows(&per_layer, num_heads)
}

/// Repeats each row of `csr` `times` times.
pub fn broadcast_rows(csr: &Csr, times: usize) -> Result<Csr> {
    let mut out = Csr::new();
    try_reserve(
        &mut out.positions,
        csr.positions.len().saturating_mul(times),
        "keep positions",
    )?;
    for r in 0..csr.num_rows() {
        for _ in 0..times {
            out.positions.extend_from_slice(csr.row(r));
            out.close_row();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious reference: a full sort by (score desc, position asc).
    fn reference(scores: &[f32], budget: usize, force: &ForceKeep) -> Vec<i64> {
        let n = scores.len();
        if budget >= n {
            return (0..n as i64).collect();
        }
        let mut mark = vec![false; n];
        let f = force.mark(n, budget, &mut mark);
        let mut idx: Vec<usize> = (0..n).filter(|&i| !mark[i]).collect();
        idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
        for &i in &idx[..budget - f] {
            mark[i] = true;
        }
        (0..n).filter(|&i| mark[i]).map(|i| i as i64).collect()
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn matches_reference_on_random_rows_with_ties() {
        let mut seed = 7u64;
        for case in 0..400 {
            let n = (lcg(&mut seed) % 300) as usize;
            let levels = 1 + lcg(&mut seed) % 20; // few levels: many ties
            let scores: Vec<f32> = (0..n)
                .map(|_| (lcg(&mut seed) % levels) as f32 * 0.25 - 1.0)
                .collect();
            let budget = (lcg(&mut seed) % (n as u64 + 3)) as usize;
            let force = ForceKeep {
                sinks: (lcg(&mut seed) % 5) as usize,
                window: (lcg(&mut seed) % 9) as usize,
                protected: if case % 3 == 0 {
                    vec![(n / 3, n / 2)]
                } else {
                    vec![]
                },
            };
            let got = select_topk(&scores, 1, n, &[budget], &force).unwrap();
            assert_eq!(got.row(0), reference(&scores, budget, &force).as_slice());
            assert_eq!(got.row(0).len(), budget.min(n));
        }
    }

    #[test]
    fn wide_spread_scores_use_the_histogram_path() {
        let mut seed = 3u64;
        let n = 5000;
        let scores: Vec<f32> = (0..n)
            .map(|_| (lcg(&mut seed) as f32 / 2f32.powi(31) * 30.0).exp() - 50.0)
            .collect();
        let got = select_topk(&scores, 1, n, &[300], &ForceKeep::new(4, 16)).unwrap();
        assert_eq!(
            got.row(0),
            reference(&scores, 300, &ForceKeep::new(4, 16)).as_slice()
        );
        let par = select_topk_parallel(&scores, 1, n, &[300], &ForceKeep::new(4, 16), 2).unwrap();
        assert_eq!(par, got);
    }

    #[test]
    fn sampled_path_falls_back_when_the_sample_misleads() {
        // Every 8th entry (exactly the sampled ones) is high: the sample's threshold admits
        // only 1024 candidates for k = 2000, so the exact histogram path must take over.
        let n = 8192;
        let scores: Vec<f32> = (0..n)
            .map(|i| if i % 8 == 0 { 10.0 } else { (i % 7) as f32 })
            .collect();
        for k in [100, 1024, 2000, 5000] {
            let got = select_topk(&scores, 1, n, &[k], &ForceKeep::new(3, 5)).unwrap();
            assert_eq!(
                got.row(0),
                reference(&scores, k, &ForceKeep::new(3, 5)).as_slice()
            );
        }
    }

    #[test]
    fn budget_below_forced_keeps_sinks_then_newest() {
        let s = vec![0.0f32; 10];
        let got = select_topk(&s, 1, 10, &[5], &ForceKeep::new(2, 6)).unwrap();
        assert_eq!(got.row(0), &[0, 1, 7, 8, 9]);
        let got = select_topk(&s, 1, 10, &[1], &ForceKeep::new(2, 6)).unwrap();
        assert_eq!(got.row(0), &[0]);
    }

    #[test]
    fn negative_zero_ties_with_zero_and_lower_position_wins() {
        let s = [0.0f32, -0.0, 0.0, -0.0];
        let got = select_topk(&s, 1, 4, &[2], &ForceKeep::default()).unwrap();
        assert_eq!(got.row(0), &[0, 1]);
    }

    #[test]
    fn rejects_nan_inf_and_bad_shapes() {
        let e = select_topk(&[1.0, f32::NAN], 1, 2, &[1], &ForceKeep::default()).unwrap_err();
        assert!(e.to_string().contains("finite"), "{e}");
        let e = select_topk(&[1.0, f32::INFINITY], 1, 2, &[1], &ForceKeep::default());
        assert!(e.is_err());
        assert!(select_topk(&[1.0; 3], 2, 2, &[1, 1], &ForceKeep::default()).is_err());
        assert!(select_topk(&[1.0; 4], 2, 2, &[1], &ForceKeep::default()).is_err());
    }

    #[test]
    fn empty_inputs() {
        let got = select_topk(&[], 0, 5, &[], &ForceKeep::default()).unwrap();
        assert_eq!(got.indptr, vec![0]);
        let got = select_topk(&[], 3, 0, &[1, 2, 3], &ForceKeep::new(4, 4)).unwrap();
        assert_eq!(got.indptr, vec![0, 0, 0, 0]);
    }

    #[test]
    fn per_layer_broadcast() {
        let s = [3.0f32, 1.0, 2.0, 0.0, 1.0, 2.0];
        let got = select_per_layer(&s, 2, 2, 3, &[1, 2], &ForceKeep::default()).unwrap();
        assert_eq!(got.indptr, vec![0, 1, 2, 4, 6]);
        assert_eq!(got.positions, vec![0, 0, 1, 2, 1, 2]);
    }
}
