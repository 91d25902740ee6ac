r"""Damage predictor (issue 4 §5): does the mean Fisher damage on captured tensors rank the
methods by their perplexity damage?

For every method :math:`m` of the grid (fp excluded): the predictor is the mean over layers,
query heads and queries of the second-order Fisher damage of compressing the keys,

.. math:: D_m = \operatorname{mean}\ \tfrac12\,\delta^\top F(p)\,\delta, \qquad
          \delta = \tau\,q^\top(\hat k_m - k),\ F(p) = \operatorname{diag}(p) - pp^\top,

measured by :func:`kvtheory.flips.attention_metrics` on a captured post-RoPE window (bases
fitted on disjoint calibration windows, as in the perplexity runs), or read from a flip-study
result (``result["methods"][spec]["mean"]["fisher"]``). The outcome is the measured
:math:`\Delta\mathrm{PPL}_m = \mathrm{PPL}_m - \mathrm{PPL}_{fp}` with the **keys only**
compressed (``target="k"``: the predictor sees keys only; ``"kv"`` is also reported).

Agreement is Spearman's :math:`\rho` (``scipy.stats.spearmanr``, average ranks for ties) with a
percentile bootstrap 95% interval over methods (methods resampled with replacement, seeded
``numpy.random.default_rng``; resamples with a constant side are dropped). The failures are the
methods with the largest rank residual :math:`|\mathrm{rank}(\Delta\mathrm{PPL}) -
\mathrm{rank}(D)|`, each with a reason computed from the data (see :func:`_reason`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._checks import check_choice, check_int
from ..errors import bad_argument
from ..stages import Stage, decoders, register_stage
from .common import method_grid, small

__all__ = ["PredictorConfig", "rankdata", "spearman_ci", "capture_metrics", "run", "plot",
           "summary"]

_METRICS = ("fisher", "kl", "flip_rate", "output_rel_err")


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (a plain re-implementation, for checks).

    >>> rankdata([10.0, 30.0, 20.0, 20.0]).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_ci(x, y, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    r"""Spearman :math:`\rho` of ``x`` and ``y`` and its percentile bootstrap interval over items.

    Returns ``{"rho", "p_value", "ci_low", "ci_high", "n", "n_boot_used"}``.

    >>> r = spearman_ci([1, 2, 3, 4, 5], [2, 4, 6, 8, 10], n_boot=200)
    >>> round(r["rho"], 9), round(r["ci_low"], 9), round(r["ci_high"], 9)
    (1.0, 1.0, 1.0)
    """
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise bad_argument("x", x, "two 1-D sequences of equal length >= 3")
    check_int("n_boot", n_boot, 1)
    rho, p = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        xs, ys = x[idx], y[idx]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        stats.append(spearmanr(xs, ys)[0])
    lo, hi = (np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2]).tolist() if stats
              else (math.nan, math.nan))
    return {"rho": float(rho), "p_value": float(p), "ci_low": float(lo), "ci_high": float(hi),
            "n": int(len(x)), "n_boot_used": len(stats)}


@dataclass(frozen=True)
class PredictorConfig:
    """``methods`` None: :func:`common.method_grid` without fp. Windows as in the budget study
    (same defaults: its evaluations are reused). ``capture_tokens`` None: ``min(seq_len, 256)``
    (the start of the first evaluation window)."""

    model: str = "smollm2-135m"
    seq_len: int = 512
    n_windows: int = 3
    calib_windows: int = 1
    methods: tuple[str, ...] | None = None
    target: str = "k"
    capture_tokens: int | None = None
    n_boot: int = 2000
    ppl_boot: int = 1000
    n_fail: int = 3
    seed: int = 0

    def __post_init__(self):
        from ..compress import parse_method

        if not isinstance(self.model, str) or not self.model:
            raise bad_argument("model", self.model, "a model name or path")
        check_int("seq_len", self.seq_len, 8)
        for name in ("n_windows", "calib_windows", "n_boot", "ppl_boot", "n_fail"):
            check_int(name, getattr(self, name), 1)
        if self.methods is not None:
            if isinstance(self.methods, str) or len(self.methods) < 3:
                raise bad_argument("methods", self.methods, "None or at least 3 specs")
            specs = tuple(str(parse_method(s)) for s in self.methods)
            if "fp" in specs:
                raise bad_argument("methods", self.methods, "compression methods (not fp)")
            object.__setattr__(self, "methods", specs)
        check_choice("target", self.target, ("k", "kv"))
        if self.capture_tokens is not None:
            check_int("capture_tokens", self.capture_tokens, 8)
        check_int("seed", self.seed, 0)

    @classmethod
    def for_size(cls, size: str | None = None, **kw) -> PredictorConfig:
        """The default size, or with ``size="small"`` / ``KVTHEORY_SMALL=1`` a notebook size."""
        if (size or ("small" if small() else "default")) == "small":
            kw = {"seq_len": 128} | kw
        return cls(**kw)


def capture_metrics(model, cap, plan: dict, causal: bool) -> dict:
    """Means over layers and heads of fisher, kl, flip_rate (keys compressed by ``plan``) and
    output_rel_err with keys AND values compressed (``plan[layer] = (keys, values)``), and
    ``fisher_layers``: the per-layer mean Fisher damage (layer order of the capture)."""
    from ..flips import attention_metrics

    acc: dict[str, list[float]] = {m: [] for m in _METRICS}
    for layer in cap.meta.layers:
        q, k, v = (cap[layer][w] for w in "qkv")
        ck, cv = plan[layer]
        m = attention_metrics(q, k, ck(k).to(k.dtype), v, cv(v).to(v.dtype), causal=causal,
                              window=cap.meta.window(layer))
        for f in _METRICS:
            acc[f].append(float(getattr(m, f).mean()))
    return {f: sum(v) / len(v) for f, v in acc.items()} | {"fisher_layers": acc["fisher"]}


def _top_share(layers) -> tuple[int, float] | None:
    """(layer index, share) of the layer holding the largest part of the per-layer Fisher sum."""
    if not layers or sum(layers) <= 0:
        return None
    top = max(range(len(layers)), key=lambda j: layers[j])
    return top, layers[top] / sum(layers)


def _reason(i: int, rows: list[dict], ranks: dict[str, np.ndarray], target: str) -> str:
    r"""Why the Fisher rank of method ``i`` misses its ΔPPL rank, from the measured numbers:
    a near-tie in Fisher (another method within 10%), another metric ranking it where ΔPPL
    does (KL, flip rate), the Fisher/KL ratio outside [2/3, 3/2] (quadratic form beyond its
    regime), damage concentrated in one layer (top layer's share > 1.5× the median share),
    V-dominated damage (target kv, ΔPPL of V alone > of K alone); else errors compounding
    across layers, which a per-layer metric on clean inputs does not see."""
    row = rows[i]
    rf, rp = ranks["fisher"][i], ranks["dppl"][i]
    parts = [f"ΔPPL rank {rp:g} vs Fisher rank {rf:g} of {len(rows)} "
             f"({'under' if rp > rf else 'over'}-predicted)"]
    near = [(abs(r["fisher"] / row["fisher"] - 1), r["spec"]) for j, r in enumerate(rows)
            if j != i and row["fisher"] > 0]
    if near and min(near)[0] < 0.1:
        gap, other = min(near)
        parts.append(f"near-tie in Fisher with {other} ({100 * gap:.1f}% apart)")
    alt = {m: ranks[m][i] for m in ("kl", "flip_rate") if m in ranks}
    better = {m: a for m, a in alt.items() if abs(a - rp) < abs(rf - rp)}
    for m, a in better.items():
        parts.append(f"{m} ranks it {a:g}" + (f" (flip rate {100 * row['flip_rate']:.1f}%: "
                                              "discrete routing changes)" if m == "flip_rate" else ""))
    ratio = row["fisher"] / row["kl"] if row.get("kl") else math.inf
    if ratio > 1.5 or ratio < 1 / 1.5:
        parts.append(f"Fisher/KL = {ratio:.2g}: the quadratic form "
                     f"{'overshoots' if ratio > 1 else 'undershoots'} the exact KL")
    shares = [s for r in rows if (s := _top_share(r.get("fisher_layers"))) is not None]
    mine = _top_share(row.get("fisher_layers"))
    if mine is not None and shares:
        med = float(np.median([s[1] for s in shares]))
        if mine[1] > 1.5 * med:
            parts.append(f"Fisher concentrated in layer {mine[0]} ({100 * mine[1]:.0f}% of the "
                         f"per-layer sum; median over methods {100 * med:.0f}%)")
    if target == "kv" and row.get("dppl_v") is not None and row["dppl_v"] > row["dppl_k"]:
        parts.append(f"V-dominated (ΔPPL V only {row['dppl_v']:.3g} > K only {row['dppl_k']:.3g}), "
                     "invisible to a key-only Fisher metric")
    if len(parts) == 1:
        parts.append("no captured-tensor metric explains it: per-layer metrics on clean inputs do "
                     "not see errors compounding across layers")
    return "; ".join(parts)


def run(cfg: PredictorConfig | None = None, *, flip_result: dict | None = None,
        budget_result: dict | None = None, data_dir=None, root=None, progress: bool = True) -> dict:
    """Fisher damage against ΔPPL per method, Spearman ρ with its bootstrap interval.

    ``flip_result``: a flip-study result; its ``methods[spec]["mean"]`` supplies fisher, kl and
    flip_rate where present. ``budget_result``: a budget result whose points supply PPL.

    Keys: model, target, seq_len, n_windows, fp_ppl, fisher_source {spec: "flip_study" |
    "capture"}, rows [{spec, family, bits, fisher, fisher_layers (per layer, or None), kl,
    flip_rate, output_rel_err, dppl, dppl_k, dppl_v, dppl_kv, rank_fisher, rank_dppl, residual}], spearman (spearman_ci of fisher vs
    dppl), spearman_alt {metric: spearman_ci vs dppl}, spearman_kv (fisher vs ΔPPL K+V),
    failures [{spec, residual, reason}], seconds.
    """
    from ..ledger import bits_per_element
    from ..plotstyle import family
    from ..engine import eval_windows, fitted_plan, ppl_point
    from .common import get_model, load_or_capture

    cfg = cfg or PredictorConfig.for_size()
    t0 = time.perf_counter()
    lm = get_model(cfg.model)
    d = lm.info.d
    methods = list(cfg.methods) if cfg.methods else [m for m in method_grid(d) if m != "fp"]
    ev, cal = eval_windows(cfg.model, cfg.seq_len, cfg.n_windows, cfg.calib_windows, data_dir)
    kw = dict(windows=ev, calibration=cal, n_boot=cfg.ppl_boot, seed=cfg.seed, root=root)
    saved = {}
    if budget_result is not None and budget_result.get("seq_len") == cfg.seq_len:
        saved = {(p["spec"], p["target"]): p["ppl"] for p in budget_result["points"]}
    fp = (budget_result["fp"]["value"] if saved else ppl_point(lm, cfg.model, "fp", "kv", **kw)["value"])

    def dppl(spec, target):
        if (spec, target) in saved:
            return saved[(spec, target)] - fp
        return ppl_point(lm, cfg.model, spec, target, **kw)["value"] - fp

    flips = (flip_result or {}).get("methods", {})
    cap = None
    rows, source = [], {}
    from tqdm.auto import tqdm

    for spec in tqdm(methods, desc="predictor", disable=not progress, leave=False):
        mean = flips.get(spec, {}).get("mean", {})
        if "fisher" in mean:
            met = {f: mean.get(f) for f in _METRICS}
            per_head = flips[spec].get("per_head", {}).get("fisher")
            met["fisher_layers"] = [float(np.mean(h)) for h in per_head] if per_head else None
            source[spec] = "flip_study"
        else:
            if cap is None:
                cap = load_or_capture(cfg.model, cfg.capture_tokens or min(cfg.seq_len, 256),
                                      data_dir=data_dir, root=root)
            vspec = spec if "qaware" not in spec else "fp"
            plan = fitted_plan(lm, cfg.model, spec, vspec, calibration=cal)
            met = capture_metrics(lm.model, cap, plan, lm.info.causal)
            source[spec] = "capture"
        row = {"spec": spec, "family": family(spec), "bits": bits_per_element(spec, d, cfg.seq_len),
               **met, "dppl_k": dppl(spec, "k"), "dppl_v": dppl(spec, "v"), "dppl_kv": dppl(spec, "kv")}
        row["dppl"] = row[f"dppl_{cfg.target}"]
        rows.append(row)
    x = [r["fisher"] for r in rows]
    y = [r["dppl"] for r in rows]
    sp = spearman_ci(x, y, n_boot=cfg.n_boot, seed=cfg.seed)
    alt = {m: spearman_ci([r[m] for r in rows], y, n_boot=cfg.n_boot, seed=cfg.seed)
           for m in ("kl", "flip_rate", "output_rel_err") if all(r.get(m) is not None for r in rows)}
    sp_kv = spearman_ci(x, [r["dppl_kv"] for r in rows], n_boot=cfg.n_boot, seed=cfg.seed)
    ranks = {"fisher": rankdata(x), "dppl": rankdata(y)}
    ranks |= {m: rankdata([r[m] for r in rows]) for m in ("kl", "flip_rate") if m in alt}
    for i, r in enumerate(rows):
        r["rank_fisher"], r["rank_dppl"] = float(ranks["fisher"][i]), float(ranks["dppl"][i])
        r["residual"] = r["rank_dppl"] - r["rank_fisher"]
    worst = sorted(range(len(rows)), key=lambda i: -abs(rows[i]["residual"]))[:cfg.n_fail]
    failures = [{"spec": rows[i]["spec"], "residual": rows[i]["residual"],
                 "reason": _reason(i, rows, ranks, cfg.target)}
                for i in worst if rows[i]["residual"] != 0]
    return {"model": cfg.model, "target": cfg.target, "seq_len": cfg.seq_len,
            "n_windows": int(ev.shape[0]), "fp_ppl": fp, "fisher_source": source, "rows": rows,
            "spearman": sp, "spearman_alt": alt, "spearman_kv": sp_kv, "failures": failures,
            "seconds": time.perf_counter() - t0}


def summary(result: dict) -> dict[str, float | str]:
    """ρ (Fisher vs ΔPPL) with its 95% interval and p-value, n methods, ρ of the alternative
    predictors, ρ against ΔPPL of K+V, and the failing methods."""
    s = result["spearman"]
    out: dict[str, float | str] = {"rho": s["rho"], "rho_ci_low": s["ci_low"],
                                   "rho_ci_high": s["ci_high"], "rho_p_value": s["p_value"],
                                   "n_methods": float(s["n"]), "target": result["target"],
                                   "rho_kv": result["spearman_kv"]["rho"]}
    for m, a in result["spearman_alt"].items():
        out[f"rho_{m}"] = a["rho"]
    out["failures"] = ", ".join(f["spec"] for f in result["failures"]) or "none"
    return out


def _place_labels(ax, xs, ys, texts, fontsize: float = 4.5, fallback: bool = True) -> None:
    """Greedy label placement: points closer than 4 px share one label ("a = b"); each label
    (largest y first) takes the first offset, nearest first in eight directions, whose box
    stays inside the axes, overlaps no point and no label placed before and lies clearly nearer
    its own point than any other; labels away from their point get a thin leader line. Without
    ``fallback`` a label with no such place is left out, else it goes at (5, 3) points."""
    import math as _m

    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(list(zip(xs, ys)))
    groups: list[list[int]] = []   # points closer than 4 px share one label
    for j in range(len(xs)):
        for g in groups:
            if _m.dist(pts[g[0]], pts[j]) < 4:
                g.append(j)
                break
        else:
            groups.append([j])
    dots = [(px - 4, py - 4, px + 4, py + 4) for px, py in pts]
    cands = [(r * _m.cos(a), r * _m.sin(a)) for r in (5, 12, 20, 30, 42, 56)
             for a in (_m.radians(d) for d in (30, -30, 150, -150, 90, -90, 0, 180, 60, -60, 120, -120))]
    placed: list = []

    def gap(box, q) -> float:
        return _m.hypot(max(box.x0 - q[0], 0, q[0] - box.x1), max(box.y0 - q[1], 0, q[1] - box.y1))

    def free(box, own: list[int]) -> bool:
        """Inside the axes, clear of labels and points, and nearer its own point than any other."""
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        others = [gap(box, pts[i]) for i in range(len(xs)) if i not in own]
        return bool(inside and not any(box.overlaps(b) for b in placed)
                and not any(box.x0 < x1 and x0 < box.x1 and box.y0 < y1 and y0 < box.y1
                            for x0, y0, x1, y1 in dots)
                and (not others or 2 * gap(box, pts[own[0]]) + 4 < min(others)))

    for g in sorted(groups, key=lambda g: -ys[g[0]]):
        j, text = g[0], " = ".join(texts[i] for i in g)
        for k, (dx, dy) in enumerate(cands + [(5, 3)]):
            ha = "left" if dx > 1 else "right" if dx < -1 else "center"
            va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
            far = dx * dx + dy * dy > 40
            t = ax.annotate(text, (xs[j], ys[j]), xytext=(dx, dy), textcoords="offset points",
                            fontsize=fontsize, ha=ha, va=va,
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.3",
                                        "shrinkA": 0, "shrinkB": 2} if far else None)
            t.update_positions(renderer)
            box = Text.get_window_extent(t, renderer)  # the text alone, not its leader line
            if free(box, g) or (fallback and k == len(cands)):
                placed.append(box)
                break
            t.remove()


def plot(result: dict, out_dir) -> list[Path]:
    """``predictor_scatter``: (top) |ΔPPL| (log) against mean Fisher damage (log), one point per
    method coloured by family (open marker: ΔPPL < 0), labelled where a label fits without
    ambiguity; (bottom) rank of ΔPPL against rank of Fisher with every method labelled and the
    diagonal of a perfect prediction. The largest rank residuals are ringed; ρ and its 95%
    interval in the title."""
    from ..plotstyle import COLORS, COLUMN_WIDTH, new_figure, save_figure, style

    rows = result["rows"]
    fails = {f["spec"] for f in result["failures"]}
    s = result["spearman"]
    floor = 1e-4
    with style():
        fig, (ax, bx) = new_figure(COLUMN_WIDTH, 1.55, nrows=2,
                                   gridspec_kw={"height_ratios": [1.0, 1.05]})
        xs, ys = [], []
        for r in rows:
            fam, y = r["family"], max(abs(r["dppl"]), floor)
            col = COLORS.get(fam, COLORS["other"])
            for a, (px, py) in ((ax, (r["fisher"], y)), (bx, (r["rank_fisher"], r["rank_dppl"]))):
                a.scatter(px, py, s=14, zorder=3, color=col if r["dppl"] >= 0 else "white",
                          edgecolors=col, linewidths=0.8)
                if r["spec"] in fails:
                    a.scatter(px, py, s=60, facecolors="none", edgecolors="k", lw=0.7, zorder=2)
            bx.annotate(r["spec"], (r["rank_fisher"], r["rank_dppl"]), xytext=(5, 0),
                        textcoords="offset points", fontsize=5, va="center")
            xs.append(r["fisher"])
            ys.append(y)
        for fam in dict.fromkeys(r["family"] for r in rows):
            ax.scatter([], [], s=14, color=COLORS.get(fam, COLORS["other"]), label=fam)
        if fails:
            ax.scatter([], [], s=60, facecolors="none", edgecolors="k", lw=0.7,
                       label="largest rank residual")
        if any(r["dppl"] < 0 for r in rows):
            ax.scatter([], [], s=14, color="white", edgecolors="k", linewidths=0.8, label="ΔPPL < 0")
        ax.set_xscale("log")
        ax.set_yscale("log")
        tgt = {"k": "keys only", "kv": "keys + values"}[result["target"]]
        ax.set_xlabel(r"mean Fisher damage $\frac{1}{2}\delta^\top F\delta$ (nats, log)")
        ax.set_ylabel(f"|ΔPPL| vs fp16, {tgt}")
        ax.set_title(f"Spearman ρ = {s['rho']:.2f} [95% CI {s['ci_low']:.2f}, {s['ci_high']:.2f}], "
                     f"n = {s['n']} methods", loc="left", pad=2)
        ax.legend(loc="upper left", fontsize=6)
        ax.margins(x=0.15, y=0.15)
        n = len(rows)
        bx.plot([0.5, n + 0.5], [0.5, n + 0.5], color=COLORS["other"], lw=0.8, ls="--",
                label="perfect prediction")
        bx.set_xlim(0.5, n + 3.5)
        bx.set_xticks(range(1, n + 1, 2))
        bx.set_yticks(range(1, n + 1, 2))
        bx.set_ylim(0.5, n + 0.5)
        bx.set_xlabel("rank of mean Fisher damage (1 = least)")
        bx.set_ylabel("rank of ΔPPL")
        bx.legend(loc="lower right", fontsize=6)
        fig.tight_layout()
        ax.set_xlim(ax.get_xlim())  # freeze the geometry the labels are placed in
        ax.set_ylim(ax.get_ylim())
        _place_labels(ax, xs, ys, [r["spec"] for r in rows], fallback=False)
        return save_figure(fig, out_dir, "predictor_scatter")


def plot_models(results: dict, out_dir) -> list[Path]:
    """``predictor_scatter-<model>`` for each model of ``{model: result}``."""
    from ..plotstyle import model_stamp, per_model

    return per_model(plot, results, out_dir, lambda m, r: model_stamp(
        m, f"target {r['target']}, {r['n_windows']}×{r['seq_len']} tokens"))


def _run_stage(cfg: PredictorConfig, *, flip_study_result: dict | None = None,
               budget_result: dict | None = None, **kw) -> dict:
    return run(cfg, flip_result=flip_study_result, budget_result=budget_result, **kw)


STAGE = register_stage(Stage(
    name="predictor", title="Damage predictor: Fisher damage against ΔPPL",
    configure=lambda size, model: PredictorConfig.for_size(size, model=model),
    run=_run_stage, summary=summary, plot=plot_models, figures=("predictor_scatter",),
    needs=("flip_study", "budget"), applies=decoders))
