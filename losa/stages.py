"""The stages of one LoSA cell (method.md §4–§5) as plain functions of a live model, and their in-memory executor.

Each stage is written once, here: what it takes and what it returns is typed (:class:`Importance`,
:class:`~losa.calibration.PruneReport`, :class:`Trained`, :class:`Finalized`). Two executors call them and nothing
else: :class:`LocalStages` on one model in memory (``run_losa``), and the pipeline's tasks (``tasks/stages.py``),
which load a fresh model, restore a :mod:`losa.snapshot`, call one stage function and snapshot its result. Both run
the same code in the same order, so both give bit-identical results. :func:`losa.dsa.drive` writes the control flow
once against the small :class:`Stages` interface, whose handles are opaque.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from . import data
from .calibration import PruneReport
from .config import LosaConfig
from .models import get_adapter
from .patterns import Pattern
from .snapshot import Outputs, base_model, plain_lora

Log = Callable[[Mapping[str, float], int], None]


class MergeVerificationError(RuntimeError):
    """The merged model left its mask or missed its allocated sparsity."""


# --------------------------------------------------------------------------------------------- what stages return


@dataclass(frozen=True)
class Importance:
    """LSR's inputs and outputs on one model (method.md §2): the CKA matrix between block inputs and I_l."""

    cka: list[list[float]]
    importance: list[float]


@dataclass(frozen=True)
class Trained:
    """What one fine-tuning stage did: per-step losses, its time, trainable parameters, and (masked LoRA) the
    active ranks applied after the physical-rank cut."""

    train_losses: list[float]
    seconds: float
    trainable_params: int
    applied_ranks: list[int] | None = None


@dataclass(frozen=True)
class Finalized:
    """The merged, unloaded model's achieved sparsity per prunable linear ("block.name" -> fraction of zeros)."""

    layer_sparsity: dict[str, float]


def info(result: Importance | Trained | Finalized) -> dict[str, Any]:
    """A stage result as JSON-ready info (unset optional fields left out); ``type(result)(**info)`` reverses it."""
    return jsonable({k: v for k, v in asdict(result).items() if v is not None})


def jsonable(obj):
    """Round-trip through JSON (tuples -> lists), so in-memory and stored reports compare equal."""
    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------------------------- the stages


def dense_outputs(model: nn.Module, calibration: torch.Tensor, cfg: LosaConfig, *, device=None,
                  lazy: bool = False) -> Outputs | Iterator[list[torch.Tensor]]:
    """Y^dense of every block on the calibration set: SRA's reference (method.md §3); ``lazy``: block by block, as
    :func:`prune` reads them (computed again at each step instead of kept: one block's outputs live at a time)."""
    from .calibration import dense_block_outputs

    return dense_block_outputs(base_model(model), calibration, cfg.calib_batch_size, device=device, lazy=lazy)


def importance(model: nn.Module, calibration: torch.Tensor, cfg: LosaConfig, *, device=None) -> Importance:
    """LSR (method.md §2): CKA between the block inputs on ``cfg.rmi_samples`` windows, then I_l = exp(−β Ŝ_l)."""
    from .calibration import block_input_grams
    from .layer_sparsity import cka_from_grams, layer_importance

    grams = block_input_grams(base_model(model), calibration[: cfg.rmi_samples], cfg.calib_batch_size, device=device)
    cka = cka_from_grams(grams)
    return Importance(cka=cka.tolist(), importance=layer_importance(cka, cfg.effective_beta).tolist())


def prune(model: nn.Module, calibration: torch.Tensor, cfg: LosaConfig, rates: list, patterns: list[str],
          reference: Outputs | Iterator[list[torch.Tensor]] | None = None, *, device=None,
          progress: bool = True) -> PruneReport:
    """Prune the model's (merged) weights block by block to ``rates`` / ``patterns`` (method.md §1), in place,
    recording each block's reconstruction error L_l against ``reference`` (method.md §3)."""
    from .calibration import prune_model

    return prune_model(base_model(model), calibration, cfg.pruner, list(rates), list(patterns),
                       batch_size=cfg.calib_batch_size, propagation=cfg.propagation, reference=reference,
                       device=device, progress=progress)


def adapt(model: nn.Module, cfg: LosaConfig, ranks: list[int]) -> tuple[nn.Module, list[int]]:
    """DSA steps 5–6 (method.md §4) after pruning: the masked adapter on the new mask with SRA's ranks, before
    training. Returns the peft model and the ranks applied (after the physical-rank cut).

    ``model`` is either plain (t = 1: a fresh, seeded masked LoRA on the pruned weights) or carries the previous
    step's masked adapter merged into weights that were then pruned (t > 1: unmerged with the new mask, so pruned
    base entries are exactly zero and the model computes what the pruned merged model did).
    """
    from .adapter import make_masked_lora, masked_layers, set_active_ranks, unmerge_with_new_mask

    if not list(masked_layers(model)):
        torch.manual_seed(cfg.seed)  # adapter initialisation, then dropout: a function of the seed
        model = make_masked_lora(model, r_max=cfg.physical_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        clipped = set_active_ranks(model, ranks, clip=cfg.clip_to_physical)
    else:
        clipped = unmerge_with_new_mask(model, ranks=ranks, clip=cfg.clip_to_physical)
    return model, [clipped.get(b, (r, r))[1] for b, r in enumerate(ranks)]


def finetune(model: nn.Module, tokenizer, cfg: LosaConfig, ranks: list[int], t: int, *,
             stream: torch.Tensor | None = None, log: Log | None = None,
             progress: bool = True) -> tuple[nn.Module, Trained]:
    """DSA steps 5–7 (method.md §4) after pruning at step t: :func:`adapt`, then fine-tune the masked adapter.
    Returns the peft model (adapter unmerged) and what training did."""
    model, applied = adapt(model, cfg, ranks)
    res = _train(model, tokenizer, cfg, t, stream, log, progress, f"LoSA step {t}/{cfg.effective_steps}")
    return model, Trained(train_losses=res.losses, seconds=res.seconds, trainable_params=_trainable(model),
                          applied_ranks=applied)


def lora(model: nn.Module, tokenizer, cfg: LosaConfig, *, stream: torch.Tensor | None = None, log: Log | None = None,
         progress: bool = True) -> tuple[nn.Module, Trained]:
    """The baseline: a standard, unmasked LoRA of uniform rank on the pruned model, trained the same budget."""
    torch.manual_seed(cfg.seed)
    model = plain_lora(model, cfg)
    res = _train(model, tokenizer, cfg, cfg.effective_steps, stream, log, progress, "LoRA")
    return model, Trained(train_losses=res.losses, seconds=res.seconds, trainable_params=_trainable(model))


def merge(model: nn.Module) -> nn.Module:
    """DSA step 2 (method.md §4): W ← W + (α/r) M ⊙ B A; the adapter is kept (counted as merged)."""
    from .adapter import merge_into_base

    merge_into_base(model)
    return model


def finalize(model: nn.Module, patterns: list[str]) -> tuple[nn.Module, Finalized]:
    """Merge and unload; verify a masked adapter's merge stayed on its mask and N:M groups are exact.

    Raises:
        MergeVerificationError: the merged weights are non-zero off the mask, or an N:M group is not exact.
    """
    from .adapter import masked_layers, verify_merged, weight_masks

    masked = bool(list(masked_layers(model)))
    masks = weight_masks(model) if masked else None
    model = model.merge_and_unload()
    if masked:
        try:
            verify_merged(model, masks)
        except ValueError as err:
            raise MergeVerificationError(str(err)) from err
        verify_nm(model, patterns)
    return model, Finalized(layer_sparsity=layer_sparsity(model))


def perplexity(model: nn.Module, tokenizer, cfg: LosaConfig, text: str | None = None, *,
               progress: bool = True) -> float:
    """WikiText-2 test perplexity (method.md §6) of the model as it is (with its adapter, if it has one)."""
    from .evaluate import perplexity as ppl

    from .finetune import Diverged

    text = data.wikitext2_test_text() if text is None else text
    value = ppl(model, tokenizer, text, cfg.eval_seqlen, cfg.eval_batch_size, cfg.eval_windows, progress=progress)
    if not math.isfinite(value):
        raise Diverged(f"perplexity is {value}: the model's outputs are not finite")
    return value


def zero_shot(model: nn.Module, tokenizer, cfg: LosaConfig, *, progress: bool = False) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of the model as it is through lm-eval (method.md §6), with ``cfg.zeroshot``'s settings."""
    from .evaluate import zero_shot as score

    z = cfg.zeroshot
    return score(model, tokenizer, z.tasks, limit=z.limit, batch_size=z.batch_size, source=z.source,
                 progress=progress)


def sparse_form(model: nn.Module, cfg: LosaConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The final model's compact sparse form (:mod:`losa.export`, method.md §6) in ``cfg.export.dtype`` and its byte
    counts against the dense model in the same dtype."""
    from .export import DTYPES, describe, sparse_state_dict

    dtype = cfg.export.dtype
    tensors = sparse_state_dict(base_model(model), DTYPES[dtype])
    return tensors, describe(base_model(model), tensors, dtype)


def speed(model: nn.Module, dense: nn.Module | None, cfg: LosaConfig, *, workdir=None) -> dict:
    """Prefill and decode latency of the model and of its dense original per engine (:mod:`losa.speed`, method.md §6)."""
    from .speed import measure

    s = cfg.speed
    return measure(base_model(model), None if dense is None else base_model(dense), prefill=s.prefill,
                   decode=s.decode, repeats=s.repeats, engines=s.engines, threads=s.threads, workdir=workdir)


def _train(model, tokenizer, cfg: LosaConfig, t: int, stream, log, progress: bool, desc: str):
    from .finetune import finetune as train

    batches, steps = step_data(cfg, tokenizer, t, stream)
    return train(model, batches, steps, cfg.finetune, log=log, progress=progress, desc=desc)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- checks and measures


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Achieved sparsity ("block.name" -> fraction of exact zeros) of every prunable (base) linear."""
    base = base_model(model)
    return {f"{b}.{n}": float((lin.weight == 0).sum()) / lin.weight.numel()
            for b, n, lin in get_adapter(base).iter_linears(base)}


def overall_sparsity(per_layer: Mapping[str, float], model_or_shapes) -> float:
    """Weighted mean of per-layer sparsities (weights = layer sizes, from a model or {key: numel})."""
    if isinstance(model_or_shapes, nn.Module):
        base = base_model(model_or_shapes)
        sizes = {f"{b}.{n}": lin.weight.numel() for b, n, lin in get_adapter(base).iter_linears(base)}
    else:
        sizes = model_or_shapes
    return sum(per_layer[k] * sizes[k] for k in per_layer) / sum(sizes[k] for k in per_layer)


def verify_nm(model: nn.Module, patterns: list[str]) -> None:
    """Raise MergeVerificationError unless every N:M block's groups hold at most N non-zeros.

    The pruner keeps exactly N per group (tests/losa/test_pruners.py); a kept weight may still be exactly 0 (a
    dequantized model such as SmolLM2's Q4_1 has many), and the mask is read off the non-zeros, so a group can hold
    fewer after the merge, never more (method.md §4, §8 D8)."""
    for b, name, lin in get_adapter(model).iter_linears(model):
        p = Pattern.parse(patterns[b])
        if not p.is_nm:
            continue
        groups = (lin.weight != 0).reshape(-1, p.m).sum(-1)
        if not bool((groups <= p.n).all()):
            raise MergeVerificationError(f"block {b} {name}: N:M groups hold up to {int(groups.max())} weights, "
                                         f"more than {p.n} of {p.m}")


# --------------------------------------------------------------------------------------------- training data


def token_stream(tokenizer) -> torch.Tensor:
    """The plain-text fine-tuning stream: every fine-tuning document tokenized, each closed by EOS (int32)."""
    return torch.tensor([i for doc in data.finetune_documents()
                         for i in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]],
                        dtype=torch.int32)


def step_data(cfg: LosaConfig, tokenizer, t: int, stream: torch.Tensor | None = None) -> tuple[Iterator[Mapping], int]:
    """(batches, optimiser steps) of DSA step t (t = T for the one-shot baselines).

    Text: every method trains the same total, (steps − 1)·train_steps + final_train_steps; −DSA and the LoRA baseline
    (T = 1) get the whole budget in their single step, and later steps continue where earlier ones stopped.
    Alpaca: the official slicing, ``alpaca_per_step`` examples for steps 1..T−1 and the rest at step T.
    """
    from .finetune import alpaca_batches, lm_text_batches, tokenize_alpaca

    T, bs = cfg.effective_steps, cfg.finetune.batch_size
    if cfg.train_data == "text":
        stream = token_stream(tokenizer) if stream is None else stream
        steps = cfg.final_train_steps + (cfg.steps - T) * cfg.train_steps if t == T else cfg.train_steps
        start = (t - 1) * cfg.train_steps * cfg.finetune.grad_accum
        return lm_text_batches(stream, cfg.finetune.seqlen, bs, cfg.seed, start), steps
    encoded = tokenize_alpaca(tokenizer, data.alpaca_examples(cfg.alpaca_total), cfg.alpaca_max_len)
    lo = (t - 1) * cfg.alpaca_per_step
    hi = len(encoded) if t == T else min(t * cfg.alpaca_per_step, len(encoded))
    if lo >= hi:
        raise ValueError(f"step {t} has no Alpaca examples: {len(encoded)} available, "
                         f"{cfg.alpaca_per_step} per step over T={T}")
    steps = math.ceil((hi - lo) / (bs * cfg.finetune.grad_accum))  # one epoch over the slice
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return alpaca_batches(encoded[lo:hi], bs, pad, cfg.seed + t), steps


# --------------------------------------------------------------------------------------------- executors


class Stages(Protocol):
    """What :func:`losa.dsa.drive` asks of an executor. ``H`` handles are opaque model states."""

    n_blocks: int

    def dense(self) -> Any: ...  # the original dense model
    def dense_outputs(self) -> Any: ...  # Y^dense of every block on the calibration set (SRA's reference, §3)
    def importance(self, state) -> Importance: ...  # LSR: CKA matrix, I_l (§2)
    def prune(self, state, rates: list, patterns: list[str], reference) -> tuple[Any, PruneReport]: ...
    def finetune(self, pruned, previous, ranks: list[int], t: int) -> tuple[Any, Trained]: ...  # DSA steps 5–7
    def lora(self, pruned) -> tuple[Any, Trained]: ...  # the plain-LoRA baseline's fine-tuning
    def merge(self, state) -> Any: ...  # DSA step 2: merge the adapter, keep it
    def finalize(self, state, patterns: list[str]) -> tuple[Any, Finalized]: ...  # merge and unload, verify
    def perplexity(self, state) -> float: ...
    # optional stages on the final model (method.md §6), run when the config asks for them
    def zero_shot(self, state) -> dict: ...  # lm-eval accuracies per task, and their mean
    def export(self, state) -> dict: ...  # the sparse form's byte counts
    def speed(self, state, dense) -> dict: ...  # latencies per engine and speed-ups


class LocalStages:
    """Every stage on one live model, modified in place; a handle is a counter that must be the latest one."""

    def __init__(self, model: nn.Module, tokenizer, cfg: LosaConfig, calibration: torch.Tensor | None,
                 eval_text: str | None = None, *, device=None, progress: bool = True, log: Log | None = None,
                 stream: torch.Tensor | None = None):
        self.model, self.tokenizer, self.cfg, self.calibration = model, tokenizer, cfg, calibration
        self.eval_text, self.device, self.progress, self.log = eval_text, device, progress, log
        base = base_model(model)
        self.n_blocks = len(get_adapter(base).get_blocks(base))
        self._stream = stream
        self._version = 0
        self._global_step = 0  # training-log step across DSA steps

    # handles: an in-place executor can only continue from its latest state
    def _use(self, handle) -> None:
        if handle != self._version:
            raise RuntimeError(f"stale handle {handle}: the live model is at state {self._version}")

    def _next(self) -> int:
        self._version += 1
        return self._version

    def _training(self) -> dict:
        if self._stream is None and self.cfg.train_data == "text":
            self._stream = token_stream(self.tokenizer)  # tokenized once, shared by every fine-tuning step
        log = (lambda m, s, off=self._global_step: self.log(m, off + s)) if self.log else None
        return {"stream": self._stream, "log": log, "progress": self.progress}

    def _trained(self, model: nn.Module, result: Trained) -> tuple[int, Trained]:
        self.model = model
        self._global_step += len(result.train_losses)
        return self._next(), result

    def dense(self) -> int:
        return self._version

    def dense_outputs(self) -> Outputs:
        return dense_outputs(self.model, self.calibration, self.cfg, device=self.device)

    def importance(self, state) -> Importance:
        self._use(state)
        return importance(self.model, self.calibration, self.cfg, device=self.device)

    def prune(self, state, rates, patterns, reference) -> tuple[int, PruneReport]:
        self._use(state)
        report = prune(self.model, self.calibration, self.cfg, rates, patterns, reference, device=self.device,
                       progress=self.progress)
        return self._next(), report

    def finetune(self, pruned, previous, ranks, t) -> tuple[int, Trained]:
        self._use(pruned)  # the live model holds the previous adapter (if any), merged into the pruned weights
        return self._trained(*finetune(self.model, self.tokenizer, self.cfg, ranks, t, **self._training()))

    def lora(self, pruned) -> tuple[int, Trained]:
        self._use(pruned)
        return self._trained(*lora(self.model, self.tokenizer, self.cfg, **self._training()))

    def merge(self, state) -> int:
        self._use(state)
        self.model = merge(self.model)
        return self._next()

    def finalize(self, state, patterns) -> tuple[int, Finalized]:
        self._use(state)
        self.model, result = finalize(self.model, patterns)
        return self._next(), result

    def perplexity(self, state) -> float:
        self._use(state)
        return perplexity(self.model, self.tokenizer, self.cfg, self.eval_text, progress=self.progress)

    def zero_shot(self, state) -> dict:
        self._use(state)
        return zero_shot(self.model, self.tokenizer, self.cfg, progress=self.progress)

    def export(self, state) -> dict:
        self._use(state)
        return sparse_form(self.model, self.cfg)[1]

    def speed(self, state, dense) -> dict:
        self._use(state)  # the dense original is gone (pruned in place): speed-ups are against dense kernels
        return speed(self.model, None, self.cfg)


__all__ = ["Finalized", "Importance", "LocalStages", "MergeVerificationError", "Stages", "Trained", "adapt", "dense_outputs",
           "finalize", "finetune", "importance", "info", "jsonable", "layer_sparsity", "lora", "merge",
           "overall_sparsity", "perplexity", "prune", "sparse_form", "speed", "step_data", "token_stream", "verify_nm",
           "zero_shot"]
