"""Merging the evicted tokens into the kept ones (``merge=``) and RazorAttention's compensation
token. Plans come from the Rust core (``ems_plan``, ``kvmerger_plan``, ``cam_plan``) and are
applied with :func:`kvcore.kernels.apply_merge`.
"""

from __future__ import annotations

import numpy as np
import torch

from kvcore._kvcore import MergePlan
from kvcore.cache.config import MergeConfig
from kvcore.cache.formats.base import SIDES
from kvcore.cache.tier import LowTier
from kvcore.scoring import ScoreInputs


class Merges(LowTier):
    """Merges of one compression, applied in place before the compaction."""

    def _init_merges(self, mc: MergeConfig) -> None:
        self.merge = mc.method
        self.merge_threshold = float(mc.threshold)
        self.merge_sigma = None if mc.sigma is None else float(mc.sigma)
        self.merge_window = 64 if mc.window is None else mc.window
        self._merge_rng = np.random.default_rng(0 if mc.seed is None else mc.seed)

    def _merge_evicted(
        self,
        inp: ScoreInputs,
        keep: torch.Tensor,
        slots: torch.Tensor,
        skip: torch.Tensor | None = None,
    ) -> None:
        """Merges each stream's evicted valid tokens into its kept ones with the cache's
        ``merge`` method (one plan per stream, applied in place by :meth:`_apply_plan`; the
        kept set does not change). ``skip``: ``(B, H)`` rows that merge nothing (they folded
        their dropped tokens into a compensation slot)."""
        b, h, t = keep.shape
        valid = inp.valid.reshape(b * h, t).cpu()
        kept = keep.reshape(b * h, t).cpu()
        flat_slots = slots.reshape(b * h, t)
        if inp.queries is not None:
            from kvcore.scoring import window_attention

            attn = window_attention(inp)
        else:
            attn = inp.accumulated
        attn = attn.reshape(b * h, t).float().clamp(min=0.0).cpu()
        skipped = torch.zeros(b * h, dtype=torch.bool) if skip is None else skip.reshape(-1).cpu()
        for r in range(b * h):
            if skipped[r]:
                continue
            idx = torch.nonzero(valid[r], as_tuple=True)[0]
            retained = torch.nonzero(kept[r][idx], as_tuple=True)[0]
            if len(retained) == len(idx) or len(retained) == 0:
                continue
            s = flat_slots[r, idx]
            keys = self._read("k", s).float()
            plan = self._merge_plan(
                np.ascontiguousarray(keys.cpu().numpy()),
                np.ascontiguousarray(attn[r, idx].numpy()),
                retained.numpy().astype(np.int64),
            )
            if len(plan.src) == 0:
                continue
            assert np.array_equal(plan.kept_positions(), retained.numpy())
            self._apply_plan(plan, s, keys, merge_keys=self.merge != "cam")

    def _merge_plan(self, keys: np.ndarray, attn: np.ndarray, retained: np.ndarray) -> MergePlan:
        """The merge plan of one stream: ``keys`` ``(n, D)`` float32, ``attn`` ``(n,)``
        float32 >= 0, ``retained`` the policy's kept positions (increasing). Every plan
        keeps exactly ``retained`` (``kept_positions()``)."""
        from kvcore import _kvcore

        n = len(attn)
        if self.merge == "ems":
            return _kvcore.ems_plan(keys, attn, retained, self.merge_threshold)
        is_kept = np.zeros(n, dtype=bool)
        is_kept[retained] = True
        if self.merge == "cam":
            evicted = np.flatnonzero(~is_kept).astype(np.int64)
            draws = self._merge_rng.random(len(evicted), dtype=np.float32)
            return _kvcore.cam_plan(attn, evicted, draws, self.merge_window)
        # KVMerger: kept tokens outrank evicted ones as pivots (the most attended kept token
        # of a run); a run's other kept tokens stay verbatim, a run without one is dropped.
        boost = (attn + (float(attn.max()) + 1.0) * is_kept).astype(np.float32)
        raw = _kvcore.kvmerger_plan(keys, boost, self.merge_threshold, self.merge_sigma, n)
        src, dst, w = raw.src, raw.dst, raw.weight.astype(np.float64)
        take = ~is_kept[src] | (src == dst)  # evicted members, and the pivot itself
        take &= is_kept[dst]  # a run merged into an evicted pivot has no host: dropped
        total = np.zeros(n)
        np.add.at(total, dst[take], w[take])
        merged = np.zeros(n, dtype=bool)
        merged[src[take & (src != dst)]] = True
        evicted = np.flatnonzero(~is_kept & ~merged).astype(np.int64)
        weight = (w[take] / total[dst[take]]).astype(np.float32)
        return _kvcore.MergePlan(n, src[take], dst[take], weight, evicted)

    def _apply_plan(
        self, plan: MergePlan, s: torch.Tensor, keys: torch.Tensor, *, merge_keys: bool
    ) -> None:
        """Applies a merge plan over one stream's slots ``s`` with
        :func:`kvcore.kernels.apply_merge` (CUDA kernel on CUDA with CuPy, the torch reference
        otherwise): the destination rows of V (and K when ``merge_keys``) are rewritten and
        ``slot_count`` follows ``MergeBook``'s mass rule (a removed source hands its mass to
        its destinations in proportion to the entry weights). The removed slots are left for
        the compaction that follows.

        Args:
            plan: a ``kvcore.MergePlan`` over ``len(s)`` slots.
            s: ``(n,)`` int64 slots of the stream, in stream order.
            keys: ``(n, D)`` float32 keys of those slots (already read).
        """
        from kvcore import kernels

        dev = self.device
        src = torch.from_numpy(plan.src).to(dev)
        dst = torch.from_numpy(plan.dst).to(dev)
        weight = torch.from_numpy(plan.weight).to(dev)
        evicted = torch.from_numpy(plan.evicted).to(dev)
        hosts = torch.unique(dst)
        values = self._read("v", s).float()
        merged_v, counts = kernels.apply_merge(
            values, src, dst, weight, self.slot_count[s].contiguous(), evicted
        )
        assert counts is not None
        if merge_keys:
            merged_k, _ = kernels.apply_merge(keys.float().contiguous(), src, dst, weight)
            self._write("k", s[hosts], merged_k[hosts].to(self.dtype))
        self._write("v", s[hosts], merged_v[hosts].to(self.dtype))
        self.slot_count[s[hosts]] = counts[hosts]

    def _fold(self, s: torch.Tensor) -> None:
        """RazorAttention's compensation token: the count-weighted mean of the K and V of
        slots ``s`` is written into the first of them, which counts them all (``slot_count``)."""
        w = self.slot_count[s][:, None]
        dst = s[:1]
        for side in SIDES:
            mean = (self._read(side, s).float() * w).sum(0, keepdim=True) / w.sum()
            self._write(side, dst, mean.to(self.dtype))
        self.slot_count[dst] = w.sum()
