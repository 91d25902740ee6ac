"""Arguments of the flip engine (:mod:`kvtheory.flips`), checked at its boundary: shapes,
masks, windows, bins, and the range of the logits (finite inputs; float64 logits where float32
ones could overflow). On the fused kernel's path the range check is read with the results
(:class:`_Pending`), so the host does not wait for the GPU before the kernel starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import (absmaxes, check_group, check_int, check_positive, check_same_d,
                      check_tensor, extremes, finite_absmaxes)
from ._flipstream import _HALF, _half_matmul
from .errors import bad_argument


def _edges(name: str, edges: object, last: float) -> tuple[float, ...]:
    try:
        e = tuple(float(x) for x in edges)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        e = ()
    if len(e) < 2 or e[0] != 0.0 or e[-1] != last or any(a >= b for a, b in zip(e, e[1:])):
        raise bad_argument(name, edges, f"increasing bin edges from 0 to {last}")
    return e


def _validate(q, k, k_hat, v, v_hat, causal, key_mask, scale, topk, margin_bins, prob_bins,
              block, window=None, *, defer: bool = False):
    """Checked arguments for :func:`_run` and :func:`_aggregate`, and ``None`` or, with
    ``defer`` on the fused kernel's path, a :class:`_Pending` range check: the finite checks
    and the logit bound are then read with the results (no host wait before the kernel)."""
    check_tensor("q", q, ndim=4, finite=False, axes="batch q_head query d")
    for name, x in (("k", k), ("k_hat", k_hat)):
        check_tensor(name, x, ndim=4, finite=False, axes="batch kv_head token d")
        check_same_d("q", q, name, x)
    if k_hat.shape != k.shape:
        raise bad_argument("k_hat", k_hat, f"the shape of k, {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise bad_argument("k", k, f"batch size {q.shape[0]}, that of q")
    check_group(q.shape[1], k.shape[1])
    if not isinstance(causal, bool):
        raise bad_argument("causal", causal, "True or False")
    B, T, Q = q.shape[0], k.shape[2], q.shape[2]
    if min(B, T, Q, q.shape[3]) == 0:
        raise bad_argument("q", q, "non-empty batch, query, token and d axes")
    if causal and Q > T:
        raise bad_argument("q", q, f"at most {T} queries when causal (the last of the tokens)")
    if v is None and v_hat is not None:
        raise bad_argument("v", v, "a tensor when v_hat is given")
    named = [("q", q), ("k", k), ("k_hat", k_hat)]
    if v is not None:
        check_tensor("v", v, ndim=4, finite=False, axes="batch kv_head token dv")
        v_hat = v if v_hat is None else check_tensor("v_hat", v_hat, ndim=4, finite=False)
        for name, x in (("v", v), ("v_hat", v_hat)):
            if x.shape[:3] != k.shape[:3] or x.shape != v.shape:
                raise bad_argument(name, x, f"shape ({', '.join(map(str, k.shape[:3]))}, dv)")
        named += [("v", v)] + ([("v_hat", v_hat)] if v_hat is not v else [])
    Hq, Hkv = q.shape[1], k.shape[1]
    if key_mask is not None:
        ok = isinstance(key_mask, Tensor) and key_mask.dtype == torch.bool and (
            tuple(key_mask.shape) == (B, T) or (key_mask.ndim == 3 and key_mask.shape[0] == B
                                                and key_mask.shape[2] == T
                                                and key_mask.shape[1] in (1, Hkv, Hq)))
        if not ok:
            raise bad_argument("key_mask", key_mask, f"a boolean tensor of shape ({B}, {T}), "
                               f"({B}, {Hkv}, {T}) (per KV head) or ({B}, {Hq}, {T}) (per "
                               "query head)")
        key_mask = key_mask.unsqueeze(1) if key_mask.ndim == 2 else key_mask
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise bad_argument("window", window, "a positive int (tokens a query sees, itself "
                               "included) or None")
        if not causal:
            raise bad_argument("window", window, "None when causal=False (a sliding window is "
                               "causal)")
    tensors = [x for x in (q, k, k_hat, v, v_hat, key_mask) if x is not None]
    if any(x.is_complex() for x in tensors) or len({x.device for x in tensors}) > 1:
        raise bad_argument("k", k, f"real tensors, all on the device of q ({q.device})")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else check_positive("scale", scale)
    check_int("topk", topk, 1)
    block = None if block is None else check_int("block", block, 1)
    m_edges = _edges("margin_bins", margin_bins, math.inf)
    p_edges = _edges("prob_bins", prob_bins, 1.0)
    dtype = torch.float64 if torch.float64 in {x.dtype for x in tensors} else torch.float32
    same_half = q.dtype == k.dtype == k_hat.dtype and q.dtype in _HALF
    fused = same_half and _fused_available(q.device, q.dtype)
    pending = _Pending(tuple(named), scale) if defer and fused else None
    # the finite checks give max|x| for the range bound: one pass each, one sync (or none yet)
    wide = False if pending else _wide(named, finite_absmaxes(*named), scale)
    dtype = torch.float64 if wide else dtype      # float32 logits could overflow: float64
    half = same_half and not wide and (_half_matmul(q.device.type) or fused)
    if half:   # logits on tensor cores, float32 accumulation and output
        keys = (k, k_hat)
    else:
        keys = (k.to(dtype), k_hat.to(dtype))
        q, scale = q.to(dtype) * scale, 1.0
    values = [None if x is None else x.to(dtype) for x in (v, v_hat)]
    return ((q, *keys, key_mask, (bool(causal), block, scale, window), *values, m_edges,
             p_edges), pending)


@dataclass
class _Pending:
    """The range check of a call on the fused kernel, read with its results: :meth:`start`,
    called right after the kernel's launch (so the host launches the kernel first), queues
    each named tensor's minimum and maximum (``ext``, :func:`~kvtheory._checks.extremes`, on
    the device) for the finite checks and the logit bound."""

    named: tuple[tuple[str, Tensor], ...]
    scale: float
    ext: Tensor | None = None

    def start(self) -> Tensor:
        """Queue the extremes (no host sync); returns them."""
        self.ext = extremes(*(x for _, x in self.named))
        return self.ext

    def wide(self, ext: list[list[float]]) -> bool:
        """:func:`_wide` from the host values ``ext`` of :attr:`ext` (the finite checks'
        errors first)."""
        return _wide(self.named, absmaxes(self.named, ext), self.scale)


def _wide(named, amax: list[float], scale: float) -> bool:
    r"""Whether float32 logits could overflow (Cauchy–Schwarz bound
    :math:`\tau\, d \max|q| \max|k|` beyond ``_RANGE[float32]``), given each named
    tensor's :math:`\max|x|` (``q``, ``k``, ``k_hat`` first); an error beyond float64."""
    q = named[0][1]
    bound = scale * q.shape[-1] * amax[0] * max(amax[1], amax[2])
    if bound > _RANGE[torch.float64]:
        raise bad_argument("q", q, f"q and k whose logits fit in float64 (|scale·q·k| may "
                           f"reach {bound:.3g}; rescale them)")
    return bound > _RANGE[torch.float32]


#: logit bound (Cauchy–Schwarz) up to which a dtype is used: squared deltas summed over
#: 2^31 tokens stay finite
_RANGE = {torch.float32: 1e15, torch.float64: 1e150}


def _fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    from . import _triton_metrics

    return _triton_metrics.available(device, dtype)
