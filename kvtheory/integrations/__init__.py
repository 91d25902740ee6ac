"""Bridges to the evaluation and compression tools of the field (optional extras).

* :mod:`kvtheory.integrations.lmeval`: a ``kvtheory`` model for lm-evaluation-harness
  (``pip install 'kvtheory[lmeval]'``) and offline task configs under ``tasks/``.
* :mod:`kvtheory.integrations.kvpress`: runs NVIDIA kvpress presses on transformers 5.x and
  measures them with kvtheory (keep masks, flips, evicted mass, perplexity under eviction);
  ``pip install 'kvtheory[kvpress]'`` then ``pip install --no-deps 'kvpress>=0.5.5,<0.6'``.

Neither package is imported by ``import kvtheory``; each module raises a
:class:`~kvtheory.errors.KVTheoryError` naming the install command when its package is missing.
"""

__all__: list[str] = []
