//! Criterion benchmarks of the core allocator, without Python in the way.
//!
//! `cargo bench -p kvcore-core --bench allocator` (release profile). The Python-side
//! benchmark with the pure-Python baseline is `bench/bench_allocator.py`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use kvcore_core::{BatchAppend, BlockAllocator, BlockKeys, CompactionPlan, Keep, TableId};

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

/// A running batch of `batch` tables for steady-state decode steps (see `append`).
struct DecodeBatch {
    a: BlockAllocator,
    ids: Vec<TableId>,
    counts: Vec<usize>,
    sampled: Vec<i64>,
    with_ids: bool,
    step: i64,
    out: BatchAppend,
}

impl DecodeBatch {
    fn new(batch: usize, with_ids: bool) -> Self {
        let mut run = DecodeBatch {
            a: BlockAllocator::new(batch * 200 + 1, BLOCK_SIZE).unwrap(),
            ids: Vec::new(),
            counts: vec![1; batch],
            sampled: vec![0; batch],
            with_ids,
            step: 0,
            out: BatchAppend::default(),
        };
        run.rebuild();
        run
    }

    /// Frees the batch and starts it again: table `i` holds a prompt of `100 + 37 * i % 1000`
    /// distinct tokens, registered as it is appended.
    fn rebuild(&mut self) {
        let (a, out) = (&mut self.a, &mut self.out);
        a.free_batch(&self.ids).unwrap();
        self.ids.clear();
        a.create_tables(self.counts.len(), &mut self.ids).unwrap();
        let lens: Vec<usize> = (0..self.ids.len()).map(|i| 100 + 37 * i % 1000).collect();
        let prompt: Vec<i64> = (0..lens.iter().sum::<usize>() as i64).collect();
        out.clear();
        a.append_batch_with(&self.ids, &lens, Some(&prompt), out)
            .unwrap();
    }

    fn step(&mut self) -> usize {
        if self.a.num_available_blocks() < 2 * self.ids.len() {
            self.rebuild();
        }
        self.step += 1;
        for (i, s) in self.sampled.iter_mut().enumerate() {
            *s = self.step * 7 + i as i64;
        }
        let tokens = self.with_ids.then_some(&self.sampled[..]);
        self.out.clear();
        self.a
            .append_batch_with(&self.ids, &self.counts, tokens, &mut self.out)
            .unwrap();
        self.out.slots.len()
    }
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
    // A decode step over a running batch in steady state: one token to each of `batch`
    // tables of different lengths (their last blocks fill at different steps). When the pool
    // runs low every table is freed and the batch rebuilt (about once per 2,500 steps).
    for batch in [32usize, 256] {
        g.bench_with_input(
            BenchmarkId::new("decode_step", batch),
            &batch,
            |b, &batch| {
                let mut run = DecodeBatch::new(batch, false);
                b.iter(|| black_box(run.step()));
            },
        );
    }
    // The engine's decode step: the same, passing the sampled ids, so every block that fills
    // is hashed and registered (one row in 16 per step here).
    g.bench_function(BenchmarkId::new("decode_step_with_ids", 256), |b| {
        let mut run = DecodeBatch::new(256, true);
        b.iter(|| black_box(run.step()));
    });
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

/// Admission of a wave of 4 requests of 512 tokens sharing a 256-token system prompt: one
/// `adopt_prefix_batch` (16 cached blocks hit per request) then one `append_batch_with` of the
/// missed tokens, which registers their full blocks; and the same wave as one `admit_batch`.
fn admission(c: &mut Criterion) {
    let system: Vec<i64> = (0..256).collect();
    let prompts: Vec<Vec<i64>> = (0..4i64)
        .map(|r| {
            system
                .iter()
                .copied()
                .chain((0..256).map(|i| 1_000 * (r + 1) + i))
                .collect()
        })
        .collect();
    let flat: Vec<i64> = prompts.concat();
    let indptr: Vec<i64> = (0..=4).map(|i| i * 512).collect();
    let mut hits = Vec::new();
    let mut out = BatchAppend::default();
    c.bench_function("admission_wave_4x512", |b| {
        b.iter_batched_ref(
            || {
                let (mut a, ids) = with_tables(1024, 1, system.len());
                a.register_prefix(ids[0], &system, None).unwrap();
                let mut wave = Vec::new();
                a.create_tables(4, &mut wave).unwrap();
                (a, wave)
            },
            |(a, wave)| {
                hits.clear();
                out.clear();
                a.adopt_prefix_batch(wave, &indptr, BlockKeys::Tokens(&flat), None, &mut hits)
                    .unwrap();
                let counts: Vec<usize> = hits.iter().map(|&h| 512 - h as usize).collect();
                let rest: Vec<i64> = prompts
                    .iter()
                    .zip(&hits)
                    .flat_map(|(p, &h)| p[h as usize..].iter().copied())
                    .collect();
                a.append_batch_with(wave, &counts, Some(&rest), &mut out)
                    .unwrap();
                black_box(out.num_registered)
            },
            BatchSize::LargeInput,
        );
    });
    // The same wave in the engine's one call: `admit_batch` creates the 4 tables, adopts
    // (each prompt but its last token: 16 blocks hit per request) and appends the rest.
    let mut tables = Vec::new();
    c.bench_function("admit_batch_4x512", |b| {
        b.iter_batched_ref(
            || {
                let (mut a, ids) = with_tables(1024, 1, system.len());
                a.register_prefix(ids[0], &system, None).unwrap();
                a
            },
            |a| {
                tables.clear();
                hits.clear();
                out.clear();
                a.admit_batch(&indptr, &flat, None, &mut tables, &mut hits, &mut out)
                    .unwrap();
                black_box(out.num_registered)
            },
            BatchSize::LargeInput,
        );
    });
}

criterion_group!(benches, append, fork_free, compact, prefix, admission);
criterion_main!(benches);
