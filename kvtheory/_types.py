"""The one axis-name vocabulary used in every signature (jaxtyping).

======== ==========================================================
axis     meaning
======== ==========================================================
batch    independent sequences
q_head   query heads (``H_q``)
kv_head  key/value heads (``H_kv``); query head ``h`` reads kv head ``h // group``
head     a head axis where q and kv heads coincide (after GQA expansion)
query    query positions
token    key/value positions (the cache axis)
d        head dimension
rank     kept directions of a basis (``r``)
dir      a set of unit directions being analysed
======== ==========================================================

Shapes are checked at run time in the test suite (jaxtyping + beartype import hook,
see ``conftest.py``).
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["Float", "Int", "Bool", "Tensor", "KVTensor", "QTensor"]

#: keys or values as the cache holds them
KVTensor = Float[Tensor, "batch kv_head token d"]
#: queries
QTensor = Float[Tensor, "batch q_head query d"]
