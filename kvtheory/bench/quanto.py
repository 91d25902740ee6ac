"""Benchmark case ``quanto``: transformers' quanto ``QuantizedCache`` decoded token by token
against kvtheory's one-pass causal simulation (part of :mod:`kvtheory.bench`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .._hf import cache_kwargs, model_device
from ..errors import KVTheoryError, bad_argument
from ..timing import Timing
from .rows import TARGETS, _dtype_name, _secs, case_result, make_row, ratio_row, time_once


def quanto_available() -> bool:
    """Whether optimum-quanto (the ``quanto`` extra) can be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except (ImportError, ValueError):
        return False


def require_quanto() -> None:
    """Raise :class:`~kvtheory.errors.KVTheoryError` naming the extra when quanto is missing."""
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
        require_quanto()
        from transformers import QuantizedCache

        past: Any = QuantizedCache(backend="quanto", config=model.config, nbits=nbits,
                                   q_group_size=q_group_size, residual_length=residual_length)
    elif cache is None:
        past = DynamicCache(config=model.config)
    else:
        raise bad_argument("cache", cache, "'quanto' or None")
    dev = model_device(model)
    ids = ids.to(dev)
    losses = []
    for t in range(ids.numel() - 1):
        out = model(input_ids=ids[None, t:t + 1], use_cache=True, **cache_kwargs(model, past))
        past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        losses.append(torch.nn.functional.cross_entropy(out.logits[0, -1].float(), ids[t + 1]))
    return float(torch.stack(losses).double().sum()), len(losses)


def onepass_nll(model: torch.nn.Module, ids: Int[Tensor, " token"], spec: str | None = "int4-g64"
                ) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` in one causal forward, keys and values compressed by
    ``spec`` (None: uncompressed) inside every attention layer."""
    from ..evaluate import window_nll
    from ..patch import compressed_kv

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
    fast_t = [time_once(fast, device) for _ in range(before)]
    slow_t = [time_once(slow, device)]
    fast_t += [time_once(fast, device) for _ in range(reps - before)]
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
    from ..models import model_info

    require_quanto()
    dev, dtype = model_device(model), next(model.parameters()).dtype
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

        t = Timing({"fp_decode": [time_once(decode_fp, dev)]})
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
    return case_result("quanto", timing, rows, tokens=n, spec=spec, ppl=ppl,
                 quanto={"nbits": nbits, "q_group_size": q_group_size,
                         "residual_length": residual_length, "axis_key": 0, "axis_value": 0,
                         "reps": 1},
                 onepass_reps=reps)
