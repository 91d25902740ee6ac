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
from typing import Any, Callable

from .errors import KVTheoryError

__all__ = ["run_on_ray"]


def _abs(cfg: Any) -> Any:
    return dataclasses.replace(
        cfg, results=os.path.abspath(cfg.results),
        data_dir=None if cfg.data_dir is None else os.path.abspath(cfg.data_dir),
        figures=os.path.abspath(cfg.figures), report=os.path.abspath(cfg.report))


def _task(stage: str, model: str, cfg: Any, data_sha: dict, names: list[str], *needs: Any) -> Any:
    """One (stage, model) in a Ray worker: :func:`kvtheory.report.run_task` with the envelopes
    of the stages it reads (tasks that did not apply come back as None)."""
    import torch

    from .report import run_task

    torch.set_num_threads(int(os.environ.get("KVTHEORY_TASK_THREADS", "1")))
    got = {n: e for n, e in zip(names, needs) if e is not None}
    return run_task(stage, model, cfg, got, data_sha)


def _verify(cfg: Any) -> dict:
    from .report import run_verify

    return run_verify(cfg)


def run_on_ray(cfg: Any, log: Callable[[str], None] = print, *, num_cpus: int | None = None,
               num_gpus_per_task: float = 0.0):
    """Run every (stage, model) task of ``cfg`` as a Ray task and return the
    :class:`kvtheory.report.Results` (the same files as the in-process run).

    ``num_cpus`` caps a local Ray instance (None: Ray's default); ``num_gpus_per_task`` is
    requested by each task (the analysis stages run on the CPU today, so 0).
    """
    try:
        import ray
    except ImportError:
        raise KVTheoryError("executor: got 'ray', which is not installed; expected "
                            "`pip install 'kvtheory[ray]'` (or executor='local')") from None
    from .report import Results, _data_sha, _how, tasks

    cfg = _abs(cfg)
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
        data_sha = _data_sha(cfg.data_dir)
        verify_ref = ray.remote(num_cpus=1)(_verify).remote(cfg)
        refs: dict[tuple[str, str], Any] = {}
        for stage, model in tasks(cfg):
            names = [d for d in stage.needs if (d, model) in refs]
            refs[(stage.name, model)] = remote.remote(stage.name, model, cfg, data_sha, names,
                                                      *(refs[(d, model)] for d in names))
        out = Results(models=cfg.models)
        out.verify = ray.get(verify_ref)
        log(f"[{time.perf_counter() - t0:6.1f}s] verify: {_how(out.verify)}")
        for (stage, model), ref in refs.items():
            env = ray.get(ref)
            what = "does not apply" if env is None else _how(env)
            log(f"[{time.perf_counter() - t0:6.1f}s] {stage} on {model} (ray): {what}")
            if env is not None:
                out.by_stage.setdefault(stage, {})[model] = env
        return out
    finally:
        if started:
            ray.shutdown()
