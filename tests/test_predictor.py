"""Damage predictor: Spearman ρ against hand-worked cases, scipy and a manual rank formula,
the bootstrap interval's properties, the run from supplied flip/budget results (no model
evaluation) and from a capture, failure reasons, plots from a JSON round-tripped result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _tiny import save_tiny
from scipy import stats
from tol import assert_close

from kvtheory import engine
from kvtheory.analysis import budget, predictor
from kvtheory.errors import KVTheoryError


@pytest.fixture(autouse=True)
def _fresh_memo():
    engine.clear_memo()
    yield
    engine.clear_memo()


def manual_rho(x, y):
    """1 - 6 Σd² / (n(n²-1)) on ranks (valid without ties)."""
    rx, ry = predictor.rankdata(x), predictor.rankdata(y)
    n = len(x)
    return 1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))


def test_rankdata_matches_scipy_with_ties():
    g = np.random.default_rng(0)
    for _ in range(20):
        x = g.integers(0, 5, 12).astype(float)
        np.testing.assert_array_equal(predictor.rankdata(x), stats.rankdata(x))


def test_spearman_hand_worked():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    up = predictor.spearman_ci(x, [0.1, 0.5, 2.0, 3.0, 100.0], n_boot=300)
    down = predictor.spearman_ci(x, [5.0, 4.0, 3.0, 2.0, 1.0], n_boot=300)
    for r, want in ((up, 1.0), (down, -1.0)):
        for key in ("rho", "ci_low", "ci_high"):
            assert_close(r[key], want, "exact64")
    # one swapped pair: d = (-1, 1, -1, 1, 0), Σd² = 4, ρ = 1 - 24/120 = 0.8
    mid = predictor.spearman_ci(x, [2.0, 1.0, 4.0, 3.0, 5.0], n_boot=300)
    assert_close(mid["rho"], 0.8, "exact64")
    assert_close(manual_rho(x, [2.0, 1.0, 4.0, 3.0, 5.0]), 0.8, "exact64")


def test_spearman_matches_scipy_and_manual_random():
    g = np.random.default_rng(1)
    x, y = g.normal(size=15), g.normal(size=15)
    r = predictor.spearman_ci(x, y, n_boot=500, seed=3)
    assert_close(r["rho"], stats.spearmanr(x, y)[0], "exact64")
    assert_close(r["rho"], manual_rho(x, y), "float64")
    assert -1 <= r["ci_low"] <= r["rho"] <= r["ci_high"] <= 1 or r["ci_low"] <= r["ci_high"]
    assert r == predictor.spearman_ci(x, y, n_boot=500, seed=3)         # seeded
    assert r["n"] == 15 and 0 < r["n_boot_used"] <= 500


def test_bootstrap_is_percentile_of_resampled_rho():
    x = np.array([1.0, 3.0, 2.0, 5.0, 4.0, 7.0, 6.0])
    y = np.array([2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0])
    r = predictor.spearman_ci(x, y, n_boot=400, seed=5)
    rng = np.random.default_rng(5)
    vals = []
    for _ in range(400):
        i = rng.integers(0, 7, 7)
        if np.ptp(x[i]) and np.ptp(y[i]):
            vals.append(stats.spearmanr(x[i], y[i])[0])
    assert_close(r["ci_low"], np.quantile(vals, 0.025), "exact64")
    assert_close(r["ci_high"], np.quantile(vals, 0.975), "exact64")


def test_spearman_rejects_short():
    with pytest.raises(KVTheoryError):
        predictor.spearman_ci([1, 2], [1, 2])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer=True,
                     max_position_embeddings=128)


METHODS = ("int8", "int4", "int2", "rank2-pca", "rank4-pca", "rank4x4-pca")


def test_run_from_supplied_results_evaluates_nothing(tiny_folder, data_dir, tmp_path):
    fisher = {"int8": 1e-5, "int4": 1e-3, "int2": 2e-2, "rank2-pca": 0.5, "rank4-pca": 0.1,
              "rank4x4-pca": 0.2}
    dppl = {"int8": 0.01, "int4": 0.2, "int2": 3.0, "rank2-pca": 40.0, "rank4-pca": 5.0,
            "rank4x4-pca": 4.0}  # rank4-pca and the hybrid swap: ρ = 1 - 6·2/(6·35)
    flip = {"methods": {s: {"mean": {"fisher": f, "kl": f / 2, "flip_rate": f, "output_rel_err": f}}
                        for s, f in fisher.items()}}
    pts = [{"spec": s, "target": t, "ppl": 10.0 + v * (1 if t != "v" else 0.1)}
           for s, v in dppl.items() for t in ("k", "v", "kv")]
    bud = {"seq_len": 32, "fp": {"value": 10.0}, "points": pts}
    cfg = predictor.PredictorConfig(model=str(tiny_folder), seq_len=32, methods=METHODS, n_boot=200)
    res = predictor.run(cfg, flip_result=flip, budget_result=bud, data_dir=data_dir, root=tmp_path,
                        progress=False)
    assert sum(engine.CALLS.values()) == 0
    assert set(res["fisher_source"].values()) == {"flip_study"}
    assert_close(res["spearman"]["rho"], 1 - 6 * 2 / (6 * 35), "float64")
    assert [f["spec"] for f in res["failures"]] == ["rank4-pca", "rank4x4-pca"]
    assert {f["residual"] for f in res["failures"]} == {1.0, -1.0}
    assert "Fisher/KL = 2" in res["failures"][0]["reason"]
    again = json.loads(json.dumps(res))
    s = predictor.summary(again)
    assert s["rho"] == res["spearman"]["rho"] and s["failures"] == "rank4-pca, rank4x4-pca"
    paths = predictor.plot(again, tmp_path / "fig")
    assert [p.name for p in paths] == ["predictor_scatter.png", "predictor_scatter.pdf"]


def test_run_from_capture(tiny_folder, data_dir, tmp_path):
    """Fisher from the capture equals a direct attention_metrics call; ΔPPL equals ppl_point."""
    from kvtheory.analysis.common import get_model, load_or_capture
    from kvtheory.compress import make_compressor
    from kvtheory.flips import attention_metrics

    cfg = predictor.PredictorConfig(model=str(tiny_folder), seq_len=32, methods=METHODS, n_boot=100)
    res = predictor.run(cfg, data_dir=data_dir, root=tmp_path, progress=False)
    assert set(res["fisher_source"].values()) == {"capture"}
    lm = get_model(str(tiny_folder))
    cap = load_or_capture(str(tiny_folder), 32, data_dir=data_dir, root=tmp_path)
    ev, cal = engine.eval_windows(str(tiny_folder), 32, cfg.n_windows, cfg.calib_windows, data_dir)
    row = {r["spec"]: r for r in res["rows"]}
    comp = make_compressor("int4", "k")
    want = np.mean([float(attention_metrics(cap[layer]["q"], cap[layer]["k"], comp(cap[layer]["k"]))
                          .fisher.mean()) for layer in cap.meta.layers])
    assert_close(row["int4"]["fisher"], want, "float32")
    direct = engine.ppl_point(lm, str(tiny_folder), "rank2-pca", "k", windows=ev, calibration=cal,
                              n_boot=1000)
    assert_close(row["rank2-pca"]["dppl"], direct["value"] - res["fp_ppl"], "exact64")
    r = res["spearman"]
    assert_close(r["rho"], stats.spearmanr([x["fisher"] for x in res["rows"]],
                                           [x["dppl"] for x in res["rows"]])[0], "exact64")


def test_config_validation():
    with pytest.raises(KVTheoryError):
        predictor.PredictorConfig(target="v")
    with pytest.raises(KVTheoryError):
        predictor.PredictorConfig(methods=("fp", "int4", "int8"))
    with pytest.raises(KVTheoryError):
        predictor.PredictorConfig(methods=("int4", "int8"))
