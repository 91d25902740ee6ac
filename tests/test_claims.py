"""The claim rules on hand-made summaries: each verdict follows its stated rule, the per-model
verdicts combine as documented, and C3's rank correlation equals scipy's."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import spearmanr
from tol import assert_close

from kvtheory.claims import FAILS, HOLDS, PARTLY, UNTESTABLE, _c1, _c3, _c5, _spearman, combine


@given(st.lists(st.tuples(st.integers(1, 8), st.floats(-5, 5, allow_nan=False)), min_size=3,
                max_size=8))
def test_spearman_equals_scipy(pairs):
    x, y = [float(a) for a, _ in pairs], [b for _, b in pairs]
    mine = _spearman(x, y)
    ref = spearmanr(x, y).statistic
    if len(set(x)) < 2 or len(set(y)) < 2:
        assert math.isnan(mine)
    else:
        assert_close(mine, float(ref), "float64")


def test_combine_counts_models():
    assert combine([HOLDS, HOLDS, HOLDS]) == "holds (3 of 3 models)"
    assert combine([FAILS, FAILS]) == "does not hold (0 of 2 models)"
    assert combine([HOLDS, FAILS, HOLDS]) == "partly (2 of 3 models)"
    assert combine([]) == UNTESTABLE


def _budget(group, q, r, lo=None, hi=None):
    out = {"gqa_group": float(group), "int4_budget_log_ratio": math.log(r / q),
           "int4_budget_gap_rank": r - q}
    if lo is not None:
        out |= {"int4_budget_log_ratio_ci_low": math.log(lo), "int4_budget_log_ratio_ci_high": math.log(hi)}
    return {"budget": out}


def test_c3_holds_only_for_a_ratio_rising_with_the_group():
    rising = {"a": _budget(3, 10, 20, 1.5, 2.5), "b": _budget(4, 10, 40, 3, 5), "c": _budget(7, 10, 90, 8, 10)}
    text, verdict = _c3(rising)
    assert verdict == HOLDS and "Spearman ρ(GQA group, log PPL ratio) = 1" in text
    assert "× 2 [1.5, 2.5]" in text and "caveat" in text.lower()
    mixed = {"a": _budget(3, 10, 40), "b": _budget(4, 10, 20), "c": _budget(7, 10, 90)}
    text, verdict = _c3(mixed)
    assert verdict == PARTLY and "(no interval)" in text        # ρ = 0.5
    falling = {"a": _budget(3, 10, 90), "b": _budget(7, 10, 20)}
    assert _c3(falling)[1] == FAILS
    one_group = {"a": _budget(3, 10, 90), "b": _budget(3, 10, 20)}
    assert _c3(one_group)[1].startswith(UNTESTABLE)


def test_c1_needs_every_matched_gap_positive():
    b = {"int4_budget_best_quant_ppl": 10.0, "int4_budget_best_rank_ppl": 30.0,
         "matched.int2.gap_rank": 5.0, "matched.int4.gap_rank": 20.0, "matched.int8.gap_rank": None}
    assert _c1({"budget": b})[1] == HOLDS
    assert _c1({"budget": b | {"matched.int2.gap_rank": -1.0}})[1] == FAILS
    assert _c1({"budget": {}}) is None          # not run on this model: no verdict


@pytest.mark.parametrize("rank_gt1, int4_gt1, kivi_gt1, verdict", [
    (0.2, 0.03, None, HOLDS), (0.2, 0.05, None, FAILS), (0.2, 0.05, 0.01, HOLDS), (0.2, 0.05, 0.3, FAILS)])
def test_c5_is_five_times_the_better_int4_at_margin_above_one(rank_gt1, int4_gt1, kivi_gt1, verdict):
    f = {"matched_rank_int4": "rank16-pca", "rank16-pca.flip_rate": 0.4, "int4.flip_rate": 0.1,
         "rank16-pca.flip_rate_margin_gt1": rank_gt1, "int4.flip_rate_margin_gt1": int4_gt1}
    if kivi_gt1 is not None:
        f["int4-kivi.flip_rate_margin_gt1"] = kivi_gt1
    assert _c5({"flip_study": f})[1] == verdict


def test_e1_holds_only_if_quantization_wins_every_budget():
    from kvtheory.claims import _e1

    e = {"ppl.fp": 18.9, "verdict": "x", "quant_beats_evict_at": "int8, int4",
         "int8.best_quant": "int8-kivi/int8", "int8.ppl_quant": 18.9, "int8.best_evict": "expected",
         "int8.ppl_evict": 20.8, "int8.flip_ge1_quant": 0.0, "int8.flip_ge1_evict": 0.01,
         "int4.best_quant": "int4-kivi/int4", "int4.ppl_quant": 19.4, "int4.best_evict": "expected",
         "int4.ppl_evict": 23.5, "int4.flip_ge1_quant": 0.0003, "int4.flip_ge1_evict": 0.0062}
    text, verdict = _e1({"eviction": e})
    assert verdict == HOLDS and text.index("int8:") < text.index("int4:")
    e2 = e | {"int2.best_quant": "int2-kivi/int2", "int2.ppl_quant": 83.3, "int2.best_evict": "expected",
              "int2.ppl_evict": 25.4, "int2.flip_ge1_quant": 0.14, "int2.flip_ge1_evict": 0.009}
    assert _e1({"eviction": e2})[1] == FAILS
    assert _e1({}) is None
