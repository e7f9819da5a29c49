//! Unit tests for the allocator; the model-based proptest lives in `tests/model.rs`.

use super::*;

fn slots_of(a: &BlockAllocator, t: TableId) -> Vec<i64> {
    let mut v = Vec::new();
    a.slots(t, &mut v).unwrap();
    v
}

fn append(a: &mut BlockAllocator, t: TableId, n: usize) -> (Vec<i64>, AppendOutcome) {
    let mut v = Vec::new();
    let o = a.append(t, n, &mut v).unwrap();
    (v, o)
}

#[test]
fn rejects_bad_sizes() {
    assert!(matches!(
        BlockAllocator::new(1, 16),
        Err(KvError::InvalidArgument(_))
    ));
    assert!(matches!(
        BlockAllocator::new(8, 0),
        Err(KvError::InvalidArgument(_))
    ));
    assert!(BlockAllocator::new(2, 1).is_ok());
}

#[test]
fn append_hands_out_slots_and_never_the_null_block() {
    let mut a = BlockAllocator::new(4, 4).unwrap();
    let t = a.create_table().unwrap();
    let (s, o) = append(&mut a, t, 6);
    assert_eq!(o.cow, None);
    assert_eq!(s, vec![4, 5, 6, 7, 8, 9]); // blocks 1 and 2
    assert_eq!(a.block_table(t).unwrap(), &[1, 2]);
    let (s2, _) = append(&mut a, t, 2);
    assert_eq!(s2, vec![10, 11]);
    assert_eq!(a.stats().num_used_blocks, 2);
    a.check_invariants().unwrap();
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut a = BlockAllocator::new(3, 4).unwrap(); // capacity 2 blocks = 8 slots
    let t = a.create_table().unwrap();
    append(&mut a, t, 5);
    let before = (
        a.stats(),
        a.free_queue(),
        a.block_table(t).unwrap().to_vec(),
    );
    let mut out = Vec::new();
    let err = a.append(t, 4, &mut out).unwrap_err();
    assert!(matches!(
        err,
        KvError::OutOfBlocks {
            needed: 1,
            available: 0,
            capacity: 2
        }
    ));
    assert!(out.is_empty());
    assert_eq!(
        before,
        (
            a.stats(),
            a.free_queue(),
            a.block_table(t).unwrap().to_vec()
        )
    );
    // Exactly filling the budget works.
    append(&mut a, t, 3);
    assert_eq!(a.stats().num_free_blocks, 0);
}

#[test]
fn huge_append_is_out_of_blocks_not_overflow() {
    let mut a = BlockAllocator::new(3, 4).unwrap();
    let t = a.create_table().unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        a.append(t, usize::MAX, &mut out),
        Err(KvError::OutOfBlocks { .. })
    ));
    append(&mut a, t, 1);
    assert!(matches!(
        a.append(t, usize::MAX, &mut out),
        Err(KvError::OutOfBlocks { .. })
    ));
    a.check_invariants().unwrap();
}

#[test]
fn fork_shares_and_copy_on_write_privatises_the_partial_block() {
    let mut a = BlockAllocator::new(8, 4).unwrap();
    let p = a.create_table().unwrap();
    append(&mut a, p, 6);
    let c = a.fork(p).unwrap();
    assert_eq!(a.ref_counts()[1], 2);
    assert_eq!(a.ref_counts()[2], 2);
    assert_eq!(a.stats().num_shared_blocks, 2);
    let (s, o) = append(&mut a, c, 1);
    let (src, dst) = o.cow.expect("shared partial block must be copied");
    assert_eq!(src, 2);
    assert_eq!(a.block_table(c).unwrap(), &[1, dst]);
    assert_eq!(s, vec![dst as i64 * 4 + 2]);
    assert_eq!(a.ref_counts()[2], 1);
    // The parent now owns block 2 alone: no copy needed.
    let (_, o2) = append(&mut a, p, 1);
    assert_eq!(o2.cow, None);
    a.check_invariants().unwrap();
}

#[test]
fn fork_into_a_freed_slot_copies_the_parent_exactly() {
    // The child is built in the buffers the freed (longer, salted) table left behind,
    // emptied but with their capacity: the copy must still equal the parent in every field.
    let mut a = BlockAllocator::new(32, 4).unwrap();
    let old = a.create_table().unwrap();
    let tokens: Vec<i64> = (0..23).collect();
    append(&mut a, old, 23);
    a.register_prefix(old, &tokens, Some(b"old-salt")).unwrap();
    let p = a.create_table().unwrap();
    append(&mut a, p, 6);
    a.register_prefix(p, &[9, 8, 7, 6, 5, 4], None).unwrap();
    a.free(old).unwrap();
    let c = a.fork(p).unwrap();
    assert_eq!(
        c & 0xffff_ffff,
        old & 0xffff_ffff,
        "the fork reuses the freed slot"
    );
    let (parent, child) = (a.table(p).unwrap(), a.table(c).unwrap());
    assert!(parent.salt.is_none() && parent.tail == [5, 4]);
    // Every field, through the derived Debug.
    assert_eq!(format!("{parent:?}"), format!("{child:?}"));
    a.check_invariants().unwrap();
}

#[test]
fn full_shared_last_block_needs_no_copy() {
    let mut a = BlockAllocator::new(8, 4).unwrap();
    let p = a.create_table().unwrap();
    append(&mut a, p, 4);
    let c = a.fork(p).unwrap();
    let (_, o) = append(&mut a, c, 1);
    assert_eq!(o.cow, None);
    assert_eq!(a.ref_counts()[1], 2);
}

#[test]
fn free_and_double_free() {
    let mut a = BlockAllocator::new(8, 4).unwrap();
    let t = a.create_table().unwrap();
    append(&mut a, t, 9);
    a.free(t).unwrap();
    assert_eq!(a.stats().num_free_blocks, 7);
    assert_eq!(a.free(t), Err(KvError::TableFreed(t)));
    assert_eq!(a.free(12345), Err(KvError::UnknownTable(12345)));
    assert_eq!(a.free(-1), Err(KvError::UnknownTable(-1)));
    // The slot is reused under a new generation; the stale id stays dead.
    let t2 = a.create_table().unwrap();
    assert_ne!(t2, t);
    assert_eq!(a.num_tokens(t), Err(KvError::TableFreed(t)));
    assert_eq!(a.num_tokens(t2), Ok(0));
}

#[test]
fn batch_append_is_all_or_nothing() {
    let mut a = BlockAllocator::new(4, 2).unwrap(); // 3 blocks
    let t1 = a.create_table().unwrap();
    let t2 = a.create_table().unwrap();
    let (mut s, mut ip, mut cs, mut cd) = (vec![], vec![], vec![], vec![]);
    a.append_batch(&[t1, t2], &[3, 1], &mut s, &mut ip, &mut cs, &mut cd)
        .unwrap();
    assert_eq!(ip, vec![0, 3, 4]);
    assert_eq!(s.len(), 4);
    let before = a.stats();
    let (mut s2, mut ip2) = (vec![], vec![]);
    let err = a.append_batch(&[t1, t2], &[1, 2], &mut s2, &mut ip2, &mut cs, &mut cd);
    assert!(matches!(
        err,
        Err(KvError::OutOfBlocks {
            needed: 1,
            available: 0,
            ..
        })
    ));
    assert!(s2.is_empty() && ip2.is_empty());
    assert_eq!(before, a.stats());
    let dup = a.append_batch(&[t1, t1], &[0, 0], &mut s2, &mut ip2, &mut cs, &mut cd);
    assert!(matches!(dup, Err(KvError::InvalidArgument(_))));
    a.free_batch(&[t1, t2]).unwrap();
    assert_eq!(a.stats().num_tables, 0);
    assert!(a.free_batch(&[t1]).is_err());
}

#[test]
fn prefix_cache_hits_and_lru_reuse() {
    let mut a = BlockAllocator::new(6, 2).unwrap(); // 5 blocks
    let tokens = [10i64, 11, 12, 13, 14];
    let t = a.create_table().unwrap();
    append(&mut a, t, 5);
    assert_eq!(a.register_prefix(t, &tokens, None).unwrap(), 2);
    let u = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix(u, &tokens, None).unwrap(), 4);
    assert_eq!(a.block_table(u).unwrap(), &a.block_table(t).unwrap()[..2]);
    // A different salt misses.
    let v = a.create_table().unwrap();
    assert_eq!(
        a.adopt_prefix(v, &tokens, Some(b"policy=snapkv")).unwrap(),
        0
    );
    a.free_batch(&[t, u, v]).unwrap();
    let s = a.stats();
    assert_eq!((s.num_cached_blocks, s.num_free_blocks), (2, 3));
    // Never-cached blocks are handed out first, so the cached prefix survives.
    let w = a.create_table().unwrap();
    append(&mut a, w, 6);
    let x = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix(x, &tokens, None).unwrap(), 4);
    a.free(x).unwrap();
    // Now the pool must evict: the tail block (hash of tokens 12,13) goes first.
    let y = a.create_table().unwrap();
    append(&mut a, y, 1);
    let z = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix(z, &tokens, None).unwrap(), 2);
    a.check_invariants().unwrap();
}

#[test]
fn adopt_requires_an_empty_table_and_register_the_full_length() {
    let mut a = BlockAllocator::new(6, 2).unwrap();
    let t = a.create_table().unwrap();
    append(&mut a, t, 3);
    assert!(matches!(
        a.adopt_prefix(t, &[1, 2], None),
        Err(KvError::InvalidArgument(_))
    ));
    assert!(matches!(
        a.register_prefix(t, &[1, 2], None),
        Err(KvError::InvalidArgument(_))
    ));
}

/// Applies a plan sequentially to a per-slot array.
fn apply_seq(mem: &mut [i64], plan: &CompactionPlan) {
    for (&s, &d) in plan.src.iter().zip(&plan.dst) {
        mem[d as usize] = mem[s as usize];
    }
}

/// Applies a plan as one gather followed by one scatter.
fn apply_gather_scatter(mem: &mut [i64], plan: &CompactionPlan) {
    let vals: Vec<i64> = plan.src.iter().map(|&s| mem[s as usize]).collect();
    for (&d, v) in plan.dst.iter().zip(vals) {
        mem[d as usize] = v;
    }
}

#[test]
fn compaction_packs_kept_tokens_with_minimal_moves() {
    let mut a = BlockAllocator::new(8, 4).unwrap();
    let t = a.create_table().unwrap();
    let (slots, _) = append(&mut a, t, 10);
    let mut mem = vec![-1i64; 8 * 4];
    for (pos, &s) in slots.iter().enumerate() {
        mem[s as usize] = pos as i64;
    }
    let mut plan = CompactionPlan::default();
    a.compact(t, Keep::Positions(&[0, 1, 5, 6, 9]), &mut plan)
        .unwrap();
    // Blocks 1,2,3 -> 1,2: t0,t1 stay, t5,t6 move into block 1, t9 into block 2.
    assert_eq!(plan.src, vec![9, 10, 13]);
    assert_eq!(plan.dst, vec![6, 7, 8]);
    assert_eq!(a.block_table(t).unwrap(), &[1, 2]);
    assert_eq!(a.stats().num_used_blocks, 2);
    let mut m2 = mem.clone();
    apply_seq(&mut mem, &plan);
    apply_gather_scatter(&mut m2, &plan);
    let got: Vec<i64> = slots_of(&a, t).iter().map(|&s| mem[s as usize]).collect();
    let got2: Vec<i64> = slots_of(&a, t).iter().map(|&s| m2[s as usize]).collect();
    assert_eq!(got, vec![0, 1, 5, 6, 9]);
    assert_eq!(got2, got);
    a.check_invariants().unwrap();
}

#[test]
fn compaction_never_writes_a_shared_block() {
    let mut a = BlockAllocator::new(10, 4).unwrap();
    let p = a.create_table().unwrap();
    let (slots, _) = append(&mut a, p, 10);
    let c = a.fork(p).unwrap();
    let mut mem = vec![-1i64; 40];
    for (pos, &s) in slots.iter().enumerate() {
        mem[s as usize] = pos as i64;
    }
    let shared: Vec<i64> = slots.clone();
    let mut plan = CompactionPlan::default();
    let keep = [0, 2, 3, 4, 7, 8];
    a.compact(c, Keep::Positions(&keep), &mut plan).unwrap();
    let parent_blocks = a.block_table(p).unwrap().to_vec();
    for &d in &plan.dst {
        assert!(
            !parent_blocks.contains(&((d / 4) as u32)),
            "wrote into a shared block"
        );
    }
    apply_seq(&mut mem, &plan);
    let got: Vec<i64> = slots_of(&a, c).iter().map(|&s| mem[s as usize]).collect();
    assert_eq!(got, keep.to_vec());
    // The parent still reads its original tokens.
    let parent: Vec<i64> = shared.iter().map(|&s| mem[s as usize]).collect();
    assert_eq!(parent, (0..10).collect::<Vec<i64>>());
    a.check_invariants().unwrap();
}

#[test]
fn compaction_out_of_blocks_changes_nothing() {
    let mut a = BlockAllocator::new(4, 2).unwrap(); // 3 blocks
    let p = a.create_table().unwrap();
    append(&mut a, p, 6);
    let c = a.fork(p).unwrap();
    let before = (
        a.stats(),
        a.free_queue(),
        a.block_table(c).unwrap().to_vec(),
    );
    let mut plan = CompactionPlan::default();
    let err = a
        .compact(c, Keep::Positions(&[1, 2]), &mut plan)
        .unwrap_err();
    assert!(matches!(
        err,
        KvError::OutOfBlocks {
            needed: 1,
            available: 0,
            ..
        }
    ));
    assert!(plan.is_empty());
    assert_eq!(
        before,
        (
            a.stats(),
            a.free_queue(),
            a.block_table(c).unwrap().to_vec()
        )
    );
}

#[test]
fn compaction_rejects_bad_positions() {
    let mut a = BlockAllocator::new(4, 2).unwrap();
    let t = a.create_table().unwrap();
    append(&mut a, t, 4);
    let mut plan = CompactionPlan::default();
    for bad in [&[0i64, 0][..], &[2, 1], &[4], &[-1]] {
        assert!(matches!(
            a.compact(t, Keep::Positions(bad), &mut plan),
            Err(KvError::InvalidPositions(_))
        ));
    }
    assert!(matches!(
        a.compact(t, Keep::Mask(&[true, false]), &mut plan),
        Err(KvError::InvalidPositions(_))
    ));
    a.compact(t, Keep::Mask(&[true, false, false, true]), &mut plan)
        .unwrap();
    assert_eq!(a.num_tokens(t), Ok(2));
    a.compact(t, Keep::Positions(&[]), &mut plan).unwrap();
    assert_eq!(a.num_tokens(t), Ok(0));
    assert_eq!(a.stats().num_used_blocks, 0);
}

#[test]
fn compaction_drops_changed_blocks_from_the_prefix_cache() {
    let mut a = BlockAllocator::new(8, 2).unwrap();
    let tokens = [1i64, 2, 3, 4, 5, 6];
    let t = a.create_table().unwrap();
    append(&mut a, t, 6);
    a.register_prefix(t, &tokens, None).unwrap();
    let mut plan = CompactionPlan::default();
    a.compact(t, Keep::Positions(&[0, 1, 3, 4, 5]), &mut plan)
        .unwrap();
    // Block 0 is untouched and stays cached; blocks 1 and 2 changed.
    let u = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix(u, &tokens, None).unwrap(), 2);
    a.check_invariants().unwrap();
}

#[test]
fn batch_compaction_matches_one_by_one() {
    let build = || {
        let mut a = BlockAllocator::new(32, 4).unwrap();
        let ids: Vec<TableId> = (0..3).map(|_| a.create_table().unwrap()).collect();
        for (i, &t) in ids.iter().enumerate() {
            append(&mut a, t, 7 + 3 * i);
        }
        let f = a.fork(ids[0]).unwrap();
        (a, ids, f)
    };
    let keeps: [&[i64]; 3] = [&[1, 2, 6], &[0, 1, 2, 3, 9], &[]];
    let (mut a, ids, _) = build();
    let mut plan = CompactionPlan::default();
    let mut pip = Vec::new();
    let positions: Vec<i64> = keeps.concat();
    let indptr = [0, 3, 8, 8];
    a.compact_batch(&ids, &indptr, &positions, &mut plan, &mut pip)
        .unwrap();
    let (mut b, ids_b, _) = build();
    let mut plan_b = CompactionPlan::default();
    for (t, k) in ids_b.iter().zip(keeps) {
        b.compact(*t, Keep::Positions(k), &mut plan_b).unwrap();
    }
    assert_eq!(plan, plan_b);
    assert_eq!(pip.len(), 4);
    a.check_invariants().unwrap();
    assert!(matches!(
        a.compact_batch(&ids, &[0, 1, 2], &positions, &mut plan, &mut pip),
        Err(KvError::InvalidArgument(_))
    ));
}

#[test]
fn page_table_exports() {
    let mut a = BlockAllocator::new(8, 4).unwrap();
    let t1 = a.create_table().unwrap();
    let t2 = a.create_table().unwrap();
    let t3 = a.create_table().unwrap();
    append(&mut a, t1, 5);
    append(&mut a, t2, 4);
    let fi = a.flashinfer_layout(&[t1, t2, t3]).unwrap();
    assert_eq!(fi.indptr, vec![0, 2, 3, 3]);
    assert_eq!(fi.indices, vec![1, 2, 3]);
    assert_eq!(fi.last_page_len, vec![1, 4, 0]);
    let v = a
        .vllm_layout(&[t1, t2, t3], Some(&[1, 2, 0]), Some(3))
        .unwrap();
    assert_eq!(v.width, 3);
    assert_eq!(v.block_table, vec![1, 2, 0, 3, 0, 0, 0, 0, 0]);
    assert_eq!(v.seq_lens, vec![5, 4, 0]);
    assert_eq!(v.slot_mapping, vec![8, 14, 15]);
    assert!(a.vllm_layout(&[t1], None, Some(1)).is_err());
    assert!(a.vllm_layout(&[t1], Some(&[6]), None).is_err());
}

#[test]
fn reset_prefix_cache_frees_cached_blocks() {
    let mut a = BlockAllocator::new(6, 2).unwrap();
    let t = a.create_table().unwrap();
    append(&mut a, t, 4);
    a.register_prefix(t, &[1, 2, 3, 4], None).unwrap();
    a.free(t).unwrap();
    assert_eq!(a.stats().num_cached_blocks, 2);
    assert_eq!(a.reset_prefix_cache(), 2);
    assert_eq!(a.stats().num_cached_blocks, 0);
    a.check_invariants().unwrap();
}

fn step(a: &mut BlockAllocator, ids: &[TableId], counts: &[usize], tokens: &[i64]) -> BatchAppend {
    let mut out = BatchAppend::default();
    a.append_batch_with(ids, counts, Some(tokens), &mut out)
        .unwrap();
    out
}

#[test]
fn decode_step_registers_blocks_as_they_fill() {
    let mut a = BlockAllocator::new(16, 4).unwrap();
    let t = a.create_table().unwrap();
    let prompt = [1i64, 2, 3, 4, 5, 6];
    // Prefill with ids: the one full block is registered.
    assert_eq!(step(&mut a, &[t], &[6], &prompt).num_registered, 1);
    // Decode one token at a time: the second block registers when its 4th token arrives.
    assert_eq!(step(&mut a, &[t], &[1], &[7]).num_registered, 0);
    assert_eq!(step(&mut a, &[t], &[1], &[8]).num_registered, 1);
    let all = [1i64, 2, 3, 4, 5, 6, 7, 8];
    // Exactly what register_prefix of the same ids would have registered.
    assert_eq!(a.register_prefix(t, &all, None).unwrap(), 0);
    let u = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix(u, &all, None).unwrap(), 8);
    assert_eq!(a.block_table(u).unwrap(), a.block_table(t).unwrap());
    a.check_invariants().unwrap();
}

#[test]
fn chain_stops_without_ids_and_after_compaction_until_register() {
    let mut a = BlockAllocator::new(16, 2).unwrap();
    let t = a.create_table().unwrap();
    append(&mut a, t, 1); // id unknown: the chain is lost
    assert_eq!(step(&mut a, &[t], &[3], &[5, 6, 7]).num_registered, 0);
    a.register_prefix(t, &[4, 5, 6, 7], None).unwrap();
    assert_eq!(step(&mut a, &[t], &[2], &[8, 9]).num_registered, 1);
    let mut plan = CompactionPlan::default();
    a.compact(t, Keep::Positions(&[0, 2, 3]), &mut plan)
        .unwrap();
    assert_eq!(step(&mut a, &[t], &[1], &[10]).num_registered, 0);
    a.check_invariants().unwrap();
    // A compaction that keeps everything changes nothing, so the chain goes on.
    a.register_prefix(t, &[4, 6, 7, 10], None).unwrap();
    a.compact(t, Keep::Positions(&[0, 1, 2, 3]), &mut plan)
        .unwrap();
    assert_eq!(step(&mut a, &[t], &[2], &[11, 12]).num_registered, 1);
    a.check_invariants().unwrap();
}

#[test]
fn decode_registration_uses_the_adopted_salt_and_forks_diverge() {
    let mut a = BlockAllocator::new(32, 2).unwrap();
    let salt = Some(&b"lora-1"[..]);
    let t = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix(t, &[], salt).unwrap(), 0);
    step(&mut a, &[t], &[3], &[1, 2, 3]);
    let c = a.fork(t).unwrap();
    // Parent and child finish the shared partial block with different ids.
    let out = step(&mut a, &[t, c], &[1, 1], &[4, 9]);
    assert_eq!((out.num_registered, out.cow_src.len()), (2, 1));
    for (tail, blocks_of) in [([1i64, 2, 3, 4], t), ([1, 2, 3, 9], c)] {
        let probe = a.create_table().unwrap();
        assert_eq!(a.adopt_prefix(probe, &tail, None).unwrap(), 0, "unsalted");
        let probe = a.create_table().unwrap();
        assert_eq!(a.adopt_prefix(probe, &tail, salt).unwrap(), 4);
        assert_eq!(
            a.block_table(probe).unwrap(),
            a.block_table(blocks_of).unwrap()
        );
    }
    a.check_invariants().unwrap();
}

#[test]
fn append_with_ids_checks_their_number_and_changes_nothing() {
    let mut a = BlockAllocator::new(8, 2).unwrap();
    let t = a.create_table().unwrap();
    let mut out = BatchAppend::default();
    let r = a.append_batch_with(&[t], &[2], Some(&[1]), &mut out);
    assert!(
        matches!(r, Err(KvError::InvalidArgument(m)) if m.contains("one id per appended token"))
    );
    assert_eq!((out, a.num_tokens(t).unwrap()), (BatchAppend::default(), 0));
}

#[test]
fn batch_prefix_calls_match_one_by_one() {
    let prompts: [&[i64]; 3] = [&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 6, 7], &[9, 9]];
    let flat: Vec<i64> = prompts.concat();
    let indptr = [0i64, 5, 11, 13];
    let mut one = BlockAllocator::new(32, 2).unwrap();
    let mut many = BlockAllocator::new(32, 2).unwrap();
    let mut ids = Vec::new();
    many.create_tables(3, &mut ids).unwrap();
    for (&id, p) in ids.iter().zip(prompts) {
        let t = one.create_table().unwrap();
        assert_eq!(t, id);
        append(&mut one, t, p.len());
        one.register_prefix(t, p, None).unwrap();
        let mut v = Vec::new();
        many.append(id, p.len(), &mut v).unwrap();
    }
    let mut reg = Vec::new();
    many.register_prefix_batch(&ids, &indptr, BlockKeys::Tokens(&flat), None, &mut reg)
        .unwrap();
    assert_eq!(reg, [2, 1, 1]); // [1,2] is already registered for the second prompt
    let mut fresh = Vec::new();
    many.create_tables(3, &mut fresh).unwrap();
    let mut hits = Vec::new();
    many.adopt_prefix_batch(&fresh, &indptr, BlockKeys::Tokens(&flat), None, &mut hits)
        .unwrap();
    for (i, &t) in fresh.iter().enumerate() {
        let u = one.create_table().unwrap();
        assert_eq!(
            one.adopt_prefix(u, prompts[i], None).unwrap() as i64,
            hits[i]
        );
        assert_eq!(one.block_table(u).unwrap(), many.block_table(t).unwrap());
    }
    assert_eq!(one.free_queue(), many.free_queue());
    // All or nothing: a non-empty table in the batch fails before anything is adopted.
    let before = many.ref_counts().to_vec();
    let mut more = Vec::new();
    many.create_tables(1, &mut more).unwrap();
    let bad = [more[0], fresh[0]];
    let r = many.adopt_prefix_batch(
        &bad,
        &[0, 5, 10],
        BlockKeys::Tokens(&flat[..10]),
        None,
        &mut hits,
    );
    assert!(matches!(r, Err(KvError::InvalidArgument(_))));
    assert_eq!(
        (many.ref_counts(), many.num_tokens(more[0]).unwrap()),
        (&before[..], 0)
    );
    let r = many.register_prefix_batch(&ids, &[0, 5, 11], BlockKeys::Tokens(&flat), None, &mut reg);
    assert!(matches!(r, Err(KvError::InvalidArgument(m)) if m.contains("indptr must have")));
    many.check_invariants().unwrap();
}

#[test]
fn engine_keys_register_and_adopt_like_token_ids() {
    let mut a = BlockAllocator::new(16, 2).unwrap();
    let t = a.create_table().unwrap();
    append(&mut a, t, 5);
    let rows: Vec<u8> = (0u8..32).collect(); // two 16-byte keys
    let keys = BlockKeys::Hashes {
        bytes: &rows,
        width: 16,
    };
    let short = BlockKeys::Hashes {
        bytes: &rows[..16],
        width: 16,
    };
    assert!(matches!(
        a.register_prefix_keys(t, short, None),
        Err(KvError::InvalidArgument(m)) if m.contains("one row per full block of the table (2)")
    ));
    assert_eq!(a.register_prefix_keys(t, keys, Some(b"s")).unwrap(), 2);
    let u = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix_keys(u, keys, Some(b"s")).unwrap(), 4);
    let v = a.create_table().unwrap();
    assert_eq!(a.adopt_prefix_keys(v, keys, None).unwrap(), 0);
    // An adopted table's chain is known: token ids continue it.
    let out = step(&mut a, &[u], &[2], &[7, 8]);
    assert_eq!(out.num_registered, 1);
    a.check_invariants().unwrap();
}
