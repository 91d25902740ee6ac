r"""Where the report's (stage, model) tasks run: in this process (the default, in
:func:`kvtheory.report.run_stages`) or as Ray tasks (:func:`run_on_ray`).

The report's work is a set of independent tasks with idempotent, checksummed result files
(:func:`kvtheory.store.cached`): each task writes ``results/<stage>-<model>-<hash>.json`` and a
task whose file exists loads it. So any executor that runs :func:`kvtheory.report.run_task`
lands the same files, and a killed sweep resumes where it stopped. A stage that reads another
(``needs``) is chained on that task's result; everything else runs in parallel.

Ray is an optional extra (``pip install 'kvtheory[ray]'``). ``address=None`` starts a local Ray
instance; ``address="auto"`` or ``"ray://host:10001"`` joins a cluster (see the README for a
SLURM recipe). Paths in the config are made absolute, so workers started elsewhere on a shared
filesystem write to the same folder.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from .errors import KVTheoryError

__all__ = ["run_on_ray", "absolute"]


def absolute(cfg: Any) -> Any:
    """``cfg`` with its paths made absolute (workers may start in another folder)."""
    return dataclasses.replace(
        cfg, results=os.path.abspath(cfg.results),
        data_dir=None if cfg.data_dir is None else os.path.abspath(cfg.data_dir),
        figures=os.path.abspath(cfg.figures), report=os.path.abspath(cfg.report))


def _task(run_task: Callable, stage: str, model: str, cfg: Any, data_sha: dict, names: list[str],
          *needs: Any) -> Any:
    """One (stage, model) in a Ray worker: ``run_task`` (:func:`kvtheory.report.run_task`,
    passed by reference) with the envelopes of the stages it reads (tasks that did not apply
    come back as None)."""
    import torch

    torch.set_num_threads(int(os.environ.get("KVTHEORY_TASK_THREADS", "1")))
    got = {n: e for n, e in zip(names, needs) if e is not None}
    return run_task(stage, model, cfg, got, data_sha)


def _call(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def run_on_ray(cfg: Any, log: Callable[[str], None], *, plan: list[tuple[str, str, tuple[str, ...]]],
               run_task: Callable, run_verify: Callable, data_sha: dict, how: Callable[[dict], str],
               results: Any, num_cpus: int | None = None, num_gpus_per_task: float = 0.0) -> Any:
    """Run every (stage, model, needs) of ``plan`` as a Ray task through ``run_task`` and
    ``run_verify`` (the report's own functions, so the same files land) and fill ``results``
    (a :class:`kvtheory.report.Results`).

    ``num_cpus`` caps a local Ray instance (None: Ray's default); ``num_gpus_per_task`` is
    requested by each task (the analysis stages run on the CPU today, so 0).
    """
    try:
        import ray
    except ImportError:
        raise KVTheoryError("executor: got 'ray', which is not installed; expected "
                            "`pip install 'kvtheory[ray]'` (or executor='local')") from None
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"address": cfg.address, "include_dashboard": False,
                              "log_to_driver": False}
        if cfg.address is None and num_cpus is not None:
            kw["num_cpus"] = num_cpus
        ray.init(**kw)
    t0 = time.perf_counter()
    try:
        remote = ray.remote(num_cpus=1, num_gpus=num_gpus_per_task)(_task)
        verify_ref = ray.remote(num_cpus=1)(_call).remote(run_verify, cfg)
        refs: dict[tuple[str, str], Any] = {}
        for stage, model, needs in plan:
            names = [d for d in needs if (d, model) in refs]
            refs[(stage, model)] = remote.remote(run_task, stage, model, cfg, data_sha, names,
                                                 *(refs[(d, model)] for d in names))
        results.verify = ray.get(verify_ref)
        log(f"[{time.perf_counter() - t0:6.1f}s] verify: {how(results.verify)}")
        for (stage, model), ref in refs.items():
            env = ray.get(ref)
            what = "does not apply" if env is None else how(env)
            log(f"[{time.perf_counter() - t0:6.1f}s] {stage} on {model} (ray): {what}")
            if env is not None:
                results.by_stage.setdefault(stage, {})[model] = env
        return results
    finally:
        if started:
            ray.shutdown()
