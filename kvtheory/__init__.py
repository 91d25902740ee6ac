"""kvtheory: why KV-cache quantization dominates rank reduction, in theory and on real models.

The public names are imported lazily, so ``import kvtheory`` is fast and does not pull in
transformers until a model is needed.

>>> import kvtheory
>>> kvtheory.headline_ratio(4)
768
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "KVTheoryError": "errors",
    # theory
    "softmax_fisher": "fisher",
    "fisher_damage": "fisher",
    "softmax_kl": "fisher",
    "headline_ratio": "bounds",
    "projection_damage": "bounds",
    "expected_quant_damage": "bounds",
    "exact_ratio": "bounds",
    "margin_certificate": "bounds",
    "projection_kl": "bounds",
    "mc_quant_damage": "bounds",
    "rounded_quant_damage": "bounds",
    "logit_bound": "bounds",
    "derivations": "symbolic",
    "verify_all": "symbolic",
    # compression
    "make_compressor": "compress",
    "parse_method": "compress",
    "Compressor": "methods",
    "register_method": "methods",
    "check_methods": "methods",
    "bits_per_element": "ledger",
    "matched": "ledger",
    # metrics
    "flip_rate": "flips",
    "attention_metrics": "flips",
    # models
    "load_model": "models",
    "compressed_kv": "patch",
    "capture": "capture",
    "load_capture": "capture",
    "save_capture": "capture",
    "fit_compressors": "patch",
    "perplexity": "evaluate",
    "lambada": "evaluate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtheory' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
