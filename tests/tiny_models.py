"""Tiny random-init causal LMs of every supported family, built from configs (never from the hub).

Sizes are multiples of 8 so N:M patterns with M in {4, 8} are valid on every prunable linear. Every builder seeds
torch before init, so the same call returns the same weights.
"""

from __future__ import annotations

import torch

VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
HEADS = 4
LAYERS = 2
MAX_POS = 64
INIT_STD = 0.1  # larger than HF's 0.02 so that blocks (and pruning them) visibly change the residual stream


def _finish(model):
    return model.float().eval()


def _decoder_kwargs(kv_heads: int) -> dict:
    """Config arguments shared by the LLaMA-layout families (llama, mistral, qwen2)."""
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS,
                initializer_range=INIT_STD)


def tiny_llama(seed: int = 0, kv_heads: int = HEADS, **overrides):
    """LLaMA; multi-head attention by default (``kv_heads=HEADS``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(LlamaConfig(**{**_decoder_kwargs(kv_heads), **overrides})))


def tiny_llama_gqa(seed: int = 0, **overrides):
    """LLaMA with grouped-query attention: 2 key/value heads for 4 query heads."""
    return tiny_llama(seed, kv_heads=2, **overrides)


def tiny_mistral(seed: int = 0, **overrides):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(**{**_decoder_kwargs(2), "sliding_window": None, **overrides})
    return _finish(MistralForCausalLM(cfg))


def tiny_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(Qwen2Config(**{**_decoder_kwargs(2), **overrides})))


def tiny_opt(seed: int = 0, **overrides):
    """OPT: word_embed_proj_dim == hidden_size (no project_in/out), max_position_embeddings >= any test seqlen."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=INTERMEDIATE,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                              init_std=INIT_STD, dropout=0.0, attention_dropout=0.0), **overrides})
    return _finish(OPTForCausalLM(cfg))


# family name as reported by losa.get_adapter -> builder
BUILDERS = {
    "llama": tiny_llama,
    "llama_gqa": tiny_llama_gqa,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "opt": tiny_opt,
}
FAMILY = {"llama": "llama", "llama_gqa": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt"}
MODEL_TYPE = {"llama": "llama", "llama_gqa": "llama", "mistral": "mistral", "qwen2": "qwen2", "opt": "opt"}


def calibration_ids(n: int = 8, seqlen: int = 16, seed: int = 1234) -> torch.Tensor:
    """(n, seqlen) random token ids, deterministic."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)
