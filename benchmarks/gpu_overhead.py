"""The fixed cost of one ``attention_metrics`` call beside the fused kernel's own, on the GPU
machine: ``do_bench`` medians at small T (where the kernels take microseconds and the host's
launches and bookkeeping are what is timed) and at T = 16,384, for ``attention_metrics``,
``flips._run`` and ``fused_metrics`` (32/8 heads, d = 128, bf16, non-causal).

    PYTHONPATH=. python3 benchmarks/gpu_overhead.py --out $OUT/overhead.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench, flips  # noqa: E402
from kvtheory.io import write_json  # noqa: E402


def host_marks(q, k, kh, reps: int = 30) -> dict[str, float]:
    """Host milliseconds (medians, the GPU idle at each start) from the call's start to the
    main kernel's launch (the moment ``fused_metrics`` calls ``while_running``), and to the
    call's return."""
    import statistics
    import time

    marks: list[float] = []
    orig = tm.fused_metrics

    def marked(*args, while_running=None, **kw):
        def hook():
            marks.append(time.perf_counter())
            return while_running() if while_running is not None else []
        return orig(*args, while_running=hook, **kw)

    pre, total = [], []
    tm.fused_metrics = marked
    try:
        for _ in range(reps):
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter()
            flips.attention_metrics(q, k, kh, causal=False)
            t1 = time.perf_counter()
            pre.append(1e3 * (marks[0] - t0))
            total.append(1e3 * (t1 - t0))
    finally:
        tm.fused_metrics = orig
    return {"host_to_launch_ms": statistics.median(pre), "host_call_ms": statistics.median(total)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="overhead.json")
    p.add_argument("--tokens", default="128,1024,16384")
    a = p.parse_args()
    import triton.testing

    d = 128
    doc: dict = {"machine": bench.machine(), "shape": [32, 8, d], "rows": {}}
    for T in (int(t) for t in a.tokens.split(",")):
        q, k, kh = bench.flip_inputs(T, q_heads=32, kv_heads=8, d=d, device="cuda",
                                     dtype=torch.bfloat16)
        fns = {"attention_metrics": lambda: flips.attention_metrics(q, k, kh, causal=False),
               "flips._run": lambda: flips._run(q, k, kh, None, (False, None, d ** -0.5, None),
                                                full=True, topk=5),
               "fused_metrics": lambda: tm.fused_metrics(
                   q, k, kh, None, None, None, causal=False, window=None, scale=d ** -0.5,
                   topk=5, full=True)}
        row = {n: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
               for n, f in fns.items()}
        row.update(host_marks(q, k, kh))
        doc["rows"][str(T)] = row
        print(f"T={T}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in row.items()), flush=True)
        write_json(a.out, doc, arg="--out")
    print(json.dumps(doc["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
