"""Flip study: per-head numbers against direct flips.attention_metrics calls, the certificate
against a hand-written loop (and certified ⇒ not flipped), co-flips against plain counts and
brute-force enumeration, and plots from a JSON round-tripped result."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from tol import assert_close

from kvtheory.analysis import flip_study as fs
from kvtheory.capture import Capture, CaptureMeta
from kvtheory.compress import make_compressor
from kvtheory.errors import KVTheoryError
from kvtheory.flips import attention_metrics
from kvtheory.ledger import bits_per_element
from kvtheory.quantize import quant_steps

HQ, HKV, D, T, LAYERS = 6, 2, 16, 48, (0, 1)
MEDGES = (0.0, 0.1, 0.5, 1.0, 2.0, math.inf)
PEDGES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def fake_capture(model="smollm2-135m", n=T, offset=0, hq=HQ, hkv=HKV, d=D) -> Capture:
    """Random q/k/v with a few strong key directions (so that margins vary and ranks matter)."""
    g = torch.Generator().manual_seed(1000 * offset + n + hq)
    tensors = {}
    for layer in LAYERS:
        scale = torch.linspace(3.0, 0.3, d, dtype=torch.float64)
        tensors[layer] = {w: torch.randn(1, h, n, d, generator=g, dtype=torch.float64) * s
                          for w, h, s in (("q", hq, scale), ("k", hkv, scale), ("v", hkv, 1.0))}
    meta = CaptureMeta(model=model, layers=LAYERS, what=("q", "k", "v"), q_heads=hq, kv_heads=hkv,
                       group=hq // hkv, d=d, positions=tuple(range(offset, offset + n)),
                       token_ids=(tuple(range(n)),), dtype="float64", rope="post",
                       kvtheory_version="test")
    return Capture(tensors=tensors, meta=meta)


METHODS = ("fp", "int8", "int4", "int4-kivi", "int2", "rank4-pca", "rank8x4-pca")


@pytest.fixture(scope="module")
def study():
    cfg = fs.FlipStudyConfig(n_tokens=T, methods=METHODS, compare_model=None)
    cap, cal = fake_capture(), fake_capture(offset=T)
    old = torch.get_default_dtype()  # module fixtures run before conftest's float64 one
    torch.set_default_dtype(torch.float64)
    try:
        return cfg, cap, cal, fs.analyse(cap, cal, cfg, causal=True)
    finally:
        torch.set_default_dtype(old)


def test_per_head_numbers_equal_direct_attention_metrics(study):
    cfg, cap, cal, res = study
    assert set(METHODS) <= set(res["methods"])
    for spec in METHODS:
        out = res["methods"][spec]
        for li, layer in enumerate(LAYERS):
            q, k = cap[layer]["q"], cap[layer]["k"]
            comp = make_compressor(spec, "k")
            comp = comp.fit(cal[layer]["k"], cal[layer]["q"]) if comp.needs_fit else comp
            m = attention_metrics(q, k, comp(k), causal=True, margin_bins=MEDGES, prob_bins=PEDGES)
            for f in ("flip_rate", "kl", "fisher", "topk_overlap"):
                assert_close(torch.tensor(out["per_head"][f][li]), getattr(m, f), "exact64")
            assert_close(torch.tensor(out["per_kv_head"]["flip_rate"][li]),
                         m.flip_rate.view(HKV, -1).mean(1), "exact64")
            assert out["strata"]["margin"]["counts"][li] == m.margin_counts.sum(0).tolist()
            assert out["strata"]["prob"]["flips"][li] == m.prob_flips.sum(0).tolist()
            hi = (m.margin_flips[:, 3:].sum(1) / m.margin_counts[:, 3:].sum(1)).tolist()
            assert_close(torch.tensor(out["per_head"]["flip_rate_margin_gt1"][li]), torch.tensor(hi),
                         "exact64")
        assert_close(out["mean"]["fisher"], torch.tensor(out["per_head"]["fisher"]).mean(), "exact64")
        assert_close(out["mean"]["kl"], torch.tensor(out["per_head"]["kl"]).mean(), "exact64")
        assert out["bits_per_element"] == bits_per_element(spec, D, T)
    assert res["methods"]["fp"]["mean"]["flip_rate"] == 0.0
    # the stratification has something to show: rank flips more than int8, also at margin >= 1
    assert res["methods"]["rank4-pca"]["mean"]["flip_rate"] > res["methods"]["int8"]["mean"]["flip_rate"]


def test_pooled_margin_gt1_rate_by_hand(study):
    _, _, _, res = study
    out = res["methods"]["int4"]
    n = sum(sum(row[3:]) for row in out["strata"]["margin"]["counts"])
    f = sum(sum(row[3:]) for row in out["strata"]["margin"]["flips"])
    assert_close(out["mean"]["flip_rate_margin_gt1"], f / n, "exact64")
    assert out["strata"]["margin"]["edges"] == [0.0, 0.1, 0.5, 1.0, 2.0, None]


def _certified_loop(q, k, steps, causal=True):
    """Second implementation: per query, margin > 2 max_j sum_c |q_c| step_jc / (2 sqrt d)."""
    hq, n, d = q.shape
    g = hq // k.shape[0]
    out = torch.zeros(hq, n, dtype=torch.bool)
    for h in range(hq):
        kk, st = k[h // g], steps[h // g]
        for i in range(n):
            vis = i + 1 if causal else n
            s = (kk[:vis] @ q[h, i]) / math.sqrt(d)
            bound = float((q[h, i].abs() * st[:vis]).sum(-1).max()) / (2 * math.sqrt(d))
            top = s.topk(2).values if vis >= 2 else None
            margin = math.inf if top is None else float(top[0] - top[1])
            out[h, i] = margin > 2 * bound
    return out


def test_certificate_matches_loop_and_certified_never_flip(study):
    _, cap, _, res = study
    for spec in ("int8", "int4", "int4-kivi", "int2"):
        comp = make_compressor(spec, "k")
        cert_res = res["methods"][spec]["certificate"]
        assert cert_res["violations"] == 0
        n_cert = 0
        for li, layer in enumerate(LAYERS):
            q, k = cap[layer]["q"][0], cap[layer]["k"][0]
            steps = quant_steps(k, comp.bits, axis=comp.axis, group=comp.group)
            cert = fs.certified_queries(q, k, steps, causal=True)
            assert torch.equal(cert, _certified_loop(q, k, steps))
            assert_close(torch.tensor(cert_res["certified"][li]), cert.double().mean(-1), "exact64")
            m = attention_metrics(q[None], k[None], comp(k[None]), return_per_query=True)
            assert not bool((cert & m.per_query.flip[0]).any())  # certified => not flipped
            n_cert += int(cert.sum())
        assert_close(cert_res["fraction"], n_cert / (len(LAYERS) * HQ * T), "exact64")
        assert cert_res["fraction"] <= cert_res["not_flipped_fraction"]
    assert res["methods"]["int8"]["certificate"]["fraction"] > 0.5  # the check is not vacuous
    assert res["methods"]["rank4-pca"]["certificate"] is None


def test_coflip_against_plain_loop_and_enumeration(gen):
    flips = torch.rand(9, 200, generator=gen) < torch.tensor([0.05, 0.3, 0.5] * 3)[:, None]
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    stats = fs.coflip_stats(flips, groups)
    ge2 = alln = 0
    for grp in groups:
        for i in range(flips.shape[1]):
            c = sum(int(flips[h, i]) for h in grp)
            ge2 += c >= 2
            alln += c == 3
    assert_close(stats["observed"], ge2 / 600, "exact64")
    assert_close(stats["observed_all"], alln / 600, "exact64")
    indep = []
    for grp in groups:  # brute force over the 2^3 outcomes
        p = [float(flips[h].double().mean()) for h in grp]
        indep.append(sum(math.prod(pi if o else 1 - pi for pi, o in zip(p, out))
                         for out in itertools.product((0, 1), repeat=3) if sum(out) >= 2))
    assert_close(stats["independent"], sum(indep) / 3, "float64")


def test_independent_formula_by_hand():
    for p in (0.0, 0.1, 0.25, 0.9, 1.0):
        hand = p**3 + 3 * p**2 * (1 - p)
        assert_close(fs.equal_rate_coflip(p, 3), hand, "exact64")
        assert_close(fs.independent_coflip(torch.tensor([p, p, p])), hand, "exact64")
    assert_close(fs.equal_rate_coflip(0.1, 3), 0.028, "exact64")
    assert_close(fs.equal_rate_coflip(0.2, 2), 0.04, "exact64")  # two heads: p^2
    # unequal rates: 1 - P0 - P1 with P0 = .9*.8*.5, P1 = .1*.8*.5 + .9*.2*.5 + .9*.8*.5
    assert_close(fs.independent_coflip(torch.tensor([0.1, 0.2, 0.5])), 1 - 0.36 - 0.49, "exact64")


def test_coflip_groups():
    assert fs.coflip_groups(9, 3, 3) == {"gqa": [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
                                         "control": [[0, 3, 6], [1, 4, 7], [2, 5, 8]]}
    assert fs.coflip_groups(12, 12, 3) == {"control": [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]}
    for grp in fs.coflip_groups(6, 2, 2)["control"]:  # control heads read different KV heads
        assert len({h // 3 for h in grp}) == len(grp)


def test_matched_rank_sits_at_the_quantizer_storage(study):
    _, _, _, res = study
    for quant, rank in res["matched_rank"].items():
        r = int(rank.split("-")[0][4:])
        assert rank in res["methods"]
        assert bits_per_element(rank, D, T) <= bits_per_element(quant, D, T)
        assert r == D or bits_per_element(f"rank{r + 1}-pca", D, T) > bits_per_element(quant, D, T)


@pytest.mark.parametrize("kw", [dict(margin_bins=(0.5, 2.0)), dict(margin_bins=(1.0, 0.5)),
                                dict(calib_offset=10), dict(methods=("int4", "bogus")),
                                dict(n_tokens=2), dict(layers=(1, 1)), dict(prob_bins=(0.5, 1.0)),
                                dict(topk=0), dict(compare_tokens=4)])
def test_config_rejects(kw):
    with pytest.raises(KVTheoryError):
        fs.FlipStudyConfig(**kw)


def test_run_json_roundtrip_plot_and_summary(monkeypatch, tmp_path):
    def fake_load(model, n, *, offset=0, **_):
        if model == "minilm-l6":
            return fake_capture(model, n, offset, hq=4, hkv=4, d=8)
        return fake_capture(model, n, offset)

    monkeypatch.setattr(fs, "load_or_capture", fake_load)
    cfg = fs.FlipStudyConfig(n_tokens=T, compare_tokens=T, methods=("int8", "int4", "int4-kivi", "rank4-pca"),
                             layers=(1,), kv=True)
    res = fs.run(cfg, progress=False)
    from kvtheory.io import write_json

    write_json(tmp_path / "r.json", res)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["layers"] == [1] and back["compare"]["layers"] == [0, 1]
    assert not back["compare"]["causal"] and back["causal"]
    assert "gqa" not in back["compare"]["coflip_groups"]
    assert len(back["compare"]["coflip_groups"]["control"][0]) == 3  # the main model's group
    assert "output_rel_err" in back["methods"]["int4"]["mean"]
    paths = fs.plot(back, tmp_path / "fig")
    names = {p.name for p in paths}
    for name in ("flip_vs_budget", "flip_heatmap", "certified_fraction", "gqa_coflip"):
        assert {f"{name}.png", f"{name}.pdf"} <= names
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 1000
    s = fs.summary(back)
    assert s["smollm2-135m.int4.flip_rate"] == back["methods"]["int4"]["mean"]["flip_rate"]
    rank = back["matched_rank"]["int4"]
    assert s[f"smollm2-135m.{rank}.coflip_gqa.observed"] == back["methods"][rank]["coflip"]["gqa"]["observed"]
    assert s["minilm-l6.int4.flip_rate"] == back["compare"]["methods"]["int4"]["mean"]["flip_rate"]
    assert s["smollm2-135m.certificate_violations"] == 0.0


@pytest.mark.slow
@pytest.mark.xdist_group("models")
def test_real_smollm2_small(data_dir, tmp_path):
    cfg = fs.FlipStudyConfig.for_size("small", compare_model=None, layers=(3,),
                                      methods=("int8", "int4-kivi", "rank16-pca"))
    res = fs.run(cfg, data_dir=data_dir, root=tmp_path, progress=False)
    m = res["methods"]
    assert all(x["certificate"] is None or x["certificate"]["violations"] == 0 for x in m.values())
    rate = {s: x["mean"]["flip_rate"] for s, x in m.items()}
    assert rate["int8"] < rate["int4-kivi"] < rate["rank16-pca"]


def test_certificate_uses_the_layers_sliding_window(gen):
    """A window of one key leaves each query a single candidate (nothing can flip: all
    certified); a window as long as the sequence is the plain causal mask."""
    from kvtheory.analysis.flip_study import certified_queries

    q, k = torch.randn(4, 6, 8, generator=gen), torch.randn(2, 10, 8, generator=gen)
    steps = torch.full((2, 10, 8), 0.5)
    assert bool(certified_queries(q, k, steps, True, window=1).all())
    assert torch.equal(certified_queries(q, k, steps, True, window=10),
                       certified_queries(q, k, steps, True))
