r"""Flip rates (issue 4 §2): how often compressed keys change which token a query attends.

For every layer, query head and method of the grid (INT8/4/3/2 per token and KIVI, PCA ranks
d/8..3d/4, hybrids, and for every quantizer the PCA rank at its storage, ``ledger.matched``)
the keys of a captured window are compressed (bases fitted on a *disjoint* calibration
window) and :func:`kvtheory.flips.attention_metrics` measures, per query :math:`i`,

.. math:: \mathrm{flip}_i = [\arg\max_j \hat s_{ij} \ne \arg\max_j s_{ij}],\quad
          m_i = s_{i(1)} - s_{i(2)},\quad \mathrm{KL}(p_i\|\hat p_i),\quad
          D_i = \tfrac12\delta_i^\top F(p_i)\delta_i ,

stratified by the top-1 margin :math:`m_i` (logits) and probability :math:`p_{i(1)}`.

* **Certificate** (quantizers only): :func:`kvtheory.bounds.margin_certificate` with the
  actual steps :math:`\Delta` of :func:`kvtheory.quantize.quant_steps` certifies a query when
  :math:`m_i > 2\max_j \tfrac{1}{2\sqrt d}\sum_c |q_{ic}|\Delta_{jc}`; certified queries never
  flip (``violations`` counts the exceptions and must be 0).
* **Co-flips**: for a group :math:`G` of :math:`m` query heads, the fraction of query positions
  where at least two heads of :math:`G` flip, against the independent prediction
  :math:`P_{\ge2} = 1 - \prod_h(1-p_h) - \sum_h p_h\prod_{j\ne h}(1-p_j)` from the per-head
  rates :math:`p_h` (equal rates: :math:`1-(1-p)^m-mp(1-p)^{m-1}`, i.e.
  :math:`p^3+3p^2(1-p)` for :math:`m=3`). Groups: ``gqa`` = the query heads of one KV head;
  ``control`` = heads of *different* KV heads (MHA: consecutive heads), same size.

Source: arXiv 2604.11501 (routing flips as the discrete failure of rank reduction).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .._checks import check_int
from ..errors import KVTheoryError, bad_argument
from ..stages import Stage, register_stage
from .common import load_or_capture, method_grid, small

__all__ = ["FlipStudyConfig", "independent_coflip", "equal_rate_coflip", "coflip_stats",
           "coflip_groups", "certified_queries", "analyse", "run", "plot", "summary"]

_FIELDS = ("flip_rate", "kl", "fisher", "topk_overlap", "output_rel_err")


@dataclass(frozen=True)
class FlipStudyConfig:
    """``margin_bins``/``prob_bins``: interior stratum edges (0 and inf / 1 are implied; the
    margin edges must include 1.0 for ``flip_rate_margin_gt1``). ``methods`` None: the grid.
    ``calib_offset`` None: right after the analysed window. ``kv``: also compress V (output
    error of K+V). ``compare_model`` None skips the comparison model."""

    model: str = "smollm2-135m"
    n_tokens: int = 512
    methods: tuple[str, ...] | None = None
    calib_offset: int | None = None
    layers: tuple[int, ...] | None = None
    margin_bins: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
    prob_bins: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    topk: int = 5
    kv: bool = False
    compare_model: str | None = "minilm-l6"
    compare_tokens: int = 512
    seed: int = 0

    def __post_init__(self):
        from ..compress import parse_method

        for name in ("model", "compare_model"):
            if not (isinstance(getattr(self, name), str) and getattr(self, name)) and (
                    name == "model" or getattr(self, name) is not None):
                raise bad_argument(name, getattr(self, name), "a model name")
        for name, lo in (("n_tokens", 8), ("compare_tokens", 8), ("topk", 1), ("seed", 0)):
            check_int(name, getattr(self, name), lo)
        if self.methods is not None:
            if isinstance(self.methods, str) or not self.methods:
                raise bad_argument("methods", self.methods, "None or a non-empty tuple of specs")
            object.__setattr__(self, "methods", tuple(str(parse_method(s)) for s in self.methods))
        if self.calib_offset is not None:
            check_int("calib_offset", self.calib_offset, max(self.n_tokens, self.compare_tokens))
        if self.layers is not None:
            ls = tuple(check_int("layers", x, 0) for x in self.layers)
            if not ls or len(set(ls)) != len(ls):
                raise bad_argument("layers", self.layers, "None or distinct layer indices")
            object.__setattr__(self, "layers", ls)
        for name, hi, must in (("margin_bins", math.inf, 1.0), ("prob_bins", 1.0, None)):
            e = tuple(getattr(self, name))
            if (any(not isinstance(x, (int, float)) or not 0 < x < hi for x in e)
                    or any(a >= b for a, b in zip(e, e[1:])) or (must is not None and must not in e)):
                raise bad_argument(name, e, f"increasing interior edges in (0, {hi})"
                                   + (f" including {must}" if must else ""))
            object.__setattr__(self, name, tuple(float(x) for x in e))
        if not isinstance(self.kv, bool):
            raise bad_argument("kv", self.kv, "True or False")

    @classmethod
    def for_size(cls, size: str | None = None, **kw) -> FlipStudyConfig:
        """The default (512 tokens, all layers) or, with ``size="small"`` or ``KVTHEORY_SMALL=1``,
        a notebook/test size (128 tokens, 2 layers)."""
        if (size or ("small" if small() else "default")) == "small":
            kw = {"n_tokens": 128, "compare_tokens": 128, "layers": (0, 1)} | kw
        return cls(**kw)


def independent_coflip(p: Float[Tensor, "*batch member"]) -> Float[Tensor, "*batch"]:
    r"""P(at least two of the members flip) for independent flips with rates ``p``
    (Poisson-binomial, :math:`1 - P_0 - P_1`), by the recursion over members.

    >>> independent_coflip(torch.tensor([0.5, 0.5, 0.5]))   # 3/8 + 1/8
    tensor(0.5000)
    """
    p0, p1 = torch.ones_like(p[..., 0]), torch.zeros_like(p[..., 0])  # P(0), P(1 flip) so far
    for i in range(p.shape[-1]):
        p0, p1 = p0 * (1 - p[..., i]), p1 * (1 - p[..., i]) + p0 * p[..., i]
    return (1 - p0 - p1).clamp_min(0)


def equal_rate_coflip(p: float, m: int) -> float:
    r""":math:`1-(1-p)^m-mp(1-p)^{m-1}`; for :math:`m=3`, :math:`p^3+3p^2(1-p)`.

    >>> round(equal_rate_coflip(0.1, 3), 6)
    0.028
    """
    return 1 - (1 - p) ** m - m * p * (1 - p) ** (m - 1)


def coflip_groups(q_heads: int, kv_heads: int, size: int) -> dict[str, list[list[int]]]:
    """``gqa``: the query heads of each KV head (absent for MHA); ``control``: groups of
    ``size`` heads taken in the order (index within group, KV head), so that for
    ``kv_heads >= size`` no two share a KV head (MHA: consecutive heads).

    >>> coflip_groups(9, 3, 3)
    {'gqa': [[0, 1, 2], [3, 4, 5], [6, 7, 8]], 'control': [[0, 3, 6], [1, 4, 7], [2, 5, 8]]}
    """
    g = q_heads // kv_heads
    order = [h * g + j for j in range(g) for h in range(kv_heads)]
    out = {"gqa": [list(range(h * g, (h + 1) * g)) for h in range(kv_heads)]} if g > 1 else {}
    out["control"] = [order[i:i + size] for i in range(0, q_heads - size + 1, size)]
    return out


def coflip_stats(flip: Bool[Tensor, "head query"], groups: list[list[int]]) -> dict[str, float]:
    r"""Observed and independent co-flip rates of ``groups`` (equal-size lists of heads).

    ``observed`` = fraction of (group, query) with :math:`\ge 2` flipping heads; ``independent``
    = mean over groups of :func:`independent_coflip` of the members' rates; ``equal_rate`` =
    :func:`equal_rate_coflip` of the group's mean rate; ``*_all``: every member flips; ``n``
    (group, query) positions.

    >>> f = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    >>> coflip_stats(f, [[0, 1, 2]])["observed"]
    0.25
    """
    idx = torch.tensor(groups, dtype=torch.long)
    f = flip[idx]                          # (group, member, query)
    n = f.sum(1)
    p = f.to(torch.float64).mean(-1)       # (group, member)
    m = idx.shape[1]
    return {"observed": float((n >= 2).to(torch.float64).mean()),
            "independent": float(independent_coflip(p).mean()),
            "equal_rate": sum(equal_rate_coflip(float(x), m) for x in p.mean(-1)) / len(groups),
            "observed_all": float((n == m).to(torch.float64).mean()),
            "independent_all": float(p.prod(-1).mean()), "size": m, "n": n.numel()}


def certified_queries(
    q: Float[Tensor, "q_head query d"], k: Float[Tensor, "kv_head token d"],
    steps: Float[Tensor, "*spec kv_head token d"], causal: bool, window: int | None = None,
) -> Bool[Tensor, "*spec q_head query"]:
    """Per query head and query (the last ``query`` of the tokens): certified flip-free by
    :func:`kvtheory.bounds.margin_certificate` under per-element quantization ``steps``
    (leading axes: several quantizers at once; the logits are computed once). ``window``: the
    layer's sliding window (query i sees keys j with i - window < j <= i), None for global."""
    from ..bounds import margin_certificate

    (hq, nq, d), (hkv, t) = q.shape, k.shape[:2]
    pos = torch.arange(t - nq, t)[:, None]
    mask = (torch.arange(t) <= pos) if causal else None
    if window is not None:
        mask = (torch.arange(t) > pos - window) & (mask if mask is not None else True)
    lead = steps.shape[:-3]
    cert = margin_certificate(q.reshape(hkv, hq // hkv, nq, d), k[:, None], steps[..., None, :, :],
                              mask, per_token=True)
    return cert.certified.reshape(*lead, hq, nq)


def _rank_at(spec: str, d: int, tokens: int) -> str | None:
    from ..ledger import bits_per_element, matched

    rank = [s for s in matched(bits_per_element(spec, d, tokens), d, tokens) if s.family == "rank"]
    return rank[0].spec if rank else None


def _specs(methods, d: int, tokens: int) -> tuple[list[str], dict[str, str]]:
    """The methods that exist at ``d`` plus, for each plain quantizer, the rank at its storage."""
    from ..compress import parse_method
    from ..ledger import bits_per_element

    def exists(s: str) -> bool:  # e.g. rank48 does not at d = 32
        try:
            return bits_per_element(s, d, tokens) > 0
        except KVTheoryError:
            return False

    specs = [s for s in (methods if methods is not None else method_grid(d)) if exists(s)]
    quants = [s for s in specs if parse_method(s).kind in ("int", "kivi") and parse_method(s).basis is None]
    ranks = {s: r for s in quants if (r := _rank_at(s, d, tokens)) is not None}
    return specs + [r for r in dict.fromkeys(ranks.values()) if r not in specs], ranks


def _layer(q, k, v, cal, specs, cfg, causal, medges, pedges, groups, window=None) -> dict[str, dict]:
    """One layer: metrics per method, co-flips, and the certificates of all quantizers at once."""
    from ..compress import Quantize, make_compressor
    from ..flips import attention_metrics
    from ..quantize import quant_steps

    gt1, out, steps, flips = medges.index(1.0), {}, {}, {}
    for s in specs:
        comp, vcomp = make_compressor(s, "k"), make_compressor(s, "v")
        comp = comp.fit(cal["k"], cal["q"]) if comp.needs_fit else comp
        vv = vh = None
        if cfg.kv:
            vv, vh = v[None], (vcomp.fit(cal["v"]) if vcomp.needs_fit else vcomp)(v[None])
        m = attention_metrics(q[None], k[None], comp(k[None]), vv, vh, causal=causal, topk=cfg.topk,
                              margin_bins=medges, prob_bins=pedges, return_per_query=True,
                              window=window)
        flips[s] = m.per_query.flip[0]
        row = {f: getattr(m, f).tolist() for f in _FIELDS if getattr(m, f) is not None}
        n_hi, f_hi = m.margin_counts[:, gt1:].sum(1).tolist(), m.margin_flips[:, gt1:].sum(1).tolist()
        row["flip_rate_margin_gt1"] = [f / n if n else None for f, n in zip(f_hi, n_hi)]
        row["kv_flip_rate"] = m.per_kv_head().flip_rate.tolist()
        row["strata"] = [x.sum(0).tolist() for x in
                         (m.margin_counts, m.margin_flips, m.prob_counts, m.prob_flips)]
        row["coflip"] = {name: coflip_stats(flips[s], gr) for name, gr in groups.items()}
        out[s] = row
        if isinstance(comp, Quantize):
            steps[s] = quant_steps(k, comp.bits, axis=comp.axis, group=comp.group, symmetric=comp.symmetric)
    if steps:
        cert = certified_queries(q, k, torch.stack(list(steps.values())), causal, window)
        for s, c in zip(steps, cert):
            out[s]["cert"] = (c.to(torch.float64).mean(-1).tolist(), int(c.sum()),
                              int((c & flips[s]).sum()), c.numel())
    return out


def _pool(rows: list[dict], medges, pedges) -> dict:
    """Per-method results over layers from the per-layer rows of :func:`_layer`."""
    gt1 = medges.index(1.0)
    per_head = {f: [r[f] for r in rows] for f in (*_FIELDS, "flip_rate_margin_gt1") if f in rows[0]}
    cnt = [torch.tensor([r["strata"][i] for r in rows]) for i in range(4)]  # (layer, bin) each
    strata = {name: {"edges": [None if math.isinf(e) else e for e in edges], "counts": n.tolist(),
                     "flips": f.tolist(), "rate": [a / b if b else None for a, b in
                                                   zip(f.sum(0).tolist(), n.sum(0).tolist())]}
              for name, n, f, edges in (("margin", *cnt[:2], medges), ("prob", *cnt[2:], pedges))}
    mean = {f: float(torch.tensor(per_head[f], dtype=torch.float64).mean()) for f in _FIELDS if f in per_head}
    n_hi, f_hi = int(cnt[0][:, gt1:].sum()), int(cnt[1][:, gt1:].sum())
    mean |= {"flip_rate_margin_gt1": f_hi / n_hi if n_hi else None,
             "frac_margin_gt1": n_hi / int(cnt[0].sum())}
    cert = None
    if "cert" in rows[0]:
        n_c, n_v, n_q = (sum(r["cert"][i] for r in rows) for i in (1, 2, 3))
        cert = {"certified": [r["cert"][0] for r in rows], "fraction": n_c / n_q,
                "not_flipped_fraction": 1 - mean["flip_rate"], "violations": n_v}
        mean["certified"] = cert["fraction"]
    cof = {}
    for name in rows[0]["coflip"]:
        rs = [r["coflip"][name] for r in rows]
        cof[name] = {key: sum(r[key] for r in rs) / len(rs) for key in rs[0] if key not in ("size", "n")}
        cof[name] |= {"size": rs[0]["size"], "n": sum(r["n"] for r in rs),
                      "per_layer_observed": [r["observed"] for r in rs],
                      "per_layer_independent": [r["independent"] for r in rs]}
    return {"per_head": per_head, "per_kv_head": {"flip_rate": [r["kv_flip_rate"] for r in rows]},
            "strata": strata, "certificate": cert, "coflip": cof, "mean": mean}


def analyse(cap, calib, cfg: FlipStudyConfig, *, causal: bool, layers=None,
            control_size: int | None = None, progress: bool = False) -> dict:
    """All flip statistics of one model's capture ``cap`` (batch 1; bases fitted on the
    capture ``calib``), for ``cfg.methods`` (None: the grid at this d) on ``layers`` (None: all
    captured). ``control_size``: size of the control groups (default: the GQA group, min 2).
    Schema: see :func:`run`.
    """
    from tqdm.auto import tqdm

    from ..ledger import bits_per_element
    from ..plotstyle import family

    meta = cap.meta
    chosen = [x for x in meta.layers if layers is None or x in layers]
    if not chosen:
        raise bad_argument("layers", layers, f"layers among the captured {list(meta.layers)}")
    t, d, g = cap[chosen[0]]["k"].shape[2], meta.d, meta.group
    specs, ranks = _specs(cfg.methods, d, t)
    groups = coflip_groups(meta.q_heads, meta.kv_heads, control_size or max(g, 2))
    medges, pedges = (0.0, *cfg.margin_bins, math.inf), (0.0, *cfg.prob_bins, 1.0)
    torch.manual_seed(cfg.seed)
    rows = [_layer(*(cap[layer][w][0] for w in "qkv"), calib[layer], specs, cfg, causal, medges,
                   pedges, groups, window=meta.window(layer))
            for layer in tqdm(chosen, desc=f"flips {meta.model}", disable=not progress, leave=False)]
    methods = {s: {"family": family(s), "bits_per_element": bits_per_element(s, d, t)}
               | _pool([r[s] for r in rows], medges, pedges) for s in specs}
    return {"model": meta.model, "n_tokens": t, "layers": chosen, "q_heads": meta.q_heads,
            "kv_heads": meta.kv_heads, "group": g, "d": d, "causal": causal,
            "coflip_groups": groups, "matched_rank": ranks, "methods": methods}


def _one(name: str, n: int, cfg: FlipStudyConfig, layers, control, data_dir, root, progress) -> dict:
    off = cfg.calib_offset if cfg.calib_offset is not None else n
    cap = load_or_capture(name, n, data_dir=data_dir, root=root)
    cal = load_or_capture(name, n, offset=off, data_dir=data_dir, root=root)
    from ..models import REGISTRY
    from .common import get_model

    entry = REGISTRY.get(name)      # a registry model says so; any other is loaded and asked
    causal = entry.causal if entry is not None else bool(get_model(name).info.causal)
    res = analyse(cap, cal, cfg, causal=causal, layers=layers, control_size=control, progress=progress)
    return res | {"calib_offset": off}


def run(cfg: FlipStudyConfig | None = None, *, data_dir=None, root=None, progress: bool = True) -> dict:
    """Flip study of ``cfg.model`` and (smaller) ``cfg.compare_model``; plain JSON values.

    Keys: model, n_tokens, calib_offset, layers, q_heads, kv_heads, group, d, causal,
    coflip_groups {gqa?, control}, matched_rank {quantizer: rank at its storage}, seconds,
    cpu_seconds (this process),
    compare (same schema for the comparison model, or None), and ``methods[spec]``:
    family, bits_per_element; per_head {flip_rate, flip_rate_margin_gt1 (None: no such query),
    kl, fisher, topk_overlap[, output_rel_err]} each layer × q_head; per_kv_head {flip_rate}
    layer × kv_head; strata {margin, prob}: {edges (None = inf), counts, flips (layer × bin),
    rate (bin, pooled)}; certificate (quantizers, else None) {certified (layer × q_head),
    fraction, not_flipped_fraction, violations}; coflip {gqa?, control}: {observed,
    independent, equal_rate, observed_all, independent_all, size, n, per_layer_observed,
    per_layer_independent}; mean {flip_rate, flip_rate_margin_gt1, frac_margin_gt1, kl, fisher,
    topk_overlap[, output_rel_err, certified]} over all layers and heads.
    """
    cfg = cfg or FlipStudyConfig.for_size()
    t0, c0 = time.perf_counter(), time.process_time()
    res = _one(cfg.model, cfg.n_tokens, cfg, cfg.layers, None, data_dir, root, progress)
    res["compare"] = None
    if cfg.compare_model is not None:
        res["compare"] = _one(cfg.compare_model, cfg.compare_tokens, cfg, None, max(res["group"], 2),
                              data_dir, root, progress)
    res["seconds"], res["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return res


# ---------------------------------------------------------------- summary and figures
def summary(result: dict) -> dict[str, float | str]:
    """Headline numbers, keyed ``spec.what`` (``model.spec.what`` when the result also holds a
    comparison model): flip rates (all queries and margin ≥ 1) of
    INT8/INT4/KIVI and the ranks at their storage, certified fractions, co-flip rates
    (observed, independent) of INT4 and the rank at its storage, certificate violations."""
    out: dict[str, float | str] = {}
    several = result.get("compare") is not None
    for res in filter(None, (result, result.get("compare"))):
        pre, mr, ms = (res["model"] + "." if several else ""), res["matched_rank"], res["methods"]
        rank4 = mr.get("int4")
        specs = ["int8", "int4", "int4-kivi", "int2-kivi", rank4, mr.get("int4-kivi"),
                 f"rank{res['d'] // 2}-pca"]
        for s in (x for x in dict.fromkeys(specs) if x in ms):
            for key in ("flip_rate", "flip_rate_margin_gt1", "certified"):
                if ms[s]["mean"].get(key) is not None and (key != "certified" or s in specs[:3]):
                    out[f"{pre}{s}.{key}"] = ms[s]["mean"][key]
        for s in (x for x in ("int4", rank4) if x in ms):
            for grp, c in ms[s]["coflip"].items():
                out |= {f"{pre}{s}.coflip_{grp}.{k}": c[k] for k in ("observed", "independent", "n")}
        out[f"{pre}matched_rank_int4"] = rank4 or ""
        out[f"{pre}certificate_violations"] = float(sum(
            m["certificate"]["violations"] for m in ms.values() if m["certificate"]))
    return out | {"seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"]}


def _labels() -> dict[str, str]:
    """Legend names of the colour families drawn here, from the method registry."""
    from ..plotstyle import family_label

    return {f: family_label(f) for f in ("quant", "kivi", "rank", "hybrid")}


def _legend(fig, handles, ncol):
    fig.legend(handles=handles, ncol=ncol, loc="lower center", bbox_to_anchor=(0.5, 1.0))


def _budget(ax, res, colors) -> bool:
    """Flip rate (all, margin >= 1) per method against bits; zeros drawn at the bottom as v."""
    pts = [(m["bits_per_element"], 100 * m["mean"]["flip_rate"],
            100 * (m["mean"]["flip_rate_margin_gt1"] or 0.0), colors[m["family"]])
           for s, m in res["methods"].items() if s != "fp"]
    pos = [y for p in pts for y in p[1:3] if y > 0]
    lo = min(pos) / 3 if pos else 1e-3
    for x, ya, yg, c in pts:
        ax.plot([x, x], [max(ya, lo), max(yg, lo)], color=c, lw=0.6, alpha=0.6)
        ax.plot(x, max(ya, lo), "o" if ya > 0 else "v", color=c, ms=3.5)
        ax.plot(x, max(yg, lo), "o" if yg > 0 else "v", mfc="white", mec=c, ms=3.5, mew=0.9)
    ax.set(yscale="log", xlabel="bits per element", title=f"{res['model']} (T={res['n_tokens']})")
    return any(y <= 0 for p in pts for y in p[1:3])


def _heatmap(result, out_dir, np, new_figure, save_figure):
    pair = [s for s in ("int4-kivi", result["matched_rank"].get("int4-kivi")) if s in result["methods"]]
    data = [100 * np.array(result["methods"][s]["per_head"]["flip_rate"], dtype=float) for s in pair]
    fig, axes = new_figure(aspect=1.0, ncols=len(pair), sharey=True, squeeze=False)
    for ax, s, a in zip(axes[0], pair, data):
        im = ax.imshow(a, aspect="auto", cmap="viridis", vmin=0, vmax=max(x.max() for x in data),
                       interpolation="nearest")
        for b in range(1, result["kv_heads"]):  # query heads of one KV head between white lines
            ax.axvline(b * result["group"] - 0.5, color="w", lw=0.8)
        bits = result["methods"][s]["bits_per_element"]
        ax.set_title(f"{s}, {bits:.2f} b\nmean {a.mean():.1f}%", fontsize=7)
        ax.grid(False)
        ax.set_yticks(range(len(a))[::5], [str(x) for x in result["layers"][::5]])
    axes[0][0].set_ylabel("layer")
    fig.supxlabel("query head (white lines separate KV groups)" if result["group"] > 1 else "head",
                  fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="top-1 flip rate (%)", shrink=0.9)
    return save_figure(fig, out_dir, "flip_heatmap")


def _models(result: dict) -> list[dict]:
    """The per-model results in ``result``: a :func:`run` result (with its comparison model)
    or ``{model: result}``."""
    if "methods" in result:
        return [r for r in (result, result.get("compare")) if r]
    return list(result.values())


def plot(result: dict, out_dir) -> list[Path]:
    """``flip_vs_budget``, ``certified_fraction`` and ``gqa_coflip`` over every model (one
    panel or marker per model) and ``flip_heatmap-<model>`` per model (PNG + PDF), from a
    :func:`run` result or ``{model: result}``."""
    import numpy as np
    from matplotlib.lines import Line2D

    from ..plotstyle import COLORS, COLUMN_WIDTH, FULL_WIDTH, figure_context, model_stamp, new_figure, \
        save_figure, style

    models = _models(result)
    several = len(models) > 1 and "methods" not in result
    width = FULL_WIDTH if len(models) > 2 else COLUMN_WIDTH
    aspect = 0.62 * COLUMN_WIDTH / width * (1.6 if len(models) > 2 else 1)
    fams = [Line2D([], [], ls="", marker="o", color=COLORS[f], label=lab) for f, lab in _labels().items()]
    grey = dict(ls="", marker="o", color="0.3")
    paths = []
    with style():
        fig, axes = new_figure(width, aspect=aspect, ncols=len(models), sharey=True, squeeze=False)
        zeros = [_budget(ax, res, COLORS) for ax, res in zip(axes[0], models)]
        axes[0][0].set_ylabel("top-1 flip rate (%)")
        kinds = [Line2D([], [], **grey, label="all queries"),
                 Line2D([], [], **grey | {"mfc": "white"}, label="margin ≥ 1 logit")]
        kinds += [Line2D([], [], **grey | {"marker": "v"}, label="0 (at bottom)")] if any(zeros) else []
        _legend(fig, fams + kinds, 3)
        paths += save_figure(fig, out_dir, "flip_vs_budget")
        for res in (models if several else models[:1]):
            with figure_context(_tag(res) if several else None,
                                model_stamp(res["model"], f"{res['n_tokens']} tokens, "
                                            f"{len(res['layers'])} layers")):
                paths += _heatmap(res, out_dir, np, new_figure, save_figure)

        fig, axes = new_figure(width, aspect=aspect, ncols=len(models), sharey=True, squeeze=False)
        for ax, res in zip(axes[0], models):
            for fam in ("quant", "kivi"):
                pts = sorted((m["bits_per_element"], 100 * m["certificate"]["fraction"],
                              100 * m["certificate"]["not_flipped_fraction"])
                             for m in res["methods"].values() if m["family"] == fam and m["certificate"])
                if pts:
                    x, cf, nf = zip(*pts)
                    ax.plot(x, cf, "o-", color=COLORS[fam], ms=3.5)
                    ax.plot(x, nf, "o--", color=COLORS[fam], mfc="white", ms=3.5, lw=0.8)
            ax.set(xlabel="bits per element", title=res["model"], ylim=(0, 102))
        axes[0][0].set_ylabel("queries (%)")
        _legend(fig, fams[:2] + [Line2D([], [], marker="o", color="0.3", label="certified flip-free"),
                                 Line2D([], [], marker="o", ls="--", mfc="white", color="0.3",
                                        label="did not flip")], 2)
        paths += save_figure(fig, out_dir, "certified_fraction")

        fig, ax = new_figure(aspect=0.8)
        marks = []
        shapes = iter(("o", "^", "s", "D", "v", "P", "X", "<", ">", "h") * 4)
        for res in models:
            for grp in ("gqa", "control"):
                if grp not in res["coflip_groups"]:
                    continue
                mk, fill = next(shapes), grp == "gqa"
                size = len(res["coflip_groups"][grp][0])
                who = "query heads of one KV head" if grp == "gqa" else "heads with separate keys"
                marks.append(Line2D([], [], **grey | {"marker": mk, "mfc": "0.3" if fill else "white"},
                                    label=f"{res['model']}: {size} {who}"))
                for s, m in res["methods"].items():
                    c, col = m["coflip"][grp], COLORS[m["family"]]
                    if s != "fp" and c["independent"] * c["n"] >= 10:  # >= 10 expected co-flips; bar: 95%
                        err = 1.96 * math.sqrt(c["observed"] * (1 - c["observed"]) / c["n"]) / c["independent"]
                        ax.errorbar(100 * c["independent"], c["observed"] / c["independent"], err, fmt=mk,
                                    color=col, mfc=col if fill else "white", mec=col, ms=3.5, lw=0.6)
        ax.axhline(1.0, color="0.5", lw=0.7, ls=":")
        ax.set(xscale="log", xlabel="independent prediction: ≥2 heads flip (%)",
               ylabel="observed / independent")
        _legend(fig, fams + marks, 2)
        paths += save_figure(fig, out_dir, "gqa_coflip")
    return paths


def _tag(res: dict) -> str:
    from ..stages import model_slug

    return model_slug(res["model"])


STAGE = register_stage(Stage(
    name="flip_study", title="Flip rates at matched storage",
    configure=lambda size, model: FlipStudyConfig.for_size(size, model=model, compare_model=None),
    run=run, summary=summary, plot=plot,
    figures=("flip_vs_budget", "flip_heatmap", "certified_fraction", "gqa_coflip"),
    claims=("C3", "C5")))
