"""``kvtheory models``: the model registry, each model's install state and architecture facts.

One line per registry model: name, state (``not installed`` / ``installed`` / ``converted``)
and, when its config is available (a converted GGUF or a package folder), the architecture
facts of :func:`kvtheory.models.facts_line`; otherwise the registry's description and the
install command. ``--json`` prints the rows of :func:`kvtheory.models.registry_status`;
``--convert`` converts installed GGUF packages first (once, about a minute each).
"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "models"
HELP = "list the model registry with install state and per-model architecture facts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--convert", action="store_true",
                   help="convert installed GGUF packages to the cached safetensors first")
    p.add_argument("--cache-dir", default=None, help="converted-model cache (else $KVTHEORY_CACHE)")


def run(args: argparse.Namespace) -> int:
    from ..models import registry_status

    rows = registry_status(args.cache_dir, convert=args.convert)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        detail = r["facts"] or f"{r['description']}; install: {r['install']}"
        if r["state"] == "installed" and r["facts"] is None:
            detail = f"{r['description']} (converted on first load, or kvtheory models --convert)"
        print(f"{r['name']:<{width}}  {r['state']:<13}  {detail}", file=sys.stdout)
    return 0
