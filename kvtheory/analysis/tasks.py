r"""Other tasks (claims C4 and C1): LAMBADA on the causal LM, embedding fidelity on the encoder.

**LAMBADA** (OpenAI test set, the first ``lambada_limit`` passages) on ``smollm2-135m`` with
keys AND values compressed: accuracy (every target token the greedy argmax) and target-word
perplexity, with bootstrap 95% intervals over passages (:func:`kvtheory.evaluate.lambada`).
Methods: fp, INT4 per token, INT4 KIVI, rank d/4 PCA (the rank at INT4 storage:
:math:`16r/d = 4` for r = 16, d = 64), rank d/2 PCA and the hybrid ``rank{d/2}x8-pca``
(payload :math:`\tfrac12(8 + 32/32) = 4.5` bits, the INT4 payload). PCA bases are fitted on
WikiText-2 calibration tokens (another corpus, so disjoint from the passages).

**Encoder** ``minilm-l6`` (bidirectional, d = 32): mean cosine similarity of mean-pooled
sentence embeddings to the uncompressed model's and relative error of the last hidden states
(:func:`kvtheory.evaluate.embed_fidelity`) on WikiText-2 sentences; plus, on a captured window,
the attention-output relative error :math:`\|pV-\hat p\hat V\|/\|pV\|` and the top-1 flip rate
(non-causal). Methods: fp, INT4, INT4 KIVI (keys per channel over the sentence's tokens), rank
d/4 = 8 PCA (INT4 storage at d = 32) and rank d/2 = 16 PCA.

Storage (``bits``) is given without the basis (:math:`T\to\infty`): passages and sentences have
varying lengths.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from .._checks import check_int
from ..errors import bad_argument
from ..stages import Stage, register_stage
from .common import small

__all__ = ["TasksConfig", "lm_methods", "encoder_methods", "run", "plot", "summary"]


def lm_methods(d: int) -> tuple[str, ...]:
    """LAMBADA methods at head dimension d.

    >>> lm_methods(64)
    ('fp', 'int4', 'int4-kivi', 'rank16-pca', 'rank32-pca', 'rank32x8-pca')
    """
    return ("fp", "int4", "int4-kivi", f"rank{d // 4}-pca", f"rank{d // 2}-pca", f"rank{d // 2}x8-pca")


def encoder_methods(d: int) -> tuple[str, ...]:
    """Encoder methods at head dimension d.

    >>> encoder_methods(32)
    ('fp', 'int4', 'int4-kivi', 'rank8-pca', 'rank16-pca')
    """
    return ("fp", "int4", "int4-kivi", f"rank{d // 4}-pca", f"rank{d // 2}-pca")


@dataclass(frozen=True)
class TasksConfig:
    """``lm_methods``/``encoder_methods`` None: :func:`lm_methods` / :func:`encoder_methods`
    at the model's d. ``lambada_limit`` passages, ``sentences`` WikiText sentences;
    ``calib_len`` / ``encoder_calib_len`` tokens of WikiText-2's end fit the PCA bases;
    ``encoder_tokens`` tokens are captured for the attention-output error."""

    lm_model: str | None = "smollm2-135m"
    encoder: str | None = "minilm-l6"
    model: str | None = None
    lambada_limit: int = 150
    lm_methods: tuple[str, ...] | None = None
    calib_len: int = 512
    encoder_methods: tuple[str, ...] | None = None
    sentences: int = 200
    encoder_calib_len: int = 256
    encoder_tokens: int = 256
    batch_size: int = 16
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        from ..compress import parse_method

        if self.model is not None:  # one model, LAMBADA or encoder fidelity by its kind
            if not isinstance(self.model, str) or not self.model:
                raise bad_argument("model", self.model, "None or a model name or path")
            object.__setattr__(self, "lm_model", None)
            object.__setattr__(self, "encoder", None)
        elif self.lm_model is None and self.encoder is None:
            raise bad_argument("lm_model", None, "a causal LM name or path (or an encoder, or model)")
        elif self.lm_model is not None and (not isinstance(self.lm_model, str) or not self.lm_model):
            raise bad_argument("lm_model", self.lm_model, "None or a causal LM name or path")
        if self.encoder is not None and (not isinstance(self.encoder, str) or not self.encoder):
            raise bad_argument("encoder", self.encoder, "None or an encoder name or path")
        for name in ("lambada_limit", "sentences", "batch_size", "n_boot"):
            check_int(name, getattr(self, name), 1)
        for name in ("calib_len", "encoder_calib_len", "encoder_tokens"):
            check_int(name, getattr(self, name), 8)
        for name in ("lm_methods", "encoder_methods"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not value:
                raise bad_argument(name, value, "None or a non-empty tuple of specs")
            specs = tuple(str(parse_method(s)) for s in value)
            if "fp" not in specs:
                specs = ("fp",) + specs  # the reference
            object.__setattr__(self, name, specs)
        check_int("seed", self.seed, 0)

    @classmethod
    def for_size(cls, size: str | None = None, **kw) -> TasksConfig:
        """The default size, or with ``size="small"`` / ``KVTHEORY_SMALL=1`` a notebook size."""
        if (size or ("small" if small() else "default")) == "small":
            kw = {"lambada_limit": 20, "sentences": 40, "calib_len": 128, "encoder_calib_len": 128,
                  "encoder_tokens": 128} | kw
        return cls(**kw)


def _calibration(model_name: str, n: int, data_dir):
    from ..evaluate import bos_id, split_windows
    from .common import get_model, wikitext_ids

    ids = wikitext_ids(model_name, str(data_dir) if data_dir is not None else None)
    return split_windows(ids, n, 1, 1, bos=bos_id(get_model(model_name).tokenizer))[1]


def _bits(spec: str, d: int) -> float:
    from ..ledger import bits_per_element

    return (bits_per_element(spec, d, role="k") + bits_per_element(spec, d, role="v")) / 2


def _lambada(cfg: TasksConfig, data_dir, progress: bool) -> dict:
    from ..data import load_lambada
    from ..evaluate import lambada, lambada_items
    from ..plotstyle import family
    from ..engine import fitted_plan
    from .common import get_model

    lm = get_model(cfg.lm_model)
    d = lm.info.d
    items = lambada_items(lm.tokenizer, load_lambada(data_dir, cfg.lambada_limit))
    cal = _calibration(cfg.lm_model, cfg.calib_len, data_dir)
    out = {}
    for spec in cfg.lm_methods or lm_methods(d):
        kw = {}
        if spec != "fp":
            kw = {"keys": spec, "values": spec,
                  "calibration": fitted_plan(lm, cfg.lm_model, spec, spec, calibration=cal)}
        res = lambada(lm.model, items, batch_size=cfg.batch_size, n_boot=cfg.n_boot,
                      seed=cfg.seed, progress=progress, **kw)
        out[spec] = {"family": family(spec), "bits": _bits(spec, d),
                     **{k: dataclasses.asdict(v) for k, v in res.items()}}
    return {"model": cfg.lm_model, "d": d, "n_passages": len(items), "methods": out}


def _encoder(cfg: TasksConfig, data_dir, root, progress: bool) -> dict:
    from ..data import load_wikitext2
    from ..evaluate import embed_batches, embed_fidelity, embed_hidden, wiki_sentences
    from ..plotstyle import family
    from ..engine import fitted_plan
    from .common import get_model, load_or_capture
    from .predictor import capture_metrics

    enc = get_model(cfg.encoder)
    d = enc.info.d
    sentences = wiki_sentences(load_wikitext2(data_dir), cfg.sentences)
    batches = embed_batches(enc.tokenizer, sentences, max_len=enc.info.max_positions)
    cal = _calibration(cfg.encoder, cfg.encoder_calib_len, data_dir)
    cap = load_or_capture(cfg.encoder, cfg.encoder_tokens, data_dir=data_dir, root=root)
    ref = embed_hidden(enc.model, batches, progress=progress)
    out = {}
    for spec in cfg.encoder_methods or encoder_methods(d):
        plan = fitted_plan(enc, cfg.encoder, spec, spec, calibration=cal)
        hid = ref if spec == "fp" else embed_hidden(enc.model, batches, keys=spec, values=spec,
                                                    calibration=plan, progress=progress)
        fid = embed_fidelity(ref, hid, n_boot=cfg.n_boot, seed=cfg.seed)
        att = capture_metrics(enc.model, cap, plan, enc.info.causal)
        out[spec] = {"family": family(spec), "bits": _bits(spec, d),
                     **{k: dataclasses.asdict(v) for k, v in fid.items()},
                     "attn_output_rel_err": att["output_rel_err"], "flip_rate": att["flip_rate"]}
    return {"model": cfg.encoder, "d": d, "n_sentences": len(sentences),
            "capture_tokens": cfg.encoder_tokens, "methods": out}


def run(cfg: TasksConfig | None = None, *, data_dir=None, root=None, progress: bool = True) -> dict:
    """LAMBADA and encoder fidelity; plain JSON values.

    With ``cfg.model`` set, the model's kind picks one part (the other is None).
    Keys: lambada (None without an LM) {model, d, n_passages, methods {spec: {family, bits, accuracy, target_ppl}}}
    (Score dicts: metric, value, ci_low, ci_high, n_tokens, n_items); encoder (None without an
    encoder) {model, d, n_sentences, capture_tokens, methods {spec: {family, bits, cosine,
    hidden_rel_err (Score dicts), attn_output_rel_err, flip_rate}}}; seconds {lambada, encoder}.
    """
    cfg = cfg or TasksConfig.for_size()
    if cfg.model is not None:
        from .common import get_model

        causal = get_model(cfg.model).info.causal
        cfg = dataclasses.replace(cfg, model=None, lm_model=cfg.model if causal else None,
                                  encoder=None if causal else cfg.model)
    t0 = time.perf_counter()
    lam = _lambada(cfg, data_dir, progress) if cfg.lm_model is not None else None
    t1 = time.perf_counter()
    enc = _encoder(cfg, data_dir, root, progress) if cfg.encoder is not None else None
    return {"lambada": lam, "encoder": enc,
            "seconds": {"lambada": t1 - t0, "encoder": time.perf_counter() - t1}}


def summary(result: dict) -> dict[str, float | str]:
    """LAMBADA accuracy and target PPL per method (``lambada_<spec>_acc``, ``_ppl``), their
    change from fp (``_dacc``, ``_dppl``); encoder cosine, hidden and attention-output errors."""
    out: dict[str, float | str] = {}
    lam = result["lambada"]["methods"] if result.get("lambada") else {}
    fp = lam.get("fp")
    if result.get("lambada"):
        out["lambada_n_passages"] = float(result["lambada"]["n_passages"])
        out["lambada_rank_at_int4"] = f"rank{result['lambada']['d'] // 4}-pca"
    for spec, m in lam.items():
        out[f"lambada_{spec}_acc"] = m["accuracy"]["value"]
        out[f"lambada_{spec}_ppl"] = m["target_ppl"]["value"]
        if fp is not None and spec != "fp":
            out[f"lambada_{spec}_dacc"] = m["accuracy"]["value"] - fp["accuracy"]["value"]
            out[f"lambada_{spec}_dppl"] = m["target_ppl"]["value"] - fp["target_ppl"]["value"]
    if result.get("encoder"):
        out["encoder_n_sentences"] = float(result["encoder"]["n_sentences"])
        for spec, m in result["encoder"]["methods"].items():
            if spec == "fp":
                continue
            out[f"encoder_{spec}_cosine"] = m["cosine"]["value"]
            out[f"encoder_{spec}_hidden_rel_err"] = m["hidden_rel_err"]["value"]
            out[f"encoder_{spec}_attn_output_rel_err"] = m["attn_output_rel_err"]
    return out


def _short(spec: str) -> str:
    """A tick label, the spec's own (:func:`kvtheory.plotstyle.tick`): ``int4-kivi`` ->
    ``int4 KIVI``, ``rank16-pca`` -> ``rank16``.

    >>> _short("int4-kivi"), _short("rank32x8-pca")
    ('int4\\nKIVI', 'rank32\\n×INT8')
    """
    from ..plotstyle import tick

    return tick(spec)


def plot(result: dict, out_dir) -> list[Path]:
    """``tasks``: LAMBADA accuracy per method (bars, 95% CI; accuracy and target-word PPL above
    the bars) and, for the encoder, 1 − cosine of sentence embeddings to fp (log bars, 95% CI);
    bars coloured by method family, storage (bits per element, basis not counted) under each."""
    import numpy as np

    from ..plotstyle import COLORS, COLUMN_WIDTH, new_figure, save_figure, style

    enc, lam = result.get("encoder"), result.get("lambada")
    with style():
        fig, axes = new_figure(COLUMN_WIDTH, 0.5 if None in (enc, lam) else 1.0,
                               nrows=1 if None in (enc, lam) else 2, squeeze=False)
        specs = list(lam["methods"]) if lam else []
        ax = axes[0, 0]
        if lam:
            acc = np.array([100 * lam["methods"][s]["accuracy"]["value"] for s in specs])
            lo = acc - [100 * lam["methods"][s]["accuracy"]["ci_low"] for s in specs]
            hi = np.array([100 * lam["methods"][s]["accuracy"]["ci_high"] for s in specs]) - acc
            cols = [COLORS.get(lam["methods"][s]["family"], COLORS["other"]) for s in specs]
            ax.bar(range(len(specs)), acc, color=cols, yerr=[lo, hi], capsize=2, error_kw={"lw": 0.6})
            for i, (s, a) in enumerate(zip(specs, acc)):
                ppl = lam["methods"][s]["target_ppl"]["value"]
                txt = f"{ppl / 1e3:.0f}k" if ppl >= 1e4 else f"{ppl:,.0f}" if ppl >= 100 else f"{ppl:.1f}"
                ax.text(i, a + hi[i] + 1, f"{a:.0f}%\n{txt}", ha="center", va="bottom", fontsize=5)
            ax.set_xticks(range(len(specs)))
            ax.set_xticklabels([f"{_short(s)}\n{lam['methods'][s]['bits']:.3g} b" for s in specs], fontsize=6)
            ax.text(0.99, 0.97, "above bars: accuracy,\ntarget-word PPL", transform=ax.transAxes,
                    ha="right", va="top", fontsize=5.5)
            ax.set_ylabel("LAMBADA accuracy (%)")
            ax.set_ylim(0, max(acc + hi) * 1.45 + 1)
            ax.set_title(f"{lam['model']}: LAMBADA, K+V, {lam['n_passages']} passages "
                         "(ranks: PCA)", loc="left", pad=2)
        if enc is not None:
            ax = axes[-1, 0]
            specs = [s for s in enc["methods"] if s != "fp"]
            one = lambda x: max(1 - x, 1e-7)  # noqa: E731
            y = np.array([one(enc["methods"][s]["cosine"]["value"]) for s in specs])
            ylo = y - [one(enc["methods"][s]["cosine"]["ci_high"]) for s in specs]
            yhi = np.array([one(enc["methods"][s]["cosine"]["ci_low"]) for s in specs]) - y
            cols = [COLORS.get(enc["methods"][s]["family"], COLORS["other"]) for s in specs]
            ax.bar(range(len(specs)), y, color=cols, yerr=[np.maximum(ylo, 0), np.maximum(yhi, 0)],
                   capsize=2, error_kw={"lw": 0.6})
            for i, s in enumerate(specs):
                ax.text(i, y[i] * 1.3, f"cos {enc['methods'][s]['cosine']['value']:.4f}",
                        ha="center", va="bottom", fontsize=5)
            ax.set_yscale("log")
            ax.set_ylim(y.min() / 3, y.max() * 8)
            ax.set_xticks(range(len(specs)))
            ax.set_xticklabels([f"{_short(s)}\n{enc['methods'][s]['bits']:.3g} b" for s in specs],
                               fontsize=6)
            ax.set_ylabel("1 − cosine to fp (log)")
            ax.set_title(f"{enc['model']}: sentence embeddings, {enc['n_sentences']} sentences, K+V",
                         loc="left", pad=2)
        fig.tight_layout()
        return save_figure(fig, out_dir, "tasks")


def plot_models(results: dict, out_dir) -> list[Path]:
    """``tasks-<model>`` for each model of ``{model: result}`` (LAMBADA for a decoder,
    sentence-embedding fidelity for an encoder)."""
    from ..plotstyle import model_stamp, per_model

    return per_model(plot, results, out_dir, lambda m, r: model_stamp(m, "K+V compressed"))


STAGE = register_stage(Stage(
    name="tasks", title="LAMBADA and the encoder",
    configure=lambda size, model: TasksConfig.for_size(size, model=model),
    run=run, summary=summary, plot=plot_models, figures=("tasks",), claims=("C4",)))
