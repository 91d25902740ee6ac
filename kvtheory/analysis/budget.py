r"""Storage-budget curves (issue 4 §4): WikiText-2 perplexity against bits per cached element.

Every method of the grid (``int{b}``, ``int{b}-kivi`` for b = 2, 3, 4, 8; PCA ranks
d/8..3d/4 and the ranks matched to each quantizer; hybrids) is evaluated with three targets:
keys only (``k``), values only (``v``) and both (``kv``), on the same windows. Its storage
comes from :func:`kvtheory.ledger.bits_per_element` with the real token count (the window
length ``L``: the basis of rank methods is amortised over the ``L`` cached tokens, KIVI keys
use :math:`\lceil L/128\rceil` groups); for ``kv`` it is the mean of the key and value bits
(the cache holds as many key as value elements):

.. math:: b_{kv} = \tfrac12\,(b_k + b_v), \qquad \text{reduction} = 1 - b/16.

**Matched storage (C1/C2).** At the budget :math:`B` of each plain quantizer ``int{b}``
(:math:`b + 32/d` bits), the best evaluated quantizer, rank method and hybrid with bits
:math:`\le B` are compared: gap = PPL(best rank) − PPL(best quantizer) (likewise for hybrids).

**Shared evaluations.** Every perplexity comes from :func:`kvtheory.engine.ppl_point` (memoised
per model, specs, RoPE side, ids, n_boot and seed; on disk under ``root/cache/ppl``), with bases
fitted once per (model, basis, RoPE side, calibration ids) by :func:`kvtheory.engine.fitted_plan`;
:mod:`.ablation`, :mod:`.predictor` and :mod:`.tasks` use the same engine.

Calibration windows come from the END of the corpus, evaluation windows from its start
(:func:`kvtheory.evaluate.split_windows`): they never share a token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .._checks import check_choice, check_int
from ..errors import bad_argument
from ..engine import CALLS, eval_windows, ppl_point, storage_bits
from ..stages import Stage, decoders, register_stage
from .common import hybrid_specs, rank_specs, small
from .gqa import at_budget as _at_budget, log_ratio as _log_ratio, plot_gap_vs_gqa

__all__ = ["BudgetConfig", "matched_gaps", "run", "plot", "summary", "TARGETS"]

TARGETS = ("k", "v", "kv")
_TARGET_NAMES = {"k": "K only", "v": "V only", "kv": "K + V"}


def _default_methods(d: int, tokens: int, bits: tuple[int, ...]) -> list[str]:
    """Quantizers at ``bits``, PCA ranks d/8..3d/4 plus the ranks matched to each ``int{b}``,
    the hybrids of :func:`common.hybrid_specs` plus those matched to INT4 (4 and 8 bits)."""
    from ..ledger import bits_per_element, matched

    quant = [s for b in bits for s in (f"int{b}", f"int{b}-kivi")]
    ranks = rank_specs(d)
    hybrids = hybrid_specs(d)
    for b in bits:
        for s in matched(bits_per_element(f"int{b}", d, tokens), d, tokens, hybrid_bits=(4, 8)):
            if s.family == "rank":
                ranks.append(s.spec)
            elif s.family == "hybrid" and b == 4 and not s.spec.startswith(f"rank{d}x"):
                hybrids.append(s.spec)
    rank_of = lambda s: int(s.split("-")[0][4:].split("x")[0])  # noqa: E731
    return quant + sorted(dict.fromkeys(ranks), key=rank_of) + list(dict.fromkeys(hybrids))


@dataclass(frozen=True)
class BudgetConfig:
    """``seq_len`` tokens per window, ``n_windows`` evaluation windows from the start of
    WikiText-2, ``calib_windows`` from its end; ``methods`` None: the default grid at the
    model's d (see :func:`_default_methods`). Default size: 3 windows × 512 tokens (a CPU
    budget; see the report), ``small``: 1 × 128 and a short grid."""

    model: str = "smollm2-135m"
    seq_len: int = 512
    n_windows: int = 3
    calib_windows: int = 1
    methods: tuple[str, ...] | None = None
    bits: tuple[int, ...] = (2, 3, 4, 8)
    targets: tuple[str, ...] = TARGETS
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        from ..compress import parse_method

        if not isinstance(self.model, str) or not self.model:
            raise bad_argument("model", self.model, "a model name or path")
        check_int("seq_len", self.seq_len, 8)
        check_int("n_windows", self.n_windows, 1)
        check_int("calib_windows", self.calib_windows, 1)
        if self.methods is not None:
            if isinstance(self.methods, str) or not self.methods:
                raise bad_argument("methods", self.methods, "None or a non-empty tuple of specs")
            object.__setattr__(self, "methods", tuple(str(parse_method(s)) for s in self.methods))
        if isinstance(self.bits, (int, str)) or not self.bits:
            raise bad_argument("bits", self.bits, "a non-empty tuple of bit widths")
        object.__setattr__(self, "bits", tuple(check_int("bits", b, 1, 16) for b in self.bits))
        tg = self.targets
        if isinstance(tg, str) or not tg or len(set(tg)) != len(tg):
            raise bad_argument("targets", self.targets, "a non-empty subset of k, v, kv")
        object.__setattr__(self, "targets", tuple(check_choice("targets", t, TARGETS)
                                                  for t in self.targets))
        check_int("n_boot", self.n_boot, 1)
        check_int("seed", self.seed, 0)

    @classmethod
    def for_size(cls, size: str | None = None, **kw) -> BudgetConfig:
        """The default size, or with ``size="small"`` / ``KVTHEORY_SMALL=1`` a notebook size."""
        if (size or ("small" if small() else "default")) == "small":
            kw = {"seq_len": 128, "methods": ("int8", "int4", "int4-kivi", "int2-kivi",
                                              "rank16-pca", "rank32-pca", "rank32x8-pca")} | kw
        return cls(**kw)


def matched_gaps(points: list[dict], target: str, budget: float) -> dict:
    """Best evaluated quantizer, rank and hybrid with ``bits <= budget`` (+1e-9) on ``target``,
    and the gaps PPL(rank) − PPL(quant), PPL(hybrid) − PPL(quant) (None when a family has no
    method within the budget).

    >>> pts = [{"spec": "int4", "family": "quant", "target": "kv", "bits": 4.5, "ppl": 10.0},
    ...        {"spec": "rank16-pca", "family": "rank", "target": "kv", "bits": 4.5, "ppl": 90.0}]
    >>> g = matched_gaps(pts, "kv", 4.5); g["quant"]["spec"], g["gap_rank"], g["gap_hybrid"]
    ('int4', 80.0, None)
    """
    best = {}
    for fam, members in (("quant", ("quant", "kivi")), ("rank", ("rank",)), ("hybrid", ("hybrid",))):
        cand = [p for p in points if p["target"] == target and p["family"] in members
                and p["bits"] <= budget + 1e-9]
        best[fam] = None if not cand else {k: min(cand, key=lambda p: p["ppl"])[k]
                                           for k in ("spec", "bits", "ppl")}
    q = best["quant"]
    gap = {f"gap_{f}": (None if q is None or best[f] is None else best[f]["ppl"] - q["ppl"])
           for f in ("rank", "hybrid")}
    return {"budget": budget, **best, **gap}


def run(cfg: BudgetConfig | None = None, *, data_dir=None, root=None, progress: bool = True) -> dict:
    """PPL against storage for every (method, target); plain JSON values.

    Keys: model, d, seq_len, n_windows, calib_windows, n_tokens (predicted tokens), fp (Score
    dict), points [{spec, family, target, bits, ppl, ci_low, ci_high, dppl}], matched
    {target: [matched_gaps at each int{b} budget]}, c8 {spec: {bits_kv, reduction,
    nominal_reduction, ppl, dppl}} for joint K+V INT4, evaluations (new evaluations run), seconds.
    """
    from ..ledger import bits_per_element
    from ..plotstyle import family
    from .common import get_model

    cfg = cfg or BudgetConfig.for_size()
    t0 = time.perf_counter()
    lm = get_model(cfg.model)
    d = lm.info.d
    ev, cal = eval_windows(cfg.model, cfg.seq_len, cfg.n_windows, cfg.calib_windows, data_dir)
    methods = list(cfg.methods) if cfg.methods else _default_methods(d, cfg.seq_len, cfg.bits)
    kw = dict(windows=ev, calibration=cal, n_boot=cfg.n_boot, seed=cfg.seed, root=root)
    before = sum(CALLS.values())
    fp = ppl_point(lm, cfg.model, "fp", "kv", **kw)
    points = []
    from tqdm.auto import tqdm

    jobs = [(t, s) for t in cfg.targets for s in methods]
    for target, spec in tqdm(jobs, desc="budget", disable=not progress, leave=False):
        sc = ppl_point(lm, cfg.model, spec, target, **kw)
        points.append({"spec": spec, "family": family(spec), "target": target,
                       "bits": storage_bits(spec, target, d, cfg.seq_len), "ppl": sc["value"],
                       "ci_low": sc["ci_low"], "ci_high": sc["ci_high"],
                       "dppl": sc["value"] - fp["value"]})
    matched = {t: [matched_gaps(points, t, bits_per_element(f"int{b}", d, cfg.seq_len))
                   | {"quant_bits": b} for b in cfg.bits] for t in cfg.targets}
    c8 = {}
    for p in points:
        if p["target"] == "kv" and p["spec"] in ("int4", "int4-kivi"):
            c8[p["spec"]] = {"bits_kv": p["bits"], "reduction": 1 - p["bits"] / 16,
                             "nominal_reduction": 1 - 4 / 16, "ppl": p["ppl"], "dppl": p["dppl"]}
    return {"model": cfg.model, "d": d, "q_heads": lm.info.q_heads, "kv_heads": lm.info.kv_heads,
            "seq_len": cfg.seq_len, "n_windows": int(ev.shape[0]),
            "calib_windows": cfg.calib_windows, "n_tokens": fp["n_tokens"], "fp": fp,
            "points": points, "matched": matched, "c8": c8,
            "evaluations": sum(CALLS.values()) - before, "seconds": time.perf_counter() - t0}


def summary(result: dict) -> dict[str, float | str]:
    """Headline numbers: fp PPL; at the INT4 budget for K+V (else the first target) the best
    quantizer, rank and hybrid with their PPL and the gaps (C1, C2); C8's K+V INT4 reduction and
    ΔPPL (KIVI and per-token)."""
    out: dict[str, float | str] = {"fp_ppl": result["fp"]["value"],
                                   "n_tokens": float(result["n_tokens"])}
    target = "kv" if "kv" in result["matched"] else next(iter(result["matched"]))
    m = _at_budget(result, target, 4)
    if m is not None:
        out["int4_budget_bits"] = m["budget"]
        out["int4_budget_target"] = target
        for fam in ("quant", "rank", "hybrid"):
            if m[fam] is not None:
                out[f"int4_budget_best_{fam}"] = m[fam]["spec"]
                out[f"int4_budget_best_{fam}_ppl"] = m[fam]["ppl"]
        for g in ("gap_rank", "gap_hybrid"):
            if m[g] is not None:
                out[f"int4_budget_{g}"] = m[g]
        lr = _log_ratio(result, target, m)
        if lr is not None:
            out["int4_budget_log_ratio"] = lr[0]
            if lr[1] is not None:
                out["int4_budget_log_ratio_ci_low"], out["int4_budget_log_ratio_ci_high"] = lr[1:]
    if "kv_heads" in result:
        out["gqa_group"] = float(result["q_heads"] // result["kv_heads"])
    for row in result["matched"].get(target, []):
        out[f"matched.int{row['quant_bits']}.budget_bits"] = row["budget"]
        out[f"matched.int{row['quant_bits']}.gap_rank"] = row["gap_rank"]
        out[f"matched.int{row['quant_bits']}.gap_hybrid"] = row["gap_hybrid"]
    for spec, c in result["c8"].items():
        out[f"c8_{spec}_reduction"] = c["reduction"]
        out[f"c8_{spec}_dppl"] = c["dppl"]
    return out


def plot(result: dict, out_dir) -> list[Path]:
    """``ppl_vs_budget``: PPL (log) against bits per element, one panel per target, one line per
    method family (hybrids: one per coefficient bit width), the fp16 PPL dashed and the INT4
    budget dotted."""
    from ..plotstyle import COLORS, COLUMN_WIDTH, new_figure, save_figure, series_label, style
    from ..plotstyle import series as spec_series

    def series(p: dict) -> tuple[str, str]:
        """(family, series) from the spec: hybrids form one series per coefficient bit width."""
        return spec_series(p["spec"], p["family"])

    markers = {"quant": "o", "kivi": "s", "rank": "^"}
    names = list(dict.fromkeys(series(p) for p in result["points"]))
    order = {f: i for i, f in enumerate(("quant", "kivi", "rank", "hybrid"))}
    names.sort(key=lambda fs: (order.get(fs[0], 9), fs[1]))
    targets = [t for t in TARGETS if any(p["target"] == t for p in result["points"])]
    with style():
        fig, axes = new_figure(COLUMN_WIDTH, 0.5 * len(targets) + 0.25, nrows=len(targets),
                               sharex=True, squeeze=False, layout="constrained")
        ppls = [p["ppl"] for p in result["points"]] + [result["fp"]["value"]]
        lo, hi = min(ppls), max(ppls)
        for ax, t in zip(axes[:, 0], targets):
            for fam, name in names:
                pts = sorted((p for p in result["points"]
                              if p["target"] == t and series(p) == (fam, name)), key=lambda p: p["bits"])
                if not pts:
                    continue
                label = series_label(pts[0]["spec"], fam)
                style_kw = {"marker": markers.get(fam, "o"), "ls": "-", "label": label}
                if fam == "hybrid":
                    b = name.split("x")[1]
                    style_kw = {"marker": "D", "ls": "-." if b == "4" else "-",
                                "label": label, "mfc": "white" if b == "4" else None}
                ax.plot([p["bits"] for p in pts], [p["ppl"] for p in pts], ms=3.5,
                        color=COLORS.get(fam, COLORS["other"]), **style_kw)
            if t == "v" and any(p["family"] == "kivi" for p in result["points"]):
                ax.text(0.99, 0.95, "values: KIVI = per-token INT-b", transform=ax.transAxes,
                        ha="right", va="top", fontsize=6, color=COLORS["kivi"])
            ax.axhline(result["fp"]["value"], color=COLORS["fp"], ls="--", lw=0.8, label="fp16")
            m = _at_budget(result, t, 4)
            if m is not None:
                ax.axvline(m["budget"], color=COLORS["other"], ls=":", lw=0.8,
                           label=f"INT4 budget ({m['budget']:g} bits)")
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.15, hi * 1.3)
            ax.set_ylabel("PPL (log)")
            ax.set_title(f"{_TARGET_NAMES[t]} compressed", loc="left", pad=2)
        axes[-1, 0].set_xlabel("storage (bits per element, scales and basis counted)")
        axes[-1, 0].set_xlim(1.5, 16.5)
        axes[-1, 0].set_xticks([2, 3, 4, 6, 8, 12, 16])
        h, lab = axes[0, 0].get_legend_handles_labels()
        fig.legend(h, lab, loc="outside lower center", ncol=2)
        fig.suptitle(f"{result['model']}: WikiText-2 PPL vs KV storage "
                     f"({result['n_windows']}×{result['seq_len']} tokens)")
        return save_figure(fig, out_dir, "ppl_vs_budget")


def plot_models(results: dict, out_dir) -> list[Path]:
    """``ppl_vs_budget-<model>`` for each model, and ``gap_vs_gqa`` across models (C3)."""
    from ..plotstyle import model_stamp, per_model

    paths = per_model(plot, results, out_dir, lambda m, r: model_stamp(
        m, f"WikiText-2 {r['n_windows']}×{r['seq_len']} tokens"))
    return paths + plot_gap_vs_gqa(results, out_dir)


STAGE = register_stage(Stage(
    name="budget", title="Perplexity against storage",
    configure=lambda size, model: BudgetConfig.for_size(size, model=model),
    run=run, summary=summary, plot=plot_models, figures=("ppl_vs_budget", "gap_vs_gqa"),
    claims=("C1", "C2", "C3", "C8"), applies=decoders))
