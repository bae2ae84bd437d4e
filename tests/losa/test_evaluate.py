"""Perplexity as the pruning papers compute it: exp(mean token NLL) over non-overlapping windows."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from losa.evaluate import perplexity


class ByteTokenizer:
    def __call__(self, text, return_tensors=None):
        ids = [b % 64 for b in text.encode("utf-8")]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


TEXT = "The quick brown fox jumps over the lazy dog. " * 30  # 1,350 bytes


def test_matches_a_direct_computation(model):
    seqlen = 64
    ids = ByteTokenizer()(TEXT, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen  # the tail is dropped, windows do not overlap
    with torch.no_grad():
        losses = [model(input_ids=ids[i * seqlen : (i + 1) * seqlen][None], labels=ids[i * seqlen : (i + 1) * seqlen][None]).loss
                  for i in range(n)]
    expected = math.exp(torch.stack(losses).mean().item())
    assert perplexity(model, ByteTokenizer(), TEXT, seqlen, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_batch_size_and_window_limit(model):
    full = perplexity(model, ByteTokenizer(), TEXT, 64, batch_size=1)
    assert perplexity(model, ByteTokenizer(), TEXT, 64, batch_size=7) == pytest.approx(full, rel=1e-5)
    first = perplexity(model, ByteTokenizer(), TEXT[: 64 * 3], 64, batch_size=2)
    assert perplexity(model, ByteTokenizer(), TEXT, 64, batch_size=2, max_windows=3) == pytest.approx(first, rel=1e-6)
    assert first != pytest.approx(full, rel=1e-4)


def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="fewer than eval_seqlen"):
        perplexity(model, ByteTokenizer(), "short", 64)
    with pytest.raises(ValueError):
        perplexity(model, ByteTokenizer(), TEXT, 1)
