"""One launch of the fused metrics kernel at the 7B layer shape (for ``ncu`` on the GPU machine).

    ncu --clock-control none -k regex:metrics_kernel -c 1 python3 benchmarks/gpu_kernel_once.py \
        --tokens 4096 --kind full
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--kind", choices=("full", "flip"), default="full")
    p.add_argument("--tune", default="{}", help="JSON of extra constexpr switches")
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    tm.TUNE.update(json.loads(a.tune))
    q, k, kh = bench.flip_inputs(a.tokens, q_heads=32, kv_heads=8, d=128, device="cuda",
                                 dtype=torch.bfloat16)
    for _ in range(a.reps):
        tm.fused_metrics(q, k, kh, None, None, None, causal=False, window=None,
                         scale=128 ** -0.5, topk=5, full=a.kind == "full")
    torch.cuda.synchronize()
    kern = tm.LAST[0]
    print("regs", getattr(kern, "n_regs", None), "spills", getattr(kern, "n_spills", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
