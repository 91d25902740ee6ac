"""Doctest collection: skip the integration modules whose optional package is not installed."""

import importlib.util

collect_ignore = [name for name, package in (("lmeval.py", "lm_eval"),)
                  if importlib.util.find_spec(package) is None]
