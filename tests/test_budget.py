"""Budget curves: every point equals a direct perplexity (and a plain log-softmax loop), the
memo returns identical values without re-evaluating, storage by hand, matched gaps by hand,
plots from a JSON round-tripped result."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny import save_tiny, tiny_model
from tol import assert_close

from kvtheory import engine
from kvtheory.analysis import budget
from kvtheory.errors import KVTheoryError
from kvtheory.evaluate import perplexity
from kvtheory.patch import _FIT_CACHE, compressed_kv

L = 24


@pytest.fixture(autouse=True)
def _fresh_memo():
    engine.clear_memo()
    yield
    engine.clear_memo()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", max_position_embeddings=128)


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (n, L), generator=g)


def loop_ppl(model, windows, keys=None, values=None, calibration=None, rope="post"):
    """Second route: one window at a time, NLL from log_softmax, then exp(mean)."""
    import contextlib

    ctx = (compressed_kv(model, keys=keys, values=values, calibration=calibration, rope=rope)
           if keys is not None else contextlib.nullcontext())
    total, count = 0.0, 0
    with torch.no_grad(), ctx:
        for w in windows:
            lp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            total -= float(lp.gather(-1, w[1:, None]).sum())
            count += len(w) - 1
    return math.exp(total / count)


@pytest.mark.parametrize("spec,target", [("fp", "kv"), ("int4", "kv"), ("int4-kivi", "k"),
                                         ("rank2-pca", "v"), ("rank4x4-pca", "kv"),
                                         ("rank2-qaware", "k")])
def test_point_equals_direct_perplexity_and_loop(llama, spec, target):
    ev, cal = ids(2, 0), ids(1, 1)
    got = engine.ppl_point(llama, "tiny", spec, target, windows=ev, calibration=cal, n_boot=50)
    ks = spec if target in ("k", "kv") else "fp"
    vs = spec if target in ("v", "kv") else "fp"
    if spec == "fp":
        direct = perplexity(llama, ev, n_boot=50)
        loop = loop_ppl(llama, ev)
    else:  # fitted by patch.fit_compressors with the spec itself, not engine.fitted_plan
        direct = perplexity(llama, ev, keys=ks, values=vs, calibration=cal, n_boot=50)
        loop = loop_ppl(llama, ev, ks, vs, cal)
    assert_close(got["value"], direct.value, "float32")
    assert_close(got["value"], loop, "float32")
    assert (got["ci_low"], got["ci_high"]) == (direct.ci_low, direct.ci_high)


def test_pre_rope_point_equals_direct(llama):
    ev, cal = ids(1, 2), ids(1, 3)
    got = engine.ppl_point(llama, "tiny", "rank2-pca", "k", rope="pre", windows=ev,
                           calibration=cal, n_boot=20)
    loop = loop_ppl(llama, ev, "rank2-pca", "fp", cal, rope="pre")
    assert_close(got["value"], loop, "float32")
    post = engine.ppl_point(llama, "tiny", "rank2-pca", "k", rope="post", windows=ev,
                            calibration=cal, n_boot=20)
    assert got["value"] != post["value"]


def test_memo_identical_and_counted(llama, tmp_path):
    ev, cal = ids(1, 4), ids(1, 5)
    kw = dict(windows=ev, calibration=cal, n_boot=20, root=tmp_path)
    a = engine.ppl_point(llama, "tiny", "rank2-pca", "kv", **kw)
    b = engine.ppl_point(llama, "tiny", "rank2-pca", "kv", **kw)
    assert a == b and sum(engine.CALLS.values()) == 1
    engine.ppl_point(llama, "tiny", "rank2-pca", "k", **kw)        # another target: evaluated
    engine.ppl_point(llama, "tiny", "rank4-pca", "kv", **kw)       # same basis, reused fit
    assert sum(engine.CALLS.values()) == 3 and len(_FIT_CACHE[llama]) == 1  # one fit of the basis
    # the rope side does not matter when keys stay fp; int4 needs no calibration
    engine.ppl_point(llama, "tiny", "rank2-pca", "v", rope="pre", **kw)
    engine.ppl_point(llama, "tiny", "rank2-pca", "v", rope="post", **kw)
    engine.ppl_point(llama, "tiny", "int4", "kv", **kw)
    engine.ppl_point(llama, "tiny", "int4", "kv", **{**kw, "calibration": ids(1, 9)})
    assert sum(engine.CALLS.values()) == 5
    engine.clear_memo()                                            # disk cache answers
    c = engine.ppl_point(llama, "tiny", "rank2-pca", "kv", **kw)
    assert c == a and sum(engine.CALLS.values()) == 0


def test_qaware_values_rejected(llama):
    with pytest.raises(KVTheoryError, match="qaware"):
        engine.ppl_point(llama, "tiny", "rank2-qaware", "kv", windows=ids(1, 0), calibration=ids(1, 1))


def test_storage_bits_by_hand():
    # KIVI keys: 4 + 32/128; values per token: 4 + 32/64; kv: the mean
    assert engine.storage_bits("int4-kivi", "k", 64, 512) == 4.25
    assert engine.storage_bits("int4-kivi", "v", 64, 512) == 4.5
    assert engine.storage_bits("int4-kivi", "kv", 64, 512) == 4.375
    # rank 16 of 64: 16·16/64 = 4, basis 16·64·16/(64·512) = 0.5
    assert engine.storage_bits("rank16-pca", "kv", 64, 512) == 4.5
    assert engine.storage_bits("fp", "k", 64, 512) == 16.0


def test_default_methods_by_hand():
    got = budget._default_methods(64, 512, (2, 3, 4, 8))
    quant = ["int2", "int2-kivi", "int3", "int3-kivi", "int4", "int4-kivi", "int8", "int8-kivi"]
    # matched ranks: 0.28125 r <= 2.5, 3.5, 4.5, 8.5 -> 8, 12, 16, 30
    ranks = [f"rank{r}-pca" for r in (8, 12, 16, 30, 32, 48)]
    # hybrids at 4.5 bits: 3r/32 + 0.5 -> r = 42 (4 bit); 5r/32 + 0.5 -> r = 25 (8 bit)
    hybrids = ["rank32x8-pca", "rank48x4-pca", "rank32x4-pca", "rank42x4-pca", "rank25x8-pca"]
    assert got == quant + ranks + hybrids


def test_matched_gaps_by_hand():
    pts = [dict(spec=s, family=f, target="kv", bits=b, ppl=p) for s, f, b, p in [
        ("int4", "quant", 4.5, 10.0), ("int4-kivi", "kivi", 4.375, 9.5), ("int8", "quant", 8.5, 9.0),
        ("rank16-pca", "rank", 4.5, 60.0), ("rank8-pca", "rank", 2.25, 200.0),
        ("rank32-pca", "rank", 9.0, 12.0), ("rank25x8-pca", "hybrid", 4.5, 20.0)]]
    g = budget.matched_gaps(pts, "kv", 4.5)
    assert g["quant"] == {"spec": "int4-kivi", "bits": 4.375, "ppl": 9.5}
    assert g["rank"]["spec"] == "rank16-pca" and g["gap_rank"] == 50.5
    assert g["hybrid"]["spec"] == "rank25x8-pca" and g["gap_hybrid"] == 10.5
    assert budget.matched_gaps(pts, "k", 4.5)["quant"] is None


def test_config_validation():
    with pytest.raises(KVTheoryError):
        budget.BudgetConfig(targets=("q",))
    with pytest.raises(KVTheoryError):
        budget.BudgetConfig(methods=("int4-nope",))
    with pytest.raises(KVTheoryError):
        budget.BudgetConfig(seq_len=2)
    assert budget.BudgetConfig.for_size("small").seq_len == 128


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer=True,
                     max_position_embeddings=128)


def test_run_plot_summary(tiny_folder, data_dir, tmp_path):
    cfg = budget.BudgetConfig(model=str(tiny_folder), seq_len=32, n_windows=2, bits=(4, 8),
                              methods=("int4", "int4-kivi", "int8", "rank2-pca", "rank4-pca",
                                       "rank4x4-pca"), n_boot=20)
    res = budget.run(cfg, data_dir=data_dir, root=tmp_path, progress=False)
    assert len(res["points"]) == 6 * 3 and res["evaluations"] == 1 + 6 * 3
    # every point is a direct perplexity on the first windows, calibration from the end
    ev, cal = engine.eval_windows(str(tiny_folder), 32, 2, 1, data_dir)
    from kvtheory.analysis.common import get_model

    model = get_model(str(tiny_folder)).model
    p = next(x for x in res["points"] if x["spec"] == "rank2-pca" and x["target"] == "kv")
    assert_close(p["ppl"], loop_ppl(model, ev, "rank2-pca", "rank2-pca", cal), "float32")
    assert_close(p["dppl"], p["ppl"] - res["fp"]["value"], "exact64")
    assert p["bits"] == engine.storage_bits("rank2-pca", "kv", 8, 32)
    m4 = next(m for m in res["matched"]["kv"] if m["quant_bits"] == 4)
    assert m4["budget"] == 4 + 32 / 8
    assert res["c8"]["int4"]["reduction"] == 1 - 8 / 16  # int4 at d = 8: 4 + 32/8 bits
    again = json.loads(json.dumps(res))
    s = budget.summary(again)
    assert s["fp_ppl"] == res["fp"]["value"] and s["int4_budget_target"] == "kv"
    paths = budget.plot(again, tmp_path / "fig")
    assert [p.name for p in paths] == ["ppl_vs_budget.png", "ppl_vs_budget.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.slow
@pytest.mark.xdist_group("models")
def test_real_model_quant_beats_rank(data_dir, tmp_path):
    cfg = budget.BudgetConfig(seq_len=64, methods=("int4", "rank16-pca"), targets=("kv",), n_boot=20)
    res = budget.run(cfg, data_dir=data_dir, root=tmp_path, progress=False)
    ppl = {p["spec"]: p["ppl"] for p in res["points"]}
    assert ppl["int4"] < ppl["rank16-pca"]
    assert res["fp"]["value"] < ppl["rank16-pca"]
