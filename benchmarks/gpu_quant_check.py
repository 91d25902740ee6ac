"""On a CUDA machine: the fused quantization kernel (:mod:`kvtheory._triton_quant`) against
torch's CUDA path, then both timed.

1. **Equality.** ``quantize(x, ...)`` on CUDA (the kernel) against the same call with
   ``KVTHEORY_FUSED=never`` (torch's element-wise path on the same GPU), for KIVI keys (128-token
   groups of each channel, a last partial group), per-token groups of all d or of 8 channels,
   symmetric and not, 1 to 16 bits, float32 and bf16: elements whose value differs, and the
   largest difference in units of the group's step. The kernel divides the range by the levels
   as torch's CUDA division by a Python scalar does (a float32 reciprocal multiplied in); the
   exact-division variant is compared too, for the record.
2. **Speed.** Median of ``reps`` CUDA-event timings of each path at the Mistral-7B eval shape
   (4 × 8 KV heads × 4096 tokens × d = 128, float32 as ``compressed_kv`` hands it), keys
   (``int4-kivi``: channel groups of 128) and values (per token): of one call (the host's
   dispatch included) and per call of 50 queued calls (the device's time), with the bytes each
   must move (one read and one write of ``x``) as GB/s; then the kernel alone under each tile
   shape of :data:`VARIANTS`.
3. **End to end.** :func:`integration`: ``compressed_kv`` on padded batches of tiny models,
   logits with the kernel against torch's CUDA path.

    PYTHONPATH=. python3 benchmarks/gpu_quant_check.py --out $OUT/gpu_quant.json --git-sha SHA
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import _triton_quant as tq  # noqa: E402
from kvtheory import bench  # noqa: E402
from kvtheory.io import provenance, write_json  # noqa: E402
from kvtheory.quantize import quant_steps, quantize, resolve_group  # noqa: E402

CASES = [((4, 8, 4096, 128), "channel", 128), ((1, 2, 300, 128), "channel", 128),
         ((2, 3, 37, 64), "channel", 16), ((1, 3, 40, 24), "channel", 7),
         ((4, 8, 4096, 128), "token", None), ((1, 2, 33, 32), "token", 8),
         ((1, 1, 50, 24), "token", None)]


def torch_path(fn):
    """``fn()`` on torch's CUDA path (``KVTHEORY_FUSED=never``)."""
    with tm.torch_path():
        return fn()


def equality() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, axis, group in CASES:
        base = torch.randn(*shape, generator=gen) * 3 + 0.5
        base[..., 1, :] = 1.25
        base[..., :, 0] = -2.0
        for dtype in (torch.float32, torch.bfloat16):
            x = base.to(dtype).cuda()
            for sym in (False, True):
                for bits in (1, 2, 3, 4, 8, 16):
                    if sym and bits < 2:
                        continue
                    kw = dict(axis=axis, group=group, symmetric=sym)
                    ref = torch_path(lambda: quantize(x, bits, **kw))
                    step = quant_steps(x, bits, **kw).clamp_min(1e-30)
                    before = tq.CALLS[0]
                    y = quantize(x, bits, **kw)
                    served = tq.CALLS[0] == before + 1
                    g = resolve_group(axis, group, shape[-2], shape[-1])
                    y_exact = tq.quantize_fused(x, bits, axis, g, sym, recip=False)
                    row = {"shape": list(shape), "axis": axis, "group": group, "symmetric": sym,
                           "bits": bits, "dtype": str(dtype).split(".")[-1], "served": served,
                           "elements": x.numel()}
                    for name, out in (("kernel", y), ("exact_division", y_exact)):
                        d = (out.float() - ref.float()).abs()
                        row[f"{name}_differ"] = int((d > 0).sum())
                        row[f"{name}_max_steps"] = float((d / step).max())
                    rows.append(row)
    return rows


def _median_s(fn, reps: int, calls: int = 1) -> float:
    """Median over ``reps`` of the CUDA-event time of ``calls`` back-to-back calls, per call.
    One call (``calls=1``) includes the host's dispatch before the kernels start (the GPU is
    idle at the first event): what a caller waits for. Many calls fill the GPU's queue, so
    the time per call is the device's, when the host dispatches faster than the GPU works."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


#: tile shapes timed against the default (``kvtheory._triton_quant.CONFIG``)
VARIANTS = [dict(channel_block=cb, warps=w) for cb in (128, 64, 32) for w in (4, 8)] + [
    dict(token_rows=tr, warps=w) for tr in (64, 32, 16) for w in (4, 8)]


@contextlib.contextmanager
def tile_config(**change):
    """:data:`kvtheory._triton_quant.CONFIG` with ``change`` inside the block, as it was after."""
    default = dict(tq.CONFIG)
    tq.CONFIG.update(change)
    try:
        yield dict(tq.CONFIG)
    finally:
        tq.CONFIG.clear()
        tq.CONFIG.update(default)


def tiles(reps: int) -> list[dict]:
    """The kernel alone at the 7B eval shape under each of :data:`VARIANTS`."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 8, 4096, 128, device="cuda", generator=gen)
    out = []
    for v in VARIANTS:
        axis, g = ("channel", 128) if "channel_block" in v else ("token", 128)
        with tile_config(**v):
            s = _median_s(lambda: tq.quantize_fused(x, 4, axis, g, False), reps, calls=50)
        out.append({**v, "axis": axis, "kernel_s": s, "GBps": 2 * x.numel() * 4 / s / 1e9})
    return out


def speed(reps: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 8, 4096, 128, device="cuda", generator=gen)
    out = []
    for what, kw in (("keys, int4-kivi (channel groups of 128 tokens)",
                      dict(axis="channel", group=128)),
                     ("values, int4-kivi (per token)", dict(axis="token"))):
        def fused():
            return quantize(x, 4, **kw)

        def eager():
            return torch_path(lambda: quantize(x, 4, **kw))

        med = {name: _median_s(fn, reps) for name, fn in (("torch", eager), ("kernel", fused))}
        dev = {name: _median_s(fn, reps, calls=50) for name, fn in (("torch", eager),
                                                                     ("kernel", fused))}
        moved = 2 * x.numel() * x.element_size()
        out.append({"what": what, "shape": list(x.shape), "dtype": "float32",
                    "torch_s": med["torch"], "kernel_s": med["kernel"],
                    "speedup": med["torch"] / med["kernel"],
                    "torch_device_s": dev["torch"], "kernel_device_s": dev["kernel"],
                    "device_speedup": dev["torch"] / dev["kernel"],
                    "kernel_GBps": moved / dev["kernel"] / 1e9,
                    "torch_GBps_at_one_read_one_write": moved / dev["torch"] / 1e9})
    return out


def integration(device: str = "cuda") -> list[dict]:
    """``compressed_kv`` end to end on CUDA: tiny models (``tests/_tiny.py``) of three
    architectures on a batch of three passages padded left or right, int4-kivi with 4-token
    key groups (so groups span the padding), keys compressed after or before RoPE, float32 and
    bf16: logits with the kernel against logits with torch's CUDA path (``KVTHEORY_FUSED=never``).
    The same arithmetic gives the same logits; the count of ``key_validity`` decisions is one a
    forward pass (not one a layer)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import tiny_model

    from kvtheory.methods import compressor as cm
    from kvtheory.patch import compressed_kv

    gen = torch.Generator().manual_seed(3)
    passages = [torch.randint(1, 64, (n,), generator=gen) for n in (11, 6, 9)]
    calls, real = [], cm.key_validity
    cm.key_validity = lambda *a: calls.append(1) or real(*a)
    out = []
    try:
        for arch in ("llama", "qwen3", "gemma3"):
            for dtype in (torch.float32, torch.bfloat16):
                model = tiny_model(arch).to(device, dtype)
                for side in ("right", "left"):
                    t = max(len(p) for p in passages)
                    ids = torch.zeros(3, t, dtype=torch.long)
                    mask = torch.zeros(3, t, dtype=torch.long)
                    for b, p in enumerate(passages):
                        sl = slice(0, len(p)) if side == "right" else slice(t - len(p), t)
                        ids[b, sl], mask[b, sl] = p, 1
                    pos = (mask.cumsum(-1) - 1).clamp(min=0)
                    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=pos.to(device))
                    for rope in ("post", "pre"):
                        def run():
                            with torch.no_grad(), compressed_kv(model, "int4-kivi-g4",
                                                                "int4-kivi", rope=rope):
                                return model(**kw).logits.float()
                        calls.clear()
                        before = tq.CALLS[0]
                        fused = run()
                        decisions, served = len(calls), tq.CALLS[0] - before
                        eager = torch_path(run)
                        real_tok = mask.bool().to(device)
                        diff = (fused - eager).abs()[real_tok]
                        out.append({"arch": arch, "dtype": str(dtype).split(".")[-1],
                                    "side": side, "rope": rope, "kernel_calls": served,
                                    "key_validity_decisions": decisions,
                                    "layers": model.config.num_hidden_layers,
                                    "max_abs_diff": float(diff.max()),
                                    "equal": bool(torch.equal(fused[real_tok], eager[real_tok]))})
    finally:
        cm.key_validity = real
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_quant.json")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--git-sha", default=None)
    args = p.parse_args()
    doc = {"provenance": provenance(seed=0, git_sha_sent=args.git_sha),
           "machine": bench.machine()}
    doc["config"] = dict(tq.CONFIG)
    doc["equality"] = equality()
    with tile_config(channel_block=32, token_rows=16) as cfg:   # split tiles: same results
        doc["equality_split_tiles"] = {"config": cfg, "rows": equality()}
    doc["integration"] = integration()
    doc["speed"] = speed(args.reps)
    doc["tiles"] = tiles(args.reps)
    write_json(args.out, doc, arg="--out")
    bad = [r for r in doc["equality"] if r["kernel_differ"] or not r["served"]]
    print(f"equality: {len(doc['equality'])} cases, {len(bad)} with differing elements or "
          "not served by the kernel")
    for r in bad[:10]:
        print("  ", r)
    split = [r for r in doc["equality_split_tiles"]["rows"] if r["kernel_differ"]]
    print(f"split tiles: {len(split)} cases with differing elements")
    exact = sum(r["exact_division_differ"] > 0 for r in doc["equality"])
    print(f"exact-division variant: {exact} cases differ from torch's CUDA path")
    bad = [r for r in doc["integration"] if not r["equal"] or not r["kernel_calls"]]
    print(f"compressed_kv end to end: {len(doc['integration'])} runs, {len(bad)} with logits "
          "that differ from torch's CUDA path or no kernel call; key_validity decisions a "
          f"forward: {sorted({r['key_validity_decisions'] for r in doc['integration']})}")
    for r in bad[:10]:
        print("  ", r)
    for r in doc["tiles"]:
        print(f"tiles {r}")
    for r in doc["speed"]:
        print(f"{r['what']}: one call (host included): torch {1e3 * r['torch_s']:.3f} ms, kernel "
              f"{1e3 * r['kernel_s']:.3f} ms ({r['speedup']:.1f}x); queued calls: torch "
              f"{1e3 * r['torch_device_s']:.3f} ms, kernel {1e3 * r['kernel_device_s']:.3f} ms "
              f"({r['device_speedup']:.1f}x; {r['kernel_GBps']:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
