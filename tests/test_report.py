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

from kvtheory.claims import claims, fmt, summaries
from kvtheory.report import ReportConfig, Results, load_stages
from kvtheory.reportmd import render
from kvtheory.stages import stages

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved() -> Results:
    out = load_stages(ReportConfig(results=str(REPO / "results")))
    # paths as the report prints them (relative to the repository root)
    rel = lambda env: env | {"path": str(Path(env["path"]).relative_to(REPO))}  # noqa: E731
    out.verify = rel(out.verify) if out.verify else None
    out.by_stage = {s: {m: rel(e) for m, e in per.items()} for s, per in out.by_stage.items()}
    return out


def test_committed_results_cover_every_stage_and_model(saved):
    assert saved.verify is not None
    decoders = set(saved.by_stage.get("budget", {}))
    assert len(decoders) >= 3, "the report covers at least three decoders"
    for stage in stages():
        got = set(saved.by_stage.get(stage.name, {}))
        assert got, f"{stage.name} has no committed result"
        if stage.name in ("budget", "ablation", "routing", "predictor"):
            assert got == decoders, stage.name
        elif stage.name == "eviction":            # decoders of the architectures kvpress is tested on
            assert got <= decoders, stage.name
        else:
            assert got == set(saved.models), stage.name
    on_disk = sorted(p.name for p in (REPO / "results").glob("*.json"))
    assert on_disk == sorted(Path(e["path"]).name for e in saved.envelopes()), "stale result files"


def test_report_md_is_what_the_results_render_to(saved):
    figures = sorted(Path("figures") / p.name for p in (REPO / "figures").iterdir())
    text = render(saved, ReportConfig(), figures)
    assert text == (REPO / "REPORT.md").read_text(encoding="utf-8")


def test_every_figure_the_report_shows_exists_as_png_and_pdf():
    text = (REPO / "REPORT.md").read_text(encoding="utf-8")
    shown = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert len(shown) >= 12 and any("gap_vs_gqa" in s for s in shown)
    for png in shown:
        assert (REPO / png).is_file() and (REPO / png).with_suffix(".pdf").is_file(), png
    drawn = {p.relative_to(REPO).as_posix() for p in (REPO / "figures").glob("*.png")}
    assert drawn == set(shown), "figures/ holds files the report does not show"


def test_every_claim_finds_its_numbers(saved):
    rows = claims(saved)
    assert [c.id for c in rows] == [f"C{i}" for i in range(1, 9)] + ["E1"]
    for c in rows:
        assert "not run" not in c.measured and "n/a" not in c.measured, (c.id, c.measured)
        assert "not run" not in c.source
    c3 = rows[2]
    assert "Spearman" in c3.measured and "not testable" not in c3.verdict


def test_c1_numbers_from_the_raw_points(saved):
    """For every decoder: the best quantizer and the best rank at the INT4 budget, found again
    from the points."""
    c1 = claims(saved)[0].measured
    for model, res in saved.results("budget").items():
        budget = next(m for m in res["matched"]["kv"] if m["quant_bits"] == 4)["budget"]
        pts = [p for p in res["points"] if p["target"] == "kv" and p["bits"] <= budget + 1e-9]
        best = {fam: min((p for p in pts if p["family"] in fams), key=lambda p: p["ppl"])
                for fam, fams in (("quant", ("quant", "kivi")), ("rank", ("rank",)))}
        line = next(x for x in c1.split("<br>") if x.startswith(f"**{model}**"))
        for fam in ("quant", "rank"):
            assert f"{best[fam]['spec']} PPL {fmt(best[fam]['ppl'])}" in line
        assert best["quant"]["ppl"] < best["rank"]["ppl"]


def test_c3_ratio_from_the_raw_points(saved):
    """The rank/quant PPL ratio at the INT4 budget and the GQA group, recomputed per model."""
    S = summaries(saved)
    for model, res in saved.results("budget").items():
        m = next(m for m in res["matched"]["kv"] if m["quant_bits"] == 4)
        ppl = {p["spec"]: p["ppl"] for p in res["points"] if p["target"] == "kv"}
        ratio = ppl[m["rank"]["spec"]] / ppl[m["quant"]["spec"]]
        assert_close(math.exp(S[model]["budget"]["int4_budget_log_ratio"]), ratio, "float64")
        assert S[model]["budget"]["gqa_group"] == res["q_heads"] // res["kv_heads"]


def test_c5_flip_rates_are_the_mean_of_the_per_head_rates(saved):
    for model, res in saved.results("flip_study").items():
        for spec in ("int4", res["matched_rank"]["int4"]):
            per_head = res["methods"][spec]["per_head"]["flip_rate"]   # (layer, q_head)
            flat = [x for row in per_head for x in row]
            assert_close(sum(flat) / len(flat), res["methods"][spec]["mean"]["flip_rate"], "float64")


def test_c6_reports_the_saved_median_ratio(saved):
    from kvtheory.analysis import bound_check

    c6 = claims(saved)[5].measured
    for model, res in saved.results("bound_check").items():
        r4 = bound_check.summary(res)["b4.ratio_median"]
        assert 1 < r4 < 768 and math.isfinite(r4)
        line = next(x for x in c6.split("<br>") if x.startswith(f"**{model}**"))
        assert f"D_proj/D_quant = {fmt(r4)} " in line


@pytest.mark.slow
def test_committed_budget_points_recompute_within_the_cross_cpu_tolerance(saved, data_dir):
    """Recompute fp and INT4-KIVI (K+V) perplexity of the first decoder on the committed
    budget windows: equal within the stated cross-CPU tolerance (bit-identical on the CPU that
    made them; another CPU rounds differently)."""
    from kvtheory import engine
    from kvtheory.analysis.budget import BudgetConfig

    model, res = next(iter(saved.results("budget").items()))
    cfg = BudgetConfig(**{k: v for k, v in saved.by_stage["budget"][model]["config"]["config"].items()
                          if k in ("model", "seq_len", "n_windows", "calib_windows", "n_boot", "seed")})
    ev, cal = engine.eval_windows(model, cfg.seq_len, cfg.n_windows, cfg.calib_windows, data_dir)
    lm = engine.get_model(model)
    pts = {(p["spec"], p["target"]): p["ppl"] for p in res["points"]}
    fp = engine.ppl_point(lm, model, "fp", "kv", windows=ev, calibration=cal, n_boot=10)
    assert_close(fp["value"], res["fp"]["value"], "cross_cpu")
    kivi = engine.ppl_point(lm, model, "int4-kivi", "kv", windows=ev, calibration=cal, n_boot=10)
    assert_close(kivi["value"], pts[("int4-kivi", "kv")], "cross_cpu")
