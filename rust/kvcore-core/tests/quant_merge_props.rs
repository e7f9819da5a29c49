//! Property tests for the quantization codec and the merge book.
//!
//! * Every layout round-trips within `scale / 2` plus metadata rounding, and re-quantizing
//!   the reconstruction gives the same bytes (the codec is idempotent on its own output
//!   when the metadata is float32).
//! * `KiviCache` holds exactly `kivi_nbytes` bytes however the tokens are split.
//! * A random sequence of plans and compactions conserves `total mass + evicted mass`.

use kvcore_core::merge::{plans, MergeBook};
use kvcore_core::quant::{
    dequantize, group_scale_zero, kivi_nbytes, quantize, GroupAxis, Input, KiviCache, MetaDtype,
    QuantLayout,
};
use proptest::prelude::*;

fn layout_strategy() -> impl Strategy<Value = QuantLayout> {
    (
        prop_oneof![Just(2u32), Just(4), Just(8)],
        prop_oneof![Just(4usize), Just(8), Just(16)],
        prop_oneof![Just(GroupAxis::Channel), Just(GroupAxis::Token)],
        prop_oneof![Just(MetaDtype::F16), Just(MetaDtype::F32)],
        1usize..4,
        1usize..4,
    )
        .prop_map(|(bits, g, axis, meta, a, b)| {
            let (t, d) = match axis {
                GroupAxis::Channel => (a, g * b),
                GroupAxis::Token => (g * a, b),
            };
            QuantLayout::new(bits, g, axis, meta, t, d).unwrap()
        })
}

fn group_of(l: &QuantLayout, t: usize, c: usize) -> usize {
    match l.axis() {
        GroupAxis::Channel => t * (l.head_dim() / l.group_size()) + c / l.group_size(),
        GroupAxis::Token => (t / l.group_size()) * l.head_dim() + c,
    }
}

fn half_ulp(v: f32, meta: MetaDtype) -> f32 {
    match meta {
        MetaDtype::F32 => 0.0,
        // fp16 has 11 significant bits; subnormal spacing is 2^-24
        MetaDtype::F16 => (v.abs() * (1.0 / 2048.0)).max(2f32.powi(-25)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_within_bound(l in layout_strategy(), seed in any::<u64>(), scale in prop_oneof![Just(1e-3f32), Just(1.0), Just(1e3)]) {
        let n = l.num_elements();
        let mut s = seed | 1;
        let x: Vec<f32> = (0..n).map(|_| {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        }).collect();
        let buf = quantize(Input::F32(&x), &l).unwrap();
        prop_assert_eq!(buf.len(), l.nbytes());
        let y = dequantize(&buf, &l).unwrap();
        let qmax = l.qmax() as f32;
        for t in 0..l.num_tokens() {
            for c in 0..l.head_dim() {
                let i = t * l.head_dim() + c;
                let (sc, z) = group_scale_zero(&buf, &l, group_of(&l, t, c));
                let bound = sc / 2.0 + half_ulp(z, l.meta()) + qmax * half_ulp(sc, l.meta())
                    + 4.0 * f32::EPSILON * (x[i].abs() + z.abs());
                prop_assert!((x[i] - y[i]).abs() <= bound, "x {} y {} bound {}", x[i], y[i], bound);
            }
        }
        if l.meta() == MetaDtype::F32 {
            // codes of the reconstruction are the same codes (scale and zero may differ by
            // float rounding, so compare the reconstructions, not the bytes)
            let y2 = dequantize(&quantize(Input::F32(&y), &l).unwrap(), &l).unwrap();
            for (a, b) in y.iter().zip(&y2) {
                prop_assert!((a - b).abs() <= 1e-5 * scale.max(1.0));
            }
        }
    }

    #[test]
    fn kivi_bytes_are_exact(n in 0usize..150, cut in 0usize..150, bits in prop_oneof![Just(2u32), Just(4), Just(8)]) {
        let d = 16;
        let mut c = KiviCache::new(d, bits, 8, 16, MetaDtype::F16).unwrap();
        let x: Vec<f32> = (0..n * d).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let cut = cut.min(n);
        c.append(&x[..cut * d], &x[..cut * d]).unwrap();
        c.append(&x[cut * d..], &x[cut * d..]).unwrap();
        prop_assert_eq!(c.nbytes(), kivi_nbytes(n, d, bits, 8, 16, MetaDtype::F16).unwrap());
        prop_assert_eq!(c.num_quantized_keys(), n / 16 * 16);
        prop_assert_eq!(c.num_quantized_values(), n.saturating_sub(16));
    }

    #[test]
    fn mass_is_conserved(seed in any::<u64>(), steps in 1usize..6) {
        let d = 4;
        let mut n = 40usize;
        let mut s = seed | 1;
        let mut next = move || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let mut book = MergeBook::new(n);
        let mut total = n as f64;
        for step in 0..steps {
            let keys: Vec<f32> = (0..n * d).map(|_| (next() % 5) as f32 - 2.0).collect();
            let attn: Vec<f32> = (0..n).map(|_| (next() % 100) as f32 / 100.0).collect();
            let plan = match step % 4 {
                0 => plans::kvmerger(&keys, &attn, d, 0.8, None, n).unwrap(),
                1 => {
                    let ret: Vec<usize> = (0..n).filter(|i| i % 3 == 0).collect();
                    plans::ems(&keys, &attn, d, &ret, 0.2).unwrap()
                }
                2 => plans::razor(n, 2, (n / 2).max(4)).unwrap(),
                _ => {
                    let ev: Vec<usize> = (0..n).filter(|i| i % 4 == 1).collect();
                    let draws: Vec<f32> = ev.iter().map(|_| (next() % 100) as f32 / 100.0).collect();
                    plans::cam(&attn, &ev, &draws, 3).unwrap()
                }
            };
            let kept = book.apply(&plan).unwrap();
            prop_assert_eq!(kept.len(), book.mass().len());
            prop_assert!((book.total_mass() + book.evicted_mass() - total).abs() < 1e-9 * total);
            let keep: Vec<usize> = (0..kept.len()).filter(|i| i % 5 != 4).collect();
            book.compact(&keep).unwrap();
            prop_assert!((book.total_mass() + book.evicted_mass() - total).abs() < 1e-9 * total);
            book.extend(7).unwrap();
            total += 7.0;
            n = book.mass().len();
        }
    }
}
