r"""One fused Triton kernel for :func:`kvtheory.quantize.quantize` on CUDA: each program loads one
tile of groups, reduces it to the group's minimum and maximum (absmax when symmetric), and
writes :math:`\hat x` back; one read and one write of ``x`` instead of the eight or so
full-tensor passes of the torch path (upcast, min, max, subtract, divide, round, clamp,
multiply, add).

The arithmetic is the torch path's, operation by operation, in float32 (ties to even):

.. math::
   \Delta = (\max - \min)\cdot\mathrm{fl}(1/(2^b-1)), \qquad
   \hat x = \operatorname{clip}\!\big(\operatorname{rint}((x - \min) \oslash \Delta'), 0, 2^b-1\big)
   \,\Delta + \min

(symmetric: :math:`\Delta = \max|x|\cdot\mathrm{fl}(1/L)`,
:math:`\hat x = \operatorname{clip}(\operatorname{rint}(x \oslash \Delta'), -L, L)\,\Delta`,
:math:`L = 2^{b-1}-1`), with :math:`\oslash` the IEEE division, :math:`\Delta' = \Delta` or 1
where :math:`\Delta = 0`, no fused multiply-add (``enable_fp_fusion=False``). ``RECIP`` picks
how :math:`\Delta` is divided by the number of levels: multiplied by the float32 reciprocal
(``torch``'s CUDA division by a Python scalar, the default here) or divided exactly (its CPU
division; the interpreter test compares each to torch on its own device).

Groups: ``axis="channel"`` groups ``G`` consecutive tokens of each channel (a program takes one
token group of a block of channels: a ``(next_pow2(G), channel_block)`` tile, the last group
maybe partial); ``axis="token"`` groups ``g`` consecutive channels of a token (viewed as rows of
length ``g``; a program takes a block of rows). Tile shapes are in :data:`CONFIG`; a tile over
:data:`MAX_TILE` elements falls back to torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

__all__ = ["quantize_fused", "CALLS", "CONFIG", "MAX_TILE"]

#: calls served by the kernel (tests and benchmarks check that it ran)
CALLS = [0]
#: largest tile (elements) a program holds in registers; larger groups use the torch path
MAX_TILE = 1 << 15
#: tile shapes: channels a program takes of a token group (``axis="channel"``; each channel
#: is its own group, so any split gives the same result), rows a program takes
#: (``axis="token"``), and warps for tiles of 4,096 elements or more (4 below). On an H100 at
#: (4, 8, 4096, 128) float32 (``benchmarks/gpu_quant.json``): KIVI keys 54 µs with blocks of 32
#: channels against 88 µs with 128, values 50-56 µs with 32 rows (2.4-2.7 TB/s; two runs)
CONFIG: dict[str, int] = {"channel_block": 32, "token_rows": 32, "warps": 8}

try:  # pragma: no cover - exercised on a CUDA machine (or Triton's interpreter) only
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means: no kernel here
    triton = None

#: 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude below 2**22 to an integer,
#: ties to even (IEEE addition), as ``torch.round``; Triton's interpreter has no ``libdevice.rint``
_MAGIC = tl.constexpr(12582912.0) if triton is not None else None

if triton is not None:  # pragma: no cover - compiled on CUDA, interpreted in a test subprocess

    @triton.jit
    def quant_kernel(x_ptr, y_ptr, T, D, G, inv, levels,
                     SYM: tl.constexpr, CHANNEL: tl.constexpr, RECIP: tl.constexpr,
                     BT: tl.constexpr, BD: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        i = tl.arange(0, BT)
        cols = tl.program_id(2) * BD + tl.arange(0, BD)   # channel groups: a block of channels
        if CHANNEL:
            rows = blk * G + i
            rmask = (i < G) & (rows < T)
        else:
            rows = blk * BT + i
            rmask = rows < T
        m = rmask[:, None] & (cols[None, :] < D)
        off = r * T * D + rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if SYM:
            if CHANNEL:
                top = tl.max(tl.where(m, tl.abs(x), 0.0), axis=0)[None, :]
            else:
                top = tl.max(tl.where(m, tl.abs(x), 0.0), axis=1)[:, None]
            floor = -levels
        else:
            if CHANNEL:
                lo = tl.min(tl.where(m, x, float("inf")), axis=0)[None, :]
                top = tl.max(tl.where(m, x, float("-inf")), axis=0)[None, :] - lo
            else:
                lo = tl.min(tl.where(m, x, float("inf")), axis=1)[:, None]
                top = tl.max(tl.where(m, x, float("-inf")), axis=1)[:, None] - lo
            floor = 0.0
        if RECIP:
            step = top * inv
        else:
            step = tl.div_rn(top, levels)
        safe = tl.where(step > 0, step, 1.0)
        if SYM:
            v = tl.div_rn(x, safe)
        else:
            v = tl.div_rn(x - lo, safe)
        q = (v + _MAGIC) - _MAGIC  # rint, ties to even: |v| <= 2**16 < 2**22
        q = tl.minimum(tl.maximum(q, floor), levels)
        y = q * step
        if not SYM:
            y = y + lo
        tl.store(y_ptr + off, y, mask=m)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def quantize_fused(x: Tensor, bits: int, axis: str, g: int, symmetric: bool, *,
                   recip: bool | None = None) -> Tensor | None:
    """:func:`kvtheory.quantize.quantize` of a validated ``x`` (\\*batch, token, d) with the
    resolved group size ``g``, by the kernel; ``None`` where the kernel does not serve the call
    (no Triton, not CUDA outside the interpreter, ``KVTHEORY_FUSED=never``, float64, an input
    that requires grad while autograd records, or a group too large for one tile). ``recip``
    (default: on CUDA) as the module says."""
    if triton is None or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    from ._triton_metrics import fused_mode

    if fused_mode() == "never":
        return None
    if x.requires_grad and torch.is_grad_enabled():   # the torch path keeps the autograd graph
        return None
    t, d = x.shape[-2:]
    if axis == "channel":
        bt, bd, rows, cols = _pow2(g), min(_pow2(d), _pow2(CONFIG["channel_block"])), t, d
        grid_t, grid_c = -(-t // g), -(-d // bd)
    else:  # rows of g channels: contiguous groups of a token
        bd = _pow2(g)
        bt = max(1, min(MAX_TILE // bd, _pow2(CONFIG["token_rows"])))
        rows, cols = t * (d // g), g
        grid_t, grid_c = -(-rows // bt), 1
    if bt * bd > MAX_TILE or grid_t > 65535:  # the grid's second axis is 16-bit
        return None
    xc = x.contiguous()
    r = xc.numel() // (t * d)
    # float32 out; bf16 / fp16 rounded by torch (Triton's interpreter truncates its casts)
    y = torch.empty(xc.shape, dtype=torch.float32, device=xc.device)
    levels = float(2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1)
    inv = float(np.float32(1.0) / np.float32(levels))
    recip = x.is_cuda if recip is None else recip
    quant_kernel[(r, grid_t, grid_c)](
        xc, y, rows, cols, g, inv, levels, SYM=symmetric, CHANNEL=axis == "channel",
        RECIP=bool(recip), BT=bt, BD=bd, num_warps=CONFIG["warps"] if bt * bd >= 4096 else 4,
        enable_fp_fusion=False)
    CALLS[0] += 1
    return y if x.dtype == torch.float32 else y.to(x.dtype)
