"""Repository-wide pytest set-up.

* Every ``kvtheory`` module imported during the tests goes through jaxtyping's import hook
  with beartype, so the axis names in signatures (``Float[Tensor, "batch kv_head token d"]``)
  are checked at run time in every test and doctest. The hook stays installed for the whole
  session (``kvtheory`` imports its submodules lazily, after this file has run).
  With the hook, a wrong shape is rejected by jaxtyping before kvtheory's own checks run;
  tests of the user-facing ``KVTheoryError`` call ``inspect.unwrap(fn)``.
* Theory tests run in float64 (``torch.set_default_dtype`` in ``tests/conftest.py``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from jaxtyping import install_import_hook  # noqa: E402

_HOOK = install_import_hook("kvtheory", "beartype.beartype")  # kept for the whole session
