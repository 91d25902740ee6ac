"""Random-weight models of real shapes for benchmarks where nothing can be downloaded (part of
:mod:`kvtheory.bench`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .rows import _as_dtype

#: SmolLM2-135M's shape (LlamaConfig keywords), for random-weight models where nothing downloads
SMOLLM2_SHAPE: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
)
#: Mistral-7B's shape (MistralConfig keywords): the GPU benchmarks' 7B-shaped model
MISTRAL7B_SHAPE: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
)


def smollm2_shaped_model(device: Any = "cpu", dtype: Any = torch.float32, seed: int = 0,
                         **overrides: Any) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of SmolLM2-135M's shape (:data:`SMOLLM2_SHAPE`) with random weights.

    For machines where nothing can be downloaded; ``overrides`` change the shape (tests use tiny
    ones).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**SMOLLM2_SHAPE, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=_as_dtype(dtype)).eval()


def mistral7b_shaped_model(device: Any = "cpu", dtype: Any = torch.bfloat16, seed: int = 0,
                           **overrides: Any) -> torch.nn.Module:
    """A ``MistralForCausalLM`` of Mistral-7B's shape (:data:`MISTRAL7B_SHAPE`, 7.2e9
    parameters) with random weights, made on ``device`` in ``dtype`` (no float32 copy first);
    ``overrides`` change the shape (a dry run uses a tiny one)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(**{**MISTRAL7B_SHAPE, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=_as_dtype(dtype))
    return model.eval()


def random_ids(n: int, vocab: int, *, batch: int | None = None, seed: int = 0) -> Tensor:
    """Seeded random token ids in 1..vocab-1, shaped (n,) or (batch, n)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if batch is None else (batch, n)
    return torch.randint(1, vocab, shape, generator=g)
