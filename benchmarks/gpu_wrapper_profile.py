"""Where ``attention_metrics`` spends its time beyond the fused kernel, on the GPU machine:
``do_bench`` medians of its steps (validation, the kernel with its second pass, ``flips._run``,
aggregation) at a Mistral-7B layer's shape, then a torch profiler table of one call (CUDA
kernels and the host-side operators that wait on the device).

    PYTHONPATH=. python3 benchmarks/gpu_wrapper_profile.py --out $OUT/wrapper.txt --tokens 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench, flips  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="wrapper.txt")
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    import triton.testing

    T, hq, hkv, d = a.tokens, 32, 8, 128
    q, k, kh = bench.flip_inputs(T, q_heads=hq, kv_heads=hkv, d=d, device="cuda",
                                 dtype=torch.bfloat16)
    steps = {
        "validate": lambda: _validate(q, k, kh),
        "fused_metrics (kernel + second pass)": lambda: tm.fused_metrics(
            q, k, kh, None, None, None, causal=False, window=None, scale=d ** -0.5, topk=5,
            full=True),
        "flips._run": lambda: flips._run(q, k, kh, None, (False, None, d ** -0.5, None),
                                         full=True, topk=5),
        "attention_metrics": lambda: flips.attention_metrics(q, k, kh, causal=False),
    }
    lines = [f"T={T}, 32/8 heads, d=128, bf16, non-causal; do_bench medians (ms)"]
    for name, fn in steps.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")
        lines.append(f"  {name:40s} {ms:8.3f}")
        print(lines[-1], flush=True)
    from torch.profiler import ProfilerActivity, profile

    flips.attention_metrics(q, k, kh, causal=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flips.attention_metrics(q, k, kh, causal=False)
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "cpu_time_total"):
        lines += ["", f"profile of 3 calls, by {key}:",
                  prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))
    return 0


def _validate(q, k, kh):
    return flips._validate(q, k, kh, None, None, False, None, None, 5, flips.MARGIN_BINS,
                           flips.PROB_BINS, None)


if __name__ == "__main__":
    sys.exit(main())
