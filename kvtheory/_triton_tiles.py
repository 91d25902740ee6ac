r"""Triton helpers shared by the fused metrics kernel (:mod:`kvtheory._triton_kernel`) and the
rescan of kept blocks (:mod:`kvtheory._triton_rescan`): a key block's two tiles, the key
mask's row and which of its logits a row sees; imported only where Triton is importable."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def key_tiles(K, KH, KD, KHD, kbase, start, cols, cmask, dd, D: tl.constexpr,
              TMA: tl.constexpr):
    """The ``BLOCK_N`` keys of ``k`` and ``k_hat`` from token ``start`` of the (batch, kv
    head) at row ``kbase``: by tensor descriptors over (batch kv_head token, d) (``TMA``) or
    by pointer loads (masked beyond the sequence)."""
    if TMA:
        k = KD.load([(kbase + start).to(tl.int32), 0])
        kh = KHD.load([(kbase + start).to(tl.int32), 0])
    else:
        kp = (kbase + cols[:, None]) * D + dd[None, :]
        kmk = cmask[:, None] & (dd[None, :] < D)
        k = tl.load(K + kp, mask=kmk, other=0.0)
        kh = tl.load(KH + kp, mask=kmk, other=0.0)
    return k, kh


@triton.jit
def mask_row(b, h, HM, KM_DIV, T):
    """Offset of query head ``h``'s key-mask row in batch ``b``: ``HM`` mask rows a batch
    (1 shared, one a KV head or one a query head), query heads ``KM_DIV`` to a row."""
    return (b * HM + h // KM_DIV).to(tl.int64) * T


@triton.jit
def visible(vis, cols, pos, WINDOW, KM, kmbase, cmask, CAUSAL: tl.constexpr,
            HAS_WINDOW: tl.constexpr, HAS_KM: tl.constexpr):
    """``vis`` (rows by keys) and the masks: causal (key at most the row's position ``pos``),
    a sliding window of ``WINDOW`` tokens, the key mask at ``KM + kmbase``."""
    if CAUSAL:
        vis = vis & (cols[None, :] <= pos[:, None])
    if HAS_WINDOW:
        vis = vis & (cols[None, :] > pos[:, None] - WINDOW)
    if HAS_KM:
        km = tl.load(KM + kmbase + cols, mask=cmask, other=0)
        vis = vis & (km[None, :] != 0)
    return vis
