"""Analyses that turn the core library and real models into the report's results.

Each module holds one study: a frozen config dataclass, ``run(cfg) -> dict`` (plain JSON
values, saved through :func:`kvtheory.store.cached`), ``summary(result)``, ``plot(...)``, and a
``STAGE`` registered in :mod:`kvtheory.stages`. Importing this package registers every stage,
in the order the report runs them (a stage that reads another comes after it).
"""

from . import bound_check, routing, flip_study, budget, ablation, tasks, predictor, eviction  # noqa: F401
