"""The fused metrics kernel compiles for Hopper (sm_90) in every configuration the library
launches: Triton's interpreter (``test_triton_interpreter.py``) checks its logic but compiles
nothing, and Triton's GPU passes can fail where the interpreter runs (session 8: the second
pass's loop crashed the layout pass on the H100; ``benchmarks/KERNEL_NOTES.md``). No GPU is
needed: Triton ships ptxas (``benchmarks/kernel_sass.py`` compiles the same way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _launched() -> dict[str, dict]:
    """The switches of each launch :mod:`kvtheory._triton_metrics` makes at d = 128, topk 5,
    from its block configurations (``CONFIG``)."""
    from kvtheory import _triton_metrics as tm

    def cfg(name: str) -> dict:
        bm, bn, warps, stages, *nreg = tm.CONFIG[name]
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                    **dict(zip(["maxnreg"], nreg)))

    bm, warps, stages = tm.CONFIG["rescan"]
    return {
        "main kernel": {**cfg("full"), "RESCAN": True},
        "main kernel, rounds for every flagged query": cfg("full"),
        "rescan of kept blocks": {"KERNEL": "rescan", "BLOCK_M": bm, "num_warps": warps,
                                  "num_stages": stages, "BLOCK_N": cfg("full")["BLOCK_N"]},
        "rescan, causal window, key mask, pointer loads": {
            "KERNEL": "rescan", "BLOCK_M": bm, "num_warps": warps, "num_stages": stages,
            "BLOCK_N": cfg("values")["BLOCK_N"], "CAUSAL": True, "HAS_WINDOW": True,
            "HAS_KM": True, "TMA": False},
        "candidates' pick": {"KERNEL": "pick", "BLOCK_M": tm.CONFIG["pick"][0],
                             "num_warps": tm.CONFIG["pick"][1]},
        "second pass, candidates": {**cfg("cand"), "FIX": True, "SUMS": False,
                                    "TOPK_MODE": 1, "CAND": 16},
        "second pass, rounds": {**cfg("fix"), "FIX": True, "SUMS": False, "TOPK_MODE": 1},
        "values": {**cfg("values"), "HAS_V": True, "WITH_ZH": True, "DV": 128, "BDV": 128},
        "log-sum-exp run": {**cfg("full"), "WITH_ZH": True},
        "flip only": {**cfg("flip"), "FULL": False},
        "causal window, key mask": {**cfg("full"), "CAUSAL": True, "HAS_WINDOW": True,
                                    "HAS_KM": True, "RESCAN": True},
    }


@pytest.mark.parametrize("label", list(_launched()))
def test_kernel_compiles_for_hopper(label):
    # a subprocess: the tests' jaxtyping import hook rewrites kvtheory's modules, which
    # Triton's JIT cannot parse back; and without the interpreter other tests may switch on
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"),
                          json.dumps(_launched()[label])], capture_output=True, text=True,
                         timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, f"{label}: {out.stderr[-2000:]}"
    assert "instructions a thread a key block" in out.stdout, out.stdout
    n = int(out.stdout.split("wgmma instructions in the kernel:")[1].split()[0])
    if _launched()[label].get("KERNEL") == "pick":
        assert n == 0, f"{label}: {n} wgmma"    # a selection, no matmul
    else:
        assert n > 0, f"{label}: no wgmma"      # the logit tiles on Hopper's tensor cores
