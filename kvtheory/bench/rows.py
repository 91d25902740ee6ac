"""Benchmark rows and tables: targets, ratio rows, the machine record, the printed table and the
JSON document ``kvtheory bench`` writes (part of :mod:`kvtheory.bench`)."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .._checks import check_int
from ..timing import Timing, sync

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
_GIB = 2**30


# ----------------------------------------------------------------------------- rows
def flip_flops(batch: int, q_heads: int, queries: int, tokens: int, d: int,
               matmuls: int = 2) -> int:
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
    from ..models import _as_dtype as as_dtype

    return as_dtype(dtype)


def case_result(name: str, timing: Timing | None, rows: list[dict[str, Any]],
                **extra: Any) -> dict[str, Any]:
    """A case's JSON-ready result: its name, ``timings`` summary, table ``rows`` and ``extra``."""
    return {"case": name, "timings": {} if timing is None else timing.summary(), "rows": rows,
            **extra}


def time_once(fn: Callable[[], Any], device: Any) -> float:
    """Seconds of one ``fn()`` call, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


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
            "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


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
    from ..io import provenance

    return {"kind": "kvtheory.bench", "format": 1, "provenance": provenance(seed=seed),
            "machine": machine(), "settings": settings, "cases": cases,
            "rows": [r for c in cases for r in c["rows"]]}
