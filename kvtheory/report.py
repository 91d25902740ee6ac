r"""``kvtheory report``: every registered stage on every model, figures, REPORT.md.

The work is a set of independent tasks, one per (stage, model) where the stage applies
(:mod:`kvtheory.stages`), plus the symbolic ``verify``. Each task's result is saved by
:func:`kvtheory.store.cached` as ``results/<stage>-<model>-<config hash>.json`` (config,
provenance and a SHA-256 beside the numbers), so a second run loads instead of recomputing and
an interrupted run resumes at the first unfinished (stage, model). Figures are drawn from the
saved results only, and every number in REPORT.md is read from one of those files.

Tasks run in this process by default; ``executor="ray"`` runs them as Ray tasks
(:mod:`kvtheory.executors`), writing the same files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import analysis  # noqa: F401  (registers the report's stages)
from ._checks import check_choice
from .errors import KVTheoryError, bad_argument
from .io import atomic_write
from .stages import SIZES, Stage, get_stage, model_slug, stages
from .store import cached, load_result, result_path

__all__ = ["ReportConfig", "Results", "DEFAULT_MODELS", "run_stages", "load_stages",
           "draw_figures", "write_report", "report", "tasks", "run_task"]

#: the models of the default report (registry names; any name or path works)
DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "minilm-l6")
_VERIFY_KEY = {"n_points": 20}


def _names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) and v.strip() for v in items) or len(set(items)) < len(items):
        raise bad_argument(name, value, "a non-empty list of distinct names")
    return tuple(v.strip() for v in items)


@dataclass(frozen=True)
class ReportConfig:
    """Where results, figures and the report go, which models and stages, at which size.

    ``size``: ``"default"`` (the report) or ``"small"`` (tests and notebooks). ``models``: the
    models every applicable stage runs on (a comma-separated string is accepted). ``stages``: a
    subset of the registered stages (default all). ``executor``: ``"local"`` (this process) or
    ``"ray"`` (``address`` None: a local Ray instance). ``device_map``: an accelerate placement
    (``auto``, or JSON ``{module: device}``) for every model (placement does not enter the
    result files' config: the numbers are the model's on any placement, to rounding).
    """

    size: str = "default"
    data_dir: str | None = None
    results: str = "results"
    figures: str = "figures"
    report: str = "REPORT.md"
    models: Any = DEFAULT_MODELS          # a tuple after validation (a "a,b" string is accepted)
    stages: Any = None                    # None or a tuple of stage names, likewise
    force: bool = False
    seed: int = 0
    progress: bool = True
    executor: str = "local"
    address: str | None = None
    device_map: str | None = None

    def __post_init__(self):
        check_choice("size", self.size, SIZES)
        object.__setattr__(self, "models", _names("models", self.models))
        for m in self.models:
            model_slug(m)
        object.__setattr__(self, "stages", _names("stages", self.stages))
        for s in self.stages or ():
            get_stage(s)
        check_choice("executor", self.executor, ("local", "ray"))
        if self.address is not None and self.executor != "ray":
            raise bad_argument("address", self.address, "no address unless executor='ray'")
        if self.device_map is not None:
            from .placement import parse_device_map

            parse_device_map(self.device_map)
        if not isinstance(self.force, bool):
            raise bad_argument("force", self.force, "True or False")

    def selected(self) -> list[Stage]:
        return [s for s in stages() if self.stages is None or s.name in self.stages]


@dataclass
class Results:
    """Saved envelopes: ``verify`` and ``by_stage[stage][model]`` (each with its ``path``)."""

    verify: dict | None = None
    by_stage: dict[str, dict[str, dict]] = field(default_factory=dict)
    models: tuple[str, ...] = ()

    def result(self, stage: str, model: str) -> dict | None:
        env = self.by_stage.get(stage, {}).get(model)
        return None if env is None else env["result"]

    def results(self, stage: str) -> dict[str, dict]:
        """``{model: result}`` of one stage, in the report's model order."""
        got = self.by_stage.get(stage, {})
        return {m: got[m]["result"] for m in self.models if m in got}

    def path(self, stage: str, model: str | None = None) -> str | None:
        if stage == "verify":
            return None if self.verify is None else self.verify["path"]
        env = self.by_stage.get(stage, {}).get(model)
        return None if env is None else env["path"]

    def envelopes(self) -> list[dict]:
        out = [self.verify] if self.verify is not None else []
        return out + [e for per in self.by_stage.values() for e in per.values()]


def _data_sha(data_dir: str | None) -> dict[str, str]:
    from .data import corpus_sha256

    out = {}
    for name in ("wikitext2", "lambada"):
        try:
            out[name] = corpus_sha256(name, data_dir)
        except KVTheoryError as exc:  # the Hub fallback needs network; say so in provenance
            out[name] = f"unavailable: {exc}"
    return out


def _task_name(stage: Stage, model: str) -> str:
    return f"{stage.name}-{model_slug(model)}"


def _key(stage: Stage, model: str, cfg: ReportConfig, needs: dict[str, dict]) -> tuple[Any, dict]:
    """The stage's config for ``model`` and the cache key (config + the hashes it reads)."""
    scfg = stage.config_for(cfg.size, model)
    return scfg, {"config": scfg, "needs": {d: needs[d]["config_hash"] for d in stage.needs if d in needs}}


def tasks(cfg: ReportConfig) -> list[tuple[Stage, str]]:
    """The (stage, model) pairs of a report, in run order (stages outer, models inner)."""
    return [(s, m) for s in cfg.selected() for m in cfg.models]


def _how(envelope: dict) -> str:
    if not envelope.get("loaded"):
        return f"computed, saved to {envelope['path']}"
    prov = envelope.get("provenance") or {}
    sha = str(prov.get("git_sha") or "?")
    return (f"loaded {envelope['path']} (computed {prov.get('created', '?')} at git {sha[:12]}"
            f"{'-dirty' if sha.endswith('-dirty') else ''}; --force recomputes)")


def run_task(stage_name: str, model: str, cfg: ReportConfig, needs: dict[str, dict],
             data_sha: dict[str, str]) -> dict | None:
    """Run (or load) one (stage, model); ``None`` when the stage does not apply to the model.

    ``needs``: the envelopes of the stages this one reads, same model. Safe to call from
    another process (a Ray worker): the result lands in the same file either way.
    """
    from .engine import set_placement

    stage = get_stage(stage_name)
    set_placement(model, cfg.device_map)
    scfg, key = _key(stage, model, cfg, needs)
    path = result_path(_task_name(stage, model), key, cfg.results)
    if not (path.exists() and not cfg.force):
        from .analysis.common import get_model

        if not stage.applies(get_model(model).info):
            return None
    kwargs = {f"{d}_result": needs[d]["result"] for d in stage.needs if d in needs}

    def compute():
        return stage.run(scfg, data_dir=cfg.data_dir, root=cfg.results, progress=cfg.progress,
                         **kwargs)

    return cached(_task_name(stage, model), key, compute, cfg.results, seed=cfg.seed,
                  force=cfg.force, data_sha256=data_sha, model=model)


def run_verify(cfg: ReportConfig) -> dict:
    from .symbolic import verify_all

    return cached("verify", _VERIFY_KEY | {"seed": cfg.seed},
                  lambda: verify_all(n_points=_VERIFY_KEY["n_points"], seed=cfg.seed),
                  cfg.results, seed=cfg.seed, force=cfg.force)


def run_stages(cfg: ReportConfig, log: Callable[[str], None] = print) -> Results:
    """Run (or load) every selected (stage, model) with the configured executor."""
    t0 = time.perf_counter()
    out = Results(models=cfg.models)
    if cfg.executor == "ray":
        from .executors import absolute, run_on_ray

        cfg = absolute(cfg)
        plan = [(s.name, m, s.needs) for s, m in tasks(cfg)]
        return run_on_ray(cfg, log, plan=plan, run_task=run_task, run_verify=run_verify,
                          data_sha=_data_sha(cfg.data_dir), how=_how, results=out)
    data_sha = _data_sha(cfg.data_dir)
    out.verify = run_verify(cfg)
    log(f"[{time.perf_counter() - t0:6.1f}s] verify: {_how(out.verify)}")
    for stage, model in tasks(cfg):
        needs = {d: out.by_stage[d][model] for d in stage.needs if model in out.by_stage.get(d, {})}
        env = run_task(stage.name, model, cfg, needs, data_sha)
        what = "does not apply" if env is None else _how(env)
        log(f"[{time.perf_counter() - t0:6.1f}s] {stage.name} on {model}: {what}")
        if env is not None:
            out.by_stage.setdefault(stage.name, {})[model] = env
    return out


def load_stages(cfg: ReportConfig) -> Results:
    """The saved results that :func:`run_stages` would return for ``cfg``, loaded without
    computing anything (a (stage, model) whose file is missing is left out)."""
    out = Results(models=cfg.models)
    path = result_path("verify", _VERIFY_KEY | {"seed": cfg.seed}, cfg.results)
    if path.exists():
        out.verify = load_result(path) | {"path": str(path)}
    for stage, model in tasks(cfg):
        needs = {d: out.by_stage[d][model] for d in stage.needs if model in out.by_stage.get(d, {})}
        path = result_path(_task_name(stage, model), _key(stage, model, cfg, needs)[1], cfg.results)
        if path.exists():
            out.by_stage.setdefault(stage.name, {})[model] = load_result(path) | {"path": str(path)}
    return out


def load_saved(results: str | os.PathLike) -> Results:
    """Every saved result in ``results`` (for ``kvtheory figures``), grouped by stage and model
    from each file's own config (the newest file where two share a (stage, model))."""
    root = Path(results)
    files = sorted(root.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise KVTheoryError(f"results: got {str(root)!r}, which holds no saved results; "
                            "expected a folder written by `kvtheory report`")
    out = Results()
    names = [s.name for s in stages()]
    models: list[str] = []
    for p in files:
        env = load_result(p) | {"path": str(p)}
        if env["stage"] == "verify":
            out.verify = env
            continue
        model = (env.get("provenance") or {}).get("model")
        stage = next((n for n in names if env["stage"] == f"{n}-{model_slug(model)}"), None) if model else None
        if stage is None:
            continue
        out.by_stage.setdefault(stage, {})[model] = env
        models.append(model)
    out.models = tuple(dict.fromkeys(models))
    return out


def draw_figures(saved: Results, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure, drawn from the saved results (each stage's ``plot`` gets every model)."""
    paths: list[Path] = []
    for stage in stages():
        res = saved.results(stage.name)
        if res:
            try:
                paths += list(stage.plot(res, out_dir))
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                if isinstance(exc, KVTheoryError):
                    raise
                files = ", ".join(repr(saved.path(stage.name, m)) for m in res)
                raise KVTheoryError(
                    f"results: got {files}, whose {stage.name} result cannot be drawn "
                    f"({type(exc).__name__}: {str(exc)[:80]}); expected a result written by this "
                    "kvtheory version (delete it and run `kvtheory report`)") from None
    return paths


def write_report(saved: Results, cfg: ReportConfig, figures: list[Path]) -> Path:
    """Render REPORT.md from the saved results (see :mod:`kvtheory.reportmd`)."""
    from .reportmd import render

    return atomic_write(cfg.report, render(saved, cfg, figures), arg="report")


def report(cfg: ReportConfig, log: Callable[[str], None] = print) -> Path:
    """The whole pipeline: stages, figures, REPORT.md."""
    saved = run_stages(cfg, log)
    figs = draw_figures(saved, cfg.figures)
    log(f"figures: {len(figs)} files in {cfg.figures}/")
    path = write_report(saved, cfg, figs)
    log(f"report: {path}")
    return path
