"""Hugging Face transformers (v5) integration: a `Cache` on top of :class:`kvcore.KVCache`.

* :class:`KVCoreCache` is a ``transformers.Cache`` made of :class:`KVCoreLayer` (v5's
  ``CacheLayerMixin``), one per decoder layer, all sharing one paged :class:`KVCache`.
* Lengths (anchors.md, finding 3): ``get_seq_length`` is the *logical* length (positions of
  new tokens); ``get_query_offset`` and ``get_mask_sizes`` use the *stored* length (the kv
  indices the dense attention sees).
* :func:`install` adds forward hooks, without changing model code: a pre-hook on the model
  records which new tokens are padding (from ``attention_mask``); a pre-hook on each attention
  module recomputes the rotated queries of the observation window for query-aware policies.
  It returns a :class:`Hooks` handle (also a context manager) that takes them off again.
* transformers renamed the forward keyword ``past_key_values`` to ``cache`` in 5.24. The hooks
  read the cache from either keyword; :func:`cache_kwarg` names the one a model's forward
  takes, and :func:`cache_of` reads the cache back from an output of either version.
  Supported: transformers >= 5.14 (the first release whose masks ask the cache for
  ``get_query_offset``, which kvcore answers with the stored length); an older one raises at
  import.
* ``attn_implementation="kvcore"`` (registered with ``AttentionInterface``) runs
  :func:`kvcore.kernels.decode_attention` over the pages: ragged per-head budgets and padded
  batches after eviction need it; ``"sdpa"`` and ``"eager"`` work while every stream of a layer
  has the same length and no padding token is stored after an eviction.

One line::

    cache = kvcore.hf.compressed_cache(model, policy="snapkv", budget=1024)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)

(``past_key_values=`` is accepted by every supported release; 5.24 and later also take
``cache=``.)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvcore._hf_versions import (
    CACHE_KWARGS,
    MIN_TRANSFORMERS,
    _cache_from,
    cache_kwarg,
    cache_kwargs,
    cache_of,
)
from kvcore.cache import CacheConfig, CacheSnapshot, KVCache, Schedule
from kvcore.cache.config import KEYWORDS as CACHE_KEYWORDS
from kvcore.scoring import TorchPolicy, get

__all__ = [
    "MIN_TRANSFORMERS",
    "CACHE_KWARGS",
    "Hooks",
    "KVCoreCache",
    "KVCoreLayer",
    "cache_kwarg",
    "cache_kwargs",
    "cache_of",
    "compressed_cache",
    "install",
    "kv_bytes_per_token",
    "kvcore_attention",
    "prefill",
    "uninstall",
]

ATTN_NAME = "kvcore"


def kvcore_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: paged attention over the kvcore cache of this call.

    Without a kvcore cache (no cache, or another ``Cache``) it falls back to transformers'
    sdpa attention with the mask transformers built.
    """
    cache = getattr(module, "_kvcore_cache", None)
    layer_idx = int(getattr(module, "layer_idx", 0))
    if isinstance(cache, KVCoreCache) and cache.kv.has_pending_step(layer_idx):
        return cache.kv.attend(layer_idx, query), None
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out, None


AttentionInterface.register(ATTN_NAME, kvcore_attention)
# The mask is only used by the fallback; with a kvcore cache the pages carry their own lengths.
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


_NO_CROP = (
    "KVCoreCache cannot be cropped (assisted decoding rolls tokens back; an evicted cache "
    "cannot); use another Cache for speculative decoding"
)


class KVCoreLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One decoder layer's view of the shared :class:`KVCache`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: KVCoreCache, layer_idx: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.owner = owner
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner._update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv.get_stored_length(self.layer_idx) + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.kv.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("KVCoreCache cannot be reset; build a new cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVCoreCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(_NO_CROP)


class KVCoreCache(Cache):
    """A transformers ``Cache`` whose K/V live in kvcore's paged, fixed-budget pools.

    Args:
        kv: the :class:`KVCache` (its ``num_layers`` must match the model's).
    """

    def __init__(self, kv: KVCache) -> None:
        if not isinstance(kv, KVCache):
            raise TypeError(f"KVCoreCache needs a kvcore.KVCache, got {type(kv).__name__}")
        self.kv = kv
        self._valid: torch.Tensor | None = None
        self._attn_impl = "sdpa"
        super().__init__(layers=[KVCoreLayer(self, i) for i in range(kv.num_layers)])

    def _update(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Inference only: the pools hold K/V without autograd history, so a forward outside
        # torch.no_grad() neither builds a graph through the pools nor breaks the scoring.
        key_states, value_states = key_states.detach(), value_states.detach()
        valid = self._valid
        if valid is not None and valid.shape[1] != key_states.shape[2]:
            valid = None
        if self._attn_impl == ATTN_NAME:  # kvcore's attention reads the pages itself
            self.kv.append(layer_idx, key_states, value_states, valid=valid)
            return key_states, value_states
        keys, values = self.kv.update(layer_idx, key_states, value_states, valid=valid)
        if self.kv.logcount_bias and self.kv.num_compressions > 0:
            raise ValueError(
                "merged slots carry a log(count) logit bias that "
                f"{self._attn_impl!r} attention cannot apply; load the model with "
                "attn_implementation='kvcore' (or model.set_attn_implementation('kvcore'))"
            )
        if self.kv.is_ragged(layer_idx) and self.kv.num_compressions > 0:
            raise ValueError(
                f"layer {layer_idx} holds streams of different lengths or padding after an "
                f"eviction, which {self._attn_impl!r} attention cannot read; load the model "
                "with attn_implementation='kvcore' (or model.set_attn_implementation('kvcore'))"
            )
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # The causal mask compares query and kv indices in stored (physical) space.
        return self.kv.get_stored_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.kv.get_stored_length(layer_idx) + query_length, 0

    @property
    def batch_size(self) -> int:
        return self.kv.batch_size if self.kv.initialized else -1

    def memory_bytes(self) -> int:
        """Bytes of the K/V pool tensors."""
        return self.kv.memory_bytes()

    def snapshot(self) -> CacheSnapshot:
        """See :meth:`KVCache.snapshot`: ask several questions about one context."""
        return self.kv.snapshot()

    def shrink(self, capacity: int | None = None) -> int:
        """See :meth:`KVCache.shrink`: give back the pool memory a compression emptied."""
        return self.kv.shrink(capacity)

    def restore(self, snap: CacheSnapshot) -> None:
        """See :meth:`KVCache.restore`."""
        self.kv.restore(snap)

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported: tokens evicted or merged cannot be rolled back (assisted decoding
        crops its rejected draft tokens). Raises ``NotImplementedError``."""
        raise NotImplementedError(_NO_CROP)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _attn_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(
            f"{type(model).__name__}: no attention module with q_proj and layer_idx found"
        )
    return mods


def _observe(
    mod: Any, cache: KVCoreCache, policy: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Recompute the rotated queries of the observation window and hand them to the cache."""
    hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"]
    w = hidden.shape[1] if policy.observe_window is None else policy.observe_window
    w = min(w, hidden.shape[1])
    h = hidden[:, -w:]
    q = mod.q_proj(h).view(h.shape[0], w, -1, mod.head_dim).transpose(1, 2)
    if hasattr(mod, "q_norm"):
        q = mod.q_norm(q)
    c, s = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    cache.kv.observe(int(mod.layer_idx), q.to(cache.kv.dtype))


class _Registration:
    """The hooks on one model, shared by every :class:`Hooks` handle that installed them."""

    def __init__(self, model: Any, handles: list[Any]) -> None:
        self.model = model
        self.handles = handles
        self.users = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if getattr(self.model, "_kvcore_hooks", None) is self:
            del self.model._kvcore_hooks


class Hooks:
    """A handle on the hooks :func:`install` added to a model.

    ``remove()`` (or leaving a ``with`` block) releases this handle; the hooks come off when
    every handle on the model has been released, or at once with :func:`uninstall`. Removing
    twice does nothing.
    """

    def __init__(self, registration: _Registration) -> None:
        self._reg: _Registration | None = registration
        registration.users += 1

    @property
    def active(self) -> bool:
        """Whether this handle still holds the hooks."""
        return self._reg is not None and bool(self._reg.handles)

    def remove(self) -> None:
        reg, self._reg = self._reg, None
        if reg is None:
            return
        reg.users -= 1
        if reg.users <= 0:
            reg.remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install(model: Any) -> Hooks:
    """Add kvcore's forward hooks to ``model`` and return a :class:`Hooks` handle.

    The hooks only act when the call's cache (``cache=`` or ``past_key_values=``) is a
    :class:`KVCoreCache`. Installing again adds no second set of hooks; it returns another
    handle on the same ones. ``with kvcore.hf.install(model): ...`` removes them at the end.
    """
    reg = getattr(model, "_kvcore_hooks", None)
    if isinstance(reg, _Registration) and reg.handles:
        return Hooks(reg)
    attn_mods = _attn_modules(model)  # raises before anything is hooked

    def model_pre_hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = _cache_from(kwargs)
        if not isinstance(cache, KVCoreCache):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        src: torch.Tensor = ids if ids is not None else kwargs["inputs_embeds"]
        q = src.shape[1]
        mask = kwargs.get("attention_mask")
        cache._valid = None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] >= q:
            valid = mask[:, -q:].bool()
            if not bool(valid.all()):
                cache._valid = valid

    def attn_pre_hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = _cache_from(kwargs)
        if not isinstance(cache, KVCoreCache):
            mod._kvcore_cache = None
            return
        mod._kvcore_cache = cache
        cache._attn_impl = getattr(mod.config, "_attn_implementation", "sdpa")
        policy = cache.kv.policy
        if policy is None or not policy.needs_queries:
            return
        with torch.no_grad():  # the window's queries only feed the scores
            _observe(mod, cache, policy, args, kwargs)

    inner = getattr(model, "model", model)
    handles = [inner.register_forward_pre_hook(model_pre_hook, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(attn_pre_hook, with_kwargs=True) for m in attn_mods]
    reg = _Registration(model, handles)
    model._kvcore_hooks = reg
    return Hooks(reg)


def uninstall(model: Any) -> bool:
    """Remove kvcore's hooks from ``model`` whatever handles are still held. Returns whether
    there were hooks to remove."""
    reg = getattr(model, "_kvcore_hooks", None)
    if not isinstance(reg, _Registration):
        return False
    reg.remove()
    return True


def _rope(model: torch.nn.Module) -> torch.Tensor | None:
    for m in model.modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            return inv.detach()
    return None


# The default of an argument that memory= refuses when the caller gives it.
_UNSET: Any = object()

# What a memory preset decides (kvcore.presets.Preset.keywords), so a caller cannot also give.
_PRESET_PICKS = (
    "policy",
    "budget",
    "config",
    "schedule",
    "kv_format",
    "merge",
    "evicted_format",
    "block_size",
    "quant_group",
)


def _kv_shape(model: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers decoder's K/V cache."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    num_layers = int(text_cfg.num_hidden_layers)
    heads = int(getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads)
    head_dim = int(
        getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    )
    return num_layers, heads, head_dim


def kv_bytes_per_token(model: Any) -> int:
    """K/V bytes one token takes in a full cache of ``model`` (every layer, K and V, in the
    model's dtype): what a transformers ``DynamicCache`` or the engine's paged cache spends per
    token, the unit of memory targets and KV budgets."""
    num_layers, heads, head_dim = _kv_shape(model)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * num_layers * heads * head_dim * itemsize


def _preset_cache(
    model: Any,
    memory: float | None,
    memory_bytes: int | None,
    prompt_tokens: int | None,
    picked: list[str],
    keywords: dict[str, Any],
) -> KVCoreCache:
    """:func:`compressed_cache` for a memory target (its arguments, checked here)."""
    from kvcore import presets

    if memory is None and memory_bytes is None:
        raise ValueError(
            "prompt_tokens= goes with memory= or memory_bytes= (a memory preset); a recipe "
            "takes budget= in tokens instead"
        )
    if memory is not None and memory_bytes is not None:
        raise ValueError("give memory= (a share of the full cache) or memory_bytes=, not both")
    name = "memory" if memory is not None else "memory_bytes"
    if prompt_tokens is None:
        raise ValueError(
            f"{name}= needs prompt_tokens= (the length of the prompt the cache will hold): "
            "the preset's budget is a share of it"
        )
    if picked:
        raise ValueError(
            f"{name}= picks {', '.join(picked)} itself (kvcore.presets.pick); give either a "
            "memory target or a recipe"
        )
    presets.check_prompt_tokens(prompt_tokens)
    if memory_bytes is not None:
        memory = presets.fraction_of(memory_bytes, kv_bytes_per_token(model) * prompt_tokens)
    preset = presets.pick(memory)  # type: ignore[arg-type]
    return compressed_cache(model, **preset.keywords(prompt_tokens), **keywords)


def compressed_cache(
    model: Any,
    policy: str | TorchPolicy | None = _UNSET,
    budget: int | torch.Tensor = _UNSET,
    *,
    config: CacheConfig | None = None,
    memory: float | None = None,
    memory_bytes: int | None = None,
    prompt_tokens: int | None = None,
    **keywords: Any,
) -> KVCoreCache:
    """A ready :class:`KVCoreCache` for ``model`` (hooks installed).

    Either a recipe (``policy``, ``budget``, storage keywords) or a memory target
    (``memory=`` or ``memory_bytes=`` with ``prompt_tokens=``), for which
    :func:`kvcore.presets.pick` chooses the recipe the committed quality grid found most
    accurate within that many bytes; it then decides the policy, budget, schedule and storage
    keywords, and giving any of them too raises ValueError.

    Args:
        model: a transformers decoder (Llama-like attention modules with ``q_proj``).
        policy: a policy name of the registry (``kvcore.policies.names()``, built by
            :func:`kvcore.scoring.get`), a policy, or None (no eviction). Default: ``"snapkv"``.
        budget: tokens per (layer, kv-head) kept after compression, or a
            ``(num_layers, num_kv_heads)`` int tensor. Default: 1024.
        memory: a share of the full cache's K/V bytes for a prompt of ``prompt_tokens``, in
            (0, 1] (``0.25``: 4x less memory).
        memory_bytes: a byte budget instead (int >= 1), as a share of that full cache
            (:func:`kvcore.presets.fraction_of`).
        prompt_tokens: the length of the prompt the cache will hold (the budget is a share of
            it); needed by, and only allowed with, ``memory`` or ``memory_bytes``.
        config: the cache's :class:`~kvcore.cache.CacheConfig` (schedule, capacity, page
            format, merges, MiKV tier); None: built from ``keywords``.
        **keywords: :class:`KVCache`'s keywords (``schedule``, ``positions``, ``capacity``,
            ``capacity_bytes``, ``block_size``, ``kv_format``, ``quant_group``,
            ``key_quant``, ``merge``,
            ``merge_threshold``, ``merge_sigma``, ``merge_window``, ``merge_seed``,
            ``merge_bias``, ``evicted_format``, ``evicted_capacity``; ``kv_format="int4"``
            stores quantized pages, ``merge="ems"``, ``"kvmerger"`` or ``"cam"`` merges
            evicted tokens into kept ones, ``evicted_format="int2"`` keeps them in a 2-bit
            tier (MiKV; needs ``attn_implementation="kvcore"``)) when ``config`` is None; the
            others are passed to the policy (e.g. ``window=16``).

    Raises:
        TypeError: with ``memory``/``memory_bytes``: ``prompt_tokens`` or ``memory_bytes``
            not an int, ``memory`` not a real number.
        ValueError: with ``memory``/``memory_bytes``: ``prompt_tokens`` missing or below 1,
            both targets given, a keyword the preset decides given, the target out of range
            or smaller than every measured recipe.
    """
    if memory is not None or memory_bytes is not None or prompt_tokens is not None:
        given = {"policy": policy, "budget": budget, "config": config}
        picked = [k for k, v in given.items() if v is not _UNSET and v is not None]
        picked += [k for k in keywords if k in _PRESET_PICKS or k not in CACHE_KEYWORDS]
        return _preset_cache(model, memory, memory_bytes, prompt_tokens, picked, keywords)
    policy = "snapkv" if policy is _UNSET else policy
    budget = 1024 if budget is _UNSET else budget
    cache_kw = {k: v for k, v in keywords.items() if k in CACHE_KEYWORDS}
    policy_params = {k: v for k, v in keywords.items() if k not in CACHE_KEYWORDS}
    if config is None:
        if cache_kw.get("schedule") is not None and not isinstance(cache_kw["schedule"], Schedule):
            raise TypeError(
                "schedule must be a kvcore.cache.Schedule or None, got "
                f"{type(cache_kw['schedule']).__name__}"
            )
        config = CacheConfig.from_keywords(**cache_kw)
    elif not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
    elif cache_kw:
        raise ValueError(
            f"give config= or the keywords it holds, not both (got {', '.join(sorted(cache_kw))})"
        )
    num_layers, heads, head_dim = _kv_shape(model)
    if policy_params and not isinstance(policy, str):
        # Only a policy built here by name takes parameters: say so rather than drop them.
        raise TypeError(
            f"compressed_cache: unknown keyword(s) {', '.join(sorted(policy_params))}: not a "
            f"cache keyword ({', '.join(sorted(CACHE_KEYWORDS))}), and policy parameters "
            "need a policy given by name"
        )
    pol = get(policy, budget, **policy_params) if isinstance(policy, str) else policy
    param = next(model.parameters())
    pol_rope = pol is not None and pol.needs_rope
    kv = KVCache(
        num_layers,
        heads,
        head_dim,
        dtype=param.dtype,
        device=param.device,
        policy=pol,
        rope=_rope(model) if config.positions == "compact" or pol_rope else None,
        config=config,
    )
    install(model)
    return KVCoreCache(kv)


@torch.no_grad()
def prefill(
    model: Any,
    input_ids: torch.Tensor,
    cache: KVCoreCache,
    chunk: int | None = None,
    progress: Any = None,
) -> torch.Tensor:
    """Run the prompt through ``model`` into ``cache``, in chunks of ``chunk`` tokens
    (default: the cache schedule's chunk, else all at once). Returns the last logits
    ``(B, vocab)``. ``progress(done, total)`` is called after each chunk."""
    chunk = chunk or cache.kv.schedule.chunk or input_ids.shape[1]
    total = input_ids.shape[1]
    key = cache_kwarg(model)
    logits = None
    for start in range(0, total, chunk):
        part = input_ids[:, start : start + chunk]
        out = model(input_ids=part, use_cache=True, logits_to_keep=1, **{key: cache})
        logits = out.logits[:, -1]
        if progress is not None:
            progress(min(start + chunk, total), total)
    assert logits is not None
    last: torch.Tensor = logits
    return last
