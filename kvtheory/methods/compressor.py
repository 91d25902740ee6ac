r"""The compressor protocol: ``comp(x, mask=None)`` returns the reconstruction :math:`\hat x`.

A compressor acts on keys or values shaped (batch, kv_head, token, d) and returns a tensor of
the same shape, dtype and device; ``comp.bits_per_element(d, tokens)`` is its storage. Every
call goes through :meth:`Compressor.__call__`, which validates the input, hands it to
``_apply`` and validates the output, so that a compressor returning the wrong shape, dtype or
device is named in a :class:`~kvtheory.errors.KVTheoryError` (``compressed_kv`` checks the
output again, for subclasses that override ``__call__``).

``mask`` (batch, token), True on real tokens, tells *token-grouped* compressors
(``token_grouped = True``: statistics that span tokens, such as KIVI's per-channel groups) which
positions the attention mask hides (padding); they must compute their statistics over the real
tokens only. Other compressors act on each token alone and never see the mask.

:meth:`Compressor.from_fn` turns a plain tensor function into a compressor:

>>> half = Compressor.from_fn(lambda x: x.half().to(x.dtype), bits_per_element=16)
>>> half(torch.ones(1, 1, 2, 4)).shape, half.bits_per_element(4)
(torch.Size([1, 1, 2, 4]), 16.0)
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field
from fractions import Fraction
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .._checks import check_int, check_tensor
from ..errors import KVTheoryError, bad_argument

__all__ = ["Compressor", "FnCompressor", "KV_AXES", "deferred_finite_checks", "check_output",
           "check_mask", "on_real_tokens", "key_validity", "KeyValidityMemo", "calibration_mask",
           "real_tokens"]

KV_AXES = "batch kv_head token d"

#: device flags of the open :func:`deferred_finite_checks` blocks (innermost last)
_DEFERRED: list[Tensor] = []


def _check_kv(x: Tensor) -> Tensor:
    """``check_tensor("x", x, ndim=4)`` with a cheaper finite test: one sum instead of
    ``isfinite(x).all()`` (a sum is finite when every term is; when it is not, because of a
    NaN/Inf or an overflow, the exact test decides and words the error). Compressors run on
    every attention call, so this keeps validation from costing more than the compression.
    Inside :func:`deferred_finite_checks` on an accelerator the test is folded into a device
    flag instead (no host sync per call) and decided when the block ends."""
    check_tensor("x", x, ndim=4, axes=KV_AXES, finite=False)
    if not x.numel():
        return x
    if _DEFERRED and x.device == _DEFERRED[-1].device:
        _DEFERRED[-1].logical_and_(torch.isfinite(x.sum()))
    elif not bool(torch.isfinite(x.sum())):
        check_tensor("x", x, ndim=4, axes=KV_AXES)
    return x


@contextlib.contextmanager
def deferred_finite_checks(device: Any) -> Iterator[None]:
    """On an accelerator, check the compressors' inputs for NaN/Inf once, when the block ends
    (one host sync instead of one per attention call; the error is the same
    :class:`KVTheoryError`, raised at the end of the block); on the CPU, do nothing special.

    >>> with deferred_finite_checks("cpu"):
    ...     _ = _check_kv(torch.zeros(1, 1, 2, 2))
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        yield
        return
    flag = torch.ones((), dtype=torch.bool, device=dev)
    _DEFERRED.append(flag)
    try:
        yield
    finally:
        del _DEFERRED[next(i for i, f in enumerate(_DEFERRED) if f is flag)]
    if not bool(flag):
        raise KVTheoryError("x: got key/value states with NaN or Inf inside compressed_kv (checked "
                            "once at the end of the block on the accelerator); expected finite "
                            "attention inputs")


def check_mask(mask: Any, x: Tensor) -> Tensor | None:
    """``mask`` as a bool (batch, token) tensor on ``x``'s device, or None when every token is
    real (nothing to hide).

    >>> check_mask(torch.tensor([[1, 1, 0]]), torch.zeros(1, 2, 3, 4)).tolist()
    [[True, True, False]]
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.ndim != 2 or tuple(mask.shape) != (x.shape[0], x.shape[2]):
        raise bad_argument("mask", mask if not isinstance(mask, Tensor) else f"shape {tuple(mask.shape)}",
                           f"None or a (batch, token) = ({x.shape[0]}, {x.shape[2]}) tensor, "
                           "True on real tokens")
    mask = mask.to(device=x.device, dtype=torch.bool)
    return None if bool(mask.all()) else mask


def on_real_tokens(fn: Callable[[Tensor], Tensor], x: Tensor, mask: Tensor | None) -> Tensor:
    """``fn`` applied to the real tokens of each batch row of ``x`` (batch, kv_head, token, d)
    as one sequence (``mask`` (batch, token), True on real tokens; None: all real); hidden
    positions are returned unchanged. Left and right padding give the same real-token values.

    >>> x = torch.tensor([[[[1.0], [9.0], [3.0]]]])
    >>> on_real_tokens(lambda t: t - t.mean(-2, keepdim=True), x, torch.tensor([[True, False, True]])).flatten().tolist()
    [-1.0, 9.0, 1.0]
    """
    if mask is None:
        return fn(x)
    out = x.clone()
    for b in range(x.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        if idx.numel():
            out[b, :, idx] = fn(x[b:b + 1, :, idx])[0]
    return out


def check_output(comp: Any, x: Tensor, y: Any) -> Tensor:
    """``y``, the output of ``comp`` on ``x``, if it is a tensor of ``x``'s shape, dtype and
    device; otherwise a :class:`KVTheoryError` naming the compressor.

    >>> check_output("c", torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: compressor: got 'c' returning a tensor of shape (1, 1, 2, 3), dtype torch.float32 on cpu for an input of shape (1, 1, 2, 2), dtype torch.float32 on cpu; expected the input's shape, dtype and device
    """
    if (isinstance(y, Tensor) and y.shape == x.shape and y.dtype == x.dtype
            and y.device == x.device):
        return y
    got = (f"a tensor of shape {tuple(y.shape)}, dtype {y.dtype} on {y.device}"
           if isinstance(y, Tensor) else f"{type(y).__name__} {y!r:.40}")
    raise KVTheoryError(f"compressor: got {comp!r:.120} returning {got} for an input of shape "
                        f"{tuple(x.shape)}, dtype {x.dtype} on {x.device}; expected the input's "
                        "shape, dtype and device")


@dataclass(frozen=True)
class Compressor:
    """Base class: ``__call__`` validates ``x`` (and ``mask``), calls ``_apply`` and validates the
    output; ``fit`` returns ``self``. Subclasses implement ``_apply(x)`` (``_apply(x, mask)``
    when ``token_grouped``) and ``bits_per_element(d, tokens=None)``."""

    #: whether statistics span tokens: ``_apply(x, mask)`` then receives the real-token mask
    token_grouped: ClassVar[bool] = False

    @property
    def needs_fit(self) -> bool:
        """Whether ``fit(k, q)`` on calibration tensors must come before use."""
        return False

    def fit(
        self,
        k: Float[Tensor, "batch kv_head token d"],
        q: Float[Tensor, "batch q_head query d"] | None = None,
    ) -> Compressor:
        """A copy fitted on calibration keys ``k`` (and queries ``q`` for qaware)."""
        check_tensor("k", k, ndim=4, axes=KV_AXES)
        return self

    def __call__(
        self, x: Float[Tensor, "batch kv_head token d"],
        mask: Bool[Tensor, "batch token"] | None = None,
    ) -> Float[Tensor, "batch kv_head token d"]:
        """The reconstruction of ``x`` (batch, kv_head, token, d): same shape, dtype and device.
        ``mask`` (batch, token), True on real tokens, reaches token-grouped compressors only."""
        x = _check_kv(x)
        if self.token_grouped:
            y = self._apply(x, check_mask(mask, x))
        else:
            y = self._apply(x)
        return check_output(self, x, y)

    def _apply(self, x: Tensor, *mask: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def storage(self, d: int, tokens: int | None = None) -> tuple[Fraction, Fraction, Fraction]:
        """Exact bits per element as (payload, scales, basis); ``tokens`` amortises a stored
        basis (None: not counted). Defaults to all of :meth:`bits_per_element` as payload."""
        if type(self).bits_per_element is Compressor.bits_per_element:
            raise KVTheoryError(f"compressor: got {self!r:.80} with neither storage() nor "
                                "bits_per_element(); expected a compressor that states its storage")
        return Fraction(self.bits_per_element(d, tokens)), Fraction(0), Fraction(0)

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        """Bits per cached element at head dimension ``d`` (the sum of :meth:`storage`)."""
        return float(sum(self.storage(d, tokens)))

    @staticmethod
    def from_fn(fn: Callable[..., Tensor], *, bits_per_element: int | float | Callable[..., float],
                name: str | None = None) -> FnCompressor:
        r"""A compressor from a plain function ``fn(x) -> x_hat`` on (batch, kv_head, token, d)
        tensors; a function with a ``mask`` parameter is called as ``fn(x, mask=mask)`` and
        is token-grouped (``mask`` is None or (batch, token), True on real tokens).
        ``bits_per_element``: a number, or a function ``(d, tokens) -> bits``.

        >>> c = Compressor.from_fn(torch.round, bits_per_element=lambda d, tokens: 8.0, name="round")
        >>> c(torch.full((1, 1, 1, 2), 0.6)).tolist(), c.bits_per_element(64), c
        ([[[[1.0, 1.0]]]], 8.0, FnCompressor(name='round'))
        """
        return FnCompressor(fn, bits_per_element, name)


def _takes_mask(fn: Callable) -> bool:
    try:
        return "mask" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class FnCompressor(Compressor):
    """A compressor wrapping a function (see :meth:`Compressor.from_fn`)."""

    fn: Callable[..., Tensor] = field(repr=False)
    bits: int | float | Callable[..., float] = field(repr=False)
    name: str | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise bad_argument("fn", self.fn, "a function x -> x_hat on (batch, kv_head, token, d) tensors")
        if not callable(self.bits):
            if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not self.bits > 0:
                raise bad_argument("bits_per_element", self.bits,
                                   "a positive number or a function (d, tokens) -> bits")
        object.__setattr__(self, "_masked", _takes_mask(self.fn))

    @property
    def token_grouped(self) -> bool:  # type: ignore[override]
        return self._masked

    def _apply(self, x, *mask):
        return self.fn(x, mask=mask[0]) if self._masked else self.fn(x)

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        d = check_int("d", d, 1)
        bits = self.bits(d, tokens) if callable(self.bits) else self.bits
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not bits > 0:
            raise bad_argument("bits_per_element", bits, f"a positive number from {self!r}")
        return float(bits)


def key_validity(attention_mask: Any, batch: int, tokens: int) -> Tensor | None:
    r"""Which key positions are real, (batch, token) bool, from the mask the model passes to
    its attention function (or the model's own 2D (batch, token) mask, 1 on real tokens): a key is real when at least one query may attend to it
    (bool masks: True = attend; additive float masks: above half the dtype's minimum). Padded
    keys are hidden from every query, left or right padding alike, so they come out False.
    None when nothing is hidden or the mask does not say (None, another shape or type).

    >>> m = torch.tensor([[1, 1, 0], [0, 1, 1]]).bool()          # right and left padding
    >>> causal = torch.ones(3, 3).tril().bool()
    >>> key_validity(causal & m[:, None, None, :], 2, 3).tolist()
    [[True, True, False], [False, True, True]]
    """
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim not in (2, 3, 4):
        return None
    m = attention_mask
    if m.shape[-1] < tokens:
        return None
    # a 2D (batch, past + new) mask ends with the new tokens; a 4D one starts with the keys
    m = m[..., -tokens:] if m.ndim == 2 else m[..., :tokens]
    visible = m if m.dtype == torch.bool else (
        m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0)
    if visible.ndim == 4:
        visible = visible.any(dim=-2).any(dim=1)
    elif visible.ndim == 3:
        visible = visible.any(dim=-2)
    if visible.shape[0] not in (1, batch):
        return None
    if bool(visible.all()):
        return None
    return visible.expand(batch, tokens)


class KeyValidityMemo:
    """:func:`key_validity`, remembered per mask object: in one forward pass every layer gets the
    same mask tensor, and deciding that nothing is hidden reads a flag back from the device (a
    host sync: the GPU's queue drains). Deciding it at every layer cost ``int4-kivi``'s
    evaluation of a Mistral-7B-shaped model on an H100 145 syncs against fp's 16, and 1.12× a
    plain forward against 1.04× with this memo (benchmarks/README.md). One decision per mask
    object, not per layer. Masks are held by weak reference, so a freed mask's id cannot be
    mistaken for a new one's and no mask outlives its forward pass.

    >>> memo, m = KeyValidityMemo(), torch.tensor([[1, 1, 0]]).bool()
    >>> memo(m, 1, 3).tolist(), memo(m, 1, 3) is memo(m, 1, 3), memo(None, 1, 3)
    ([[True, True, False]], True, None)
    """

    def __init__(self, size: int = 4):
        self.size = check_int("size", size, 1)
        self._seen: list[tuple[Any, int, int, Tensor | None]] = []

    def __call__(self, attention_mask: Any, batch: int, tokens: int) -> Tensor | None:
        if not isinstance(attention_mask, Tensor):
            return key_validity(attention_mask, batch, tokens)
        for ref, b, t, out in self._seen:
            if ref() is attention_mask and (b, t) == (batch, tokens):
                return out
        out = key_validity(attention_mask, batch, tokens)
        self._seen = [(weakref.ref(attention_mask), batch, tokens, out)] + self._seen[
            : self.size - 1]
        return out

    def clear(self) -> None:
        """Forget every mask (at the start of each forward pass: a mask changed in place between
        two passes is read again)."""
        self._seen = []


def calibration_mask(mask: Any, ids: Tensor) -> Tensor | None:
    """The attention mask of calibration ``ids`` as bool (batch, token) on the CPU, or None when
    every token is real; a mask of another shape, a float mask or all zeros is refused.

    >>> calibration_mask(torch.tensor([[1, 0]]), torch.zeros(1, 2)).tolist()
    [[True, False]]
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape) or mask.is_floating_point():
        raise bad_argument("attention_mask", mask if not isinstance(mask, Tensor) else
                           f"shape {tuple(mask.shape)}", f"None or a 0/1 tensor shaped like the "
                           f"calibration ids {tuple(ids.shape)}")
    valid = mask.to("cpu").bool()
    if not bool(valid.any()):
        raise bad_argument("attention_mask", "all zeros", "at least one real calibration token")
    return None if bool(valid.all()) else valid


def real_tokens(x: Tensor, valid: Tensor) -> Tensor:
    """(batch, head, token, d) -> (1, head, n, d): the n real tokens of all rows, in order.

    >>> real_tokens(torch.arange(4.0).reshape(2, 1, 2, 1), torch.tensor([[True, False], [True, True]])).flatten().tolist()
    [0.0, 2.0, 3.0]
    """
    return x.transpose(1, 2)[valid].transpose(0, 1).unsqueeze(0)
