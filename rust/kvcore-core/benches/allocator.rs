//! Criterion benchmarks of the core allocator, without Python in the way.
//!
//! `cargo bench -p kvcore-core --bench allocator` (release profile). The Python-side
//! benchmark with the pure-Python baseline is `bench/bench_allocator.py`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use kvcore_core::{BlockAllocator, CompactionPlan, Keep, TableId};

const BLOCK_SIZE: usize = 16;

/// An allocator with `n` tables of `prompt` tokens each.
fn with_tables(num_blocks: usize, n: usize, prompt: usize) -> (BlockAllocator, Vec<TableId>) {
    let mut a = BlockAllocator::new(num_blocks, BLOCK_SIZE).unwrap();
    let mut ids = Vec::new();
    a.create_tables(n, &mut ids).unwrap();
    let mut out = Vec::new();
    for &t in &ids {
        out.clear();
        a.append(t, prompt, &mut out).unwrap();
    }
    (a, ids)
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    // One token to one table; the table is freed and recreated when the pool runs low, so
    // the measured call is the steady-state decode append.
    g.bench_function("single_token", |b| {
        let (mut a, ids) = with_tables(1 << 16, 1, 0);
        let mut t = ids[0];
        let mut out = Vec::with_capacity(16);
        b.iter(|| {
            if a.num_available_blocks() < 2 {
                a.free(t).unwrap();
                t = a.create_table().unwrap();
            }
            out.clear();
            black_box(a.append(t, 1, &mut out).unwrap());
        });
    });
    // A decode step over a running batch: one token to each of `batch` tables.
    for batch in [32usize, 256] {
        g.bench_with_input(
            BenchmarkId::new("decode_step", batch),
            &batch,
            |b, &batch| {
                let counts = vec![1usize; batch];
                let (mut slots, mut indptr, mut cs, mut cd) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                b.iter_batched_ref(
                    || with_tables(batch * 64 + 1, batch, 100),
                    |(a, ids)| {
                        // 32 steps per setup keeps the pool from running dry.
                        for _ in 0..32 {
                            slots.clear();
                            indptr.clear();
                            a.append_batch(ids, &counts, &mut slots, &mut indptr, &mut cs, &mut cd)
                                .unwrap();
                        }
                        black_box(slots.len());
                    },
                    BatchSize::LargeInput,
                );
            },
        );
    }
    g.finish();
}

fn fork_free(c: &mut Criterion) {
    c.bench_function("fork_then_free_2k_tokens", |b| {
        let (mut a, ids) = with_tables(1024, 1, 2048);
        b.iter(|| {
            let child = a.fork(ids[0]).unwrap();
            a.free(black_box(child)).unwrap();
        });
    });
}

fn compact(c: &mut Criterion) {
    let mut g = c.benchmark_group("compact");
    for n in [1024usize, 32768] {
        // Keep every fourth token plus the last 64: a typical eviction shape.
        let keep: Vec<i64> = (0..n as i64)
            .filter(|&p| p % 4 == 0 || p >= n as i64 - 64)
            .collect();
        g.bench_with_input(BenchmarkId::new("keep_quarter", n), &n, |b, &n| {
            let mut plan = CompactionPlan::default();
            b.iter_batched_ref(
                || with_tables(n / BLOCK_SIZE + 8, 1, n),
                |(a, ids)| {
                    plan.clear();
                    a.compact(ids[0], Keep::Positions(&keep), &mut plan)
                        .unwrap();
                    black_box(plan.len());
                },
                BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

fn prefix(c: &mut Criterion) {
    let tokens: Vec<i64> = (0..2048).map(|i| (i * 7919) % 50_000).collect();
    c.bench_function("adopt_prefix_2k_hit", |b| {
        let (mut a, ids) = with_tables(1024, 1, tokens.len());
        a.register_prefix(ids[0], &tokens, None).unwrap();
        b.iter(|| {
            let t = a.create_table().unwrap();
            let hit = a
                .adopt_prefix(t, &tokens[..tokens.len() - 1], None)
                .unwrap();
            a.free(t).unwrap();
            black_box(hit)
        });
    });
}

criterion_group!(benches, append, fork_free, compact, prefix);
criterion_main!(benches);
