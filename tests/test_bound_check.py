"""kvtheory.analysis.bound_check against a plain per-row loop, numpy statistics and hand counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _tiny import tiny_ids, tiny_model
from kvtheory import bounds as B
from kvtheory.analysis import bound_check as bc
from kvtheory.capture import capture
from kvtheory.errors import KVTheoryError
from tol import assert_close

BITS = (2, 4)


@pytest.fixture(scope="module")
def cap():
    """Float64 q/k/v of a tiny Llama (2 layers, 4 q heads over 2 kv heads, d = 8), 40 tokens."""
    return capture(tiny_model("llama"), tiny_ids(1, 40), dtype=torch.float64)


@pytest.fixture(scope="module")
def cfg():
    return bc.BoundCheckConfig(models=("tiny",), n_tokens=40, n_queries=10, n_pca_dirs=2,
                               n_random_dirs=2, bits=BITS, mc_samples=6)


@pytest.fixture(scope="module")
def res(cap, cfg):
    return bc.check_capture(cap, cfg, causal=True)


def _row_reference(q, k, u, pos, bits):
    """One attention row by hand (float64): returns Fisher/KL of projection, and per bit the
    expected, rounded-Fisher and rounded-KL damages; the grid range is over all keys."""
    d = q.shape[-1]
    kk = k[: pos + 1]
    s = kk @ q / math.sqrt(d)
    p = torch.softmax(s, 0)
    alpha = float(q @ u) / math.sqrt(d)
    c_all = k @ u
    c = c_all[: pos + 1]

    def fisher(delta):
        mean = (p * delta).sum()
        return 0.5 * float((p * (delta - mean) ** 2).sum())

    def kl(delta):
        p2 = torch.softmax(s + delta, 0)
        return float((p * (p.log() - p2.log())).sum())

    out = {"proj_fisher": fisher(-alpha * c), "proj_kl": kl(-alpha * c)}
    lo, hi = float(c_all.min()), float(c_all.max())
    for b in bits:
        step = (hi - lo) / (2**b - 1)
        c_hat = lo + step * torch.round((c - lo) / step)
        delta = alpha * (c_hat - c)
        out[b] = {"expected": 0.5 * alpha**2 * step**2 / 12 * float(1 - (p**2).sum()),
                  "fisher_round": fisher(delta), "kl_round": kl(delta)}
    return out


def test_columns_match_a_plain_loop(cap, cfg, res):
    g, pos = cap.meta.group, res["query_positions"]
    assert pos == bc.query_positions(40, 10) and len(pos) == 10
    cols = res["columns"]
    row = 0
    for layer in cap.meta.layers:
        q, k = cap[layer]["q"][0], cap[layer]["k"][0]
        for h in range(cap.meta.kv_heads):
            u = bc.directions(k[h], 2, 2, bc._mix(cfg.seed, 0, layer, h))
            for j in range(u.shape[0]):
                refs = [_row_reference(q[qh, i], k[h], u[j], i, BITS)
                        for qh in range(h * g, (h + 1) * g) for i in pos]
                assert (cols["layer"][row], cols["kv_head"][row]) == (layer, h)
                assert cols["dir_kind"][row] == ("pca" if j < 2 else "random")
                for key in ("proj_fisher", "proj_kl"):
                    assert_close(cols[key][row], np.mean([r[key] for r in refs]), "float64")
                for b in BITS:
                    qc = cols["quant"][str(b)]
                    for key in ("expected", "fisher_round", "kl_round"):
                        assert_close(qc[key][row], np.mean([r[b][key] for r in refs]), "float64")
                    # exact prediction = ratio of mean damages (E[D_quant]-weighted exact_ratio)
                    assert_close(qc["exact"][row], cols["proj_fisher"][row] / qc["expected"][row],
                                 "float64")
                row += 1
    assert row == len(cols["layer"]) == 2 * 2 * 4


def test_exact_is_weighted_bounds_exact_ratio(cap, cfg, res):
    """The exact column against bounds.exact_ratio and expected_quant_damage called directly."""
    layer, h, g = 1, 1, cap.meta.group
    pos = res["query_positions"]
    q, k = cap[layer]["q"][0, h * g:(h + 1) * g][:, pos], cap[layer]["k"][0, h]
    mask = torch.arange(40)[None, :] <= torch.tensor(pos)[:, None]
    u = bc.directions(k, 2, 2, bc._mix(cfg.seed, 0, layer, h))
    row = [i for i, (lay, hh) in enumerate(zip(res["columns"]["layer"], res["columns"]["kv_head"]))
           if (lay, hh) == (layer, h)]
    for j in range(4):
        r = B.exact_ratio(q, k, u[j], 4, mask)
        e = B.expected_quant_damage(q, k, u[j], 4, mask)
        want = float((r * e).sum() / e.sum())
        assert_close(res["columns"]["quant"]["4"]["exact"][row[j]], want, "float64")
        # Monte-Carlo column: replay the generator (two half-sample calls, then the next bit)
    gen = torch.Generator().manual_seed(bc._mix(cfg.seed, 1, layer, h))
    for b in BITS:  # mc_samples = 6: halves of 3 draws, each drawn 3 = min(3, _MC_BATCH) at a time
        assert bc._MC_BATCH >= 3
        m = [B.mc_quant_damage(q[None], k[None, None], u[:, None], b, n, gen, mask).mean((-2, -1))
             for n in (3, 3)]
        want = (m[0] + m[1]) / 2
        got = torch.tensor([res["columns"]["quant"][str(b)]["mc"][i] for i in row])
        assert_close(got, want, "float64")
        se = torch.tensor([res["columns"]["quant"][str(b)]["mc_se"][i] for i in row])
        assert_close(se, (m[0] - m[1]).abs() / 2, "float64")


def test_mc_column_estimates_the_expectation(cap, monkeypatch):
    """At many samples the Monte-Carlo Fisher damage approaches the analytic expectation."""
    monkeypatch.setattr(bc, "_MC_BATCH", 2000)  # one bounds call per half-sample
    q, k = cap[0]["q"][0, :2, 20:], cap[0]["k"][0, 0]
    u = bc.directions(k, 1, 0, 0)
    out = bc.head_damages(q, k, u, (3,), None, 4000, torch.Generator().manual_seed(0))
    assert_close(out["quant"][3]["mc"], out["quant"][3]["expected"], "mc")


def test_directions_are_unit_and_pca_eigenvectors(cap):
    k = cap[0]["k"][0, 1]
    u = bc.directions(k, 3, 2, 7)
    assert_close(u.norm(dim=-1), torch.ones(5), "float64")
    m = k.T @ k
    evals = torch.linalg.eigvalsh(m).flip(0)
    for j in range(3):  # K^T K u = lambda_j u, eigenvalues descending
        assert_close(m @ u[j], evals[j] * u[j], "float64")
    assert_close(bc.directions(k, 3, 2, 7), u, "exact64")  # seeded


def test_ratio_stats_against_numpy_and_hand_count(res):
    cols = res["columns"]
    for b in BITS:
        qc = cols["quant"][str(b)]
        meas = np.array(cols["proj_kl"]) / np.array(qc["kl_round"])
        exact = np.array(qc["exact"], dtype=float)
        st = res["stats"][str(b)]["all"]["kl_round"]
        p5, med, p95 = np.percentile(meas, [5, 50, 95])
        for key, want in (("p5", p5), ("median", med), ("p95", p95)):
            assert_close(st["measured"][key], want, "float64")
        head = 3 * 4**b
        assert_close(st["over_headline"]["median"], np.median(meas / head), "float64")
        ratio = meas / exact
        assert_close(st["over_exact"]["median"], np.median(ratio), "float64")
        count = 0
        for v in ratio:  # hand count of the within-10% fraction
            if 0.9 <= v <= 1.1:
                count += 1
        assert st["over_exact"]["within"] == count / len(ratio)
        mc = res["stats"][str(b)]["all"]["mc"]["over_exact"]
        mratio = np.array(cols["proj_fisher"]) / np.array(qc["mc"]) / exact
        assert mc["within"] == sum(abs(v - 1) <= 0.1 for v in mratio) / len(mratio)
        pca = res["stats"][str(b)]["pca"]["kl_round"]["measured"]
        sel = np.array(cols["dir_kind"]) == "pca"
        assert pca["n"] == 8 and pca["median"] == pytest.approx(np.median(meas[sel]), rel=1e-12)


def test_ratio_stats_hand_worked():
    st = bc.ratio_stats([1.0, 2.0, 3.0, 4.0, 5.0, float("nan"), float("inf")])
    assert (st["n"], st["median"], st["within"]) == (5, 3.0, 0.2)
    assert_close(st["p5"], 1.2, "float64")  # linear rule: 1 + 0.05 * 4
    assert bc.ratio_stats([])["median"] is None


def test_fisher_kl_stats_bins(res):
    fk = bc.fisher_kl_stats([res])
    pairs = bc.fisher_kl_pairs(res)
    f = np.concatenate([pairs["projection"][0], pairs["quantization"][0]])
    kl = np.concatenate([pairs["projection"][1], pairs["quantization"][1]])
    assert len(f) == 16 * (1 + len(BITS))
    assert sum(b["n"] for b in fk["bins"]) == fk["all"]["n"] == len(f)
    assert_close(fk["all"]["median"], np.median(kl / f), "float64")
    for b in fk["bins"]:
        hi = np.inf if b["hi"] is None else b["hi"]
        sel = (f >= b["lo"]) & (f < hi)
        assert b["n"] == int(sel.sum())
        if b["n"]:
            assert_close(b["median"], np.median(kl[sel] / f[sel]), "float64")
    small = fk["bins"][0]  # tiny perturbations: KL = Fisher to second order
    if small["n"]:
        assert abs(small["median"] - 1) < 1e-2


def test_summary_and_plots_from_json(res, tmp_path, cfg):
    result = {"averaging": "x", "bits": list(BITS), "headline": {str(b): 3 * 4**b for b in BITS},
              "models": {"tiny": res}, "fisher_kl": bc.fisher_kl_stats([res])}
    loaded = json.loads(json.dumps(result, allow_nan=False))
    s = bc.summary(loaded)   # one model: keys without its name
    assert s["b4.ratio_median"] == res["stats"]["4"]["all"]["kl_round"]["measured"]["median"]
    assert s["b4.ratio_p5"] <= s["b4.ratio_median"] <= s["b4.ratio_p95"]
    assert s["b4.headline"] == 768 and s["b2.headline"] == 48
    assert s["b2.within10_mc"] == res["stats"]["2"]["all"]["mc"]["over_exact"]["within"]
    assert s["kl_over_fisher.median"] == result["fisher_kl"]["all"]["median"]
    two = bc.summary(loaded | {"models": {"tiny": res, "other": res}})   # several: prefixed
    assert two["tiny.b4.ratio_median"] == two["other.b4.ratio_median"] == s["b4.ratio_median"]
    merged = bc.merge({"tiny": loaded, "other": loaded | {"models": {"other": res}}})
    assert list(merged["models"]) == ["tiny", "other"]
    assert merged["fisher_kl"]["all"]["n"] == 2 * result["fisher_kl"]["all"]["n"]
    paths = bc.plot(loaded, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["fisher_vs_kl.pdf", "fisher_vs_kl.png", "theory_vs_measured.pdf",
                     "theory_vs_measured.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_query_positions():
    assert bc.query_positions(512, 64)[:2] == [7, 15] and bc.query_positions(512, 64)[-1] == 511
    assert bc.query_positions(10, 3) == [3, 6, 9]
    assert bc.query_positions(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("kw", [{"bits": ()}, {"bits": (4, 4)}, {"bits": (0,)}, {"mc_samples": 1},
                                {"n_pca_dirs": 0, "n_random_dirs": 0}, {"layers": ()},
                                {"mc_metric": "l2"}, {"models": ()}, {"n_tokens": 1}])
def test_config_rejects(kw):
    with pytest.raises(KVTheoryError):
        bc.BoundCheckConfig(**kw)


def test_small_config():
    c = bc.BoundCheckConfig.for_size(True)
    assert c.n_tokens == 128 and c.layers == (0, 1)
    assert bc.BoundCheckConfig.for_size(False) == bc.BoundCheckConfig()


@pytest.mark.slow
@pytest.mark.xdist_group("models")
def test_real_model_tiny_run(data_dir, tmp_path):
    cfg = bc.BoundCheckConfig(models=("smollm2-135m", "minilm-l6"), n_tokens=48, n_queries=6,
                              layers=(0,), n_pca_dirs=1, n_random_dirs=1, bits=(4,), mc_samples=2)
    r = json.loads(json.dumps(bc.run(cfg, data_dir=data_dir, root=tmp_path, progress=False)))
    sm, mi = r["models"]["smollm2-135m"], r["models"]["minilm-l6"]
    assert sm["causal"] and not mi["causal"] and sm["group"] == 3 and mi["group"] == 1
    assert len(sm["columns"]["layer"]) == 3 * 2 and len(mi["columns"]["layer"]) == 12 * 2
    assert r["headline"] == {"4": 768}
    assert all(v > 0 for v in sm["columns"]["proj_fisher"])
