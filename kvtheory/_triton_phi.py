r"""Triton helpers of the fused metrics kernel's softmax sums (:mod:`kvtheory._triton_kernel`
states what they compute): the series of :math:`\varphi(u) = e^u - 1 - u`, its per-block choice
(``PHI_MODE``), and the re-referencing functions; imported only where Triton is importable."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _series(u, DEG: tl.constexpr):
    r""":math:`\sum_{n=0}^{DEG} u^n/(n+2)!` for ``DEG`` 3, 6 or 8 (Horner, one FMA a term), so
    that :math:`\varphi(u) = e^u - 1 - u \approx u^2` times it. Three coefficient tables
    written out: this is the code measured and checked on the H200 (benchmarks/KERNEL_NOTES.md)."""
    if DEG == 3:
        p = 1.0 / 120.0
        p = 1.0 / 24.0 + u * p
        p = 1.0 / 6.0 + u * p
        p = 0.5 + u * p
    elif DEG == 6:
        p = 1.0 / 40320.0
        p = 1.0 / 5040.0 + u * p
        p = 1.0 / 720.0 + u * p
        p = 1.0 / 120.0 + u * p
        p = 1.0 / 24.0 + u * p
        p = 1.0 / 6.0 + u * p
        p = 0.5 + u * p
    else:
        p = 1.0 / 3628800.0
        p = 1.0 / 362880.0 + u * p
        p = 1.0 / 40320.0 + u * p
        p = 1.0 / 5040.0 + u * p
        p = 1.0 / 720.0 + u * p
        p = 1.0 / 120.0 + u * p
        p = 1.0 / 24.0 + u * p
        p = 1.0 / 6.0 + u * p
        p = 0.5 + u * p
    return p


@triton.jit
def _phi(u):
    """e^u - 1 - u (per row, for the re-referencing)."""
    return tl.where(tl.abs(u) < 1.0, u * u * _series(u, 8), tl.exp(u) - 1.0 - u)


@triton.jit
def _psi(h):
    """e^h (1 - h) - 1 (<= 0), accurate near 0 (series for |h| < 1/2)."""
    p = -1.0 / 5760.0
    p = -1.0 / 840.0 + h * p
    p = -1.0 / 144.0 + h * p
    p = -1.0 / 30.0 + h * p
    p = -0.125 + h * p
    p = -1.0 / 3.0 + h * p
    p = -0.5 + h * p
    return tl.where(tl.abs(h) < 0.5, h * h * p, tl.exp(h) * (1.0 - h) - 1.0)


@triton.jit
def _log1p(x):
    return tl.where(x < 1e-3, x * (1.0 - x * (0.5 - x * (1.0 / 3.0))), tl.log(1.0 + x))


@triton.jit
def _block_phi(u, w, t, tu, sh, Wb, S1b, bma, c, a2, PHI_MODE: tl.constexpr):
    """:math:`\\sum_j w_j\\varphi(u_j)` of one block per row (``t`` = w u, ``tu`` = w u²; see
    the module)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    if PHI_MODE == 3:
        big = tl.max(tl.max(tl.abs(u), 1), 0)
        if big < 0.0625:
            PHb = tl.sum(tu * _series(u, 3), 1)
        elif big < 0.5:
            PHb = tl.sum(tu * _series(u, 6), 1)
        elif big < 1.0:
            PHb = tl.sum(tu * _series(u, 8), 1)
        else:   # w e^u = 2^((s^ - m) a2 - c log2 e): no inf * 0
            ew = tl.exp2(sh * a2 - (bma + c * LOG2E)[:, None])
            PHb = tl.sum(tl.where(tl.abs(u) < 1.0, tu * _series(u, 8), ew - w - t), 1)
    elif PHI_MODE == 4:
        ew = tl.exp2(sh * a2 - (bma + c * LOG2E)[:, None])
        PHb = tl.sum(ew, 1) - Wb - S1b
    elif PHI_MODE == 5:
        PHb = Wb * 0.0
    else:   # the kernel before: the long series, the exponential form where |u| >= 1
        if tl.max(tl.max(tl.abs(u), 1), 0) < 1.0:
            PHb = tl.sum(tu * _series(u, 8), 1)
        else:
            ew = tl.exp2(sh * a2 - (bma + c * LOG2E)[:, None])
            PHb = tl.sum(tl.where(tl.abs(u) < 1.0, tu * _series(u, 8), ew - w - t), 1)
    return PHb
