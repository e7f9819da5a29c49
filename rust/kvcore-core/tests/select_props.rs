//! Property tests of selection and budgets against obviously-right references.

use kvcore_core::select::{budget, select_topk, select_topk_parallel, ForceKeep};
use proptest::prelude::*;

/// Forced tokens in priority order, then a full sort by (score desc, position asc).
fn reference(scores: &[f32], budget: usize, f: &ForceKeep) -> Vec<i64> {
    let n = scores.len();
    if budget >= n {
        return (0..n as i64).collect();
    }
    let mut keep = vec![false; n];
    let mut left = budget;
    let order = (0..f.sinks.min(n))
        .chain((n - f.window.min(n)..n).rev())
        .chain(f.protected.iter().flat_map(|&(s, e)| s.min(n)..e.min(n)));
    for i in order {
        if left > 0 && !keep[i] {
            keep[i] = true;
            left -= 1;
        }
    }
    let mut rest: Vec<usize> = (0..n).filter(|&i| !keep[i]).collect();
    rest.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    for &i in &rest[..left] {
        keep[i] = true;
    }
    (0..n).filter(|&i| keep[i]).map(|i| i as i64).collect()
}

fn scores_strategy() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..4, 0usize..3000, 1i32..50).prop_flat_map(|(rows, n, levels)| {
        (
            Just(rows),
            Just(n),
            proptest::collection::vec((-levels..=levels).prop_map(|x| x as f32 * 0.5), rows * n),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn topk_matches_the_sort_reference(
        (rows, n, scores) in scores_strategy(),
        budget_frac in 0.0f64..1.2,
        sinks in 0usize..8,
        window in 0usize..40,
        span in proptest::option::of((0usize..3000, 0usize..50)),
    ) {
        let budget = (budget_frac * n as f64) as usize;
        let f = ForceKeep {
            sinks,
            window,
            protected: span.map(|(s, w)| vec![(s, s + w)]).unwrap_or_default(),
        };
        let budgets = vec![budget; rows];
        let got = select_topk(&scores, rows, n, &budgets, &f).unwrap();
        for r in 0..rows {
            let want = reference(&scores[r * n..(r + 1) * n], budget, &f);
            prop_assert_eq!(got.row(r), want.as_slice());
        }
        let par = select_topk_parallel(&scores, rows, n, &budgets, &f, 3).unwrap();
        prop_assert_eq!(par, got);
    }

    #[test]
    fn adakv_is_exact_and_consistent_with_topk(
        (heads, n, scores) in scores_strategy(),
        budget in 0usize..400,
        alpha in prop_oneof![Just(0.0), Just(0.2), Just(0.5), Just(1.0)],
        window in 0usize..40,
    ) {
        let f = ForceKeep::new(2, window);
        let (b, csr) = budget::adakv_select(&scores, 1, heads, n, budget, alpha, &f).unwrap();
        prop_assert_eq!(b.iter().sum::<usize>(), heads * budget.min(n));
        let again = select_topk(&scores, heads, n, &b, &f).unwrap();
        prop_assert_eq!(csr, again);
    }

    #[test]
    fn splits_are_exact_and_capped(
        total in 0usize..5000,
        rows in proptest::collection::vec((0.0f64..10.0, 0usize..400), 0..20),
    ) {
        let w: Vec<f64> = rows.iter().map(|r| r.0).collect();
        let caps: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let got = budget::split_exact(total, &w, &caps).unwrap();
        prop_assert_eq!(got.iter().sum::<usize>(), total.min(caps.iter().sum()));
        prop_assert!(got.iter().zip(&caps).all(|(g, c)| g <= c));
    }

    #[test]
    fn pyramid_is_exact_and_non_increasing(
        layers in 1usize..64, n in 0usize..100_000, c in 1usize..5000, wf in 0.0f64..1.0, beta in 1usize..40,
    ) {
        let w = (wf * c as f64) as usize;
        let b = budget::pyramid(layers, n, c, w, beta).unwrap();
        if n >= c {
            prop_assert_eq!(b.iter().sum::<usize>(), layers * c);
        }
        prop_assert!(b.windows(2).all(|p| p[0] >= p[1]));
        prop_assert!(b.iter().all(|&x| x <= n));
    }
}
