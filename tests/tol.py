"""The one place where numerical tolerances live.

Every comparison in the test suite goes through :func:`assert_close` or :data:`TOL` so that
a tolerance is chosen once, by name, for a reason.
"""

from __future__ import annotations

import math

import torch

#: name -> (rtol, atol)
TOL: dict[str, tuple[float, float]] = {
    # exact float64 identities (same formula, different route)
    "exact64": (1e-12, 1e-12),
    # float64 results through different algorithms (loop vs vectorised, sympy vs torch)
    "float64": (1e-9, 1e-10),
    # float32 model outputs and reductions
    "float32": (1e-5, 1e-6),
    # float32 KL through two summation orders (fused vs in-place): sum_j p_j expm1(x_j) of tiny
    # KL loses a few digits to the order of the terms
    "float32_kl": (1e-3, 1e-7),
    # the fused Triton kernel (float32 streaming sums, half inputs) against the dense float64
    # reference on the same inputs; atol is scaled by max(1, max|q||k|/sqrt d), the logits' size
    "fused_kernel": (1e-4, 2e-7),
    # second-order expansions and other approximations checked in the limit
    "approx": (1e-3, 1e-6),
    # Monte-Carlo estimates at 10^4 samples
    "mc": (0.03, 0.0),
    # float32 model outputs of a batched CPU forward pass against single passes: the batched
    # matmuls sum in another order, about 3e-5 in the logits (issue 14)
    "cpu_batch": (1e-4, 1e-5),
    # float64 batched forwards against single ones through a 4-bit quantizer: the batch sums
    # differ by about 1e-16, enough on some CPUs to move one value across a rounding boundary
    # (1.3e-7 relative in one LAMBADA log-likelihood on an Intel Xeon, 0 on an AMD EPYC); a
    # padding leak moves them by more than 1e-3
    "float64_quantized_batch": (1e-5, 1e-8),
    # compressed (int8) model outputs against uncompressed ones
    "int8_model": (1e-2, 1e-2),
    # a committed report number recomputed on another CPU: reductions round differently and
    # quantized values can land in the neighbouring bin (about 0.5% in quantized PPL at 4 bits,
    # more at 2 bits); bit-identical on the same CPU and software
    "cross_cpu": (0.02, 0.0),
}


def tol(kind: str) -> tuple[float, float]:
    """``(rtol, atol)`` for a named kind of comparison."""
    return TOL[kind]


def assert_close(actual, expected, kind: str = "float64", msg: str = "") -> None:
    """``torch.testing.assert_close`` with a named tolerance; accepts floats and tensors."""
    rtol, atol = TOL[kind]
    a = actual if isinstance(actual, torch.Tensor) else torch.as_tensor(actual, dtype=torch.float64)
    e = expected if isinstance(expected, torch.Tensor) else torch.as_tensor(expected, dtype=torch.float64)
    if a.dtype != e.dtype:
        a, e = a.to(torch.float64), e.to(torch.float64)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=msg or None)


def rel_err(actual: float, expected: float) -> float:
    """|actual - expected| / |expected|."""
    return abs(actual - expected) / abs(expected) if expected != 0 else math.inf
