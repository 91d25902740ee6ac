"""Input validation shared by every public function. Errors, never asserts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import KVTheoryError, bad_argument

__all__ = [
    "check_tensor",
    "finite_absmax",
    "check_int",
    "check_bits",
    "check_rank",
    "check_same_d",
    "check_group",
    "check_choice",
    "check_positive",
]


def check_tensor(
    name: str,
    x: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    finite: bool = True,
    floating: bool = True,
    axes: str | None = None,
) -> Tensor:
    """Check that ``x`` is a tensor of the right rank, floating dtype and finite values.

    ``axes`` is the axis-name vocabulary string shown in the message, e.g.
    ``"batch kv_head token d"``.
    """
    if not isinstance(x, Tensor):
        raise bad_argument(name, x, f"a torch.Tensor{f' shaped ({axes})' if axes else ''}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            shape_txt = f" ({axes})" if axes else ""
            raise KVTheoryError(
                f"{name}: got a tensor with {x.ndim} dimensions, shape {tuple(x.shape)}; "
                f"expected {' or '.join(map(str, allowed))} dimensions{shape_txt}"
            )
    if min_ndim is not None and x.ndim < min_ndim:
        raise KVTheoryError(
            f"{name}: got a tensor with {x.ndim} dimensions, shape {tuple(x.shape)}; "
            f"expected at least {min_ndim} dimensions{f' ({axes})' if axes else ''}"
        )
    if floating and not x.is_floating_point():
        raise KVTheoryError(f"{name}: got dtype {x.dtype}; expected a real floating-point tensor")
    if finite and x.is_floating_point():
        finite_absmax(name, x)
    return x


def _not_finite(name: str, x: Tensor) -> KVTheoryError:
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    return KVTheoryError(f"{name}: got {n_nan} NaN and {n_inf} Inf values in a tensor of shape "
                         f"{tuple(x.shape)}; expected finite values")


def finite_absmax(name: str, x: Tensor) -> float:
    r""":math:`\max_i |x_i|` of a floating tensor (0 if empty), from one pass that also checks
    its values are finite (else the error of :func:`check_tensor`, which uses it): the minimum
    and maximum are finite exactly when every value is (NaN propagates through both, an Inf
    shows in one). ``isfinite(x).all()`` would build a boolean tensor of ``x``'s size: about
    100 times slower on the CPU for 67M values; a separate maximum, a second read and sync.

    >>> finite_absmax("x", torch.tensor([1.0, -3.0]))
    3.0
    """
    return finite_absmaxes((name, x))[0]


def finite_absmaxes(*named: tuple[str, Tensor]) -> list[float]:
    """:func:`finite_absmax` of several ``(name, tensor)`` pairs, with one host transfer per
    device (on a GPU each transfer waits for the device: one wait, not one a tensor). The
    error names the first pair, in order, with a value that is not finite.

    >>> finite_absmaxes(("a", torch.tensor([1.0, -3.0])), ("b", torch.tensor([2.0])))
    [3.0, 2.0]
    """
    ext: dict[int, list[float]] = {}
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, x) in enumerate(named):
        by_device.setdefault(x.device, []).append(i)
    for idx in by_device.values():
        ext.update(zip(idx, extremes(*(named[i][1] for i in idx)).tolist()))
    return absmaxes(named, [ext[i] for i in range(len(named))])


def extremes(*xs: Tensor) -> Tensor:
    """``(len(xs), 2)`` float64: the minimum and maximum of each tensor (0, 0 if empty), all on
    the device of the first, queued without a host sync; :func:`absmaxes` reads them.

    >>> extremes(torch.tensor([1.0, -3.0]), torch.empty(0)).tolist()
    [[-3.0, 1.0], [0.0, 0.0]]
    """
    dev = xs[0].device
    return torch.stack([torch.stack(torch.aminmax(x.detach())).to(torch.float64)
                        if x.numel() else torch.zeros(2, dtype=torch.float64, device=dev)
                        for x in xs])


def absmaxes(named: Sequence[tuple[str, Tensor]], ext: Sequence[Sequence[float]]
             ) -> list[float]:
    r""":math:`\max|x|` of each named tensor from its (minimum, maximum) on the host, after the
    error of :func:`check_tensor` for the first tensor, in order, with a value that is not
    finite (NaN propagates to both extremes, an Inf shows in one)."""
    for (name, x), (lo, hi) in zip(named, ext):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _not_finite(name, x)
    return [max(-lo, hi) for lo, hi in ext]


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """Check that ``value`` is an integer in ``[lo, hi]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            rng = _range_text(lo, hi)
            raise bad_argument(name, value, f"an integer{rng}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_argument(name, value, f"an integer{_range_text(lo, hi)}")
    return int(value)


def _range_text(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def check_positive(name: str, value: Any) -> float:
    """Check that ``value`` is a finite real number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise bad_argument(name, value, "a positive number") from None
    if not (v > 0 and v != float("inf")):
        raise bad_argument(name, value, "a positive finite number")
    return v


def check_bits(bits: Any, name: str = "bits") -> int:
    """Bit widths are integers in 1..16."""
    return check_int(name, bits, 1, 16)


def check_rank(rank: Any, d: int, name: str = "rank") -> int:
    """Ranks are integers in 1..d."""
    return check_int(name, rank, 1, d)


def check_same_d(name_a: str, a: Tensor, name_b: str, b: Tensor) -> int:
    """The last (head-dimension) axis must agree."""
    if a.shape[-1] != b.shape[-1]:
        raise KVTheoryError(
            f"{name_b}: got head dimension d={b.shape[-1]}; expected d={a.shape[-1]} "
            f"to match {name_a}"
        )
    return int(a.shape[-1])


def check_group(q_heads: int, kv_heads: int) -> int:
    """GQA: the number of KV heads must divide the number of query heads."""
    if kv_heads <= 0 or q_heads % kv_heads != 0:
        raise KVTheoryError(
            f"kv_heads: got {kv_heads} KV heads for {q_heads} query heads; "
            f"expected a number of KV heads that divides the number of query heads"
        )
    return q_heads // kv_heads


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise bad_argument(name, value, f"one of {', '.join(map(str, choices))}")
    return value
