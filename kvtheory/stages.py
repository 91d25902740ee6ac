r"""The stage registry: an analysis stage is one object, registered by its own module.

A :class:`Stage` carries everything the report needs to know about one analysis: how to build
its config for a report size and one model, how to run it, how to summarise one model's result
(flat numbers, keys without a model name), how to draw its figures from the results of every
model, which figures those are, which claims of ``shared/paper/CLAIMS.md`` it supplies numbers
to, which earlier stages it reads, and on which kinds of model it applies. :mod:`kvtheory.report`
and :mod:`kvtheory.claims` only iterate over :func:`stages`; no stage, model or figure name is
written into them.

Adding a stage (see ``CONTRIBUTING.md``): write ``kvtheory/analysis/<name>.py`` with a frozen
config, ``run``, ``summary`` and ``plot``, end it with ``STAGE = register_stage(Stage(...))``,
add one import line to ``kvtheory/analysis/__init__.py``, and, if it tests a claim, a rule in
:mod:`kvtheory.claims`.

>>> import kvtheory.analysis  # registers the report's stages
>>> from kvtheory.stages import stages
>>> [s.name for s in stages()][:3]
['bound_check', 'routing', 'flip_study']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KVTheoryError, bad_argument

__all__ = ["Stage", "register_stage", "stages", "get_stage", "model_slug", "SIZES",
           "decoders", "everywhere"]

#: report sizes: ``default`` (the report) and ``small`` (tests and notebooks)
SIZES = ("default", "small")


def everywhere(info: Any) -> bool:
    """A stage that applies to every model."""
    return True


def decoders(info: Any) -> bool:
    """A stage that needs a causal LM (perplexity, LAMBADA, a routing search over causal rows)."""
    return bool(getattr(info, "causal", False))


@dataclass(frozen=True)
class Stage:
    """One analysis of the report.

    * ``configure(size, model)`` → the stage's frozen config for that report size and model;
    * ``run(config, *, data_dir, root, progress, **needs)`` → a JSON-able result for one model
      (``needs``: ``<stage>_result`` of each stage in ``needs``, same model);
    * ``summary(result)`` → flat ``{quantity: number or text}`` of one model's result, keys
      without a model name (dotted keys ``row.column`` are pivoted into tables);
    * ``plot(results, out_dir)`` → the figure files drawn from ``{model: result}``;
    * ``figures``: the file stems ``plot`` writes (per model they get ``-<model>``, see
      :func:`kvtheory.plotstyle.figure_context`); ``claims``: ids of the claims it informs;
    * ``applies(info)``: whether the stage runs on a model (:class:`kvtheory.models.ModelInfo`).
    """

    name: str
    title: str
    configure: Any   # callables, checked in __post_init__ (a named error, not a type-hint one)
    run: Any
    summary: Any
    plot: Any
    figures: tuple[str, ...]
    claims: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    applies: Any = everywhere

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise bad_argument("name", self.name, "a lower-case identifier such as 'budget'")
        for field in ("configure", "run", "summary", "plot", "applies"):
            if not callable(getattr(self, field)):
                raise bad_argument(field, getattr(self, field), "a callable")
        for field in ("figures", "claims", "needs"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise bad_argument(field, value, "a tuple of non-empty names")
            object.__setattr__(self, field, tuple(value))

    def config_for(self, size: str, model: str) -> Any:
        """The config of this stage at report ``size`` for ``model``."""
        if size not in SIZES:
            raise bad_argument("size", size, f"one of {', '.join(SIZES)}")
        return self.configure(size, model)


_REGISTRY: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add ``stage`` to the registry (in registration order) and return it. Registering a
    different stage under a taken name is an error; registering the same one again is not
    (a module reloaded in a notebook)."""
    if not isinstance(stage, Stage):
        raise bad_argument("stage", stage, "a kvtheory.stages.Stage")
    old = _REGISTRY.get(stage.name)
    if old is not None and old.run.__module__ != stage.run.__module__:
        raise KVTheoryError(f"stage: got a second stage named {stage.name!r} (from "
                            f"{stage.run.__module__}); expected a new name")
    for dep in stage.needs:
        if dep not in _REGISTRY and dep != stage.name:
            raise bad_argument("needs", stage.needs, f"stages registered before {stage.name!r}")
    _REGISTRY[stage.name] = stage
    return stage


def stages() -> tuple[Stage, ...]:
    """Every registered stage, in registration (= run) order (``import kvtheory.analysis``
    registers the report's own)."""
    return tuple(_REGISTRY.values())


def get_stage(name: str) -> Stage:
    """The stage called ``name`` (a :class:`KVTheoryError` names the choices otherwise)."""
    if name not in _REGISTRY:
        raise bad_argument("stage", name, f"one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def model_slug(model: str) -> str:
    """A file-name-safe form of a model name or path (its last 60 characters).

    >>> model_slug("smollm2-135m"), model_slug("/tmp/my model/")
    ('smollm2-135m', 'tmp_my_model')
    """
    if not isinstance(model, str) or not model.strip():
        raise bad_argument("model", model, "a model name or path")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip().strip("/")).strip("_.")
    return (slug or "model")[-60:]


def figure_paths(paths: list, stems: tuple[str, ...]) -> list[Path]:
    """The PNG files among ``paths`` whose stem is one of ``stems`` or ``<stem>-<model>``."""
    out = []
    for p in map(Path, paths):
        if p.suffix == ".png" and any(p.stem == s or p.stem.startswith(s + "-") for s in stems):
            out.append(p)
    return out
