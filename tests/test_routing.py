"""kvtheory.analysis.routing: the chosen query really flips under removal and not under INT4."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _tiny import tiny_ids, tiny_model
from kvtheory.analysis import routing as rt
from kvtheory.capture import capture
from kvtheory.errors import KVTheoryError
from kvtheory.quantize import quantize
from tol import assert_close

T = 40


@pytest.fixture(scope="module")
def cap():
    return capture(tiny_model("llama"), tiny_ids(1, T), dtype=torch.float64)


def _cfg(direction="top-pca", **kw):
    return rt.RoutingConfig(model="tiny", n_tokens=T, direction=direction, rank=4,
                            min_position=4, **kw)


def _eig_desc(k):
    """Eigenvectors of K^T K, eigenvalue descending, independent of kvtheory.bases."""
    w, v = torch.linalg.eigh(k.T @ k)
    return v.flip(-1)


def _scores(q, k):
    return q @ k.T / math.sqrt(q.shape[-1])


def _brute_force(cap, direction, skip_sink=True):
    """Every flip that INT4 keeps, by plain loops over queries and directions:
    (strength, layer, head, position, dir, fp top, new top)."""
    out = []
    for layer in cap.meta.layers:
        for h in range(cap.meta.q_heads):
            kv = h // cap.meta.group
            q, k = cap[layer]["q"][0, h], cap[layer]["k"][0, kv]
            kq = quantize(k, 4)
            vecs = _eig_desc(k)
            dirs = [0] if direction == "top-pca" else list(range(4, k.shape[-1]))
            for i in range(4, T):
                s = _scores(q[i], k[: i + 1])
                top = int(s.argmax())
                margin = float(s.topk(2).values[0] - s.topk(2).values[1])
                if int(_scores(q[i], kq[: i + 1]).argmax()) != top:
                    continue
                for j in dirs:
                    u = vecs[:, j]
                    s_rm = _scores(q[i], k[: i + 1] - (k[: i + 1] @ u)[:, None] * u)
                    new = int(s_rm.argmax())
                    if new == top or (skip_sink and 0 in (top, new)):
                        continue
                    gap = float(s_rm[new] - s_rm[top])
                    out.append((min(margin, gap), layer, h, i, j, top, new))
    return out


@pytest.mark.parametrize("direction", ["top-pca", "rank-drop"])
def test_chosen_query_flips_under_removal_not_int4(cap, direction):
    r = rt.find_example(cap, _cfg(direction))
    layer, h, i = r["layer"], r["q_head"], r["query"]
    kv = h // cap.meta.group
    q, k = cap[layer]["q"][0, h, i], cap[layer]["k"][0, kv, : i + 1]
    u = _eig_desc(cap[layer]["k"][0, kv])[:, r["pca_index"]]
    s = _scores(q, k)
    s_rm = _scores(q, k - (k @ u)[:, None] * u)
    s_q = _scores(q, quantize(cap[layer]["k"][0, kv], 4)[: i + 1])
    assert int(s.argmax()) == r["argmax"]["fp"] == r["argmax"]["int4"] == int(s_q.argmax())
    assert int(s_rm.argmax()) == r["argmax"]["removed"] != r["argmax"]["fp"]
    assert_close(r["margin"], float(s.topk(2).values[0] - s.topk(2).values[1]), "float64")
    by_pos = {kk["position"]: kk for kk in r["keys"]}
    for p, kk in by_pos.items():  # recorded scores and probabilities
        assert kk["token"] == cap.meta.token_ids[0][p]
        assert_close(kk["score_fp"], float(s[p]), "float64")
        assert_close(kk["score_removed"], float(s_rm[p]), "float64")
        assert_close(kk["score_int4"], float(s_q[p]), "float64")
        assert_close(kk["prob_removed"], float(torch.softmax(s_rm, 0)[p]), "float64")
    assert [kk["position"] for kk in r["keys"][:8]] == s.argsort(descending=True)[:8].tolist()
    assert r["argmax"]["removed"] in by_pos
    assert_close(r["gap_removed"], float(s_rm.max() - s_rm[r["argmax"]["fp"]]), "float64")
    assert r["strength"] == min(r["margin"], r["gap_removed"]) > 0
    assert 0 not in (r["argmax"]["fp"], r["argmax"]["removed"])  # skip_sink
    # the choice rule: the largest flip strength among all eligible (brute force over queries)
    elig = _brute_force(cap, direction)
    assert r["counts"]["eligible_content"] == len({e[1:4] for e in elig})
    best = max(e[0] for e in elig)
    assert_close(r["strength"], best, "float64")
    first = next(e for e in elig if e[0] == best)
    assert (r["layer"], r["q_head"], r["query"], r["pca_index"]) == first[1:5]


def test_counts_by_hand(cap):
    r = rt.find_example(cap, _cfg())
    c = r["counts"]
    assert c["searched"] == cap.meta.q_heads * len(cap.meta.layers) * (T - 4)
    n_int4 = 0
    for layer in cap.meta.layers:
        for h in range(cap.meta.q_heads):
            q, k = cap[layer]["q"][0, h], cap[layer]["k"][0, h // cap.meta.group]
            kq = quantize(k, 4)
            n_int4 += sum(int(_scores(q[i], k[: i + 1]).argmax())
                          != int(_scores(q[i], kq[: i + 1]).argmax()) for i in range(4, T))
    assert c["flipped_int4"] == n_int4
    assert c["eligible_content"] <= c["eligible"] <= c["flipped_removal"] <= c["searched"]
    assert c["eligible"] == len({e[1:4] for e in _brute_force(cap, "top-pca", skip_sink=False)})


def test_removal_scores_hand_worked():
    q = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    k = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    s, s_rm = rt.removal_scores(q, k, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert_close(s, torch.tensor([[1.5, 3.0]]), "exact64")  # (1 + 2, 6) / 2
    assert_close(s_rm, torch.tensor([[[0.5, 0.0]]]), "exact64")


def test_plot_and_summary_from_json(cap, tmp_path):
    r = {"model": "tiny", "n_tokens": T, **rt.find_example(cap, _cfg())}
    loaded = json.loads(json.dumps(r, allow_nan=False))
    s = rt.summary(loaded)
    keys = {kk["position"]: kk for kk in r["keys"]}
    fp_top, rm_top = keys[r["argmax"]["fp"]], keys[r["argmax"]["removed"]]
    assert s["margin_fp"] == r["margin"]
    assert_close(s["gap_removed"], rm_top["score_removed"] - fp_top["score_removed"], "exact64")
    assert s["gap_removed"] > 0 and s["prob_fp_top_fp"] == fp_top["prob_fp"]
    assert s["direction"] == "PCA direction #0"
    assert s["flip_rate_int4"] == r["counts"]["flipped_int4"] / r["counts"]["searched"]
    paths = rt.plot(loaded, tmp_path)
    assert sorted(p.name for p in paths) == ["routing_failure.pdf", "routing_failure.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_layer_choice_and_errors(cap):
    r = rt.find_example(cap, _cfg(layer=0))
    assert r["layer"] == 0
    with pytest.raises(KVTheoryError):
        rt.find_example(cap, _cfg(layer=5))
    with pytest.raises(KVTheoryError):
        rt.find_example(cap, rt.RoutingConfig(model="tiny", n_tokens=T, direction="rank-drop",
                                              rank=8))


@pytest.mark.parametrize("kw", [{"direction": "all"}, {"n_tokens": 1}, {"top": 1}, {"layer": -1},
                                {"min_position": 600}, {"model": ""}])
def test_config_rejects(kw):
    with pytest.raises(KVTheoryError):
        rt.RoutingConfig(**kw)


def test_small_config():
    assert rt.RoutingConfig.for_size(True).n_tokens == 128
    assert rt.RoutingConfig.for_size(False) == rt.RoutingConfig()


@pytest.mark.slow
@pytest.mark.xdist_group("models")
def test_real_model_example(data_dir, tmp_path):
    cfg = rt.RoutingConfig(n_tokens=64)
    r = rt.run(cfg, data_dir=data_dir, root=tmp_path, progress=False)
    assert r["argmax"]["fp"] != r["argmax"]["removed"]
    assert r["argmax"]["fp"] == r["argmax"]["int4"]
    assert all(isinstance(kk["text"], str) for kk in r["keys"])
