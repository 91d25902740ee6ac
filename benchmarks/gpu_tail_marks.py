"""Host clock marks in the tail of ``attention_metrics`` on the GPU machine (session 7): from the
transfer's return to ``_aggregate``'s return, to ``attention_metrics``'s return, and (with the
result dropped) to the end of the freeing; medians of 30 calls at T = 16,384 and T = 128,
with Python's garbage collector on and off.

    PYTHONPATH=. python3 benchmarks/gpu_tail_marks.py
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import bench, flips  # noqa: E402


def main() -> int:
    marks: dict[str, float] = {}
    cpu, agg = torch.Tensor.cpu, flips._aggregate

    def m_cpu(self, *a, **k):
        r = cpu(self, *a, **k)
        marks["cpu"] = time.perf_counter()
        return r

    def m_agg(*a, **k):
        r = agg(*a, **k)
        marks["agg"] = time.perf_counter()
        return r

    torch.Tensor.cpu, flips._aggregate = m_cpu, m_agg
    out = {}
    try:
        for T in (16384, 128):
            q, k, kh = bench.flip_inputs(T, q_heads=32, kv_heads=8, d=128, device="cuda",
                                         dtype=torch.bfloat16)
            for collect in (True, False):
                (gc.enable if collect else gc.disable)()
                rows: dict[str, list[float]] = {}
                for i in range(33):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    res = flips.attention_metrics(q, k, kh, causal=False)
                    t1 = time.perf_counter()
                    del res
                    t2 = time.perf_counter()
                    if i < 3:
                        continue
                    for name, v in (("start to transfer's return", marks["cpu"] - t0),
                                    ("transfer's return to _aggregate's return",
                                     marks["agg"] - marks["cpu"]),
                                    ("_aggregate's return to the call's return", t1 - marks["agg"]),
                                    ("dropping the result", t2 - t1)):
                        rows.setdefault(name, []).append(1e3 * v)
                key = f"T={T} gc={'on' if collect else 'off'}"
                out[key] = {n: round(statistics.median(v), 4) for n, v in rows.items()}
                print(key, json.dumps(out[key]), flush=True)
    finally:
        torch.Tensor.cpu, flips._aggregate = cpu, agg
        gc.enable()
    return 0


if __name__ == "__main__":
    sys.exit(main())
