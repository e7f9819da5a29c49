"""kvcore under transformers' continuous batching (docs/serving.md, sections 4 and 5).

Turn it on with one line; the engine's entry points are then unchanged::

    import kvcore.serving.hf as kvs

    handle = kvs.enable(model, policy="snapkv", budget=256, kv_bytes=64 << 20)
    outputs = model.generate_batch(prompts, generation_config=gen)
    handle.remove()                      # or: with kvs.enable(...): ...

What it does: :func:`enable` binds ``model.init_continuous_batching`` (the one attribute that
``generate_batch``, ``continuous_batching_context_manager`` and ``init_continuous_batching``
all go through) to a builder of :class:`KVCoreBatchingManager`. That manager runs the engine's
own scheduler, IOs, model runner and attention (``sdpa``, ``paged|eager`` or flash varlen) over
:class:`KVCorePagedCache`: one :class:`kvcore.BlockAllocator` table per request, K/V pools of a
fixed byte budget, kvcore's prefix cache (raw blocks, chained hashes) and copy-on-write forks.

Compression: when a request's prompt is done (and, with ``decode_every=N``, every ``N``
generated tokens), the policy scores its stored tokens in every layer and kv head, the scores
are averaged into **one keep set per request** (the engine's attention reads one length per
request), the table is compacted and its emptied blocks go back to the pool before the next
schedule, where other requests take them. Positions continue at the logical length: the
request's ``position_offset`` counts stored tokens (what the engine's memory and read
accounting needs) and the evicted count is added to the position ids of its new tokens.

Page formats: ``kv_format="native"`` (the model's dtype) or per-token quantized pages
(``"int8"``, ``"int4"``, ``"int2"``): the pools are sized from ``kv_bytes`` at the format's
real bytes per block, so quantized pages admit more tokens, and attention reads them
dequantized. KIVI pages are refused (a slot of theirs does not hold its token alone).

First build, on purpose: one keep set shared by all layers and heads of a request, no CPU swap
pool, no async batching or CUDA graphs, full attention models only. Each refusal is a
``ValueError`` naming the option (docs/serving.md, section 10 lists what comes next).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from kvcore._args import positive
from kvcore.hf import _rotate_half
from kvcore.policies import Policy
from kvcore.policies import get as get_policy
from kvcore.serving._version import SUPPORTED_TRANSFORMERS, check_transformers

check_transformers(transformers.__version__)

from transformers.generation.continuous_batching.cache import (  # noqa: E402
    group_layers_by_attn_type,
)
from transformers.generation.continuous_batching.cache_allocators import (  # noqa: E402
    FULL_ATTENTION,
)
from transformers.generation.continuous_batching.continuous_api import (  # noqa: E402
    ContinuousBatchingManager,
    ContinuousBatchProcessor,
)
from transformers.generation.continuous_batching.initialization import (  # noqa: E402
    update_cb_config_after_cache_creation,
)
from transformers.generation.continuous_batching.scheduler import (  # noqa: E402
    SCHEDULER_MAPPING,
    FIFOScheduler,
)
from transformers.generation.continuous_batching.utils import (  # noqa: E402
    find_head_dim,
)

__all__ = [
    "SERVED_FORMATS",
    "SUPPORTED_TRANSFORMERS",
    "Handle",
    "KVCoreBatchProcessor",
    "KVCoreBatchingManager",
    "KVCorePagedCache",
    "Settings",
    "check_transformers",
    "disable",
    "enable",
    "storage",
]

from kvcore.serving.paged import (  # noqa: E402
    _NO_BUDGET,
    _SERVED_NEEDS,
    SERVED_FORMATS,
    KVCorePagedCache,
    Settings,
    slot_format,
    storage,
)


class KVCoreBatchProcessor(ContinuousBatchProcessor):
    """The engine's processor, plus position deltas after the IOs and compressions after the
    update (docs/serving.md 4.3)."""

    cache: KVCorePagedCache  # type: ignore[assignment]

    def prepare_next_batch(self) -> bool:
        self.cache.begin_step()
        ready = bool(super().prepare_next_batch())
        if ready:
            deltas = [self.cache.position_delta(rid) for rid, _ in self.cache._plan]
            if any(deltas):
                counts = torch.tensor([n for _, n in self.cache._plan])
                add = torch.repeat_interleave(torch.tensor(deltas), counts)
                ios: Any = self.inputs_and_outputs
                ios.position_ids[: len(add)] += add.to(ios.position_ids.device)
        return ready

    def update_batch(self) -> None:
        super().update_batch()
        self.cache.flush_compressions()


class KVCoreBatchingManager(ContinuousBatchingManager):
    """The engine's manager with :class:`KVCorePagedCache` and :class:`KVCoreBatchProcessor`
    in place of its own (``_create_batch_processor`` is the one override)."""

    def __init__(
        self,
        model: Any,
        generation_config: Any,
        continuous_batching_config: Any,
        workload_hints: Any = None,
        *,
        settings: Settings,
    ) -> None:
        cb = copy.deepcopy(continuous_batching_config)  # the engine writes sizes into it
        _refuse_options(cb)
        if settings.kv_bytes is None and cb.num_blocks is None:
            raise ValueError(_NO_BUDGET)
        # The fast path and async IOs read the engine's block table and position offsets.
        cb.max_blocks_per_request = 0
        cb.use_async_batching = False
        cb.use_cuda_graph = False
        self.kvcore_settings = settings
        super().__init__(model, generation_config, cb, workload_hints)
        self.continuous_batching_config.use_async_batching = False

    def _create_batch_processor(self) -> ContinuousBatchProcessor:
        batch_processor = getattr(self, "batch_processor", None)
        if isinstance(batch_processor, KVCoreBatchProcessor):
            batch_processor.reset()
            return batch_processor
        cb = self.continuous_batching_config
        text_config = self.model.config.get_text_config()
        cache: Any = KVCorePagedCache(
            config=text_config,
            cb_config=cb,
            device=self.model.device,
            dtype=self.model.dtype,
            settings=self.kvcore_settings,
            scaling=_scaling(self.model),
        )
        self._use_prefix_sharing = cache.use_prefix_sharing
        self._kvcore_cache = cache
        update_cb_config_after_cache_creation(
            cb_config=cb, num_blocks=cache.num_blocks, max_batch_tokens=cache.max_batch_tokens
        )
        cb.max_blocks_per_request = 0
        scheduler_cls: Any = SCHEDULER_MAPPING.get(cb.scheduler_type, FIFOScheduler)
        scheduler = scheduler_cls(
            cache=cache,
            safety_margin=cb.safety_margin,
            max_requests_per_batch=cb.max_requests_per_batch,
        )
        return KVCoreBatchProcessor(
            cache=cache,
            config=text_config,
            generation_config=self.generation_config,
            continuous_batching_config=cb,
            logit_processor=self.logit_processor,
            input_queue=self.input_queue if self.is_tp_driver else None,
            cancel_queue=self.cancel_queue if self.is_tp_driver else None,
            output_router=self.output_router,
            background_thread_status=self.background_thread_status,
            model_device=self.model.device,
            model_dtype=self.model.dtype,
            scheduler=scheduler,
            distributed_helper=self.distributed_helper,
        )

    @property
    def kvcore_cache(self) -> KVCorePagedCache | None:
        """The kvcore cache of this manager (None before its generation loop started)."""
        cache: KVCorePagedCache | None = getattr(self, "_kvcore_cache", None)
        return cache


def _refuse_options(cb: Any) -> None:
    if getattr(cb, "cpu_offload_space", 0):
        raise ValueError(
            "kvcore.serving.hf: cpu_offload_space > 0 is not supported (the engine's swap pool "
            "copies its own block rows); preempted requests are re-prefilled instead"
        )
    if getattr(cb, "use_async_batching", None):
        raise ValueError(
            "kvcore.serving.hf: use_async_batching=True is not supported (a compression changes "
            "position_offset under a batch prepared ahead)"
        )
    graphs = getattr(cb, "use_cuda_graph", None)
    if graphs is True or (isinstance(graphs, tuple) and any(graphs)):
        raise ValueError("kvcore.serving.hf: use_cuda_graph=True is not supported yet")
    if getattr(cb, "max_blocks_per_request", None):
        raise ValueError(
            "kvcore.serving.hf: max_blocks_per_request > 0 (the decode fast path over the "
            "engine's block table) is not supported; leave it unset"
        )


def _scaling(model: Any) -> float:
    for m in model.modules():
        s = getattr(m, "scaling", None)
        if hasattr(m, "q_proj") and isinstance(s, float):
            return float(s)
    head_dim = float(find_head_dim(model.config.get_text_config()))
    return float(1.0 / math.sqrt(head_dim))


def _policy(
    policy: str | Policy | None, budget: int | None, params: dict[str, Any]
) -> Policy | None:
    if policy is None:
        if params:
            raise TypeError(f"policy parameters {sorted(params)} given without a policy")
        return None
    if isinstance(policy, str):
        pol = get_policy(policy, **params)
    elif isinstance(policy, Policy):
        if params:
            raise TypeError("policy parameters go to kvcore.policies.get, not with a Policy object")
        pol = policy
    else:
        raise TypeError(f"policy must be a registry name, a kvcore Policy or None, got {policy!r}")
    missing = set(pol.needs) - _SERVED_NEEDS
    if missing or pol.extra_inputs or pol.has_head_budgets or pol.folds_dropped:
        why = (
            f"needs {sorted(n.value for n in missing)}"
            if missing
            else "extra select inputs, per-head budgets or folded tokens"
        )
        raise ValueError(
            f"policy {pol.name!r} cannot run under continuous batching yet ({why}); the engine "
            "path keeps one keep set per request, scored from keys and observed queries "
            "(snapkv, tova, knorm, streaming and the other window- or key-scored policies)"
        )
    return pol


@dataclass
class Handle:
    """What :func:`enable` returns: ``remove()`` (or leaving ``with``) gives the model back to
    the engine's own cache. ``manager`` is the last :class:`KVCoreBatchingManager` the model
    built (None before the first), whose ``kvcore_cache.stats()`` a server can report."""

    model: Any
    settings: Settings
    hooks: list[Any]
    manager: KVCoreBatchingManager | None = None

    def remove(self) -> None:
        disable(self.model)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enable(
    model: Any,
    policy: str | Policy | None = None,
    budget: int | None = None,
    *,
    kv_format: str = "native",
    quant_group: int | None = None,
    kv_bytes: int | None = None,
    block_size: int = 16,
    decode_every: int | None = None,
    **policy_params: Any,
) -> Handle:
    """Run ``model``'s continuous batching over kvcore's cache.

    Args:
        model: a transformers model with full attention layers.
        policy: a registry name (``"snapkv"``), a :class:`kvcore.policies.Policy`, or None for
            no compression (outputs then equal the engine's own cache, token for token).
        budget: tokens a request keeps at each compression (prefix tokens adopted from other
            requests are kept on top). Required with a policy.
        kv_format: ``"native"`` (the model's dtype), or ``"int8"`` / ``"int4"`` / ``"int2"``:
            pages quantized **per token**, keys and values (groups of ``quant_group``
            channels, float16 scales and zero points). Attention reads them dequantized. Unlike
            :class:`kvcore.KVCache`, whose int pages quantize keys per channel by default, the
            serving pages cannot: the engine writes and moves slot by slot, and a per-channel
            key group spans a page's tokens. Per-token keys lose models with outlier key
            channels (Qwen2.5; docs/cache.md); KIVI formats are refused.
        quant_group: channels per quantization group of int pages (None: ``min(32,
            head_dim)``); it must divide the head size.
        kv_bytes: K/V memory in bytes; None: the ``num_blocks * page_size`` tokens of the
            continuous-batching config in the model's dtype (the engine's own cache size, so a
            quantized format holds more tokens in it).
        block_size: kvcore block size in tokens.
        decode_every: also compress every this many generated tokens.
        policy_params: parameters of a policy given by name.

    Raises:
        ValueError: an unsupported option, model, policy or format, or a size below 1.
        TypeError: arguments of the wrong type (``budget``, ``kv_bytes``, ``block_size``,
            ``decode_every``: an int by kvcore's id/count rule, not a bool or a float).
    """
    # kvcore's id/count rule (docs/errors.md): TypeError for a non-int, ValueError below 1
    block_size = positive(block_size, "block_size")
    if decode_every is not None:
        decode_every = positive(decode_every, "decode_every")
    pages = storage(kv_format, quant_group, block_size)
    if kv_bytes is not None:
        kv_bytes = positive(kv_bytes, "kv_bytes")
    pol = _policy(policy, budget, policy_params)
    if pol is not None:
        if budget is None:
            raise ValueError(f"policy {policy!r} needs budget= (tokens a request keeps)")
        budget = positive(budget, "budget")
        pol.check_budget(budget)  # e.g. SnapKV's window must fit the budget
    elif budget is not None:
        raise ValueError("budget= given without a policy")
    groups = group_layers_by_attn_type(model.config.get_text_config())
    if list(groups) != [FULL_ATTENTION]:
        raise ValueError(
            "kvcore.serving.hf supports full-attention models only, this one has layer types "
            f"{sorted(groups)}"
        )
    slot_format(model.config.get_text_config(), model.dtype, pages)  # the group fits the heads
    disable(model)
    settings = Settings(pol, int(budget or 0), kv_bytes, pages, decode_every)
    hooks = _install_query_hooks(model) if pol is not None and pol.needs_queries else []
    model.destroy_cached_continuous_batching_manager()
    cls_init: Callable[..., Any] = type(model).init_continuous_batching

    def init_continuous_batching(
        generation_config: Any = None,
        continuous_batching_config: Any = None,
        workload_hints: Any = None,
    ) -> ContinuousBatchingManager:
        cached = getattr(model, "_cached_continuous_batching_manager", None)
        if isinstance(cached, KVCoreBatchingManager):
            reused: ContinuousBatchingManager = cls_init(
                model, generation_config, continuous_batching_config, workload_hints
            )
            return reused
        from transformers import ContinuousBatchingConfig

        gen = generation_config if generation_config is not None else model.generation_config
        if gen is None:
            raise ValueError("A GenerationConfig must be provided or set in the model.")
        if gen.eos_token_id is None:
            gen.eos_token_id = -1
        cb = continuous_batching_config or ContinuousBatchingConfig()
        handle.manager = KVCoreBatchingManager(model, gen, cb, workload_hints, settings=settings)
        return handle.manager

    model.init_continuous_batching = init_continuous_batching
    handle = Handle(model, settings, hooks)
    model._kvcore_serving = handle
    return handle


def disable(model: Any) -> bool:
    """Give ``model`` back to the engine's own cache. Returns whether kvcore was enabled."""
    handle = getattr(model, "_kvcore_serving", None)
    if not isinstance(handle, Handle):
        return False
    for h in handle.hooks:
        h.remove()
    handle.hooks.clear()
    model.__dict__.pop("init_continuous_batching", None)
    del model._kvcore_serving
    cached = getattr(model, "_cached_continuous_batching_manager", None)
    if isinstance(cached, KVCoreBatchingManager):
        model.destroy_cached_continuous_batching_manager()
    return True


def _install_query_hooks(model: Any) -> list[Any]:
    """Pre-hooks on every attention module that hand the step's rotated queries to the
    serving cache (only when the call's ``cache`` is a :class:`KVCorePagedCache`)."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention module with q_proj and layer_idx")

    def pre_hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, KVCorePagedCache):
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            t = hidden.shape[1]
            q = mod.q_proj(hidden).view(1, t, -1, mod.head_dim).transpose(1, 2)
            if hasattr(mod, "q_norm"):
                q = mod.q_norm(q)
            q = q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1)
            cache.observe(int(mod.layer_idx), q)

    return [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in mods]
