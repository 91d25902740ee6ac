r"""A discrete routing failure on a real query: removing one key direction flips the attended
token, INT4 quantization of the same keys does not (issue 4, figure ``routing_failure``).

For query head :math:`h` (kv head :math:`h // g`), query position :math:`i` and key :math:`j \le i`
(causal), the scores are the attention logits :math:`s_{ij} = q_i\cdot k_j/\sqrt d` of the
captured post-RoPE tensors. Three versions of the keys:

* **fp**: the captured keys;
* **removed**: :math:`k_j - (k_j\cdot u)\,u`, i.e. :math:`s'_{ij} = s_{ij} - \alpha_i c_j`,
  :math:`\alpha_i = q_i\cdot u/\sqrt d`, :math:`c_j = k_j\cdot u`, for one unit direction :math:`u`:
  ``direction="top-pca"``: the top eigenvector of :math:`K^\top K` of that kv head (what every
  rank-r PCA keeps, removed to show one direction's weight); ``"rank-drop"``: each direction
  that rank-``rank`` PCA drops (eigenvectors ``rank..d-1``), tried one at a time;
* **int4**: per-token asymmetric INT4 of the keys (method spec ``int4``,
  :func:`kvtheory.compress.make_compressor`).

**Choice rule** (deterministic): among the searched (layer, query head, query position
:math:`i \ge` ``min_position``, direction) whose top-1 key changes from :math:`t` to
:math:`t'` when :math:`u` is removed while the INT4 top-1 stays :math:`t` (and, with
``skip_sink``, neither :math:`t` nor :math:`t'` is the first token, which many heads use as an
attention sink, so the example misroutes between content tokens), take the one with the
largest *flip strength* :math:`\min(s_t - s_{(2)},\; s'_{t'} - s'_t)`: a clear fp decision
(top-1 minus runner-up logit) overturned clearly, not a near-tie on either side; ties go to
the first in (layer, head, position, direction) order. ``layer=None`` searches every
captured layer. ``seed`` is recorded only: the search has no randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .._checks import check_choice, check_int
from ..bases import PCABasis
from ..compress import make_compressor
from ..errors import KVTheoryError, bad_argument
from ..stages import Stage, decoders, register_stage
from .common import small

__all__ = ["RoutingConfig", "removal_scores", "find_example", "run", "plot", "summary"]

DIRECTIONS = ("top-pca", "rank-drop")


@dataclass(frozen=True)
class RoutingConfig:
    """Search settings; ``top`` keys are recorded (plus the new top-1s if not among them)."""

    model: str = "smollm2-135m"
    n_tokens: int = 512
    layer: int | None = None
    seed: int = 0
    direction: str = "rank-drop"
    rank: int = 16
    min_position: int = 16
    top: int = 8
    skip_sink: bool = True

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise bad_argument("model", self.model, "a model name")
        check_int("n_tokens", self.n_tokens, 2)
        if self.layer is not None:
            check_int("layer", self.layer, 0)
        check_int("seed", self.seed, 0)
        check_choice("direction", self.direction, DIRECTIONS)
        check_int("rank", self.rank, 1)
        check_int("min_position", self.min_position, 0, self.n_tokens - 1)
        check_int("top", self.top, 2)
        if not isinstance(self.skip_sink, bool):
            raise bad_argument("skip_sink", self.skip_sink, "True or False")

    @classmethod
    def for_size(cls, use_small: bool | None = None, **kw) -> RoutingConfig:
        """The default config, or a small one (128 tokens) when ``small()``."""
        if use_small if use_small is not None else small():
            kw = {"n_tokens": 128, **kw}
        return cls(**kw)


def removal_scores(
    q: Float[Tensor, "query d"],
    k: Float[Tensor, "token d"],
    u: Float[Tensor, "dir d"],
) -> tuple[Float[Tensor, "query token"], Float[Tensor, "query dir token"]]:
    r"""Logits :math:`s = qk^\top/\sqrt d` and, per unit direction, those with it removed from the
    keys, :math:`s - \alpha c` (shapes ``query token`` and ``query dir token``).

    >>> q, u = torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    >>> s, s_rm = removal_scores(q, torch.eye(2), u)
    >>> s.tolist(), s_rm.tolist()
    ([[1.4142135381698608, 1.4142135381698608]], [[[0.0, 1.4142135381698608]]])
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = q @ k.T * scale
    alpha = q @ u.T * scale  # (query, dir)
    c = k @ u.T  # (token, dir)
    return s, s[:, None, :] - alpha[:, :, None] * c.T[None, :, :]


def _top2(s: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax and top-1 minus top-2 margin along the last axis over allowed tokens."""
    v = s.masked_fill(~mask, -math.inf).topk(2, dim=-1)
    return v.indices[..., 0], v.values[..., 0] - v.values[..., 1]


def _candidates(k: Tensor, direction: str, rank: int) -> tuple[Tensor, list[int]]:
    """Unit directions (dir, d) of one kv head and their PCA indices."""
    rot = PCABasis().fit(k[None, None]).rotation[0].to(k.dtype)  # (d, d), columns
    d = rot.shape[-1]
    idx = [0] if direction == "top-pca" else list(range(rank, d))
    if not idx:
        raise bad_argument("rank", rank, f"a rank below the head dimension d={d}")
    return rot[:, idx].T, idx


def _search_head(q: Tensor, k: Tensor, kq: Tensor, u: Tensor, mask: Tensor, min_position: int):
    """One query head: fp top-1 and margin (query,), whether INT4 keeps the top-1 (query,), and
    the (query, dir) pairs whose top-1 flips on removal with the new top-1 and its gap
    :math:`s'_\\text{new} - s'_\\text{old}`. Only pairs that can flip are evaluated:
    :math:`|\\alpha|\\,(c_{\\max} - c_{\\min}) > ` margin is necessary for one."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.T * scale).masked_fill(~mask, -math.inf)
    top, margin = _top2(s, mask)
    keep = _top2(q @ kq.T * scale, mask)[0] == top
    alpha, c = q @ u.T * scale, k @ u.T  # (query, dir), (token, dir)
    cand = alpha.abs() * (c.amax(0) - c.amin(0)) > margin[:, None]
    cand[:min_position] = False
    qi, dj = cand.nonzero(as_tuple=True)
    new_top, gap = [], []
    for a in range(0, qi.numel(), 4096):  # chunks bound the memory
        i, j = qi[a:a + 4096], dj[a:a + 4096]
        s_rm = s[i] - alpha[i, j, None] * c[:, j].T
        t = s_rm.argmax(-1)
        new_top.append(t)
        gap.append(s_rm.gather(-1, t[:, None])[:, 0] - s_rm.gather(-1, top[i, None])[:, 0])
    new_top = torch.cat(new_top) if new_top else qi
    gap = torch.cat(gap) if gap else margin[:0]
    flip = new_top != top[qi]
    return top, margin, keep, qi[flip], dj[flip], new_top[flip], gap[flip]


def find_example(cap, cfg: RoutingConfig, tokenizer=None, *, progress: bool = False) -> dict:
    """Search ``cap`` (a causal :class:`kvtheory.capture.Capture`) by the choice rule of the
    module docstring; returns the result dict of :func:`run` (without ``model``/``config``)."""
    from tqdm.auto import tqdm

    meta = cap.meta
    layers = list(meta.layers) if cfg.layer is None else [cfg.layer]
    if cfg.layer is not None and cfg.layer not in meta.layers:
        raise bad_argument("layer", cfg.layer, f"one of the captured layers {list(meta.layers)}")
    T, g = len(meta.positions), meta.group
    if cfg.min_position >= T:
        raise bad_argument("min_position", cfg.min_position, f"below the {T} captured tokens")
    mask: Bool[Tensor, "query token"] = torch.ones(T, T, dtype=torch.bool).tril()
    int4 = make_compressor("int4", "k")
    best = None
    counts = dict.fromkeys(("searched", "flipped_removal", "flipped_int4", "eligible",
                            "eligible_content"), 0)
    for layer in tqdm(layers, desc="routing", disable=not progress, leave=False):
        q_all, k_all = cap[layer]["q"][0], cap[layer]["k"][0]
        kq_all = int4(k_all[None])[0]
        win = meta.window(layer)  # a sliding-window layer: query i sees keys j > i - window
        lmask = mask if win is None else mask & (torch.arange(T)[None, :] > torch.arange(T)[:, None] - win)
        for h in range(meta.q_heads):
            kv = h // g
            u, idx = _candidates(k_all[kv], cfg.direction, cfg.rank)
            top, margin, keep, qi, dj, new_top, gap = _search_head(
                q_all[h], k_all[kv], kq_all[kv], u, lmask, cfg.min_position)
            counts["searched"] += T - cfg.min_position
            counts["flipped_removal"] += int(qi.unique().numel())
            counts["flipped_int4"] += int((~keep[cfg.min_position:]).sum())
            ok = keep[qi]
            counts["eligible"] += int(qi[ok].unique().numel())
            if cfg.skip_sink:
                ok &= (top[qi] != 0) & (new_top != 0)
            counts["eligible_content"] += int(qi[ok].unique().numel())
            if not ok.any():
                continue
            strength = torch.where(ok, torch.minimum(margin[qi], gap), -math.inf)
            a = int(strength.argmax())  # first maximum in (position, direction) order
            if best is None or float(strength[a]) > best[0]:
                best = (float(strength[a]), layer, h, int(qi[a]), int(dj[a]), idx[int(dj[a])])
    if best is None:
        raise KVTheoryError(
            f"routing: got no query among layers {layers} whose top-1 key flips when a "
            f"{cfg.direction} direction is removed while INT4 keeps it; expected at least one "
            "(try more tokens, another layer or skip_sink=False)")
    _, layer, h, i, j, pca_index = best
    return _record(cap, cfg, tokenizer, layer, h, i, j, pca_index, counts)


def _record(cap, cfg, tokenizer, layer, h, i, j, pca_index, counts) -> dict:
    meta = cap.meta
    kv = h // meta.group
    q, k = cap[layer]["q"][0, h], cap[layer]["k"][0, kv]
    u, _ = _candidates(k, cfg.direction, cfg.rank)
    kq = make_compressor("int4", "k")(cap[layer]["k"][None, 0])[0, kv]
    s, s_rm = removal_scores(q[i:i + 1], k, u[j:j + 1])
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = {"fp": s[0, : i + 1], "removed": s_rm[0, 0, : i + 1],
            "int4": (q[i] @ kq.T * scale)[: i + 1]}
    order = torch.argsort(rows["fp"], descending=True, stable=True).tolist()
    keys = order[: cfg.top]
    for name in ("removed", "int4"):
        t = int(rows[name].argmax())
        if t not in keys:
            keys.append(t)
    ids = meta.token_ids[0]

    def text(pos: int) -> str | None:
        return None if tokenizer is None else tokenizer.decode([ids[pos]])

    probs = {n: torch.softmax(r.double(), -1) for n, r in rows.items()}
    top, new = order[0], int(rows["removed"].argmax())
    margin = float(rows["fp"][top] - rows["fp"][order[1]])
    gap = float(rows["removed"][new] - rows["removed"][top])
    return {
        "layer": layer, "q_head": h, "kv_head": kv, "query": i, "query_token": ids[i],
        "query_text": text(i), "direction": cfg.direction, "pca_index": pca_index,
        "rank": cfg.rank if cfg.direction == "rank-drop" else None, "skip_sink": cfg.skip_sink,
        "margin": margin, "gap_removed": gap, "strength": min(margin, gap),
        "argmax": {n: int(r.argmax()) for n, r in rows.items()},
        "keys": [{"position": p, "token": ids[p], "text": text(p),
                  **{f"score_{n}": float(r[p]) for n, r in rows.items()},
                  **{f"prob_{n}": float(pr[p]) for n, pr in probs.items()}} for p in keys],
        "counts": counts,
    }


def run(cfg: RoutingConfig, *, data_dir=None, root=None, progress: bool = True) -> dict:
    """Find and record the example on a WikiText-2 capture of ``cfg.model``. Result::

        {"model", "n_tokens", "layer", "q_head", "kv_head", "query", "query_token", "query_text",
         "direction", "pca_index", "rank", "skip_sink", "margin", "gap_removed", "strength",
         "argmax": {"fp", "removed", "int4"},      # positions of the top-1 key
         "keys": [{"position", "token", "text", "score_fp", "score_removed", "score_int4",
                   "prob_fp", "prob_removed", "prob_int4"}],     # top keys by fp score
         "counts": {"searched", "flipped_removal", "flipped_int4", "eligible", "eligible_content"}}

    ``counts`` are numbers of searched (layer, query head, position) triples: all searched;
    those whose top-1 flips when one candidate direction (any, for ``rank-drop``) is removed;
    those INT4 flips; those flipped by a removal that INT4 keeps; and of these, those whose
    flip is between content tokens (``skip_sink``). ``margin`` is the fp top-1 minus runner-up
    logit, ``gap_removed`` the new top-1 minus the old one after removal; scores are logits.
    """
    from .common import get_model, load_or_capture

    loaded = get_model(cfg.model)
    if not loaded.info.causal:
        raise bad_argument("model", cfg.model, "a causal (decoder) model")
    layers = None if cfg.layer is None else (cfg.layer,)
    cap = load_or_capture(cfg.model, cfg.n_tokens, layers=layers, data_dir=data_dir, root=root)
    return {"model": cfg.model, "n_tokens": cfg.n_tokens,
            **find_example(cap, cfg, loaded.tokenizer, progress=progress)}


def summary(result: dict) -> dict[str, float | str]:
    """Where the example is, its fp margin, the logit gap after removal, and search counts."""
    keys = {kk["position"]: kk for kk in result["keys"]}
    fp_top = keys[result["argmax"]["fp"]]
    c = result["counts"]
    return {
        "example": f"{result['model']} layer {result['layer']} head {result['q_head']} "
                   f"query {result['query']}",
        "direction": _direction_text(result),
        "margin_fp": result["margin"],
        "gap_removed": result["gap_removed"],
        "prob_fp_top_fp": fp_top["prob_fp"], "prob_fp_top_removed": fp_top["prob_removed"],
        "prob_fp_top_int4": fp_top["prob_int4"],
        "frac_flipped_by_a_removal": c["flipped_removal"] / c["searched"],
        "flip_rate_int4": c["flipped_int4"] / c["searched"],
    }


def _direction_text(result: dict) -> str:
    text = f"PCA direction #{result['pca_index']}"
    if result["direction"] == "rank-drop":
        text += f" (dropped by rank-{result['rank']})"
    return text


def _quote(text: str | None, token: int) -> str:
    """A token shown with its spaces: repr of the decoded text, or its id."""
    return repr(text)[:14] if text is not None else f"id {token}"


def _label(key: dict) -> str:
    return f"{_quote(key['text'], key['token'])} @{key['position']}"


def plot(result: dict, out_dir) -> list:
    """``routing_failure``: logits of the top keys under fp, direction removed and INT4."""
    from ..plotstyle import COLORS, new_figure, save_figure, style

    keys = result["keys"]
    a = result["argmax"]
    series = (("fp", "fp16 keys", COLORS["fp"], "o"),
              ("removed", f"{_direction_text(result)} removed", COLORS["rank"], "X"),
              ("int4", "INT4 per-token", COLORS["quant"], "s"))
    with style():
        fig, ax = new_figure(aspect=1.05)
        y = list(range(len(keys)))[::-1]
        off = {"fp": 0.0, "removed": 0.22, "int4": -0.22}
        for name, label, color, marker in series:
            xs = [kk[f"score_{name}"] for kk in keys]
            ax.scatter(xs, [v + off[name] for v in y], color=color, marker=marker, s=14,
                       label=label, zorder=3)
            top = next(n for n, kk in enumerate(keys) if kk["position"] == a[name])
            ax.scatter([xs[top]], [y[top] + off[name]], s=70, facecolors="none",
                       edgecolors=color, linewidths=1.2, zorder=4)
        for n, kk in enumerate(keys):
            ax.plot([kk["score_fp"], kk["score_removed"]], [y[n], y[n] + off["removed"]],
                    color=COLORS["rank"], lw=0.6, alpha=0.6)
        ax.set_yticks(y, [_label(kk) for kk in keys])
        ax.set_xlabel(r"attention logit $q\cdot k/\sqrt{d}$")
        ax.set_ylabel("key token @ position")
        top = next(kk for kk in keys if kk["position"] == a["fp"])
        ax.set_title(f"Removing one key direction flips the attended token; INT4 keeps it\n"
                     f"{result['model']}, layer {result['layer']}, head {result['q_head']}, query "
                     f"{_quote(result['query_text'], result['query_token'])} @{result['query']}; "
                     f"p(top-1) {top['prob_fp']:.2f} → {top['prob_removed']:.2f} removed, "
                     f"{top['prob_int4']:.2f} INT4", fontsize=7)
        ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.16), ncol=1, fontsize=6,
                  title="circled: the top-1 key of each", title_fontsize=6, columnspacing=1.0)
        return save_figure(fig, out_dir, "routing_failure")


def plot_models(results: dict, out_dir) -> list:
    """``routing_failure-<model>`` for each model of ``{model: result}``."""
    from ..plotstyle import model_stamp, per_model

    return per_model(plot, results, out_dir,
                     lambda m, r: model_stamp(m, f"{r['n_tokens']} WikiText-2 tokens"))


STAGE = register_stage(Stage(
    name="routing", title="A discrete routing failure on a real query",
    configure=lambda size, model: RoutingConfig.for_size(size == "small", model=model),
    run=run, summary=summary, plot=plot_models, figures=("routing_failure",), claims=("C5",),
    applies=decoders))
