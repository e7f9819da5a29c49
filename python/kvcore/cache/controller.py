"""The controller: the schedule's pending steps, flush, compression, compaction, re-rotation.

One compression of a layer: gather the stored tokens (:class:`~kvcore.scoring.ScoreInputs`),
select (:func:`kvcore.cache.selection.layer_selection`, the policy's Rust selection), decide
everything that can fail, then fold / merge / demote, one ``compact_batch`` over the layer's
tables and one :func:`kvcore.kernels.compact_pools` call, and re-rotate the keys with
``positions="compact"``.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore.cache.merges import Merges
from kvcore.cache.selection import fold_plan, layer_selection
from kvcore.policies.base import Need
from kvcore.scoring import ScoreInputs


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-encoded keys by ``delta`` positions (``rotate_half`` convention).

    Args:
        keys: ``(n, D)`` float keys already rotated at their old positions.
        delta: ``(n,)`` int64 new position minus old position.
        inv_freq: ``(R / 2,)`` float32 the layer's RoPE frequencies (scaling already folded
            in, as transformers' ``rotary_emb.inv_freq``); dimensions past ``R`` are not rotated.

    Returns:
        ``(n, D)`` keys as if encoded at the new positions.
    """
    rot = inv_freq.numel() * 2
    freqs = delta.to(torch.float64)[:, None] * inv_freq.to(keys.device, torch.float64)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    k = keys[:, :rot].to(torch.float64)
    half = rot // 2
    rotated_half = torch.cat([-k[:, half:], k[:, :half]], dim=-1)
    out = keys.clone()
    out[:, :rot] = (k * cos + rotated_half * sin).to(keys.dtype)
    return out


class Controller(Merges):
    """Runs the compressions the schedule decides, after each step's attention."""

    def flush(self) -> None:
        """Run the compressions the schedule decided for the steps already attended."""
        for layer in sorted(self._pending):
            # Taken off first: a compression that raises is not retried by every later call.
            self._pending.discard(layer)
            self._finish_step(layer)

    def compress(self, layer_idx: int | None = None) -> None:
        """Compress now to the policy's budget (one layer, or all), whatever the schedule.

        Raises:
            IndexError: a bad layer index. ValueError: the policy needs observed queries,
                which an explicit compression does not have. Both before anything changes.
        """
        if layer_idx is not None:
            self._check_layer(layer_idx)
        policy = self.policy
        if policy is not None and policy.needs_queries and not policy.accumulates:
            raise ValueError(
                f"{policy.name} needs the observed queries of the step (cache.observe) to "
                "compress: it compresses on its schedule, not through compress()"
            )
        self.flush()
        if policy is None or self.allocator is None:
            return
        layers = range(self.num_layers) if layer_idx is None else [layer_idx]
        for layer in layers:
            self._compress_layer(layer, None)

    def _schedule_state(self, layer: int) -> tuple[bool, int]:
        """``(compressed_once, decode_steps)`` of a layer once its pending step is finished."""
        once, steps = self._compressed_once[layer], self._decode_steps[layer]
        st = self._step[layer]
        if layer in self._pending and st is not None and self.policy is not None:
            if int(st["q"]) > 1:
                once = once or self.schedule.decides(int(st["q"]), once, steps)
            else:
                steps += 1
        return once, steps

    def _will_compress(self, layer: int, q: int) -> bool:
        """Whether a step of ``q`` tokens appended to ``layer`` now will be compressed."""
        return self.schedule.decides(q, *self._schedule_state(layer))

    def _compression_pending(self) -> bool:
        """Whether :meth:`flush` would compress a layer now."""
        if self.policy is None:
            return False
        for layer in self._pending:
            st = self._step[layer]
            if st is not None and self.schedule.decides(
                int(st["q"]), self._compressed_once[layer], self._decode_steps[layer]
            ):
                return True
        return False

    def _finish_step(self, layer: int) -> None:
        st = self._step[layer]
        policy = self.policy
        if st is None or policy is None:
            return
        q = int(st["q"])
        queries = st["queries"]
        obs = None
        if queries is not None:
            w = queries.shape[2]
            pos = st["positions"]
            valid = st["valid"]
            assert isinstance(pos, torch.Tensor) and isinstance(valid, torch.Tensor)
            obs = (queries, pos[q - w :], valid[:, q - w :])
        if policy.accumulates and obs is not None:
            self._accumulate(layer, obs)
        do = self.schedule.decides(q, self._compressed_once[layer], self._decode_steps[layer])
        if q > 1:
            self._compressed_once[layer] = self._compressed_once[layer] or do
        else:
            self._decode_steps[layer] += 1
        if do:
            self._compress_layer(layer, obs)

    def _score_inputs(
        self,
        layer: int,
        obs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> tuple[ScoreInputs, torch.Tensor, np.ndarray]:
        tables = self.tables[:, layer].reshape(-1)
        lens = self.lengths[:, layer].reshape(-1)
        slots, mask = self._slots(tables, lens)
        idx = slots.clamp(min=0)
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        shape = (b, h, -1)
        inp = ScoreInputs(
            layer_idx=layer,
            keys=self._read("k", idx.reshape(-1)).reshape(b, h, -1, d),
            valid=(mask & self.slot_valid[idx]).reshape(shape),
            positions=self.slot_pos[idx].reshape(shape),
            accumulated=self.slot_score[idx].reshape(shape),
            queries=None if obs is None else obs[0],
            query_positions=None if obs is None else obs[1],
            query_valid=None if obs is None else obs[2],
            scaling=self.scaling,
            num_layers=self.num_layers,
            values=(
                self._read("v", idx.reshape(-1)).reshape(b, h, -1, d)
                if self.policy is not None and Need.VALUES in self.policy.needs
                else None
            ),
            rope=None if self._rope is None else self._rope[layer],
        )
        return inp, slots, tables

    def _accumulate(self, layer: int, obs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        from kvcore.scoring import window_attention

        inp, slots, _ = self._score_inputs(layer, obs)
        add = window_attention(inp).reshape(slots.shape)
        ok = slots >= 0
        decay = float(getattr(self.policy, "decay", 1.0))
        if decay != 1.0:
            self.slot_score[slots[ok]] *= decay
        self.slot_score[slots[ok]] += add[ok]

    def _compress_layer(
        self, layer: int, obs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    ) -> None:
        policy = self.policy
        assert policy is not None and self.allocator is not None
        b, h = self.batch_size, self.num_kv_heads
        if policy.needs_queries and not policy.accumulates and obs is None:
            raise ValueError(
                f"{policy.name} needs the observed queries of the step (cache.observe) to compress"
            )
        inp, slots, tables = self._score_inputs(layer, obs)
        chosen = layer_selection(policy, inp, self.lengths[:, layer])
        if chosen is None:
            return  # everything stays: nothing to evict
        keep, comp = chosen
        # Everything is decided before anything changes, so a refused compression leaves
        # the cache as it was.
        folds: list[torch.Tensor] = []
        if comp is not None:
            keep, folds = fold_plan(keep, comp.to(keep.device), inp.valid, slots)
        if self.positions == "compact":
            kept_n = keep.reshape(b * h, -1).sum(-1)
            if bool((kept_n != kept_n[0]).any()):
                raise ValueError(
                    "positions='compact' needs the same kept length in every stream of a layer "
                    f"(got {kept_n.tolist()})"
                )
        for dropped in folds:
            self._fold(dropped)
        if self.merge is not None:
            # Rows that folded their dropped tokens into a compensation slot merge nothing more.
            self._merge_evicted(inp, keep, slots, skip=comp)
        if self.lo_allocator is not None:
            self._demote(layer, inp, keep, slots)  # before the compaction moves slots
        keep_flat = keep.reshape(b * h, -1).cpu()
        counts = keep_flat.sum(-1)
        indptr = np.zeros(b * h + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(counts.numpy())
        positions = torch.nonzero(keep_flat, as_tuple=True)[1].numpy().astype(np.int64)
        kept_pos = inp.positions.reshape(b * h, -1)[keep.reshape(b * h, -1)]
        src_np, dst_np, _ = self.allocator.compact_batch(tables, indptr, positions)
        if len(src_np):
            src = torch.from_numpy(src_np).to(self.device)
            dst = torch.from_numpy(dst_np).to(self.device)
            self._move_slots(src, dst)
        self.lengths[:, layer] = counts.numpy().reshape(b, h)
        self.num_compressions += 1
        if self.positions == "compact":
            self._recompact_positions(layer, tables, counts, kept_pos)

    def _move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Applies a compaction plan: slot ``dst[i]`` takes what slot ``src[i]`` holds, in the
        K and V pools and in every per-slot state tensor (``slot_pos``, ``slot_valid``,
        ``slot_score``, ``slot_count``).

        Args:
            src, dst: ``(num_moves,)`` int64 slots on the cache's device, as
                ``BlockAllocator.compact_batch`` returns them (no move reads a slot that an
                earlier move wrote, so gathering every source first equals running the moves
                in order).

        The K and V pages move as the page format moves them
        (:meth:`kvcore.cache.formats.PageFormat.move`), the state tensors with them: native
        pages and the state in one :func:`kvcore.kernels.compact_pools` call (one CUDA launch
        on CUDA with CuPy, the torch reference otherwise), a quantized token's pieces in one
        more.
        """
        state = [self.slot_pos, self.slot_valid, self.slot_score, self.slot_count]
        self.format._move(self.store, src, dst, state)  # the allocator's plan: unchecked

    def _rotate_slots(self, slots: torch.Tensor, delta: torch.Tensor, layer: int) -> None:
        """Re-rotates the keys at ``slots`` by ``delta`` positions with the layer's RoPE
        frequencies: :func:`kvcore.kernels.rotate_slots` in place on a native pool of a
        kernel dtype (float32, float16, bfloat16), else read, rotate, write back (quantized
        pages are re-encoded)."""
        from kvcore import kernels

        assert self._rope is not None
        inv_freq = self._rope[layer]
        if self.format.k_layout is None and self.dtype in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            kernels.rotate_slots(self.k_pool, slots, delta, inv_freq.to(self.device))
            return
        keys = self._read("k", slots)
        self._write("k", slots, kernels.rotate_reference(keys, delta, inv_freq))

    def _recompact_positions(
        self,
        layer: int,
        tables: np.ndarray,
        counts: torch.Tensor,
        old_pos: torch.Tensor,
    ) -> None:
        n = int(counts[0])  # equal in every stream (checked before the compaction)
        assert self._rope is not None
        slots, _ = self._slots(tables, counts.numpy().astype(np.int64))
        flat = slots.reshape(-1)
        new_pos = torch.arange(n, device=self.device).repeat(len(tables))
        delta = new_pos - old_pos.to(self.device)
        self._rotate_slots(flat, delta, layer)
        self.slot_pos[flat] = new_pos
        self._next_pos[layer] = n
