//! Model-based property test of [`BlockAllocator`].
//!
//! Random operation sequences run against the allocator and against a naive model that does
//! not predict block ids: it only knows, per live table, the token values the table must hold.
//! Physical K/V memory is simulated as one `i64` per slot (`num_blocks * block_size`):
//! appends write each token's value into its returned slot, copy-on-write instructions copy
//! whole blocks, and compaction plans are applied (both sequentially and as one gather
//! followed by one scatter, which must agree). After every step:
//!
//! * `check_invariants()` passes;
//! * reading memory at `slots(table)` gives exactly the model's tokens, for every live table
//!   (this catches wrong plans, missed copies on write, writes into shared blocks, and prefix
//!   hits on blocks whose contents are not the adopted token ids);
//! * stats, ref counts (recounted from the block tables), the free queue and the exported
//!   page tables all agree with the block tables.
//!
//! A call that fails must leave the allocator exactly as it was, and `OutOfBlocks` must
//! happen exactly when the request needs more blocks than `num_available_blocks()`.
//!
//! Pools are tiny (2..24 blocks of 1..=8 slots) so running out of blocks, evicting cached
//! blocks and sharing blocks are all frequent. `PROPTEST_CASES` overrides the case count.

// Test code: the op handlers mirror the API's argument lists and index parallel per-block
// arrays by block id, which reads more plainly than the iterator forms clippy suggests.
#![allow(
    clippy::type_complexity,
    clippy::too_many_arguments,
    clippy::needless_range_loop
)]

use std::collections::{HashMap, HashSet};

use kvcore_core::{
    AllocatorStats, BatchAppend, BlockAllocator, BlockId, BlockKeys, CompactionPlan, Keep, KvError,
    TableId, NULL_BLOCK,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Default number of cases; `PROPTEST_CASES` overrides it.
const DEFAULT_CASES: u32 = 2048;
/// Longest generated operation sequence.
const MAX_STEPS: usize = 80;
/// Pre-existing entry in output buffers: calls must append after it and never touch it.
const SENTINEL: i64 = -7;
/// First value handed to a "fresh" token; pattern tokens use their position instead.
const FIRST_FRESH_VALUE: i64 = 1_000_000;

type Res<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!("{}: {:?} != {:?}", format!($($arg)+), l, r));
        }
    }};
}

/// Salt number -> salt bytes. `Some(b"")` must differ from `None`.
fn salt_bytes(salt: u8) -> Option<&'static [u8]> {
    match salt % 3 {
        0 => None,
        1 => Some(&b"lora-a"[..]),
        _ => Some(&b""[..]),
    }
}

fn err_str<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what} failed: {e:?}")
}

// ----------------------------------------------------------------------------------------
// Operations
// ----------------------------------------------------------------------------------------

/// How many tokens an append asks for.
#[derive(Clone, Copy, Debug)]
enum Count {
    /// `n % (2 * block_size + 1)`: 0 up to two blocks' worth.
    Small(usize),
    /// `usize::MAX`: the length overflows.
    Max,
    /// `usize::MAX - num_tokens`: no overflow, but far too many blocks.
    MaxMinusLen,
    /// Exactly what the available blocks can hold.
    JustFits,
    /// One token more than `JustFits`.
    OneTooMany,
}

/// Which positions a compaction keeps, resolved against the table's length at replay time.
#[derive(Clone, Debug)]
enum KeepSpec {
    All,
    Nothing,
    Prefix(usize),
    Suffix(usize),
    DropOne(usize),
    /// Keeps position `i` when `bits[i % bits.len()]`.
    Pattern(Vec<bool>),
}

/// Invalid keep arguments; all must fail with `InvalidPositions`.
#[derive(Clone, Copy, Debug)]
enum BadKeep {
    OutOfRange,
    Negative,
    Duplicate,
    Unsorted,
    MaskTooLong,
    MaskTooShort,
}

/// Invalid `compact_batch` arguments.
#[derive(Clone, Copy, Debug)]
enum BadBatch {
    DupTable,
    IndptrLen,
    IndptrEnd,
    IndptrDecreasing,
    Positions(BadKeep),
}

/// An id that names no live table.
#[derive(Clone, Copy, Debug)]
enum BadId {
    /// A table that was freed (`TableFreed`).
    Freed(usize),
    Negative,
    /// A slot index that was never handed out.
    Beyond,
    /// A live table's id with a generation from the future.
    FutureGeneration(usize),
}

/// The call a bad id is passed to.
#[derive(Clone, Copy, Debug)]
enum IdCall {
    Append,
    AppendBatch,
    Fork,
    Free,
    FreeBatch,
    Compact,
    CompactBatch,
    Register,
    Adopt,
    Reads,
    Layouts,
}

/// Table operands are indices into the model's live tables, taken modulo their number.
#[derive(Clone, Debug)]
enum Op {
    Create {
        salt: u8,
    },
    Append {
        t: usize,
        n: Count,
        pattern: bool,
    },
    AppendBatch {
        items: Vec<(usize, Count)>,
        pattern: bool,
    },
    /// A table listed twice, or counts of the wrong length.
    AppendBatchBad {
        t: usize,
        mismatch: bool,
    },
    Fork {
        t: usize,
    },
    Free {
        t: usize,
    },
    FreeBatch {
        ts: Vec<usize>,
    },
    FreeBatchDup {
        t: usize,
    },
    Compact {
        t: usize,
        keep: KeepSpec,
        mask: bool,
    },
    CompactBad {
        t: usize,
        bad: BadKeep,
    },
    CompactBatch {
        items: Vec<(usize, KeepSpec)>,
    },
    CompactBatchBad {
        items: Vec<(usize, KeepSpec)>,
        bad: BadBatch,
    },
    /// Registers the table's tokens under its salt; `probe` then adopts them into a new table.
    Register {
        t: usize,
        probe: bool,
    },
    RegisterBadLen {
        t: usize,
        longer: bool,
    },
    /// Adopts a (possibly cut, extended or mutated) token sequence that was registered before
    /// or that a live table holds, into a new table (`target: None`) or an existing one;
    /// `prefill` then appends the tokens that missed, as a serving engine would.
    Adopt {
        prefill: bool,
        target: Option<usize>,
        source: usize,
        cut: usize,
        extra: usize,
        mutate: Option<usize>,
        salt: Option<u8>,
    },
    ResetPrefixCache,
    BadId {
        id: BadId,
        call: IdCall,
    },
    /// The engine's step: `append_batch_with` passing the appended values as token ids, so
    /// tracked tables register every block they fill.
    AppendBatchIds {
        items: Vec<(usize, Count)>,
        pattern: bool,
    },
    /// The decode step's call: `append_batch_same` with one count (mostly 1) for every
    /// table, with or without the appended values as token ids.
    AppendBatchSame {
        ts: Vec<usize>,
        n: usize,
        with_ids: bool,
        pattern: bool,
    },
    /// `register_prefix_batch` of distinct live tables under one salt.
    RegisterBatch {
        ts: Vec<usize>,
        salt: u8,
    },
    /// `adopt_prefix_batch` into new tables of token sequences seen before; `bad` adds a
    /// table that is not empty, which must fail and change nothing.
    AdoptBatch {
        sources: Vec<usize>,
        salt: u8,
        bad: Option<usize>,
    },
    /// A fresh table of `n` new tokens registered by engine keys (one row per block), then
    /// adopted by keys (all hit) and by its token ids (no hit: the two never alias).
    Keys {
        n: usize,
        salt: u8,
    },
    /// `admit_batch` of a wave of prompts (sequences seen before, each extended by a few
    /// fresh tokens), checked against the three calls it replaces; `bad` first tries a
    /// malformed `indptr` (0: empty, 1: wrong end, 2: decreasing), which must change nothing.
    AdmitBatch {
        sources: Vec<(usize, usize)>,
        salt: u8,
        bad: Option<u8>,
    },
}

fn count_strategy() -> impl Strategy<Value = Count> {
    prop_oneof![
        16 => (0usize..17).prop_map(Count::Small),
        1 => Just(Count::Max),
        1 => Just(Count::MaxMinusLen),
        1 => Just(Count::JustFits),
        1 => Just(Count::OneTooMany),
    ]
}

fn keep_strategy() -> impl Strategy<Value = KeepSpec> {
    prop_oneof![
        1 => Just(KeepSpec::All),
        1 => Just(KeepSpec::Nothing),
        1 => (0usize..40).prop_map(KeepSpec::Prefix),
        1 => (0usize..10).prop_map(KeepSpec::Suffix),
        1 => (0usize..200).prop_map(KeepSpec::DropOne),
        6 => vec(any::<bool>(), 1..12).prop_map(KeepSpec::Pattern),
    ]
}

fn bad_keep_strategy() -> impl Strategy<Value = BadKeep> {
    prop_oneof![
        Just(BadKeep::OutOfRange),
        Just(BadKeep::Negative),
        Just(BadKeep::Duplicate),
        Just(BadKeep::Unsorted),
        Just(BadKeep::MaskTooLong),
        Just(BadKeep::MaskTooShort),
    ]
}

fn bad_batch_strategy() -> impl Strategy<Value = BadBatch> {
    prop_oneof![
        Just(BadBatch::DupTable),
        Just(BadBatch::IndptrLen),
        Just(BadBatch::IndptrEnd),
        Just(BadBatch::IndptrDecreasing),
        bad_keep_strategy().prop_map(BadBatch::Positions),
    ]
}

fn bad_id_strategy() -> impl Strategy<Value = BadId> {
    prop_oneof![
        2 => (0usize..64).prop_map(BadId::Freed),
        1 => Just(BadId::Negative),
        1 => Just(BadId::Beyond),
        1 => (0usize..64).prop_map(BadId::FutureGeneration),
    ]
}

fn id_call_strategy() -> impl Strategy<Value = IdCall> {
    prop_oneof![
        Just(IdCall::Append),
        Just(IdCall::AppendBatch),
        Just(IdCall::Fork),
        Just(IdCall::Free),
        Just(IdCall::FreeBatch),
        Just(IdCall::Compact),
        Just(IdCall::CompactBatch),
        Just(IdCall::Register),
        Just(IdCall::Adopt),
        Just(IdCall::Reads),
        Just(IdCall::Layouts),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let t = || 0usize..64;
    prop_oneof![
        2 => (0u8..3).prop_map(|salt| Op::Create { salt }),
        10 => (t(), count_strategy(), any::<bool>())
            .prop_map(|(t, n, pattern)| Op::Append { t, n, pattern }),
        3 => (vec((t(), count_strategy()), 0..4), any::<bool>())
            .prop_map(|(items, pattern)| Op::AppendBatch { items, pattern }),
        1 => (t(), any::<bool>()).prop_map(|(t, mismatch)| Op::AppendBatchBad { t, mismatch }),
        3 => t().prop_map(|t| Op::Fork { t }),
        5 => t().prop_map(|t| Op::Free { t }),
        2 => vec(t(), 0..4).prop_map(|ts| Op::FreeBatch { ts }),
        1 => t().prop_map(|t| Op::FreeBatchDup { t }),
        6 => (t(), keep_strategy(), any::<bool>())
            .prop_map(|(t, keep, mask)| Op::Compact { t, keep, mask }),
        1 => (t(), bad_keep_strategy()).prop_map(|(t, bad)| Op::CompactBad { t, bad }),
        2 => vec((t(), keep_strategy()), 0..4).prop_map(|items| Op::CompactBatch { items }),
        1 => (vec((t(), keep_strategy()), 1..4), bad_batch_strategy())
            .prop_map(|(items, bad)| Op::CompactBatchBad { items, bad }),
        5 => (t(), any::<bool>()).prop_map(|(t, probe)| Op::Register { t, probe }),
        1 => (t(), any::<bool>()).prop_map(|(t, longer)| Op::RegisterBadLen { t, longer }),
        4 => (
            proptest::option::weighted(0.2, t()),
            0usize..64,
            prop_oneof![3 => Just(0usize), 1 => 0usize..12],
            prop_oneof![3 => Just(0usize), 1 => 0usize..6],
            proptest::option::weighted(0.2, 0usize..64),
            proptest::option::weighted(0.2, 0u8..3),
            any::<bool>(),
        )
            .prop_map(|(target, source, cut, extra, mutate, salt, prefill)| Op::Adopt {
                prefill,
                target,
                source,
                cut,
                extra,
                mutate,
                salt,
            }),
        1 => Just(Op::ResetPrefixCache),
        2 => (bad_id_strategy(), id_call_strategy()).prop_map(|(id, call)| Op::BadId { id, call }),
        6 => (vec((t(), count_strategy()), 0..4), any::<bool>())
            .prop_map(|(items, pattern)| Op::AppendBatchIds { items, pattern }),
        4 => (
            vec(t(), 0..6),
            prop_oneof![4 => Just(1usize), 1 => 0usize..40],
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(ts, n, with_ids, pattern)| Op::AppendBatchSame {
                ts,
                n,
                with_ids,
                pattern
            }),
        2 => (vec(t(), 0..4), 0u8..3).prop_map(|(ts, salt)| Op::RegisterBatch { ts, salt }),
        2 => (vec(0usize..64, 0..4), 0u8..3, proptest::option::weighted(0.2, t()))
            .prop_map(|(sources, salt, bad)| Op::AdoptBatch { sources, salt, bad }),
        1 => (0usize..20, 0u8..3).prop_map(|(n, salt)| Op::Keys { n, salt }),
        3 => (
            vec((0usize..64, prop_oneof![2 => Just(0usize), 1 => 0usize..20]), 0..5),
            0u8..3,
            proptest::option::weighted(0.2, 0u8..3),
        )
            .prop_map(|(sources, salt, bad)| Op::AdmitBatch { sources, salt, bad }),
    ]
}

/// (num_blocks, block_size, operations).
fn scenario() -> impl Strategy<Value = (usize, usize, Vec<Op>)> {
    (2usize..24, 1usize..=8, vec(op_strategy(), 1..=MAX_STEPS))
}

// ----------------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------------

fn keep_positions(spec: &KeepSpec, len: usize) -> Vec<i64> {
    let all = 0..len as i64;
    match spec {
        KeepSpec::All => all.collect(),
        KeepSpec::Nothing => Vec::new(),
        KeepSpec::Prefix(k) => all.take(*k).collect(),
        KeepSpec::Suffix(k) => all.skip(len.saturating_sub(*k)).collect(),
        KeepSpec::DropOne(i) => {
            if len == 0 {
                Vec::new()
            } else {
                let drop = (i % len) as i64;
                all.filter(|&p| p != drop).collect()
            }
        }
        KeepSpec::Pattern(bits) => all.filter(|&p| bits[p as usize % bits.len()]).collect(),
    }
}

/// Invalid positions for a table of `len` tokens (only the `Positions` kinds).
fn bad_positions(bad: BadKeep, len: usize) -> Vec<i64> {
    let n = len as i64;
    match bad {
        BadKeep::OutOfRange | BadKeep::MaskTooLong | BadKeep::MaskTooShort => {
            if len > 0 {
                vec![0, n]
            } else {
                vec![n]
            }
        }
        BadKeep::Negative => vec![-1],
        BadKeep::Duplicate => {
            if len > 0 {
                vec![0, 0]
            } else {
                vec![0]
            }
        }
        BadKeep::Unsorted => {
            if len > 1 {
                vec![1, 0]
            } else {
                vec![n]
            }
        }
    }
}

/// What the compaction contract implies for a kept-position list: (blocks afterwards, first
/// block that receives a move, leading blocks whose chain hashes stay valid).
fn geometry(keep: &[i64], bs: usize) -> (usize, usize, usize) {
    let m = keep.len();
    let first_moved = keep
        .iter()
        .enumerate()
        .position(|(j, &p)| p as usize != j)
        .unwrap_or(m);
    let new_num_blocks = m.div_ceil(bs);
    let write_start = if first_moved < m {
        first_moved / bs
    } else {
        new_num_blocks
    };
    (new_num_blocks, write_start, write_start.min(m / bs))
}

/// Everything observable about the allocator's block-level state.
#[derive(Debug, PartialEq)]
struct Snapshot {
    stats: AllocatorStats,
    free_queue: Vec<BlockId>,
    ref_counts: Vec<u32>,
    available: usize,
    tables: Vec<(
        TableId,
        Result<Vec<BlockId>, KvError>,
        Result<usize, KvError>,
    )>,
}

#[derive(Clone, Debug)]
struct MTable {
    id: TableId,
    tokens: Vec<i64>,
    salt: u8,
    /// Leading full blocks whose chain hashes the allocator knows (registered or adopted);
    /// `register_prefix` can newly register at most the full blocks past these.
    hashed: usize,
    /// The chain covers every token, so appends with token ids register filled blocks.
    tracked: bool,
    /// The salt of the table's last adopt or register (fresh tables: 0, no salt).
    chain_salt: u8,
}

struct Model {
    nb: usize,
    bs: usize,
    tables: Vec<MTable>,
    freed: Vec<TableId>,
    /// Simulated K/V memory, one value per slot; -1 is never written.
    mem: Vec<i64>,
    /// Every (salt, prefix) ever registered, one per full block: a prefix hit must be one.
    registered: HashSet<(u8, Vec<i64>)>,
    /// Token sequences passed to `register_prefix`, as adoption sources.
    history: Vec<(u8, Vec<i64>)>,
    next_value: i64,
}

impl Model {
    /// Values for `n` appended tokens starting at position `start`.
    fn values(&mut self, start: usize, n: usize, pattern: bool) -> Vec<i64> {
        if pattern {
            (start..start + n).map(|p| p as i64).collect()
        } else {
            let v = (self.next_value..self.next_value + n as i64).collect();
            self.next_value += n as i64;
            v
        }
    }

    fn fresh(&mut self) -> i64 {
        self.next_value += 1;
        self.next_value - 1
    }
}

/// One move plan applied to memory, with the contract checks.
fn apply_plan(mem: &mut Vec<i64>, src: &[i64], dst: &[i64], sequential: bool) -> Res {
    ensure_eq!(src.len(), dst.len(), "plan src/dst lengths");
    let slots = mem.len() as i64;
    let mut written = HashSet::new();
    for (i, (&s, &d)) in src.iter().zip(dst).enumerate() {
        ensure!(
            (0..slots).contains(&s) && (0..slots).contains(&d),
            "move {i} ({s} -> {d}) is outside the pool's {slots} slots"
        );
        ensure!(s != d, "move {i} copies slot {s} onto itself");
        ensure!(
            !written.contains(&s),
            "move {i} reads slot {s}, which an earlier move wrote (plan src {src:?} dst {dst:?})"
        );
        ensure!(written.insert(d), "slot {d} is written twice by the plan");
    }
    let mut seq = mem.clone();
    for (&s, &d) in src.iter().zip(dst) {
        seq[d as usize] = seq[s as usize];
    }
    let gathered: Vec<i64> = src.iter().map(|&s| mem[s as usize]).collect();
    let mut gs = mem.clone();
    for (&d, v) in dst.iter().zip(gathered) {
        gs[d as usize] = v;
    }
    ensure!(
        seq == gs,
        "sequential and gather-then-scatter application differ"
    );
    *mem = if sequential { seq } else { gs };
    Ok(())
}

// ----------------------------------------------------------------------------------------
// The replay
// ----------------------------------------------------------------------------------------

struct Run {
    a: BlockAllocator,
    m: Model,
    step: usize,
}

impl Run {
    fn new(nb: usize, bs: usize) -> Self {
        Run {
            a: BlockAllocator::new(nb, bs).expect("valid pool"),
            m: Model {
                nb,
                bs,
                tables: Vec::new(),
                freed: Vec::new(),
                mem: vec![-1; nb * bs],
                registered: HashSet::new(),
                history: Vec::new(),
                next_value: FIRST_FRESH_VALUE,
            },
            step: 0,
        }
    }

    fn pick(&self, t: usize) -> Option<usize> {
        (!self.m.tables.is_empty()).then(|| t % self.m.tables.len())
    }

    /// Distinct table indices, first occurrence kept.
    fn pick_distinct(&self, ts: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut seen = HashSet::new();
        ts.into_iter()
            .filter_map(|t| self.pick(t))
            .filter(|&i| seen.insert(i))
            .collect()
    }

    fn ids(&self) -> Vec<TableId> {
        self.m.tables.iter().map(|t| t.id).collect()
    }

    fn blocks(&self, id: TableId) -> Res<Vec<BlockId>> {
        self.a
            .block_table(id)
            .map(|b| b.to_vec())
            .map_err(err_str("block_table"))
    }

    fn slots(&self, id: TableId) -> Res<Vec<i64>> {
        let mut out = vec![SENTINEL];
        self.a.slots(id, &mut out).map_err(err_str("slots"))?;
        ensure_eq!(
            out[0],
            SENTINEL,
            "slots() overwrote the buffer's existing contents"
        );
        out.remove(0);
        Ok(out)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stats: self.a.stats(),
            free_queue: self.a.free_queue(),
            ref_counts: self.a.ref_counts().to_vec(),
            available: self.a.num_available_blocks(),
            tables: self
                .m
                .tables
                .iter()
                .map(|t| {
                    (
                        t.id,
                        self.a.block_table(t.id).map(|b| b.to_vec()),
                        self.a.num_tokens(t.id),
                    )
                })
                .collect(),
        }
    }

    fn unchanged(&self, before: &Snapshot, what: &str) -> Res {
        let after = self.snapshot();
        ensure!(
            after == *before,
            "{what}: a failed call changed the allocator\n  before {before:?}\n  after  {after:?}"
        );
        Ok(())
    }

    /// A call that must fail: checks the error and that nothing changed.
    fn expect_err<T: std::fmt::Debug>(
        &self,
        before: &Snapshot,
        what: &str,
        r: Result<T, KvError>,
        ok: impl Fn(&KvError) -> bool,
    ) -> Res {
        match r {
            Ok(v) => return Err(format!("{what}: expected an error, got Ok({v:?})")),
            Err(e) => ensure!(ok(&e), "{what}: unexpected error {e:?}"),
        }
        self.unchanged(before, what)
    }

    fn expect_oob<T: std::fmt::Debug>(
        &self,
        before: &Snapshot,
        what: &str,
        r: Result<T, KvError>,
        need: usize,
    ) -> Res {
        let avail = before.available;
        let cap = self.m.nb - 1;
        self.expect_err(before, what, r, |e| {
            *e == KvError::OutOfBlocks {
                needed: need,
                available: avail,
                capacity: cap,
            }
        })
    }

    /// (free slots in the partial last block, 1 if writing there needs a copy-on-write).
    fn tail(&self, ti: usize) -> Res<(usize, usize)> {
        let t = &self.m.tables[ti];
        let bs = self.m.bs;
        let used = t.tokens.len() % bs;
        if used == 0 {
            return Ok((0, 0));
        }
        let last = *self
            .blocks(t.id)?
            .last()
            .ok_or("partial table without blocks")?;
        Ok((
            bs - used,
            usize::from(self.a.ref_counts()[last as usize] > 1),
        ))
    }

    /// Blocks appending `n` tokens needs, from the contract: fresh blocks for what does not
    /// fit the last block, plus one when the partial last block is shared.
    fn append_need(&self, ti: usize, n: usize) -> Res<usize> {
        if n == 0 {
            return Ok(0);
        }
        if self.m.tables[ti].tokens.len().checked_add(n).is_none() {
            return Ok(usize::MAX);
        }
        let (room, cow) = self.tail(ti)?;
        Ok(n.saturating_sub(room).div_ceil(self.m.bs) + cow)
    }

    fn resolve_count(&self, ti: usize, c: Count) -> Res<usize> {
        let bs = self.m.bs;
        let len = self.m.tables[ti].tokens.len();
        let just_fits = || -> Res<usize> {
            let (room, cow) = self.tail(ti)?;
            Ok(room + self.a.num_available_blocks().saturating_sub(cow) * bs)
        };
        Ok(match c {
            Count::Small(n) => n % (2 * bs + 1),
            Count::Max => usize::MAX,
            Count::MaxMinusLen => usize::MAX - len,
            Count::JustFits => just_fits()?,
            Count::OneTooMany => just_fits()? + 1,
        })
    }

    /// Blocks a compaction needs: one per shared block in the rewritten range.
    fn compact_need(&self, id: TableId, keep: &[i64]) -> Res<usize> {
        let (new_num_blocks, write_start, _) = geometry(keep, self.m.bs);
        let blocks = self.blocks(id)?;
        let refs = self.a.ref_counts();
        Ok(blocks[write_start..new_num_blocks]
            .iter()
            .filter(|&&b| refs[b as usize] > 1)
            .count())
    }

    fn add_table(&mut self, id: TableId, tokens: Vec<i64>, salt: u8, hashed: usize) -> Res {
        ensure!(id >= 0, "negative table id {id}");
        ensure!(
            !self.m.tables.iter().any(|t| t.id == id) && !self.m.freed.contains(&id),
            "table id {id} was handed out twice"
        );
        self.m.tables.push(MTable {
            id,
            tokens,
            salt,
            hashed,
            tracked: true,
            chain_salt: 0,
        });
        Ok(())
    }

    fn create(&mut self, salt: u8) -> Res<usize> {
        let id = self.a.create_table().unwrap();
        self.add_table(id, Vec::new(), salt % 3, 0)?;
        Ok(self.m.tables.len() - 1)
    }

    fn apply(&mut self, op: &Op) -> Res {
        match op {
            Op::Create { salt } => self.create(*salt).map(|_| ()),
            Op::Append { t, n, pattern } => self.op_append(*t, *n, *pattern),
            Op::AppendBatch { items, pattern } => self.op_append_batch(items, *pattern),
            Op::AppendBatchBad { t, mismatch } => self.op_append_batch_bad(*t, *mismatch),
            Op::Fork { t } => self.op_fork(*t),
            Op::Free { t } => {
                let ts = self.pick_distinct([*t]);
                self.op_free(&ts, false)
            }
            Op::FreeBatch { ts } => {
                let ts = self.pick_distinct(ts.iter().copied());
                self.op_free(&ts, true)
            }
            Op::FreeBatchDup { t } => self.op_free_batch_dup(*t),
            Op::Compact { t, keep, mask } => self.op_compact(*t, keep, *mask),
            Op::CompactBad { t, bad } => self.op_compact_bad(*t, *bad),
            Op::CompactBatch { items } => self.op_compact_batch(items),
            Op::CompactBatchBad { items, bad } => self.op_compact_batch_bad(items, *bad),
            Op::Register { t, probe } => self.op_register(*t, *probe),
            Op::RegisterBadLen { t, longer } => self.op_register_bad(*t, *longer),
            Op::Adopt {
                prefill,
                target,
                source,
                cut,
                extra,
                mutate,
                salt,
            } => self.op_adopt(*target, *source, *cut, *extra, *mutate, *salt, *prefill),
            Op::ResetPrefixCache => self.op_reset(),
            Op::BadId { id, call } => self.op_bad_id(*id, *call),
            Op::AppendBatchIds { items, pattern } => {
                self.op_append_batch_with(items, *pattern, true, false)
            }
            Op::AppendBatchSame {
                ts,
                n,
                with_ids,
                pattern,
            } => {
                let items: Vec<(usize, Count)> =
                    ts.iter().map(|&t| (t, Count::Small(*n))).collect();
                self.op_append_batch_with(&items, *pattern, *with_ids, true)
            }
            Op::RegisterBatch { ts, salt } => self.op_register_batch(ts, *salt),
            Op::AdoptBatch { sources, salt, bad } => self.op_adopt_batch(sources, *salt, *bad),
            Op::Keys { n, salt } => self.op_keys(*n, *salt),
            Op::AdmitBatch { sources, salt, bad } => self.op_admit_batch(sources, *salt, *bad),
        }
    }

    // ---------------------------------------------------------------------- append

    fn op_append(&mut self, t: usize, c: Count, pattern: bool) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let n = self.resolve_count(ti, c)?;
        self.append_checked(ti, n, None, pattern)
    }

    /// Appends `n` tokens to table `ti` and checks the outcome; the tokens get `values`, or
    /// fresh / pattern values.
    fn append_checked(
        &mut self,
        ti: usize,
        n: usize,
        values: Option<&[i64]>,
        pattern: bool,
    ) -> Res {
        let id = self.m.tables[ti].id;
        let need = self.append_need(ti, n)?;
        ensure_eq!(self.a.blocks_needed(id, n), Ok(need), "blocks_needed({n})");
        let before = self.snapshot();
        let old_blocks = self.blocks(id)?;
        let old_len = self.m.tables[ti].tokens.len();
        let mut out = vec![SENTINEL];
        let r = self.a.append(id, n, &mut out);
        if need > before.available {
            ensure_eq!(out, vec![SENTINEL], "failed append wrote slots");
            return self.expect_oob(&before, &format!("append({n})"), r, need);
        }
        let outcome = r.map_err(|e| {
            format!(
                "append({n}) needing {need} of {} blocks failed: {e:?}",
                before.available
            )
        })?;
        ensure_eq!(
            out[0],
            SENTINEL,
            "append overwrote the buffer's existing contents"
        );
        ensure_eq!(out.len(), n + 1, "append({n}) returned slot count");
        let mut refs = before.ref_counts.clone();
        let cow = self.check_cow(id, &old_blocks, old_len, n, &mut refs, outcome.cow)?;
        if let Some((s, d)) = cow {
            self.copy_block(s, d);
        }
        self.write_appended(ti, old_len, &out[1..], values, pattern)?;
        if n > 0 {
            self.m.tables[ti].tracked = false;
        }
        let used = self.a.stats().num_used_blocks;
        ensure_eq!(
            used,
            before.stats.num_used_blocks + need,
            "used blocks after an append needing {need}"
        );
        Ok(())
    }

    /// Checks a copy-on-write instruction against the table before and after the append.
    /// `refs` holds the ref counts as the append saw them and is updated for the copy.
    fn check_cow(
        &self,
        id: TableId,
        old_blocks: &[BlockId],
        old_len: usize,
        n: usize,
        refs: &mut [u32],
        cow: Option<(BlockId, BlockId)>,
    ) -> Res<Option<(BlockId, BlockId)>> {
        let bs = self.m.bs;
        let new_blocks = self.blocks(id)?;
        ensure!(
            new_blocks.len() >= old_blocks.len(),
            "append shortened the block table"
        );
        let partial = n > 0 && old_len % bs != 0;
        let last_shared = partial && refs[*old_blocks.last().unwrap() as usize] > 1;
        match cow {
            None => {
                ensure!(
                    !last_shared,
                    "append wrote into a shared partial block without a copy"
                );
                ensure_eq!(
                    new_blocks[..old_blocks.len()],
                    *old_blocks,
                    "append changed existing blocks without a copy"
                );
            }
            Some((s, d)) => {
                ensure!(
                    last_shared,
                    "copy-on-write {s}->{d} of a block that is not shared"
                );
                let li = old_blocks.len() - 1;
                ensure_eq!(
                    s,
                    old_blocks[li],
                    "copy-on-write source is not the last block"
                );
                ensure_eq!(
                    d,
                    new_blocks[li],
                    "copy-on-write destination is not the new last block"
                );
                ensure_eq!(
                    new_blocks[..li],
                    old_blocks[..li],
                    "copy-on-write changed other blocks"
                );
                ensure!(s != d, "copy-on-write onto the same block");
                refs[s as usize] -= 1;
            }
        }
        Ok(cow)
    }

    fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let bs = self.m.bs;
        let (s, d) = (src as usize * bs, dst as usize * bs);
        self.m.mem.copy_within(s..s + bs, d);
    }

    /// Writes appended token values into their slots and into the model.
    fn write_appended(
        &mut self,
        ti: usize,
        old_len: usize,
        slots: &[i64],
        values: Option<&[i64]>,
        pattern: bool,
    ) -> Res {
        let id = self.m.tables[ti].id;
        let all = self.slots(id)?;
        ensure_eq!(
            all[old_len..],
            *slots,
            "appended slots are not the table's tail"
        );
        let refs = self.a.ref_counts();
        for &s in slots {
            let b = s as usize / self.m.bs;
            ensure_eq!(
                refs[b],
                1,
                "append hands out slot {s} in a block that is not private"
            );
        }
        let values = match values {
            Some(v) => v.to_vec(),
            None => self.m.values(old_len, slots.len(), pattern),
        };
        for (&s, &v) in slots.iter().zip(&values) {
            self.m.mem[s as usize] = v;
        }
        self.m.tables[ti].tokens.extend(values);
        Ok(())
    }

    fn op_append_batch(&mut self, items: &[(usize, Count)], pattern: bool) -> Res {
        self.op_append_batch_with(items, pattern, false, false)
    }

    /// `append_batch`, or with `with_ids` the engine's step (`append_batch_with` given the
    /// appended values as token ids), checked against the model. With `same` (every count
    /// equal by construction) the call is `append_batch_same`.
    fn op_append_batch_with(
        &mut self,
        items: &[(usize, Count)],
        pattern: bool,
        with_ids: bool,
        same: bool,
    ) -> Res {
        let mut picked = Vec::new();
        let mut seen = HashSet::new();
        for &(t, c) in items {
            if let Some(ti) = self.pick(t) {
                if seen.insert(ti) {
                    picked.push((ti, self.resolve_count(ti, c)?));
                }
            }
        }
        let ids: Vec<TableId> = picked.iter().map(|&(ti, _)| self.m.tables[ti].id).collect();
        let counts: Vec<usize> = picked.iter().map(|&(_, n)| n).collect();
        let mut need = 0usize;
        for &(ti, n) in &picked {
            need = need.saturating_add(self.append_need(ti, n)?);
        }
        let before = self.snapshot();
        let old: Vec<(Vec<BlockId>, usize)> = picked
            .iter()
            .map(|&(ti, _)| {
                Ok((
                    self.blocks(self.m.tables[ti].id)?,
                    self.m.tables[ti].tokens.len(),
                ))
            })
            .collect::<Res<_>>()?;
        let (mut slots, mut indptr, mut cs, mut cd) = (
            vec![SENTINEL],
            Vec::new(),
            vec![NULL_BLOCK],
            vec![NULL_BLOCK],
        );
        // Token ids for the engine's step: only built when they fit in memory.
        let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        let values: Option<Vec<Vec<i64>>> = match total {
            Some(t) if with_ids && t <= 1 << 16 => Some(
                picked
                    .iter()
                    .zip(&old)
                    .map(|(&(_, n), (_, len))| self.m.values(*len, n, pattern))
                    .collect(),
            ),
            _ => None,
        };
        let mut num_registered = 0;
        let flat: Option<Vec<i64>> = values.as_ref().map(|v| v.concat());
        let r = if same || flat.is_some() {
            let mut out = BatchAppend {
                slots,
                indptr,
                cow_src: cs,
                cow_dst: cd,
                num_registered: 0,
            };
            let r = match items.first() {
                // Every item is `Small(n)` for one n: the count all tables resolved to.
                Some(&(_, Count::Small(n))) if same => {
                    let n = n % (2 * self.m.bs + 1);
                    self.a.append_batch_same(&ids, n, flat.as_deref(), &mut out)
                }
                _ => self
                    .a
                    .append_batch_with(&ids, &counts, flat.as_deref(), &mut out),
            };
            (slots, indptr, cs, cd) = (out.slots, out.indptr, out.cow_src, out.cow_dst);
            num_registered = out.num_registered;
            r
        } else {
            self.a
                .append_batch(&ids, &counts, &mut slots, &mut indptr, &mut cs, &mut cd)
        };
        if need > before.available {
            ensure!(
                slots == [SENTINEL] && indptr.is_empty() && cs == [0] && cd == [0],
                "failed append_batch wrote its outputs"
            );
            return self.expect_oob(&before, "append_batch", r, need);
        }
        r.map_err(|e| {
            format!(
                "append_batch({counts:?}) needing {need} of {} blocks failed: {e:?}",
                before.available
            )
        })?;
        ensure_eq!(slots[0], SENTINEL, "append_batch overwrote existing slots");
        ensure_eq!(
            (cs[0], cd[0]),
            (0, 0),
            "append_batch overwrote existing copies"
        );
        ensure_eq!(indptr.len(), ids.len() + 1, "append_batch indptr length");
        ensure_eq!(indptr[0], 1, "append_batch indptr start");
        ensure_eq!(
            *indptr.last().unwrap(),
            slots.len() as i64,
            "append_batch indptr end"
        );
        // Copies first (in order), then writes: the copies read pre-batch contents.
        let mut refs = before.ref_counts.clone();
        let mut pairs = cs[1..].iter().zip(&cd[1..]).map(|(&s, &d)| (s, d));
        let mut copies = Vec::new();
        for (k, &(_, n)) in picked.iter().enumerate() {
            let (old_blocks, old_len) = &old[k];
            let partial = n > 0 && old_len % self.m.bs != 0;
            let expect_cow = partial && refs[*old_blocks.last().unwrap() as usize] > 1;
            let cow = if expect_cow { pairs.next() } else { None };
            ensure!(
                !expect_cow || cow.is_some(),
                "append_batch returned too few copy-on-write pairs"
            );
            self.check_cow(ids[k], old_blocks, *old_len, n, &mut refs, cow)?;
            copies.extend(cow);
        }
        ensure!(
            pairs.next().is_none(),
            "append_batch returned extra copy-on-write pairs"
        );
        for (s, d) in copies {
            self.copy_block(s, d);
        }
        let bs = self.m.bs;
        let mut can_register = 0;
        for (k, &(ti, n)) in picked.iter().enumerate() {
            let (lo, hi) = (indptr[k] as usize, indptr[k + 1] as usize);
            ensure_eq!(hi - lo, n, "append_batch slot count of table {k}");
            let seg = slots[lo..hi].to_vec();
            let vals = values.as_ref().map(|v| &v[k][..]);
            self.write_appended(ti, old[k].1, &seg, vals, pattern)?;
            let t = &mut self.m.tables[ti];
            if vals.is_none() {
                if n > 0 {
                    t.tracked = false;
                }
            } else if t.tracked {
                // Every block the ids complete is registered (or chained through).
                let full = t.tokens.len() / bs;
                can_register += full - t.hashed;
                for j in t.hashed + 1..=full {
                    self.m
                        .registered
                        .insert((t.chain_salt, t.tokens[..j * bs].to_vec()));
                }
                t.hashed = full;
            }
        }
        ensure!(
            num_registered <= can_register,
            "append_batch_with registered {num_registered} blocks, at most {can_register} filled"
        );
        let used = self.a.stats().num_used_blocks;
        ensure!(
            used >= before.stats.num_used_blocks && used <= before.stats.num_used_blocks + need,
            "append_batch needing {need} took {} blocks",
            used as i64 - before.stats.num_used_blocks as i64
        );
        Ok(())
    }

    fn op_append_batch_bad(&mut self, t: usize, mismatch: bool) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let id = self.m.tables[ti].id;
        let (ids, counts) = if mismatch {
            (vec![id], vec![1, 1])
        } else {
            (vec![id, id], vec![1, 1])
        };
        let before = self.snapshot();
        let (mut s, mut ip, mut cs, mut cd) = (vec![], vec![], vec![], vec![]);
        let r = self
            .a
            .append_batch(&ids, &counts, &mut s, &mut ip, &mut cs, &mut cd);
        ensure!(
            s.is_empty() && ip.is_empty() && cs.is_empty() && cd.is_empty(),
            "failed append_batch wrote its outputs"
        );
        self.expect_err(&before, "bad append_batch", r, |e| {
            matches!(e, KvError::InvalidArgument(_))
        })
    }

    // ---------------------------------------------------------------------- fork / free

    fn op_fork(&mut self, t: usize) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let parent = self.m.tables[ti].clone();
        let before = self.snapshot();
        let child = self.a.fork(parent.id).map_err(err_str("fork"))?;
        self.add_table(child, parent.tokens, parent.salt, parent.hashed)?;
        let c = self.m.tables.last_mut().unwrap();
        (c.tracked, c.chain_salt) = (parent.tracked, parent.chain_salt);
        ensure_eq!(
            self.blocks(child)?,
            self.blocks(parent.id)?,
            "fork's block table"
        );
        let s = self.a.stats();
        ensure_eq!(
            s.num_used_blocks,
            before.stats.num_used_blocks,
            "fork took blocks"
        );
        ensure_eq!(
            self.a.free_queue(),
            before.free_queue,
            "fork changed the free queue"
        );
        Ok(())
    }

    fn op_free(&mut self, tis: &[usize], batch: bool) -> Res {
        if tis.is_empty() && !batch {
            return Ok(());
        }
        let ids: Vec<TableId> = tis.iter().map(|&ti| self.m.tables[ti].id).collect();
        let before = self.snapshot();
        // Blocks whose every reference goes away become free or cached.
        let mut drops: HashMap<BlockId, u32> = HashMap::new();
        for &id in &ids {
            for b in self.blocks(id)? {
                *drops.entry(b).or_default() += 1;
            }
        }
        let released = drops
            .iter()
            .filter(|(&b, &c)| before.ref_counts[b as usize] == c)
            .count();
        if batch {
            self.a.free_batch(&ids).map_err(err_str("free_batch"))?;
        } else {
            self.a.free(ids[0]).map_err(err_str("free"))?;
        }
        let mut sorted = tis.to_vec();
        sorted.sort_unstable();
        for &ti in sorted.iter().rev() {
            let t = self.m.tables.remove(ti);
            self.m.freed.push(t.id);
        }
        let used = self.a.stats().num_used_blocks;
        ensure_eq!(
            used,
            before.stats.num_used_blocks - released,
            "used blocks after freeing {ids:?}"
        );
        Ok(())
    }

    fn op_free_batch_dup(&mut self, t: usize) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let id = self.m.tables[ti].id;
        let before = self.snapshot();
        let r = self.a.free_batch(&[id, id]);
        self.expect_err(&before, "free_batch with a duplicate", r, |e| {
            matches!(e, KvError::InvalidArgument(_))
        })
    }

    // ---------------------------------------------------------------------- compaction

    /// Checks one table's part of a plan against what the contract implies: every kept token
    /// moves exactly when its new slot differs from its old slot, and only into private
    /// blocks of the table.
    fn check_table_moves(
        &self,
        id: TableId,
        old_slots: &[i64],
        keep: &[i64],
        src: &[i64],
        dst: &[i64],
    ) -> Res {
        let new_slots = self.slots(id)?;
        ensure_eq!(new_slots.len(), keep.len(), "table length after compaction");
        let mut expected: Vec<(i64, i64)> = keep
            .iter()
            .zip(&new_slots)
            .map(|(&p, &d)| (old_slots[p as usize], d))
            .filter(|(s, d)| s != d)
            .collect();
        let mut got: Vec<(i64, i64)> = src.iter().copied().zip(dst.iter().copied()).collect();
        expected.sort_unstable();
        got.sort_unstable();
        ensure_eq!(
            got,
            expected,
            "compaction moves (sorted src, dst) for keep {keep:?}"
        );
        let refs = self.a.ref_counts();
        for &d in dst {
            let b = d as usize / self.m.bs;
            ensure_eq!(refs[b], 1, "compaction writes slot {d} of a shared block");
        }
        Ok(())
    }

    fn finish_compaction(&mut self, ti: usize, keep: &[i64]) {
        let bs = self.m.bs;
        let (_, _, hash_valid) = geometry(keep, bs);
        let t = &mut self.m.tables[ti];
        if keep.len() != t.tokens.len() {
            t.tracked = false;
        }
        t.tokens = keep.iter().map(|&p| t.tokens[p as usize]).collect();
        t.hashed = t.hashed.min(hash_valid);
    }

    fn op_compact(&mut self, t: usize, spec: &KeepSpec, mask: bool) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let id = self.m.tables[ti].id;
        let len = self.m.tables[ti].tokens.len();
        let keep = keep_positions(spec, len);
        let flags: Vec<bool> = (0..len as i64)
            .map(|p| keep.binary_search(&p).is_ok())
            .collect();
        let arg = if mask {
            Keep::Mask(&flags)
        } else {
            Keep::Positions(&keep)
        };
        let need = self.compact_need(id, &keep)?;
        let old_slots = self.slots(id)?;
        let before = self.snapshot();
        let mut plan = CompactionPlan {
            src: vec![SENTINEL],
            dst: vec![SENTINEL],
        };
        let r = self.a.compact(id, arg, &mut plan);
        if need > before.available {
            ensure!(
                plan.src == [SENTINEL] && plan.dst == [SENTINEL],
                "failed compaction wrote a plan"
            );
            return self.expect_oob(&before, "compact", r, need);
        }
        r.map_err(|e| {
            format!(
                "compact(keep {keep:?}) needing {need} of {} blocks failed: {e:?}",
                before.available
            )
        })?;
        ensure!(
            plan.src[0] == SENTINEL && plan.dst[0] == SENTINEL,
            "compaction overwrote the plan's existing moves"
        );
        let (src, dst) = (&plan.src[1..], &plan.dst[1..]);
        self.check_table_moves(id, &old_slots, &keep, src, dst)?;
        apply_plan(&mut self.m.mem, src, dst, self.step % 2 == 0)?;
        self.finish_compaction(ti, &keep);
        Ok(())
    }

    fn op_compact_bad(&mut self, t: usize, bad: BadKeep) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let id = self.m.tables[ti].id;
        let len = self.m.tables[ti].tokens.len();
        let positions = bad_positions(bad, len);
        let mask = match bad {
            BadKeep::MaskTooLong => vec![true; len + 1],
            BadKeep::MaskTooShort if len > 0 => vec![true; len - 1],
            BadKeep::MaskTooShort => vec![false; 3],
            _ => Vec::new(),
        };
        let arg = match bad {
            BadKeep::MaskTooLong | BadKeep::MaskTooShort => Keep::Mask(&mask),
            _ => Keep::Positions(&positions),
        };
        let before = self.snapshot();
        let mut plan = CompactionPlan::default();
        let r = self.a.compact(id, arg, &mut plan);
        ensure!(plan.is_empty(), "failed compaction wrote a plan");
        self.expect_err(&before, &format!("compact({arg:?})"), r, |e| {
            matches!(e, KvError::InvalidPositions(_))
        })
    }

    /// Resolves batch items to distinct tables with their keep positions.
    fn batch_keeps(&self, items: &[(usize, KeepSpec)]) -> Vec<(usize, Vec<i64>)> {
        let mut seen = HashSet::new();
        items
            .iter()
            .filter_map(|(t, spec)| {
                let ti = self.pick(*t)?;
                seen.insert(ti)
                    .then(|| (ti, keep_positions(spec, self.m.tables[ti].tokens.len())))
            })
            .collect()
    }

    fn csr(&self, keeps: &[(usize, Vec<i64>)]) -> (Vec<TableId>, Vec<i64>, Vec<i64>) {
        let ids = keeps.iter().map(|(ti, _)| self.m.tables[*ti].id).collect();
        let mut indptr = vec![0i64];
        let mut positions = Vec::new();
        for (_, k) in keeps {
            positions.extend_from_slice(k);
            indptr.push(positions.len() as i64);
        }
        (ids, indptr, positions)
    }

    fn op_compact_batch(&mut self, items: &[(usize, KeepSpec)]) -> Res {
        let keeps = self.batch_keeps(items);
        let (ids, indptr, positions) = self.csr(&keeps);
        let mut need = 0;
        let mut old_slots = Vec::new();
        for (k, (_, keep)) in keeps.iter().enumerate() {
            need += self.compact_need(ids[k], keep)?;
            old_slots.push(self.slots(ids[k])?);
        }
        let before = self.snapshot();
        let mut plan = CompactionPlan {
            src: vec![SENTINEL],
            dst: vec![SENTINEL],
        };
        let mut pip = Vec::new();
        let r = self
            .a
            .compact_batch(&ids, &indptr, &positions, &mut plan, &mut pip);
        if need > before.available {
            ensure!(
                plan.len() == 1 && pip.is_empty(),
                "failed compact_batch wrote a plan"
            );
            return self.expect_oob(&before, "compact_batch", r, need);
        }
        r.map_err(|e| {
            format!(
                "compact_batch needing {need} of {} blocks failed: {e:?}",
                before.available
            )
        })?;
        ensure!(
            plan.src[0] == SENTINEL && plan.dst[0] == SENTINEL,
            "compact_batch overwrote the plan's existing moves"
        );
        ensure_eq!(pip.len(), ids.len() + 1, "compact_batch plan_indptr length");
        ensure_eq!(pip[0], 1, "compact_batch plan_indptr start");
        ensure_eq!(
            *pip.last().unwrap(),
            plan.len() as i64,
            "compact_batch plan_indptr end"
        );
        for (k, (_, keep)) in keeps.iter().enumerate() {
            let (lo, hi) = (pip[k] as usize, pip[k + 1] as usize);
            ensure!(lo <= hi, "compact_batch plan_indptr decreases");
            self.check_table_moves(
                ids[k],
                &old_slots[k],
                keep,
                &plan.src[lo..hi],
                &plan.dst[lo..hi],
            )?;
        }
        apply_plan(
            &mut self.m.mem,
            &plan.src[1..],
            &plan.dst[1..],
            self.step % 2 == 1,
        )?;
        for (ti, keep) in &keeps {
            self.finish_compaction(*ti, keep);
        }
        Ok(())
    }

    fn op_compact_batch_bad(&mut self, items: &[(usize, KeepSpec)], bad: BadBatch) -> Res {
        let mut keeps = self.batch_keeps(items);
        if keeps.is_empty() {
            return Ok(());
        }
        if let BadBatch::Positions(b) = bad {
            let k = keeps.len() - 1;
            let len = self.m.tables[keeps[k].0].tokens.len();
            keeps[k].1 = bad_positions(b, len);
        }
        let (mut ids, mut indptr, mut positions) = self.csr(&keeps);
        let expect_positions = matches!(bad, BadBatch::Positions(_));
        match bad {
            BadBatch::DupTable => {
                ids.push(ids[0]);
                indptr.push(positions.len() as i64);
            }
            BadBatch::IndptrLen => {
                indptr.pop();
            }
            BadBatch::IndptrEnd => positions.push(0),
            BadBatch::IndptrDecreasing => indptr[1] = positions.len() as i64 + 1,
            BadBatch::Positions(_) => {}
        }
        let before = self.snapshot();
        let mut plan = CompactionPlan::default();
        let mut pip = Vec::new();
        let r = self
            .a
            .compact_batch(&ids, &indptr, &positions, &mut plan, &mut pip);
        ensure!(
            plan.is_empty() && pip.is_empty(),
            "failed compact_batch wrote a plan"
        );
        let what = format!("compact_batch({ids:?}, {indptr:?}, {positions:?})");
        self.expect_err(&before, &what, r, |e| {
            if expect_positions {
                matches!(e, KvError::InvalidPositions(_))
            } else {
                matches!(e, KvError::InvalidArgument(_))
            }
        })
    }

    // ---------------------------------------------------------------------- prefix cache

    fn op_register(&mut self, t: usize, probe: bool) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let MTable {
            id,
            tokens,
            salt,
            hashed,
            ..
        } = self.m.tables[ti].clone();
        let bs = self.m.bs;
        let num_full = tokens.len() / bs;
        let before = self.snapshot();
        let r = self
            .a
            .register_prefix(id, &tokens, salt_bytes(salt))
            .map_err(err_str("register_prefix"))?;
        ensure!(
            r <= num_full - hashed,
            "register_prefix registered {r} blocks but only {} were unregistered",
            num_full - hashed
        );
        self.unchanged(&before, "register_prefix (must not move blocks)")?;
        self.m.tables[ti].hashed = num_full;
        (self.m.tables[ti].tracked, self.m.tables[ti].chain_salt) = (true, salt);
        for k in 1..=num_full {
            self.m.registered.insert((salt, tokens[..k * bs].to_vec()));
        }
        if num_full > 0 {
            self.m.history.push((salt, tokens.clone()));
        }
        // Every full block newly registered under its own hash: adopting the same tokens
        // right away must hit all of them, on this very table's blocks.
        if probe && hashed == 0 && r == num_full {
            let pi = self.create(salt)?;
            let pid = self.m.tables[pi].id;
            let hit = self
                .a
                .adopt_prefix(pid, &tokens, salt_bytes(salt))
                .map_err(err_str("probe adopt_prefix"))?;
            ensure_eq!(hit, num_full * bs, "adopting just-registered tokens");
            ensure_eq!(
                self.blocks(pid)?,
                self.blocks(id)?[..num_full],
                "adopted blocks are not the registered ones"
            );
            let p = &mut self.m.tables[pi];
            p.tokens = tokens[..hit].to_vec();
            p.hashed = num_full;
            (p.tracked, p.chain_salt) = (true, salt);
        }
        Ok(())
    }

    fn op_register_bad(&mut self, t: usize, longer: bool) -> Res {
        let Some(ti) = self.pick(t) else {
            return Ok(());
        };
        let t = self.m.tables[ti].clone();
        let mut tokens = t.tokens;
        if longer || tokens.is_empty() {
            tokens.push(0);
        } else {
            tokens.pop();
        }
        let before = self.snapshot();
        let r = self.a.register_prefix(t.id, &tokens, salt_bytes(t.salt));
        self.expect_err(&before, "register_prefix with the wrong length", r, |e| {
            matches!(e, KvError::InvalidArgument(_))
        })
    }

    fn op_adopt(
        &mut self,
        target: Option<usize>,
        source: usize,
        cut: usize,
        extra: usize,
        mutate: Option<usize>,
        salt: Option<u8>,
        prefill: bool,
    ) -> Res {
        let bs = self.m.bs;
        let mut candidates: Vec<(u8, Vec<i64>)> = self.m.history.clone();
        candidates.extend(self.m.tables.iter().map(|t| (t.salt, t.tokens.clone())));
        // Mostly sequences that were registered (likely hits), sometimes a live table's.
        let num_registered = self.m.history.len();
        let pick = if num_registered > 0 && source % 4 != 0 {
            source % num_registered
        } else {
            source % candidates.len().max(1)
        };
        let (src_salt, mut tokens) = if candidates.is_empty() {
            (0, (0..2 * bs as i64).collect())
        } else {
            candidates.swap_remove(pick)
        };
        tokens.truncate(tokens.len().saturating_sub(cut));
        for _ in 0..extra {
            let v = self.m.fresh();
            tokens.push(v);
        }
        if let Some(p) = mutate {
            if !tokens.is_empty() {
                let i = p % tokens.len();
                tokens[i] = self.m.fresh();
            }
        }
        let salt = salt.unwrap_or(src_salt) % 3;
        let ti = match target.and_then(|t| self.pick(t)) {
            Some(ti) => ti,
            None => self.create(salt)?,
        };
        let id = self.m.tables[ti].id;
        let before = self.snapshot();
        let r = self.a.adopt_prefix(id, &tokens, salt_bytes(salt));
        if !self.m.tables[ti].tokens.is_empty() {
            return self.expect_err(&before, "adopt_prefix into a non-empty table", r, |e| {
                matches!(e, KvError::InvalidArgument(_))
            });
        }
        let hit = r.map_err(err_str("adopt_prefix"))?;
        ensure!(
            hit % bs == 0 && hit <= tokens.len(),
            "adopt_prefix hit {hit} tokens of {}",
            tokens.len()
        );
        for k in 1..=hit / bs {
            ensure!(
                self.m.registered.contains(&(salt, tokens[..k * bs].to_vec())),
                "adopt_prefix hit {} tokens with salt {salt}, but {:?} was never registered with it",
                hit,
                &tokens[..k * bs]
            );
        }
        let blocks = self.blocks(id)?;
        ensure_eq!(blocks.len(), hit / bs, "adopted block count");
        let revived = blocks
            .iter()
            .filter(|&&b| before.ref_counts[b as usize] == 0)
            .count();
        ensure_eq!(
            self.a.stats().num_used_blocks,
            before.stats.num_used_blocks + revived,
            "used blocks after adopting {revived} cached blocks"
        );
        let t = &mut self.m.tables[ti];
        t.tokens = tokens[..hit].to_vec();
        t.salt = salt;
        t.hashed = hit / bs;
        (t.tracked, t.chain_salt) = (true, salt);
        if prefill {
            self.append_checked(ti, tokens.len() - hit, Some(&tokens[hit..]), false)?;
        }
        Ok(())
    }

    fn op_register_batch(&mut self, ts: &[usize], salt: u8) -> Res {
        let tis = self.pick_distinct(ts.iter().copied());
        let ids: Vec<TableId> = tis.iter().map(|&ti| self.m.tables[ti].id).collect();
        let mut indptr = vec![0i64];
        let mut flat = Vec::new();
        for &ti in &tis {
            flat.extend_from_slice(&self.m.tables[ti].tokens);
            indptr.push(flat.len() as i64);
        }
        let before = self.snapshot();
        // A part one id short must fail for the whole batch and change nothing.
        if let Some(&last) = tis.last() {
            if !self.m.tables[last].tokens.is_empty() {
                let mut short = indptr.clone();
                *short.last_mut().unwrap() -= 1;
                let mut out = Vec::new();
                let r = self.a.register_prefix_batch(
                    &ids,
                    &short,
                    BlockKeys::Tokens(&flat[..flat.len() - 1]),
                    salt_bytes(salt),
                    &mut out,
                );
                ensure!(
                    out.is_empty(),
                    "a failed register_prefix_batch wrote counts"
                );
                self.expect_err(&before, "register_prefix_batch, a part too short", r, |e| {
                    matches!(e, KvError::InvalidArgument(_))
                })?;
            }
        }
        let mut out = vec![-1];
        self.a
            .register_prefix_batch(
                &ids,
                &indptr,
                BlockKeys::Tokens(&flat),
                salt_bytes(salt),
                &mut out,
            )
            .map_err(err_str("register_prefix_batch"))?;
        ensure_eq!(out.len(), ids.len() + 1, "register_prefix_batch counts");
        self.unchanged(&before, "register_prefix_batch (must not move blocks)")?;
        let bs = self.m.bs;
        for (k, &ti) in tis.iter().enumerate() {
            let t = &mut self.m.tables[ti];
            let full = t.tokens.len() / bs;
            ensure!(
                (0..=(full - t.hashed) as i64).contains(&out[k + 1]),
                "register_prefix_batch registered {} of {} new blocks",
                out[k + 1],
                full - t.hashed
            );
            for j in t.hashed + 1..=full {
                self.m
                    .registered
                    .insert((salt, t.tokens[..j * bs].to_vec()));
            }
            (t.hashed, t.tracked, t.chain_salt) = (full, true, salt);
        }
        Ok(())
    }

    fn op_adopt_batch(&mut self, sources: &[usize], salt: u8, bad: Option<usize>) -> Res {
        let mut candidates: Vec<Vec<i64>> = self.m.history.iter().map(|(_, t)| t.clone()).collect();
        candidates.extend(self.m.tables.iter().map(|t| t.tokens.clone()));
        if candidates.is_empty() {
            return Ok(());
        }
        let parts: Vec<Vec<i64>> = sources
            .iter()
            .map(|&s| candidates[s % candidates.len()].clone())
            .collect();
        let tis: Vec<usize> = (0..parts.len())
            .map(|_| self.create(salt))
            .collect::<Res<_>>()?;
        let ids: Vec<TableId> = tis.iter().map(|&ti| self.m.tables[ti].id).collect();
        let mut indptr = vec![0i64];
        let mut flat = Vec::new();
        for p in &parts {
            flat.extend_from_slice(p);
            indptr.push(flat.len() as i64);
        }
        let bs = self.m.bs;
        if let Some(b) = bad.and_then(|b| self.pick(b)) {
            if !self.m.tables[b].tokens.is_empty() {
                let before = self.snapshot();
                let mut bad_ids = ids.clone();
                bad_ids.push(self.m.tables[b].id);
                let mut bad_ptr = indptr.clone();
                bad_ptr.push(flat.len() as i64);
                let mut out = Vec::new();
                let r = self.a.adopt_prefix_batch(
                    &bad_ids,
                    &bad_ptr,
                    BlockKeys::Tokens(&flat),
                    salt_bytes(salt),
                    &mut out,
                );
                ensure!(out.is_empty(), "a failed adopt_prefix_batch wrote hits");
                self.expect_err(
                    &before,
                    "adopt_prefix_batch into a non-empty table",
                    r,
                    |e| matches!(e, KvError::InvalidArgument(_)),
                )?;
            }
        }
        let before = self.snapshot();
        let mut hits = Vec::new();
        self.a
            .adopt_prefix_batch(
                &ids,
                &indptr,
                BlockKeys::Tokens(&flat),
                salt_bytes(salt),
                &mut hits,
            )
            .map_err(err_str("adopt_prefix_batch"))?;
        ensure_eq!(hits.len(), ids.len(), "adopt_prefix_batch hits");
        let mut revived: HashSet<BlockId> = HashSet::new();
        for (k, &ti) in tis.iter().enumerate() {
            let hit = hits[k] as usize;
            ensure!(
                hit % bs == 0 && hit <= parts[k].len(),
                "adopt_prefix_batch hit {hit}"
            );
            for j in 1..=hit / bs {
                ensure!(
                    self.m
                        .registered
                        .contains(&(salt, parts[k][..j * bs].to_vec())),
                    "adopt_prefix_batch hit {:?} with salt {salt}, never registered",
                    &parts[k][..j * bs]
                );
            }
            let blocks = self.blocks(ids[k])?;
            ensure_eq!(blocks.len(), hit / bs, "adopted block count");
            revived.extend(
                blocks
                    .iter()
                    .filter(|&&b| before.ref_counts[b as usize] == 0),
            );
            let t = &mut self.m.tables[ti];
            t.tokens = parts[k][..hit].to_vec();
            (t.hashed, t.tracked, t.chain_salt) = (hit / bs, true, salt);
        }
        ensure_eq!(
            self.a.stats().num_used_blocks,
            before.stats.num_used_blocks + revived.len(),
            "used blocks after adopting {} cached blocks",
            revived.len()
        );
        Ok(())
    }

    /// `admit_batch` against the three calls it replaces, run on a clone of the allocator:
    /// `create_tables`, `adopt_prefix_batch` with every prompt but its last token, and
    /// `append_batch_with` of the rest with its ids. The same tables, hits, slots,
    /// registrations and pool state, or `OutOfBlocks` (nothing changed) exactly when those
    /// appends run out, counting the cached blocks the hits take out of the free queue.
    fn op_admit_batch(&mut self, sources: &[(usize, usize)], salt: u8, bad: Option<u8>) -> Res {
        let bs = self.m.bs;
        let mut candidates: Vec<Vec<i64>> = self.m.history.iter().map(|(_, t)| t.clone()).collect();
        candidates.extend(self.m.tables.iter().map(|t| t.tokens.clone()));
        let mut prompts = Vec::new();
        for &(source, extra) in sources {
            let mut p = match candidates.len() {
                0 => Vec::new(),
                n => candidates[source % n].clone(),
            };
            for _ in 0..extra {
                p.push(self.m.fresh());
            }
            prompts.push(p);
        }
        let csr = |parts: &mut dyn Iterator<Item = &[i64]>| {
            let (mut ptr, mut flat) = (vec![0i64], Vec::new());
            for p in parts {
                flat.extend_from_slice(p);
                ptr.push(flat.len() as i64);
            }
            (ptr, flat)
        };
        let (indptr, flat) = csr(&mut prompts.iter().map(|p| &p[..]));
        let before = self.snapshot();
        let untouched = |t: &[i64], h: &[i64], o: &BatchAppend| {
            t == [SENTINEL] && h == [SENTINEL] && o.slots == [SENTINEL] && o.indptr.is_empty()
        };
        if let Some(kind) = bad {
            let mut ptr = indptr.clone();
            match kind {
                0 => ptr.clear(),
                1 => *ptr.last_mut().unwrap() += 1,
                // [0, len + 1, ..., len]: decreasing at its end.
                _ => ptr.insert(1, flat.len() as i64 + 1),
            }
            let (mut t, mut h) = (vec![SENTINEL], vec![SENTINEL]);
            let mut o = BatchAppend {
                slots: vec![SENTINEL],
                ..BatchAppend::default()
            };
            let r = self
                .a
                .admit_batch(&ptr, &flat, salt_bytes(salt), &mut t, &mut h, &mut o);
            ensure!(
                untouched(&t, &h, &o),
                "a failed admit_batch wrote its outputs"
            );
            self.expect_err(&before, "admit_batch with a bad indptr", r, |e| {
                matches!(e, KvError::InvalidArgument(_))
            })?;
        }
        // The three calls, on a clone.
        let mut twin = self.a.clone();
        let mut ids = Vec::new();
        twin.create_tables(prompts.len(), &mut ids)
            .map_err(err_str("create_tables"))?;
        let (head_ptr, head_flat) =
            csr(&mut prompts.iter().map(|p| &p[..p.len().saturating_sub(1)]));
        let mut hits = Vec::new();
        twin.adopt_prefix_batch(
            &ids,
            &head_ptr,
            BlockKeys::Tokens(&head_flat),
            salt_bytes(salt),
            &mut hits,
        )
        .map_err(err_str("adopt_prefix_batch"))?;
        let taken = before.available - twin.num_available_blocks();
        let counts: Vec<usize> = prompts
            .iter()
            .zip(&hits)
            .map(|(p, &h)| p.len() - h as usize)
            .collect();
        let rest: Vec<i64> = prompts
            .iter()
            .zip(&hits)
            .flat_map(|(p, &h)| p[h as usize..].to_vec())
            .collect();
        let mut want = BatchAppend::default();
        let r3 = twin.append_batch_with(&ids, &counts, Some(&rest), &mut want);
        let (mut tables, mut got_hits) = (vec![SENTINEL], vec![SENTINEL]);
        let mut out = BatchAppend {
            slots: vec![SENTINEL],
            ..BatchAppend::default()
        };
        let r = self.a.admit_batch(
            &indptr,
            &flat,
            salt_bytes(salt),
            &mut tables,
            &mut got_hits,
            &mut out,
        );
        match r3 {
            Err(KvError::OutOfBlocks { needed, .. }) => {
                ensure!(
                    untouched(&tables, &got_hits, &out),
                    "a failed admit_batch wrote its outputs"
                );
                return self.expect_oob(&before, "admit_batch", r, needed + taken);
            }
            r3 => r3.map_err(err_str("append_batch_with after adoption"))?,
        }
        r.map_err(err_str("admit_batch"))?;
        ensure_eq!(tables[1..], ids[..], "admit_batch table ids");
        ensure_eq!(got_hits[1..], hits[..], "admit_batch hits");
        ensure_eq!(out.slots[1..], want.slots[..], "admit_batch slots");
        let shifted: Vec<i64> = out.indptr.iter().map(|&x| x - 1).collect();
        ensure_eq!(shifted, want.indptr, "admit_batch indptr");
        ensure!(
            out.cow_src.is_empty() && out.cow_dst.is_empty() && want.cow_src.is_empty(),
            "admission copied on write"
        );
        ensure_eq!(
            out.num_registered,
            want.num_registered,
            "admit_batch registrations"
        );
        ensure_eq!(self.a.stats(), twin.stats(), "stats after admit_batch");
        ensure_eq!(
            self.a.free_queue(),
            twin.free_queue(),
            "free queue after admit_batch"
        );
        ensure_eq!(
            self.a.ref_counts(),
            twin.ref_counts(),
            "ref counts after admit_batch"
        );
        // The model learns the new tables: the hit prefix, then the appended rest.
        for (k, p) in prompts.iter().enumerate() {
            ensure_eq!(
                self.blocks(ids[k])?,
                twin.block_table(ids[k]).unwrap().to_vec(),
                "admitted block table"
            );
            let hit = hits[k] as usize;
            for j in 1..=hit / bs {
                ensure!(
                    self.m.registered.contains(&(salt, p[..j * bs].to_vec())),
                    "admit_batch hit {:?} with salt {salt}, never registered",
                    &p[..j * bs]
                );
            }
            self.add_table(ids[k], p[..hit].to_vec(), salt, hit / bs)?;
            let ti = self.m.tables.len() - 1;
            self.m.tables[ti].chain_salt = salt;
            let (lo, hi) = (out.indptr[k] as usize, out.indptr[k + 1] as usize);
            let seg = out.slots[lo..hi].to_vec();
            self.write_appended(ti, hit, &seg, Some(&p[hit..]), false)?;
            let full = p.len() / bs;
            for j in hit / bs + 1..=full {
                self.m.registered.insert((salt, p[..j * bs].to_vec()));
            }
            self.m.tables[ti].hashed = full;
        }
        Ok(())
    }

    fn op_keys(&mut self, n: usize, salt: u8) -> Res {
        let bs = self.m.bs;
        let need = n.div_ceil(bs);
        if need > self.a.num_available_blocks() {
            return Ok(());
        }
        let ti = self.create(salt)?;
        self.append_checked(ti, n, None, false)?;
        let t = self.m.tables[ti].clone();
        let full = n / bs;
        // One key per full block: its values' bytes (distinct values, distinct keys).
        let key_of =
            |vals: &[i64]| -> Vec<u8> { vals.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let rows: Vec<u8> = t.tokens[..full * bs].chunks(bs).flat_map(key_of).collect();
        let keys = BlockKeys::Hashes {
            bytes: &rows,
            width: 8 * bs,
        };
        let before = self.snapshot();
        let bad = self.a.register_prefix_keys(
            t.id,
            BlockKeys::Hashes {
                bytes: &rows,
                width: 0,
            },
            None,
        );
        self.expect_err(&before, "block hashes of width 0", bad, |e| {
            matches!(e, KvError::InvalidArgument(_))
        })?;
        let r = self
            .a
            .register_prefix_keys(t.id, keys, salt_bytes(salt))
            .map_err(err_str("register_prefix_keys"))?;
        ensure_eq!(
            r,
            full,
            "fresh values: every block newly registered by its key"
        );
        let m = &mut self.m.tables[ti];
        (m.hashed, m.tracked, m.chain_salt) = (full, n % bs == 0, salt);
        let probe = self.create(salt)?;
        let pid = self.m.tables[probe].id;
        let by_ids = self
            .a
            .adopt_prefix(pid, &t.tokens, salt_bytes(salt))
            .map_err(err_str("adopt_prefix by ids"))?;
        ensure_eq!(by_ids, 0, "token ids hit blocks registered by engine keys");
        self.op_free(&[probe], false)?;
        let probe = self.create(salt)?;
        let pid = self.m.tables[probe].id;
        let hit = self
            .a
            .adopt_prefix_keys(pid, keys, salt_bytes(salt))
            .map_err(err_str("adopt_prefix_keys"))?;
        ensure_eq!(hit, full * bs, "adopting by the registered keys");
        ensure_eq!(
            self.blocks(pid)?,
            self.blocks(t.id)?[..full],
            "adopted blocks"
        );
        let p = &mut self.m.tables[probe];
        p.tokens = t.tokens[..hit].to_vec();
        (p.hashed, p.tracked, p.chain_salt) = (full, true, salt);
        Ok(())
    }

    fn op_reset(&mut self) -> Res {
        let before = self.a.stats();
        let dropped = self.a.reset_prefix_cache();
        let after = self.a.stats();
        ensure_eq!(
            dropped,
            before.num_cached_blocks,
            "reset_prefix_cache dropped"
        );
        ensure_eq!(after.num_cached_blocks, 0, "cached blocks after reset");
        ensure_eq!(
            after.num_free_blocks,
            before.num_free_blocks + dropped,
            "free blocks after reset"
        );
        ensure_eq!(
            after.num_used_blocks,
            before.num_used_blocks,
            "used blocks after reset"
        );
        Ok(())
    }

    // ---------------------------------------------------------------------- bad ids

    fn op_bad_id(&mut self, bad: BadId, call: IdCall) -> Res {
        let beyond = (1i64 << 20) + 3;
        let (id, expected) = match bad {
            BadId::Freed(i) if !self.m.freed.is_empty() => {
                let id = self.m.freed[i % self.m.freed.len()];
                (id, KvError::TableFreed(id))
            }
            BadId::FutureGeneration(i) if !self.m.tables.is_empty() => {
                let id = self.m.tables[i % self.m.tables.len()].id + (1 << 32);
                (id, KvError::UnknownTable(id))
            }
            BadId::Negative => (-1, KvError::UnknownTable(-1)),
            _ => (beyond, KvError::UnknownTable(beyond)),
        };
        let is_expected = |e: &KvError| *e == expected;
        // A valid table listed before the bad one in batch calls.
        let live: Vec<TableId> = self.ids().into_iter().take(1).collect();
        let mut with_bad = live.clone();
        with_bad.push(id);
        let before = self.snapshot();
        let what = format!("{call:?} on bad id {id}");
        match call {
            IdCall::Append => {
                let mut out = Vec::new();
                let r = self.a.append(id, 1, &mut out);
                ensure!(out.is_empty(), "{what} wrote slots");
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::AppendBatch => {
                let counts = vec![1; with_bad.len()];
                let (mut s, mut ip, mut cs, mut cd) = (vec![], vec![], vec![], vec![]);
                let r = self
                    .a
                    .append_batch(&with_bad, &counts, &mut s, &mut ip, &mut cs, &mut cd);
                ensure!(s.is_empty() && ip.is_empty(), "{what} wrote slots");
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::Fork => {
                let r = self.a.fork(id);
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::Free => {
                let r = self.a.free(id);
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::FreeBatch => {
                let r = self.a.free_batch(&with_bad);
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::Compact => {
                let mut plan = CompactionPlan::default();
                let r = self.a.compact(id, Keep::Positions(&[]), &mut plan);
                ensure!(plan.is_empty(), "{what} wrote a plan");
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::CompactBatch => {
                let indptr = vec![0i64; with_bad.len() + 1];
                let mut plan = CompactionPlan::default();
                let mut pip = Vec::new();
                let r = self
                    .a
                    .compact_batch(&with_bad, &indptr, &[], &mut plan, &mut pip);
                ensure!(plan.is_empty() && pip.is_empty(), "{what} wrote a plan");
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::Register => {
                let r = self.a.register_prefix(id, &[], None);
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::Adopt => {
                let r = self.a.adopt_prefix(id, &[0, 1, 2, 3], None);
                self.expect_err(&before, &what, r, is_expected)
            }
            IdCall::Reads => {
                let e = Some(expected.clone());
                ensure_eq!(self.a.num_tokens(id).err(), e, "{what}: num_tokens");
                ensure_eq!(self.a.block_table(id).err(), e, "{what}: block_table");
                ensure_eq!(
                    self.a.blocks_needed(id, 1).err(),
                    e,
                    "{what}: blocks_needed"
                );
                let mut out = Vec::new();
                ensure_eq!(self.a.slots(id, &mut out).err(), e, "{what}: slots");
                ensure!(out.is_empty(), "{what}: slots wrote output");
                self.unchanged(&before, &what)
            }
            IdCall::Layouts => {
                let r = self.a.flashinfer_layout(&with_bad);
                self.expect_err(&before, &what, r, is_expected)?;
                let r = self.a.vllm_layout(&with_bad, None, None);
                self.expect_err(&before, &what, r, is_expected)
            }
        }
    }

    // ---------------------------------------------------------------------- checks

    /// Everything that must hold after every step.
    fn check_all(&self) -> Res {
        let (nb, bs) = (self.m.nb, self.m.bs);
        self.a
            .check_invariants()
            .map_err(|e| format!("check_invariants: {e}"))?;
        let s = self.a.stats();
        ensure_eq!(
            (s.num_blocks, s.block_size, s.capacity),
            (nb, bs, nb - 1),
            "stats sizes"
        );
        ensure_eq!(
            s.num_free_blocks + s.num_cached_blocks + s.num_used_blocks,
            s.capacity,
            "free + cached + used"
        );
        ensure_eq!(s.num_tables, self.m.tables.len(), "num_tables");
        ensure_eq!(
            self.a.num_available_blocks(),
            s.num_free_blocks + s.num_cached_blocks,
            "num_available_blocks"
        );

        let mut recount = vec![0u32; nb];
        let mut total_blocks = 0;
        let mut all_slots = Vec::new();
        for t in &self.m.tables {
            let len = t.tokens.len();
            ensure_eq!(
                self.a.num_tokens(t.id),
                Ok(len),
                "num_tokens of table {}",
                t.id
            );
            let blocks = self.blocks(t.id)?;
            ensure_eq!(
                blocks.len(),
                len.div_ceil(bs),
                "block count of table {}",
                t.id
            );
            let mut own = HashSet::new();
            for &b in &blocks {
                ensure!(
                    b != NULL_BLOCK && (b as usize) < nb,
                    "table {} lists invalid block {b}",
                    t.id
                );
                ensure!(own.insert(b), "table {} lists block {b} twice", t.id);
                recount[b as usize] += 1;
            }
            total_blocks += blocks.len();
            let slots = self.slots(t.id)?;
            let derived: Vec<i64> = (0..len)
                .map(|p| (blocks[p / bs] as usize * bs + p % bs) as i64)
                .collect();
            ensure_eq!(slots, derived, "slots of table {} vs its block table", t.id);
            let read: Vec<i64> = slots.iter().map(|&x| self.m.mem[x as usize]).collect();
            ensure!(
                read == t.tokens,
                "memory of table {} (blocks {blocks:?}) reads {read:?}, the model holds {:?}",
                t.id,
                t.tokens
            );
            all_slots.push(slots);
        }
        let refs = self.a.ref_counts();
        ensure_eq!(*refs, *recount, "ref counts vs block tables");
        let used = recount.iter().filter(|&&r| r > 0).count();
        let shared = recount.iter().filter(|&&r| r > 1).count();
        ensure_eq!(s.num_used_blocks, used, "num_used_blocks vs block tables");
        ensure_eq!(
            s.num_shared_blocks,
            shared,
            "num_shared_blocks vs block tables"
        );
        ensure!(
            total_blocks >= used,
            "{total_blocks} table entries < {used} used blocks"
        );

        let queue = self.a.free_queue();
        ensure_eq!(
            queue.len(),
            s.num_free_blocks + s.num_cached_blocks,
            "free queue length"
        );
        let mut in_queue = HashSet::new();
        for &b in &queue {
            ensure!(
                b != NULL_BLOCK && (b as usize) < nb,
                "free queue holds block {b}"
            );
            ensure!(in_queue.insert(b), "free queue holds block {b} twice");
            ensure_eq!(
                recount[b as usize],
                0,
                "queued block {b} is listed by tables"
            );
        }
        for b in 1..nb {
            ensure!(
                recount[b] > 0 || in_queue.contains(&(b as BlockId)),
                "unreferenced block {b} is not in the free queue"
            );
        }

        self.check_layouts(&all_slots)?;
        for &id in &self.m.freed {
            ensure_eq!(
                self.a.num_tokens(id),
                Err(KvError::TableFreed(id)),
                "freed table"
            );
        }
        Ok(())
    }

    fn check_layouts(&self, all_slots: &[Vec<i64>]) -> Res {
        let bs = self.m.bs;
        let ids = self.ids();
        let tables: Vec<Vec<BlockId>> =
            ids.iter().map(|&id| self.blocks(id)).collect::<Res<_>>()?;
        let lens: Vec<usize> = self.m.tables.iter().map(|t| t.tokens.len()).collect();

        let fi = self
            .a
            .flashinfer_layout(&ids)
            .map_err(err_str("flashinfer_layout"))?;
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        for b in &tables {
            indices.extend(b.iter().map(|&x| x as i32));
            indptr.push(indices.len() as i32);
        }
        let last: Vec<i32> = lens
            .iter()
            .map(|&n| if n == 0 { 0 } else { ((n - 1) % bs + 1) as i32 })
            .collect();
        ensure_eq!(fi.indptr, indptr, "flashinfer indptr");
        ensure_eq!(fi.indices, indices, "flashinfer indices");
        ensure_eq!(fi.last_page_len, last, "flashinfer last_page_len");

        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(0);
        let new_tokens: Vec<i64> = lens.iter().map(|&n| n.min(self.step % 3) as i64).collect();
        for (nn, width) in [(None, None), (Some(&new_tokens[..]), Some(max_blocks + 1))] {
            let v = self
                .a
                .vllm_layout(&ids, nn, width)
                .map_err(err_str("vllm_layout"))?;
            let w = width.unwrap_or(max_blocks);
            ensure_eq!(v.width, w, "vllm width");
            let mut table = vec![NULL_BLOCK as i32; ids.len() * w];
            let mut mapping = Vec::new();
            for (i, b) in tables.iter().enumerate() {
                for (j, &x) in b.iter().enumerate() {
                    table[i * w + j] = x as i32;
                }
                let skip = nn.map_or(0, |nn| lens[i] - nn[i] as usize);
                mapping.extend_from_slice(&all_slots[i][skip..]);
            }
            let seq: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
            ensure_eq!(v.block_table, table, "vllm block_table");
            ensure_eq!(v.seq_lens, seq, "vllm seq_lens");
            ensure_eq!(v.slot_mapping, mapping, "vllm slot_mapping");
        }
        Ok(())
    }
}

fn run(nb: usize, bs: usize, ops: &[Op]) -> Res {
    let mut r = Run::new(nb, bs);
    r.check_all().map_err(|e| format!("initially: {e}"))?;
    for (step, op) in ops.iter().enumerate() {
        r.step = step;
        r.apply(op)
            .map_err(|e| format!("step {step} {op:?}: {e}"))?;
        r.check_all()
            .map_err(|e| format!("after step {step} {op:?}: {e}"))?;
    }
    Ok(())
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn allocator_matches_model((nb, bs, ops) in scenario()) {
        run(nb, bs, &ops).map_err(TestCaseError::fail)?;
    }
}
