//! A fixed allocator workload for instruction-count profiling (callgrind / cachegrind):
//! admission waves (adopt + prefill with ids), decode steps with ids, and frees, on a pool
//! that stays full of cached blocks (every pop evicts), like `bench/alloc_trace.py`'s trace.
//!
//! ```text
//! cargo build --release -p kvcore-core --example alloc_profile
//! valgrind --tool=cachegrind --cache-sim=yes target/release/examples/alloc_profile
//! ```
//!
//! Instruction counts are deterministic, so they compare two builds on a loaded machine
//! where timings cannot.

use kvcore_core::{BatchAppend, BlockAllocator, BlockKeys, TableId};

fn main() {
    let bs = 16usize;
    let mut a = BlockAllocator::new(6144, bs).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // 8 shared system prompts of 384 tokens.
    let system: Vec<Vec<i64>> = (0..8)
        .map(|s| (0..384).map(|i| s * 100_000 + i).collect())
        .collect();
    let mut running: Vec<(TableId, usize)> = Vec::new();
    let mut out = BatchAppend::default();
    let mut hits = Vec::new();
    let mut ids = Vec::new();
    let mut sampled = Vec::new();
    let mut tok = 1_000_000i64;
    for _step in 0..3000 {
        // Admission: two requests when there is room.
        if running.len() < 200 && a.num_available_blocks() > 400 {
            ids.clear();
            a.create_tables(2, &mut ids).unwrap();
            let mut flat = Vec::new();
            let mut indptr = vec![0i64];
            let mut prompts = Vec::new();
            for _ in 0..2 {
                let mut p = system[(next() % 8) as usize].clone();
                let user = 64 + (next() % 256) as usize;
                p.extend((0..user).map(|_| (next() % 32_000) as i64));
                flat.extend_from_slice(&p[..p.len() - 1]);
                indptr.push(flat.len() as i64);
                prompts.push(p);
            }
            hits.clear();
            a.adopt_prefix_batch(&ids, &indptr, BlockKeys::Tokens(&flat), None, &mut hits)
                .unwrap();
            let mut rest = Vec::new();
            let mut counts = Vec::new();
            for (p, &h) in prompts.iter().zip(&hits) {
                rest.extend_from_slice(&p[h as usize..]);
                counts.push(p.len() - h as usize);
            }
            out.clear();
            a.append_batch_with(&ids, &counts, Some(&rest), &mut out)
                .unwrap();
            for &t in &ids {
                running.push((t, 32 + (next() % 160) as usize));
            }
        }
        // Decode step.
        let batch: Vec<TableId> = running.iter().map(|r| r.0).collect();
        sampled.clear();
        sampled.extend((0..batch.len()).map(|_| {
            tok += 1;
            tok
        }));
        out.clear();
        if a.append_batch_same(&batch, 1, Some(&sampled), &mut out)
            .is_err()
        {
            let (t, _) = running.pop().unwrap();
            a.free(t).unwrap();
            continue;
        }
        // Finished requests free their tables.
        running.retain_mut(|r| {
            r.1 -= 1;
            if r.1 == 0 {
                a.free(r.0).unwrap();
                false
            } else {
                true
            }
        });
    }
    println!(
        "tables {} available {} cached {}",
        running.len(),
        a.num_available_blocks(),
        a.stats().num_cached_blocks
    );
}
