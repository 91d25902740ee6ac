r"""Basis ablation (issue 4 §3, claim C7): does the coordinate system matter?

For each basis — identity (channel selection by energy), PCA, Haar-random (5 seeds),
Hadamard, query-aware — and each RoPE side (keys compressed before or after RoPE), two
methods are applied to the **keys only** (values stay fp16; the query-aware basis is defined
for keys, and RoPE acts only on keys): quantization in the rotated basis ``int{b}-{basis}`` and
rank reduction ``rank{r}-{basis}`` with r = d/4 (the rank at INT4 storage for d = 64). Measured:
WikiText-2 perplexity (through :func:`kvtheory.engine.ppl_point`, shared with the budget study) and,
on a captured window, the mean top-1 flip rate, the flip rate of queries with margin
:math:`\ge 1`, KL and Fisher damage (:func:`kvtheory.flips.attention_metrics`). Pre-RoPE
compression is measured where attention sees it: :math:`\hat k_{post} = R_t\,\hat k_{pre}`
with the model's own rotary embedding (checked against the post-RoPE capture).

Spread across bases of a method (random counts once, as its 5-seed mean):

.. math:: \mathrm{spread} = \max_{\text{basis}} \mathrm{PPL} - \min_{\text{basis}} \mathrm{PPL}.

A basis *rescues* rank reduction when its rank-r PPL is at most the worst quantizer's PPL.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_choice, check_int
from ..errors import KVTheoryError, bad_argument
from ..stages import Stage, decoders, register_stage
from .common import small

__all__ = ["AblationConfig", "basis_group", "spread", "apply_rope", "rope_fn", "run", "plot", "summary",
           "BASES"]

BASES = ("identity", "pca", "random0", "random1", "random2", "random3", "random4", "hadamard",
         "qaware")
_ORDER = ("identity", "pca", "random", "hadamard", "qaware")


def basis_group(basis: str) -> str:
    """The basis a run belongs to for the spread: ``random{s}`` → ``random``.

    >>> basis_group("random3"), basis_group("pca")
    ('random', 'pca')
    """
    return "random" if basis.startswith("random") else basis


def spread(values: dict[str, float]) -> dict:
    r"""Spread of PPL across bases: runs ``{basis: ppl}`` are pooled per :func:`basis_group`
    (mean), then ``spread`` = max − min over groups, ``spread_all`` = max − min over runs.

    >>> s = spread({"pca": 10.0, "random0": 11.0, "random1": 13.0, "hadamard": 10.5})
    >>> s["by_basis"]["random"], s["spread"], s["spread_all"], s["best"], s["worst"]
    (12.0, 2.0, 3.0, 'pca', 'random')
    """
    if not values:
        raise bad_argument("values", values, "at least one basis")
    groups: dict[str, list[float]] = {}
    for b, v in values.items():
        groups.setdefault(basis_group(b), []).append(float(v))
    by = {g: sum(v) / len(v) for g, v in groups.items()}
    rng = {g: [min(v), max(v)] for g, v in groups.items()}
    best, worst = min(by, key=by.get), max(by, key=by.get)
    return {"by_basis": by, "range": rng, "spread": by[worst] - by[best],
            "spread_all": max(values.values()) - min(values.values()), "best": best, "worst": worst}


def rope_fn(model):
    """A function ``(k_pre, layer=None) -> k_post`` applying the model's RoPE (see
    :func:`apply_rope`), looked up once; the identity for models without a rotary embedding.
    Models whose rotary module takes the layer's type (Gemma 3: local layers use one RoPE base,
    global layers another) get the type of ``layer`` from the config's ``layer_types``."""
    import inspect

    from ..patch import attention_modules

    inner = model.model if hasattr(model, "info") else model
    rot = next((m for name, m in inner.named_modules() if name.endswith("rotary_emb")), None)
    if rot is None:
        return lambda k, layer=None: k
    fn = getattr(sys.modules[type(attention_modules(inner)[0]).__module__], "apply_rotary_pos_emb")
    typed = "layer_type" in inspect.signature(rot.forward).parameters
    cfg = getattr(inner, "config", None)
    types = getattr(getattr(cfg, "text_config", cfg), "layer_types", None)

    @torch.no_grad()
    def apply(k_pre: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        pos = torch.arange(k_pre.shape[2])[None].expand(k_pre.shape[0], -1)
        if typed:
            if layer is None or types is None:
                raise bad_argument("layer", layer, "the layer index (this model's RoPE depends "
                                   "on the layer's type)")
            cos, sin = rot(k_pre, pos, types[layer])
        else:
            cos, sin = rot(k_pre, pos)
        return fn(k_pre, k_pre, cos.to(k_pre.dtype), sin.to(k_pre.dtype))[1]

    return apply


def apply_rope(model, k_pre: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    r"""RoPE of the model applied to pre-RoPE keys (batch, kv_head, token, d) at positions
    0..T−1: :math:`k\cos\theta_t + \mathrm{rot}(k)\sin\theta_t` (the model's own rotary module
    and ``apply_rotary_pos_emb``). Models without RoPE return ``k_pre``."""
    return rope_fn(model)(k_pre, layer)


@dataclass(frozen=True)
class AblationConfig:
    """``rank`` None: d/4. ``flip_tokens``: tokens of the captured window (the start of the
    first evaluation window) for the flip metrics; None: ``min(seq_len, 256)``.
    Windows as in :class:`.budget.BudgetConfig` (same defaults, so points are shared)."""

    model: str = "smollm2-135m"
    seq_len: int = 512
    n_windows: int = 1
    calib_windows: int = 1
    bases: tuple[str, ...] = BASES
    quant_bits: tuple[int, ...] = (4,)
    rank: int | None = None
    ropes: tuple[str, ...] = ("pre", "post")
    flip_tokens: int | None = None
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        from ..bases import basis_from_name

        if not isinstance(self.model, str) or not self.model:
            raise bad_argument("model", self.model, "a model name or path")
        for name in ("seq_len", "n_windows", "calib_windows", "n_boot"):
            check_int(name, getattr(self, name), 8 if name == "seq_len" else 1)
        if isinstance(self.bases, str) or not self.bases or len(set(self.bases)) != len(self.bases):
            raise bad_argument("bases", self.bases, "distinct basis names")
        for b in self.bases:
            basis_from_name(b)
        if isinstance(self.quant_bits, (int, str)):
            raise bad_argument("quant_bits", self.quant_bits, "a tuple of bit widths")
        object.__setattr__(self, "quant_bits", tuple(check_int("quant_bits", b, 2, 16)
                                                     for b in self.quant_bits))
        if self.rank is not None:
            check_int("rank", self.rank, 1)
        if isinstance(self.ropes, str) or not self.ropes:
            raise bad_argument("ropes", self.ropes, "a non-empty tuple of pre/post")
        object.__setattr__(self, "ropes", tuple(check_choice("ropes", r, ("pre", "post"))
                                                for r in self.ropes))
        if self.flip_tokens is not None:
            check_int("flip_tokens", self.flip_tokens, 8)
        check_int("seed", self.seed, 0)

    @classmethod
    def for_size(cls, size: str | None = None, **kw) -> AblationConfig:
        """The default size, or with ``size="small"`` / ``KVTHEORY_SMALL=1`` a notebook size
        (128 tokens, random seeds 0-1)."""
        if (size or ("small" if small() else "default")) == "small":
            kw = {"seq_len": 128, "bases": ("identity", "pca", "random0", "random1", "hadamard",
                                            "qaware")} | kw
        return cls(**kw)


def _flip_metrics(model, cap_post, cap_side, plan, rope: str, causal: bool) -> dict[str, float]:
    """Mean over layers and heads of flip rate, flip rate at margin >= 1, KL and Fisher."""
    from ..flips import attention_metrics

    edges = (0.0, 0.1, 0.5, 1.0, 2.0, math.inf)
    acc = {"flip_rate": [], "kl": [], "fisher": []}
    n_hi = f_hi = 0
    rope_of = rope_fn(model) if rope == "pre" else None
    for layer in cap_post.meta.layers:
        q, k = cap_post[layer]["q"], cap_post[layer]["k"]
        ck = plan[layer][0]
        k_hat = ck(cap_side[layer]["k"])
        if rope_of is not None:
            k_hat = rope_of(k_hat, layer)
        m = attention_metrics(q, k, k_hat.to(k.dtype), causal=causal, margin_bins=edges,
                              window=cap_post.meta.window(layer))
        for f in acc:
            acc[f].append(float(getattr(m, f).mean()))
        n_hi += int(m.margin_counts[:, 3:].sum())
        f_hi += int(m.margin_flips[:, 3:].sum())
    out = {f: sum(v) / len(v) for f, v in acc.items()}
    out["flip_rate_margin_ge1"] = f_hi / n_hi if n_hi else None
    return out


def run(cfg: AblationConfig | None = None, *, data_dir=None, root=None, progress: bool = True) -> dict:
    """PPL and flip metrics for every (RoPE side, basis, method); plain JSON values.

    Keys: model, d, rank, quant_bits, target ("k"), seq_len, n_windows, flip_tokens, fp (Score),
    rows [{rope, basis, group, kind (quant/rank), method (int4/rank16), spec, bits, ppl, ci_low,
    ci_high, dppl, flip_rate, flip_rate_margin_ge1, kl, fisher}], spread {rope: {method:
    spread()}}, rescue {rope: {rank_best_ppl, rank_best_basis, quant_worst_ppl,
    quant_worst_basis, rescued}}, rope_check_max_rel_err, seconds.
    """
    from ..ledger import bits_per_element
    from ..engine import eval_windows, fitted_plan, ppl_point
    from .common import get_model, load_or_capture

    cfg = cfg or AblationConfig.for_size()
    t0 = time.perf_counter()
    lm = get_model(cfg.model)
    d, causal = lm.info.d, lm.info.causal
    r = cfg.rank or max(1, d // 4)
    ev, cal = eval_windows(cfg.model, cfg.seq_len, cfg.n_windows, cfg.calib_windows, data_dir)
    kw = dict(windows=ev, calibration=cal, n_boot=cfg.n_boot, seed=cfg.seed, root=root)
    fp = ppl_point(lm, cfg.model, "fp", "kv", **kw)
    nf = cfg.flip_tokens or min(cfg.seq_len, 256)
    caps = {side: load_or_capture(cfg.model, nf, rope=side, data_dir=data_dir, root=root)
            for side in set(cfg.ropes) | {"post"}}
    rope_err = 0.0
    if "pre" in caps and lm.info.rope:
        rope_of = rope_fn(lm)
        for layer in caps["post"].meta.layers:
            a, b = rope_of(caps["pre"][layer]["k"], layer), caps["post"][layer]["k"]
            rope_err = max(rope_err, float((a - b).norm() / b.norm()))
        if rope_err > 1e-3:
            raise KVTheoryError(f"rope: RoPE of the pre-RoPE keys differs from the post-RoPE keys "
                                f"by {rope_err:.2g} (relative); expected agreement to 1e-3")
    methods = [("quant", f"int{b}") for b in cfg.quant_bits] + [("rank", f"rank{r}")]
    jobs = [(side, b, kind, m) for side in cfg.ropes for b in cfg.bases for kind, m in methods]
    rows = []
    from tqdm.auto import tqdm

    for side, basis, kind, method in tqdm(jobs, desc="ablation", disable=not progress, leave=False):
        spec = f"{method}-{basis}"
        sc = ppl_point(lm, cfg.model, spec, "k", rope=side, **kw)
        plan = fitted_plan(lm, cfg.model, spec, "fp", rope=side, calibration=cal)
        fl = _flip_metrics(lm.model, caps["post"], caps[side], plan, side, causal)
        rows.append({"rope": side, "basis": basis, "group": basis_group(basis), "kind": kind,
                     "method": method, "spec": spec,
                     "bits": bits_per_element(spec, d, cfg.seq_len, role="k"), "ppl": sc["value"],
                     "ci_low": sc["ci_low"], "ci_high": sc["ci_high"],
                     "dppl": sc["value"] - fp["value"], **fl})
    spreads, rescue = {}, {}
    for side in cfg.ropes:
        spreads[side] = {m: spread({x["basis"]: x["ppl"] for x in rows if x["rope"] == side
                                    and x["method"] == m}) for _, m in methods}
        rk, qs = spreads[side][f"rank{r}"], [spreads[side][m] for k, m in methods if k == "quant"]
        qworst = max(qs, key=lambda s: s["by_basis"][s["worst"]])
        rescue[side] = {"rank_best_ppl": rk["by_basis"][rk["best"]], "rank_best_basis": rk["best"],
                        "quant_worst_ppl": qworst["by_basis"][qworst["worst"]],
                        "quant_worst_basis": qworst["worst"],
                        "rescued": rk["by_basis"][rk["best"]] <= qworst["by_basis"][qworst["worst"]]}
    return {"model": cfg.model, "d": d, "rank": r, "quant_bits": list(cfg.quant_bits), "target": "k",
            "seq_len": cfg.seq_len, "n_windows": int(ev.shape[0]), "flip_tokens": nf, "fp": fp,
            "rows": rows, "spread": spreads, "rescue": rescue, "rope_check_max_rel_err": rope_err,
            "seconds": time.perf_counter() - t0}


def summary(result: dict) -> dict[str, float | str]:
    """Spread across bases (PPL) of each method on each RoPE side, the best rank-r PPL and
    whether any basis rescues rank reduction, fp PPL."""
    out: dict[str, float | str] = {"fp_ppl": result["fp"]["value"]}
    for side, per in result["spread"].items():
        for m, s in per.items():
            out[f"{side}_{m}_spread"] = s["spread"]
            out[f"{side}_{m}_spread_all"] = s["spread_all"]
        res = result["rescue"][side]
        out[f"{side}_rank_best_ppl"] = res["rank_best_ppl"]
        out[f"{side}_rank_best_basis"] = res["rank_best_basis"]
        out[f"{side}_quant_worst_ppl"] = res["quant_worst_ppl"]
        out[f"{side}_rescued"] = "yes" if res["rescued"] else "no"
    return out


def plot(result: dict, out_dir) -> list[Path]:
    """``basis_ablation``: per RoPE side, grouped bars of PPL (log) per basis for each method
    (random: 5-seed mean, whiskers min–max), fp16 PPL dashed; flip rate printed above bars."""
    import numpy as np

    from ..plotstyle import COLORS, COLUMN_WIDTH, new_figure, save_figure, style

    sides = [s for s in ("pre", "post") if s in result["spread"]]
    methods = list(result["spread"][sides[0]])
    groups = [g for g in _ORDER if any(r["group"] == g for r in result["rows"])]
    shades = {"quant": [COLORS["quant"], COLORS["kivi"]], "rank": [COLORS["rank"]]}
    def fmt(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.2g}"

    with style():
        fig, axes = new_figure(COLUMN_WIDTH, 0.45 * len(sides) + 0.2, nrows=len(sides),
                               sharex=True, sharey=True, squeeze=False, layout="constrained")
        width = 0.8 / len(methods)
        top = max(r["ppl"] for r in result["rows"])
        for ax, side in zip(axes[:, 0], sides):
            for i, m in enumerate(methods):
                kind = "rank" if m.startswith("rank") else "quant"
                col = shades[kind][min(i, len(shades[kind]) - 1)]
                s = result["spread"][side][m]
                x = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
                y = np.array([s["by_basis"][g] for g in groups])
                lo = y - np.array([s["range"][g][0] for g in groups])
                hi = np.array([s["range"][g][1] for g in groups]) - y
                flips = [np.mean([r["flip_rate"] for r in result["rows"] if r["rope"] == side
                                  and r["method"] == m and r["group"] == g]) for g in groups]
                label = f"{m} in the basis" if side == sides[0] else None
                ax.bar(x, y, width * 0.92, color=col, label=label, yerr=[lo, hi], capsize=1.5,
                       error_kw={"lw": 0.6})
                for xi, yi, hv, f in zip(x, y, hi, flips):
                    ax.text(xi, (yi + hv) * 1.15, f"{100 * f:.0f}", ha="center", va="bottom", fontsize=5)
                ax.text(0.99, 0.97 - 0.11 * i, f"{m} spread {fmt(s['spread'])} PPL",
                        transform=ax.transAxes, ha="right", va="top", fontsize=6, color=col)
            ax.axhline(result["fp"]["value"], color=COLORS["fp"], ls="--", lw=0.8,
                       label="fp16" if side == sides[0] else None)
            ax.set_yscale("log")
            ax.set_ylabel("PPL (log)")
            ax.set_title(f"keys compressed {side}-RoPE", loc="left", pad=2)
            ax.set_ylim(result["fp"]["value"] / 1.2, top * 40)
        axes[-1, 0].set_xticks(np.arange(len(groups)))
        axes[-1, 0].set_xticklabels([g if g != "random" else "random\n(5 seeds)" for g in groups])
        axes[-1, 0].set_xlabel("basis (numbers above bars: top-1 flip rate, %)")
        fig.legend(loc="outside lower center", ncol=len(methods) + 1)
        fig.suptitle(f"{result['model']}: basis ablation, keys only, rank {result['rank']} "
                     f"vs INT{result['quant_bits'][0]}")
        return save_figure(fig, out_dir, "basis_ablation")


def plot_models(results: dict, out_dir) -> list[Path]:
    """``basis_ablation-<model>`` for each model of ``{model: result}``."""
    from ..plotstyle import model_stamp, per_model

    return per_model(plot, results, out_dir, lambda m, r: model_stamp(
        m, f"keys only, rank {r['rank']} vs INT{'/'.join(map(str, r['quant_bits']))}, "
           f"{r['n_windows']}×{r['seq_len']} tokens"))


STAGE = register_stage(Stage(
    name="ablation", title="Basis ablation",
    configure=lambda size, model: AblationConfig.for_size(size, model=model),
    run=run, summary=summary, plot=plot_models, figures=("basis_ablation",), claims=("C7",),
    applies=decoders))
