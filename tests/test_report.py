"""REPORT.md and the committed results: the report is a function of the result files.

These tests read the repository's own ``results/`` (written by ``make report`` and committed
with ``REPORT.md`` and ``figures/``), so they need no model: they check that the committed
report is exactly what the committed results render to, that every claim finds the numbers it
reads, and re-derive a few of the claimed numbers from the raw per-head / per-point data by a
second route.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from tol import assert_close

from kvtheory.claims import claims, fmt, render
from kvtheory.report import STAGES, ReportConfig, load_stages

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved():
    cfg = ReportConfig(results=str(REPO / "results"))
    out = load_stages(cfg)
    # paths as the report prints them (relative to the repository root)
    return {k: v | {"path": str(Path(v["path"]).relative_to(REPO))} for k, v in out.items()}


def test_committed_results_cover_every_stage(saved):
    assert set(saved) == {"verify"} | {s.name for s in STAGES}
    on_disk = sorted(p.name for p in (REPO / "results").glob("*.json"))
    assert on_disk == sorted(Path(v["path"]).name for v in saved.values()), "stale result files"


def test_report_md_is_what_the_results_render_to(saved):
    figures = sorted(Path("figures") / p.name for p in (REPO / "figures").iterdir())
    text = render(saved, ReportConfig(), figures)
    assert text == (REPO / "REPORT.md").read_text(encoding="utf-8")


def test_every_figure_the_report_shows_exists_as_png_and_pdf():
    text = (REPO / "REPORT.md").read_text(encoding="utf-8")
    shown = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert len(shown) >= 8
    for png in shown:
        assert (REPO / png).is_file() and (REPO / png).with_suffix(".pdf").is_file(), png


def test_every_claim_finds_its_numbers(saved):
    rows = claims(saved)
    assert [c.id for c in rows] == [f"C{i}" for i in range(1, 9)]
    for c in rows:
        assert "not run" not in c.measured and "n/a" not in c.measured, (c.id, c.measured)
        assert "not run" not in c.source


def test_c1_numbers_from_the_raw_points(saved):
    """The best quantizer and the best rank at the INT4 budget, found again from the points."""
    res = saved["budget"]["result"]
    budget = next(m for m in res["matched"]["kv"] if m["quant_bits"] == 4)["budget"]
    pts = [p for p in res["points"] if p["target"] == "kv" and p["bits"] <= budget + 1e-9]
    best = {fam: min((p for p in pts if p["family"] in fams), key=lambda p: p["ppl"])
            for fam, fams in (("quant", ("quant", "kivi")), ("rank", ("rank",)))}
    c1 = claims(saved)[0].measured
    for fam in ("quant", "rank"):
        assert f"{best[fam]['spec']} PPL {fmt(best[fam]['ppl'])}" in c1
    assert best["quant"]["ppl"] < best["rank"]["ppl"]


def test_c5_flip_rates_are_the_mean_of_the_per_head_rates(saved):
    res = saved["flip_study"]["result"]
    for spec in ("int4", res["matched_rank"]["int4"]):
        per_head = res["methods"][spec]["per_head"]["flip_rate"]   # (layer, q_head)
        flat = [x for row in per_head for x in row]
        assert_close(sum(flat) / len(flat), res["methods"][spec]["mean"]["flip_rate"], "float64")


def test_c6_reports_the_saved_median_ratio(saved):
    from kvtheory.analysis import bound_check

    s = bound_check.summary(saved["bound_check"]["result"])
    r4 = s["smollm2-135m.b4.ratio_median"]
    assert 1 < r4 < 768 and math.isfinite(r4)
    assert f"D_proj/D_quant = {fmt(r4)} " in claims(saved)[5].measured
