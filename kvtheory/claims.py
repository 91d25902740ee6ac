r"""REPORT.md: the paper's claims beside the numbers measured here, each with a verdict.

Every number is read from a saved result (``results/<stage>-<hash>.json``) through the
stage's ``summary`` function; the claims table names that file. A verdict is computed by an
explicit rule, written next to it, never typed in by hand:

* **holds** — the rule on the measured numbers is met;
* **does not hold** — it is not;
* **not testable here** — the paper's number needs weights or data we do not have; the same
  comparison on our models is still reported.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Claim", "claims", "render", "fmt"]

HOLDS, FAILS, UNTESTABLE, PARTLY = "holds", "does not hold", "not testable here", "partly"


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits; strings as they are; None as 'n/a'.

    >>> fmt(23.0914), fmt(0.00123), fmt(None), fmt(768)
    ('23.1', '0.00123', 'n/a', '768')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e6):
        return str(int(x))
    return f"{x:.{digits}g}"


def pct(x: Any) -> str:
    """A fraction as a percentage.

    >>> pct(0.0312)
    '3.12%'
    """
    return "n/a" if x is None else f"{100 * x:.3g}%"


@dataclass(frozen=True)
class Claim:
    """One row of the claims table."""

    id: str
    claim: str
    paper: str
    measured: str
    verdict: str
    rule: str
    source: str


def _summary(saved: dict, stage: str) -> dict[str, Any]:
    if stage not in saved:
        return {}
    if stage == "verify":
        rows = saved["verify"]["result"]
        return {"n": len(rows), "all_pass": all(r["symbolic"] and (r["numeric_max_abs_err"] or 1) < 1e-9
                                                  for r in rows),
                "max_err": max((r["numeric_max_abs_err"] or math.inf) for r in rows)}
    mod = importlib.import_module(f"kvtheory.analysis.{stage}")
    try:
        return mod.summary(saved[stage]["result"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a partial result
        return {"error": f"{type(exc).__name__}: {exc}"}


def _src(saved: dict, *stages: str) -> str:
    return ", ".join(f"`{Path(saved[s]['path']).as_posix()}`" for s in stages if s in saved) or "not run"


def claims(saved: dict) -> list[Claim]:
    """The C1–C8 rows of ``../shared/paper/CLAIMS.md`` with verdicts computed from results."""
    S = {s: _summary(saved, s) for s in ("verify", "bound_check", "routing", "flip_study",
                                         "budget", "ablation", "tasks", "predictor")}
    b, f, a, t, v, bc = S["budget"], S["flip_study"], S["ablation"], S["tasks"], S["verify"], S["bound_check"]
    rows: list[Claim] = []

    # C1 -----------------------------------------------------------------------------
    q, r = b.get("int4_budget_best_quant_ppl"), b.get("int4_budget_best_rank_ppl")
    gaps = _matched_gaps(saved)
    if q is not None and r is not None:
        wins = [g for g in gaps if g is not None]
        verdict = HOLDS if r > q and all(g > 0 for g in wins) else FAILS
        meas = (f"smollm2-135m (GQA), K+V at the INT4 budget ({fmt(b.get('int4_budget_bits'))} bits/elt): "
                f"{b.get('int4_budget_best_quant')} PPL {fmt(q)} vs {b.get('int4_budget_best_rank')} "
                f"PPL {fmt(r)} (fp {fmt(b.get('fp_ppl'))}); rank−quant gap at every matched budget: "
                + ", ".join(fmt(g) for g in gaps))
    else:
        verdict, meas = UNTESTABLE, "budget stage not run"
    rows.append(Claim("C1", "At matched storage, quantization beats rank reduction on perplexity",
                      "gap 4 to 364 PPL (124M–14B)", meas, verdict,
                      "holds if the best quantizer has lower PPL than the best rank reduction at every "
                      "matched budget", _src(saved, "budget")))
    # C2 -----------------------------------------------------------------------------
    h = b.get("int4_budget_best_hybrid_ppl")
    if q is not None and h is not None:
        verdict = HOLDS if h > q else FAILS
        meas = (f"best hybrid at the INT4 budget: {b.get('int4_budget_best_hybrid')} PPL {fmt(h)} vs "
                f"{b.get('int4_budget_best_quant')} PPL {fmt(q)}")
    else:
        verdict, meas = UNTESTABLE, "budget stage not run"
    rows.append(Claim("C2", "The gap persists against hybrids (rank reduction, then quantized coefficients)",
                      "–", meas, verdict, "holds if the best hybrid at the INT4 budget has higher PPL "
                      "than the best quantizer", _src(saved, "budget")))
    # C3 -----------------------------------------------------------------------------
    rows.append(_c3(f, saved))
    # C4 -----------------------------------------------------------------------------
    rows.append(_c4(t, saved))
    # C5 -----------------------------------------------------------------------------
    rows.append(_c5(f, saved))
    # C6 -----------------------------------------------------------------------------
    ok = v.get("all_pass")
    r4 = bc.get("smollm2-135m.b4.ratio_median")
    e4 = bc.get("smollm2-135m.b4.over_exact_median")
    w4 = bc.get("smollm2-135m.b4.within10_mc")
    w4r = bc.get("smollm2-135m.b4.within10_round")
    meas = (f"{v.get('n', 0)} derivations proved with sympy (max numeric error {fmt(v.get('max_err'))}); "
            f"smollm2 real activations, INT4: median measured D_proj/D_quant = {fmt(r4)} "
            f"(headline 768: real coordinates are not uniform on their range), "
            f"measured/exact-prediction median {fmt(e4)}; the exact data-dependent prediction is "
            f"within 10% of the Monte-Carlo expected damage for {pct(w4)} of (layer, head, "
            f"direction) and of one actual rounding for {pct(w4r)}")
    verdict = HOLDS if ok and r4 is not None and r4 > 1 else (FAILS if v else UNTESTABLE)
    rows.append(Claim("C6", "Projection damage exceeds quantization damage by 3·2^(2b) per direction "
                      "(Fisher metric)", "3·2^(2b) = 768 at INT4", meas, verdict,
                      "holds if every derivation is proved and checked numerically (< 1e-9) and the "
                      "measured ratio on real activations exceeds 1 (its size is data-dependent: "
                      "compare with the exact prediction)", _src(saved, "verify", "bound_check")))
    # C7 -----------------------------------------------------------------------------
    rows.append(_c7(a, saved))
    # C8 -----------------------------------------------------------------------------
    red, dppl = b.get("c8_int4-kivi_reduction"), b.get("c8_int4-kivi_dppl")
    red2, dppl2 = b.get("c8_int4_reduction"), b.get("c8_int4_dppl")
    if red is not None or red2 is not None:
        meas = (f"smollm2 K+V int4-kivi: {pct(red)} reduction with scales counted, ΔPPL {fmt(dppl)}; "
                f"int4 per-token: {pct(red2)}, ΔPPL {fmt(dppl2)} (75% ignores the scales)")
        verdict = UNTESTABLE + " (Mistral 7B); on smollm2: " + (HOLDS if (red or 0) >= 0.7 else FAILS)
    else:
        meas, verdict = "budget stage not run", UNTESTABLE
    rows.append(Claim("C8", "Joint K+V INT4 gives 75% KV reduction", "+0.18 PPL on Mistral 7B", meas,
                      verdict, "the Mistral number needs its weights; on smollm2 holds if the reduction "
                      "with scale overhead counted is ≥ 70%", _src(saved, "budget")))
    return rows


def _matched_gaps(saved: dict) -> list:
    if "budget" not in saved:
        return []
    res = saved["budget"]["result"]
    target = "kv" if "kv" in res["matched"] else next(iter(res["matched"]), None)
    return [m.get("gap_rank") for m in res["matched"].get(target, [])] if target else []


def _excess(obs: float, ind: float, n: float | int) -> tuple[float, float]:
    """Observed / independent co-flip rate and the half-width of its binomial 95% interval
    (positions taken as independent, which narrows the interval: the rule errs towards "seen").

    >>> tuple(round(x, 4) for x in _excess(0.5, 0.25, 100))
    (2.0, 0.392)
    """
    return obs / ind, 1.96 * math.sqrt(obs * (1 - obs) / n) / ind


def _c3(f: dict, saved: dict) -> Claim:
    spec = f.get("smollm2-135m.matched_rank_int4")
    get = {g: {k: f.get(f"smollm2-135m.{spec}.coflip_{g}.{k}") for k in ("observed", "independent", "n")}
           for g in ("gqa", "control")}
    mspec = f.get("minilm-l6.matched_rank_int4")
    mobs = f.get(f"minilm-l6.{mspec}.coflip_control.observed")
    mind = f.get(f"minilm-l6.{mspec}.coflip_control.independent")
    if all(v is not None for g in get.values() for v in g.values()):
        (rg, eg), (rc, ec) = (_excess(g["observed"], g["independent"], g["n"]) for g in get.values())
        meas = (f"one model per attention type only. Mechanism on smollm2 ({spec}, INT4 storage): "
                f"≥2 of 3 query heads of one KV head flip together at {pct(get['gqa']['observed'])} "
                f"of positions vs {pct(get['gqa']['independent'])} if independent (× {rg:.3f} ± "
                f"{eg:.3f}); control groups of 3 heads with separate KV heads: × {rc:.3f} ± {ec:.3f}; "
                f"minilm (MHA, {mspec}): {pct(mobs)} vs {pct(mind)}")
        seen = rg - eg > rc + ec
        verdict = PARTLY + (": mechanism seen" if seen else ": mechanism not distinguishable "
                            "from the control")
    else:
        meas, verdict = "flip study not run", UNTESTABLE
    return Claim("C3", "The gap grows with GQA aggressiveness", "–", meas, verdict,
                 "needs several GQA ratios for the trend (not testable with one GQA model); the "
                 "mechanism (one KV direction serves several query heads) is seen if the co-flip "
                 "excess over independence within a KV head's query group exceeds that of control "
                 "groups of heads with separate KV heads, beyond both 95% intervals",
                 _src(saved, "flip_study"))


def _c4(t: dict, saved: dict) -> Claim:
    fp, i4, rk = (t.get(f"lambada_{s}_acc") for s in ("fp", "int4", "rank16-pca"))
    if fp is not None and i4 is not None and rk is not None:
        kivi = t.get("lambada_int4-kivi_acc")
        meas = (f"smollm2 LAMBADA ({fmt(t.get('lambada_n_passages'))} passages), K+V: accuracy fp "
                f"{pct(fp)}, INT4 per-token {pct(i4)} (target-word ΔPPL "
                f"{fmt(t.get('lambada_int4_dppl'))}), INT4 KIVI {pct(kivi)} (ΔPPL "
                f"{fmt(t.get('lambada_int4-kivi_dppl'))}), rank-16 PCA at INT4 storage {pct(rk)} "
                f"(target-word PPL {fmt(t.get('lambada_rank16-pca_ppl'))})")
        best = max(i4, kivi if kivi is not None else i4)
        ok = abs(fp - best) <= 0.03 and rk < 0.5 * fp
        verdict = UNTESTABLE + " (Mistral 7B, GPT-2); on smollm2: " + (HOLDS if ok else FAILS)
    else:
        meas, verdict = "tasks stage not run", UNTESTABLE
    return Claim("C4", "LAMBADA: INT4 matches FP16; rank at identical storage collapses",
                 "+0.23 PPL (Mistral 7B), +0.58 (GPT-2); rank-32 → 0.4% accuracy", meas, verdict,
                 "on smollm2 holds if the better INT4 quantizer's accuracy is within 3 points of "
                 "fp and rank-16 (= INT4 storage at d=64) loses more than half of fp's accuracy",
                 _src(saved, "tasks"))


def _c5(f: dict, saved: dict) -> Claim:
    spec = f.get("smollm2-135m.matched_rank_int4")
    fr, fq = f.get(f"smollm2-135m.{spec}.flip_rate"), f.get("smollm2-135m.int4.flip_rate")
    gr, gq = f.get(f"smollm2-135m.{spec}.flip_rate_margin_gt1"), f.get("smollm2-135m.int4.flip_rate_margin_gt1")
    cert = f.get("smollm2-135m.int4.certified")
    kv = {k: f.get(f"smollm2-135m.int4-kivi.{k}") for k in ("flip_rate", "flip_rate_margin_gt1",
                                                             "certified")}
    if fr is not None and fq is not None:
        meas = (f"smollm2 top-1 flip rate, all queries: {spec} {pct(fr)} vs INT4 per-token {pct(fq)} "
                f"(KIVI {pct(kv['flip_rate'])}); margin > 1 logit: {pct(gr)} vs {pct(gq)} (KIVI "
                f"{pct(kv['flip_rate_margin_gt1'])}); queries certified flip-free by the margin "
                f"certificate: INT4 per-token {pct(cert)}, KIVI {pct(kv['certified'])}")
        ok = gr is not None and gq is not None and gr >= 5 * max(gq, 1e-12)
        verdict = HOLDS if ok else FAILS
    else:
        meas, verdict = "flip study not run", UNTESTABLE
    return Claim("C5", "Removing a dimension flips attention routing; quantization noise preserves it",
                 "4.6% vs 0.03% of routing decisions (model not stated)", meas, verdict,
                 "holds if, among queries with a top-1 margin above 1 logit, the matched-storage "
                 "rank flips at least 5× as often as INT4", _src(saved, "flip_study"))


def _c7(a: dict, saved: dict) -> Claim:
    quant = {k: v for k, v in a.items() if k.endswith("_spread") and "_int" in k}
    rank = {k: v for k, v in a.items() if k.endswith("_spread") and "_rank" in k}
    sides = [side for side in ("pre", "post") if f"{side}_rescued" in a]
    if quant and sides:
        worst_q = max(quant.values())
        meas = ("spread of PPL across bases (identity, PCA, 5 random, Hadamard, query-aware): "
                + "; ".join(f"{k[:-7]} {fmt(v)}" for k, v in sorted(quant.items()))
                + " — rank reduction: " + "; ".join(f"{k[:-7]} {fmt(v)}" for k, v in sorted(rank.items()))
                + "; best rank reduction in any basis vs worst quantizer: "
                + "; ".join(f"{side}-RoPE {fmt(a.get(f'{side}_rank_best_ppl'))} "
                            f"({a.get(f'{side}_rank_best_basis')}) vs {fmt(a.get(f'{side}_quant_worst_ppl'))}"
                            for side in sides))
        advantage = all(a[f"{side}_rescued"] == "no" for side in sides)
        verdict = ((HOLDS if advantage else FAILS) + " (advantage in every basis); the paper's "
                   "spread < 0.4 PPL: " + (HOLDS if worst_q < 0.4 else FAILS))
    else:
        meas, verdict = "ablation stage not run", UNTESTABLE
    return Claim("C7", "The advantage does not depend on the basis", "spread < 0.4 PPL", meas, verdict,
                 "the advantage holds if on both RoPE sides no basis lets rank reduction reach the "
                 "worst quantizer's PPL; the paper's number holds if the quantizers' PPL spread "
                 "across bases is < 0.4 on both sides", _src(saved, "ablation"))


def _table(rows: list[Claim]) -> str:
    out = ["| # | claim | paper | measured here | verdict | rule | source |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        out.append(f"| {c.id} | {c.claim} | {c.paper} | {c.measured} | **{c.verdict}** | {c.rule} | {c.source} |")
    return "\n".join(out)


def _summary_tables(s: dict[str, Any]) -> list[str]:
    """A stage summary as Markdown: keys without a dot in a two-column table; dotted keys
    ``row.column`` (split at the last dot) pivoted, one table per set of columns, rows and
    columns in the order they first appear.

    >>> print("\\n".join(_summary_tables({"n": 3, "m.b2.ratio": 2.5, "m.b2.within": 0.5,
    ...                                    "m.b4.ratio": 64.7, "m.b4.within": 0.25, "kl.median": 1})))
    | quantity | value |
    |---|---|
    | n | 3 |
    <BLANKLINE>
    | | ratio | within |
    |---|---|---|
    | m.b2 | 2.5 | 0.5 |
    | m.b4 | 64.7 | 0.25 |
    <BLANKLINE>
    | | median |
    |---|---|
    | kl | 1 |
    """
    flat = {k: v for k, v in s.items() if "." not in k}
    grid: dict[str, dict[str, Any]] = {}
    for k, v in s.items():
        if "." in k:
            row, col = k.rsplit(".", 1)
            grid.setdefault(row, {})[col] = v
    tables: dict[tuple[str, ...], list[str]] = {}
    for row, cells in grid.items():
        tables.setdefault(tuple(cells), []).append(row)
    lines: list[str] = []
    if flat:
        lines += ["| quantity | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in flat.items()]
    for cols, rows in tables.items():
        lines += [""] if lines else []
        lines += ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {r} | " + " | ".join(fmt(grid[r][c]) for c in cols) + " |" for r in rows]
    return lines


def _stage_section(saved: dict, stage: str, title: str, figures: list[Path], names: list[str]) -> str:
    if stage not in saved:
        return f"## {title}\n\nNot run.\n"
    lines = [f"## {title}", "", f"Source: `{Path(saved[stage]['path']).as_posix()}`", ""]
    lines += _summary_tables(_summary(saved, stage))
    for n in names:
        for p in figures:
            if p.suffix == ".png" and p.stem == n:
                lines += ["", f"![{n}]({p.as_posix()})"]
    return "\n".join(lines) + "\n"


SECTIONS = (
    ("bound_check", "The bound on real activations (C6)", ["theory_vs_measured", "fisher_vs_kl"]),
    ("routing", "A discrete routing failure on a real query (C5)", ["routing_failure"]),
    ("flip_study", "Flip rates at matched storage (C3, C5)",
     ["flip_vs_budget", "flip_heatmap", "certified_fraction", "gqa_coflip"]),
    ("budget", "Perplexity against storage (C1, C2, C8)", ["ppl_vs_budget"]),
    ("ablation", "Basis ablation (C7)", ["basis_ablation"]),
    ("tasks", "LAMBADA and the encoder (C4)", ["tasks"]),
    ("predictor", "Damage predictor: Fisher damage against ΔPPL", ["predictor_scatter"]),
)


def _provenance_line(saved: dict, cfg: Any) -> str:
    """Where the saved results came from, read from their own provenance (so the report is a
    function of the result files alone: rerendering it from the same files gives the same text).
    """
    provs = [e["provenance"] for e in saved.values() if isinstance(e.get("provenance"), dict)]
    if not provs:
        return f"Generated by `kvtheory report` (size `{cfg.size}`)."

    def each(key: str) -> str:
        vals = sorted({str(p.get(key, "?")) for p in provs})
        return ", ".join(vals)

    made = sorted(str(p.get("created", "?")) for p in provs)
    return (f"Generated by `kvtheory report` (size `{cfg.size}`) from {len(provs)} result files "
            f"computed {made[0]} to {made[-1]} — kvtheory {each('kvtheory_version')}, git "
            f"{each('git_sha')}, torch {each('torch_version')}, transformers "
            f"{each('transformers_version')}, {each('machine')}.")


def render(saved: dict, cfg: Any, figures: list[Path]) -> str:
    """The whole REPORT.md as a string, a function of ``saved`` (and the figure list) only."""
    rel = [Path(p) for p in figures]
    parts = [
        "# kvtheory report: quantization against rank reduction at matched storage", "",
        _provenance_line(saved, cfg) + " Do not edit by hand: every number below is read from "
        "the result file named beside it (`kvtheory figures` redraws the figures from them).", "",
        "## The paper's claims, tested", "",
        "Claims from arXiv 2604.11501 as listed in `shared/paper/CLAIMS.md`; the verdict rule is "
        "stated in each row.", "", _table(claims(saved)), "",
    ]
    if "verify" in saved:
        parts += ["## Derivations (sympy)", "", "| derivation | statement | symbolic | max numeric error |",
                  "|---|---|---|---|"]
        parts += [f"| {r['name']} | {r['statement']} | {r['symbolic']} | {fmt(r['numeric_max_abs_err'])} |"
                  for r in saved["verify"]["result"]]
        parts.append("")
    for stage, title, names in SECTIONS:
        parts.append(_stage_section(saved, stage, title, rel, names))
    return "\n".join(parts)
