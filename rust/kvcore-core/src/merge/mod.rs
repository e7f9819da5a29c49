//! Merge bookkeeping: merge plans, per-slot mass that survives merges and compaction, the
//! log-count attention bias, and the plan builders of KVMerger, EMS, RazorAttention and CaM,
//! plus MiniCache's cross-layer SLERP store ([`minicache`]).
//!
//! A [`MergePlan`] is a list of entries `(src, dst, weight)` over the `n` slots of one
//! (layer, kv-head) stream. Applying it to rows `x` (keys or values):
//!
//! ```text
//! x'[d] = sum over entries (s, d, w) of  w * x[s]     for every slot d that is some dst
//! x'[r] = x[r]                                        for slots that are neither src nor dst
//! removed = slots that are a src but never a dst, plus plan.evicted (the "zero class")
//! ```
//!
//! `kept_positions()` lists the surviving slots in order, ready for the allocator's
//! order-preserving compaction. Every slot carries a *mass* (the number of original tokens it
//! stands for, 1 at first): a removed slot hands its mass to its destinations in proportion
//! to the entry weights, an evicted slot's mass leaves the book (`evicted_mass`), so
//! `total mass + evicted mass` is conserved across any sequence of plans and compactions.
//! `log_count_bias()` is `ln(mass)` per slot: added to a merged slot's attention logit it
//! lets the slot weigh as much as the tokens it replaced.

pub mod minicache;
pub mod plans;

use crate::error::{KvError, Result};

/// `(src, dst, weight)` entries plus the slots evicted without a destination.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergePlan {
    /// Number of slots the plan is over.
    pub num_slots: usize,
    /// Source slot of each entry.
    pub src: Vec<usize>,
    /// Destination slot of each entry.
    pub dst: Vec<usize>,
    /// Coefficient of each entry.
    pub weight: Vec<f32>,
    /// Slots dropped without merging (zero class), sorted.
    pub evicted: Vec<usize>,
}

impl MergePlan {
    /// An empty plan over `num_slots` slots (keeps everything).
    pub fn empty(num_slots: usize) -> Self {
        MergePlan {
            num_slots,
            ..Default::default()
        }
    }

    /// Checks lengths and ranges and that no slot is both evicted and a destination.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_slots;
        if self.src.len() != self.dst.len() || self.src.len() != self.weight.len() {
            return Err(KvError::InvalidArgument(format!(
                "a merge plan needs src, dst and weight of one length, got {}, {} and {}",
                self.src.len(),
                self.dst.len(),
                self.weight.len()
            )));
        }
        for (what, v) in [
            ("src", &self.src),
            ("dst", &self.dst),
            ("evicted", &self.evicted),
        ] {
            if let Some(&s) = v.iter().find(|&&s| s >= n) {
                return Err(KvError::InvalidArgument(format!(
                    "merge plan {what} slot {s} is out of range for {n} slots"
                )));
            }
        }
        if let Some(w) = self.weight.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(KvError::InvalidArgument(format!(
                "merge weights must be finite and non-negative, got {w}"
            )));
        }
        let is_dst = self.dst_mask();
        if let Some(&e) = self.evicted.iter().find(|&&e| is_dst[e]) {
            return Err(KvError::InvalidArgument(format!(
                "slot {e} is both evicted and a merge destination"
            )));
        }
        Ok(())
    }

    fn dst_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.num_slots];
        for &d in &self.dst {
            m[d] = true;
        }
        m
    }

    /// Mask of the slots that survive the plan.
    pub fn keep_mask(&self) -> Vec<bool> {
        let is_dst = self.dst_mask();
        let mut keep = vec![true; self.num_slots];
        for &s in &self.src {
            if !is_dst[s] {
                keep[s] = false;
            }
        }
        for &e in &self.evicted {
            keep[e] = false;
        }
        keep
    }

    /// The surviving slots in increasing order (the allocator's compaction input).
    pub fn kept_positions(&self) -> Vec<usize> {
        self.keep_mask()
            .iter()
            .enumerate()
            .filter_map(|(i, &k)| k.then_some(i))
            .collect()
    }

    /// Applies the plan to rows `x` (`num_slots x dim`, row-major) in float32 and returns the
    /// new rows (removed rows are left unchanged; compact with `kept_positions`).
    /// Entries are summed in plan order.
    pub fn apply(&self, x: &[f32], dim: usize) -> Result<Vec<f32>> {
        self.validate()?;
        if x.len() != self.num_slots * dim {
            return Err(KvError::InvalidArgument(format!(
                "rows must be num_slots={} x dim={dim}, got {} elements",
                self.num_slots,
                x.len()
            )));
        }
        let mut out = x.to_vec();
        let is_dst = self.dst_mask();
        for (d, _) in is_dst.iter().enumerate().filter(|(_, &m)| m) {
            out[d * dim..(d + 1) * dim].fill(0.0);
        }
        for ((&s, &d), &w) in self.src.iter().zip(&self.dst).zip(&self.weight) {
            let (src, dst) = (&x[s * dim..(s + 1) * dim], d * dim);
            for (o, &v) in out[dst..dst + dim].iter_mut().zip(src) {
                *o += w * v;
            }
        }
        Ok(out)
    }
}

/// Per-slot mass of one stream, kept in step with merges and compaction.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeBook {
    mass: Vec<f64>,
    evicted_mass: f64,
}

impl MergeBook {
    /// `num_slots` unmerged slots of mass 1.
    pub fn new(num_slots: usize) -> Self {
        MergeBook {
            mass: vec![1.0; num_slots],
            evicted_mass: 0.0,
        }
    }

    /// Like [`MergeBook::new`], with an error instead of an abort when `num_slots` is too
    /// large to allocate (sizes coming from a caller).
    pub fn try_new(num_slots: usize) -> Result<Self> {
        let mut mass = Vec::new();
        crate::error::try_reserve(&mut mass, num_slots, "num_slots")?;
        mass.resize(num_slots, 1.0);
        Ok(MergeBook {
            mass,
            evicted_mass: 0.0,
        })
    }

    /// Appends `n` new unmerged slots; an error (nothing changed) if they cannot be allocated.
    pub fn extend(&mut self, n: usize) -> Result<()> {
        crate::error::try_reserve(&mut self.mass, n, "n")?;
        self.mass.extend(std::iter::repeat_n(1.0, n));
        Ok(())
    }

    /// Mass of every slot.
    pub fn mass(&self) -> &[f64] {
        &self.mass
    }
    /// Mass that left through evictions (the zero class).
    pub fn evicted_mass(&self) -> f64 {
        self.evicted_mass
    }
    /// Sum of the slots' mass.
    pub fn total_mass(&self) -> f64 {
        self.mass.iter().sum()
    }

    /// `ln(mass)` per slot (0 for an unmerged slot), as float32 logit biases.
    pub fn log_count_bias(&self) -> Vec<f32> {
        self.mass.iter().map(|m| m.ln() as f32).collect()
    }

    /// Moves mass as `plan` moves rows, then compacts to the surviving slots. Returns the
    /// kept positions (the same compaction the caller applies to its K/V and block tables).
    pub fn apply(&mut self, plan: &MergePlan) -> Result<Vec<usize>> {
        plan.validate()?;
        if plan.num_slots != self.mass.len() {
            return Err(KvError::InvalidArgument(format!(
                "the plan is over {} slots but the book has {}",
                plan.num_slots,
                self.mass.len()
            )));
        }
        let keep = plan.keep_mask();
        // Total outgoing weight of each removed source.
        let mut out_w = vec![0.0f64; self.mass.len()];
        for (&s, &w) in plan.src.iter().zip(&plan.weight) {
            if !keep[s] {
                out_w[s] += f64::from(w);
            }
        }
        let mut mass = self.mass.clone();
        let mut evicted = self.evicted_mass;
        for (s, m) in self.mass.iter().enumerate() {
            if !keep[s] {
                mass[s] = 0.0;
                if out_w[s] == 0.0 {
                    evicted += m;
                }
            }
        }
        for ((&s, &d), &w) in plan.src.iter().zip(&plan.dst).zip(&plan.weight) {
            if !keep[s] && out_w[s] > 0.0 {
                mass[d] += self.mass[s] * f64::from(w) / out_w[s];
            }
        }
        let kept = plan.kept_positions();
        self.mass = kept.iter().map(|&i| mass[i]).collect();
        self.evicted_mass = evicted;
        Ok(kept)
    }

    /// Keeps only `positions` (strictly increasing), e.g. after a plain eviction; the mass of
    /// the dropped slots counts as evicted.
    pub fn compact(&mut self, positions: &[usize]) -> Result<()> {
        if let Some(w) = positions.windows(2).find(|w| w[0] >= w[1]) {
            return Err(KvError::InvalidPositions(format!(
                "keep positions must be strictly increasing, got {} then {}",
                w[0], w[1]
            )));
        }
        if let Some(&p) = positions.last().filter(|&&p| p >= self.mass.len()) {
            return Err(KvError::InvalidPositions(format!(
                "keep position {p} is out of range for {} slots",
                self.mass.len()
            )));
        }
        let kept: f64 = positions.iter().map(|&p| self.mass[p]).sum();
        self.evicted_mass += self.total_mass() - kept;
        self.mass = positions.iter().map(|&p| self.mass[p]).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_apply_and_mass() {
        // slots 0..5: merge 1,2 into 1 (w .5 each), evict 3, spread 4 into 0 and 5.
        let plan = MergePlan {
            num_slots: 6,
            src: vec![1, 2, 4, 4, 0, 5],
            dst: vec![1, 1, 0, 5, 0, 5],
            weight: vec![0.5, 0.5, 0.25, 0.75, 1.0, 1.0],
            evicted: vec![3],
        };
        assert_eq!(plan.kept_positions(), vec![0, 1, 5]);
        let x: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let y = plan.apply(&x, 1).unwrap();
        assert_eq!((y[0], y[1], y[5]), (1.0, 1.5, 8.0));
        let mut b = MergeBook::new(6);
        assert_eq!(b.apply(&plan).unwrap(), vec![0, 1, 5]);
        assert_eq!(b.mass(), &[1.25, 2.0, 1.75]);
        assert_eq!(b.evicted_mass(), 1.0);
        assert_eq!(b.total_mass() + b.evicted_mass(), 6.0);
        b.compact(&[1, 2]).unwrap();
        assert_eq!(b.mass(), &[2.0, 1.75]);
        assert_eq!(b.total_mass() + b.evicted_mass(), 6.0);
        assert!((b.log_count_bias()[0] - 2f32.ln()).abs() < 1e-7);
        assert!(b.compact(&[1, 1]).is_err());
    }

    #[test]
    fn bad_plans() {
        let mut p = MergePlan::empty(3);
        p.src = vec![0];
        assert!(p.validate().is_err());
        p.dst = vec![5];
        p.weight = vec![1.0];
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        p.dst = vec![1];
        p.evicted = vec![1];
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("both evicted"));
    }
}
