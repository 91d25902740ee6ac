"""Analyses that turn the core library and real models into the report's results.

Each module holds one study, with a frozen config dataclass, ``run(cfg) -> dict`` (plain
JSON values, saved through :func:`kvtheory.store.cached`) and ``plot(result, out_dir)`` that
draws its figures from the saved result.
"""
