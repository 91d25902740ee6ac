"""The second pass's program layout (:func:`kvtheory._triton_metrics.fix_layout`, built on the
device without a host sync): every flagged query exactly once, in a program of its own
(batch, head), in increasing order, programs filled from the front; a property test against
the flags themselves."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtheory._triton_metrics import fix_layout


@settings(max_examples=200, deadline=None)
@given(n_bh=st.integers(1, 9), Q=st.integers(1, 200), bm=st.sampled_from([1, 2, 16, 64]),
       p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_every_flagged_query_once_in_a_program_of_its_head(n_bh, Q, bm, p, seed):
    g = torch.Generator().manual_seed(seed)
    flag = (torch.rand(n_bh * Q, generator=g) < p).to(torch.int8)
    rows = fix_layout(flag, n_bh, Q, bm)
    n_prog = -(-Q // bm)
    assert rows.shape == (n_prog, n_bh, bm) and rows.dtype == torch.int32
    for bh in range(n_bh):
        # program p = j n_bh + bh (the kernel's order) holds rows[j, bh]: head bh's flagged
        # queries in order, front-filled, then -1
        listed = rows[:, bh].flatten().tolist()
        want = flag.view(n_bh, Q)[bh].nonzero().squeeze(1).tolist()
        assert listed == want + [-1] * (n_prog * bm - len(want))
    flat = rows.flatten(0, 1)
    used = (flat >= 0).sum(1)
    assert all(bool((flat[i, :c] >= 0).all()) for i, c in enumerate(used.tolist()))
    # a head's busy programs: ceil(count / bm) of them, the first ones of the head
    counts = flag.view(n_bh, Q).sum(1)
    assert (rows >= 0).any(2).sum(0).tolist() == ((counts + bm - 1) // bm).tolist()
