r"""The C3 figure: the rank-versus-quantization gap at matched storage against the GQA group.

For each decoder of the report, the budget study gives the best rank reduction and the best
quantizer within the INT4 budget (K+V); the gap is drawn as the PPL ratio
:math:`\mathrm{PPL}_{rank}/\mathrm{PPL}_{quant}` (scale-free: the models' fp perplexities
differ) with its conservative 95% interval, against the number of query heads per KV head.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["at_budget", "log_ratio", "gap_points", "plot_gap_vs_gqa"]


def at_budget(result: dict, target: str, b: int) -> dict | None:
    rows = [m for m in result["matched"].get(target, []) if m.get("quant_bits") == b]
    return rows[0] if rows else None


def log_ratio(result: dict, target: str, m: dict) -> tuple | None:
    r""":math:`\ln(\mathrm{PPL}_{rank}/\mathrm{PPL}_{quant})` of the best rank and quantizer at a
    matched budget, with a conservative 95% interval from the two PPL intervals
    (:math:`[\ln r_{lo} - \ln q_{hi},\ \ln r_{hi} - \ln q_{lo}]`); scale-free, so models of
    different baseline PPL can be compared (C3).

    >>> res = {"points": [{"spec": "int4", "target": "kv", "ppl": 10.0, "ci_low": 9.0, "ci_high": 11.0},
    ...        {"spec": "rank16-pca", "target": "kv", "ppl": 20.0, "ci_low": 18.0, "ci_high": 22.0}]}
    >>> m = {"quant": {"spec": "int4"}, "rank": {"spec": "rank16-pca"}}
    >>> [round(x, 4) for x in log_ratio(res, "kv", m)]
    [0.6931, 0.4925, 0.8938]
    """
    if m.get("quant") is None or m.get("rank") is None:
        return None
    pts = {p["spec"]: p for p in result["points"] if p["target"] == target}
    q, r = pts.get(m["quant"]["spec"]), pts.get(m["rank"]["spec"])
    if q is None or r is None:
        return None
    if None in (r["ci_low"], r["ci_high"], q["ci_low"], q["ci_high"]):  # one window: no interval
        return math.log(r["ppl"] / q["ppl"]), None, None
    return (math.log(r["ppl"] / q["ppl"]), math.log(r["ci_low"] / q["ci_high"]),
            math.log(r["ci_high"] / q["ci_low"]))


def gap_points(results: dict[str, dict]) -> list[dict]:
    """One point per model of ``{model: budget result}``: ``model``, ``group``, ``ratio`` and
    its interval ``lo``/``hi``, ``gap`` (PPL difference); models without a rank or quantizer
    in the INT4 budget are left out.

    >>> r = {"q_heads": 9, "kv_heads": 3, "matched": {"kv": [{"quant_bits": 4, "budget": 4.5,
    ...      "quant": {"spec": "int4"}, "rank": {"spec": "rank16-pca"}, "gap_rank": 10.0}]},
    ...      "points": [{"spec": "int4", "target": "kv", "ppl": 10.0, "ci_low": 9.0, "ci_high": 11.0},
    ...                 {"spec": "rank16-pca", "target": "kv", "ppl": 20.0, "ci_low": 18.0, "ci_high": 22.0}]}
    >>> p = gap_points({"m": r})[0]; p["group"], p["ratio"], round(p["lo"], 4), p["gap"]
    (3, 2.0, 1.6364, 10.0)
    """
    out = []
    for model, res in results.items():
        if "kv_heads" not in res:
            continue
        target = "kv" if "kv" in res["matched"] else next(iter(res["matched"]))
        m = at_budget(res, target, 4)
        lr = None if m is None else log_ratio(res, target, m)
        if lr is None or lr[1] is None:
            continue
        out.append({"model": model, "group": res["q_heads"] // res["kv_heads"],
                    "ratio": math.exp(lr[0]), "lo": math.exp(lr[1]), "hi": math.exp(lr[2]),
                    "gap": m["gap_rank"]})
    return out


def plot_gap_vs_gqa(results: dict[str, dict], out_dir) -> list[Path]:
    """``gap_vs_gqa`` (PNG + PDF) when at least two models have points; else nothing."""
    from ..plotstyle import COLORS, new_figure, save_figure, style

    pts = gap_points(results)
    if len(pts) < 2:
        return []
    with style():
        fig, ax = new_figure(aspect=0.7)
        for p in pts:
            ax.errorbar(p["group"], p["ratio"], [[p["ratio"] - p["lo"]], [p["hi"] - p["ratio"]]],
                        fmt="o", color=COLORS["rank"], ms=4, lw=0.8, capsize=2)
            ax.annotate(f"{p['model']}\n+{p['gap']:.3g} PPL", (p["group"], p["ratio"]),
                        textcoords="offset points", xytext=(5, 3), fontsize=5.5)
        ax.set(xlabel="GQA group (query heads per KV head)",
               ylabel="PPL rank / PPL quantizer\n(INT4 budget, K+V)", yscale="log")
        ax.set_xticks(sorted({p["group"] for p in pts}))
        ax.set_title("Rank reduction vs quantization at matched storage, by GQA group\n"
                     "(models differ in more than their GQA group)", fontsize=7)
        return save_figure(fig, out_dir, "gap_vs_gqa")
