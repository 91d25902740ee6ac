"""Files that are never half-written: atomic writes, SHA-256 sums and provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .errors import KVTheoryError

__all__ = [
    "atomic_write",
    "write_json",
    "read_json",
    "sha256_file",
    "sha256_bytes",
    "provenance",
    "git_sha",
    "to_jsonable",
]


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_only(folder: Path) -> bool:
    # A folder without any write bit is read-only by intent, even for root (who could write).
    return not os.access(folder, os.W_OK) or not (folder.stat().st_mode & 0o222)


def _ensure_dir(path: Path, arg: str) -> None:
    # the nearest existing folder: root could create sub-folders inside a read-only one
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and existing != path.parent and _read_only(existing):
        raise KVTheoryError(
            f"{arg}: got {str(path)!r}; expected a path in a writable folder "
            f"({str(existing)!r} is read-only)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVTheoryError(
            f"{arg}: got {str(path)!r}; expected a path whose folder can be created ({exc.strerror})"
        ) from None
    if _read_only(path.parent):
        raise KVTheoryError(
            f"{arg}: got {str(path)!r}; expected a path in a writable folder "
            f"({str(path.parent)!r} is read-only)"
        )


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], None] | bytes | str, arg: str = "path"
) -> Path:
    """Write a file atomically: into a temporary file beside it, then ``os.replace``.

    ``write`` is the content (``bytes``/``str``) or a callable that writes to the
    temporary path it is given (for writers such as ``safetensors.torch.save_file``).
    A reader never sees a partial file, and an interrupted write leaves the old file.
    """
    path = Path(path)
    _ensure_dir(path, arg)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KVTheoryError(
            f"{arg}: got {str(path)!r}; expected a path in a writable folder ({exc.strerror})"
        ) from None
    tmp = Path(tmp_name)
    try:
        if callable(write):
            os.close(fd)
            write(tmp)
        else:
            data = write.encode("utf-8") if isinstance(write, str) else write
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tensors, numpy values and paths into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:  # NaN -> null keeps JSON strict
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any, arg: str = "json") -> Path:
    """Atomically write ``obj`` as pretty, strict JSON."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write(path, text, arg=arg)


def read_json(path: str | os.PathLike, arg: str = "path") -> Any:
    """Read a JSON file with a clear error when it is missing or corrupted."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KVTheoryError(f"{arg}: got {str(path)!r}; expected an existing JSON file") from None
    except json.JSONDecodeError as exc:
        raise KVTheoryError(
            f"{arg}: got {str(path)!r}, which is not valid JSON ({exc.msg} at line {exc.lineno}); "
            "expected a file written by kvtheory"
        ) from None


def git_sha(root: str | os.PathLike | None = None) -> str | None:
    """The git commit of the kvtheory checkout (with ``-dirty`` if modified), or None."""
    root = Path(root) if root else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Versions, seed, git sha, machine and time: stored beside every result."""
    import torch

    from . import __version__

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        tf_version = None
    info: dict[str, Any] = {
        "kvtheory_version": __version__,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "transformers_version": tf_version,
        "python_version": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cpus",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
    }
    info.update(extra)
    return info
