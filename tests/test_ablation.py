"""Basis ablation: spread by hand, RoPE of pre-RoPE keys against the post-RoPE capture, rows
against direct perplexities and attention_metrics, spreads and rescue recomputed from the
rows, near-lossless quantization flips nothing, plots from a JSON round-tripped result."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import save_tiny, tiny_ids, tiny_model
from tol import assert_close

from kvtheory import engine
from kvtheory.analysis import ablation, budget
from kvtheory.capture import capture
from kvtheory.errors import KVTheoryError


@pytest.fixture(autouse=True)
def _fresh_memo():
    engine.clear_memo()
    yield
    engine.clear_memo()


def test_spread_by_hand():
    s = ablation.spread({"identity": 30.0, "pca": 20.0, "random0": 40.0, "random1": 50.0,
                         "random2": 60.0, "hadamard": 25.0})
    assert s["by_basis"] == {"identity": 30.0, "pca": 20.0, "random": 50.0, "hadamard": 25.0}
    assert s["range"]["random"] == [40.0, 60.0]
    assert (s["spread"], s["spread_all"], s["best"], s["worst"]) == (30.0, 40.0, "pca", "random")
    with pytest.raises(KVTheoryError):
        ablation.spread({})


def test_apply_rope_matches_post_capture():
    model = tiny_model("llama", max_position_embeddings=64)
    ids = tiny_ids(1, 20)
    pre, post = capture(model, ids, rope="pre"), capture(model, ids, rope="post")
    for layer in pre.meta.layers:
        k_pre, k_post = pre[layer]["k"], post[layer]["k"]
        assert not torch.allclose(k_pre, k_post)           # RoPE changes the keys
        assert_close(ablation.apply_rope(model, k_pre), k_post, "float32")
    bert = tiny_model("bert")
    x = torch.randn(1, 4, 5, 8)
    assert ablation.apply_rope(bert, x) is x                # no rotary embedding: identity


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer=True,
                     max_position_embeddings=128)


BASES = ("identity", "pca", "random0", "random1", "hadamard", "qaware")


@pytest.fixture(scope="module")
def result(tiny_folder, data_dir, tmp_path_factory):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    engine.clear_memo()
    try:
        cfg = ablation.AblationConfig(model=str(tiny_folder), seq_len=32, bases=BASES,
                                      quant_bits=(4, 16), n_boot=20)
        root = tmp_path_factory.mktemp("root")
        return cfg, root, ablation.run(cfg, data_dir=data_dir, root=root, progress=False)
    finally:
        torch.set_default_dtype(old)


def test_rows_equal_direct_evaluations(result, tiny_folder, data_dir):
    from kvtheory.analysis.common import get_model, load_or_capture
    from kvtheory.flips import attention_metrics
    from kvtheory.patch import fit_compressors

    cfg, root, res = result
    assert len(res["rows"]) == 2 * len(BASES) * 3 and res["rank"] == 2  # d = 8: rank d/4
    assert res["rope_check_max_rel_err"] < 1e-5
    lm = get_model(str(tiny_folder))
    ev, cal = engine.eval_windows(str(tiny_folder), 32, 1, 1, data_dir)
    from kvtheory.evaluate import perplexity

    for side, spec in (("post", "rank2-pca"), ("pre", "int4-qaware"), ("pre", "rank2-random1")):
        row = next(r for r in res["rows"] if r["rope"] == side and r["spec"] == spec)
        direct = perplexity(lm.model, ev, keys=spec, values="fp", calibration=cal, rope=side, n_boot=20)
        assert_close(row["ppl"], direct.value, "float32")
        assert_close(row["dppl"], row["ppl"] - res["fp"]["value"], "exact64")
    # flip metrics of a post-RoPE row: attention_metrics with a compressor fitted by patch
    cap = load_or_capture(str(tiny_folder), 32, rope="post", data_dir=data_dir, root=root)
    plan = fit_compressors(lm.model, "rank2-pca", "fp", cal, "post")
    flips = [float(attention_metrics(cap[x]["q"], cap[x]["k"], plan[x][0](cap[x]["k"])).flip_rate.mean())
             for x in cap.meta.layers]
    row = next(r for r in res["rows"] if r["rope"] == "post" and r["spec"] == "rank2-pca")
    assert_close(row["flip_rate"], sum(flips) / len(flips), "float32")


def test_spread_and_rescue_recomputed_from_rows(result):
    _, _, res = result
    for side in ("pre", "post"):
        for method in ("int4", "int16", "rank2"):
            runs = {r["basis"]: r["ppl"] for r in res["rows"] if r["rope"] == side and r["method"] == method}
            rnd = (runs["random0"] + runs["random1"]) / 2
            vals = [runs["identity"], runs["pca"], rnd, runs["hadamard"], runs["qaware"]]
            assert_close(res["spread"][side][method]["spread"], max(vals) - min(vals), "exact64")
        rk = min(res["spread"][side]["rank2"]["by_basis"].values())
        qw = max(max(res["spread"][side][m]["by_basis"].values()) for m in ("int4", "int16"))
        assert res["rescue"][side]["rescued"] == (rk <= qw)
        assert_close(res["rescue"][side]["rank_best_ppl"], rk, "exact64")


def test_near_lossless_quantization_flips_nothing(result):
    _, _, res = result
    for r in res["rows"]:
        if r["method"] == "int16":
            assert r["flip_rate"] <= 0.01
            assert abs(r["dppl"]) < 1e-2 * res["fp"]["value"]


def test_summary_and_plot_from_json(result, tmp_path):
    _, _, res = result
    again = json.loads(json.dumps(res))
    s = ablation.summary(again)
    assert s["post_rank2_spread"] == res["spread"]["post"]["rank2"]["spread"]
    assert s["pre_rescued"] in ("yes", "no")
    paths = ablation.plot(again, tmp_path)
    assert [p.name for p in paths] == ["basis_ablation.png", "basis_ablation.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_config_validation():
    with pytest.raises(KVTheoryError):
        ablation.AblationConfig(bases=("nope",))
    with pytest.raises(KVTheoryError):
        ablation.AblationConfig(ropes=("middle",))
    with pytest.raises(KVTheoryError):
        ablation.AblationConfig(quant_bits=(1,))
    assert ablation.AblationConfig.for_size("small").seq_len == 128


def test_apply_rope_uses_each_layers_rope_on_gemma3():
    """Gemma 3's sliding layers and its global layer use different RoPE bases: the per-layer
    RoPE reproduces every layer's post-RoPE keys, and the wrong layer's RoPE does not."""
    model = tiny_model("gemma3", max_position_embeddings=64)
    ids = tiny_ids(1, 20)
    pre, post = capture(model, ids, rope="pre"), capture(model, ids, rope="post")
    for layer in pre.meta.layers:
        assert_close(ablation.apply_rope(model, pre[layer]["k"], layer), post[layer]["k"], "float32")
    wrong = ablation.apply_rope(model, pre[2]["k"], 0)      # global keys with a sliding layer's RoPE
    assert not torch.allclose(wrong, post[2]["k"], atol=1e-4)
    with pytest.raises(KVTheoryError, match="layer"):
        ablation.apply_rope(model, pre[2]["k"])
