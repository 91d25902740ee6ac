r"""The evaluation config: one frozen, validated dataclass per ``kvtheory eval`` run.

A result file stores its config; :meth:`EvalConfig.identity` (every field except the method
grid and where the data lives) decides whether a saved file can be resumed, and
:meth:`EvalConfig.result_path` derives a default file name from it.

>>> cfg = EvalConfig("smollm2-135m", "wikitext2", ("fp", "int4"), ("kv",), max_windows=2)
>>> cfg.result_path("results").parent.as_posix()
'results/eval/smollm2-135m/wikitext2'
>>> EvalConfig("smollm2-135m", "wikitext2", ("fp",), max_windows=0)
Traceback (most recent call last):
...
kvtheory.errors.KVTheoryError: max_windows: got 0; expected an integer >= 1
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from ._checks import check_choice, check_int
from .errors import KVTheoryError, bad_argument

__all__ = ["EvalConfig", "TASKS", "TARGETS", "DTYPES", "DEFAULT_SEQ_LEN"]

#: evaluation tasks: causal-LM perplexity, LAMBADA last-word, encoder embedding fidelity
TASKS = ("wikitext2", "lambada", "embed")
#: which cache tensors a method compresses (the other stays uncompressed, ``"fp"``)
TARGETS = ("k", "v", "kv")
#: dtype names accepted on the command line
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: per-task default window length (the PPL window; the calibration window otherwise)
DEFAULT_SEQ_LEN = {"wikitext2": 1024, "lambada": 1024, "embed": 128}


def _tuple_of_str(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    try:
        items = tuple(str(v).strip() for v in value)
    except TypeError:
        raise bad_argument(name, value, "a comma-separated list or a sequence of strings") from None
    if not items or any(not v for v in items):
        raise bad_argument(name, value, "a non-empty list of non-empty names")
    if len(set(items)) != len(items):
        raise bad_argument(name, value, "a list without repeated names")
    return items


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run.

    * ``methods``: method specs (:func:`kvtheory.methods.parse_method`: built-in, or a family
      added with :func:`kvtheory.methods.register_method` or a plugin), e.g. ``fp``,
      ``int4-kivi``, ``rank16-pca``; ``targets`` ⊂ {``k``, ``v``, ``kv``}. A ``qaware`` method
      with a target that compresses values is refused (qaware is defined for keys only). The
      head dimension is checked once the model is known (:func:`kvtheory.methods.check_methods`).
    * ``seq_len``: window length in tokens (PPL windows; calibration windows for every task).
    * ``max_windows``: the first N non-overlapping windows (None: all windows that fit before
      the calibration tail).
    * ``limit``: the first N LAMBADA passages / WikiText sentences (``embed``).
    * ``calib_windows``: windows of ``seq_len`` tokens taken from the END of the corpus token
      stream to fit data-dependent bases (pca, qaware, ...); disjoint from the evaluated tokens.
    * ``n_boot``: bootstrap resamples for the 95% intervals.
    * ``device_map``: None (the whole model on ``device``), or a placement for accelerate as text:
      ``auto``/``balanced``/``sequential`` or JSON ``{module: device}`` (layers on several
      devices; compressors and fitted bases follow each layer's device).
    """

    model: str
    task: str
    methods: Sequence[str]  # a tuple after validation (a comma-separated string is accepted)
    targets: Sequence[str] = ("kv",)
    seq_len: int | None = None
    max_windows: int | None = 4
    limit: int | None = None
    calib_windows: int = 2
    rope: str = "post"
    seed: int = 0
    data_dir: str | os.PathLike | None = None
    text_file: str | os.PathLike | None = None
    device: str = "cpu"
    device_map: str | None = None
    dtype: str = "float32"
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise bad_argument("model", self.model, "a model name (smollm2-135m, minilm-l6) or "
                               "a Hugging Face id or local path")
        check_choice("task", self.task, TASKS)
        methods = _tuple_of_str("methods", self.methods)
        targets = _tuple_of_str("targets", self.targets)
        for t in targets:
            check_choice("targets", t, TARGETS)
        from .methods import parse_method
        from .methods.rotated import check_qaware_role

        values = any(t in ("v", "kv") for t in targets)
        for m in methods:
            spec = parse_method(m)  # the registry: built-in and registered families; else an error
            if values:  # refused here, before a model loads (issue 11)
                check_qaware_role(str(spec), spec.basis, "v")
        seq_len = DEFAULT_SEQ_LEN[self.task] if self.seq_len is None else self.seq_len
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "seq_len", check_int("seq_len", seq_len, 2))
        if self.max_windows is not None:
            check_int("max_windows", self.max_windows, 1)
        if self.limit is not None:
            check_int("limit", self.limit, 1)
        check_int("calib_windows", self.calib_windows, 1)
        check_choice("rope", self.rope, ("post", "pre"))
        check_int("seed", self.seed, 0)
        check_int("n_boot", self.n_boot, 1)
        check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise bad_argument("device", self.device, "cpu, cuda, cuda:N or mps")
        if self.device_map is not None:  # a strategy or JSON text (kept as text: hashable, saved)
            from .placement import parse_device_map

            if not isinstance(self.device_map, str):
                raise bad_argument("device_map", self.device_map, "None, a strategy name or JSON text")
            parse_device_map(self.device_map)
        if self.text_file is not None and self.task == "lambada":
            raise bad_argument("text_file", self.text_file,
                               "no text file for the lambada task (it reads the LAMBADA corpus)")
        for name in ("data_dir", "text_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))

    # ------------------------------------------------------------------ identity / paths
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"], d["targets"] = list(self.methods), list(self.targets)
        return d

    def identity(self) -> dict[str, Any]:
        """The fields that determine every number of a row (all but the grid, the data folder
        and the size field the task does not use: ``limit`` for wikitext2, else ``max_windows``).

        Rows saved under the same identity can be reused: adding a method to the grid
        resumes the file instead of starting over. The data are pinned by their SHA-256,
        which the result file stores beside it, so the folder they came from is left out.
        """
        d = self.to_dict()
        unused = ("limit",) if self.task == "wikitext2" else ("max_windows",)
        for key in ("methods", "targets", "data_dir", *unused):
            d.pop(key)
        if d["device_map"] is None:  # files written before device_map existed keep their identity
            d.pop("device_map")
        if self.text_file is not None:
            d["text_file"] = Path(self.text_file).name
        return d

    def hash(self) -> str:
        """12 hex digits of SHA-256 over the canonical JSON of :meth:`identity`."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    def result_path(self, root: str | os.PathLike = "results") -> Path:
        """``root/eval/<model>/<task>/L<seq_len>-W<windows>-<rope>-s<seed>-<hash>.json``."""
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.strip("/")).strip("_") or "model"
        model = model[-60:]
        size = f"N{self.limit}" if self.task != "wikitext2" else f"W{self.max_windows or 'all'}"
        name = f"L{self.seq_len}-{size}-{self.rope}-s{self.seed}-{self.hash()}.json"
        return Path(root) / "eval" / model / self.task / name

    def torch_dtype(self):
        """The ``torch.dtype`` named by :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalConfig":
        """Rebuild a config saved with :meth:`to_dict` (unknown keys are an error)."""
        try:
            return cls(**{**d, "methods": tuple(d["methods"]), "targets": tuple(d["targets"])})
        except (TypeError, KeyError) as exc:
            raise KVTheoryError(f"config: got {d!r:.80}; expected a saved EvalConfig ({exc})") from None
