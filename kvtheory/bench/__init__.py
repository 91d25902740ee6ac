r"""Benchmarks: every speed claim is a ratio of two things timed side by side in one process.

Each case times a kvtheory code path ``B`` against the baseline ``A`` it must be compared with,
interleaved over repetitions (:func:`kvtheory.timing.side_by_side`), and reports the medians and
:math:`\mathrm{median}(t_B)/\mathrm{median}(t_A)` against a target. Cases (``kvtheory bench``):

============  =======================================================================  ==========
case          compares                                                                 target
============  =======================================================================  ==========
``eval``      PPL evaluation (``window_nll``) under ``int4-kivi`` / ``rank16-pca``       ≤ 1.10× /
              against the uncompressed forward on the same tokens; the PCA basis is      ≤ 1.25×
              fitted once before timing and its fit time reported on its own row
``quanto``    transformers' ``QuantizedCache(backend="quanto", nbits=4)``, decoded       ≥ 50×
              token by token to get a PPL, against kvtheory's one-pass causal            faster
              simulation (``compressed_kv`` with ``int4-g64``) on the same tokens
``flips``     :func:`kvtheory.flips.attention_metrics` against the two bare matmuls      ≤ 1.5×
              :math:`QK^\top` and :math:`Q\hat K^\top` of the same shapes and dtype
``memory``    peak memory of ``attention_metrics`` at 32,768 tokens × 9 query heads ×    < 2 GiB
              d = 64 (CPU: peak RSS of a subprocess above its baseline; CUDA:
              ``torch.cuda.max_memory_allocated`` above the memory held before)
``capture``   :func:`~kvtheory.capture.capture` + :func:`~kvtheory.capture.save_capture`   ≤ 1.3×
              against a plain forward of the same tokens
============  =======================================================================  ==========

Every case returns a JSON-ready dict with its ``timings`` (median, min, max, reps per label)
and its table ``rows`` (:data:`ROW_KEYS`); :func:`render_table` prints them. Flop counts:
:func:`flip_flops` counts the two matmuls only, :math:`2 \times 2BHQTd` (softmax, top-k and the
metric reductions are not counted).

The code lives in one module per part: :mod:`~kvtheory.bench.rows` (targets, rows, the table and
the JSON document), :mod:`~kvtheory.bench.shapes` (random-weight models of real shapes),
:mod:`~kvtheory.bench.pipeline` (``eval``, ``capture``), :mod:`~kvtheory.bench.quanto` and
:mod:`~kvtheory.bench.flips` (``flips``, ``memory``, the matmul peak). A new case is one
``case_*`` function in the module of its kind, a :data:`TARGETS` entry and a line in
``kvtheory/commands/bench.py``.
"""

from __future__ import annotations

from .pipeline import EVAL_METHODS, case_capture, case_eval, compressor_share
from .flips import case_flips, case_memory, flip_inputs, matmul_peak
from .quanto import (
                     case_quanto,
                     onepass_nll,
                     quanto_available,
                     quanto_decode_nll,
                     quanto_spec,
                     require_quanto,
)
from .rows import (
                     CASES,
                     ROW_KEYS,
                     TARGETS,
                     WIDTH,
                     case_result,
                     flip_flops,
                     machine,
                     make_row,
                     ratio_row,
                     render_table,
                     results_document,
                     table_text,
                     time_once,
)
from .shapes import (
                     MISTRAL7B_SHAPE,
                     SMOLLM2_SHAPE,
                     mistral7b_shaped_model,
                     random_ids,
                     smollm2_shaped_model,
)

__all__ = [
    "CASES", "ROW_KEYS", "TARGETS", "WIDTH", "SMOLLM2_SHAPE", "MISTRAL7B_SHAPE", "EVAL_METHODS",
    "flip_flops", "make_row", "ratio_row", "case_result", "time_once", "machine",
    "smollm2_shaped_model", "mistral7b_shaped_model", "random_ids",
    "quanto_available", "require_quanto", "quanto_decode_nll", "onepass_nll", "quanto_spec",
    "case_eval", "case_quanto", "case_flips", "case_memory", "case_capture", "matmul_peak",
    "flip_inputs", "render_table", "table_text", "results_document", "compressor_share",
]
