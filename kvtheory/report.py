r"""``kvtheory report``: run every analysis, save its result, draw the figures, write REPORT.md.

Stages run in order; each one's result is saved by :func:`kvtheory.store.cached` under
``results/<stage>-<config hash>.json`` (config and provenance beside the numbers), so a
second run loads instead of recomputing, and an interrupted run resumes at the first
unfinished stage. Figures are drawn from the saved results only, and every number in
REPORT.md is read from one of those files (the report names the file for each claim).
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._checks import check_choice
from .errors import KVTheoryError
from .io import atomic_write
from .store import cached, load_result, result_path

__all__ = ["ReportConfig", "STAGES", "run_stages", "load_stages", "draw_figures", "write_report",
           "report"]


@dataclass(frozen=True)
class Stage:
    """One analysis: ``kvtheory.analysis.<module>`` with ``<config>.for_size()``, ``run``,
    ``summary`` and ``plot``; ``needs`` names earlier stages whose results it reads."""

    name: str
    module: str
    config: str
    needs: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("bound_check", "bound_check", "BoundCheckConfig"),
    Stage("routing", "routing", "RoutingConfig"),
    Stage("flip_study", "flip_study", "FlipStudyConfig"),
    Stage("budget", "budget", "BudgetConfig"),
    Stage("ablation", "ablation", "AblationConfig"),
    Stage("tasks", "tasks", "TasksConfig"),
    Stage("predictor", "predictor", "PredictorConfig", needs=("flip_study", "budget")),
)


#: keyword under which a stage's ``run`` receives an earlier stage's result
_RESULT_ARG = {"flip_study": "flip_result", "budget": "budget_result"}


@dataclass(frozen=True)
class ReportConfig:
    """Where results, figures and the report go, and at which size the analyses run.

    ``size``: ``"default"`` (the report, ≤ 15 min on 2 CPU cores) or ``"small"`` (tests and
    notebooks). ``stages``: a subset of :data:`STAGES` by name (default all).
    """

    size: str = "default"
    data_dir: str | None = None
    results: str = "results"
    figures: str = "figures"
    report: str = "REPORT.md"
    stages: tuple[str, ...] | None = None
    force: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check_choice("size", self.size, ("default", "small"))
        names = [s.name for s in STAGES]
        for s in self.stages or ():
            check_choice("stages", s, names)

    def selected(self) -> list[Stage]:
        return [s for s in STAGES if self.stages is None or s.name in self.stages]


def _module(stage: Stage):
    return importlib.import_module(f"kvtheory.analysis.{stage.module}")


def _stage_config(stage: Stage, size: str) -> Any:
    cls = getattr(_module(stage), stage.config)
    old = os.environ.get("KVTHEORY_SMALL")
    os.environ["KVTHEORY_SMALL"] = "1" if size == "small" else "0"
    try:
        return cls.for_size() if hasattr(cls, "for_size") else cls()
    finally:
        if old is None:
            os.environ.pop("KVTHEORY_SMALL", None)
        else:
            os.environ["KVTHEORY_SMALL"] = old


def _data_sha(data_dir: str | None) -> dict[str, str]:
    from .data import corpus_sha256

    out = {}
    for name in ("wikitext2", "lambada"):
        try:
            out[name] = corpus_sha256(name, data_dir)
        except KVTheoryError as exc:  # the Hub fallback needs network; say so in provenance
            out[name] = f"unavailable: {exc}"
    return out


_VERIFY_KEY = {"n_points": 20}


def _stage_key(stage: Stage, cfg: ReportConfig, saved: dict[str, dict]) -> tuple[Any, dict, dict]:
    """The stage's config at the report's size, the cache key and the earlier results it reads."""
    scfg = _stage_config(stage, cfg.size)
    kwargs = {_RESULT_ARG.get(d, f"{d}_result"): saved[d]["result"] for d in stage.needs if d in saved}
    key = {"config": scfg, "needs": {d: saved[d]["config_hash"] for d in stage.needs if d in saved}}
    return scfg, key, kwargs


def _how(envelope: dict) -> str:
    """``computed, saved to PATH`` or ``loaded PATH (computed DATE at git SHA; --force
    recomputes)``."""
    if not envelope.get("loaded"):
        return f"computed, saved to {envelope['path']}"
    prov = envelope.get("provenance") or {}
    sha = str(prov.get("git_sha") or "?")
    return (f"loaded {envelope['path']} (computed {prov.get('created', '?')} at git {sha[:12]}"
            f"{'-dirty' if sha.endswith('-dirty') else ''}; --force recomputes)")


def run_stages(cfg: ReportConfig, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run (or load) every selected stage; returns ``{stage: saved envelope}``."""
    from .symbolic import verify_all

    data_sha = _data_sha(cfg.data_dir)
    saved: dict[str, dict] = {}
    t0 = time.perf_counter()
    saved["verify"] = cached("verify", _VERIFY_KEY | {"seed": cfg.seed},
                             lambda: verify_all(n_points=_VERIFY_KEY["n_points"], seed=cfg.seed),
                             cfg.results,
                             seed=cfg.seed, force=cfg.force)
    log(f"[{time.perf_counter() - t0:6.1f}s] verify: {_how(saved['verify'])}")
    for stage in cfg.selected():
        mod = _module(stage)
        scfg, key, kwargs = _stage_key(stage, cfg, saved)

        def compute(mod=mod, scfg=scfg, kwargs=kwargs):
            return mod.run(scfg, data_dir=cfg.data_dir, root=cfg.results, progress=cfg.progress,
                           **kwargs)

        saved[stage.name] = cached(stage.name, key, compute, cfg.results, seed=cfg.seed,
                                   force=cfg.force, data_sha256=data_sha)
        log(f"[{time.perf_counter() - t0:6.1f}s] {stage.name}: {_how(saved[stage.name])}")
    return saved


def load_stages(cfg: ReportConfig) -> dict[str, dict]:
    """The saved results that :func:`run_stages` would return for ``cfg``, loaded without
    computing anything (a stage whose file is missing is left out)."""
    saved: dict[str, dict] = {}

    def load(name: str, key: Any) -> None:
        path = result_path(name, key, cfg.results)
        if path.exists():
            saved[name] = load_result(path) | {"path": str(path)}

    load("verify", _VERIFY_KEY | {"seed": cfg.seed})
    for stage in cfg.selected():
        load(stage.name, _stage_key(stage, cfg, saved)[1])
    return saved


def draw_figures(saved: dict[str, dict], out_dir: str | os.PathLike) -> list[Path]:
    """Every figure, drawn from the saved results."""
    paths: list[Path] = []
    for stage in STAGES:
        if stage.name in saved:
            paths += list(_module(stage).plot(saved[stage.name]["result"], out_dir))
    return paths


def load_saved(results: str | os.PathLike) -> dict[str, dict]:
    """The newest saved result of every stage found in ``results`` (for ``kvtheory figures``)."""
    root = Path(results)
    out: dict[str, dict] = {}
    for name in ["verify"] + [s.name for s in STAGES]:
        files = sorted(root.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime)
        if files:
            out[name] = load_result(files[-1]) | {"path": str(files[-1])}
    if not out:
        raise KVTheoryError(f"results: got {str(root)!r}, which holds no saved results; "
                            "expected a folder written by `kvtheory report`")
    return out


def write_report(saved: dict[str, dict], cfg: ReportConfig, figures: list[Path]) -> Path:
    """Render REPORT.md from the saved results (see :mod:`kvtheory.claims`)."""
    from .claims import render

    text = render(saved, cfg, figures)
    return atomic_write(cfg.report, text, arg="report")


def report(cfg: ReportConfig, log: Callable[[str], None] = print) -> Path:
    """The whole pipeline: stages, figures, REPORT.md."""
    saved = run_stages(cfg, log)
    figs = draw_figures(saved, cfg.figures)
    log(f"figures: {len(figs)} files in {cfg.figures}/")
    path = write_report(saved, cfg, figs)
    log(f"report: {path}")
    return path
