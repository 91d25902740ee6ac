r"""Benchmarks: every speed claim is a ratio of two things timed side by side in one process.

Each case times a kvtheory code path ``B`` against the baseline ``A`` it must be compared with,
interleaved over repetitions (:func:`kvtheory.timing.side_by_side`), and reports the medians and
:math:`\mathrm{median}(t_B)/\mathrm{median}(t_A)` against a target. Cases (``kvtheory bench``):

============  =======================================================================  ==========
case          compares                                                                 target
============  =======================================================================  ==========
``eval``      PPL evaluation (``window_nll``) under ``int4-kivi`` / ``rank16-pca``       ≤ 1.10× /
              against the uncompressed forward on the same tokens; the PCA basis is      ≤ 1.25×
              fitted once before timing and its fit time reported on its own row
``quanto``    transformers' ``QuantizedCache(backend="quanto", nbits=4)``, decoded       ≥ 50×
              token by token to get a PPL, against kvtheory's one-pass causal            faster
              simulation (``compressed_kv`` with ``int4-g64``) on the same tokens
``flips``     :func:`kvtheory.flips.attention_metrics` against the two bare matmuls      ≤ 1.5×
              :math:`QK^\top` and :math:`Q\hat K^\top` of the same shapes and dtype
``memory``    peak memory of ``attention_metrics`` at 32,768 tokens × 9 query heads ×    < 2 GiB
              d = 64 (CPU: peak RSS of a subprocess above its baseline; CUDA:
              ``torch.cuda.max_memory_allocated`` above the memory held before)
``capture``   :func:`~kvtheory.capture.capture` + :func:`~kvtheory.capture.save_capture`   ≤ 1.3×
              against a plain forward of the same tokens
============  =======================================================================  ==========

Every case returns a JSON-ready dict with its ``timings`` (median, min, max, reps per label)
and its table ``rows`` (:data:`ROW_KEYS`); :func:`render_table` prints them. Flop counts:
:func:`flip_flops` counts the two matmuls only, :math:`2 \times 2BHQTd` (softmax, top-k and the
metric reductions are not counted).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_int
from .errors import KVTheoryError, bad_argument
from .timing import Timing, side_by_side, sync

__all__ = [
    "CASES", "ROW_KEYS", "TARGETS", "SMOLLM2_SHAPE", "MISTRAL7B_SHAPE", "flip_flops",
    "make_row", "ratio_row", "machine", "smollm2_shaped_model", "mistral7b_shaped_model",
    "quanto_available", "quanto_decode_nll", "onepass_nll",
    "quanto_spec", "random_ids",
    "case_eval", "case_quanto", "case_flips", "case_memory", "case_capture", "matmul_peak",
    "flip_inputs", "render_table", "table_text", "results_document", "compressor_share",
]

#: the case names of ``kvtheory bench --only``, in running order
CASES = ("eval", "quanto", "flips", "memory", "capture")
#: target per compared label: (operator, value)
TARGETS: dict[str, tuple[str, float]] = {
    "int4-kivi": ("<=", 1.10),
    "rank16-pca": ("<=", 1.25),
    "quanto": (">=", 50.0),
    "attention_metrics": ("<=", 1.5),
    "attention_metrics_gpu": ("<=", 2.0),
    "flip_rate_gpu": ("<=", 1.3),
    "memory": ("<", 2.0 * 2**30),
    "capture": ("<=", 1.3),
}
#: the keys of a table row
ROW_KEYS = ("case", "what", "device", "dtype", "baseline", "baseline_s", "measured",
            "measured_s", "ratio", "target", "met", "note")
#: SmolLM2-135M's shape (LlamaConfig keywords), for random-weight models where nothing downloads
SMOLLM2_SHAPE: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
)
#: Mistral-7B's shape (MistralConfig keywords): the GPU benchmarks' 7B-shaped model
MISTRAL7B_SHAPE: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
)
_GIB = 2**30


# ----------------------------------------------------------------------------- rows
def flip_flops(batch: int, q_heads: int, queries: int, tokens: int, d: int, matmuls: int = 2) -> int:
    r"""Flops of the flip engine's matmuls: ``matmuls`` × :math:`2BHQTd` (multiply + add).

    Softmax, top-k and the metric reductions are not counted.

    >>> flip_flops(1, 9, 1024, 1024, 64)
    2415919104
    """
    for name, v in (("batch", batch), ("q_heads", q_heads), ("queries", queries),
                    ("tokens", tokens), ("d", d), ("matmuls", matmuls)):
        check_int(name, v, 1)
    return matmuls * 2 * batch * q_heads * queries * tokens * d


def _met(value: float | int | None, target: tuple[str, float] | None) -> bool | None:
    if value is None or target is None or not math.isfinite(value):
        return None
    op, bound = target
    return {"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[op]


def _target_text(target: tuple[str, float] | None, unit: str = "×") -> str:
    if target is None:
        return "—"
    op, bound = target
    sym = {"<=": "≤", "<": "<", ">=": "≥", ">": ">"}[op]
    if unit == "GiB":
        return f"{sym} {bound / _GIB:g} GiB"
    return f"{sym} {bound:g}×"


def _secs(t: float | None) -> str:
    if t is None:
        return "—"
    if t >= 100:
        return f"{t:.0f} s"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"


def make_row(case: str, what: str, *, device: str, dtype: str, baseline: str = "—",
             baseline_s: float | None = None, measured: str = "—",
             measured_s: float | None = None, ratio: float | None = None,
             target: tuple[str, float] | None = None, met: bool | None = None,
             note: str = "", target_text: str | None = None) -> dict[str, Any]:
    """One table row (keys :data:`ROW_KEYS`); ``met`` defaults to ``ratio`` against ``target``.

    >>> r = make_row("x", "y", device="cpu", dtype="float32", ratio=1.2, target=("<=", 1.5))
    >>> r["met"], r["target"]
    (True, '≤ 1.5×')
    """
    return {
        "case": case, "what": what, "device": device, "dtype": dtype,
        "baseline": baseline, "baseline_s": baseline_s, "measured": measured,
        "measured_s": measured_s, "ratio": ratio,
        "target": target_text if target_text is not None else _target_text(target),
        "met": _met(ratio, target) if met is None else met, "note": note,
    }


def ratio_row(case: str, what: str, timing: Timing, label: str, baseline: str, *, device: str,
              dtype: str, target: tuple[str, float] | None = None, note: str = "",
              invert: bool = False) -> dict[str, Any]:
    r"""A row comparing ``label`` with ``baseline``: ratio ``median(label)/median(baseline)``,
    or its inverse (a speed-up of ``label`` over ``baseline``) when ``invert``.

    >>> t = Timing({"a": [1.0, 3.0, 2.0], "b": [4.0, 5.0, 6.0]})
    >>> ratio_row("c", "b vs a", t, "b", "a", device="cpu", dtype="float32")["ratio"]
    2.5
    """
    ma, mb = timing.median(baseline), timing.median(label)
    ratio = (ma / mb) if invert else (mb / ma)
    return make_row(case, what, device=device, dtype=dtype, baseline=f"{baseline} {_secs(ma)}",
                    baseline_s=ma, measured=f"{label} {_secs(mb)}", measured_s=mb, ratio=ratio,
                    target=target, note=note)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: Any) -> torch.dtype:
    from .models import _as_dtype as as_dtype

    return as_dtype(dtype)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _case(name: str, timing: Timing | None, rows: list[dict[str, Any]], **extra: Any) -> dict:
    return {"case": name, "timings": {} if timing is None else timing.summary(), "rows": rows,
            **extra}


# ----------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), cores, memory, GPU name, torch threads and load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / _GIB, 1),
               "cuda": torch.version.cuda}
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": mem,
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "load_average": load,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------- models
def smollm2_shaped_model(device: Any = "cpu", dtype: Any = torch.float32, seed: int = 0,
                         **overrides: Any) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of SmolLM2-135M's shape (:data:`SMOLLM2_SHAPE`) with random weights.

    For machines where nothing can be downloaded; ``overrides`` change the shape (tests use tiny ones).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**SMOLLM2_SHAPE, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=_as_dtype(dtype)).eval()


def mistral7b_shaped_model(device: Any = "cpu", dtype: Any = torch.bfloat16, seed: int = 0,
                           **overrides: Any) -> torch.nn.Module:
    """A ``MistralForCausalLM`` of Mistral-7B's shape (:data:`MISTRAL7B_SHAPE`, 7.2e9
    parameters) with random weights, made on ``device`` in ``dtype`` (no float32 copy first);
    ``overrides`` change the shape (a dry run uses a tiny one)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(**{**MISTRAL7B_SHAPE, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=_as_dtype(dtype))
    return model.eval()


def random_ids(n: int, vocab: int, *, batch: int | None = None, seed: int = 0) -> Tensor:
    """Seeded random token ids in 1..vocab-1, shaped (n,) or (batch, n)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if batch is None else (batch, n)
    return torch.randint(1, vocab, shape, generator=g)


# ----------------------------------------------------------------------------- 1. eval
EVAL_METHODS = ("int4-kivi", "rank16-pca")


def case_eval(model: torch.nn.Module, windows: Int[Tensor, "batch token"],
              calibration: Int[Tensor, "..."], *, methods: tuple[str, ...] = EVAL_METHODS,
              reps: int = 5, warmup: int = 1, shape: str = "") -> dict[str, Any]:
    """PPL evaluation (:func:`~kvtheory.evaluate.window_nll`) under each method vs uncompressed.

    Bases learnt from data are fitted once on ``calibration`` before timing (fit time on its own
    row, against one uncompressed evaluation of ``windows``); the timed function is what a user
    runs per evaluation: enter :func:`~kvtheory.patch.compressed_kv` with the fitted compressors,
    score the windows. Keys and values both get the method. ``shape`` names the model's shape
    in the rows (", Mistral-7B shape") where it is not the default benchmark model.
    """
    from .compress import make_compressor
    from .evaluate import window_nll
    from .patch import clear_fit_cache, compressed_kv, fit_compressors

    dev, dtype = _device(model), next(model.parameters()).dtype
    plans: dict[str, Any] = {}
    fit_s: dict[str, float] = {}
    for m in methods:
        if make_compressor(m, "k").needs_fit or make_compressor(m, "v").needs_fit:
            clear_fit_cache()
            sync(dev)
            t0 = time.perf_counter()
            plans[m] = fit_compressors(model, m, m, calibration)
            sync(dev)
            fit_s[m] = time.perf_counter() - t0
        else:
            plans[m] = None
    ppl: dict[str, float] = {}

    def scorer(label: str) -> Callable[[], None]:
        def run() -> None:
            if label == "fp":
                nll, cnt = window_nll(model, windows)
            else:
                with compressed_kv(model, label, label, calibration=plans[label]):
                    nll, cnt = window_nll(model, windows)
            ppl[label] = math.exp(float(nll.sum()) / float(cnt.sum()))
        return run

    labels = ("fp",) + tuple(methods)
    timing = side_by_side({lab: scorer(lab) for lab in labels}, reps=reps, warmup=warmup, device=dev)
    share = {m: compressor_share(scorer(m), dev) for m in methods}
    w, n = windows.shape
    kw = dict(device=dev.type, dtype=_dtype_name(dtype))
    rows = []
    for m in methods:
        extra = " (basis fitted once, not timed)" if m in fit_s else ""
        inside, total = share[m]
        rows.append(ratio_row("eval", f"{m} PPL eval vs fp forward, {w}×{n} tok{shape}{extra}",
                              timing,
                              m, "fp", target=TARGETS.get(m), note=f"PPL {ppl[m]:.3f} vs fp "
                              f"{ppl['fp']:.3f}; {reps} reps; compressors "
                              f"{100 * inside / total:.1f}% of an instrumented run", **kw))
    for m, t in fit_s.items():
        c = tuple(calibration.shape)
        rows.append(make_row(
            "eval", f"{m} basis fit, once ({c[0]}×{c[1]} calibration tok{shape})",
            baseline="fp "
            + _secs(timing.median("fp")), baseline_s=timing.median("fp"), measured=_secs(t),
            measured_s=t, ratio=t / timing.median("fp"), note="one forward + eigh per layer; "
            "cached by fit_compressors", **kw))
    return _case("eval", timing, rows, windows=[w, n], calibration=list(calibration.shape),
                 fit_s=fit_s, ppl=ppl, methods=list(methods),
                 compressor_s={m: {"inside_s": share[m][0], "total_s": share[m][1]}
                               for m in methods})


def compressor_share(run: Callable[[], Any], device: Any) -> tuple[float, float]:
    """``(seconds inside the compressors, seconds in all)`` of one ``run()``.

    Every compressor call that :func:`kvtheory.patch.compressed_kv` makes goes through
    ``patch._apply``; this wraps it with a timer (and a device sync on each side, which on a
    GPU adds waiting the uninstrumented run does not have). Robust to machine noise, unlike
    a ratio of two totals when the compressors cost a few percent.
    """
    from . import patch

    inner = patch._apply
    spent = [0.0]

    def timed(comp, x, *mask):
        sync(device)
        t0 = time.perf_counter()
        y = inner(comp, x, *mask)
        sync(device)
        spent[0] += time.perf_counter() - t0
        return y

    patch._apply = timed
    try:
        total = _time_once(run, device)
    finally:
        patch._apply = inner
    return spent[0], total


# ----------------------------------------------------------------------------- 2. quanto
def quanto_available() -> bool:
    """Whether optimum-quanto (the ``quanto`` extra) can be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except (ImportError, ValueError):
        return False


def _require_quanto() -> None:
    if not quanto_available():
        raise KVTheoryError("quanto: got no module 'optimum.quanto'; expected it installed: "
                            "pip install 'kvtheory[quanto]' (optimum-quanto>=0.2.7)")


@torch.inference_mode()
def quanto_decode_nll(model: torch.nn.Module, ids: Int[Tensor, " token"], *, cache: Any = "quanto",
                      nbits: int = 4, q_group_size: int = 64, residual_length: int = 128
                      ) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` decoded one token at a time through a cache.

    ``cache="quanto"``: ``transformers.QuantizedCache(backend="quanto", nbits, q_group_size,
    residual_length)`` with its default axes (0 for keys and values); ``cache=None``: a plain
    ``DynamicCache``. Token ``t`` is fed alone and its logits score token ``t+1``: N-1 forwards
    for N tokens, the route a user takes since the quantized cache returns unquantized states
    for the tokens of the call that fills it (a one-call prefill would score fp attention).
    Returns ``(nll summed in float64, number of scored tokens)``.
    """
    from transformers import DynamicCache

    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise bad_argument("ids", ids, "at least 2 token ids")
    if cache == "quanto":
        _require_quanto()
        from transformers import QuantizedCache

        past: Any = QuantizedCache(backend="quanto", config=model.config, nbits=nbits,
                                   q_group_size=q_group_size, residual_length=residual_length)
    elif cache is None:
        past = DynamicCache(config=model.config)
    else:
        raise bad_argument("cache", cache, "'quanto' or None")
    dev = _device(model)
    ids = ids.to(dev)
    losses = []
    for t in range(ids.numel() - 1):
        out = model(input_ids=ids[None, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        losses.append(torch.nn.functional.cross_entropy(out.logits[0, -1].float(), ids[t + 1]))
    return float(torch.stack(losses).double().sum()), len(losses)


def onepass_nll(model: torch.nn.Module, ids: Int[Tensor, " token"], spec: str | None = "int4-g64"
                ) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` in one causal forward, keys and values compressed by
    ``spec`` (None: uncompressed) inside every attention layer."""
    from .evaluate import window_nll
    from .patch import compressed_kv

    w = ids.reshape(1, -1)
    if spec is None:
        nll, cnt = window_nll(model, w)
    else:
        with compressed_kv(model, spec, spec):
            nll, cnt = window_nll(model, w)
    return float(nll.sum()), int(cnt.sum())


def _bracketed(slow: Callable[[], Any], fast: Callable[[], Any], reps: int, device: Any) -> Timing:
    """One timed run of ``slow`` between the ``reps`` timed runs of ``fast``: half of them
    before, the rest after (``fast`` warmed up once first); labels ``slow`` and ``fast``.

    >>> t = _bracketed(lambda: None, lambda: None, 3, "cpu")
    >>> len(t.times["slow"]), len(t.times["fast"])
    (1, 3)
    """
    fast()
    before = (reps + 1) // 2
    fast_t = [_time_once(fast, device) for _ in range(before)]
    slow_t = [_time_once(slow, device)]
    fast_t += [_time_once(fast, device) for _ in range(reps - before)]
    return Timing({"slow": slow_t, "fast": fast_t})


def quanto_spec(d: int, nbits: int = 4, q_group_size: int = 64) -> str:
    """The kvtheory spec closest to quanto's default axes (0: groups of ``q_group_size``
    consecutive elements of the flattened (batch, head, token, d) states): per token in groups
    of ``q_group_size`` channels when that divides ``d`` (identical groups), else per token.

    >>> quanto_spec(64), quanto_spec(128), quanto_spec(8)
    ('int4-g64', 'int4-g64', 'int4')
    """
    return f"int{nbits}-g{q_group_size}" if d % q_group_size == 0 else f"int{nbits}"


def case_quanto(model: torch.nn.Module, ids: Int[Tensor, " token"], *, spec: str | None = None,
                reps: int = 5, nbits: int = 4, q_group_size: int = 64, residual_length: int = 128,
                fp_decode: bool = True) -> dict[str, Any]:
    """Token-by-token decode through transformers' quanto ``QuantizedCache`` (1 timed rep, it is
    slow) vs kvtheory's one-pass causal simulation with ``spec`` (default :func:`quanto_spec`;
    ``reps`` timed reps, half before and half after the quanto run). With ``fp_decode`` also one
    timed token-by-token decode through a plain ``DynamicCache``: the cost of the loop itself.
    """
    from .models import model_info

    _require_quanto()
    dev, dtype = _device(model), next(model.parameters()).dtype
    spec = spec or quanto_spec(model_info(model).d, nbits, q_group_size)
    ids = ids.reshape(-1)
    n = int(ids.numel())
    # a short untimed decode first: quanto's first calls set up its kernels
    quanto_decode_nll(model, ids[:4], nbits=nbits, q_group_size=q_group_size,
                      residual_length=residual_length)
    res: dict[str, tuple[float, int]] = {}

    def slow():
        res["quanto"] = quanto_decode_nll(model, ids, nbits=nbits, q_group_size=q_group_size,
                                          residual_length=residual_length)

    def fast():
        res["onepass"] = onepass_nll(model, ids, spec)

    bt = _bracketed(slow, fast, reps, dev)
    timing = Timing({"quanto": bt.times["slow"], "onepass": bt.times["fast"]})
    res["fp"] = onepass_nll(model, ids, None)
    ppl = {k: math.exp(v[0] / v[1]) for k, v in res.items()}
    kw = dict(device=dev.type, dtype=_dtype_name(dtype))
    rows = [ratio_row(
        "quanto", f"one-pass {spec} vs QuantizedCache(quanto, int{nbits}) token-by-token, {n} tok",
        timing, "onepass", "quanto", invert=True, target=TARGETS["quanto"],
        note=f"speed-up; quanto 1 rep, one-pass {reps} reps; PPL quanto {ppl['quanto']:.3f}, "
             f"one-pass {ppl['onepass']:.3f}, fp {ppl['fp']:.3f}", **kw)]
    rows[0]["baseline"] = f"quanto {_secs(timing.median('quanto'))}"
    rows[0]["measured"] = f"one-pass {_secs(timing.median('onepass'))}"
    if fp_decode:
        def decode_fp():
            res["fp_decode"] = quanto_decode_nll(model, ids, cache=None)

        t = Timing({"fp_decode": [_time_once(decode_fp, dev)]})
        timing = Timing({**timing.times, **t.times})
        ppl["fp_decode"] = math.exp(res["fp_decode"][0] / res["fp_decode"][1])
        rows.append(make_row(
            "quanto", f"fp token-by-token decode (DynamicCache) vs one-pass {spec}, {n} tok",
            baseline=f"fp decode {_secs(timing.median('fp_decode'))}",
            baseline_s=timing.median("fp_decode"),
            measured=f"one-pass {_secs(timing.median('onepass'))}",
            measured_s=timing.median("onepass"),
            ratio=timing.median("fp_decode") / timing.median("onepass"),
            note=f"speed-up, for scale: the decode loop without quanto; 1 rep; PPL "
                 f"{ppl['fp_decode']:.3f}", **kw))
    return _case("quanto", timing, rows, tokens=n, spec=spec, ppl=ppl,
                 quanto={"nbits": nbits, "q_group_size": q_group_size,
                         "residual_length": residual_length, "axis_key": 0, "axis_value": 0,
                         "reps": 1},
                 onepass_reps=reps)


def _time_once(fn: Callable[[], Any], device: Any) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- 3. flips
def flip_inputs(tokens: int, *, q_heads: int = 9, kv_heads: int = 3, d: int = 64, batch: int = 1,
                device: Any = "cpu", dtype: Any = torch.float32, seed: int = 0
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic ``q`` (batch, q_head, token, d), ``k`` and ``k_hat`` (batch, kv_head, token, d):
    Gaussian q and k, ``k_hat`` = k quantized to int4 per token (:func:`kvtheory.quantize.quantize`)."""
    from .quantize import quantize

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, tokens, d, generator=g, dtype=torch.float32)
    k = torch.randn(batch, kv_heads, tokens, d, generator=g, dtype=torch.float32)
    kh = quantize(k, 4)
    dt = _as_dtype(dtype)
    return tuple(x.to(device=device, dtype=dt) for x in (q, k, kh))  # type: ignore[return-value]


def case_flips(*, tokens: int = 2048, q_heads: int = 9, kv_heads: int = 3, d: int = 64,
               device: Any = "cpu", dtype: Any = torch.float32, reps: int = 5, warmup: int = 1,
               causal_row: bool = True, seed: int = 0, fp32_row: bool = True,
               torch_row: bool = False) -> dict[str, Any]:
    r"""``attention_metrics(q, k, k_hat)`` (keys only, no values) vs the two bare matmuls
    :math:`QK^\top`, :math:`Q\hat K^\top` (``torch.matmul`` of the shapes the engine multiplies,
    ``(kv_head, g·Q, d) @ (kv_head, d, T)``, in the inputs' dtype), all queries over all tokens.

    The target row is non-causal (the engine does the same matmul flops as the baseline); with
    ``causal_row`` a second row times the causal engine, which skips the hidden key blocks,
    against the same full matmuls. Also ``flip_rate`` (the lightweight flip-only engine).
    TFLOP/s count :func:`flip_flops` (2 matmuls; softmax etc. not counted). On CUDA the targets
    are those of issue 12 (``attention_metrics`` ≤ 2×, ``flip_rate`` ≤ 1.3×); ``fp32_row``
    adds the bf16 inputs' matmuls upcast to fp32 (their output is twice the bytes: leave it out
    where that does not fit), ``torch_row`` times ``attention_metrics`` with the fused kernel
    switched off (``KVTHEORY_FUSED=never``), once.
    """
    from .flips import attention_metrics, flip_rate

    dev = torch.device(device)
    q, k, kh = flip_inputs(tokens, q_heads=q_heads, kv_heads=kv_heads, d=d, device=dev,
                           dtype=dtype, seed=seed)
    g = q_heads // kv_heads
    qg = q.reshape(1, kv_heads, g * tokens, d)

    def matmuls():
        torch.matmul(qg, k.mT)
        torch.matmul(qg, kh.mT)

    fns: dict[str, Callable[[], Any]] = {
        "matmul": matmuls,
        "attention_metrics": lambda: attention_metrics(q, k, kh, causal=False),
        "flip_rate": lambda: flip_rate(q, k, kh, causal=False),
    }
    if causal_row:
        fns["attention_metrics_causal"] = lambda: attention_metrics(q, k, kh, causal=True)
    if q.dtype in (torch.bfloat16, torch.float16) and fp32_row:
        qf, kf, khf = q.float().reshape(1, kv_heads, g * tokens, d), k.float(), kh.float()

        def matmuls_fp32():
            torch.matmul(qf, kf.mT)
            torch.matmul(qf, khf.mT)

        fns["matmul_fp32"] = matmuls_fp32
    timing = side_by_side(fns, reps=reps, warmup=warmup, device=dev)
    if torch_row:
        from ._triton_metrics import torch_path

        with torch_path():
            slow = side_by_side({"attention_metrics_torch": fns["attention_metrics"]}, reps=1,
                                warmup=1, device=dev)
        timing = Timing({**timing.times, **slow.times})
    flops = flip_flops(1, q_heads, tokens, tokens, d)
    tflops = {lab: flops / timing.median(lab) / 1e12 for lab in timing.times}
    dt = _dtype_name(q.dtype)
    shape = f"T={tokens}, {q_heads}/{kv_heads} heads, d={d}"
    kw = dict(device=dev.type, dtype=dt)
    gpu = dev.type == "cuda"
    rows = [
        ratio_row("flips", f"attention_metrics vs 2 bare matmuls ({shape}, non-causal)", timing,
                  "attention_metrics", "matmul",
                  target=TARGETS["attention_metrics_gpu" if gpu else "attention_metrics"],
                  note=f"{tflops['attention_metrics']:.3g} TFLOP/s vs matmul "
                       f"{tflops['matmul']:.3g} (2·2BHQTd flops)", **kw),
        ratio_row("flips", f"flip_rate vs 2 bare matmuls ({shape}, non-causal)", timing,
                  "flip_rate", "matmul", target=TARGETS["flip_rate_gpu"] if gpu else None,
                  note=f"{tflops['flip_rate']:.3g} TFLOP/s", **kw),
    ]
    if torch_row:
        rows.append(ratio_row(
            "flips", f"attention_metrics, torch path (KVTHEORY_FUSED=never), vs 2 bare matmuls "
            f"({shape}, non-causal)", timing, "attention_metrics_torch", "matmul",
            note=f"one timed call; {tflops['attention_metrics_torch']:.3g} TFLOP/s", **kw))
    if causal_row:
        rows.append(ratio_row(
            "flips", f"causal attention_metrics vs the same 2 full matmuls ({shape})", timing,
            "attention_metrics_causal", "matmul",
            note="causal skips hidden key blocks: fewer flops than the baseline", **kw))
    if "matmul_fp32" in fns:
        rows.append(ratio_row(
            "flips", f"attention_metrics vs 2 matmuls upcast to fp32 ({shape}, non-causal)",
            timing, "attention_metrics", "matmul_fp32",
            note=f"the engine computes logits in fp32; fp32 matmuls "
                 f"{tflops['matmul_fp32']:.3g} TFLOP/s", **kw))
    return _case("flips", timing, rows, shape={"batch": 1, "q_heads": q_heads,
                 "kv_heads": kv_heads, "queries": tokens, "tokens": tokens, "d": d},
                 flops_per_call=flops, flop_count="2 matmuls x 2*B*H*Q*T*d (softmax, top-k, "
                 "metric reductions not counted)", tflops=tflops)


def matmul_peak(*, n: int = 8192, device: Any = "cuda", dtype: Any = torch.bfloat16,
                reps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """TFLOP/s of one ``n×n @ n×n`` ``torch.matmul`` on random data (median of ``reps``)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, generator=g).to(_as_dtype(dtype))
    b = torch.randn(n, n, device=dev, generator=g).to(_as_dtype(dtype))
    t = side_by_side({"matmul": lambda: torch.matmul(a, b)}, reps=reps, warmup=warmup, device=dev)
    return {"n": n, "dtype": _dtype_name(a.dtype), "median_s": t.median("matmul"),
            "tflops": 2 * n**3 / t.median("matmul") / 1e12, "reps": reps}


# ----------------------------------------------------------------------------- memory
def _proc_status(key: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_child(tokens: int, q_heads: int, kv_heads: int, d: int, dtype: str, causal: bool,
                  queries: int) -> None:  # pragma: no cover - runs in a subprocess
    """Print the peak resident memory of one ``attention_metrics`` call (JSON on stdout).

    ``ru_maxrss`` survives ``fork`` + ``exec`` (Linux keeps the parent's high-water mark, here a
    process holding a model), so the peak is read from ``VmHWM``, the high-water mark of this
    process image, after resetting it to the current RSS (``/proc/self/clear_refs``); the
    ``ru_maxrss`` readings are kept for reference.
    """
    import resource

    from kvtheory.flips import attention_metrics

    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    qs, ks, khs = flip_inputs(32, q_heads=q_heads, kv_heads=kv_heads, d=d, dtype=dtype)
    attention_metrics(qs, ks, khs, ks, causal=causal)  # warm-up: lazily loaded kernels
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        pass
    base_rss, base_max = _proc_status("VmRSS"), maxrss()
    q, k, kh = flip_inputs(tokens, q_heads=q_heads, kv_heads=kv_heads, d=d, dtype=dtype)
    v = k.clone()
    q = q[:, :, tokens - queries:].contiguous()
    inputs = sum(x.numel() * x.element_size() for x in (q, k, kh, v))
    t0 = time.perf_counter()
    m = attention_metrics(q, k, kh, v, causal=causal)
    elapsed = time.perf_counter() - t0
    hwm = _proc_status("VmHWM")
    if reset and hwm is not None and base_rss is not None:
        peak, method = hwm - base_rss, ("peak RSS (VmHWM, reset after imports and a warm-up) "
                                        "minus the RSS then, in a subprocess")
    else:
        peak, method = maxrss() - base_max, "ru_maxrss minus its value after imports and a warm-up"
    print(json.dumps({"baseline_rss": base_rss, "peak_hwm": hwm, "baseline_maxrss": base_max,
                      "peak_maxrss": maxrss(), "peak_bytes": peak, "method": method,
                      "input_bytes": inputs, "elapsed_s": elapsed,
                      "flip_rate": m.mean()["flip_rate"]}))


def _memory_cpu(tokens, q_heads, kv_heads, d, dtype, causal, queries, timeout) -> dict[str, Any]:
    code = ("import sys; from kvtheory.bench import _memory_child; "
            f"_memory_child({tokens}, {q_heads}, {kv_heads}, {d}, {dtype!r}, {causal}, {queries})")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise KVTheoryError(f"memory: got no result within {timeout} s; expected the "
                            "attention_metrics subprocess to finish (use fewer --memory-queries)"
                            ) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KVTheoryError(f"memory: the attention_metrics subprocess failed ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_cuda(tokens, q_heads, kv_heads, d, dtype, causal, queries, device) -> dict[str, Any]:
    from .flips import attention_metrics

    dev = torch.device(device)
    qs, ks, khs = flip_inputs(32, q_heads=q_heads, kv_heads=kv_heads, d=d, device=dev, dtype=dtype)
    attention_metrics(qs, ks, khs, ks, causal=causal)
    del qs, ks, khs
    sync(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    q, k, kh = flip_inputs(tokens, q_heads=q_heads, kv_heads=kv_heads, d=d, device=dev, dtype=dtype)
    v = k.clone()
    q = q[:, :, tokens - queries:].contiguous()
    inputs = sum(x.numel() * x.element_size() for x in (q, k, kh, v))
    t0 = time.perf_counter()
    m = attention_metrics(q, k, kh, v, causal=causal)
    sync(dev)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev)
    return {"baseline_bytes": base, "peak_allocated": peak, "peak_bytes": peak - base,
            "input_bytes": inputs, "elapsed_s": elapsed, "flip_rate": m.mean()["flip_rate"],
            "method": "torch.cuda.max_memory_allocated minus memory_allocated before the inputs"}


def case_memory(*, tokens: int = 32768, q_heads: int = 9, kv_heads: int = 3, d: int = 64,
                device: Any = "cpu", dtype: Any = torch.float32, causal: bool = True,
                queries: int | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Peak memory of one ``attention_metrics(q, k, k_hat, v, causal=causal)`` call at ``tokens``
    keys and ``queries`` (default all) queries, the inputs included."""
    tokens = check_int("tokens", tokens, 1)
    queries = tokens if queries is None else check_int("queries", queries, 1, tokens)
    dev = torch.device(device)
    dt = _dtype_name(_as_dtype(dtype))
    if dev.type == "cpu":
        out = _memory_cpu(tokens, q_heads, kv_heads, d, dt, causal, queries, timeout)
    elif dev.type == "cuda":
        out = _memory_cuda(tokens, q_heads, kv_heads, d, dt, causal, queries, dev)
    else:
        raise bad_argument("device", str(device), "cpu or cuda")
    peak = out["peak_bytes"]
    target = TARGETS["memory"]
    row = make_row(
        "memory", f"attention_metrics peak memory, {tokens} tok × {q_heads} q heads × d={d}"
        f"{'' if queries == tokens else f' ({queries} queries)'}, {'causal' if causal else 'full'}",
        device=dev.type, dtype=dt, measured=f"{peak / _GIB:.3f} GiB", measured_s=None,
        target_text=_target_text(target, "GiB"), met=_met(float(peak), target),
        note=f"inputs {out['input_bytes'] / _GIB:.3f} GiB included; {out['elapsed_s']:.1f} s; "
             + ("peak RSS − RSS before, subprocess" if dev.type == "cpu" else
                "cuda max_memory_allocated − before"))
    return _case("memory", None, [row], tokens=tokens, queries=queries, q_heads=q_heads,
                 kv_heads=kv_heads, d=d, causal=causal, **out)


# ----------------------------------------------------------------------------- 4. capture
def case_capture(model: Any, ids: Int[Tensor, "batch token"], *, reps: int = 5, warmup: int = 1,
                 out_dir: str | os.PathLike | None = None, shape: str = "",
                 breakdown: bool | None = None) -> dict[str, Any]:
    """``capture(model, ids)`` (q, k, v of every layer, float32 on the CPU) followed by
    ``save_capture`` (safetensors + SHA-256 manifest) vs a plain forward of the same ids;
    ``shape`` as in :func:`case_eval`.

    On an accelerator (``breakdown``, default: the model is not on the CPU) two more rows say
    where the time goes: the capture alone (to the CPU in float32, not saved) and the capture
    kept on the device as computed (``capture(..., dtype=None, device=None)``). The ≤ 1.3×
    target is the CPU case's (benchmarks/README.md); on a GPU writing the file is disk-bound, so
    those rows carry none."""
    from ._hf import check_ids as _check_ids, forward as _forward, unwrap as _unwrap
    from .capture import capture, capture_size, save_capture

    inner = _unwrap(model)
    dev, dtype = _device(inner), next(inner.parameters()).dtype
    ids = _check_ids(ids, "ids").to(dev)
    tmp = tempfile.TemporaryDirectory(prefix="kvtheory-bench-capture-", dir=out_dir)
    size: dict[str, int] = {}

    def forward():
        with torch.no_grad():
            _forward(inner, ids)

    def cap_save():
        cap = capture(model, ids)
        size["bytes"] = capture_size(cap)
        save_capture(cap, Path(tmp.name) / "cap")

    fns = {"forward": forward, "capture+save": cap_save}
    gpu = dev.type != "cpu" if breakdown is None else bool(breakdown)
    if gpu:
        fns["capture"] = lambda: capture(model, ids)
        fns["capture_on_device"] = lambda: capture(model, ids, dtype=None, device=None)
    try:
        timing = side_by_side(fns, reps=reps, warmup=warmup, device=dev)
    finally:
        tmp.cleanup()
    b, n = ids.shape
    mib = size["bytes"] / 2**20
    kw = dict(device=dev.type, dtype=_dtype_name(dtype))
    save_s = timing.median("capture+save") - (timing.median("capture") if gpu else 0.0)
    rows = [ratio_row("capture", f"capture + save_capture vs plain forward, {b}×{n} tok, all "
                      f"layers{shape}", timing, "capture+save", "forward",
                      target=None if gpu else TARGETS["capture"],
                      note=f"{mib:.0f} MiB of q/k/v written; {reps} reps" + (
                          f"; saving {save_s:.2f} s ({mib / max(save_s, 1e-9):.0f} MiB/s, "
                          "SHA-256 + atomic write): disk-bound, so no target" if gpu else ""),
                      **kw)]
    if gpu:
        rows.append(ratio_row("capture", f"capture to the CPU in float32 (not saved) vs plain "
                              f"forward, {b}×{n} tok{shape}", timing, "capture", "forward",
                              note=f"{mib:.0f} MiB copied off the GPU", **kw))
        rows.append(ratio_row("capture", f"capture kept on the GPU as computed vs plain forward, "
                              f"{b}×{n} tok{shape}", timing, "capture_on_device", "forward",
                              target=TARGETS["capture"], note="capture(..., dtype=None, "
                              "device=None)", **kw))
    return _case("capture", timing, rows, tokens=[b, n], bytes=size["bytes"])


# ----------------------------------------------------------------------------- output
#: console width of the printed table: wide enough that no cell wraps (rows stay Markdown)
WIDTH = 1000
_COLUMNS = (("case", "left"), ("what", "left"), ("device", "left"), ("dtype", "left"),
            ("baseline", "right"), ("measured", "right"), ("ratio", "right"),
            ("target", "right"), ("met", "center"), ("note", "left"))


def _cells(row: dict[str, Any]) -> list[str]:
    ratio = row.get("ratio")
    met = row.get("met")
    return [
        str(row["case"]), str(row["what"]), str(row["device"]), str(row["dtype"]),
        str(row["baseline"]), str(row["measured"]),
        "—" if ratio is None else f"{ratio:.3g}×" if ratio < 100 else f"{ratio:.0f}×",
        str(row["target"]), "—" if met is None else ("yes" if met else "NO"), str(row["note"]),
    ]


def render_table(rows: list[dict[str, Any]], title: str | None = None) -> Any:
    """A ``rich`` table (Markdown box style: the printed text is a Markdown table)."""
    from rich import box
    from rich.table import Table

    from rich.text import Text

    table = Table(title=title, box=box.MARKDOWN, title_justify="left", show_edge=True)
    for name, justify in _COLUMNS:
        table.add_column(name, justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*(Text(c) for c in _cells(row)))  # plain text: no rich markup
    return table


def table_text(rows: list[dict[str, Any]], title: str | None = None, width: int = WIDTH) -> str:
    """:func:`render_table` as plain text, as ``kvtheory bench`` prints it (lines stripped)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, highlight=False, color_system=None,
            force_terminal=False).print(render_table(rows, title))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip()) + "\n"


def results_document(cases: list[dict[str, Any]], *, settings: dict[str, Any],
                     seed: int | None = 0) -> dict[str, Any]:
    """The JSON written by ``kvtheory bench``: provenance, machine, settings, cases, rows."""
    from .io import provenance

    return {"kind": "kvtheory.bench", "format": 1, "provenance": provenance(seed=seed),
            "machine": machine(), "settings": settings, "cases": cases,
            "rows": [r for c in cases for r in c["rows"]]}
