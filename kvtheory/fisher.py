r"""The softmax Fisher metric on attention logits, Fisher damage and the exact KL.

For attention weights :math:`p = \mathrm{softmax}(s)` over :math:`n` tokens and a logit
perturbation :math:`\delta`,

.. math::

    \mathrm{KL}\big(\mathrm{softmax}(s)\,\|\,\mathrm{softmax}(s+\delta)\big)
    = \tfrac12\,\delta^\top F(p)\,\delta + O(\|\delta\|^3),
    \qquad F(p) = \mathrm{diag}(p) - p p^\top .

``F`` is the Fisher information of the categorical distribution in its logits (the Hessian of
the KL at :math:`\delta = 0`; derivation (a) in :mod:`kvtheory.symbolic` proves it). The
*Fisher damage* :math:`\tfrac12\delta^\top F\delta = \tfrac12\mathrm{Var}_p(\delta)` is
computed without forming ``F``.

Conventions shared by every function here:

* the last axis is the token axis ``n``; any leading axes broadcast (``*batch``);
* ``mask`` (optional, ``True`` = the token may be attended) broadcasts against the logits;
  masked positions are ignored, and may hold ``-inf``/NaN logits or perturbations;
  a fully masked row has ``p = 0`` and zero damage/KL;
* half-precision inputs are computed (and returned) in float32; other dtypes are kept.

Source: Amari, *Information Geometry and Its Applications* (2016), §2 (Fisher metric of the
exponential family); the KV-cache reading follows arXiv 2604.11501.
"""

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ._checks import check_int, check_tensor
from .errors import KVTheoryError, bad_argument

__all__ = [
    "softmax_fisher",
    "fisher_damage",
    "softmax_kl",
    "masked_softmax",
    "masked_log_softmax",
    "causal_mask",
]

_HALF = (torch.float16, torch.bfloat16)
#: above this centred perturbation the KL is taken by logsumexp (e^x would lose nothing)
_LARGE = 30.0
#: below this |x| the function e^x - 1 - x is summed as a series (no cancellation)
_SERIES = 0.2
#: 1/(k+2)! for k = 0..11: e^x - 1 - x = x^2 * sum_k x^k/(k+2)!
_COEFS = [1.0 / math.factorial(k + 2) for k in range(12)]


def _work_dtype(*xs: Tensor) -> torch.dtype:
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.float32 if dtype in _HALF else dtype


def _upcast(*xs: Tensor) -> tuple[Tensor, ...]:
    """Bring float tensors to one working dtype (half precision -> float32)."""
    dtype = _work_dtype(*xs)
    return tuple(x.to(dtype) for x in xs)


def _check_mask(mask: object, like: Tensor, name: str = "mask") -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise bad_argument(name, mask, "a boolean tensor (True = the token may be attended)")
    try:
        torch.broadcast_shapes(mask.shape, like.shape)
    except RuntimeError:
        raise bad_argument(
            name, mask, f"a boolean mask broadcastable to shape {tuple(like.shape)}"
        ) from None
    return mask.to(like.device)


def _check_broadcast(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise KVTheoryError(
            f"{name_b}: got shape {tuple(b.shape)}; expected a shape that broadcasts with "
            f"{name_a}'s {tuple(a.shape)} (the last axis is the token axis n)"
        ) from None


def _check_finite_where(name: str, x: Tensor, mask: Tensor | None) -> None:
    """Values must be finite where the mask allows (everywhere when there is no mask)."""
    finite = torch.isfinite(x)
    if mask is not None:
        finite = finite | ~mask
    if x.numel() and not bool(finite.all()):
        raise KVTheoryError(
            f"{name}: got {int((~finite).sum())} NaN/Inf values at attended positions of a "
            f"tensor of shape {tuple(x.shape)}; expected finite values (pass a mask for "
            "positions that are masked out)"
        )


def _check_probs(p: Tensor, mask: Tensor | None, given: torch.dtype) -> None:
    """p >= 0 and rows sum to 1 (or 0) within a tolerance of the dtype the user ``given``."""
    allowed = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
    if bool((allowed & (p < 0)).any()):
        raise bad_argument("p", p, "probabilities >= 0 (softmax weights, not logits)")
    sums = torch.where(allowed, p, 0).sum(-1)
    eps = torch.finfo(given).eps
    tol = max(math.sqrt(eps), p.shape[-1] * eps)
    ok = ((sums - 1).abs() <= tol) | (sums == 0)
    if not bool(ok.all()):
        worst = float(sums.flatten()[(sums - 1).abs().argmax()])
        raise KVTheoryError(
            f"p: got a row summing to {worst:.6g} over attended positions; expected "
            "probabilities that sum to 1 along the last axis (or 0 for a fully masked row)"
        )


def masked_log_softmax(
    s: Float[Tensor, "*#batch n"], mask: Bool[Tensor, "*#batch n"] | None = None
) -> Float[Tensor, "*#batch n"]:
    r"""Log-softmax along the last axis, :math:`-\infty` at masked positions.

    :math:`\log p_j = s_j - \log\sum_{k:\,m_k} e^{s_k}` for allowed ``j``. A fully masked row
    is all :math:`-\infty` (so ``exp`` gives ``p = 0``), never NaN.

    >>> import torch
    >>> masked_log_softmax(torch.zeros(3), torch.tensor([True, True, False])).exp()
    tensor([0.5000, 0.5000, 0.0000])
    """
    check_tensor("s", s, min_ndim=1, finite=False, axes="*batch n")
    (s,) = _upcast(s)
    mask = _check_mask(mask, s)
    _check_finite_where("s", s, mask)
    if mask is None:
        return torch.log_softmax(s, dim=-1)
    neg_inf = torch.tensor(-math.inf, dtype=s.dtype, device=s.device)
    s_m = torch.where(mask, s, neg_inf)
    lse = torch.logsumexp(s_m, dim=-1, keepdim=True)
    return torch.where(mask, s_m - lse, neg_inf)


def masked_softmax(
    s: Float[Tensor, "*#batch n"], mask: Bool[Tensor, "*#batch n"] | None = None
) -> Float[Tensor, "*#batch n"]:
    r"""Softmax along the last axis with masked positions at exactly 0.

    :math:`p_j = m_j e^{s_j} / \sum_k m_k e^{s_k}`; a fully masked row is all zeros.

    >>> import torch
    >>> masked_softmax(torch.tensor([0.0, 0.0, 9.0]), torch.tensor([True, True, False]))
    tensor([0.5000, 0.5000, 0.0000])
    """
    return masked_log_softmax(s, mask).exp()


def causal_mask(
    n_query: int, n_token: int, device: torch.device | str | None = None
) -> Bool[Tensor, "query token"]:
    r"""Causal mask for the last ``n_query`` of ``n_token`` positions.

    Query ``i`` sits at position :math:`i + n_\text{token} - n_\text{query}` and may attend
    token ``j`` iff :math:`j \le i + n_\text{token} - n_\text{query}` (prefill when
    ``n_query == n_token``; decoding with a cache otherwise).

    >>> causal_mask(2, 3).int()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    n_token = check_int("n_token", n_token, 1)
    n_query = check_int("n_query", n_query, 1, n_token)
    i = torch.arange(n_query, device=device).unsqueeze(-1)
    j = torch.arange(n_token, device=device)
    return j <= i + (n_token - n_query)


def softmax_fisher(p: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch n n"]:
    r"""The softmax Fisher metric :math:`F(p) = \mathrm{diag}(p) - p p^\top`.

    ``p`` (``*batch n``) are attention weights (nonnegative, summing to 1 along the last
    axis); returns ``F`` of shape ``*batch n n``, symmetric positive semi-definite with
    :math:`F\mathbf 1 = 0`. It is the Hessian in :math:`\delta` of
    :math:`\mathrm{KL}(\mathrm{softmax}(s)\,\|\,\mathrm{softmax}(s+\delta))` at
    :math:`\delta = 0`. Source: Amari (2016), §2.

    >>> import torch
    >>> softmax_fisher(torch.tensor([0.25, 0.75]))
    tensor([[ 0.1875, -0.1875],
            [-0.1875,  0.1875]])
    """
    check_tensor("p", p, min_ndim=1, axes="*batch n")
    given = p.dtype
    (p,) = _upcast(p)
    _check_probs(p, None, given)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def fisher_damage(
    p: Float[Tensor, "*#batch n"],
    delta: Float[Tensor, "*#batch n"],
    mask: Bool[Tensor, "*#batch n"] | None = None,
) -> Float[Tensor, "*#batch"]:
    r"""Fisher damage :math:`\tfrac12\delta^\top F(p)\,\delta` of a logit perturbation.

    .. math::

        D(\delta) = \tfrac12\Big(\sum_j p_j\delta_j^2
                    - \big(\textstyle\sum_j p_j\delta_j\big)^2\Big)
                  = \tfrac12 \sum_j p_j\,(\delta_j - \bar\delta)^2,
        \qquad \bar\delta = \textstyle\sum_j p_j \delta_j ,

    evaluated in the centred form (never negative, exact under :math:`\delta\to\delta+c`),
    without forming ``F``. ``p`` and ``delta`` (``*batch n``) broadcast; positions where
    ``mask`` is False are ignored (``p`` is 0 there; ``delta`` may be anything). Returns
    shape ``*batch``. It is the second-order term of :func:`softmax_kl`.

    >>> import torch
    >>> p = torch.tensor([0.5, 0.5])
    >>> fisher_damage(p, torch.tensor([1.0, -1.0]))   # 1/2 * Var = 1/2 * 1
    tensor(0.5000)
    """
    check_tensor("p", p, min_ndim=1, axes="*batch n")
    check_tensor("delta", delta, min_ndim=1, finite=False, axes="*batch n")
    _check_broadcast("p", p, "delta", delta)
    given = p.dtype
    p, delta = _upcast(p, delta)
    mask = _check_mask(mask, p)
    _check_probs(p, mask, given)
    _check_finite_where("delta", delta, mask)
    if mask is not None:
        p = torch.where(mask, p, 0)
        delta = torch.where(mask, delta, 0)
    return _damage(p, delta)


def _damage(p: Tensor, delta: Tensor) -> Tensor:
    """Unchecked centred Fisher damage (p is 0 and delta finite at masked positions)."""
    mean = (p * delta).sum(-1, keepdim=True)
    return 0.5 * (p * (delta - mean).square()).sum(-1)


def _exp_minus_1_minus_x(x: Tensor) -> Tensor:
    r""":math:`e^x - 1 - x` to full relative precision (series near 0, no overflow above 30)."""
    x = x.clamp(max=_LARGE)
    series = torch.full_like(x, _COEFS[-1])
    for c in reversed(_COEFS[:-1]):
        series = series * x + c
    series = series * x.square()
    return torch.where(x.abs() < _SERIES, series, torch.expm1(x) - x)


def softmax_kl(
    s: Float[Tensor, "*#batch n"],
    delta: Float[Tensor, "*#batch n"],
    mask: Bool[Tensor, "*#batch n"] | None = None,
) -> Float[Tensor, "*#batch"]:
    r"""Exact :math:`\mathrm{KL}(\mathrm{softmax}(s)\,\|\,\mathrm{softmax}(s+\delta))`.

    With :math:`p = \mathrm{softmax}(s)` and :math:`x_j = \delta_j - \sum_k p_k\delta_k`,

    .. math::

        \mathrm{KL} = \log\sum_j p_j e^{x_j}
                    = \log\!\Big(1 + \sum_j p_j\,(e^{x_j} - 1 - x_j)\Big),

    summed in the second form (every term is :math:`\ge 0`, so small KLs keep full relative
    precision, unlike :math:`\mathrm{lse}(s+\delta) - \mathrm{lse}(s) - p\cdot\delta`), and by
    logsumexp when some :math:`x_j > 30`. ``s``, ``delta`` (``*batch n``) and ``mask``
    broadcast; masked positions are excluded from both distributions. Returns ``*batch``.
    Its Hessian at :math:`\delta = 0` is :func:`softmax_fisher`.

    >>> import torch
    >>> s = torch.tensor([0.0, 0.0])
    >>> round(float(softmax_kl(s, torch.tensor([1.0, -1.0]))), 6)   # log cosh 1
    0.433781
    """
    check_tensor("s", s, min_ndim=1, finite=False, axes="*batch n")
    check_tensor("delta", delta, min_ndim=1, finite=False, axes="*batch n")
    _check_broadcast("s", s, "delta", delta)
    s, delta = _upcast(s, delta)
    mask = _check_mask(mask, s)
    _check_finite_where("delta", delta, mask)
    return _kl(masked_log_softmax(s, mask), delta, mask)


def _kl(logp: Tensor, delta: Tensor, mask: Tensor | None) -> Tensor:
    """Unchecked exact KL from masked log-probabilities (see :func:`softmax_kl`)."""
    p = logp.exp()
    if mask is not None:
        delta = torch.where(mask, delta, 0)
    x = delta - (p * delta).sum(-1, keepdim=True)
    small = torch.log1p((p * _exp_minus_1_minus_x(x)).sum(-1))
    allowed = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    x_max = torch.where(allowed, x, -math.inf).amax(-1)
    if not bool((x_max > _LARGE).any()):
        return small
    large = torch.logsumexp(logp + x, dim=-1).clamp_min(0)
    return torch.where(x_max > _LARGE, large, small)
