r"""Per-direction damage of rank reduction vs quantization, and a worst-case flip certificate.

For a query :math:`q`, keys :math:`K` (rows :math:`k_j`, head dimension :math:`d`) and a
direction :math:`u` (normalised here, :math:`\|u\| = 1`), write

.. math::

    s_j = \frac{q\cdot k_j}{\sqrt d},\qquad p = \mathrm{softmax}(s),\qquad
    \alpha = \frac{q\cdot u}{\sqrt d},\qquad c_j = u\cdot k_j .

* **Projection** (removing :math:`u` from every key, :math:`k_j \to (I - uu^\top)k_j`) shifts
  the logits by :math:`\delta_j = -\alpha c_j`, so under the Fisher metric of
  :mod:`kvtheory.fisher` :math:`D_\text{proj} = \tfrac12\alpha^2\,\mathrm{Var}_p(c)`.
* **Quantization** of the coordinate on :math:`2^b` levels spanning
  :math:`[c_{\min}, c_{\max}]`, step :math:`\Delta = (c_{\max}-c_{\min})/(2^b-1)`, adds
  independent errors :math:`\varepsilon_j \sim U[-\Delta/2, \Delta/2]` of variance
  :math:`\Delta^2/12`: :math:`\mathbb E[D_\text{quant}] = \tfrac12\alpha^2\,\tfrac{\Delta^2}{12}
  (1 - \|p\|^2)`.
* **Headline** (:func:`headline_ratio`): a coordinate of magnitude :math:`a` (balanced
  :math:`c_j = \pm a`, :math:`\mathrm{Var}_p(c) = a^2`) costs :math:`a^2` to remove; on
  :math:`[-a, a]` with :math:`2^b` *cells*, :math:`\Delta = 2a/2^b` and
  :math:`\Delta^2/12 = a^2/(3\cdot 4^b)`; with :math:`\|p\|^2 \to 0` the ratio is
  :math:`3\cdot 2^{2b}` (768 at INT4). :func:`exact_ratio` keeps what the headline drops:
  the :math:`2^b - 1` steps of a grid that contains both end points, the data's
  :math:`\mathrm{Var}_p(c)` and range, and :math:`1 - \|p\|^2`. For the balanced
  :math:`\pm a` coordinate under uniform attention over :math:`n` tokens it is exactly
  :math:`3(2^b-1)^2\,n/(n-1) \to 3\cdot 4^b(1 - 2^{-b})^2`
  (derivation (c) in :mod:`kvtheory.symbolic`).

Shapes: ``q`` is ``*batch query d``, ``k`` is ``*batch token d``, ``u`` is ``*batch d``; the
leading axes broadcast (e.g. ``u`` of shape ``(d,)``; GQA: give ``k`` a length-1 axis where
``q`` has its query heads in a group). ``mask`` (``*batch query token``, True = may attend)
is optional; the quantization range is taken over the tokens some query may attend.
Half precision is computed in float32. Source: arXiv 2604.11501 (per-direction perturbation
result); the uniform-noise model is Widrow & Kollár, *Quantization Noise* (2008), ch. 4.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ._checks import check_bits, check_choice, check_int, check_same_d, check_tensor
from .errors import KVTheoryError, bad_argument
from .fisher import _check_mask, _damage, _kl, _upcast, masked_log_softmax

__all__ = [
    "headline_ratio", "projection_damage", "projection_kl", "expected_quant_damage",
    "mc_quant_damage", "rounded_quant_damage", "exact_ratio", "logit_bound",
    "margin_certificate", "MarginCertificate",
]

_METRICS = ("fisher", "kl")
#: elements per Monte-Carlo chunk (bounds memory of mc_quant_damage)
_CHUNK_ELEMENTS = 1 << 22


def headline_ratio(bits: int) -> int:
    r"""The per-direction damage ratio :math:`3\cdot 2^{2b} = 3\cdot 4^b`, as an exact int.

    .. math::

        \frac{D_\text{proj}}{\mathbb E[D_\text{quant}]} = \frac{a^2}{\Delta^2/12},\quad
        \Delta = \frac{2a}{2^b} \;\Rightarrow\; 3\cdot 4^b

    (removing a coordinate of magnitude :math:`a` vs quantizing it on :math:`[-a, a]` with
    :math:`2^b` cells, :math:`\|p\|^2 \to 0`). ``bits`` is an integer in 1..16.

    >>> headline_ratio(4)
    768
    """
    b = check_bits(bits)
    return 3 * 4**b


@dataclass(frozen=True)
class _Setup:
    s: Tensor  # logits            (*batch, query, token)
    logp: Tensor  # log-weights    (*batch, query, token), -inf where masked
    p: Tensor  # weights           (*batch, query, token)
    alpha: Tensor  # (q.u)/sqrt(d) (*batch, query)
    c: Tensor  # u.k               (*batch, token)
    mask: Tensor | None
    c_min: Tensor  # (*batch)
    c_max: Tensor  # (*batch)


def _setup(q: Tensor, k: Tensor, u: Tensor, mask: object) -> _Setup:
    check_tensor("q", q, min_ndim=2, axes="*batch query d")
    check_tensor("k", k, min_ndim=2, axes="*batch token d")
    check_tensor("u", u, min_ndim=1, axes="*batch d")
    check_same_d("q", q, "k", k)
    check_same_d("q", q, "u", u)
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], u.shape[:-1])
    except RuntimeError:
        raise KVTheoryError(
            f"k: got leading axes {tuple(k.shape[:-2])} (u: {tuple(u.shape[:-1])}); expected "
            f"leading axes that broadcast with those of q, {tuple(q.shape[:-2])}"
        ) from None
    q, k, u = _upcast(q, k, u)
    norm = u.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise bad_argument("u", u, "a nonzero direction (it is normalised to unit length)")
    u = u / norm
    sqrt_d = math.sqrt(q.shape[-1])
    s = q @ k.mT / sqrt_d
    alpha = (q * u.unsqueeze(-2)).sum(-1) / sqrt_d
    c = (k * u.unsqueeze(-2)).sum(-1)
    mask = _check_mask(mask, s)
    logp = masked_log_softmax(s, mask)
    if mask is None:
        c_min, c_max = c.amin(-1), c.amax(-1)
    else:
        seen = mask.any(-2) if mask.ndim >= 2 else mask  # tokens some query may attend
        c_min = torch.where(seen, c, math.inf).amin(-1)
        c_max = torch.where(seen, c, -math.inf).amax(-1)
    return _Setup(s, logp, logp.exp(), alpha, c, mask, c_min, c_max)


def _step(st: _Setup, bits: int) -> Tensor:
    """Quantization step (c_max - c_min)/(2^b - 1); 0 where nothing is attended."""
    span = st.c_max - st.c_min
    return torch.where(torch.isfinite(span), span, 0) / (2**bits - 1)


def _spread(p: Tensor) -> Tensor:
    r""":math:`\sum p - \sum p^2` (= 1 - ||p||^2, and 0 on fully masked rows)."""
    return p.sum(-1) - p.square().sum(-1)


def _var_c(st: _Setup) -> Tensor:
    """Var_p(c) per query, in the centred form."""
    c = st.c.unsqueeze(-2)
    return (st.p * (c - (st.p * c).sum(-1, keepdim=True)).square()).sum(-1)


def projection_damage(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    u: Float[Tensor, "*#batch d"],
    mask: Bool[Tensor, "*#batch query token"] | None = None,
) -> Float[Tensor, "*#batch query"]:
    r"""Fisher damage of removing ``u`` from the keys, :math:`\tfrac12\alpha^2\mathrm{Var}_p(c)`.

    The logit change of :math:`K \to K(I - uu^\top)` is :math:`\delta_j = -\alpha c_j`, and
    :math:`\tfrac12\delta^\top F\delta = \tfrac12\alpha^2\sum_j p_j (c_j - \bar c)^2`,
    :math:`\bar c = \sum_j p_j c_j`. Returns ``*batch query``.

    >>> import torch
    >>> q = torch.tensor([[2.0, 0.0]]); k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> projection_damage(q, k, torch.tensor([1.0, 0.0]))  # alpha^2 = 2, Var = 1 - tanh(sqrt 2)^2
    tensor([0.2108])
    """
    st = _setup(q, k, u, mask)
    return 0.5 * st.alpha.square() * _var_c(st)


def projection_kl(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    u: Float[Tensor, "*#batch d"],
    mask: Bool[Tensor, "*#batch query token"] | None = None,
) -> Float[Tensor, "*#batch query"]:
    r"""Exact KL of removing ``u``: :math:`\mathrm{KL}(p\,\|\,\mathrm{softmax}(s - \alpha c))`.

    The second-order term of this KL is :func:`projection_damage`. Returns ``*batch query``.

    >>> import torch
    >>> q = torch.tensor([[2.0, 0.0]]); k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> projection_kl(q, k, torch.tensor([1.0, 0.0]))  # back to uniform attention
    tensor([0.4779])
    """
    st = _setup(q, k, u, mask)
    return _kl(st.logp, -st.alpha.unsqueeze(-1) * st.c.unsqueeze(-2), st.mask)


def expected_quant_damage(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    u: Float[Tensor, "*#batch d"],
    bits: int,
    mask: Bool[Tensor, "*#batch query token"] | None = None,
) -> Float[Tensor, "*#batch query"]:
    r"""Expected Fisher damage of b-bit uniform quantization of the coordinate :math:`c = Ku`.

    .. math::

        \mathbb E[D_\text{quant}] = \tfrac12\,\alpha^2\,\frac{\Delta^2}{12}\,(1 - \|p\|^2),
        \qquad \Delta = \frac{c_{\max} - c_{\min}}{2^b - 1},

    from :math:`\delta_j = \alpha\varepsilon_j` with independent zero-mean
    :math:`\varepsilon_j` of variance :math:`\Delta^2/12` (derivation (b) in
    :mod:`kvtheory.symbolic`). Returns ``*batch query``.

    >>> import torch
    >>> q = torch.tensor([[2.0, 0.0]]); k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> expected_quant_damage(q, k, torch.tensor([1.0, 0.0]), bits=1)  # Delta = 2, 1-|p|^2 = 0.105
    tensor([0.0351])
    """
    b = check_bits(bits)
    st = _setup(q, k, u, mask)
    var = _step(st, b).square().unsqueeze(-1) / 12
    return 0.5 * st.alpha.square() * var * _spread(st.p)


def mc_quant_damage(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    u: Float[Tensor, "*#batch d"],
    bits: int,
    samples: int = 10_000,
    generator: torch.Generator | None = None,
    mask: Bool[Tensor, "*#batch query token"] | None = None,
    *,
    metric: str = "fisher",
) -> Float[Tensor, "*#batch query"]:
    r"""Monte-Carlo mean damage, :math:`\varepsilon_j \stackrel{iid}{\sim} U[-\Delta/2, \Delta/2]`.

    Averages, over ``samples`` draws of one error per token (shared by every query that reads
    the same keys), either the Fisher damage ``metric="fisher"``,
    :math:`\tfrac12\alpha^2(\sum_j p_j\varepsilon_j^2 - (\sum_j p_j\varepsilon_j)^2)`, whose
    mean is :func:`expected_quant_damage`, or the exact ``metric="kl"``
    :math:`\mathrm{KL}(\mathrm{softmax}(s)\,\|\,\mathrm{softmax}(s + \alpha\varepsilon))`.
    Memory is bounded by drawing the samples in chunks. Returns ``*batch query``.

    >>> import torch
    >>> q = torch.tensor([[2.0, 0.0]]); k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> g = torch.Generator().manual_seed(0)
    >>> mc = mc_quant_damage(q, k, torch.tensor([1.0, 0.0]), 1, generator=g)
    >>> bool(abs(mc / expected_quant_damage(q, k, torch.tensor([1.0, 0.0]), 1) - 1) < 0.05)
    True
    """
    b = check_bits(bits)
    n = check_int("samples", samples, 1)
    metric = check_choice("metric", metric, _METRICS)
    st = _setup(q, k, u, mask)
    step = _step(st, b).unsqueeze(-1)
    per = max(1, _CHUNK_ELEMENTS // max(1, st.p.numel()))
    total = torch.zeros(torch.broadcast_shapes(st.alpha.shape, st.p.shape[:-1]),
                        dtype=st.p.dtype, device=st.p.device)
    pad = (1,) * (total.ndim - st.c.ndim)  # keys' batch axes aligned after the sample axis
    done = 0
    while done < n:
        m = min(per, n - done)
        uni = torch.rand((m, *pad, *st.c.shape), generator=generator, dtype=st.c.dtype,
                         device=generator.device if generator is not None else st.c.device)
        eps = ((uni.to(st.c.device) - 0.5) * step).unsqueeze(-2)  # (m, *batch, 1, token)
        if metric == "fisher":
            m1 = (st.p * eps).sum(-1)
            m2 = (st.p * eps.square()).sum(-1)
            total += (0.5 * st.alpha.square() * (m2 - m1.square()).clamp_min(0)).sum(0)
        else:
            total += _kl(st.logp, st.alpha.unsqueeze(-1) * eps, st.mask).sum(0)
        done += m
    return total / n


def rounded_quant_damage(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    u: Float[Tensor, "*#batch d"],
    bits: int,
    mask: Bool[Tensor, "*#batch query token"] | None = None,
    *,
    metric: str = "fisher",
) -> Float[Tensor, "*#batch query"]:
    r"""Damage of rounding :math:`c` to the :math:`2^b` levels on :math:`[c_{\min}, c_{\max}]`.

    :math:`\hat c_j = c_{\min} + \Delta\,\mathrm{round}((c_j - c_{\min})/\Delta)`,
    :math:`\delta_j = \alpha(\hat c_j - c_j)` (the keys become :math:`k_j + (\hat c_j - c_j)u`);
    returns the Fisher damage (``metric="fisher"``) or the exact KL (``"kl"``), ``*batch query``.

    >>> import torch
    >>> q = torch.tensor([[2.0, 0.0]]); k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> rounded_quant_damage(q, k, torch.tensor([1.0, 0.0]), bits=1)  # end points are exact
    tensor([0.])
    """
    b = check_bits(bits)
    metric = check_choice("metric", metric, _METRICS)
    st = _setup(q, k, u, mask)
    step = _step(st, b).unsqueeze(-1)
    lo = torch.where(torch.isfinite(st.c_min), st.c_min, 0).unsqueeze(-1)
    safe = torch.where(step > 0, step, 1)
    c_hat = torch.where(step > 0, lo + safe * torch.round((st.c - lo) / safe), st.c)
    delta = st.alpha.unsqueeze(-1) * (c_hat - st.c).unsqueeze(-2)
    if metric == "kl":
        return _kl(st.logp, delta, st.mask)
    return _damage(st.p, delta)


def exact_ratio(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    u: Float[Tensor, "*#batch d"],
    bits: int,
    mask: Bool[Tensor, "*#batch query token"] | None = None,
) -> Float[Tensor, "*#batch query"]:
    r"""The data-dependent, finite-b ratio :math:`D_\text{proj} / \mathbb E[D_\text{quant}]`.

    .. math::

        \frac{D_\text{proj}}{\mathbb E[D_\text{quant}]}
        = \frac{12\,(2^b - 1)^2\,\mathrm{Var}_p(c)}{(c_{\max} - c_{\min})^2\,(1 - \|p\|^2)} .

    :math:`\alpha^2` cancels, so the ratio is evaluated in this form (also defined when
    :math:`q \perp u`); NaN where it is 0/0 (constant ``c`` or one-hot ``p``). For
    :math:`c_j = \pm a` balanced under uniform attention over :math:`n` tokens it is
    :math:`3(2^b-1)^2 n/(n-1)`; compare :func:`headline_ratio`. Returns ``*batch query``.

    >>> import torch
    >>> k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> r = exact_ratio(torch.tensor([[0.0, 1.0]]), k, torch.tensor([1.0, 0.0]), bits=4)
    >>> round(float(r), 3)  # 3 * 15^2 * n/(n-1), n = 2
    1350.0
    """
    b = check_bits(bits)
    st = _setup(q, k, u, mask)
    return _var_c(st) / (_step(st, b).square().unsqueeze(-1) / 12 * _spread(st.p))


def logit_bound(
    q: Float[Tensor, "*#batch query d"],
    steps: Float[Tensor, "*#batch d"] | Float[Tensor, "*#batch token d"],
    *,
    per_token: bool = False,
) -> Float[Tensor, "*#batch query"] | Float[Tensor, "*#batch query token"]:
    r"""Worst-case logit change when key coordinates are rounded to grids of step :math:`\Delta_i`.

    Rounding moves :math:`k_{ji}` by at most :math:`\Delta_{ji}/2`, so

    .. math:: |\delta_j| = \frac{|q\cdot(\hat k_j - k_j)|}{\sqrt d}
              \le \frac{1}{2\sqrt d}\sum_i |q_i|\,\Delta_{ji} .

    ``steps`` is per coordinate (``*batch d``, e.g. per-channel scales; returns
    ``*batch query``) or, with ``per_token=True``, per token and coordinate
    (``*batch token d``, e.g. a per-token scale repeated along ``d``; returns
    ``*batch query token``).

    >>> import torch
    >>> logit_bound(torch.tensor([[1.0, -3.0, 0.0, 2.0]]), torch.full((4,), 0.5))  # 6*0.5/(2*2)
    tensor([0.7500])
    """
    return _logit_bound(q, steps, per_token)


def _logit_bound(q: Tensor, steps: Tensor, per_token: bool) -> Tensor:
    check_tensor("q", q, min_ndim=2, axes="*batch query d")
    axes = "*batch token d" if per_token else "*batch d"
    check_tensor("steps", steps, min_ndim=2 if per_token else 1, axes=axes)
    check_same_d("q", q, "steps", steps)
    if bool((steps < 0).any()):
        raise bad_argument("steps", steps, "quantization steps >= 0")
    q, steps = _upcast(q, steps)
    scale = 1.0 / (2.0 * math.sqrt(q.shape[-1]))
    try:
        if per_token:
            return (q.abs() @ steps.mT) * scale
        return (q.abs() * steps.unsqueeze(-2)).sum(-1) * scale
    except RuntimeError:
        raise KVTheoryError(
            f"steps: got shape {tuple(steps.shape)} (per_token={per_token}); expected leading "
            f"axes that broadcast with those of q, {tuple(q.shape[:-2])}"
        ) from None


@dataclass(frozen=True)
class MarginCertificate:
    r"""Which queries provably keep their top-1 token: ``margin > 2 * bound``.

    ``certified`` (bool), ``margin`` (top-1 minus top-2 logit; ``inf`` with fewer than two
    attendable tokens) and ``bound`` (the largest :math:`|\delta_j|` bound over attendable
    tokens), all shaped ``*batch query``.
    """

    certified: Bool[Tensor, "..."]
    margin: Float[Tensor, "..."]
    bound: Float[Tensor, "..."]

    @property
    def fraction(self) -> float:
        """Fraction of queries certified."""
        return float(self.certified.float().mean()) if self.certified.numel() else 1.0


def margin_certificate(
    q: Float[Tensor, "*#batch query d"],
    k: Float[Tensor, "*#batch token d"],
    steps: Float[Tensor, "*#batch d"] | Float[Tensor, "*#batch token d"],
    mask: Bool[Tensor, "*#batch query token"] | None = None,
    *,
    per_token: bool = False,
) -> MarginCertificate:
    r"""Certify that the attended (top-1) token cannot change under quantization of the keys.

    With :math:`t = \arg\max_j s_j`, :math:`m = s_t - \max_{j\ne t} s_j` and
    :math:`B = \max_j |\delta_j|` bounded by :func:`logit_bound`, for every :math:`j \ne t`:
    :math:`\hat s_t - \hat s_j \ge m - 2B`, so :math:`m > 2B` certifies that :math:`t` stays the
    unique maximum. ``steps`` as in :func:`logit_bound`.

    >>> import torch
    >>> q = torch.tensor([[2.0, 0.0], [2.0, 2.0]]); k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> cert = margin_certificate(q, k, torch.tensor([0.5, 3.0]))  # margins 2.83; bounds 0.35, 2.47
    >>> cert.certified
    tensor([ True, False])
    """
    bound = _logit_bound(q, steps, per_token)
    check_tensor("k", k, min_ndim=2, axes="*batch token d")
    check_same_d("q", q, "k", k)
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2],
                               steps.shape[:-2] if per_token else steps.shape[:-1])
    except RuntimeError:
        raise KVTheoryError(
            f"k: got leading axes {tuple(k.shape[:-2])} (steps: shape {tuple(steps.shape)}); "
            f"expected leading axes that broadcast with those of q, {tuple(q.shape[:-2])}"
        ) from None
    q, k = _upcast(q, k)
    s = q @ k.mT / math.sqrt(q.shape[-1])
    mask = _check_mask(mask, s)
    allowed = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    s, allowed = torch.broadcast_tensors(s, allowed)
    s_m = torch.where(allowed, s, -math.inf)
    if s.shape[-1] >= 2:
        top = s_m.topk(2, dim=-1).values
        margin = top[..., 0] - top[..., 1]
        margin = torch.where(allowed.sum(-1) >= 2, margin, math.inf)
    else:
        margin = torch.full(s.shape[:-1], math.inf, dtype=s.dtype, device=s.device)
    if per_token:
        bound = torch.where(allowed, bound, 0).amax(-1)
    margin, bound = torch.broadcast_tensors(margin, bound)
    return MarginCertificate(certified=margin > 2 * bound, margin=margin, bound=bound)
