"""On a CUDA machine: the compiled flip-engine path against the eager one, then its timing.

``kvtheory.flips`` computes the softmax terms of a block (z, ẑ, p·δ, Fisher, the small-KL sum)
with one ``torch.compile``'d function on CUDA when Triton is present (no values given), and
in place, op by op, otherwise. This job checks that both give the same per-query metrics
(float32 and bfloat16 inputs, causal and not, with a key mask), then times ``bench.case_flips``
with the compiled path. Writes ``--out`` (JSON) and prints a table.

    PYTHONPATH=. python3 benchmarks/gpu_flips_check.py --out $OUT/gpu_flips.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import bench, flips  # noqa: E402
from kvtheory.io import write_json  # noqa: E402


def per_query(q, k, kh, *, compiled: bool, **kw):
    os.environ["KVTHEORY_COMPILE"] = "always" if compiled else "never"
    m = flips.attention_metrics(q, k, kh, return_per_query=True, **kw)
    torch.cuda.synchronize()
    return m


def compare(dtype, causal: bool, masked: bool, T: int = 1024) -> dict:
    q, k, kh = bench.flip_inputs(T, device="cuda", dtype=dtype, seed=1)
    kw = {"causal": causal}
    if masked:
        mask = torch.ones(1, T, dtype=torch.bool, device="cuda")
        mask[:, : T // 8] = False
        kw["key_mask"] = mask
    a, b = (per_query(q, k, kh, compiled=c, **kw) for c in (False, True))
    out = {"dtype": str(dtype).replace("torch.", ""), "causal": causal, "masked": masked, "T": T}
    for name in ("kl", "fisher", "top1_prob", "margin", "topk_overlap"):
        x, y = getattr(a.per_query, name), getattr(b.per_query, name)
        ok = torch.isfinite(x) & torch.isfinite(y)
        rel = ((x - y).abs() / x.abs().clamp_min(1e-12))[ok]
        out[f"{name}_max_rel"] = float(rel.max()) if rel.numel() else 0.0
    out["flip_equal"] = bool(torch.equal(a.per_query.flip, b.per_query.flip))
    out["means"] = {"eager": a.mean(), "compiled": b.mean()}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_flips.json")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    t0 = time.perf_counter()
    doc: dict = {"machine": bench.machine(), "checks": [], "cases": []}
    for dtype in (torch.float32, torch.bfloat16):
        for causal, masked in ((False, False), (True, False), (True, True)):
            doc["checks"].append(compare(dtype, causal, masked))
            print(doc["checks"][-1], flush=True)
    os.environ["KVTHEORY_COMPILE"] = "auto"
    for dtype in (torch.float32, torch.bfloat16):
        for T in (8192, 16384):
            doc["cases"].append(bench.case_flips(tokens=T, device="cuda", dtype=dtype, reps=args.reps))
            write_json(args.out, doc)
    doc["matmul_peak"] = bench.matmul_peak()
    doc["seconds"] = time.perf_counter() - t0
    write_json(args.out, doc)
    print(bench.table_text([r for c in doc["cases"] for r in c["rows"]]))
    print(f"bf16 matmul peak {doc['matmul_peak']['tflops']:.0f} TFLOP/s; {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
