"""Every CUDA kernel of ``kvcore.kernels`` once, on small shapes, against its torch reference.

This is the program that ``tools/gpu_check.py`` runs under ``compute-sanitizer --tool memcheck``
and ``--tool racecheck``: short, so the sanitizers finish in seconds, yet it launches each
kernel of ``cuda/`` (compaction of dense rows and of quantized page pieces, quantize,
dequantize, merge, RoPE re-rotation, decode attention over native and quantized pages, both
of its launches) and compares the result with the torch reference computed on the CPU. It
also records which kernels launched, and fails if one of them did not (a silent fall-back to
the torch path would otherwise pass).

    python tools/kernel_smoke.py [--out smoke.json]    # needs a CUDA device and CuPy
    python tools/kernel_smoke.py --emulate             # the CUDA path on the CPU (g++ emulation)

Exit status: 0 every kernel matched, 1 a mismatch or an error, 2 nothing could run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "kv_compact",
    "kv_quantize",
    "kv_dequantize",
    "kv_merge",
    "kv_rope_rotate",
    "kv_decode_partial",
    "kv_decode_reduce",
}


def _checks(dev: Any) -> dict[str, Callable[[], None]]:
    """name -> a check that runs one kernel on ``dev`` and raises on a mismatch."""
    import numpy as np
    import torch

    import kvcore
    from kvcore import kernels, quant
    from kvcore.attention import paged_attention

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 2 + 0.25).to(dtype)

    def equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        if not torch.equal(got.cpu(), want):
            raise AssertionError(f"{what}: the kernel differs from the torch reference")

    bs, d, nb = 8, 64, 12
    num_slots = bs * nb

    def plan() -> tuple[torch.Tensor, torch.Tensor]:
        alloc = kvcore.BlockAllocator(nb, bs)
        tables = alloc.create_tables(2)
        for t in tables:
            alloc.append(int(t), 30)
        keep = np.array([0, 3, 4, 9, 17, 20, 28, 1, 2, 5, 8, 13, 29], dtype=np.int64)
        src, dst, _ = alloc.compact_batch(tables, np.array([0, 7, 13]), keep)
        return torch.from_numpy(src), torch.from_numpy(dst)

    def compact() -> None:
        src, dst = plan()
        page = kvcore.QuantLayout(4, 32, bs, d, "channel", "float16")
        tok = kvcore.QuantLayout(4, 32, 1, d, "channel", "float16")
        dense = rand(nb, bs, d, dtype=torch.float16)
        pos = torch.randint(0, 10**6, (num_slots,), generator=gen)
        pages = quant.quantize(rand(nb, bs, d), page)
        cb, sb = tok.codes_bytes, tok.zeros_offset - tok.scales_offset
        regions = [(0, cb), (page.scales_offset, sb), (page.zeros_offset, sb)]
        want = [dense.clone(), pos.clone(), pages.clone()]
        for t in want[:2]:
            rows = t.view(num_slots, -1)
            rows[dst] = rows[src]
        for off, w in regions:
            v = want[2][:, off : off + bs * w].view(nb, bs, w)
            v[dst // bs, dst % bs] = v[src // bs, src % bs]
        got = [t.to(dev) for t in (dense, pos, pages)]
        views = [got[2][:, off : off + bs * w].view(nb, bs, w) for off, w in regions]
        ip = torch.tensor([0, len(src)], device=dev)
        tensors = [got[0], got[1], *views]
        kernels.compact_pools(tensors, [0] * 5, src.to(dev), dst.to(dev), ip, num_slots)
        for g, w, what in zip(got, want, ("dense rows", "positions", "int4 pieces"), strict=True):
            equal(g, w, f"compaction of {what}")

    def quantize() -> None:
        x = rand(3, bs, d, dtype=torch.float16)
        for lay in (
            kvcore.QuantLayout(4, 32, bs, d, "channel"),
            kvcore.QuantLayout(2, bs, bs, d, "token", "float32"),
        ):
            q = kernels.quantize(x.to(dev), lay)
            equal(q, quant.quantize(x, lay), f"quantize {lay}")
            back = kernels.dequantize(q, lay, torch.float32)
            equal(back, quant.dequantize(quant.quantize(x, lay), lay), f"dequantize {lay}")

    def merge() -> None:
        rng = np.random.default_rng(0)
        n = 64
        keys = rng.standard_normal((n, d)).astype(np.float32)
        p = kvcore.ems_plan(keys, rng.random(n).astype(np.float32), np.arange(0, n, 4), 0.1)
        x = rand(n, d)
        args = [torch.from_numpy(a) for a in (p.src, p.dst, p.weight)]
        counts = torch.from_numpy(rng.integers(1, 4, n).astype(np.float32))
        ev = torch.from_numpy(p.evicted)
        got, c_got = kernels.apply_merge(
            x.to(dev), *[a.to(dev) for a in args], counts.to(dev), ev.to(dev)
        )
        equal(got, torch.from_numpy(p.apply(x.numpy())), "merge rows (Rust MergePlan.apply)")
        _, c_ref = kernels.merge_reference(x, *args, counts, ev)
        assert c_got is not None and c_ref is not None
        torch.testing.assert_close(c_got.cpu(), c_ref, rtol=1e-6, atol=0)

    def rope() -> None:
        pool = rand(nb, bs, d, dtype=torch.float16)
        slots = torch.randperm(num_slots, generator=gen)[:40]
        delta = torch.randint(-5000, 5000, (40,), generator=gen)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        want = pool.clone()
        want.view(-1, d)[slots] = kernels.rotate_reference(want.view(-1, d)[slots], delta, inv)
        got = pool.to(dev)
        kernels.rotate_slots(got, slots.to(dev), delta.to(dev), inv.to(dev))
        eps = torch.finfo(torch.float16).eps  # tests/gpu: one ulp (GPU cos/sin vs libm)
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=eps, atol=eps)

    def attention(quantized: bool) -> Callable[[], None]:
        def run() -> None:
            b, h, group = 1, 2, 2
            table = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
            lengths = torch.tensor([29, 21])
            k, v = rand(8, bs, d, dtype=torch.float16), rand(8, bs, d, dtype=torch.float16)
            kl = vl = None
            if quantized:
                kl = kvcore.QuantLayout(4, bs, bs, d, "token")
                vl = kvcore.QuantLayout(4, 32, bs, d, "channel")
                k, v = quant.quantize(k, kl), quant.quantize(v, vl)
            query = rand(b, h * group, 1, d, dtype=torch.float16) * 0.3
            bias = torch.log(torch.randint(1, 4, (8 * bs,), generator=gen).float())
            valid = torch.rand(8 * bs, generator=gen) > 0.1
            kw: dict[str, Any] = dict(slot_bias=bias, slot_valid=valid, k_layout=kl, v_layout=vl)
            want, want_lse = paged_attention(query, k, v, table, lengths, return_lse=True, **kw)
            kw_dev = {n: (a.to(dev) if isinstance(a, torch.Tensor) else a) for n, a in kw.items()}
            got, lse = kernels.decode_attention(
                query.to(dev),
                k.to(dev),
                v.to(dev),
                table.to(dev),
                lengths.to(dev),
                num_splits=2,
                return_lse=True,
                **kw_dev,
            )
            # tests/gpu: __expf and split-K order against a float32 softmax, fp16 output
            torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-4, atol=1e-4)

        return run

    return {
        "compaction (dense rows, int4 page pieces)": compact,
        "quantize / dequantize": quantize,
        "merge": merge,
        "rope re-rotation": rope,
        "decode attention (fp16 pages)": attention(False),
        "decode attention (int4 pages)": attention(True),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emulate", action="store_true", help="the CUDA path on the CPU (g++)")
    ap.add_argument("--out", type=Path, default=None, help="write a JSON report here")
    args = ap.parse_args()
    import torch

    from kvcore import kernels

    if args.emulate:
        sys.path.insert(0, str(ROOT / "tests"))
        from emu_launch import emulated_launch

        run_launch: Any = emulated_launch
        kernels.uses_kernel = lambda *t: True  # type: ignore[assignment]
        dev = torch.device("cpu")
    else:
        if not (torch.cuda.is_available() and kernels.cupy_available()):
            print("kernel_smoke.py: needs a CUDA device and CuPy (or --emulate)", file=sys.stderr)
            return 2
        run_launch = kernels._launch
        dev = torch.device("cuda")
    launched: list[str] = []

    def launch(device: Any, name: str, defines: Any, kernel: str, *rest: Any) -> None:
        launched.append(kernel)
        run_launch(device, name, defines, kernel, *rest)

    kernels._launch = launch  # type: ignore[assignment]
    rows = []
    for name, check in _checks(dev).items():
        t0 = time.perf_counter()
        try:
            check()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ok, detail = True, ""
        except Exception as e:  # reported, and the next kernel still runs
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append({"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 3)})
        if detail:
            rows[-1]["error"] = detail[:2000]
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({rows[-1]['seconds']} s) {detail[:300]}")
    missing = sorted(EXPECTED - set(launched))
    if missing:
        print(f"FAIL kernels that never launched: {', '.join(missing)}")
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (emulated)"
    report = {
        "device": device,
        "mode": "emulated" if args.emulate else "cuda",
        "checks": rows,
        "launched": sorted(set(launched)),
        "never_launched": missing,
        "ok": all(r["ok"] for r in rows) and not missing,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("kernel smoke:", "all kernels match their references" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
