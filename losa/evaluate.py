"""Evaluation (method.md §6): WikiText-2 perplexity as the pruning papers compute it, and zero-shot accuracy through
stock lm-evaluation-harness on the shipped task files. No I/O besides reading data."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, redirect_stderr
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import PAPER_TASKS, ZEROSHOT_TASKS


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


# --------------------------------------------------------------------------------------------- zero-shot accuracy

TASKS_DIR = Path(__file__).parent / "zeroshot_tasks"  # lm-eval task files reading the shipped data (method.md §6)
ZeroShotSource = Literal["local", "hub"]


def zero_shot(model, tokenizer, tasks: Sequence[str] = PAPER_TASKS, limit: int | None = None, batch_size: int = 8,
              source: ZeroShotSource = "local", progress: bool = False) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of the in-memory ``model`` with stock lm-evaluation-harness (method.md §6).

    The model is scored as it is (merged or still carrying an adapter: a peft model is unwrapped to its base with
    the adapter active) through ``lm_eval.models.huggingface.HFLM``. ``source="local"`` reads the task files of
    ``losa/zeroshot_tasks`` (the shipped data; lm-eval's own task index is not loaded, nothing is downloaded);
    ``"hub"``: lm-eval's standard tasks of the same names, whose data come from the hub.

    Args:
        tasks: task names (:data:`ZEROSHOT_TASKS` for local tasks).
        limit: score the first ``limit`` documents of each task (None: all, as the paper).
        batch_size: requests per forward pass.
        source: ``"local"`` or ``"hub"`` (see above).
        progress: show lm-eval's progress bars.

    Returns:
        ``{task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ..., "n": documents}}`` with
        lm-eval's own numbers (fractions, not points), plus ``"mean": {"acc": ...}``: the mean over the tasks of
        ``acc_norm`` where the task reports it, else ``acc`` (the Wanda/LoSA convention).
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no zero-shot tasks given")
    if source == "local" and (unknown := sorted(set(tasks) - set(ZEROSHOT_TASKS))):
        raise ValueError(f"unknown zero-shot task(s) {unknown}; local tasks: {list(ZEROSHOT_TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    if isinstance(model, LM):  # any lm-eval model (e.g. a scoring stub in the tests)
        lm, base = model, None
    else:
        from lm_eval.models.huggingface import HFLM

        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel: adapter stays on
        was_training = base.training
        lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=batch_size, max_length=_context(base))
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False) if source == "local" else TaskManager()
    with _quiet(not progress):
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=1000, verbosity="ERROR", random_seed=0,
                              numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    if base is not None:
        base.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        raw = out["results"][task]
        row = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in raw:
                row[metric] = float(raw[f"{metric},none"])
                row[f"{metric}_stderr"] = float(raw.get(f"{metric}_stderr,none", float("nan")))
        row["n"] = float(out["n-samples"][task]["effective"])
        results[task] = row
    results["mean"] = {"acc": sum(headline(r) for r in results.values()) / len(tasks)}
    return results


def headline(row: Mapping[str, float]) -> float:
    """A task's reported accuracy: ``acc_norm`` where lm-eval reports it, else ``acc`` (Wanda/LoSA's Table 2)."""
    return row["acc_norm"] if "acc_norm" in row else row["acc"]


@contextmanager
def _quiet(quiet: bool):
    """Silence lm-eval's and datasets' progress bars (they write to stderr for every task)."""
    if not quiet:
        yield
        return
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bar()
    try:
        with open(os.devnull, "w") as sink, redirect_stderr(sink):
            yield
    finally:
        if was:
            datasets.enable_progress_bar()


def _context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
