"""Where the host's time goes in one ``attention_metrics`` call on the GPU machine: cProfile
of 200 calls at T = 128 (32/8 heads, d = 128, bf16, non-causal), where the kernels take
microseconds and the host's Python, launches and bookkeeping are what is measured.

    PYTHONPATH=. python3 benchmarks/gpu_host_profile.py --out $OUT/host_profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import bench, flips  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="host_profile.txt")
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args()
    q, k, kh = bench.flip_inputs(a.tokens, q_heads=32, kv_heads=8, d=128, device="cuda",
                                 dtype=torch.bfloat16)
    for _ in range(20):
        flips.attention_metrics(q, k, kh, causal=False)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        flips.attention_metrics(q, k, kh, causal=False)
    prof.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(40)
    Path(a.out).write_text(out.getvalue())
    print(out.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
