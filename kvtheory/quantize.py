r"""Uniform scalar quantizers for KV tensors shaped ``(*batch, token, d)``.

Two grids, both with round-to-nearest (ties to even, as :func:`torch.round`):

* **asymmetric (min-max)**, :math:`2^b` levels spanning each group's range,

  .. math::
     \Delta = \frac{\max x - \min x}{2^b - 1}, \qquad
     \hat x = \operatorname{round}\!\Big(\frac{x - \min x}{\Delta}\Big)\,\Delta + \min x ;

  stored per group: a scale and a zero-point (the minimum).
* **symmetric (absmax)**, the restricted mid-tread grid of :math:`2^b - 1` levels
  :math:`\{-L, \dots, L\}\,\Delta`, :math:`L = 2^{b-1} - 1` (so that 0 is exact and the grid is
  symmetric; one of the :math:`2^b` codes is unused),

  .. math:: \Delta = \frac{\max |x|}{L}, \qquad \hat x = \operatorname{clip}(\operatorname{round}(x/\Delta), -L, L)\,\Delta ;

  stored per group: a scale only. It needs :math:`b \ge 2` (at :math:`b = 1`, :math:`L = 0`).

Either way every element has :math:`|x - \hat x| \le \Delta/2` (the grid covers the group's range).

Groups (``axis``):

* ``"token"``: per token, contiguous groups of ``group`` channels along ``d`` (``group`` must
  divide ``d``; ``None`` = the whole head dimension). This is ``int{b}`` / ``int{b}-g{n}``.
* ``"channel"``: per channel, groups of ``group`` consecutive tokens (``None`` = all tokens; a last
  partial group is allowed), as KIVI quantizes keys.

A group whose range is zero (a constant) is reconstructed exactly with :math:`\Delta = 0`.
Computation runs in float32, or float64 for float64 input; the result has the input dtype. On
CUDA one fused Triton kernel (:mod:`kvtheory._triton_quant`) does the same float32 arithmetic in
one pass (``KVTHEORY_FUSED=never`` keeps the torch path).

Source: Liu et al. 2024, *KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache*
(arXiv 2402.02750) for the per-channel key / per-token value grouping; the grids are the
textbook uniform quantizers (Gray & Neuhoff 1998, *Quantization*).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ._checks import check_bits, check_choice, check_int, check_tensor
from .errors import KVTheoryError, bad_argument

__all__ = ["AXES", "quantize", "quant_steps", "quantize_with_steps", "resolve_group"]

#: ``axis`` values: per-token groups along ``d``, or per-channel groups along tokens
AXES = ("token", "channel")


def resolve_group(axis: str, group: int | None, tokens: int, d: int) -> int:
    """The effective group size: ``group`` checked against ``d`` (token axis), or ``None`` resolved.

    >>> resolve_group("token", None, 10, 64), resolve_group("channel", 128, 10, 64)
    (64, 128)
    """
    check_choice("axis", axis, AXES)
    if axis == "token":
        if group is None:
            return d
        g = check_int("group", group, 1, d)
        if d % g:
            raise bad_argument("group", group, f"a divisor of the head dimension d={d}")
        return g
    return tokens if group is None else check_int("group", group, 1)


def _split(x: Tensor, axis: str, g: int) -> tuple[Tensor, int]:
    """View ``x`` (..., T, d) as groups; returns the grouped tensor and the reduction dim."""
    t, d = x.shape[-2:]
    if axis == "token":
        return x.reshape(*x.shape[:-1], d // g, g), -1
    n = -(-t // g)
    pad = n * g - t
    if pad:  # replicate the last token: min, max and absmax are unchanged
        x = torch.cat([x, x[..., -1:, :].expand(*x.shape[:-2], pad, d)], dim=-2)
    return x.reshape(*x.shape[:-2], n, g, d), -2


def _merge(y: Tensor, shape: torch.Size, axis: str) -> Tensor:
    if axis == "token":
        return y.reshape(shape)
    return y.reshape(*shape[:-2], -1, shape[-1])[..., : shape[-2], :]


def _core(x: Tensor, bits: int, axis: str, group: int | None, symmetric: bool,
          steps: bool = True) -> tuple[Tensor, Tensor | None]:
    x = check_tensor("x", x, min_ndim=2, axes="*batch token d")
    bits = check_bits(bits)
    check_choice("axis", axis, AXES)
    if not isinstance(symmetric, bool):
        raise bad_argument("symmetric", symmetric, "True or False")
    if symmetric and bits < 2:
        raise bad_argument("bits", bits, "an integer in 2..16 for symmetric quantization "
                           "(the 1-bit symmetric grid has no non-zero level)")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise KVTheoryError(f"x: got a tensor of shape {tuple(x.shape)}; "
                            "expected at least one token and one channel")
    return _grid(x, bits, axis, group, symmetric, steps)


def _grid(x: Tensor, bits: int, axis: str, group: int | None, symmetric: bool,
          steps: bool) -> tuple[Tensor, Tensor | None]:
    """The arithmetic of :func:`_core` on validated arguments; the steps only when asked
    (merging them back to ``x``'s shape copies a tensor of that size)."""
    g = resolve_group(axis, group, x.shape[-2], x.shape[-1])
    if not steps and x.is_cuda:  # one fused pass (kvtheory._triton_quant), same arithmetic
        from ._triton_quant import quantize_fused

        fused = quantize_fused(x, bits, axis, g, symmetric)
        if fused is not None:
            return fused, None
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xg, dim = _split(x.to(work), axis, g)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        step = xg.abs().amax(dim, keepdim=True) / top
        safe = torch.where(step > 0, step, 1.0)
        x_hat = torch.round(xg / safe).clamp_(-top, top) * step
    else:
        lo = xg.amin(dim, keepdim=True)
        step = (xg.amax(dim, keepdim=True) - lo) / (2**bits - 1)
        safe = torch.where(step > 0, step, 1.0)
        x_hat = torch.round((xg - lo) / safe).clamp_(0, 2**bits - 1) * step + lo
    return (_merge(x_hat, x.shape, axis).to(x.dtype),
            _merge(step.expand_as(xg), x.shape, axis) if steps else None)


def _quantize_checked(x: Tensor, bits: int, axis: str, group: int | None,
                      symmetric: bool) -> Tensor:
    """:func:`quantize` for callers that have validated ``x`` (a non-empty, finite floating
    tensor of at least 2 dimensions) and the options (compressors, in ``__post_init__``)."""
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        return _core(x, bits, axis, group, symmetric, steps=False)[0]  # raises the message
    return _grid(x, bits, axis, group, symmetric, steps=False)[0]


def quantize_with_steps(
    x: Float[Tensor, "*batch token d"],
    bits: int,
    *,
    axis: str = "token",
    group: int | None = None,
    symmetric: bool = False,
) -> tuple[Float[Tensor, "*batch token d"], Float[Tensor, "*batch token d"]]:
    r"""The reconstruction :math:`\hat x` and the step :math:`\Delta` of every element's group.

    Shapes: ``x`` (\*batch, token, d) -> (``x_hat`` like ``x``, ``steps`` same shape, dtype
    float32 or float64). Arguments as :func:`quantize`.

    >>> x_hat, steps = quantize_with_steps(torch.tensor([[0.0, 0.3, 1.0]], dtype=torch.float64), 2)
    >>> steps.tolist()[0] == [1 / 3] * 3, x_hat.tolist()[0] == [0.0, 1 / 3, 1.0]
    (True, True)
    """
    return _core(x, bits, axis, group, symmetric)


def quantize(
    x: Float[Tensor, "*batch token d"],
    bits: int,
    *,
    axis: str = "token",
    group: int | None = None,
    symmetric: bool = False,
) -> Float[Tensor, "*batch token d"]:
    r"""Quantize and dequantize ``x`` on a uniform ``bits``-bit grid per group.

    Asymmetric: :math:`\hat x = \operatorname{round}((x - m)/\Delta)\Delta + m`,
    :math:`m = \min_{\text{group}} x`, :math:`\Delta = (\max - \min)/(2^b - 1)`.
    Symmetric: :math:`\hat x = \operatorname{clip}(\operatorname{round}(x/\Delta), -L, L)\Delta`,
    :math:`\Delta = \max|x| / L`, :math:`L = 2^{b-1} - 1`.

    Args:
        x: (\*batch, token, d), finite.
        bits: 1..16 (2..16 when ``symmetric``).
        axis: ``"token"`` (groups of ``group`` channels per token) or ``"channel"``
            (groups of ``group`` tokens per channel, last partial group allowed).
        group: group size; ``None`` = the whole axis.
        symmetric: absmax grid instead of min-max.

    Returns: ``x_hat``, same shape and dtype as ``x``.

    >>> quantize(torch.tensor([[0.0, 0.3, 1.0]]), 2)
    tensor([[0.0000, 0.3333, 1.0000]])
    >>> quantize(torch.tensor([[0.0, 0.3, 1.0]]), 1)
    tensor([[0., 0., 1.]])
    """
    return _core(x, bits, axis, group, symmetric, steps=False)[0]


def quant_steps(
    x: Float[Tensor, "*batch token d"],
    bits: int,
    *,
    axis: str = "token",
    group: int | None = None,
    symmetric: bool = False,
) -> Float[Tensor, "*batch token d"]:
    r"""The step :math:`\Delta` of each element's quantization group, shaped like ``x``.

    :math:`|x - \hat x| \le \Delta/2` for every element; :math:`\Delta = 0` for a constant group.
    Arguments as :func:`quantize`; the result is float32 (float64 for float64 input).

    >>> quant_steps(torch.tensor([[-1.0, 0.5], [2.0, 2.0]]), 3, symmetric=True)
    tensor([[0.3333, 0.3333],
            [0.6667, 0.6667]])
    """
    return _core(x, bits, axis, group, symmetric)[1]
