"""Eviction stage: presses vs quantization vs rank at matched storage (small size)."""

from __future__ import annotations

import pytest
import torch

from tol import assert_close

pytest.importorskip("kvpress", reason="optional kvpress not installed")

from kvtheory.analysis import eviction as E  # noqa: E402
from kvtheory.errors import KVTheoryError  # noqa: E402


def test_config_validation_and_budgets():
    with pytest.raises(KVTheoryError, match="presses"):
        E.EvictionConfig(presses=("nope",))
    with pytest.raises(KVTheoryError, match="anchors"):
        E.EvictionConfig(anchors=(0,))
    small = E.EvictionConfig.for_size(True)
    assert small.n_windows == 1 and small.anchors == (4,)
    from kvtheory.ledger import bits_per_element

    for b in E.budgets(E.EvictionConfig(), 64):
        # an fp16 eviction keeping f of the tokens costs 16 f: the same bits as the anchor
        assert_close(16 * b["keep_fraction"], bits_per_element(b["anchor"], 64), "exact64")
        r = int(b["rank"][0].removeprefix("rank").split("-")[0])
        assert bits_per_element(f"rank{r}-pca", 64, 640) <= b["bits"] < bits_per_element(
            f"rank{r + 1}-pca", 64, 640)


@pytest.mark.slow
def test_small_run(data_dir, tmp_path):
    from kvpress.utils import compute_n_kept

    from kvtheory.analysis.common import get_model, wikitext_ids
    from kvtheory.integrations.kvpress import eviction_perplexity

    cfg = E.EvictionConfig.for_size(True)
    res = E.run(cfg, data_dir=data_dir, progress=False)
    rows = {(r["family"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {("fp", "fp"), ("evict", "knorm"), ("evict", "streaming"),
                         ("quant", "int4/int4"), ("quant", "int4-kivi/int4"), ("rank", "rank11-pca")}
    f = res["budgets"][0]["keep_fraction"]
    for name in ("knorm", "streaming"):
        r = rows[("evict", name)]
        assert_close(r["kept_fraction"], compute_n_kept(96, 1 - f) / 96, "exact64")
        assert r["flip_rate"] == r["top_evicted_rate"]
        assert_close(r["kl_kept"], r["kl_theory"], "float64")  # per query; so are the means
        assert 0 < r["evicted_mass"] < 1
    # the fp row through a second route: the plain model on the same window
    lm = get_model("smollm2-135m")
    ids = wikitext_ids("smollm2-135m", str(data_dir))[:112]
    with torch.no_grad():
        logits = lm.model(ids[None]).logits[0, 95:-1]
    ref = torch.exp(torch.nn.functional.cross_entropy(logits.float(), ids[96:]))
    assert_close(rows[("fp", "fp")]["ppl"], float(ref), "float32")
    s = eviction_perplexity(lm.model, ids[None], 96, keys="int4", values="int4", n_boot=10)
    assert_close(rows[("quant", "int4/int4")]["ppl"], s.value, "float32")
    summ = E.summary(res)
    quant = min(rows[k]["ppl"] for k in rows if k[0] == "quant")
    evict = min(rows[k]["ppl"] for k in rows if k[0] == "evict")
    assert summ["verdict"].startswith("quantization dominates" if quant < evict else
                                      "quantization does not")
    files = E.plot(res, tmp_path)
    assert {p.suffix for p in files} == {".png", ".pdf"} and all(p.stat().st_size > 0 for p in files)
