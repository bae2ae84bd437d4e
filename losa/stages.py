"""The stages of one LoSA cell (method.md §4–§5) on a live model, and snapshots that carry a cell between stages.

:func:`losa.dsa.drive` writes the cell's control flow once against the small :class:`Stages` interface; handles are
opaque. :class:`LocalStages` implements every stage on one model in memory (``run_losa``). A pipeline implements
the same interface with one cached job per stage: each job restores a :func:`snapshot` into a fresh model, calls
ONE ``LocalStages`` method and snapshots the result, so both paths run the same code in the same order and give
bit-identical results.

A snapshot is a flat ``{name: tensor}`` dict (safetensors-ready) plus string metadata: the prunable linears'
base weights (``w.<block>.<name>``), the adapter's A/B and masks when one is attached (``a.`` / ``m.``), the
per-block active ranks, and the torch RNG state, so dropout continues exactly where the previous stage left it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from . import data
from .adapter import (make_masked_lora, masked_layers, merge_into_base, set_active_ranks, set_masks,
                      unmerge_with_new_mask, verify_merged, weight_masks)
from .calibration import block_input_grams, dense_block_outputs, prune_model
from .config import LosaConfig
from .evaluate import perplexity
from .finetune import alpaca_batches, finetune, lm_text_batches, tokenize_alpaca
from .layer_sparsity import cka_from_grams, layer_importance
from .models import get_adapter
from .patterns import Pattern


class MergeVerificationError(RuntimeError):
    """The merged model left its mask or missed its allocated sparsity."""


class Stages(Protocol):
    """What :func:`losa.dsa.drive` asks of an executor. ``H`` handles are opaque model states."""

    n_blocks: int

    def dense(self) -> Any: ...  # the original dense model
    def dense_outputs(self) -> Any: ...  # Y^dense of every block on the calibration set (SRA's reference, §3)
    def importance(self, state) -> tuple[list[list[float]], list[float]]: ...  # LSR: CKA matrix, I_l (§2)
    def prune(self, state, rates: list, patterns: list[str], reference) -> tuple[Any, dict]: ...  # + PruneReport
    def finetune(self, pruned, previous, ranks: list[int], t: int) -> tuple[Any, dict]: ...  # DSA steps 5–7
    def lora(self, pruned) -> tuple[Any, dict]: ...  # the plain-LoRA baseline's fine-tuning
    def merge(self, state) -> Any: ...  # DSA step 2: merge the adapter, keep it
    def finalize(self, state, patterns: list[str]) -> tuple[Any, dict]: ...  # merge and unload, verify
    def perplexity(self, state) -> float: ...


# --------------------------------------------------------------------------------------------- snapshots


def _key(block: int, name: str) -> str:
    return f"{block}.{name}"


def snapshot(model: nn.Module, adapter: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a cell's state: prunable base weights, adapter A/B/masks/ranks if any, RNG state.

    ``model`` is a plain model or a peft model with an unmerged masked or plain LoRA adapter; ``adapter=False``
    keeps the base weights only (e.g. of a merged model, whose adapter is already inside them).
    """
    tensors: dict[str, torch.Tensor] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for b, name, lin in get_adapter(base).iter_linears(base):
        tensors[f"w.{_key(b, name)}"] = lin.weight.detach().contiguous()
    meta = {"adapter": "none"}
    if adapter and hasattr(model, "peft_config"):
        wrapped = list(get_adapter(base).iter_linears(base, unwrap=False))
        if any(getattr(layer, "merged", False) for _, _, layer in wrapped):
            raise RuntimeError("snapshot of a merged adapter: snapshots hold the unmerged state")
        masked = list(masked_layers(model))
        meta["adapter"] = "masked" if masked else "lora"
        for b, name, layer in wrapped:
            tensors[f"a.{_key(b, name)}.A"] = layer.lora_A["default"].weight.detach().contiguous()
            tensors[f"a.{_key(b, name)}.B"] = layer.lora_B["default"].weight.detach().contiguous()
        if masked:
            for b, name, layer in masked:
                tensors[f"m.{_key(b, name)}"] = layer.sparsity_mask["default"].contiguous()
            n = len(get_adapter(base).get_blocks(base))
            ranks = {b: layer.active_rank["default"] for b, _, layer in masked}
            tensors["ranks"] = torch.tensor([ranks.get(b, 0) for b in range(n)], dtype=torch.int64)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, meta


@torch.no_grad()
def restore(model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], cfg: LosaConfig):
    """Load a :func:`snapshot` into a freshly loaded dense ``model``; returns the model or its peft wrapper."""
    for b, name, lin in get_adapter(model).iter_linears(model):
        lin.weight.data.copy_(tensors[f"w.{_key(b, name)}"])
    kind = meta.get("adapter", "none")
    if kind == "masked":
        model = make_masked_lora(model, r_max=cfg.physical_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        set_masks(model, {(b, n): tensors[f"m.{_key(b, n)}"] for b, n, _ in masked_layers(model)})
        set_active_ranks(model, tensors["ranks"].tolist())
    elif kind == "lora":
        model = _plain_lora(model, cfg)
    if kind != "none":
        base = model.get_base_model()
        for b, name, layer in get_adapter(base).iter_linears(base, unwrap=False):
            layer.lora_A["default"].weight.copy_(tensors[f"a.{_key(b, name)}.A"])
            layer.lora_B["default"].weight.copy_(tensors[f"a.{_key(b, name)}.B"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return model


def _plain_lora(model: nn.Module, cfg: LosaConfig):
    from peft import LoraConfig, get_peft_model

    adapter = get_adapter(model)
    targets = [f"{adapter.blocks}.{b}.{n}" for b, n, _ in adapter.iter_linears(model)]
    return get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Achieved sparsity ("block.name" -> fraction of exact zeros) of every prunable (base) linear."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_key(b, n): float((lin.weight == 0).sum()) / lin.weight.numel()
            for b, n, lin in get_adapter(base).iter_linears(base)}


def overall_sparsity(per_layer: Mapping[str, float], model_or_shapes) -> float:
    """Weighted mean of per-layer sparsities (weights = layer sizes, from a model or {key: numel})."""
    if isinstance(model_or_shapes, nn.Module):
        base = model_or_shapes.get_base_model() if hasattr(model_or_shapes, "get_base_model") else model_or_shapes
        sizes = {_key(b, n): lin.weight.numel() for b, n, lin in get_adapter(base).iter_linears(base)}
    else:
        sizes = model_or_shapes
    return sum(per_layer[k] * sizes[k] for k in per_layer) / sum(sizes[k] for k in per_layer)


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


# --------------------------------------------------------------------------------------------- stages in memory


class LocalStages:
    """Every stage on one live model, modified in place; a handle is a counter that must be the latest one."""

    def __init__(self, model: nn.Module, tokenizer, cfg: LosaConfig, calibration: torch.Tensor | None,
                 eval_text: str | None = None, *, device=None, progress: bool = True,
                 log: Callable[[Mapping[str, float], int], None] | None = None,
                 stream: torch.Tensor | None = None):
        self.model, self.tokenizer, self.cfg, self.calibration = model, tokenizer, cfg, calibration
        self.eval_text, self.device, self.progress, self.log = eval_text, device, progress, log
        self.n_blocks = len(get_adapter(self.base).get_blocks(self.base))
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

    @property
    def base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def dense(self) -> int:
        return self._version

    def dense_outputs(self):
        return dense_block_outputs(self.base, self.calibration, self.cfg.calib_batch_size, device=self.device)

    def importance(self, state) -> tuple[list[list[float]], list[float]]:
        self._use(state)
        cfg = self.cfg
        grams = block_input_grams(self.base, self.calibration[: cfg.rmi_samples], cfg.calib_batch_size,
                                  device=self.device)
        cka = cka_from_grams(grams)
        return cka.tolist(), layer_importance(cka, cfg.effective_beta).tolist()

    def prune(self, state, rates, patterns, reference) -> tuple[int, dict]:
        self._use(state)
        pr = prune_model(self.base, self.calibration, self.cfg.pruner, list(rates), list(patterns),
                         batch_size=self.cfg.calib_batch_size, propagation=self.cfg.propagation,
                         reference=reference, device=self.device, progress=self.progress)
        return self._next(), pr.to_dict()

    def finetune(self, pruned, previous, ranks, t) -> tuple[int, dict]:
        """DSA steps 5–7 after pruning at step t: attach the adapter to the new mask with SRA's ranks, fine-tune.

        t = 1 (``previous`` None): a fresh masked LoRA (seeded) on the pruned weights. Later: unmerge the kept
        adapter with the new mask (pruned entries of the base weights exactly zero; the model computes what the
        pruned merged model did).
        """
        self._use(pruned)
        cfg = self.cfg
        if previous is None:
            torch.manual_seed(cfg.seed)  # adapter initialisation, then dropout: a function of the seed
            self.model = make_masked_lora(self.model, r_max=cfg.physical_rank, alpha=cfg.lora_alpha,
                                          dropout=cfg.lora_dropout)
            clipped = set_active_ranks(self.model, ranks, clip=cfg.clip_to_physical)
        else:
            clipped = unmerge_with_new_mask(self.model, ranks=ranks, clip=cfg.clip_to_physical)
        applied = [clipped.get(b, (r, r))[1] for b, r in enumerate(ranks)]
        res = self._train(t, f"LoSA step {t}/{cfg.effective_steps}")
        return self._next(), {"applied_ranks": applied, "train_losses": res.losses, "seconds": res.seconds,
                              "trainable_params": _trainable(self.model)}

    def lora(self, pruned) -> tuple[int, dict]:
        """The baseline: a standard, unmasked LoRA of uniform rank on the pruned model, trained the same budget."""
        self._use(pruned)
        torch.manual_seed(self.cfg.seed)
        self.model = _plain_lora(self.model, self.cfg)
        res = self._train(self.cfg.effective_steps, "LoRA")
        return self._next(), {"train_losses": res.losses, "seconds": res.seconds,
                              "trainable_params": _trainable(self.model)}

    def _train(self, t: int, desc: str):
        if self._stream is None and self.cfg.train_data == "text":
            self._stream = token_stream(self.tokenizer)
        batches, steps = step_data(self.cfg, self.tokenizer, t, self._stream)
        log = (lambda m, s, off=self._global_step: self.log(m, off + s)) if self.log else None
        res = finetune(self.model, batches, steps, self.cfg.finetune, log=log, progress=self.progress, desc=desc)
        self._global_step += steps
        return res

    def merge(self, state) -> int:
        self._use(state)
        merge_into_base(self.model)
        return self._next()

    def finalize(self, state, patterns) -> tuple[int, dict]:
        """Merge and unload; verify a masked adapter's merge stayed on its mask and N:M groups are exact."""
        self._use(state)
        masked = bool(list(masked_layers(self.model)))
        masks = weight_masks(self.model) if masked else None
        self.model = self.model.merge_and_unload()
        if masked:
            try:
                verify_merged(self.model, masks)
            except ValueError as err:
                raise MergeVerificationError(str(err)) from err
            verify_nm(self.model, patterns)
        return self._next(), {"layer_sparsity": layer_sparsity(self.model)}

    def perplexity(self, state) -> float:
        self._use(state)
        text = self.eval_text if self.eval_text is not None else data.wikitext2_test_text()
        cfg = self.cfg
        return perplexity(self.model, self.tokenizer, text, cfg.eval_seqlen, cfg.eval_batch_size, cfg.eval_windows,
                          progress=self.progress)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def verify_nm(model: nn.Module, patterns: list[str]) -> None:
    """Raise MergeVerificationError unless every N:M block's groups hold exactly N non-zeros."""
    for b, name, lin in get_adapter(model).iter_linears(model):
        p = Pattern.parse(patterns[b])
        if not p.is_nm:
            continue
        groups = (lin.weight != 0).reshape(-1, p.m).sum(-1)
        if not bool((groups == p.n).all()):
            raise MergeVerificationError(f"block {b} {name}: N:M groups hold {groups.unique().tolist()} weights, "
                                         f"not {p.n} of {p.m}")


def jsonable(obj):
    """Round-trip through JSON (tuples -> lists), so in-memory and stored reports compare equal."""
    return json.loads(json.dumps(obj))


__all__ = ["MergeVerificationError", "Stages", "LocalStages", "snapshot", "restore", "layer_sparsity",
           "overall_sparsity", "step_data", "token_stream", "verify_nm", "jsonable"]
