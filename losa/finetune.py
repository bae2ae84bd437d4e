"""Fine-tuning the (masked) LoRA between pruning steps (method.md §4 step 7). No I/O; progress through a callback.

A plain torch loop rather than ``transformers.Trainer``: the DSA loop calls it T times on the same model with a fresh
optimizer and schedule each time, on a handful of batches per step on the CPU testbed; a 40-line loop keeps that
deterministic, cheap to start, and readable, and the defaults are the official ones (AdamW, lr 2e-4, warm-up ratio
0.3, linear decay, weight decay 0.001, grad-norm clip 0.3; paged 8-bit AdamW when bitsandbytes and a GPU exist).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import data
from .config import FinetuneConfig  # noqa: F401 - re-exported (its home is the torch-free config)

IGNORE_INDEX = -100


class Diverged(RuntimeError):
    """Training or evaluation gave a number that is not a result: non-finite, or no better than uniform guessing
    over the vocabulary (loss ln |V|, perplexity |V|). The cell fails with this message (method.md §8)."""


def uniform_loss(model: torch.nn.Module) -> float | None:
    """ln |V|: the loss of a model that guesses uniformly over its vocabulary (None when the size is unknown)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return math.log(vocab) if vocab else None


def diverged(losses: Sequence[float], uniform: float | None) -> bool:
    """Training diverged: it started clearly better than uniform guessing (below 0.9 ln |V|) and ended no better
    (at 0.99 ln |V| or above). A model that starts at ln |V| (random init) or above it (a model pruned beyond repair)
    had nothing to lose; its result is reported as measured."""
    if uniform is None or not losses:
        return False
    return losses[0] < 0.9 * uniform and losses[-1] >= 0.99 * uniform


def check_finite_loss(loss: float, step: int, steps: int) -> None:
    if not math.isfinite(loss):
        raise Diverged(f"training loss is {loss} at optimiser step {step} of {steps}: training diverged")


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)  # one per optimiser step (mean over accumulation)
    seconds: float = 0.0
    tokens: int = 0


def _optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    use_bnb = cfg.optimizer == "paged_adamw_8bit" or (cfg.optimizer == "auto" and params[0].is_cuda)
    if use_bnb:
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            if cfg.optimizer == "paged_adamw_8bit":
                raise
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def finetune(
    model: torch.nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    steps: int,
    cfg: FinetuneConfig = FinetuneConfig(),
    log: Callable[[Mapping[str, float], int], None] | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
) -> FinetuneResult:
    """Train the parameters of ``model`` that require grad for ``steps`` optimiser steps.

    Args:
        model: e.g. a peft model with a masked LoRA (only adapter parameters require grad).
        batches: yields dicts with ``input_ids`` and ``labels`` (B, S) (``IGNORE_INDEX`` = not scored), optionally
            ``attention_mask``; ``steps * cfg.grad_accum`` batches are drawn.
        steps: optimiser steps (the CPU budget of one DSA step).
        cfg: optimisation settings.
        log: called as ``log({"loss": ..., "lr": ...}, global_step)`` after every optimiser step.
        progress: show a progress bar.

    Returns:
        The per-step losses, wall time and tokens seen.
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: did you attach an adapter?")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = params[0].device
    opt = _optimizer(params, cfg)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * steps), steps)
    result = FinetuneResult()
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
            total += loss.item()
            result.tokens += int(batch["input_ids"].numel())
        check_finite_loss(total, step + 1, steps)  # before the update: a NaN gradient would poison every weight
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}", refresh=False)
        if log is not None:
            log({"loss": total, "lr": sched.get_last_lr()[0]}, step)
    model.train(was_training)
    result.seconds = time.perf_counter() - t0
    if diverged(result.losses, uniform_loss(model)):
        raise Diverged(f"training loss went from {result.losses[0]:.3f} to {result.losses[-1]:.3f} in {steps} "
                       f"optimiser steps, ending no better than uniform guessing (ln |V| = {uniform_loss(model):.3f})"
                       ": training diverged")
    return result


# --------------------------------------------------------------------------------------------- data per step


def lm_text_batches(token_stream: torch.Tensor, seqlen: int, batch_size: int, seed: int, start: int = 0) -> Iterator[dict]:
    """Plain-text LM batches (labels = inputs) from a 1-D token stream; batch k depends only on (seed, start + k)."""
    step = start
    while True:
        ids = data.lm_batch(token_stream, seqlen, batch_size, seed, step)
        step += 1
        yield {"input_ids": ids, "labels": ids.clone()}


def tokenize_alpaca(tokenizer, examples: Sequence[dict], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per Alpaca example: prompt tokens are not scored (labels = IGNORE_INDEX), EOS ends it."""
    out = []
    for ex in examples:
        prompt, response = data.render_alpaca(ex)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + r)[:max_len]
        labels = ([IGNORE_INDEX] * len(p) + r)[:max_len]
        out.append((ids, labels))
    return out


def alpaca_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Shuffled, right-padded batches of tokenized Alpaca examples, epoch after epoch (seeded)."""
    if not encoded:
        raise ValueError("no Alpaca examples to train on")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            rows = [encoded[j] for j in order[i : i + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, (x, y) in enumerate(rows):
                ids[k, : len(x)], labels[k, : len(y)], mask[k, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            yield {"input_ids": ids, "labels": labels, "attention_mask": mask}
