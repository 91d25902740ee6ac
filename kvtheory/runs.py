r"""The resumable evaluation run behind ``kvtheory eval``, callable from notebooks.

:func:`run_eval` evaluates a model under KV compression for every (method, target) of an
:class:`~kvtheory.config.EvalConfig` and keeps one JSON file per config (the CLI only parses
arguments and calls it)::

    from kvtheory.config import EvalConfig
    from kvtheory.runs import run_eval
    out = run_eval(EvalConfig("smollm2-135m", "wikitext2", ("fp", "int4")), "r.json")
    out["records"][1]["value"]      # perplexity under int4

**The file** holds ``{"kind": "kvtheory.eval", "format": 2, "config", "config_hash",
"provenance", "calibration", "records", "runs", "result_sha256"}``; ``result_sha256`` is
:func:`kvtheory.store.result_sha256` of everything else, as for the report's result files.
Record fields are documented in :mod:`kvtheory.evaljob`.

**Guarantees.** Every write is atomic (:func:`kvtheory.io.atomic_write`) and happens under an
advisory lock (:func:`kvtheory.io.file_lock`) as a read-merge-write: two runs on one file
both keep their rows. A rerun of the same config resumes (rows already saved are skipped)
after checking the file's integrity (checksum, no duplicated rows, known methods,
provenance present) and that the data (SHA-256) and the model's weights
(:func:`weights_fingerprint`) are those the rows were computed from. Every method is checked
against the model's head dimension before any row runs. A row whose metric is NaN or
infinite is reported and not saved, so a rerun computes it again.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._checks import check_int
from .errors import KVTheoryError, bad_argument
from .evaljob import Job, compute_row
from .io import check_output_file, file_lock, provenance, read_json, to_jsonable, write_json
from .store import result_sha256

__all__ = ["run_eval", "check_device", "check_methods", "check_eval_file", "weights_fingerprint",
           "format_table", "FORMAT", "KIND"]

KIND = "kvtheory.eval"
#: 2: result_sha256 and the weights fingerprint (format 1 files carry neither)
FORMAT = 2
#: most bootstrap resamples per interval (each holds one int64 index per item)
MAX_BOOT = 100_000
_RECORD_KEYS = ("method", "target", "metric", "value", "ci_low", "ci_high", "n_tokens", "n_items",
                "bits_per_element", "provenance")


# ----------------------------------------------------------------------------- checks
def check_device(device: str) -> str:
    """``device`` must exist on this machine (``cuda:N`` below the device count, ``mps`` built in).

    >>> check_device("cpu")
    'cpu'
    """
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise bad_argument("device", device, "an available device (this torch sees no CUDA "
                               "device); use 'cpu'")
        if index and int(index) >= n:
            raise bad_argument("device", device, f"cuda:0..cuda:{n - 1} ({n} CUDA devices here)")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise bad_argument("device", device, "an available device (this torch has no MPS "
                               "backend, which needs Apple silicon); use 'cpu'")
    return device


def check_methods(methods, targets, d: int) -> None:
    """Every method of the grid must fit head dimension ``d`` for every tensor its targets
    compress (e.g. ``rank65-pca`` is refused at ``d = 64``), checked before any row runs
    (:func:`kvtheory.methods.check_methods`).

    >>> check_methods(("fp", "rank65-pca"), ("kv",), 64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: method: got 'rank65-pca' for the keys of a model with head dimension d=64; ...
    """
    from .methods import check_methods as check

    check(list(methods), d, list(targets))


def _check_not_an_input(path: Path, cfg) -> None:
    """The result file must not be the text file, nor a file beside the model's weights."""
    real = Path(os.path.realpath(path))
    clash = None
    if cfg.text_file is not None and real == Path(os.path.realpath(cfg.text_file)):
        clash = real
    local = Path(cfg.model).expanduser()
    if local.is_dir() and real.parent == Path(os.path.realpath(local)):
        clash = real.parent
    if clash is not None:
        raise bad_argument("json", str(path), f"a result file outside the inputs (it would "
                           f"overwrite or sit among the files of {str(clash)!r})")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"


def format_table(records: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (an interval from one item is shown as n/a)."""
    head = (f"{'method':<18} {'target':<6} {'bits':>6} {'metric':<10} {'value':>10}  "
            f"{'95% CI':<21} {'tokens':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        ci = (f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r.get("ci_low") is not None
              else f"n/a ({r['n_items']} item)")
        lines.append(f"{r['method']:<18} {r['target']:<6} {r['bits_per_element']:>6.3f} "
                     f"{r['metric']:<10} {r['value']:>10.4f}  {ci:<21} {r['n_tokens']:>8d}")
    if any(r.get("ci_low") is None for r in records):
        lines.append("(n/a: a bootstrap interval needs at least two items)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt")
_SAMPLES, _SAMPLE_BYTES, _SMALL = 16, 1 << 16, 8 << 20


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as fh:
        if size <= _SMALL:
            h.update(fh.read())
            return
        h.update(fh.read(1 << 20))  # the safetensors / GGUF header and the first tensors
        for i in range(_SAMPLES + 1):
            fh.seek(min(size - _SAMPLE_BYTES, (size - _SAMPLE_BYTES) * i // _SAMPLES))
            h.update(fh.read(_SAMPLE_BYTES))


def model_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local folder ``name`` loads from (registry, path or a cached Hub id), else None."""
    from . import models

    if name in models.REGISTRY:
        return models.registry_dir(name, cache_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id: the model load says why
        return None


def weights_fingerprint(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """A fingerprint of the files ``name`` loads: weights, config and tokenizer.

    For a packaged registry model the pinned SHA-256 of its source enters too. Files up to
    8 MiB are hashed whole; a larger file contributes its size, its first MiB
    (the safetensors/GGUF header) and 17 evenly spaced 64 KiB samples, so replaced weights are
    caught without reading gigabytes. Returns ``{"sha256", "files", "bytes"}``, or None when
    ``name`` is a Hub id not cached here.
    """
    import hashlib

    folder = model_folder(name, cache_dir)
    if folder is None:
        return None
    from . import models

    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix in _WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    entry = models.REGISTRY.get(name)
    h.update(f"source sha256 {getattr(entry, 'sha256', None)}\0".encode())  # a packaged source
    for p in files:
        _file_digest(p, h)
    return {"sha256": h.hexdigest(), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _head_dim(folder: Path | None) -> int | None:
    """Head dimension from the model's config, read before any weight is loaded."""
    if folder is None:
        return None
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(str(folder))
        heads = int(getattr(c, "num_attention_heads"))
        return int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the model load
        return None


# ----------------------------------------------------------------------------- the file
def _bad_file(path: Path, what: str) -> KVTheoryError:
    return KVTheoryError(f"json: got {str(path)!r}, {what}; expected an unmodified kvtheory eval "
                         "result to resume (or pass --overwrite to start afresh)")


def check_eval_file(data: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a saved eval result before resuming it: kind and format, config, provenance,
    records (known methods and targets, finite values, no duplicates) and ``result_sha256``.
    Raises :class:`KVTheoryError` naming the file and what is wrong."""
    from .config import TARGETS, EvalConfig
    from .methods import parse_method

    path = Path(path)
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise _bad_file(path, "which is not a kvtheory eval result")
    if data.get("format") != FORMAT:
        raise _bad_file(path, f"of format {data.get('format')!r} (this kvtheory reads format "
                              f"{FORMAT}, which carries a checksum and a weights fingerprint)")
    for key in ("config", "config_hash", "provenance", "records", "runs", "result_sha256"):
        if key not in data:
            raise _bad_file(path, f"whose {key!r} block is missing")
    prov = data["provenance"]
    if not isinstance(prov, dict) or not {"data_sha256", "weights", "git_sha"} <= set(prov):
        raise _bad_file(path, "whose provenance block is incomplete (data_sha256, weights, git_sha)")
    try:
        cfg = EvalConfig.from_dict(data["config"])
    except (KVTheoryError, TypeError, AttributeError) as exc:
        raise _bad_file(path, f"whose config is invalid ({exc})") from None
    if cfg.hash() != data["config_hash"]:
        raise _bad_file(path, "whose config_hash does not match its config")
    if not isinstance(data["records"], list) or not isinstance(data["runs"], list):
        raise _bad_file(path, "whose records or runs are not lists")
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict) or not set(_RECORD_KEYS) <= set(r):
            raise _bad_file(path, f"whose record {i} lacks some of {', '.join(_RECORD_KEYS)}")
        mt = (r["method"], r["target"])
        try:
            parse_method(r["method"])
        except KVTheoryError:
            raise _bad_file(path, f"whose record {i} has the unknown method {r['method']!r}") from None
        if r["target"] not in TARGETS:
            raise _bad_file(path, f"whose record {i} has the unknown target {r['target']!r}")
        if mt in seen:
            raise _bad_file(path, f"which holds the row {mt[0]}/{mt[1]} twice")
        seen.add(mt)
        if not isinstance(r["value"], (int, float)) or not math.isfinite(r["value"]):
            raise _bad_file(path, f"whose record {i} ({mt[0]}/{mt[1]}) has the non-finite value "
                                  f"{r['value']!r}")
    body = {k: v for k, v in data.items() if k != "result_sha256"}
    if result_sha256(body) != data["result_sha256"]:
        raise _bad_file(path, f"whose content does not match its result_sha256 "
                              f"{str(data['result_sha256'])[:12]}... (edited by hand?)")
    return data


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = read_json(path, arg="json")
    except KVTheoryError:
        raise _bad_file(path, "which is not a readable kvtheory eval result (not valid "
                              "JSON)") from None
    return check_eval_file(data, path)


def _check_same(data: dict[str, Any], path: Path, cfg, data_sha: dict, weights: dict | None) -> None:
    if data["config_hash"] != cfg.hash():
        old = data.get("config", {}) or {}
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in cfg.identity().items()
                if k != "text_file" and old.get(k) != v] or ["config hash"]
        raise KVTheoryError(f"json: got {str(path)!r}, saved for a different config "
                            f"({'; '.join(diff)[:200]}); expected the same config to resume, "
                            "or pass --overwrite or another --json")
    old_sha = data["provenance"]["data_sha256"]
    if old_sha != data_sha:
        raise KVTheoryError(f"json: got {str(path)!r}, saved for other data (SHA-256 {old_sha} vs "
                            f"{data_sha}); expected the same data to resume, or pass --overwrite")
    old_w = (data["provenance"]["weights"] or {}).get("sha256")
    if weights is not None and old_w != weights["sha256"]:
        raise KVTheoryError(f"json: got {str(path)!r}, saved for other weights of model "
                            f"{cfg.model!r} (fingerprint {str(old_w)[:12]}... vs "
                            f"{weights['sha256'][:12]}...); expected the same weights to resume, "
                            "or pass --overwrite")


def _merge(current: dict[str, Any] | None, ours: dict[str, Any], grid: list) -> dict[str, Any]:
    """``current`` (the file now) plus our rows and run log; rows already there are kept."""
    base = dict(current) if current is not None else dict(ours)
    records = {(r["method"], r["target"]): r for r in base["records"]}
    for r in ours["records"]:
        records.setdefault((r["method"], r["target"]), r)
    cfg = dict(base["config"])
    cfg["methods"] = list(dict.fromkeys([*cfg["methods"], *ours["config"]["methods"]]))
    cfg["targets"] = list(dict.fromkeys([*cfg["targets"], *ours["config"]["targets"]]))
    order = {mt: i for i, mt in enumerate((m, t) for m in cfg["methods"] for t in cfg["targets"])}
    runs = [r for r in base["runs"] if r.get("id") != ours["run"]["id"]] + [ours["run"]]
    base.update(config=cfg, runs=runs, calibration=base.get("calibration") or ours["calibration"],
                records=sorted(records.values(),
                               key=lambda r: order.get((r["method"], r["target"]), len(order))))
    base.pop("result_sha256", None)
    base.pop("run", None)
    base = to_jsonable(base)
    base["result_sha256"] = result_sha256(base)
    return base


# ----------------------------------------------------------------------------- the run
def run_eval(
    cfg, path: str | os.PathLike | None = None, *, results_dir: str | os.PathLike = "results",
    overwrite: bool = False, progress: bool = True, batch_size: int | None = 16,
    log: Callable[[str], None] | None = None, lock_timeout: float | None = None,
) -> dict[str, Any]:
    """Evaluate every (method, target) of ``cfg`` not yet in ``path`` and save each row.

    ``path``: the result file (default ``cfg.result_path(results_dir)``). Returns the file's
    content plus ``path``, ``computed``, ``skipped`` and ``failed`` (rows whose metric was not
    finite: ``[method, target, reason]``, not saved). Raises :class:`KVTheoryError` before any
    computing for a bad path, device, file to resume or a method that does not fit the model.
    """
    from .config import EvalConfig

    if not isinstance(cfg, EvalConfig):
        raise bad_argument("cfg", cfg, "an EvalConfig")
    say = log or (lambda msg: print(msg, file=sys.stderr))
    check_device(cfg.device)
    check_int("seed", cfg.seed, 0, 2**63 - 1)  # torch seeds are signed 64-bit
    check_int("n_boot", cfg.n_boot, 1, MAX_BOOT)  # resamples x items int64 must fit in memory
    for name in ("model", "text_file", "data_dir"):
        value = getattr(cfg, name)
        if value is not None and "\0" in str(value):
            raise bad_argument(name, value, "a name or path without NUL characters")
    batch_size = 16 if batch_size is None else check_int("batch_size", batch_size, 1)
    if path is not None and not str(path):
        raise bad_argument("json", path, "a file path (or None for the path derived from the config)")
    path = check_output_file(path if path is not None else cfg.result_path(results_dir), "json")
    _check_not_an_input(path, cfg)
    prev = None if overwrite else _load(path)
    job = Job(cfg, progress=progress, batch_size=batch_size)
    job.load_data()  # corpus SHA-256 and empty text are checked before the model loads
    data_sha = job.prov()["data_sha256"]
    weights = job.weights = weights_fingerprint(cfg.model)
    if prev is not None:
        _check_same(prev, path, cfg, data_sha, weights)
    d = _head_dim(model_folder(cfg.model)) if weights is not None else None
    if d is not None:
        check_methods(cfg.methods, cfg.targets, d)
    grid = [(m, t) for m in cfg.methods for t in cfg.targets]
    done = {(r["method"], r["target"]) for r in (prev or {}).get("records", [])}
    run_log: dict[str, Any] = {
        "id": uuid.uuid4().hex[:12], "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "computed": [],
        "skipped": [list(mt) for mt in grid if mt in done], "failed": [], "finished": None}
    todo = [mt for mt in grid if mt not in done]
    if todo:
        job.load_model()
        check_methods(cfg.methods, cfg.targets, job.info.d)
        if weights is None:  # a Hub id fetched just now: its files are cached
            weights = job.weights = weights_fingerprint(cfg.model)
            if prev is not None:
                _check_same(prev, path, cfg, data_sha, weights)
    ours: dict[str, Any] = {
        "kind": KIND, "format": FORMAT, "config": cfg.to_dict(), "config_hash": cfg.hash(),
        "provenance": (prev or {}).get("provenance") or provenance(
            seed=cfg.seed, **job.prov()),
        "calibration": job.calibration_info() if todo else (prev or {}).get("calibration"),
        "records": [], "run": run_log, "runs": []}
    fresh = overwrite  # --overwrite: the first write replaces the file, later ones merge

    def save() -> dict[str, Any]:
        nonlocal fresh
        with file_lock(path, "json", lock_timeout):
            current = None if fresh else _load(path)
            if current is not None:
                _check_same(current, path, cfg, data_sha, weights)
            merged = _merge(current, ours, grid)
            write_json(path, merged, arg="json")
        fresh = False
        return merged

    from tqdm.auto import tqdm

    for method, target in tqdm(todo, desc="rows", disable=not progress or not todo):
        now = None if fresh else _load(path)  # another run may have saved it meanwhile
        if now is not None and any((r["method"], r["target"]) == (method, target) for r in now["records"]):
            run_log["skipped"].append([method, target])
            continue
        record = compute_row(job, method, target)
        bad = {k: m["value"] for k, m in record["metrics"].items()
               if not isinstance(m["value"], (int, float)) or not math.isfinite(m["value"])}
        if bad:
            reason = ", ".join(f"{k} = {v}" for k, v in bad.items())
            run_log["failed"].append([method, target, reason])
            say(f"kvtheory eval: row {method}/{target} not saved: non-finite metric ({reason})")
            continue
        ours["records"].append(record)
        run_log["computed"].append([method, target])
        save()
    run_log["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    final = save()
    return {**final, "path": str(path), "computed": run_log["computed"],
            "skipped": run_log["skipped"], "failed": run_log["failed"]}
