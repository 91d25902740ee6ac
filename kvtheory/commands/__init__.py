"""Sub-commands of the ``kvtheory`` CLI, one module each (see :mod:`kvtheory.cli`)."""
