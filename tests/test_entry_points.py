"""Every case of issue 14, one test each: the call fails cleanly with the documented exception.

Each case runs in its own interpreter (tests/isolated.py), so a regression that aborts the
process (a failed allocation), hangs, or lets a ``PanicException`` escape fails its own test
with the call named, instead of killing the run. See docs/errors.md for the rules tested here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from isolated import Outcome, outcome, outcomes

_GROUPS: dict[str, dict[str, Outcome]] = {}


def run(group: dict[str, Any], name: str, timeout: float = 30.0) -> Outcome:
    """The outcome of case ``name`` of ``group``: every case of a group runs in one batch of
    fresh interpreters (tests/isolated.py), the first time one of them is asked for."""
    key = str(id(group))
    if key not in _GROUPS:
        names = sorted(group)
        codes = [group[n] if isinstance(group[n], str) else group[n][0] for n in names]
        _GROUPS[key] = dict(zip(names, outcomes(codes, timeout), strict=True))
    return _GROUPS[key][name]


# Sizes: "too large" is far beyond any machine (2**40 and more), so no case allocates much.
HUGE = "np.broadcast_to(np.{dtype}(0), {shape})"
TOO_LARGE = r"is too large: \d+ entries of \d+ bytes exceed the \d+ bytes of memory"

ABORTS = {
    # Size arguments that decide an output's length.
    "append": (
        "a = k.BlockAllocator(2**20, 2**20); t = a.create_table(); a.append(t, 2**38)",
        "num_tokens",
    ),
    "append_batch": (
        "a = k.BlockAllocator(2**20, 2**20); t = a.create_table()\n"
        "a.append_batch(np.array([t]), 2**38)",
        "num_tokens",
    ),
    "append_batch_sum": (
        "a = k.BlockAllocator(2**20, 2**20); ts = a.create_tables(2)\n"
        "a.append_batch(ts, np.array([2**37, 2**37]))",
        r"sum\(num_tokens\)",
    ),
    "ScoreState_40": ("k.ScoreState(2**40)", "num_rows"),
    "ScoreState_62": ("k.ScoreState(2**62)", "num_rows"),
    "budget_uniform_40": ("k.budget_uniform(10, 2**40, 5)", "num_rows"),
    "budget_uniform_62": ("k.budget_uniform(10, 2**62, 5)", "num_rows"),
    "budget_pyramid": ("k.budget_pyramid(2**40, 100, 10, 2)", "num_layers"),
    "minicache_layer_pairs_40": ("k.minicache_layer_pairs(2**40)", "num_layers"),
    "minicache_layer_pairs_62": ("k.minicache_layer_pairs(2**62)", "num_layers"),
    "plan_razor": ("k.plan_razor(np.array([True]), 2**40, 3, 6)", r"n \* len\(retrieval\)"),
    "plan_streaming": ("k.plan_streaming(2**62, 4, 1, 1)", "num_rows"),
    "MergePlan": (
        "k.MergePlan(2**62, np.array([0]), np.array([0]), np.array([1], np.float32))",
        "num_slots",
    ),
    # Zero-stride broadcasts of huge logical length, in every binding that copies an array.
    "flashinfer_layout": (
        "k.BlockAllocator(8, 4).flashinfer_layout("
        + HUGE.format(dtype="int64", shape="(2**40,)")
        + ")",
        "tables",
    ),
    "free_batch": (
        "k.BlockAllocator(8, 4).free_batch(" + HUGE.format(dtype="int64", shape="(2**40,)") + ")",
        "tables",
    ),
    "free_batch_int32": (
        "k.BlockAllocator(8, 4).free_batch(" + HUGE.format(dtype="int32", shape="(2**40,)") + ")",
        "tables",
    ),
    "compact": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\n"
        "a.compact(t, " + HUGE.format(dtype="int64", shape="(2**40,)") + ")",
        "keep",
    ),
    "compact_mask": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\n"
        "a.compact(t, " + HUGE.format(dtype="bool_", shape="(2**40,)") + ")",
        "keep",
    ),
    "register_prefix": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\n"
        "a.register_prefix(t, " + HUGE.format(dtype="int64", shape="(2**40,)") + ")",
        "token_ids",
    ),
    "select_topk": (
        "k.select_topk(" + HUGE.format(dtype="float32", shape="(2**20, 2**20)") + ", 1)",
        "scores",
    ),
    "window_reduce": (
        "k.window_reduce(" + HUGE.format(dtype="float32", shape="(2**14,) * 3") + ")",
        "probs",
    ),
    "key_norm_scores": (
        "k.key_norm_scores(" + HUGE.format(dtype="float32", shape="(2**14,) * 3") + ")",
        "keys",
    ),
    "budget_split": (
        "k.budget_split(5, " + HUGE.format(dtype="float64", shape="(2**40,)") + ", 1)",
        "weights",
    ),
    "quantize": (
        "k.quantize("
        + HUGE.format(dtype="float32", shape="(2**30, 32, 32)")
        + ", k.QuantLayout(4, 32, 32, 32))",
        "x",
    ),
    "dequantize": (
        "L = k.QuantLayout(4, 32, 32, 32)\n"
        "k.dequantize(np.broadcast_to(np.uint8(0), (2**30, L.nbytes)), L)",
        "blocks",
    ),
    "cam_plan": (
        "k.cam_plan("
        + HUGE.format(dtype="float32", shape="(2**40,)")
        + ", np.array([0]), np.array([0.5], np.float32), 1)",
        "attn",
    ),
    # Sequences whose __len__ is huge.
    "protected_len": (
        "class S:\n    def __len__(self): return 2**60\n"
        "    def __getitem__(self, i): raise IndexError\n"
        "k.select_topk(np.zeros((1, 4), np.float32), 1, protected=S())",
        "protected",
    ),
    "layer_kinds_len": (
        "class S:\n    def __len__(self): return 2**60\n"
        "    def __getitem__(self, i): raise IndexError\n"
        "k.plan_longgen(S(), 1, 4, sinks=1, window=1)",
        "layer_kinds",
    ),
}


@pytest.mark.parametrize("name", sorted(ABORTS))
def test_too_large_is_a_value_error_naming_the_argument_and_the_limit(name: str) -> None:
    arg = ABORTS[name][1]
    got = run(ABORTS, name)
    assert got.kind == "ValueError", f"{name}: {got}"
    assert re.match(arg + " " + TOO_LARGE, got.message), f"{name}: {got}"


# Sizes that are too large only for a machine with less memory than they need (bytes): on a
# larger machine they are valid requests, so the test skips rather than allocate them.
MACHINE_DEPENDENT = {
    # The largest pool: 2**31 - 1 blocks of 16 bytes of bookkeeping (docs/allocator.md §1).
    "BlockAllocator_bookkeeping": (
        "k.BlockAllocator(2**31 - 1, 2**32)",
        "num_blocks",
        16 * (2**31 - 1),
    ),
    "ScoreState_31": ("k.ScoreState(2**31)", "num_rows", 24 * 2**31),
}


@pytest.mark.parametrize("name", sorted(MACHINE_DEPENDENT))
def test_too_large_for_this_machine(name: str) -> None:
    from kvcore import _kvcore

    code, arg, needed = MACHINE_DEPENDENT[name]
    if needed <= _kvcore.max_alloc_bytes:
        pytest.skip(f"this machine has the {needed} bytes the call needs: it would allocate them")
    got = outcome(code)
    assert got.kind == "ValueError", f"{name}: {got}"
    assert re.match(arg + " " + TOO_LARGE, got.message), f"{name}: {got}"


HANGS = {
    "plan_longgen_heads": "k.plan_longgen(['full'], 2**40, 10, sinks=1, window=1)",
    "plan_longgen_n": "k.plan_longgen(['block_sparse'], 1, 2**62, sinks=1, window=1)",
    "budget_pyramid_sweeps": "k.budget_pyramid(2**16, 2**40, 2**30, 0, 3)",
}


@pytest.mark.parametrize("name", sorted(HANGS))
def test_no_hang(name: str) -> None:
    got = run(HANGS, name, timeout=20)
    assert got.kind in ("ok", "ValueError"), f"{name}: {got}"


PANICS = {
    # Each was a PanicException or an internal-error report before.
    "ScoreState": "k.ScoreState(2**62)",
    "minicache_layer_pairs": "k.minicache_layer_pairs(2**62)",
    "budget_uniform": "k.budget_uniform(10, 2**62, 5)",
    "QuantLayout_overflow": "k.QuantLayout(8, 8, 2**31, 2**31)",
    "budget_pyramid_overflow": "k.budget_pyramid(4, 2**62, 2**62, 0)",
}


@pytest.mark.parametrize("name", sorted(PANICS))
def test_no_panic_reaches_python(name: str) -> None:
    got = run(PANICS, name)
    assert got.kind == "ValueError", f"{name}: {got}"
    assert "panic" not in got.message


TYPES = {
    # (code, exception, message regex)
    "float_0d_table_id": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\na.num_tokens(np.array(float(t)))",
        "TypeError",
        "table must be an int table id, got a 0-d array of dtype float64",
    ),
    "float_0d_count": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\na.append(t, np.array(2.0))",
        "TypeError",
        "num_tokens must be an int, got a 0-d array of dtype float64",
    ),
    "float_count": (
        "a = k.BlockAllocator(8, 4); t = a.create_table(); a.append(t, 2.0)",
        "TypeError",
        "num_tokens must be an int, got float",
    ),
    "numpy_bool_count": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\na.append(t, np.True_)",
        "TypeError",
        "num_tokens must be an int",
    ),
    "bool_0d_count": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\na.append(t, np.array(True))",
        "TypeError",
        "num_tokens must be an int, got a 0-d array of dtype",
    ),
    "array_1d_as_count": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\na.append(t, np.array([1]))",
        "TypeError",
        r"num_tokens must be an int, got an array of shape \[1\]",
    ),
    "masked_ids": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\n"
        "a.free_batch(np.ma.array([t], mask=[True]))",
        "TypeError",
        "tables must be a 1-D numpy array of int64 .*got a masked array",
    ),
    "masked_0d_id": (
        "a = k.BlockAllocator(8, 4); t = a.create_table()\na.free(np.ma.array(t, mask=True))",
        "TypeError",
        "table must be an int table id, got a masked array",
    ),
    "masked_scores": (
        "k.select_topk(np.ma.array(np.zeros((1, 3), np.float32)), 1)",
        "TypeError",
        "scores must be a numpy float32 array .*got a masked array",
    ),
    "nan_eps": (
        "k.kvmerger_plan(np.zeros((4, 2), np.float32), np.ones(4, np.float32), float('nan'))",
        "ValueError",
        "eps must be a number, got NaN",
    ),
    "nan_threshold": (
        "k.ems_plan(np.zeros((4, 2), np.float32), np.ones(4, np.float32), "
        "np.array([0]), float('nan'))",
        "ValueError",
        "threshold must be a number, got NaN",
    ),
    "num_threads_0": (
        "k.select_topk(np.zeros((2, 4), np.float32), 1, num_threads=0)",
        "ValueError",
        "num_threads must be positive, got 0",
    ),
    "layer_kinds_str": (
        "k.plan_longgen('full', 1, 4, sinks=1, window=1)",
        "TypeError",
        "layer_kinds must be a sequence",
    ),
    "protected_item": (
        "k.select_topk(np.zeros((1, 4), np.float32), 1, protected=[1])",
        "TypeError",
        "protected must be a sequence of .*int",
    ),
}


@pytest.mark.parametrize("name", sorted(TYPES))
def test_type_rule(name: str) -> None:
    _, exc, pattern = TYPES[name]
    got = run(TYPES, name)
    assert got.kind == exc, f"{name}: {got}"
    assert re.search(pattern, got.message), f"{name}: {got}"


ACCEPTED = {
    # The accepted forms of an id or count: Python int, numpy integer scalar, 0-d int array.
    "python_int": "a = k.BlockAllocator(8, 4); t = a.create_table(); a.append(t, 2)",
    "numpy_scalar": "a = k.BlockAllocator(8, 4); t = a.create_table()\n"
    "a.append(np.int64(t), np.uint8(2))",
    "zero_d_array": "a = k.BlockAllocator(8, 4); t = a.create_table()\n"
    "a.append(np.array(t), np.array(2, dtype=np.int32))",
    "zero_d_broadcast_budget": "k.select_topk(np.zeros((2, 4), np.float32), np.array(1))",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_integer_forms(name: str) -> None:
    got = run(ACCEPTED, name)
    assert got.kind == "ok", f"{name}: {got}"


TORCH = "import torch\n"
PYTHON_SIDE = {
    # (code, exception, message regex): the torch-side modules and the policy registry.
    "longgen_kinds_hang": (
        "from kvcore import policies\npolicies.get('longgen').kinds(2**63)",
        "ValueError",
        "num_layers " + TOO_LARGE,
    ),
    "longgen_kinds_float": (
        "from kvcore import policies\npolicies.get('longgen').kinds(3.0)",
        "TypeError",
        "num_layers must be an int, got float",
    ),
    "select_misspelt_keyword": (
        "from kvcore import policies\n"
        "policies.get('snapkv').select(np.zeros((1, 1, 8), np.float32), budjet=3)",
        "TypeError",
        r"snapkv.select: unknown input\(s\) budjet; valid: scores, budget",
    ),
    "select_misspelt_keyword_streaming": (
        "from kvcore import policies\n"
        "policies.get('streaming').select(np.zeros((1, 1, 8), np.float32), 4, budjet=3)",
        "TypeError",
        "valid: scores, budget",
    ),
    "quant_numpy": (
        TORCH + "from kvcore import quant\n"
        "quant.quantize(np.zeros((4, 4), np.float32), k.QuantLayout(4, 4, 4, 4))",
        "TypeError",
        "quantize: x must be a torch.Tensor, got ndarray",
    ),
    "merge_numpy": (
        TORCH + "from kvcore import merge\n"
        "merge.minicache_merge(np.zeros((4, 4), np.float32), np.zeros((4, 4)))",
        "TypeError",
        "minicache_merge: a must be a torch.Tensor, got ndarray",
    ),
    "kernels_numpy": (
        TORCH + "from kvcore import kernels\n"
        "kernels.rotate_reference(np.zeros((4, 4)), np.zeros(4), np.zeros(2))",
        "TypeError",
        "rotate_reference: .* must be a torch.Tensor, got ndarray",
    ),
    "kernels_sequence": (
        TORCH + "from kvcore import kernels\nz = torch.zeros(0, dtype=torch.int64)\n"
        "kernels.compact_pools([np.zeros(4)], [0], z, z, z, 4)",
        "TypeError",
        "compact_pools: tensors must be a sequence of torch.Tensor",
    ),
    "compact_pools_zero_slots": (
        TORCH + "from kvcore import kernels\nz = torch.zeros(0, dtype=torch.int64)\n"
        "kernels.compact_pools([torch.zeros(4)], [0], z, z, torch.zeros(2, dtype=torch.int64), 0)",
        "ValueError",
        "num_slots must be positive, got 0",
    ),
    "compact_pools_float_slots": (
        TORCH + "from kvcore import kernels\nz = torch.zeros(0, dtype=torch.int64)\n"
        "kernels.compact_pools([torch.zeros(4)], [0], z, z, z, 4.0)",
        "TypeError",
        "num_slots must be an int, got float",
    ),
    "attention_head_dim": (
        TORCH + "from kvcore.attention import paged_attention\n"
        "paged_attention(torch.zeros(1, 2, 1, 8), torch.zeros(4, 4, 16), torch.zeros(4, 4, 16),"
        " torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int64))",
        "ValueError",
        r"k_pool must be \(num_blocks, block_size, D=8\)",
    ),
    "attention_numpy_query": (
        TORCH + "from kvcore.attention import paged_attention\n"
        "paged_attention(np.zeros((1, 2, 1, 8)), torch.zeros(4, 4, 8), torch.zeros(4, 4, 8),"
        " torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int64))",
        "TypeError",
        "paged_attention: query must be a torch.Tensor",
    ),
    "attention_int32_table": (
        TORCH + "from kvcore.attention import paged_attention\n"
        "paged_attention(torch.zeros(1, 2, 1, 8), torch.zeros(4, 4, 8), torch.zeros(4, 4, 8),"
        " torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int64))",
        "TypeError",
        "block_table must be int64",
    ),
    "attention_unknown_keyword": (
        TORCH + "from kvcore.attention import paged_attention\n"
        "paged_attention(torch.zeros(1, 2, 1, 8), torch.zeros(4, 4, 8), torch.zeros(4, 4, 8),"
        " torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int64), scale=1.0)",
        "TypeError",
        "unexpected keyword argument 'scale'",
    ),
}


@pytest.mark.parametrize("name", sorted(PYTHON_SIDE))
def test_python_side(name: str) -> None:
    pytest.importorskip("torch", reason="the torch-side modules need torch")
    _, exc, pattern = PYTHON_SIDE[name]
    got = run(PYTHON_SIDE, name)
    assert got.kind == exc, f"{name}: {got}"
    assert re.search(pattern, got.message), f"{name}: {got}"


def test_kvcorecache_needs_a_kvcache() -> None:
    pytest.importorskip("transformers", reason="kvcore.hf needs transformers")
    got = outcome("from kvcore.hf import KVCoreCache\nKVCoreCache('x')")
    assert got.kind == "TypeError", str(got)
    assert "KVCoreCache needs a kvcore.KVCache, got str" in got.message


def test_python_and_rust_share_the_memory_limit() -> None:
    from kvcore import _args, _kvcore

    assert _args.MAX_ALLOC_BYTES == _kvcore.max_alloc_bytes > 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # Linux: the limit is the machine's physical memory
        kib = next(
            ln.split()[1] for ln in meminfo.read_text().splitlines() if ln.startswith("MemTotal:")
        )
        assert _kvcore.max_alloc_bytes == int(kib) * 1024
