"""The fine-tuning loop and its data: official schedule, deterministic batches, prompt tokens not scored."""

import pytest
import torch

from losa.finetune import IGNORE_INDEX, FinetuneConfig, alpaca_batches, finetune, lm_text_batches, tokenize_alpaca
from tiny_models import tiny_llama


class CharTokenizer:
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 100) for c in text]}


def test_finetune_lowers_the_loss_and_logs_every_step():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # the tied embedding: enough to learn something
    stream = torch.arange(2000) % 50  # a trivially learnable sequence
    seen = []
    res = finetune(model, lm_text_batches(stream, 16, 4, seed=0), 30, FinetuneConfig(lr=5e-2, warmup_ratio=0.1),
                   log=lambda m, s: seen.append((s, m["loss"], m["lr"])), progress=False)
    assert len(res.losses) == 30 and [s for s, _, _ in seen] == list(range(30))
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    assert seen[-1][2] == pytest.approx(0.0)  # linear decay to zero
    assert max(lr for _, _, lr in seen) == pytest.approx(5e-2)  # reached after the warm-up
    assert res.tokens == 30 * 4 * 16


def test_needs_trainable_parameters():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        finetune(model, iter([]), 1, progress=False)


def test_text_batches_continue_from_an_offset():
    stream = torch.arange(5000)
    a = lm_text_batches(stream, 8, 2, seed=3)
    next(a)
    second = next(a)
    assert torch.equal(second["input_ids"], next(lm_text_batches(stream, 8, 2, seed=3, start=1))["input_ids"])
    assert torch.equal(second["labels"], second["input_ids"])


def test_alpaca_prompt_tokens_are_not_scored():
    ex = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "hi there"}]
    enc = tokenize_alpaca(CharTokenizer(), ex, max_len=512)
    ids, labels = enc[0]
    scored = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert scored == [2 + ord("5") % 100, 1]  # the response and EOS only
    batch = next(alpaca_batches(enc, 2, pad_id=0, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == sum(len(i) for i, _ in enc)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
