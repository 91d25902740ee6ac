"""Benchmark cases ``eval`` (PPL evaluation under compression against the uncompressed forward)
and ``capture`` (capture + save against a plain forward); part of :mod:`kvtheory.bench`."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .._hf import model_device
from ..timing import side_by_side, sync
from .rows import TARGETS, _dtype_name, _secs, case_result, make_row, ratio_row, time_once

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
    from ..compress import make_compressor
    from ..evaluate import window_nll
    from ..patch import clear_fit_cache, compressed_kv, fit_compressors

    dev, dtype = model_device(model), next(model.parameters()).dtype
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
    timing = side_by_side({lab: scorer(lab) for lab in labels}, reps=reps, warmup=warmup,
                          device=dev)
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
    return case_result("eval", timing, rows, windows=[w, n], calibration=list(calibration.shape),
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
    from .. import patch

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
        total = time_once(run, device)
    finally:
        patch._apply = inner
    return spent[0], total


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
    from .._hf import check_ids as _check_ids
    from .._hf import forward as _forward
    from .._hf import unwrap as _unwrap
    from ..capture import capture, capture_size, save_capture

    inner = _unwrap(model)
    dev, dtype = model_device(inner), next(inner.parameters()).dtype
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
    return case_result("capture", timing, rows, tokens=[b, n], bytes=size["bytes"])
