"""Saved results: one JSON file per analysis stage, keyed by its config, with provenance.

``cached(stage, config, compute, root)`` returns the saved result when the config matches,
and otherwise computes it, saves it atomically (config and provenance beside the numbers)
and returns it. Result paths derive from the config: ``root/<stage>-<hash>.json``. A second
``make report`` is therefore fast, and every number in the report comes from one of these
files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import KVTheoryError
from .io import canonical_json, provenance, read_json, to_jsonable, write_json

__all__ = ["config_hash", "result_path", "cached", "load_result", "result_sha256", "DEFAULT_ROOT"]

#: where results go unless told otherwise
DEFAULT_ROOT = Path(os.environ.get("KVTHEORY_RESULTS", "results"))


def config_hash(config: Any) -> str:
    """A short, stable hash of a config (dataclass or dict), from its canonical JSON.

    >>> config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    True
    """
    text = canonical_json(config, "config", sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def result_sha256(result: Any) -> str:
    """SHA-256 of a result's canonical JSON (sorted keys, no spaces), stored in its envelope as
    ``result_sha256`` and checked by :func:`load_result`.

    >>> result_sha256({"b": 1.5, "a": [1, None]}) == result_sha256({"a": [1, None], "b": 1.5})
    True
    """
    text = canonical_json(result, "result", sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def result_path(stage: str, config: Any, root: str | os.PathLike | None = None) -> Path:
    """``root/<stage>-<config hash>.json``."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    return root / f"{stage}-{config_hash(config)}.json"


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """Load a saved result, check its envelope and its ``result_sha256`` (every file that
    :func:`cached` writes carries one; a file without it is refused, as is one whose result
    does not match it)."""
    data = read_json(path)
    if not isinstance(data, dict) or not {"stage", "config", "provenance", "result"} <= set(data):
        raise KVTheoryError(
            f"path: got {str(path)!r}; expected a kvtheory result file with keys "
            "stage, config, provenance, result"
        )
    want = data.get("result_sha256")
    if not isinstance(want, str):
        raise KVTheoryError(
            f"path: got {str(path)!r}, which carries no result_sha256; expected a kvtheory result "
            "file with its checksum (delete it to recompute)"
        )
    if result_sha256(data["result"]) != want:
        raise KVTheoryError(
            f"path: got {str(path)!r}, whose result does not match its result_sha256 "
            f"{str(want)[:12]}...; expected an unmodified kvtheory result file (delete it to "
            "recompute)"
        )
    return data


def cached(
    stage: str,
    config: Any,
    compute: Callable[[], Any],
    root: str | os.PathLike | None = None,
    *,
    seed: int | None = None,
    force: bool = False,
    **prov: Any,
) -> dict[str, Any]:
    """Return the saved ``result`` for (stage, config), computing and saving it if needed.

    The file holds ``{"stage", "config", "config_hash", "provenance", "result_sha256",
    "result"}``; the returned envelope adds ``path`` and ``loaded`` (True when nothing was
    computed).
    """
    path = result_path(stage, config, root)
    if path.exists() and not force:
        saved = load_result(path)
        if saved.get("config_hash") == config_hash(config):
            saved["path"] = str(path)
            saved["loaded"] = True   # not saved: tells the caller nothing was computed
            return saved
    result = to_jsonable(compute())
    envelope = {
        "stage": stage,
        "config": to_jsonable(config),
        "config_hash": config_hash(config),
        "provenance": provenance(seed=seed, **prov),
        "result_sha256": result_sha256(result),
        "result": result,
    }
    write_json(path, envelope, arg="results dir")
    envelope["path"] = str(path)
    envelope["loaded"] = False
    return envelope
