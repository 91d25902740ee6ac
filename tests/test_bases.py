"""Bases: orthonormality, full-rank identity, PCA optimality, Hadamard/random/qaware by hand."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tol import assert_close

from kvtheory.bases import (
    FittedBasis, HadamardBasis, IdentityBasis, PCABasis, QAwareBasis, RandomBasis, basis_from_name,
    hadamard_matrix,
)
from kvtheory.errors import KVTheoryError

NAMES = ["identity", "pca", "pcac", "random", "random5", "hadamard", "qaware"]


def _kq(seed: int, batch=2, kv=2, group=2, tokens=40, d=8, queries=30):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, d)  # anisotropic, distinct energies
    k = torch.randn(batch, kv, tokens, d, generator=g) * scales + 0.3
    q = torch.randn(batch, kv * group, queries, d, generator=g) * scales.flip(0)
    return k, q


# ---------------------------------------------------------------- every basis
@settings(max_examples=40)
@given(
    name=st.sampled_from(NAMES),
    seed=st.integers(0, 2**31 - 1),
    d_log=st.integers(0, 4),
    kv=st.integers(1, 2),
    tokens=st.integers(1, 12),
)
def test_orthonormal_and_full_rank_projection_is_identity(name, seed, d_log, kv, tokens):
    d = 2**d_log
    k, q = _kq(seed, kv=kv, tokens=tokens, d=d, queries=3)
    fb = basis_from_name(name).fit(k, q)
    eye = torch.eye(d).expand(kv, d, d)
    assert fb.rotation.shape == (kv, d, d) and fb.rotation.dtype == torch.float64
    assert_close(fb.rotation.transpose(-1, -2) @ fb.rotation, eye, "float64")
    x = torch.randn(3, kv, 5, d, generator=torch.Generator().manual_seed(seed + 1))
    assert_close(fb.project(x, d), x, "float64")
    assert_close(fb.from_coords(fb.to_coords(x)), x, "float64")
    # coordinates are the rotation applied to x - mean; the norm is kept (orthogonal)
    mean = 0 if fb.mean is None else fb.mean[:, None, :]
    assert_close(fb.to_coords(x).norm(dim=-1), (x - mean).norm(dim=-1), "float64")


def test_fitting_is_deterministic_and_in_float64():
    k, q = _kq(0)
    for name in NAMES:
        a, b = basis_from_name(name).fit(k, q), basis_from_name(name).fit(k.float(), q.float())
        assert a.name == name
        assert torch.equal(a.rotation, basis_from_name(name).fit(k, q).rotation)
        assert b.rotation.dtype == torch.float64
        assert_close(b.rotation, a.rotation, "float32")


def test_half_precision_input_keeps_its_dtype():
    k, q = _kq(1)
    fb = PCABasis().fit(k)
    out = fb.project(k.half(), 3)
    assert out.dtype == torch.float16 and out.shape == k.shape
    assert torch.equal(out, fb.project(k.half().float(), 3).half())  # computed in float32


# ---------------------------------------------------------------- PCA
@pytest.mark.parametrize("centered", [False, True])
def test_pca_error_is_sum_of_discarded_eigenvalues(centered):
    k, _ = _kq(2, tokens=200, d=16)
    fb = PCABasis(centered=centered).fit(k)
    for h in range(k.shape[1]):
        rows = k[:, h].reshape(-1, 16).numpy()
        if centered:
            rows = rows - rows.mean(0)
        eig = np.linalg.eigvalsh(rows.T @ rows / len(rows))[::-1].copy()  # second implementation
        sv = torch.linalg.svd(torch.from_numpy(rows), full_matrices=False).S ** 2 / len(rows)  # third
        assert_close(fb.spectrum[h], torch.from_numpy(eig), "float64")
        assert_close(fb.spectrum[h], sv, "float64")
        for r in range(1, 17):
            err = (k[:, h] - fb.project(k, r)[:, h]).pow(2).sum(-1).mean()
            assert_close(err, torch.tensor(eig[r:].sum()), "float64")


def test_pca_subspace_matches_numpy_eigenvectors():
    k, _ = _kq(3, kv=1, tokens=300, d=8)
    fb = PCABasis().fit(k)
    rows = k[:, 0].reshape(-1, 8).numpy()
    w, v = np.linalg.eigh(rows.T @ rows / len(rows))
    v = torch.from_numpy(v[:, ::-1].copy())
    for r in range(1, 8):
        u = fb.rotation[0, :, :r]
        assert_close(u @ u.T, v[:, :r] @ v[:, :r].T, "float64")
    # sign fix: each column's largest-magnitude entry is positive
    pivots = fb.rotation[0].gather(0, fb.rotation[0].abs().argmax(0, keepdim=True))
    assert bool((pivots > 0).all())


def test_centered_pca_stores_the_mean():
    k, _ = _kq(4)
    fb = PCABasis(centered=True).fit(k)
    assert_close(fb.mean, k.mean(dim=(0, 2)), "float64")
    assert PCABasis().fit(k).mean is None
    # rank-r reconstruction of the mean itself is exact (affine projection)
    mu = fb.mean[None, :, None, :].expand(1, -1, 1, -1)
    assert_close(fb.project(mu, 1), mu, "float64")


# ---------------------------------------------------------------- identity, hadamard, random
def test_identity_orders_channels_by_energy():
    x = torch.tensor([1.0, -3.0, 2.0, 2.0])  # energies 1, 9, 4, 4: order 1, 2, 3 (tie by index), 0
    k = x.expand(2, 1, 3, 4)
    fb = IdentityBasis().fit(k)
    assert fb.rotation[0].argmax(0).tolist() == [1, 2, 3, 0]
    assert_close(fb.spectrum[0], torch.tensor([9.0, 4.0, 4.0, 1.0]), "exact64")
    assert_close(fb.project(k, 1), k * torch.tensor([0.0, 1.0, 0.0, 0.0]), "exact64")
    assert_close(fb.project(k, 3), k * torch.tensor([0.0, 1.0, 1.0, 1.0]), "exact64")


def test_hadamard_against_hand_written_matrices():
    h4 = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2
    assert_close(hadamard_matrix(4), h4, "exact64")
    assert_close(hadamard_matrix(1), torch.ones(1, 1), "exact64")
    for d in (2, 8, 64):
        ref = torch.from_numpy(scipy.linalg.hadamard(d).astype(np.float64)) / math.sqrt(d)
        assert_close(hadamard_matrix(d), ref, "exact64")
    fb = HadamardBasis().fit(torch.zeros(1, 3, 2, 4))
    assert_close(fb.rotation, h4.expand(3, 4, 4), "exact64")


@pytest.mark.parametrize("d", [3, 6, 12])
def test_hadamard_needs_a_power_of_two(d):
    with pytest.raises(KVTheoryError, match=f"d: got {d}; expected a power of two"):
        HadamardBasis().fit(torch.zeros(1, 1, 2, d))


def test_random_basis_is_the_sign_fixed_qr_of_a_seeded_gaussian():
    for seed in (0, 7):
        u = RandomBasis(seed).fit(torch.zeros(1, 2, 1, 6)).rotation
        g = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        # G = U R with R upper triangular, positive diagonal  <=>  Uᵀ G is such an R
        r = u.transpose(-1, -2) @ g
        assert_close(torch.tril(r, -1), torch.zeros_like(r), "float64")
        assert bool((torch.diagonal(r, dim1=-2, dim2=-1) > 0).all())
    a = RandomBasis(1).fit(torch.zeros(1, 1, 1, 6)).rotation
    assert not torch.allclose(a, RandomBasis(2).fit(torch.zeros(1, 1, 1, 6)).rotation)
    assert torch.equal(a, RandomBasis(1).fit(torch.randn(3, 1, 9, 6)).rotation)  # data-free


# ---------------------------------------------------------------- query-aware
def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def test_qaware_with_isotropic_queries_is_uncentered_pca():
    d = 8
    k, _ = _kq(5, kv=1, tokens=100, d=d)
    # 2 batch rows × 2 query heads, each block a scaled orthogonal matrix: pooled Σ_q = 4 I exactly
    q = torch.stack([_orthogonal(d, s) for s in range(4)]).reshape(2, 2, d, d) * 2 * math.sqrt(d)
    qa, pca = QAwareBasis().fit(k, q), PCABasis().fit(k)
    assert_close(qa.spectrum, 4 * pca.spectrum, "float64")
    for r in range(1, d):
        assert_close(qa.project(k, r), pca.project(k, r), "float64")


def test_qaware_minimises_logit_error_when_moments_commute():
    # Σ_k = diag(sk²), Σ_q = diag(sq²) exactly (orthonormal columns, scaled), so they commute;
    # the logit error of rank r is the sum of the discarded eigenvalues of M = diag(sq² sk²).
    d, n = 6, 12
    sk = torch.tensor([3.0, 2.5, 2.0, 1.2, 0.5, 0.2])  # products sq² sk² all distinct
    sq = torch.tensor([0.1, 0.3, 1.0, 2.0, 3.0, 4.0])
    k = (_orthogonal(n, 3)[:, :d] * math.sqrt(n) * sk)[None, None]
    q = (_orthogonal(n, 4)[:, :d] * math.sqrt(n) * sq)[None, None]
    lam = np.sort((sq**2 * sk**2).numpy())[::-1]
    qa, pca = QAwareBasis().fit(k, q), PCABasis().fit(k)
    assert_close(qa.spectrum[0], torch.from_numpy(lam.copy()), "float64")
    for r in range(1, d):
        def logit_err(fb):
            return ((q[0, 0] @ (k[0, 0] - fb.project(k, r)[0, 0]).T) ** 2).mean()
        assert_close(logit_err(qa), torch.tensor(lam[r:].sum()), "float64")
        assert float(logit_err(qa)) <= float(logit_err(pca)) * (1 + 1e-12)
    assert float(((q[0, 0] @ (k[0, 0] - pca.project(k, 3)[0, 0]).T) ** 2).mean()) > 2 * lam[3:].sum()


def test_qaware_pools_the_queries_of_each_gqa_group():
    # 4 query heads, 2 kv heads: heads 0, 1 -> kv 0 see only channel 0; heads 2, 3 -> kv 1 channel 1
    k, _ = _kq(6, kv=2, d=4)
    q = torch.zeros(2, 4, 5, 4)
    q[:, 0, :, 0], q[:, 1, :, 0] = 3.0, -1.0
    q[:, 2, :, 1], q[:, 3, :, 1] = 2.0, 0.5
    fb = QAwareBasis().fit(k, q)
    assert_close(fb.rotation[0, :, 0], torch.tensor([1.0, 0, 0, 0]), "float64")
    assert_close(fb.rotation[1, :, 0], torch.tensor([0.0, 1, 0, 0]), "float64")
    # the one non-zero eigenvalue: E[q0²] E[k0²] with the pooled E[q0²] = (9 + 1)/2
    assert_close(fb.spectrum[0, 0], 5 * k[:, 0, :, 0].pow(2).mean(), "float64")


# ---------------------------------------------------------------- names and errors
def test_basis_names():
    assert basis_from_name("random") == RandomBasis(0)
    assert basis_from_name("random12") == RandomBasis(12)
    assert basis_from_name("pcac") == PCABasis(centered=True)
    assert [basis_from_name(n).name for n in NAMES] == NAMES
    with pytest.raises(KVTheoryError, match="basis: got 'svd'; expected one of identity, pca"):
        basis_from_name("svd")


def test_fit_errors():
    k, q = _kq(7)
    with pytest.raises(KVTheoryError, match=r"q: got None; expected a query tensor .* fit\(k, q\)"):
        QAwareBasis().fit(k)
    with pytest.raises(KVTheoryError, match="kv_heads: got 2 KV heads for 3 query heads"):
        QAwareBasis().fit(k, q[:, :3])
    bad = k.clone()
    bad[0, 0, 0, 0] = math.inf
    with pytest.raises(KVTheoryError, match="k: got 0 NaN and 1 Inf values"):
        PCABasis().fit(bad)
    raw = inspect.unwrap(PCABasis.fit)  # our checks, without the test-time type checker
    with pytest.raises(KVTheoryError, match=r"k: got a tensor with 3 dimensions, shape \(2, 40, 8\); "
                       r"expected 4 dimensions \(batch kv_head token d\)"):
        raw(PCABasis(), k[0])
    with pytest.raises(KVTheoryError, match="q: got head dimension d=4; expected d=8"):
        raw(QAwareBasis(), k, q[..., :4])
    with pytest.raises(KVTheoryError, match="q: got batch size 1; expected 2, the batch size of k"):
        raw(QAwareBasis(), k, q[:1])


def test_fitted_basis_errors():
    k, _ = _kq(8)
    fb = PCABasis().fit(k)
    with pytest.raises(KVTheoryError, match="rank: got 0; expected an integer in 1..8"):
        fb.project(k, 0)
    with pytest.raises(KVTheoryError, match="rank: got 9; expected an integer in 1..8"):
        fb.project(k, 9)
    with pytest.raises(KVTheoryError, match="x: got 1 kv heads; expected 2"):
        fb.project(k[:, :1], 2)
    with pytest.raises(KVTheoryError, match="x: got head dimension d=4; expected d=8"):
        fb.project(k[..., :4], 2)
    nan = k.clone()
    nan[1, 1, 1, 1] = math.nan
    with pytest.raises(KVTheoryError, match="x: got 1 NaN"):
        fb.project(nan, 2)
    with pytest.raises(KVTheoryError, match=r"x: got a tensor with 3 dimensions"):
        inspect.unwrap(FittedBasis.project)(fb, k[0], 2)
    with pytest.raises(KVTheoryError, match=r"rotation: got tensor of shape \(2, 8, 4\)"):
        inspect.unwrap(FittedBasis.__init__)(object.__new__(FittedBasis), fb.rotation[..., :4], None, "x")
    with pytest.raises(KVTheoryError, match=r"mean: got tensor of shape \(2, 4\).*\(2, 8\)"):
        inspect.unwrap(FittedBasis.__init__)(object.__new__(FittedBasis), fb.rotation, k[0, :, 0, :4], "x")
