//! MiniCache cross-layer merging for one pair of adjacent layers `(a, b) = (l-1, l)` of one
//! kv-head: per token, store one SLERP direction shared by both layers plus each layer's
//! magnitude; keep the most distinct tokens verbatim (the retention set); restore per layer.
//!
//! ```text
//! m_a = |a_i|, m_b = |b_i|, u = a_i/m_a, v = b_i/m_b           (a zero row has u = 0)
//! W   = arccos(clamp(u.v, -1 + 1e-7, 1 - 1e-7))
//! e   = sin((1-t)W)/sin(W) u + sin(tW)/sin(W) v, normalised   (lerp when sin(W) < 1e-6)
//! retain the ceil(ratio * n) tokens with the largest W (lowest index first on ties)
//! restore: a'_i = e_i m_a, b'_i = e_i m_b, then the retained rows verbatim
//! ```
//!
//! So `|a_i - a'_i| <= m_a * t * W_i` and `|b_i - b'_i| <= m_b * (1 - t) * W_i` for every
//! token not retained (the direction lies on the arc between `u` and `v`), and retained
//! tokens are exact. Defaults from the KVCache-Factory port: `t = 0.6`, `ratio = 0.05`.
//! Which layers are paired ([`layer_pairs`]: the deeper half) is **unverified** (recalled).

use crate::error::{KvError, Result};

/// One merged layer pair.
#[derive(Debug, Clone, PartialEq)]
pub struct MiniCachePair {
    /// Tokens.
    pub num_tokens: usize,
    /// Channels.
    pub head_dim: usize,
    /// Shared unit directions, `num_tokens x head_dim`.
    pub direction: Vec<f32>,
    /// Per-token magnitudes of layer a.
    pub mag_a: Vec<f32>,
    /// Per-token magnitudes of layer b.
    pub mag_b: Vec<f32>,
    /// Retained token indices, increasing.
    pub retained: Vec<usize>,
    /// Layer a's retained rows, `len(retained) x head_dim`.
    pub retained_a: Vec<f32>,
    /// Layer b's retained rows.
    pub retained_b: Vec<f32>,
    /// Angle W of every token (radians).
    pub angle: Vec<f32>,
}

fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Merges layers `a` and `b` (`n x d` float32 each).
pub fn merge(
    a: &[f32],
    b: &[f32],
    d: usize,
    t: f64,
    retention_ratio: f64,
) -> Result<MiniCachePair> {
    if d == 0 || a.len() != b.len() || a.len() % d != 0 {
        return Err(KvError::InvalidArgument(format!(
            "both layers must be n x head_dim={d} (head_dim > 0), got {} and {} elements",
            a.len(),
            b.len()
        )));
    }
    if !(0.0..=1.0).contains(&t) || !(0.0..=1.0).contains(&retention_ratio) {
        return Err(KvError::InvalidArgument(format!(
            "t and retention_ratio must be in [0, 1], got t={t}, retention_ratio={retention_ratio}"
        )));
    }
    if let Some(i) = a.iter().chain(b).position(|v| !v.is_finite()) {
        return Err(KvError::InvalidArgument(format!(
            "layer {} contains a non-finite value at token {}",
            if i < a.len() { "a" } else { "b" },
            (i % a.len()) / d
        )));
    }
    let n = a.len() / d;
    let mut direction = vec![0.0f32; n * d];
    let (mut mag_a, mut mag_b, mut angle) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let mut u = vec![0.0f64; d];
    let mut v = vec![0.0f64; d];
    for i in 0..n {
        let (ra, rb) = (&a[i * d..(i + 1) * d], &b[i * d..(i + 1) * d]);
        let (ma, mb) = (norm(ra), norm(rb));
        for k in 0..d {
            u[k] = if ma > 0.0 { f64::from(ra[k]) / ma } else { 0.0 };
            v[k] = if mb > 0.0 { f64::from(rb[k]) / mb } else { 0.0 };
        }
        let dot: f64 = u.iter().zip(&v).map(|(x, y)| x * y).sum();
        let w = dot.clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos();
        let s = w.sin();
        let (ca, cb) = if s < 1e-6 {
            (1.0 - t, t)
        } else {
            (((1.0 - t) * w).sin() / s, (t * w).sin() / s)
        };
        let e: Vec<f64> = u.iter().zip(&v).map(|(x, y)| ca * x + cb * y).collect();
        let en = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        for k in 0..d {
            direction[i * d + k] = if en > 0.0 { (e[k] / en) as f32 } else { 0.0 };
        }
        mag_a[i] = ma as f32;
        mag_b[i] = mb as f32;
        angle[i] = w as f32;
    }
    let r = ((retention_ratio * n as f64).ceil() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| angle[y].total_cmp(&angle[x]).then(x.cmp(&y)));
    let mut retained = order[..r].to_vec();
    retained.sort_unstable();
    let retained_a = retained
        .iter()
        .flat_map(|&i| a[i * d..(i + 1) * d].iter().copied())
        .collect();
    let retained_b = retained
        .iter()
        .flat_map(|&i| b[i * d..(i + 1) * d].iter().copied())
        .collect();
    Ok(MiniCachePair {
        num_tokens: n,
        head_dim: d,
        direction,
        mag_a,
        mag_b,
        retained,
        retained_a,
        retained_b,
        angle,
    })
}

impl MiniCachePair {
    /// Restores layer a (`which = 0`) or b (`which = 1`) as `n x d` float32.
    pub fn restore(&self, which: usize) -> Result<Vec<f32>> {
        let (mag, kept) = match which {
            0 => (&self.mag_a, &self.retained_a),
            1 => (&self.mag_b, &self.retained_b),
            _ => {
                return Err(KvError::InvalidArgument(format!(
                    "which must be 0 (layer a) or 1 (layer b), got {which}"
                )))
            }
        };
        let d = self.head_dim;
        let mut out: Vec<f32> = self
            .direction
            .chunks_exact(d)
            .zip(mag)
            .flat_map(|(e, &m)| e.iter().map(move |&x| x * m))
            .collect();
        for (j, &i) in self.retained.iter().enumerate() {
            out[i * d..(i + 1) * d].copy_from_slice(&kept[j * d..(j + 1) * d]);
        }
        Ok(out)
    }

    /// Elements stored (direction, two magnitudes, retained rows of both layers and their
    /// indices) in place of the `2 n d` of two unmerged layers.
    pub fn num_stored_elements(&self) -> usize {
        self.direction.len()
            + 2 * self.num_tokens
            + self.retained_a.len()
            + self.retained_b.len()
            + self.retained.len()
    }
}

/// Adjacent layer pairs merged by MiniCache: `(l, l+1)` for `l = start, start+2, ...`, with
/// `start = num_layers / 2` by default (the deeper half; **unverified**, recalled).
///
/// Errors: `InvalidArgument` when the pairs cannot be allocated.
pub fn layer_pairs(num_layers: usize, start: Option<usize>) -> Result<Vec<(usize, usize)>> {
    let s = start.unwrap_or(num_layers / 2);
    let end = num_layers.saturating_sub(1);
    let mut out = Vec::new();
    crate::error::try_reserve(&mut out, end.saturating_sub(s).div_ceil(2), "num_layers")?;
    out.extend((s..end).step_by(2).map(|l| (l, l + 1)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_layers_restore_exactly_up_to_rounding() {
        let a: Vec<f32> = (0..40).map(|i| (i as f32 * 0.7).sin()).collect();
        let p = merge(&a, &a, 4, 0.6, 0.0).unwrap();
        for (x, y) in a.iter().zip(p.restore(0).unwrap()) {
            assert!((x - y).abs() < 1e-5);
        }
        assert_eq!(layer_pairs(32, None).unwrap().first(), Some(&(16, 17)));
        assert_eq!(layer_pairs(32, None).unwrap().len(), 8);
    }

    #[test]
    fn bound_and_retention() {
        let a: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..64).map(|i| (i as f32 * 0.41).cos()).collect();
        let p = merge(&a, &b, 8, 0.6, 0.25).unwrap();
        assert_eq!(p.retained.len(), 2);
        let ra = p.restore(0).unwrap();
        for i in 0..8 {
            let err: f32 = (0..8)
                .map(|k| (a[i * 8 + k] - ra[i * 8 + k]).powi(2))
                .sum::<f32>()
                .sqrt();
            let bound = p.mag_a[i] * 0.6 * p.angle[i] + 1e-5;
            if p.retained.contains(&i) {
                assert_eq!(err, 0.0);
            } else {
                assert!(err <= bound, "{err} {bound}");
            }
        }
        assert!(p.restore(2).is_err());
    }
}
