"""The fused metrics kernel's logic on the CPU: Triton's interpreter runs
``kvtheory/_triton_kernel.py`` (one-pass top-k with its exact second pass, the series and
exponential forms of the KL sum, the log-sum-exp fallback, masks, windows, values, topk 1 and
10) against the dense float64 reference, in a subprocess (``tests/_kernel_interp.py``).

Speed and bf16 are only checked on a GPU (``benchmarks/gpu_flips_check.py``); this test runs
wherever Triton is installed (the ``kernel`` extra, which ``make venv`` installs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def interp() -> dict:
    out = subprocess.run([sys.executable, str(HERE / "_kernel_interp.py")], capture_output=True,
                         text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_case_ran(interp):
    from _kernel_interp import CASES

    assert set(interp) == set(CASES)
    assert all(r["queries"] > 300 for r in interp.values())


def test_metrics_within_float32_rounding_of_the_dense_reference(interp):
    for label, r in interp.items():
        for name, excess in r["errors"].items():
            assert excess <= 0.0, f"{label}: {name} exceeds its tolerance by {excess:.3g}"
    assert "output_rel_err" in interp["non-causal, values"]["errors"]


#: flips a case may differ in at near-ties (the engine's contract allows any there): the
#: interpreter's float32 dots go through NumPy's BLAS, whose summation order depends on the
#: CPU's vector kernels, so a near-tie can go either way from one CPU to another (0 of them on
#: the AMD EPYC machines of sessions 1-11, 1 near-tie flip on the Intel Xeon of session 12)
NEAR_TIE_FLIPS = 2


def test_flips_and_topk_overlap_identical(interp):
    # flips differ only at near-ties, and only a few of them; top-k overlaps are identical
    for label, r in interp.items():
        assert r["flips_differ_not_near_tie"] == 0, label
        if "repeated" not in label:
            assert r["flips_differ"] <= min(NEAR_TIE_FLIPS, r["near_ties"]), label
        assert r["overlap_differ"] == 0, label
    # keys repeated in two blocks tie exactly in float32 and the kernel takes the first
    # index; the float64 reference's matmul rounds the two copies apart, so it may take
    # either: those flips differ, all at near-ties (checked above)
    assert interp["keys repeated half a sequence later (alike kept values of two blocks), "
                  "topk 2, T 256"]["flips_differ"] <= 64


def test_key_tiles_come_by_descriptor_unless_switched_off(interp):
    from kvtheory._triton_metrics import TensorDescriptor

    want = "tma" if TensorDescriptor is not None else "pointers"
    for label, r in interp.items():
        assert r["loads"] == ("pointers" if label.startswith("pointer loads") else want), label


def test_second_pass_serves_the_flagged_queries_only_when_needed(interp):
    # topk 1 is always a block maximum: never flagged; the one-pass loop never flags either;
    # keys alike in runs put several of a query's top 5 in one block: all flagged, and the
    # results above are still exact
    assert interp["shared mask, topk 1"]["second_pass"][0] == 0
    assert interp["one-pass exact top-k (TOPK_MODE 1)"]["second_pass"][0] == 0
    sent, total = interp["local keys (second pass)"]["second_pass"]
    assert 0 < sent <= total
    # a tied top of s: its s^ must be taken at the first index, which the second pass does
    sent, total = interp["keys in equal pairs (tied top of s), topk 4"]["second_pass"]
    assert sent == total
    # the candidates' variant: most rows settled by their candidates, the rest by the rounds
    sent = interp["candidates' pass before the rounds (CAND 16)"]["second_pass"][0]
    assert 0 < interp["candidates' pass before the rounds (CAND 16)"]["rounds"] < sent
    # by default a flagged row is settled by the rescan of its kept blocks, or else by the
    # rounds over all blocks: one of the two, never both or neither
    for label, r in interp.items():
        if "CAND" not in label:
            assert r["rescan"] + r["rounds"] == r["second_pass"][0], label
    sent = interp["rescan, topk 2, T 256, s^ far from s"]["second_pass"][0]
    assert interp["rescan, topk 2, T 256, s^ far from s"]["rescan"] == sent > 0
    # no room in buckets, candidate slots or the list: those rows go to the rounds
    r = interp["rescan with no room (buckets, slots, list): all to the rounds"]
    assert r["rounds"] > 0.9 * r["second_pass"][0] > 0
    r = interp["rounds for every flagged query (RESCAN off)"]
    assert r["rescan"] == 0 and r["rounds"] == r["second_pass"][0] > 0
    # alike kept values of two blocks are k distinct keys: the rescan settles them; a tie
    # replaced at once by a larger block maximum keeps one block twice and loses a key: those
    # rows go to the rounds
    r = interp["keys repeated half a sequence later (alike kept values of two blocks), topk 2, "
               "T 256"]
    assert r["rescan"] == r["second_pass"][0] > 0
    r = interp["a tie then a larger block maximum (one block kept twice: a key lost), topk 3"]
    assert r["rounds"] == r["second_pass"][0] == r["second_pass"][1] > 0    # every row
    # topk 1: flagged for the tie alone; the second pass starts just below the top of s
    sent, total = interp["keys in equal pairs, topk 1 (thresholds at the top)"]["second_pass"]
    assert sent == total


def test_attention_metrics_runs_the_kernel_again_only_when_a_series_sum_overflows(interp):
    # deltas of ~40 logits overflow the float32 sum of e^(delta - c): the kernel's KL is inf
    # there, attention_metrics sees a KL mean that is not finite and runs the kernel again
    # with the log-sum-exps
    assert interp["huge delta through attention_metrics (second run)"]["kernel_calls"] == 2
    assert interp["through attention_metrics, window + shared mask"]["kernel_calls"] == 1


def test_aggregation_kernel_equals_the_torch_table():
    # kvtheory/_triton_aggregate.py (one launch after the metrics kernel on CUDA) against
    # flips._table (the torch operations): counts identical, float64 sums to rounding
    out = subprocess.run([sys.executable, str(HERE / "_kernel_interp.py"), "--aggregate"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    from _kernel_interp import AGGREGATE
    from tol import tol

    assert set(res) == set(AGGREGATE)
    rtol, _ = tol("exact64")   # float64 sums in another order
    for label, r in res.items():
        assert r["shape"], label
        assert r["counts_differ"] == 0, label
        assert r["sums_rel"] <= rtol, (label, r["sums_rel"])
        assert r["counted"] > 0, label
    assert res["three parts of the (batch, query) pairs, batch 2"]["parts"] == 3
