r"""Orthonormal bases of the head dimension, fitted per kv head on calibration tensors.

A basis is a small frozen dataclass whose one job is ``fit(k, q=None) -> FittedBasis``. The
fitted basis holds, per kv head, an orthogonal ``rotation`` :math:`U` whose columns are ordered
by importance, and (centered PCA only) a mean :math:`\mu`. Rank-r reconstruction keeps the first
r columns:

.. math:: \hat x = \mu + (x - \mu)\,U_r U_r^{\top}.

========== ================================================================================
name       columns of :math:`U`
========== ================================================================================
identity   unit channel vectors, ordered by energy :math:`E[x_i^2]` (channel selection)
pca        eigenvectors of the second moment :math:`E[k k^\top]`, eigenvalue descending
pcac       eigenvectors of the covariance :math:`E[(k-\mu)(k-\mu)^\top]` (stores :math:`\mu`)
random{s}  Haar-random orthogonal matrix, seed ``s`` (default 0), one per kv head
hadamard   normalized Sylvester Hadamard :math:`H_d/\sqrt d` (d a power of two), natural order
qaware     eigenvectors of :math:`\Sigma_q^{1/2}\Sigma_k\Sigma_q^{1/2}` (see :class:`QAwareBasis`)
========== ================================================================================

Expectations are means over batch and tokens (second moments, not covariances, unless stated).
Fitting runs in float64; eigenvector signs are fixed (largest-magnitude entry positive), so
fits are deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from ._checks import check_group, check_int, check_rank, check_same_d, check_tensor
from .errors import KVTheoryError, bad_argument

__all__ = [
    "FittedBasis", "Basis", "IdentityBasis", "PCABasis", "RandomBasis", "HadamardBasis",
    "QAwareBasis", "BASIS_NAMES", "basis_from_name", "hadamard_matrix",
]

KV_AXES = "batch kv_head token d"
#: the basis names of the method-spec grammar (``random{seed}`` also parses)
BASIS_NAMES = ("identity", "pca", "pcac", "random", "hadamard", "qaware")


@dataclass(frozen=True, eq=False)
class FittedBasis:
    r"""A basis fitted per kv head: ``rotation`` (kv_head, d, d) with orthonormal columns
    ordered by importance, optional ``mean`` (kv_head, d), the basis ``name``, and the
    ``spectrum`` (kv_head, d) of importances (eigenvalues, channel energies) or ``None``.

    >>> fb = HadamardBasis().fit(torch.randn(1, 1, 5, 4))
    >>> x = torch.randn(1, 1, 5, 4)
    >>> bool(torch.allclose(fb.from_coords(fb.to_coords(x)), x, atol=1e-6))
    True
    """

    rotation: Float[Tensor, "kv_head d d"]
    mean: Float[Tensor, "kv_head d"] | None
    name: str
    spectrum: Float[Tensor, "kv_head d"] | None = None

    def __post_init__(self):
        rot = check_tensor("rotation", self.rotation, ndim=3, axes="kv_head d d")
        h, d = rot.shape[0], rot.shape[-1]
        if rot.shape[-2] != d:
            raise bad_argument("rotation", rot, "square matrices shaped (kv_head, d, d)")
        for name in ("mean", "spectrum"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (h, d):
                raise bad_argument(name, value, f"None or a tensor of shape ({h}, {d})")

    @property
    def d(self) -> int:
        return int(self.rotation.shape[-1])

    @property
    def kv_heads(self) -> int:
        return int(self.rotation.shape[0])

    def _prep(self, x: Tensor, name: str, rank_axis: bool = False) -> tuple[Tensor, Tensor]:
        x = check_tensor(name, x, ndim=4, axes="batch kv_head token rank" if rank_axis else KV_AXES)
        if x.shape[1] != self.kv_heads:
            raise KVTheoryError(f"{name}: got {x.shape[1]} kv heads; expected {self.kv_heads} "
                                f"(the basis {self.name!r} was fitted on {self.kv_heads})")
        if rank_axis:
            check_rank(x.shape[-1], self.d, name=f"{name}.shape[-1] (rank)")
        elif x.shape[-1] != self.d:
            raise KVTheoryError(f"{name}: got head dimension d={x.shape[-1]}; expected "
                                f"d={self.d} (the basis {self.name!r} was fitted on it)")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.to(work), self.rotation.to(work)

    def _centered(self, x: Tensor) -> Tensor:
        return x if self.mean is None else x - self.mean.to(x.dtype)[:, None, :]

    def _uncentered(self, x: Tensor) -> Tensor:
        return x if self.mean is None else x + self.mean.to(x.dtype)[:, None, :]

    def _coords(self, x: Tensor, rank: int | None) -> Tensor:
        xw, u = self._prep(x, "x")
        r = self.d if rank is None else check_rank(rank, self.d)
        return self._centered(xw) @ u[..., :r]

    def _back(self, c: Tensor) -> Tensor:
        cw, u = self._prep(c, "c", rank_axis=True)
        return self._uncentered(cw @ u[..., : c.shape[-1]].transpose(-1, -2))

    def to_coords(
        self, x: Float[Tensor, "batch kv_head token d"], rank: int | None = None
    ) -> Float[Tensor, "batch kv_head token rank"]:
        r"""Coordinates :math:`c = (x - \mu) U_r` on the first ``rank`` columns (all by default).
        Computed in float32 (float64 for float64 input), returned in that dtype."""
        return self._coords(x, rank)

    def from_coords(
        self, c: Float[Tensor, "batch kv_head token rank"]
    ) -> Float[Tensor, "batch kv_head token d"]:
        r""":math:`x = \mu + c\, U_r^{\top}` with r = ``c.shape[-1]``; float32 or float64."""
        return self._back(c)

    def project(
        self, x: Float[Tensor, "batch kv_head token d"], rank: int
    ) -> Float[Tensor, "batch kv_head token d"]:
        r"""Rank-r reconstruction :math:`\hat x = \mu + (x-\mu) U_r U_r^{\top}`, dtype of ``x``.

        Shapes: ``x`` (batch, kv_head, token, d) -> same. ``rank`` in 1..d.
        """
        return self._back(self._coords(x, rank)).to(x.dtype)


def _second_moment(x: Tensor) -> Tensor:
    """(batch, head, n, d) -> (head, d, d): mean over batch and n of x xᵀ."""
    return torch.einsum("bhnd,bhne->hde", x, x) / (x.shape[0] * x.shape[2])


def _eig_desc(s: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors (columns) and eigenvalues of symmetric ``s`` (..., d, d), descending,
    each column's largest-magnitude entry made positive."""
    w, v = torch.linalg.eigh(s)
    w, v = w.flip(-1), v.flip(-1)
    pivot = v.gather(-2, v.abs().argmax(-2, keepdim=True))
    return v * torch.where(pivot < 0, -1.0, 1.0).to(v.dtype), w


def _sqrtm_psd(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()[..., None, :]) @ v.transpose(-1, -2)


@dataclass(frozen=True)
class Basis:
    """Base class: validates the calibration tensors, fits in float64 (``_fit`` per subclass)."""

    #: whether ``fit`` reads the values of ``k`` / ``q`` (False: only their shapes)
    data_dependent: ClassVar[bool] = True

    @property
    def name(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def fit(
        self,
        k: Float[Tensor, "batch kv_head token d"],
        q: Float[Tensor, "batch q_head query d"] | None = None,
    ) -> FittedBasis:
        """Fit on keys ``k`` (batch, kv_head, token, d) and, for ``qaware``, queries ``q``
        (batch, q_head, query, d); query head h belongs to kv head h // (q_head // kv_head)."""
        k = check_tensor("k", k, ndim=4, axes=KV_AXES)
        if k.shape[0] * k.shape[2] == 0:
            raise bad_argument("k", k, "at least one batch row and one token to fit on")
        if q is not None:
            q = check_tensor("q", q, ndim=4, axes="batch q_head query d")
            check_same_d("k", k, "q", q)
            check_group(q.shape[1], k.shape[1])
            if q.shape[0] != k.shape[0]:
                raise KVTheoryError(f"q: got batch size {q.shape[0]}; expected {k.shape[0]}, the batch "
                                    "size of k (queries and keys of the same sequences)")
            if q.shape[0] * q.shape[2] == 0:
                raise bad_argument("q", q, "at least one batch row and one query to fit on")
        rot, mean, spectrum = self._fit(k.to(torch.float64), None if q is None else q.to(torch.float64))
        return FittedBasis(rot, mean, self.name, spectrum)

    def _fit(self, k: Tensor, q: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class IdentityBasis(Basis):
    r"""Channel selection: unit vectors :math:`e_i` ordered by energy :math:`E[k_i^2]`
    (descending, ties by index). Rank r keeps the r most energetic channels.

    >>> k = torch.tensor([1.0, 3.0, 2.0]).expand(1, 1, 4, 3)
    >>> IdentityBasis().fit(k).rotation[0].argmax(0).tolist()
    [1, 2, 0]
    """

    @property
    def name(self) -> str:
        return "identity"

    def _fit(self, k, q):
        energy = k.pow(2).mean(dim=(0, 2))
        order = torch.argsort(-energy, dim=-1, stable=True)
        eye = torch.eye(k.shape[-1], dtype=torch.float64)
        return eye[order].transpose(-1, -2), None, energy.gather(-1, order)


@dataclass(frozen=True)
class PCABasis(Basis):
    r"""Principal directions of the keys: eigenvectors of :math:`E[kk^{\top}]` (uncentered)
    or of :math:`E[(k-\mu)(k-\mu)^{\top}]`, :math:`\mu = E[k]` (``centered``), eigenvalue
    descending. Rank r minimises :math:`E\|k - \hat k\|^2` (Eckart-Young) among rank-r
    (affine, when centered) projections; the minimum is the sum of the discarded eigenvalues
    (``spectrum``).

    >>> k = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0]]).expand(1, 1, 3, 2)
    >>> PCABasis().fit(k).spectrum.tolist()
    [[6.0, 0.3333333333333333]]
    """

    centered: bool = False

    @property
    def name(self) -> str:
        return "pcac" if self.centered else "pca"

    def _fit(self, k, q):
        mean = k.mean(dim=(0, 2)) if self.centered else None
        x = k - mean[:, None, :] if self.centered else k
        v, w = _eig_desc(_second_moment(x))
        return v, mean, w


@dataclass(frozen=True)
class RandomBasis(Basis):
    r"""Haar-random orthogonal matrices (one per kv head), deterministic in ``seed``:
    :math:`G = QR` for Gaussian :math:`G` (kv_head, d, d) drawn from
    ``torch.Generator().manual_seed(seed)`` in float64, then :math:`U = Q\,\mathrm{diag}(\mathrm{sign}\,R_{ii})`
    (the sign fix makes :math:`U` Haar distributed; Mezzadri 2007, arXiv math-ph/0609050).
    The columns carry no importance order: rank r keeps a random r-dimensional subspace.

    >>> u = RandomBasis(seed=3).fit(torch.zeros(1, 2, 1, 4)).rotation
    >>> bool(torch.allclose(u[1].T @ u[1], torch.eye(4, dtype=u.dtype)))
    True
    """

    seed: int = 0
    data_dependent: ClassVar[bool] = False

    def __post_init__(self):
        check_int("seed", self.seed, 0, 2**64 - 1)  # torch.Generator's range

    @property
    def name(self) -> str:
        return f"random{self.seed}" if self.seed else "random"

    def _fit(self, k, q):
        h, d = k.shape[1], k.shape[-1]
        g = torch.randn(h, d, d, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(qm.dtype)
        return qm * sign[..., None, :], None, None


def hadamard_matrix(d: int) -> Float[Tensor, "d d"]:
    r"""The normalized Sylvester Hadamard matrix :math:`H_d/\sqrt d`,
    :math:`H_{2n} = \begin{pmatrix} H_n & H_n \\ H_n & -H_n \end{pmatrix}`, :math:`H_1 = (1)`;
    float64, symmetric and orthogonal. ``d`` must be a power of two.

    >>> (hadamard_matrix(2) * 2 ** 0.5).tolist()
    [[1.0, 1.0], [1.0, -1.0]]
    """
    d = check_int("d", d, 1)
    if d & (d - 1):
        raise bad_argument("d", d, "a power of two for the Hadamard basis")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


@dataclass(frozen=True)
class HadamardBasis(Basis):
    r"""The normalized Sylvester Hadamard basis :math:`H_d/\sqrt d` (d a power of two), the same
    for every kv head, columns in natural (Sylvester) order. It spreads every channel over all
    coordinates, flattening outlier channels before quantization.

    >>> HadamardBasis().fit(torch.zeros(1, 1, 1, 6))
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: d: got 6; expected a power of two for the Hadamard basis
    """

    data_dependent: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return "hadamard"

    def _fit(self, k, q):
        return hadamard_matrix(k.shape[-1]).expand(k.shape[1], -1, -1).clone(), None, None


@dataclass(frozen=True)
class QAwareBasis(Basis):
    r"""Query-aware basis: eigenvectors :math:`V` of
    :math:`M = \Sigma_q^{1/2}\,\Sigma_k\,\Sigma_q^{1/2}`, eigenvalue descending, with the second
    moments :math:`\Sigma_k = E[kk^{\top}]` and :math:`\Sigma_q = E[qq^{\top}]` pooled over the
    queries of the kv head's GQA group (query heads :math:`h` with :math:`h // g` = the kv head).

    What it optimises: the mean squared logit error of a rank-r linear map :math:`k \mapsto Ak`,
    :math:`E[(q^{\top}(k - Ak))^2] = \|\Sigma_q^{1/2}(I-A)\Sigma_k^{1/2}\|_F^2` (q, k independent),
    is minimised (Eckart-Young) by the *oblique* map
    :math:`A^{*} = \Sigma_q^{-1/2} V_r V_r^{\top} \Sigma_q^{1/2}`, at the value
    :math:`\sum_{i>r}\lambda_i(M)` (``spectrum`` holds :math:`\lambda(M)`).

    What this basis does: it uses the orthonormal :math:`V` itself and projects orthogonally,
    :math:`\hat k = V_r V_r^{\top} k`. That is the optimum above exactly when
    :math:`\Sigma_q` and :math:`\Sigma_k` commute (e.g. :math:`\Sigma_q \propto I`, where it equals
    uncentered PCA); then :math:`V` are their common eigenvectors ordered by the logit energy
    :math:`(u^{\top}\Sigma_q u)(u^{\top}\Sigma_k u)`. Otherwise it is a heuristic that weights key
    directions by query energy. Limits: second moments only (no softmax, no position), one
    basis for the whole group, needs ``q`` at fit time.

    >>> q = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]).expand(1, 2, 2, 2) * 3
    >>> k = torch.tensor([[0.0, 2.0], [1.0, 0.0]]).expand(1, 1, 2, 2)
    >>> QAwareBasis().fit(k, q).rotation[0].tolist()   # queries see only channel 0
    [[1.0, 0.0], [0.0, 1.0]]
    """

    @property
    def name(self) -> str:
        return "qaware"

    def _fit(self, k, q):
        if q is None:
            raise bad_argument("q", None, "a query tensor (batch, q_head, query, d): the qaware "
                               "basis is fitted on keys and queries, fit(k, q)")
        b, hq, n, d = q.shape
        h = k.shape[1]
        pooled = q.reshape(b, h, (hq // h) * n, d)  # the GQA group's queries, pooled
        root = _sqrtm_psd(_second_moment(pooled))
        v, w = _eig_desc(root @ _second_moment(k) @ root)
        return v, None, w


def basis_from_name(name: str) -> Basis:
    """The basis for a spec name: identity, pca, pcac, random, random{seed}, hadamard, qaware.

    >>> basis_from_name("random7"), basis_from_name("pcac")
    (RandomBasis(seed=7), PCABasis(centered=True))
    """
    fixed = {"identity": IdentityBasis(), "pca": PCABasis(), "pcac": PCABasis(centered=True),
             "hadamard": HadamardBasis(), "qaware": QAwareBasis()}
    if isinstance(name, str) and name in fixed:
        return fixed[name]
    m = re.fullmatch(r"random([0-9]*)", name) if isinstance(name, str) else None
    if m is None:
        raise bad_argument("basis", name, f"one of {', '.join(BASIS_NAMES)} or random{{seed}}")
    return RandomBasis(int(m.group(1) or 0))
