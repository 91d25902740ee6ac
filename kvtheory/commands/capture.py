"""``kvtheory capture``: q/k/v of a model's attention layers on the start of WikiText-2.

Writes ``OUT/capture.safetensors`` and ``OUT/manifest.json`` (see :mod:`kvtheory.capture`).
The tokens are the first ``--tokens`` tokens of the WikiText-2 test text, tokenized by the
tokenization rule of :func:`kvtheory.evaluate.bos_id` (BOS first when the tokenizer adds one,
e.g. Gemma; no special tokens otherwise): the same tokens as the first evaluation window of
``kvtheory eval`` with ``--seq-len`` equal to ``--tokens``. The manifest records each layer's
attention window (``windows``: None for global layers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import KVTheoryError, bad_argument

NAME = "capture"
HELP = "capture per-layer q/k/v on WikiText-2 tokens into safetensors + a JSON manifest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m, minilm-l6, a HF id or a folder")
    p.add_argument("--tokens", default="1024", help="number of tokens from the start of WikiText-2")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--what", default="q,k,v", help="comma-separated subset of q,k,v")
    p.add_argument("--rope", default="post", help="post | pre: keys and queries after or before RoPE")
    p.add_argument("--data-dir", default=None, help="corpora folder (else $KVTHEORY_DATA)")
    p.add_argument("--text-file", default=None, help="read this UTF-8 text instead of WikiText-2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", default=None,
                   help="accelerate placement: auto | balanced | sequential | a JSON object "
                        "{module: device} (then --device is ignored)")
    p.add_argument("--dtype", default="float32", help="model dtype; tensors are stored as float32")
    p.add_argument("--keep-dtype", action="store_true", help="store tensors in the model dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ints(name: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise bad_argument(name, text, "comma-separated integers such as 0,5") from None


def _device_map(text: str | None):
    """``--device-map``: None, a placement strategy name, or a JSON object {module: device}."""
    from ..placement import parse_device_map

    return parse_device_map(text, "--device-map")


def _text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        try:
            return Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise bad_argument("--text-file", args.text_file, f"a readable UTF-8 file ({exc})") from None
    from ..data import load_wikitext2

    return load_wikitext2(args.data_dir)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..capture import capture, save_capture
    from ..evaluate import bos_id, check_seq_len, tokenize
    from ..models import load_model

    try:
        n_tokens = int(args.tokens)
    except ValueError:
        raise bad_argument("--tokens", args.tokens, "a positive integer") from None
    if n_tokens < 1:
        raise bad_argument("--tokens", n_tokens, "a positive integer")
    layers = _ints("--layers", args.layers)
    _device_map(args.device_map)  # a malformed placement fails before any work
    what = [w.strip() for w in str(args.what).split(",") if w.strip()]
    if args.rope not in ("post", "pre"):
        raise bad_argument("--rope", args.rope, "post or pre")
    from ..capture import MANIFEST, TENSOR_FILE
    from ..io import check_output_dir, check_output_file

    out = check_output_dir(Path(args.out), "--out")  # fail before the work, not after it
    for name in (TENSOR_FILE, MANIFEST):
        check_output_file(out / name, "--out")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # errors stay one line on stderr
    except ImportError:  # pragma: no cover
        pass
    text = _text(args)  # corpus errors surface before the model loads
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype,
                    device_map=_device_map(args.device_map))
    if lm.tokenizer is None:
        raise KVTheoryError(
            f"--model: got {args.model!r}, which has no tokenizer; expected a model folder with one")
    check_seq_len(lm.model, n_tokens, "--tokens")
    ids = tokenize(lm.tokenizer, text)
    bos = bos_id(lm.tokenizer)
    if bos is not None:  # the model's own convention (Gemma): BOS first, as kvtheory eval does
        ids = torch.cat([ids.new_tensor([bos]), ids])
    if ids.numel() < n_tokens:
        raise bad_argument("--tokens", n_tokens, f"at most {ids.numel()}, the tokens in the text")
    cap = capture(
        lm, ids[:n_tokens], layers=layers, what=what, rope=args.rope,
        dtype=None if args.keep_dtype else torch.float32, progress=not args.no_progress,
    )
    folder = save_capture(cap, out)
    size = sum(t.numel() * t.element_size() for d in cap.tensors.values() for t in d.values())
    print(
        f"captured {','.join(cap.meta.what)} of {len(cap.meta.layers)} layers x {n_tokens} tokens "
        f"({cap.meta.q_heads} q heads, {cap.meta.kv_heads} kv heads, d={cap.meta.d}, {cap.meta.rope}-RoPE, "
        f"{cap.meta.dtype}, {size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s -> {folder}",
        file=sys.stdout,
    )
    return 0
