"""Where a model's modules go: the ``device_map`` that ``--device-map`` and ``load_model`` hand to
accelerate, parsed once at the boundary (a placement strategy or a ``{module: device}`` map)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import bad_argument

__all__ = ["DEVICE_MAP_STRATEGIES", "parse_device_map"]

#: placement strategies accelerate understands for ``device_map``
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | dict | None, name: str = "device_map") -> str | dict | None:
    """A ``device_map`` from the command line or a config: None, a placement strategy
    (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``), a JSON object
    ``{module: device}`` as text, or such a dict.

    >>> parse_device_map("auto"), parse_device_map('{"": "cpu"}')
    ('auto', {'': 'cpu'})
    """
    if text is None or text in DEVICE_MAP_STRATEGIES:
        return text
    value = text
    if isinstance(text, str):
        import json

        try:
            value = json.loads(text)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
        raise bad_argument(name, text, f"{', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object "
                           'such as {"": "cpu"}')
    for module, device in value.items():
        if not _placement_ok(device):
            raise bad_argument(f"{name}[{module!r}]", device, "a GPU index (0, 1, ...), 'cpu', "
                               "'disk' or a torch device such as 'cuda:1'")
    return value


def _placement_ok(device: Any) -> bool:
    """Whether ``device`` is a place accelerate takes in a device map."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    if not isinstance(device, str):
        return False
    if device == "disk":
        return True
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return False
    return True
