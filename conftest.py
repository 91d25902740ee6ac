"""Repository-wide pytest set-up.

* Every ``kvtheory`` module is imported through jaxtyping's import hook with beartype, so
  the axis names in signatures (``Float[Tensor, "batch kv_head token d"]``) are checked at
  run time in every test and doctest.
* Theory tests run in float64 (``torch.set_default_dtype`` in ``tests/conftest.py``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("kvtheory", "beartype.beartype"):
    import kvtheory  # noqa: F401,E402
