"""Files that are never half-written: atomic writes, SHA-256 sums and provenance."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import KVTheoryError, bad_argument

__all__ = [
    "atomic_write",
    "check_output_file",
    "check_output_dir",
    "file_lock",
    "write_json",
    "read_json",
    "sha256_file",
    "sha256_bytes",
    "canonical_json",
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
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    except OSError as exc:
        raise KVTheoryError(f"path: got {str(path)!r}, which cannot be read ({exc.strerror or exc}); "
                            "expected a readable file") from None
    return h.hexdigest()


def canonical_json(obj: Any, arg: str = "value", **kw: Any) -> str:
    """Strict JSON of ``obj`` (after :func:`to_jsonable`); a value JSON cannot hold (infinity, an
    object of unknown type) is a :class:`KVTheoryError` naming where it sits.

    >>> canonical_json({"a": [1, float("inf")]})
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: value: got inf at a[1]; expected finite numbers (NaN is saved as null), strings, lists and dicts
    """
    obj = to_jsonable(obj)
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except (ValueError, TypeError):
        where, bad = _find_unjsonable(obj, "")
        raise KVTheoryError(f"{arg}: got {bad!r} at {where or 'the top level'}; expected finite "
                            "numbers (NaN is saved as null), strings, lists and dicts") from None


def _find_unjsonable(obj: Any, where: str) -> tuple[str | None, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _find_unjsonable(v, f"{where}.{k}" if where else str(k))
            if found[0] is not None:
                return found
        return None, None
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _find_unjsonable(v, f"{where}[{i}]")
            if found[0] is not None:
                return found
        return None, None
    if obj is None or isinstance(obj, (str, bool, int)) or (isinstance(obj, float) and obj == obj
                                                            and abs(obj) != float("inf")):
        return None, None
    return where, obj


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


#: errors of a full or over-quota disk: named, never a traceback
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _os_error(arg: str, path: Path, exc: OSError, doing: str) -> KVTheoryError:
    why = exc.strerror or type(exc).__name__
    if exc.errno in _NO_SPACE:
        why = f"{why}: the disk or quota is full; free space and run again"
    elif exc.errno == errno.ENAMETOOLONG:
        why = f"{why}: a file name is limited to {_name_max(path.parent)} bytes here"
    return KVTheoryError(f"{arg}: got {str(path)!r}; expected a path that can be {doing} ({why}; "
                         "nothing was written)")


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not POSIX
        return 255


def _sidecar(path: Path, suffix: str) -> str:
    """A hidden name beside ``path`` (``.NAME<suffix>``), shortened to fit the file-name limit."""
    name = f".{path.name}{suffix}"
    limit = _name_max(path.parent) - 16  # room for mkstemp's random part
    if len(name.encode()) <= limit:
        return name
    digest = sha256_bytes(path.name.encode())[:12]
    head = path.name.encode()[: max(1, limit - len(suffix) - 14)].decode("utf-8", "ignore")
    return f".{head}-{digest}{suffix}"


def _resolve_output(path: Path, arg: str) -> Path:
    """Follow a symlink to the file it names; refuse an existing non-regular file or folder."""
    if not str(path) or str(path) == "." or "\0" in str(path):
        raise bad_argument(arg, str(path), "a file path (non-empty, without NUL characters)")
    limit = _name_max(path.parent)
    if len(path.name.encode()) > limit:
        raise KVTheoryError(f"{arg}: got a file name of {len(path.name.encode())} bytes "
                            f"({path.name[:40]!r}...); expected at most {limit} bytes, the limit "
                            "of this filesystem")
    try:
        if path.is_symlink():
            path = Path(os.path.realpath(path))  # update the target, keep the link
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _os_error(arg, path, exc, "written") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise KVTheoryError(f"{arg}: got {str(path)!r}, which is a folder; expected a file path, not a folder")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device node"
                    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
                    if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise KVTheoryError(f"{arg}: got {str(path)!r}, which is {kind}; expected a regular "
                                "file (or a new path) to write")
    return path


def check_output_file(path: str | os.PathLike, arg: str = "path") -> Path:
    """Check, before any work, that ``path`` can be written atomically; return the path to write.

    Refuses folders, device nodes, FIFOs and sockets, names longer than the filesystem allows and
    read-only folders (a probe file is created and removed). A symlink resolves to its target,
    which is what :func:`atomic_write` then replaces.

    >>> check_output_file("/dev/null", "json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: json: got '/dev/null', which is a device node; expected ...
    """
    path = _resolve_output(Path(path), arg)
    _ensure_dir(path, arg)
    try:
        fd, probe = tempfile.mkstemp(prefix=_sidecar(path, "."), suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _os_error(arg, path, exc, "written") from None
    return path


def check_output_dir(path: str | os.PathLike, arg: str = "out") -> Path:
    """Check, before any work, that ``path`` is (or can be created as) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KVTheoryError(f"{arg}: got {str(path)!r}, which is a file; expected a folder")
    probe = path / ".kvtheory-probe"
    _ensure_dir(probe, arg)
    try:
        fd, name = tempfile.mkstemp(prefix=".kvtheory-", suffix=".probe", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise _os_error(arg, path, exc, "written into") from None
    return path


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], None] | bytes | str, arg: str = "path"
) -> Path:
    """Write a file atomically: into a temporary file beside it, then ``os.replace``.

    ``write`` is the content (``bytes``/``str``) or a callable that writes to the
    temporary path it is given (for writers such as ``safetensors.torch.save_file``).
    A reader never sees a partial file, and an interrupted write leaves the old file.
    A symlink is followed (its target is replaced); folders, device nodes and FIFOs are
    refused; a full disk or an over-long name is a :class:`KVTheoryError` and leaves the old
    file and no temporary file. Returns the path written (the symlink's target for a symlink).
    """
    path = _resolve_output(Path(path), arg)
    _ensure_dir(path, arg)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_sidecar(path, "."), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in _NO_SPACE or exc.errno == errno.ENAMETOOLONG:
            raise _os_error(arg, path, exc, "written") from None
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
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise _os_error(arg, path, exc, "written") from None
        raise
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, arg: str = "path", timeout: float | None = None):
    """Hold an exclusive advisory lock for ``path`` (``fcntl.flock`` on ``.NAME.lock`` beside it).

    The lock file holds the holder's PID. The kernel drops a ``flock`` when its holder dies, so
    a lock file left by a killed process (its PID gone) is stale and simply taken over. Waits
    up to ``timeout`` seconds (default ``$KVTHEORY_LOCK_TIMEOUT``, else 120), then raises a
    :class:`KVTheoryError` naming the holder's PID. Yields the lock file's path. Where
    ``flock`` is not supported (some network filesystems) the lock is an exclusively created
    file with the PID, and a file whose PID is gone on this machine is removed as stale.
    """
    import fcntl

    path = Path(path)
    lock = path.parent / _sidecar(path, ".lock")
    if timeout is None:
        timeout = float(os.environ.get("KVTHEORY_LOCK_TIMEOUT", "120"))
    deadline = time.monotonic() + timeout
    _ensure_dir(lock, arg)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error(arg, lock, exc, "locked") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise _lock_timeout(arg, path, lock, timeout) from None
            time.sleep(0.05)
            continue
        except OSError:  # no flock here: fall back to an exclusively created file
            os.close(fd)
            with _excl_lock(path, lock, arg, deadline, timeout):
                yield lock
            return
        # the file may have been unlinked by its previous holder after we opened it
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock
    finally:
        try:
            os.unlink(lock)  # still ours: we hold the flock on this very inode
        except FileNotFoundError:  # pragma: no cover
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _lock_timeout(arg: str, path: Path, lock: Path, timeout: float) -> KVTheoryError:
    pid = _holder(lock)
    who = f"PID {pid}" if pid is not None else "an unknown process"
    state = "still running" if pid is not None and _pid_alive(pid) else "gone (an inherited descriptor may hold it)"
    return KVTheoryError(f"{arg}: got {str(path)!r}, locked by {who} ({state}) for over "
                         f"{timeout:g} s; expected an unlocked file (wait for that run, or use "
                         f"another --json; lock file {str(lock)!r})")


@contextlib.contextmanager
def _excl_lock(path: Path, lock: Path, arg: str, deadline: float, timeout: float):
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            pid = _holder(lock)
            if pid is not None and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)  # stale: its holder is gone
                continue
            if time.monotonic() > deadline:
                raise _lock_timeout(arg, path, lock, timeout) from None
            time.sleep(0.05)
        except OSError as exc:
            raise _os_error(arg, lock, exc, "locked") from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


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
    text = canonical_json(obj, arg, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, text, arg=arg)


def read_json(path: str | os.PathLike, arg: str = "path") -> Any:
    """Read a JSON file with a clear error when it is missing or corrupted."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # FIFO/device: would block
            raise KVTheoryError(f"{arg}: got {str(path)!r}, which is not a regular file; expected "
                                "a JSON file written by kvtheory")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KVTheoryError(f"{arg}: got {str(path)!r}; expected an existing JSON file") from None
    except json.JSONDecodeError as exc:
        raise KVTheoryError(
            f"{arg}: got {str(path)!r}, which is not valid JSON ({exc.msg} at line {exc.lineno}); "
            "expected a file written by kvtheory"
        ) from None
    except UnicodeDecodeError:
        raise KVTheoryError(f"{arg}: got {str(path)!r}, which is not UTF-8 text; expected a JSON "
                            "file written by kvtheory") from None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise KVTheoryError(f"{arg}: got {str(path)!r}, which cannot be read ({exc.strerror or exc}); "
                            "expected a readable JSON file") from None


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
