"""The second pass's program layout (:func:`kvtheory._triton_metrics.fix_layout`, built on the
device without a host sync): every flagged query exactly once, in a program of its own
(batch, head), within the grid bound; a property test against the flags themselves."""

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
    n = int(flag.sum())
    if n == 0:
        return
    rows, prog_bh = fix_layout(flag, n, n_bh, Q, bm)
    assert rows.shape == (n // bm + min(n_bh, n), bm) and prog_bh.shape == (rows.shape[0],)
    got = sorted(int(prog_bh[i]) * Q + int(r) for i in range(rows.shape[0]) for r in rows[i]
                 if r >= 0)
    assert got == flag.nonzero().squeeze(1).tolist()
    # programs fill their rows from the front, and only the last ones are empty
    used = (rows >= 0).sum(1)
    assert all(bool((rows[i, :c] >= 0).all()) for i, c in enumerate(used.tolist()))
    nonempty = (used > 0).tolist()
    assert nonempty == sorted(nonempty, reverse=True)
    # a head's programs: ceil(count / bm) of them
    counts = torch.bincount(flag.nonzero().squeeze(1) // Q, minlength=n_bh)
    per_head = torch.bincount(prog_bh[used > 0].long(), minlength=n_bh)
    assert per_head.tolist() == ((counts + bm - 1) // bm).tolist()
