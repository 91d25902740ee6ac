"""Tiny randomly initialised models (float32) of the architectures the toolkit supports.

Every builder seeds torch, so two calls give the same weights. Sizes are chosen so that each
forward pass takes milliseconds: 2 layers, hidden 32, 4 query heads (GQA 4/2 where the
architecture has it), head dim 8, vocabulary 64.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64
ARCHS = ("gpt2", "llama", "mistral", "qwen2", "bert")
#: architectures with QK-norm (keys normalised after k_proj, before RoPE) and/or sliding windows:
#: gemma3 (MQA 4/1, head-wise norm on (batch, head, token, d), layers sliding 4, sliding 4,
#: global), qwen3 (norm on (batch, token, head, d)), olmo2 (norm over the flat head*d output)
QK_ARCHS = ("gemma3", "qwen3", "olmo2")
GEMMA_WINDOW = 4


def tiny_config(arch: str, attn: str = "sdpa", **overrides):
    """The config of a tiny ``arch`` model with attention implementation ``attn``."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, attn_implementation=attn)
    if arch == "gpt2":
        kw = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return tf.GPT2Config(**common, **{**kw, **overrides})
    if arch == "bert":
        kw = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertConfig(**common, **{**kw, **overrides})
    kw = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
              intermediate_size=64, max_position_embeddings=64, head_dim=8)
    if arch == "gemma3":
        kw.update(num_hidden_layers=3, num_key_value_heads=1, sliding_window=GEMMA_WINDOW,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  query_pre_attn_scalar=8, bos_token_id=2, eos_token_id=1, pad_token_id=0)
        return tf.Gemma3TextConfig(**common, **{**kw, **overrides})
    if arch == "olmo2":
        kw.pop("head_dim")
        kw.update(bos_token_id=None, eos_token_id=1, pad_token_id=0)
        return tf.Olmo2Config(**common, **{**kw, **overrides})
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "qwen3": tf.Qwen3Config}[arch]
    if arch == "mistral":
        kw["sliding_window"] = 6  # shorter than the test sequences: the sliding mask matters
    return cls(**common, **{**kw, **overrides})


def tiny_model(arch: str, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny ``arch`` model in float32 and eval mode (LM head for decoders, bare BERT)."""
    import transformers as tf

    config = tiny_config(arch, attn, **overrides)
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
           "qwen2": tf.Qwen2ForCausalLM, "bert": tf.BertModel, "gemma3": tf.Gemma3ForCausalLM,
           "qwen3": tf.Qwen3ForCausalLM, "olmo2": tf.Olmo2ForCausalLM}[arch]
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.float32).eval()


WORDS = ("[UNK] the of and a to in is was on for as with by he at from his an were are which this "
         "that it be had first not but have").split()


def tiny_tokenizer():
    """A word-level tokenizer over :data:`WORDS` (everything else is ``[UNK]`` = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def save_tiny(arch: str, folder: Path, tokenizer: bool = False, **kw) -> Path:
    """Save a tiny model (safetensors), and optionally :func:`tiny_tokenizer`, to ``folder``."""
    tiny_model(arch, **kw).save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_ids(batch: int = 2, tokens: int = 12, seed: int = 1) -> torch.Tensor:
    """Random token ids (batch, tokens) in 1..VOCAB-1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, tokens), generator=g)


def outputs(model: torch.nn.Module, ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Logits of a decoder, last hidden state of an encoder."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad():
        out = model(input_ids=ids, **kw)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
