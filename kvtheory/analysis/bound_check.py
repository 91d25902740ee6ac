r"""The per-direction bound on real activations: projection vs quantization damage (issue 4 §1).

For every layer and kv head of a captured model, and each direction :math:`u` (the top
``n_pca_dirs`` eigenvectors of :math:`K^\top K` of that kv head, and ``n_random_dirs`` seeded
Haar-random unit vectors), with the queries of the kv head's GQA group under the model's
real softmax (causal mask for decoders, none for encoders), this measures
(all from :mod:`kvtheory.bounds`):

* projection damage of removing :math:`u` from :math:`K`: Fisher form
  :math:`\tfrac12\alpha^2\mathrm{Var}_p(c)` and the exact KL;
* quantization damage of the coordinate :math:`c = Ku` on its :math:`2^b`-level min-max grid:
  the analytic expectation :math:`\tfrac12\alpha^2\tfrac{\Delta^2}{12}(1-\|p\|^2)`, the Fisher
  form and the exact KL of the *actual rounding*, and the Monte-Carlo mean damage under
  independent uniform errors :math:`U[-\Delta/2,\Delta/2]` (the noise model the expectation
  assumes; Fisher form by default, ``mc_metric="kl"`` for the exact KL, about 15x dearer).

**Averaging over queries.** Damages are per attention row (one query head, one query
position); the theory bounds each row, and the damage of a cache is the sum over rows. Each
number here is the *mean over all rows* of the group (``group`` query heads ×
``n_queries`` positions, equal weights), and ratios are ratios of these means:

.. math::

    R_\text{meas} = \frac{\overline{D_\text{proj}}}{\overline{D_\text{quant}}},\qquad
    R_\text{exact} = \frac{\overline{D_\text{proj}}}{\overline{\mathbb E[D_\text{quant}]}}
    = \frac{\sum_i r_i\,\mathbb E[D_{\text{quant},i}]}{\sum_i \mathbb E[D_{\text{quant},i}]},

with :math:`r_i` = :func:`kvtheory.bounds.exact_ratio` per row (so :math:`R_\text{exact}` is
the :math:`\mathbb E[D_\text{quant}]`-weighted mean of the per-row exact ratios). Three
measured ratios are kept: ``fisher_round`` (Fisher forms, actual rounding), ``kl_round``
(exact KLs, actual rounding: the true damage of the real operation, the primary one) and
``mc`` (Monte-Carlo expectation over uniform errors, in the ``mc_metric`` form for both
damages). With ``mc_metric="fisher"`` the ``mc`` ratio estimates :math:`R_\text{exact}` itself,
so its agreement checks the expectation formula on real data up to the Monte-Carlo error
(reported as ``mc_rel_se_median``); the rounding ratios test the noise model. They are compared with
the headline :math:`3\cdot4^b` (:func:`kvtheory.bounds.headline_ratio`) and with
:math:`R_\text{exact}`. Query positions are ``n_queries`` evenly spaced positions ending at
the last token (all when ``n_queries >= n_tokens``); the grid range is over all tokens.

Source: arXiv 2604.11501 (per-direction perturbation result).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .. import bounds as B
from .._checks import check_bits, check_choice, check_int
from ..bases import PCABasis
from ..errors import bad_argument
from ..stages import Stage, register_stage
from .common import small

__all__ = [
    "BoundCheckConfig", "query_positions", "directions", "head_damages", "check_capture",
    "ratio_stats", "run", "plot", "summary", "VARIANTS", "SIZE_BINS",
]

#: measured ratios: name -> (projection column, quantization column); "mc" takes the projection
#: column of its metric (proj_fisher or proj_kl)
VARIANTS = {"fisher_round": ("proj_fisher", "fisher_round"),
            "kl_round": ("proj_kl", "kl_round"),
            "mc": (None, "mc")}
#: bin edges of the Fisher damage (nats) for the Fisher-vs-KL comparison
SIZE_BINS = (0.0, 1e-4, 1e-2, 1.0, float("inf"))
#: Monte-Carlo draws per bounds call (bounds memory: draws x dirs x rows x tokens)
_MC_BATCH = 4
_QUANT_COLS = ("expected", "fisher_round", "kl_round", "mc", "mc_se", "exact")


@dataclass(frozen=True)
class BoundCheckConfig:
    """What :func:`run` measures. ``layers=None``: every layer; ``n_tokens`` is capped at a
    model's maximum positions (512 for minilm-l6); ``mc_samples`` >= 2 (split in two halves
    to estimate the Monte-Carlo standard error); ``mc_metric``: "fisher" or "kl"."""

    models: tuple[str, ...] = ("smollm2-135m", "minilm-l6")
    n_tokens: int = 512
    n_queries: int = 48
    n_pca_dirs: int = 4
    n_random_dirs: int = 4
    bits: tuple[int, ...] = (2, 3, 4, 8)
    seed: int = 0
    layers: tuple[int, ...] | None = None
    mc_samples: int = 32
    mc_metric: str = "fisher"

    def __post_init__(self):
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise bad_argument("models", self.models, "a non-empty tuple of model names")
        check_int("n_tokens", self.n_tokens, 2)
        check_int("n_queries", self.n_queries, 1)
        check_int("n_pca_dirs", self.n_pca_dirs, 0)
        check_int("n_random_dirs", self.n_random_dirs, 0)
        if self.n_pca_dirs + self.n_random_dirs == 0:
            raise bad_argument("n_random_dirs", 0, "at least one direction in total")
        if not self.bits or len(set(self.bits)) != len(self.bits):
            raise bad_argument("bits", self.bits, "a non-empty tuple of distinct bit widths")
        for b in self.bits:
            check_bits(b)
        check_int("seed", self.seed, 0)
        check_int("mc_samples", self.mc_samples, 2)
        check_choice("mc_metric", self.mc_metric, ("fisher", "kl"))
        if self.layers is not None:
            if not self.layers:
                raise bad_argument("layers", self.layers, "None (all) or a non-empty tuple")
            for layer in self.layers:
                check_int("layers", layer, 0)

    @classmethod
    def for_size(cls, use_small: bool | None = None, **kw) -> BoundCheckConfig:
        """The default config, or a small one (2 layers, 128 tokens) when ``small()``."""
        if use_small if use_small is not None else small():
            kw = {"n_tokens": 128, "n_queries": 16, "layers": (0, 1), "mc_samples": 4,
                  "n_pca_dirs": 2, "n_random_dirs": 2, **kw}
        return cls(**kw)


def query_positions(n_tokens: int, n_queries: int) -> list[int]:
    """``n_queries`` evenly spaced positions ending at ``n_tokens - 1`` (stride
    ``n_tokens // n_queries``), or all positions.

    >>> query_positions(8, 3), query_positions(3, 5)
    ([3, 5, 7], [0, 1, 2])
    """
    if n_queries >= n_tokens:
        return list(range(n_tokens))
    stride = n_tokens // n_queries
    return [n_tokens - 1 - stride * i for i in range(n_queries)][::-1]


def _mix(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def directions(
    k: Float[Tensor, "token d"], n_pca: int, n_random: int, seed: int
) -> Float[Tensor, "dir d"]:
    r"""Unit directions: the top ``n_pca`` eigenvectors of :math:`K^\top K` (uncentered PCA,
    :class:`kvtheory.bases.PCABasis`) then ``n_random`` Gaussian directions normalised
    (Haar on the sphere), drawn from ``torch.Generator().manual_seed(seed)``. Dtype of ``k``.

    >>> u = directions(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), 1, 1, 0)
    >>> u[0].tolist(), round(float(u[1].norm()), 6)
    ([1.0, 0.0], 1.0)
    """
    d = k.shape[-1]
    if n_pca > d:
        raise bad_argument("n_pca_dirs", n_pca, f"at most the head dimension d={d}")
    pca = PCABasis().fit(k[None, None]).rotation[0, :, :n_pca].T.to(k.dtype)
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(n_random, d, generator=g, dtype=torch.float64).to(k.dtype)
    return torch.cat([pca, rnd / rnd.norm(dim=-1, keepdim=True)])


def head_damages(
    q: Float[Tensor, "q_head query d"],
    k: Float[Tensor, "token d"],
    u: Float[Tensor, "dir d"],
    bits: tuple[int, ...],
    mask: Bool[Tensor, "query token"] | None,
    mc_samples: int,
    generator: torch.Generator,
    mc_metric: str = "fisher",
) -> dict:
    """All damages of one kv head, each the mean over rows (query heads × queries), per direction.

    Returns ``{"proj_fisher": (dir,), "proj_kl": (dir,), "quant": {b: {col: (dir,)}}}`` with
    cols ``expected``, ``fisher_round``, ``kl_round``, ``mc`` (``mc_metric`` form), ``mc_se``
    (its standard error, half the difference of the two half-sample means) and ``exact``
    (:math:`R_\\text{exact}`, NaN if 0/0). ``q``: the queries of the kv head's group at the
    chosen positions; ``mask`` (query, token) or None.
    """
    qb, kb, ub = q[None], k[None, None], u[:, None, :]  # (1,g,n,d), (1,1,T,d), (dir,1,d)

    def mean(x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))

    out: dict = {"proj_fisher": mean(B.projection_damage(qb, kb, ub, mask)),
                 "proj_kl": mean(B.projection_kl(qb, kb, ub, mask)), "quant": {}}
    half = mc_samples // 2
    for b in bits:
        e = B.expected_quant_damage(qb, kb, ub, b, mask)
        r = B.exact_ratio(qb, kb, ub, b, mask)
        weighted = torch.where(e > 0, r * e, 0).sum(dim=(-2, -1))
        m1, m2 = (_mc(qb, kb, ub, b, n, generator, mask, mc_metric)
                  for n in (half, mc_samples - half))
        out["quant"][b] = {
            "expected": mean(e),
            "fisher_round": mean(B.rounded_quant_damage(qb, kb, ub, b, mask)),
            "kl_round": mean(B.rounded_quant_damage(qb, kb, ub, b, mask, metric="kl")),
            "mc": (half * m1 + (mc_samples - half) * m2) / mc_samples,
            "mc_se": (m1 - m2).abs() / 2,
            "exact": weighted / e.sum(dim=(-2, -1)),
        }
    return out


def _mc(q, k, u, bits, samples, generator, mask, metric) -> Tensor:
    """Row-mean of :func:`kvtheory.bounds.mc_quant_damage` over ``samples`` draws, taken
    ``_MC_BATCH`` draws per call (bounds' chunking does not count the direction axis)."""
    total = 0.0
    for start in range(0, samples, _MC_BATCH):
        m = min(_MC_BATCH, samples - start)
        d = B.mc_quant_damage(q, k, u, bits, m, generator, mask, metric=metric)
        total = total + d.mean(dim=(-2, -1)) * m
    return total / samples


def _finite(x: Tensor) -> list:
    return [float(v) if np.isfinite(v) else None for v in x.double().tolist()]


def _layer_mask(mask: Tensor | None, pos: list[int], T: int, window: int | None) -> Tensor | None:
    """The causal ``mask`` (query positions ``pos``) narrowed to a sliding ``window`` (query i
    sees keys j with i - window < j <= i); unchanged for a global layer."""
    if window is None:
        return mask
    inside = torch.arange(T)[None, :] > torch.tensor(pos)[:, None] - window
    return inside if mask is None else mask & inside


def check_capture(cap, cfg: BoundCheckConfig, causal: bool, *, progress: bool = False) -> dict:
    """The columns of one model: one row per (layer, kv head, direction) of ``cap`` (a
    :class:`kvtheory.capture.Capture`), plus its stats (see :func:`run` for the schema)."""
    from tqdm.auto import tqdm

    meta = cap.meta
    layers = [layer for layer in meta.layers if cfg.layers is None or layer in cfg.layers]
    if not layers:
        raise bad_argument("layers", cfg.layers, f"layers among the captured {list(meta.layers)}")
    T, g = len(meta.positions), meta.group
    pos = query_positions(T, cfg.n_queries)
    base_mask = None
    if causal:
        base_mask = torch.arange(T)[None, :] <= torch.tensor(pos)[:, None]
    names = ("layer", "kv_head", "dir_kind", "dir_index", "proj_fisher", "proj_kl")
    cols: dict = {c: [] for c in names}
    cols["quant"] = {str(b): {c: [] for c in _QUANT_COLS} for b in cfg.bits}
    kinds = ["pca"] * cfg.n_pca_dirs + ["random"] * cfg.n_random_dirs
    index = list(range(cfg.n_pca_dirs)) + list(range(cfg.n_random_dirs))
    for layer in tqdm(layers, desc=f"bound {meta.model}", disable=not progress, leave=False):
        q, k = cap[layer]["q"][0], cap[layer]["k"][0]
        mask = _layer_mask(base_mask, pos, T, meta.window(layer))
        for h in range(meta.kv_heads):
            u = directions(k[h], cfg.n_pca_dirs, cfg.n_random_dirs, _mix(cfg.seed, 0, layer, h))
            gen = torch.Generator().manual_seed(_mix(cfg.seed, 1, layer, h))
            dm = head_damages(q[h * g:(h + 1) * g, pos], k[h], u, cfg.bits, mask, cfg.mc_samples,
                              gen, cfg.mc_metric)
            n = u.shape[0]
            cols["layer"] += [layer] * n
            cols["kv_head"] += [h] * n
            cols["dir_kind"] += kinds
            cols["dir_index"] += index
            cols["proj_fisher"] += _finite(dm["proj_fisher"])
            cols["proj_kl"] += _finite(dm["proj_kl"])
            for b in cfg.bits:
                for c in _QUANT_COLS:
                    cols["quant"][str(b)][c] += _finite(dm["quant"][b][c])
    res = {"model": meta.model, "n_tokens": T, "query_positions": pos, "causal": bool(causal),
           "group": g, "d": meta.d, "layers": layers, "mc_metric": cfg.mc_metric, "columns": cols}
    res["stats"] = model_stats(res)
    return res


def _arr(xs: list) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in xs], dtype=float)


def ratio_stats(values: np.ndarray | list, rel: float = 0.1) -> dict:
    """Median, 5th and 95th percentiles (numpy's linear rule) over the finite values, their
    count ``n``, and ``within`` = fraction with ``|v - 1| <= rel`` (``None`` when empty).

    >>> ratio_stats([1.0, 1.05, 2.0, float("nan")])["within"]
    0.6666666666666666
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "median": None, "p5": None, "p95": None, "within": None}
    p5, med, p95 = np.percentile(v, [5, 50, 95])
    return {"n": int(v.size), "median": float(med), "p5": float(p5), "p95": float(p95),
            "within": float(np.mean(np.abs(v - 1) <= rel))}


def measured_ratios(res: dict, bits: str | int) -> dict[str, np.ndarray]:
    """Per-row ratios of one model at ``bits``: the three measured variants and ``exact``."""
    cols, qc = res["columns"], res["columns"]["quant"][str(bits)]
    proj = {"mc": f"proj_{res['mc_metric']}"}
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {v: _arr(cols[proj.get(v, p)]) / _arr(qc[c]) for v, (p, c) in VARIANTS.items()}
    out["exact"] = _arr(qc["exact"])
    return out


def model_stats(res: dict) -> dict:
    r"""Per bit width: ``measured``/``over_headline``/``over_exact`` stats per variant (the
    ``within`` of ``over_exact`` is the within-10% fraction), ``exact_over_headline``, the
    median relative Monte-Carlo standard error, by direction kind too (``pca``/``random``)."""
    kinds = np.array(res["columns"]["dir_kind"])
    stats: dict = {}
    for b, qc in res["columns"]["quant"].items():
        head = B.headline_ratio(int(b))
        rat = measured_ratios(res, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            se = _arr(qc["mc_se"]) / _arr(qc["mc"])
        entry: dict = {"headline": head, "mc_rel_se_median": ratio_stats(se)["median"]}
        for kind in ("all", "pca", "random"):
            sel = np.ones(kinds.shape, bool) if kind == "all" else kinds == kind
            e: dict = {"exact_over_headline": ratio_stats(rat["exact"][sel] / head)}
            for v in VARIANTS:
                e[v] = {"measured": ratio_stats(rat[v][sel]),
                        "over_headline": ratio_stats(rat[v][sel] / head),
                        "over_exact": ratio_stats(rat[v][sel] / rat["exact"][sel])}
            entry[kind] = e
        stats[b] = entry
    return stats


def fisher_kl_pairs(res: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(Fisher, KL) per perturbation: ``projection`` and ``quantization`` (actual rounding,
    all bit widths) of one model."""
    cols = res["columns"]
    fq = np.concatenate([_arr(qc["fisher_round"]) for qc in cols["quant"].values()])
    kq = np.concatenate([_arr(qc["kl_round"]) for qc in cols["quant"].values()])
    return {"projection": (_arr(cols["proj_fisher"]), _arr(cols["proj_kl"])),
            "quantization": (fq, kq)}


def fisher_kl_stats(results: list[dict]) -> dict:
    """KL / ½δᵀFδ over all perturbations of ``results``: overall, per kind, per size bin."""
    pairs = [fisher_kl_pairs(r) for r in results]
    by_kind = {kd: tuple(np.concatenate([p[kd][i] for p in pairs]) for i in (0, 1))
               for kd in ("projection", "quantization")}
    f = np.concatenate([v[0] for v in by_kind.values()])
    kl = np.concatenate([v[1] for v in by_kind.values()])
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"all": ratio_stats(kl / f),
               **{kd: ratio_stats(v[1] / v[0]) for kd, v in by_kind.items()}, "bins": []}
        for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
            sel = (f >= lo) & (f < hi)
            out["bins"].append({"lo": lo, "hi": hi if np.isfinite(hi) else None,
                                **ratio_stats(kl[sel] / f[sel])})
    return out


def run(cfg: BoundCheckConfig, *, data_dir=None, root=None, progress: bool = True) -> dict:
    r"""Measure every model of ``cfg``. Result (plain JSON values)::

        {"averaging": str, "bits": [int], "headline": {b: 3*4^b},
         "models": {name: {"model", "n_tokens", "query_positions", "causal", "group", "d",
                           "layers", "columns": {"layer", "kv_head", "dir_kind", "dir_index",
                           "proj_fisher", "proj_kl", "quant": {b: {"expected", "fisher_round",
                           "kl_round", "mc", "mc_se", "exact"}}},   # one entry per row
                           "stats": model_stats}},
         "fisher_kl": fisher_kl_stats over all models}

    (bit widths as string keys; damages in nats, means over attention rows).
    """
    from .common import get_model, load_or_capture

    models = {}
    for name in cfg.models:
        info = get_model(name).info
        n = min(cfg.n_tokens, info.max_positions or cfg.n_tokens)
        cap = load_or_capture(name, n, layers=cfg.layers, data_dir=data_dir, root=root)
        models[name] = check_capture(cap, cfg, info.causal, progress=progress)
    return {"averaging": "mean over attention rows (query heads of the kv head's group x query "
                         "positions), equal weights; ratios are ratios of means",
            "bits": list(cfg.bits), "headline": {str(b): B.headline_ratio(b) for b in cfg.bits},
            "models": models, "fisher_kl": fisher_kl_stats(list(models.values()))}


def summary(result: dict) -> dict[str, float | str]:
    """Headline numbers: per bit width the measured ratio (``kl_round``: median, 5th and 95th
    percentiles) beside the headline 3·4^b, its median over the headline and over the exact
    prediction, the within-10% fractions with actual rounding (``kl_round``) and the
    Monte-Carlo expectation (``mc``); KL/Fisher. Keys are prefixed with the model name only
    when the result holds several models."""
    out: dict[str, float | str] = {}
    several = len(result["models"]) > 1
    for name, res in result["models"].items():
        pre = f"{name}." if several else ""
        for b, st in res["stats"].items():
            a = st["all"]
            out[f"{pre}b{b}.ratio_median"] = a["kl_round"]["measured"]["median"]
            out[f"{pre}b{b}.ratio_p5"] = a["kl_round"]["measured"]["p5"]
            out[f"{pre}b{b}.ratio_p95"] = a["kl_round"]["measured"]["p95"]
            out[f"{pre}b{b}.headline"] = float(3 * 4 ** int(b))
            out[f"{pre}b{b}.over_headline_median"] = a["kl_round"]["over_headline"]["median"]
            out[f"{pre}b{b}.over_exact_median"] = a["kl_round"]["over_exact"]["median"]
            out[f"{pre}b{b}.within10_round"] = a["kl_round"]["over_exact"]["within"]
            out[f"{pre}b{b}.within10_mc"] = a["mc"]["over_exact"]["within"]
    fk = result["fisher_kl"]
    for key in ("median", "p5", "p95"):
        out[f"kl_over_fisher.{key}"] = fk["all"][key]
    out["kl_over_fisher.within10"] = fk["all"]["within"]
    return {k: v for k, v in out.items() if v is not None}


def merge(results: dict[str, dict]) -> dict:
    """One result holding every model of ``{model: result}`` (each a :func:`run` result), with
    the KL/Fisher statistics recomputed over all of them: what the figures draw."""
    models = {name: res for r in results.values() for name, res in r["models"].items()}
    first = next(iter(results.values()))
    return {**first, "models": models, "fisher_kl": fisher_kl_stats(list(models.values()))}


_MODEL_STYLE = (("#0072B2", "o"), ("#E69F00", "^"), ("#009E73", "s"), ("#999999", "D"))


def plot(result: dict, out_dir) -> list:
    """``theory_vs_measured`` and ``fisher_vs_kl`` (PNG + PDF) from a saved :func:`run` result
    or from ``{model: result}`` (one figure over every model, coloured by model)."""
    if "models" not in result:
        result = merge(result)
    return plot_theory_vs_measured(result, out_dir) + plot_fisher_vs_kl(result, out_dir)


def plot_theory_vs_measured(result: dict, out_dir) -> list:
    """Per bit width: box (quartiles, 5-95% whiskers) of the measured ratio (exact KL, actual
    rounding) per model, the exact data-dependent prediction (median, 5-95%) and 3·4^b."""
    from ..plotstyle import COLORS, new_figure, save_figure, style

    bits = [str(b) for b in result["bits"]]
    models = list(result["models"])
    width = 0.7 / len(models)
    with style():
        fig, ax = new_figure(aspect=0.8)
        for m, name in enumerate(models):
            color, marker = _MODEL_STYLE[m % len(_MODEL_STYLE)]
            res = result["models"][name]
            for i, b in enumerate(bits):
                x = i + (m - (len(models) - 1) / 2) * width
                rat = measured_ratios(res, b)
                meas = rat["kl_round"][np.isfinite(rat["kl_round"])]
                ax.boxplot([meas], positions=[x], widths=width * 0.55, whis=(5, 95),
                           showfliers=False, patch_artist=True,
                           boxprops={"facecolor": color, "alpha": 0.45, "edgecolor": color},
                           medianprops={"color": color}, whiskerprops={"color": color},
                           capprops={"color": color})
                ex = ratio_stats(rat["exact"])
                if ex["median"] is not None:
                    ax.errorbar([x + width * 0.38], [ex["median"]],
                                yerr=[[ex["median"] - ex["p5"]], [ex["p95"] - ex["median"]]],
                                fmt=marker, mfc="white", mec=color, ecolor=color, ms=3.5, lw=0.8,
                                capsize=1.5)
            ax.plot([], [], "s", color=color, alpha=0.45, label=f"{name}: measured")
            ax.plot([], [], marker, mfc="white", mec=color, ls="",
                    label=f"{name}: exact pred. (median, 5-95%)")
        head = [result["headline"][b] for b in bits]
        ax.hlines(head, np.arange(len(bits)) - 0.42, np.arange(len(bits)) + 0.42,
                  color=COLORS["theory"], lw=1.8, label=r"headline $3\cdot 4^b$")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_xlim(-0.6, len(bits) - 0.4)
        ax.set_xlabel("bit width $b$ of the quantized coordinate")
        ax.set_ylabel(r"damage ratio $D_\mathrm{proj}/D_\mathrm{quant}$")
        ax.set_title("Projection vs quantization damage per direction\n"
                     "(exact KL, actual rounding; boxes: quartiles, whiskers 5-95%)")
        ax.legend(loc="upper left", fontsize=5.5, handlelength=1.2)
        return save_figure(fig, out_dir, "theory_vs_measured")


def plot_fisher_vs_kl(result: dict, out_dir) -> list:
    """½δᵀFδ against the exact KL per perturbation (mean over rows): log-log with y = x (top),
    and KL / ½δᵀFδ against ½δᵀFδ (bottom)."""
    from ..plotstyle import COLORS, new_figure, save_figure, style

    with style():
        fig, (ax, ax2) = new_figure(aspect=1.25, nrows=2, sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
        lo, hi = np.inf, -np.inf
        for m, (name, res) in enumerate(result["models"].items()):
            marker = _MODEL_STYLE[m % len(_MODEL_STYLE)][1]
            for kind, (f, kl) in fisher_kl_pairs(res).items():
                ok = (f > 0) & (kl > 0)
                color = COLORS["rank" if kind == "projection" else "quant"]
                kw = {"s": 3, "marker": marker, "color": color, "alpha": 0.35, "lw": 0,
                      "rasterized": True}
                ax.scatter(f[ok], kl[ok], label=f"{kind}, {name}", **kw)
                ax2.scatter(f[ok], kl[ok] / f[ok], **kw)
                if ok.any():
                    lo, hi = min(lo, f[ok].min(), kl[ok].min()), max(hi, f[ok].max(), kl[ok].max())
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], "--", color="black", lw=0.8, label="$y = x$")
        ax2.axhline(1.0, ls="--", color="black", lw=0.8)
        fk = result["fisher_kl"]["all"]
        if fk["median"] is not None:
            ax.text(0.97, 0.04, f"KL / Fisher: median {fk['median']:.3f}\n"
                    f"5-95%: {fk['p5']:.2f}-{fk['p95']:.2f}", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("exact KL (nats)")
        ax2.set_xlabel(r"second-order damage $\frac{1}{2}\delta^\top F\delta$ (nats)")
        ax2.set_ylabel("KL / Fisher")
        ax.set_title("Fisher form vs exact KL per perturbation\n"
                     "(mean over attention rows; quantization: actual rounding, all $b$)")
        ax.legend(loc="upper left", fontsize=6, markerscale=3)
        return save_figure(fig, out_dir, "fisher_vs_kl")


STAGE = register_stage(Stage(
    name="bound_check", title="The bound on real activations",
    configure=lambda size, model: BoundCheckConfig.for_size(size == "small", models=(model,)),
    run=run, summary=summary, plot=plot, figures=("theory_vs_measured", "fisher_vs_kl"),
    claims=("C6",)))
