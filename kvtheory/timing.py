r"""Side-by-side timing: alternate A and B in one process, report medians and their ratio.

Machines here are noisy, so kvtheory never asserts a wall time. A benchmark instead runs the
two things it compares in the same process, interleaved (A, B, A, B, ...), and reports
:math:`\mathrm{median}(t_B) / \mathrm{median}(t_A)`, a ratio that noise affects far less.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._checks import check_int

__all__ = ["Timing", "side_by_side", "sync"]


def sync(device: Any = None) -> None:
    """Wait for queued GPU work, so that a timer measures it (no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Times (seconds) of every repetition of each labelled function, interleaved."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, label: str) -> float:
        return statistics.median(self.times[label])

    def ratio(self, label: str, baseline: str) -> float:
        r"""``median(label) / median(baseline)``."""
        return self.median(label) / self.median(baseline)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "reps": len(v)}
            for k, v in self.times.items()
        }


def side_by_side(
    fns: dict[str, Callable[[], Any]], *, reps: int = 5, warmup: int = 1, device: Any = None
) -> Timing:
    """Run every function ``warmup`` times, then ``reps`` rounds of all of them in turn.

    The order inside a round rotates, so no function always runs first (cache, turbo
    and allocator effects are spread evenly).

    >>> t = side_by_side({"a": lambda: sum(range(1000)), "b": lambda: sum(range(2000))}, reps=3)
    >>> sorted(t.times), len(t.times["a"])
    (['a', 'b'], 3)
    """
    check_int("reps", reps, 1)
    check_int("warmup", warmup, 0)
    labels = list(fns)
    for _ in range(warmup):
        for label in labels:
            fns[label]()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for rep in range(reps):
        order = labels[rep % len(labels):] + labels[: rep % len(labels)]
        for label in order:
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fns[label]()
            sync(device)
            times[label].append(time.perf_counter() - t0)
    return Timing(times)
