r"""Eviction (kvpress presses) against quantization and rank reduction at matched storage.

**Matched storage.** A budget is anchored at per-token quantization ``int{b}`` of keys and
values: :math:`B = ` :func:`kvtheory.ledger.bits_per_element` (``int4``: 4.5 bits per element
at d = 64, scales included). At budget :math:`B`:

* an eviction press keeps a fraction :math:`f = B/16` of the context tokens in fp16 (cost
  :math:`16 f` bits per element of the context cache: kvpress stores keys after RoPE, so no
  position index is needed), i.e. ``compression_ratio`` :math:`1 - B/16`;
* quantization: ``int{b}`` keys and values (exactly :math:`B`) and KIVI keys ``int{b}-kivi``
  with ``int{b}`` values (:math:`\le B`);
* rank reduction: the largest PCA rank :math:`r` with ledger bits :math:`\le B` (basis
  amortised over one window), keys and values, fitted on ``calib_windows`` windows from the
  END of WikiText-2 (disjoint from the evaluated windows at the start).

**Measures** on ``n_windows`` WikiText-2 windows of ``n_context + n_score`` tokens from the
start: continuation perplexity (:func:`kvtheory.integrations.kvpress.eviction_perplexity`
route: prefill the context, the press prunes the cache, the continuation runs on it with the
original positions; quantization and rank compress the whole cache, continuation included,
which can only count against them); and the key flip rate of the continuation queries over
all tokens, per layer and query head, on fp captured q/k (:math:`\hat k` compressed keys for
quantization/rank through :func:`kvtheory.flips.attention_metrics`; for a press, the keep
mask recorded from the real press in the same prefill, through
:func:`kvtheory.integrations.kvpress.eviction_metrics`: flip = top token evicted, the evicted
attention mass :math:`m` and :math:`\mathrm{KL}(\hat p\|p) = -\log(1-m)`).

**Verdict rule** (:func:`summary`): quantization also dominates eviction at matched storage
when, at every budget, the best quantization setting has a lower continuation perplexity than
the best eviction press at that budget (best = lowest). Flip rates are reported beside it and
not folded in, because they differ in kind: a quantization flip is mostly a near-tie swap
(small fp margin, small attention change), an eviction flip removes the attended token
outright (its attention mass and, for the flip, the whole top weight). ``flip_rate_margin_ge1``
counts only queries with an fp top-1 margin of at least :data:`MARGIN_CUT` logits, where a
flip is a decisive change of route; the summary also says whether quantization wins there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int
from ..errors import bad_argument
from ..stages import Stage, register_stage
from .common import small

__all__ = ["EvictionConfig", "budgets", "run", "summary", "plot", "MARGIN_CUT"]

#: flips of queries whose fp top-1 margin is at least this (logits) are "decisive" flips
MARGIN_CUT = 1.0


@dataclass(frozen=True)
class EvictionConfig:
    """Windows, presses and the quantization anchors of the budgets (module docstring)."""

    model: str = "smollm2-135m"
    n_windows: int = 4
    n_context: int = 512
    n_score: int = 128
    presses: tuple[str, ...] = ("knorm", "snapkv", "streaming", "expected")
    anchors: tuple[int, ...] = (8, 4, 2)
    basis: str = "pca"
    calib_windows: int = 1
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise bad_argument("model", self.model, "a model name")
        check_int("n_windows", self.n_windows, 1)
        check_int("n_context", self.n_context, 8)
        check_int("n_score", self.n_score, 1)
        from ..integrations.kvpress import PRESSES

        if not isinstance(self.presses, tuple) or not self.presses or any(
                p not in PRESSES for p in self.presses):
            raise bad_argument("presses", self.presses, "a non-empty tuple of " + ", ".join(PRESSES))
        if not isinstance(self.anchors, tuple) or not self.anchors or any(
                isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 15 for b in self.anchors):
            raise bad_argument("anchors", self.anchors, "a non-empty tuple of bit widths in 1..15")
        check_int("calib_windows", self.calib_windows, 1)
        check_int("seed", self.seed, 0)

    @classmethod
    def for_size(cls, use_small: bool | None = None, **kw) -> EvictionConfig:
        """The default config, or a small one (1 window of 96 + 16 tokens, two presses, the
        INT4 budget) when ``small()``."""
        if use_small if use_small is not None else small():
            kw = {"n_windows": 1, "n_context": 96, "n_score": 16, "presses": ("knorm", "streaming"),
                  "anchors": (4,), **kw}
        return cls(**kw)


def budgets(cfg: EvictionConfig, d: int) -> list[dict]:
    """Per anchor: ``bits`` B, the press ``keep_fraction`` B/16 and the matched settings.

    >>> [(b["anchor"], b["bits"], b["keep_fraction"]) for b in budgets(EvictionConfig(), 64)]
    [('int8', 8.5, 0.53125), ('int4', 4.5, 0.28125), ('int2', 2.5, 0.15625)]
    """
    from ..ledger import bits_per_element, matched

    tokens = cfg.n_context + cfg.n_score
    out = []
    for b in cfg.anchors:
        bits = bits_per_element(f"int{b}", d)
        rank = [s.spec for s in matched(bits, d, tokens, basis=cfg.basis, hybrid_bits=())
                if s.family == "rank"]
        out.append({"anchor": f"int{b}", "bits": bits, "keep_fraction": bits / 16,
                    "quant": [(f"int{b}", f"int{b}"), (f"int{b}-kivi", f"int{b}")],
                    "rank": rank[:1]})
    return out


def _bits(keys: str, values: str, d: int, tokens: int) -> float:
    from ..ledger import bits_per_element

    return (bits_per_element(keys, d, tokens, role="k") + bits_per_element(values, d, tokens, role="v")) / 2


def _flips_compressed(cap, n_score: int, plan: dict) -> dict:
    """Mean key-flip rate, KL, Fisher and output error of the continuation queries (fp q/k/v
    captured) with keys and values compressed by ``plan[layer] = (ck, cv)``."""
    from ..flips import attention_metrics

    acc: dict[str, float] = {}
    big = [0, 0]
    for layer in cap.meta.layers:
        t = cap[layer]
        ck, cv = plan[layer]
        m = attention_metrics(t["q"][:, :, -n_score:], t["k"], ck(t["k"]), t["v"], cv(t["v"]))
        for key, val in m.mean().items():
            if key != "n_queries":
                acc[key] = acc.get(key, 0.0) + val / len(cap.meta.layers)
        ge = [b for b, e in enumerate(m.margin_edges[:-1]) if e >= MARGIN_CUT]
        big[0] += int(m.margin_flips[:, ge].sum())
        big[1] += int(m.margin_counts[:, ge].sum())
    acc["flip_rate_margin_ge1"] = big[0] / big[1] if big[1] else float("nan")
    return acc


def _flips_evicted(cap, n_score: int, keep: dict) -> dict:
    """Mean eviction measures of the continuation queries given per-layer context keep masks."""
    from ..integrations.kvpress import eviction_metrics

    acc: dict[str, float] = {}
    big = [0, 0]
    for layer in cap.meta.layers:
        t = cap[layer]
        mask = keep[layer]
        full = torch.cat([mask, torch.ones(*mask.shape[:2], n_score, dtype=torch.bool)], -1)
        em = eviction_metrics(t["q"][:, :, -n_score:], t["k"], full, t["v"])
        m = em.summary()
        for key in ("flip_rate", "top_evicted_rate", "evicted_mass", "kl_kept", "kl_theory",
                    "output_rel_err"):
            acc[key] = acc.get(key, 0.0) + m[key] / len(cap.meta.layers)
        sel = em.margin >= MARGIN_CUT
        big[0] += int(em.flip[sel].sum())
        big[1] += int(sel.sum())
    acc["flip_rate_margin_ge1"] = big[0] / big[1] if big[1] else float("nan")
    return acc


def run(cfg: EvictionConfig, *, data_dir=None, root=None, progress: bool = True) -> dict:
    """Measure every setting of every budget (module docstring). Result::

        {"model", "n_windows", "n_context", "n_score", "d",
         "budgets": [{"anchor", "bits", "keep_fraction", "quant", "rank"}],
         "rows": [{"family": "fp"|"evict"|"quant"|"rank", "budget", "method", "bits",
                   "ppl", "ppl_ci", "kept_fraction", "flip_rate", ...flip measures}]}
    """
    from tqdm.auto import tqdm

    from ..capture import capture
    from ..compress import make_compressor
    from ..engine import eval_windows
    from ..evaluate import _score, seed_everything
    from ..integrations.kvpress import make_press, score_window
    from ..patch import compressed_kv, fit_compressors
    from .common import get_model

    seed_everything(cfg.seed)
    loaded = get_model(cfg.model)
    if not loaded.info.causal or not loaded.info.has_lm_head:
        raise bad_argument("model", cfg.model, "a causal LM")
    model, d = loaded.model, loaded.info.d
    L = cfg.n_context + cfg.n_score
    windows, calib = eval_windows(cfg.model, L, cfg.n_windows, cfg.calib_windows, data_dir)
    plan_budgets = budgets(cfg, d)
    settings = [("fp", "fp", "fp", None, None)]
    for b in plan_budgets:
        settings += [("evict", b["anchor"], p, None, b["keep_fraction"]) for p in cfg.presses]
        settings += [("quant", b["anchor"], f"{k}/{v}", (k, v), None) for k, v in b["quant"]]
        settings += [("rank", b["anchor"], r, (r, r), None) for r in b["rank"]]
    nll = {i: [] for i in range(len(settings))}
    flips = {i: [] for i in range(len(settings))}
    kept = {i: [] for i in range(len(settings))}
    plans = {}
    n_layers = loaded.info.n_layers
    for i, (fam, _, _, kv, _) in enumerate(settings):
        if fam in ("quant", "rank"):
            plans[i] = fit_compressors(model, kv[0], kv[1], calib) if fam == "rank" else {
                layer: (make_compressor(kv[0], "k"), make_compressor(kv[1], "v")) for layer in range(n_layers)}
    bar = tqdm(total=len(settings) * windows.shape[0], desc="eviction", disable=not progress, leave=False)
    for w in windows:
        cap = capture(model, w[None], model_name=cfg.model)
        for i, (fam, _, method, kv, f) in enumerate(settings):
            if fam == "evict":
                press = make_press(method, 1.0 - f)
                val, rec = score_window(model, w, cfg.n_context, press, record=True)
                flips[i].append(_flips_evicted(cap, cfg.n_score, rec.keep))
                kept[i].append(rec.kept_fraction())
            elif fam == "fp":
                val, _ = score_window(model, w, cfg.n_context)
                kept[i].append(1.0)
            else:
                with compressed_kv(model, calibration=plans[i]):
                    val, _ = score_window(model, w, cfg.n_context)
                flips[i].append(_flips_compressed(cap, cfg.n_score, plans[i]))
            nll[i].append(val)
            bar.update(1)
    bar.close()
    rows = []
    cnt = torch.full((windows.shape[0],), float(cfg.n_score), dtype=torch.float64)
    for i, (fam, budget, method, kv, f) in enumerate(settings):
        s = _score("ppl", torch.stack(nll[i]), cnt, torch.exp, cfg.n_score * windows.shape[0], 1000, cfg.seed)
        if fam == "evict":
            bits = 16 * f
        elif fam == "fp":
            bits = 16.0
        else:
            bits = _bits(kv[0], kv[1], d, L)
        row = {"family": fam, "budget": budget, "method": method, "bits": bits, "ppl": s.value,
               "ppl_ci": [s.ci_low, s.ci_high] if windows.shape[0] > 1 else None}
        if kept[i]:
            row["kept_fraction"] = sum(kept[i]) / len(kept[i])
        if flips[i]:
            for key in flips[i][0]:
                row[key] = sum(x[key] for x in flips[i]) / len(flips[i])
        else:
            row["flip_rate"] = row["flip_rate_margin_ge1"] = 0.0
        rows.append(row)
    return {"model": cfg.model, "n_windows": int(windows.shape[0]), "n_context": cfg.n_context,
            "n_score": cfg.n_score, "d": d,
            "budgets": [{k: v for k, v in b.items()} for b in plan_budgets], "rows": rows}


def summary(result: dict) -> dict[str, float | str]:
    """Per budget the best (lowest) perplexity and flip rate of each family, and the verdict
    of the module docstring's rule."""
    out: dict[str, float | str] = {}
    fp = next(r for r in result["rows"] if r["family"] == "fp")
    out["ppl.fp"] = fp["ppl"]
    dominated, decisive = [], []
    for b in result["budgets"]:
        rows = [r for r in result["rows"] if r["budget"] == b["anchor"]]
        for fam in ("quant", "rank", "evict"):
            sel = [r for r in rows if r["family"] == fam]
            if not sel:
                continue
            best = min(sel, key=lambda r: r["ppl"])
            out[f"{b['anchor']}.best_{fam}"] = best["method"]
            out[f"{b['anchor']}.ppl_{fam}"] = best["ppl"]
            out[f"{b['anchor']}.flip_{fam}"] = min(r["flip_rate"] for r in sel)
            out[f"{b['anchor']}.flip_ge1_{fam}"] = min(r["flip_rate_margin_ge1"] for r in sel)
        a = b["anchor"]
        if f"{a}.ppl_quant" in out and f"{a}.ppl_evict" in out:
            dominated.append(out[f"{a}.ppl_quant"] < out[f"{a}.ppl_evict"])
            decisive.append(out[f"{a}.flip_ge1_quant"] < out[f"{a}.flip_ge1_evict"])
    wins = [b["anchor"] for b, ok in zip(result["budgets"], dominated) if ok]
    out["quant_beats_evict_at"] = ", ".join(wins) if wins else "none"
    out["verdict"] = ("quantization dominates eviction at every matched budget (perplexity)"
                      if dominated and all(dominated) else
                      "quantization does not dominate eviction at every matched budget (perplexity)")
    out["decisive_flips"] = ("fewer decisive (margin >= 1) flips under quantization at every budget"
                             if decisive and all(decisive) else
                             "not fewer decisive flips under quantization at every budget")
    return out


def plot(result: dict, out_dir) -> list:
    """``eviction_vs_quant``: continuation perplexity, key flip rate and decisive (margin >= 1)
    flip rate against bits per cached element, one line per press / quantizer / rank."""
    from ..plotstyle import COLORS, FULL_WIDTH, new_figure, save_figure, style

    press_colors = {"knorm": "#999999", "snapkv": "#009E73", "streaming": "#CC79A7",
                    "expected": "#E69F00", "random": "#666666", "tova": "#F0E442"}
    marks = {"knorm": "v", "snapkv": "^", "streaming": "<", "expected": ">", "random": "x", "tova": "d"}

    def line(r: dict) -> tuple[str, str, str, str]:
        """(label, color, marker, linestyle) of a row's series."""
        if r["family"] == "quant":
            kivi = "kivi" in r["method"]
            return ("INT, KIVI keys" if kivi else "INT per-token", COLORS["kivi" if kivi else "quant"],
                    "s" if kivi else "o", "-")
        if r["family"] == "rank":
            return "rank (PCA)", COLORS["rank"], "D", "-"
        m = r["method"]
        return f"evict: {m}", press_colors.get(m, COLORS["other"]), marks.get(m, "o"), "--"

    fp = next(r for r in result["rows"] if r["family"] == "fp")
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        if r["family"] != "fp":
            groups.setdefault(line(r), []).append(r)
    with style():
        fig, axes = new_figure(width=FULL_WIDTH, ncols=3, aspect=0.36)
        for ax, key, label in ((axes[0], "ppl", "continuation perplexity"),
                               (axes[1], "flip_rate", "key flip rate"),
                               (axes[2], "flip_rate_margin_ge1", f"flip rate, fp margin ≥ {MARGIN_CUT:g}")):
            ax.axhline(fp[key] if key == "ppl" else 0.0, color=COLORS["fp"], lw=0.8, ls=":",
                       label="fp16")
            for (name, color, marker, ls), rows in groups.items():
                rows = sorted(rows, key=lambda r: r["bits"])
                ax.plot([r["bits"] for r in rows], [r[key] for r in rows], color=color,
                        marker=marker, ls=ls, label=name)
            ax.set_xlabel("bits per cached element")
            ax.set_ylabel(label)
            if key == "ppl":
                ax.set_yscale("log")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.subplots_adjust(wspace=0.38, bottom=0.3)
        fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=6, bbox_to_anchor=(0.5, -0.02))
        fig.suptitle(f"Eviction (kvpress) vs quantization vs rank at matched storage, {result['model']} "
                     f"({result['n_windows']}×{result['n_context']} context + {result['n_score']} scored tokens)",
                     fontsize=8)
        return save_figure(fig, out_dir, "eviction_vs_quant")


def _supported(info) -> bool:
    from ..integrations.kvpress import supports

    return supports(info)


def plot_models(results: dict, out_dir) -> list:
    """``eviction_vs_quant-<model>`` for each model of ``{model: result}``."""
    from ..plotstyle import model_stamp, per_model

    return per_model(plot, results, out_dir, lambda m, r: model_stamp(
        m, f"{r['n_windows']} WikiText-2 windows, {r['n_context']} context + {r['n_score']} scored tokens"))


STAGE = register_stage(Stage(
    name="eviction", title="Eviction (kvpress) against quantization and rank at matched storage",
    configure=lambda size, model: EvictionConfig.for_size(size == "small", model=model),
    run=run, summary=summary, plot=plot_models, figures=("eviction_vs_quant",), claims=("E1",),
    applies=_supported))
