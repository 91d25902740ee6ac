"""The fused quantization kernel (``kvtheory/_triton_quant.py``), which serves
:func:`kvtheory.quantize.quantize` on CUDA: its logic on the CPU through Triton's interpreter,
against the torch path, and its compilation for Hopper, both in subprocesses
(``tests/_quant_interp.py``; the tests' jaxtyping import hook rewrites kvtheory's modules, which
Triton's JIT cannot parse back). On a GPU, ``benchmarks/gpu_quant_check.py`` compares it with
torch's CUDA path and times both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


def _run(mode: str) -> dict:
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HERE / "_quant_interp.py"), mode],
                         capture_output=True, text=True, timeout=600,
                         env={**env, "PYTHONPATH": str(HERE.parent)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interp() -> dict:
    return _run("interp")


def test_every_case_served_by_the_kernel(interp):
    from _quant_interp import BITS, CASES

    assert len(interp) == len(CASES) * (2 * len(BITS) - 1)
    for label, row in interp.items():
        for key in ("exact", "recip"):
            assert row[key] is not None, f"{label}: not served"
            assert row[key]["served"] and row[key]["same_shape_dtype"], (label, key)


def test_kernel_equals_the_torch_arithmetic_element_for_element(interp):
    # exact division: torch's CPU path; reciprocal: the same formula as torch's CUDA path
    for label, row in interp.items():
        for key in ("exact", "recip"):
            assert row[key]["differ"] == 0, (label, key, row[key])


def test_kernel_compiles_for_hopper_without_fused_multiply_add():
    res = _run("compile")
    assert len(res) == 3
    for label, r in res.items():
        assert r["fp_fusion"] is False and r["ptx_fma"] == 0, label
        assert r["ptx_div_rn"] > 0, label     # IEEE division, as torch's tensor division


def test_fallbacks_leave_the_torch_path(monkeypatch):
    from kvtheory import _triton_quant as tq

    launches = []

    class _Recorder:                      # stands in for the kernel: records a launch's grid
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(grid)

    monkeypatch.setattr(tq, "quant_kernel", _Recorder())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 1, 8, 4, dtype=torch.float32)
    assert tq.quantize_fused(x, 4, "token", 4, False) is None                # CPU, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # control: the same call launches once the interpreter is on (grid: 1 row block, 1 column)
    assert tq.quantize_fused(x, 4, "channel", 8, False) is not None
    assert launches == [(1, 1, 1)]
    # each of these alone keeps the torch path (None, no launch)
    assert tq.quantize_fused(x.double(), 4, "token", 4, False) is None       # float64
    big = torch.zeros(1, 1, tq.MAX_TILE, 4, dtype=torch.float32)  # a token group over a tile
    assert tq.quantize_fused(big, 4, "channel", tq.MAX_TILE, False) is None
    grad = x.clone().requires_grad_()                      # autograd keeps the torch path
    assert tq.quantize_fused(grad, 4, "channel", 8, False) is None
    with torch.no_grad():                                  # ... but not outside autograd
        assert tq.quantize_fused(grad, 4, "channel", 8, False) is not None
    monkeypatch.setenv("KVTHEORY_FUSED", "never")
    assert tq.quantize_fused(x, 4, "channel", 8, False) is None
    assert len(launches) == 2


def test_torch_path_on_cpu_is_untouched():
    # quantize() on the CPU never reaches the kernel (hand-worked grid of the module doc)
    from kvtheory import _triton_quant as tq
    from kvtheory.quantize import quantize

    before = tq.CALLS[0]
    y = quantize(torch.tensor([[0.0, 0.3, 1.0]], dtype=torch.float64), 2)
    assert y.tolist() == [[0.0, 1 / 3, 1.0]]
    assert tq.CALLS[0] == before


def test_one_switch_for_both_kernels(monkeypatch):
    # KVTHEORY_FUSED is read by one function: a bad value is refused by the quantize kernel's
    # dispatch as by the metrics kernel's, and torch_path() restores the variable as it was
    from kvtheory import _triton_metrics as tm
    from kvtheory import _triton_quant as tq
    from kvtheory.errors import KVTheoryError

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(tm.ENV, "nevr")
    x = torch.randn(1, 1, 8, 4, dtype=torch.float32)
    with pytest.raises(KVTheoryError, match="KVTHEORY_FUSED"):
        tq.quantize_fused(x, 4, "channel", 8, False)
    with pytest.raises(KVTheoryError, match="KVTHEORY_FUSED"):
        tm.available(torch.device("cuda"), torch.bfloat16)
    with tm.torch_path():
        assert tm.fused_mode() == "never" and tq.quantize_fused(x, 4, "channel", 8, False) is None
    assert os.environ[tm.ENV] == "nevr"
    monkeypatch.delenv(tm.ENV)
    with tm.torch_path():
        assert os.environ[tm.ENV] == "never"
    assert tm.ENV not in os.environ
