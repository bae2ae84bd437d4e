"""Evaluation: WikiText-2 perplexity as the pruning papers compute it (method.md §6). No I/O besides reading data."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, eval_seqlen: int, batch_size: int = 8, max_windows: int | None = None, progress: bool = False
) -> float:
    """exp(mean token NLL) over non-overlapping ``eval_seqlen`` windows of the tokenized ``text`` (method.md §6).

    This is the Wanda/SparseGPT evaluation: the text is tokenized once, cut into ``len // eval_seqlen`` windows (the
    tail is dropped), each window is scored on its own, and the mean NLL is taken over every predicted token
    (``eval_seqlen - 1`` per window, all windows being the same length). It is not lm-eval's word perplexity.

    Args:
        model: a causal LM returning ``.logits`` of shape (B, S, V).
        tokenizer: its tokenizer.
        text: e.g. :func:`losa.data.wikitext2_test_text`.
        eval_seqlen: window length S (explicit; the papers use 2048, LoSA 4096).
        batch_size: windows per forward pass.
        max_windows: score only the first windows (quick checks; None = all, as the papers).
        progress: show a progress bar.
    """
    if eval_seqlen < 2 or batch_size < 1:
        raise ValueError(f"need eval_seqlen >= 2 and batch_size >= 1, got {eval_seqlen}, {batch_size}")
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1)
    n_windows = ids.numel() // eval_seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than eval_seqlen={eval_seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * eval_seqlen].view(n_windows, eval_seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, S-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll_sum / count)
