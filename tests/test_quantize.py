"""Uniform quantizers: hand-worked grids, a plain-loop reference, the Δ/2 error bound."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tol import TOL, assert_close

from kvtheory.errors import KVTheoryError
from kvtheory.quantize import quant_steps, quantize, quantize_with_steps

T = torch.tensor


# ---------------------------------------------------------------- hand-worked cases
@pytest.mark.parametrize(
    "x, bits, symmetric, expected, step",
    [
        # asym 1 bit: range [0, 1], Δ = 1, levels {0, 1}; 0.3 -> round(0.3) = 0
        ([0.0, 0.3, 1.0], 1, False, [0.0, 0.0, 1.0], 1.0),
        # asym 2 bits: Δ = 1/3, 0.3/Δ = 0.9 -> 1 -> 1/3
        ([0.0, 0.3, 1.0], 2, False, [0.0, 1 / 3, 1.0], 1 / 3),
        # asym 2 bits, shifted range [-1, 2]: Δ = 1, 0.4 - (-1) = 1.4 -> 1 -> 0
        ([-1.0, 0.4, 2.0], 2, False, [-1.0, 0.0, 2.0], 1.0),
        # sym 2 bits: L = 1, Δ = absmax = 1, levels {-1, 0, 1}; 0.3 -> 0
        ([0.0, 0.3, 1.0], 2, True, [0.0, 0.0, 1.0], 1.0),
        # sym 3 bits: L = 3, Δ = 1/3; 0.3*3 = 0.9 -> 1
        ([0.0, 0.3, 1.0], 3, True, [0.0, 1 / 3, 1.0], 1 / 3),
        # sym 3 bits, absmax 1 from the negative side: 0.4*3 = 1.2 -> 1, -0.7*3 = -2.1 -> -2
        ([-1.0, 0.4, -0.7], 3, True, [-1.0, 1 / 3, -2 / 3], 1 / 3),
    ],
)
def test_hand_worked_grids(x, bits, symmetric, expected, step):
    x_hat, steps = quantize_with_steps(T([x]), bits, symmetric=symmetric)
    assert_close(x_hat, T([expected]), "exact64")
    assert_close(steps, torch.full((1, 3), step), "exact64")


def test_groups_along_d_hand_worked():
    # one token, d = 6, groups of 3 at 1 bit: [0, 0.3, 1] -> Δ = 1 -> [0, 0, 1];
    # [10, 10.5, 13] -> Δ = 3, 0.5/3 -> 0 -> [10, 10, 13]
    x = T([[0.0, 0.3, 1.0, 10.0, 10.5, 13.0]])
    assert_close(quantize(x, 1, group=3), T([[0.0, 0.0, 1.0, 10.0, 10.0, 13.0]]), "exact64")
    assert_close(quant_steps(x, 1, group=3), T([[1.0, 1.0, 1.0, 3.0, 3.0, 3.0]]), "exact64")
    # whole d at 2 bits: Δ = 13/3; 0.3, 1 -> 0; 10/Δ = 2.31 and 10.5/Δ = 2.42 -> 2 -> 26/3
    assert_close(quantize(x, 2), T([[0.0, 0.0, 0.0, 26 / 3, 26 / 3, 13.0]]), "exact64")


def test_channel_axis_hand_worked_with_partial_group():
    # tokens along dim -2; groups of 3 tokens per channel; the fourth token is a group alone.
    # channel 0: [0, 0.3, 1] -> Δ = 1 -> [0, 0, 1]; channel 1: [5, 1, 2.9] -> Δ = 4,
    # (2.9 - 1)/4 = 0.475 -> 0 -> [5, 1, 1]; token 3 alone: Δ = 0, exact.
    x = T([[0.0, 5.0], [0.3, 1.0], [1.0, 2.9], [7.0, -2.0]])
    x_hat, steps = quantize_with_steps(x, 1, axis="channel", group=3)
    assert_close(x_hat, T([[0.0, 5.0], [0.0, 1.0], [1.0, 1.0], [7.0, -2.0]]), "exact64")
    assert_close(steps, T([[1.0, 4.0], [1.0, 4.0], [1.0, 4.0], [0.0, 0.0]]), "exact64")


def test_constant_groups_are_exact_without_nan():
    x = torch.full((2, 3, 5, 8), 2.5)
    x[0, 0] = 0.0
    for symmetric in (False, True):
        # asymmetric: zero range -> Δ = 0; symmetric: Δ = absmax / 7 (c is the top level), 0 for 0
        expected_steps = x / 7 if symmetric else torch.zeros_like(x)
        for axis in ("token", "channel"):
            x_hat, steps = quantize_with_steps(x, 4, axis=axis, group=4, symmetric=symmetric)
            assert torch.equal(x_hat, x)
            assert_close(steps, expected_steps, "exact64")


# ---------------------------------------------------------------- plain-loop reference
def _loop_reference(x: np.ndarray, bits: int, axis: str, group: int, symmetric: bool):
    """Element by element, group by group, in numpy: the definition written out."""
    out, steps = np.empty_like(x), np.empty_like(x)
    lead, (n_tok, d) = x.shape[:-2], x.shape[-2:]
    for idx in np.ndindex(*lead):
        xs = x[idx]
        if axis == "token":
            blocks = [(t, slice(j, j + group)) for t in range(n_tok) for j in range(0, d, group)]
        else:
            blocks = [(slice(s, s + group), c) for c in range(d) for s in range(0, n_tok, group)]
        for block in blocks:
            v = xs[block]
            if symmetric:
                top = 2 ** (bits - 1) - 1
                delta = np.abs(v).max() / top
                q = np.clip(np.round(v / delta), -top, top) * delta if delta > 0 else v
            else:
                lo, hi = v.min(), v.max()
                delta = (hi - lo) / (2**bits - 1)
                q = np.round((v - lo) / delta) * delta + lo if delta > 0 else v
            out[idx][block] = q
            steps[idx][block] = delta
    return out, steps


@pytest.mark.parametrize("axis, group", [("channel", 128), ("channel", 5), ("channel", 64),
                                         ("token", 4), ("token", 16)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_vectorised_matches_plain_loop(gen, axis, group, symmetric):
    # KIVI keys: per channel, groups of 128 tokens; 300 tokens leaves a partial last group
    x = torch.randn(2, 2, 300 if group == 128 else 37, 16, generator=gen) * 3
    x[..., 3] *= 20  # an outlier channel
    x_hat, steps = quantize_with_steps(x, 3, axis=axis, group=group, symmetric=symmetric)
    ref, ref_steps = _loop_reference(x.numpy(), 3, axis, group, symmetric)
    assert_close(x_hat, torch.from_numpy(ref), "exact64")
    assert_close(steps, torch.from_numpy(ref_steps), "exact64")


# ---------------------------------------------------------------- properties
@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(1, 16),
    tokens=st.integers(1, 9),
    d_log=st.integers(0, 4),
    axis=st.sampled_from(["token", "channel"]),
    group_log=st.integers(0, 4),
    symmetric=st.booleans(),
    scale=st.floats(1e-3, 1e3),
)
def test_error_at_most_half_a_step(seed, bits, tokens, d_log, axis, group_log, symmetric, scale):
    bits = max(bits, 2) if symmetric else bits
    d = 2**d_log
    group = 2 ** min(group_log, d_log) if axis == "token" else group_log + 1
    x = torch.randn(2, tokens, d, generator=torch.Generator().manual_seed(seed)) * scale
    x_hat, steps = quantize_with_steps(x, bits, axis=axis, group=group, symmetric=symmetric)
    rtol, atol = TOL["exact64"]
    assert bool(((x - x_hat).abs() <= steps / 2 + atol + rtol * x.abs()).all())
    # the reconstruction lies on the grid: (x_hat - origin) / Δ is an integer code in range
    safe = torch.where(steps > 0, steps, 1.0)
    if symmetric:  # origin 0, codes -L..L
        codes, lo, hi = x_hat / safe, -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    elif axis == "token" and group == d:  # origin: the token's minimum, codes 0..2^b-1
        codes, lo, hi = (x_hat - x.amin(-1, keepdim=True)) / safe, 0, 2**bits - 1
    else:
        return
    assert_close(codes, codes.round(), "float64")
    assert bool((codes.round() >= lo).all() and (codes.round() <= hi).all())


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), bits=st.integers(2, 8), symmetric=st.booleans())
def test_quantization_is_idempotent(seed, bits, symmetric):
    # the grid of Q(x) is the grid of x (min, max and absmax are reproduced), so Q(Q(x)) = Q(x)
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(seed))
    once = quantize(x, bits, group=4, symmetric=symmetric)
    assert_close(quantize(once, bits, group=4, symmetric=symmetric), once, "exact64")


def test_half_precision_is_computed_in_float32():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        out = quantize(xh, 4, group=4)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, quantize(xh.float(), 4, group=4).to(dtype))
        assert quant_steps(xh, 4).dtype == torch.float32


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(bits=0), "bits: got 0; expected an integer in 1..16"),
        (dict(bits=17), "bits: got 17; expected an integer in 1..16"),
        (dict(bits=1, symmetric=True), "bits: got 1; expected an integer in 2..16 for symmetric"),
        (dict(bits=4, group=3), "group: got 3; expected a divisor of the head dimension d=8"),
        (dict(bits=4, group=0, axis="channel"), "group: got 0; expected an integer >= 1"),
        (dict(bits=4, axis="row"), "axis: got 'row'; expected one of token, channel"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(KVTheoryError) as info:
        quantize(torch.zeros(2, 8), **kwargs)
    assert fragment in str(info.value)


def test_bad_tensors():
    raw = inspect.unwrap(quantize)  # our own checks, without the test-time type checker
    with pytest.raises(KVTheoryError, match=r"x: got a tensor with 1 dimensions, shape \(3,\); "
                       r"expected at least 2 dimensions"):
        raw(torch.zeros(3), 4)
    x = torch.zeros(2, 4)
    x[1, 2] = math.nan
    with pytest.raises(KVTheoryError, match="x: got 1 NaN and 0 Inf values"):
        quantize(x, 4)
    with pytest.raises(KVTheoryError, match="expected at least one token and one channel"):
        quantize(torch.zeros(0, 4), 4)
