"""Snapshots of a cell between stages: save / load of weights, adapters, masks and dense outputs. No file I/O.

A snapshot is a flat ``{name: tensor}`` dict (safetensors-ready) plus string metadata:

- ``w.<block>.<name>``: the prunable linears' base weights;
- ``a.<block>.<name>.A`` / ``.B`` and ``m.<block>.<name>``: the adapter's A/B and (masked LoRA) masks, when one is
  attached, with ``ranks`` (the per-block active ranks) and ``meta["adapter"]`` = ``masked`` | ``lora`` | ``none``;
- ``rng.cpu`` (and ``rng.cuda``): the torch RNG state, so dropout continues exactly where the previous stage left it.

Dense block outputs (SRA's reference, method.md §3) are stored as ``<block>.<batch>`` tensors (:func:`pack_outputs`).
These names are the artifact store's stored form: change them only together with the tasks' ``STAGE_VERSION``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .config import LosaConfig
from .models import get_adapter

Tensors = dict[str, torch.Tensor]
Outputs = list[list[torch.Tensor]]  # [block][calibration batch] -> Y^dense


def _key(block: int, name: str) -> str:
    return f"{block}.{name}"


def base_model(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def snapshot(model: nn.Module, adapter: bool = True) -> tuple[Tensors, dict[str, str]]:
    """(tensors, metadata) of a cell's state: prunable base weights, adapter A/B/masks/ranks if any, RNG state.

    ``model`` is a plain model or a peft model with an unmerged masked or plain LoRA adapter; ``adapter=False``
    keeps the base weights only (e.g. of a merged model, whose adapter is already inside them).
    """
    from .adapter import masked_layers

    tensors: Tensors = {}
    base = base_model(model)
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
def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy a snapshot's base weights (``w.*``) into the prunable linears of ``model`` (plain or peft-wrapped)."""
    base = base_model(model)
    for b, name, lin in get_adapter(base).iter_linears(base):
        lin.weight.data.copy_(tensors[f"w.{_key(b, name)}"])


@torch.no_grad()
def restore(model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], cfg: LosaConfig,
            merged_weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Load a :func:`snapshot` into a freshly loaded dense ``model``; returns the model or its peft wrapper.

    ``merged_weights``: base weights (another snapshot's ``w.*``) that already hold this snapshot's masked adapter,
    merged and then pruned: the state DSA steps 2–4 leave (method.md §4), which step 5 continues from. They replace
    the snapshot's own base weights and the adapter counts as merged.
    """
    load_weights(model, tensors)
    kind = meta.get("adapter", "none")
    if kind == "masked":
        from .adapter import make_masked_lora, masked_layers, set_active_ranks, set_masks

        model = make_masked_lora(model, r_max=cfg.physical_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        set_masks(model, {(b, n): tensors[f"m.{_key(b, n)}"] for b, n, _ in masked_layers(model)})
        set_active_ranks(model, tensors["ranks"].tolist())
    elif kind == "lora":
        model = plain_lora(model, cfg)
    if kind != "none":
        base = model.get_base_model()
        for b, name, layer in get_adapter(base).iter_linears(base, unwrap=False):
            layer.lora_A["default"].weight.copy_(tensors[f"a.{_key(b, name)}.A"])
            layer.lora_B["default"].weight.copy_(tensors[f"a.{_key(b, name)}.B"])
    if merged_weights is not None:
        from .adapter import mark_merged

        if kind != "masked":
            raise ValueError(f"merged_weights need a snapshot with a masked adapter, not {kind!r}")
        load_weights(model, merged_weights)
        mark_merged(model)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return model


def plain_lora(model: nn.Module, cfg: LosaConfig):
    """The baseline's standard, unmasked LoRA of uniform rank ``cfg.lora_rank`` on every prunable linear."""
    from peft import LoraConfig, get_peft_model

    adapter = get_adapter(model)
    targets = [f"{adapter.blocks}.{b}.{n}" for b, n, _ in adapter.iter_linears(model)]
    return get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def pack_outputs(outputs: Outputs) -> tuple[Tensors, dict[str, int]]:
    """Dense block outputs as flat tensors ``<block>.<batch>`` and their shape ``{"blocks": ..., "batches": ...}``."""
    tensors = {f"{b}.{k}": y for b, block in enumerate(outputs) for k, y in enumerate(block)}
    return tensors, {"blocks": len(outputs), "batches": len(outputs[0]) if outputs else 0}


def unpack_outputs(tensors: Mapping[str, torch.Tensor], shape: Mapping[str, int]) -> Outputs:
    """Inverse of :func:`pack_outputs`."""
    return [[tensors[f"{b}.{k}"] for k in range(shape["batches"])] for b in range(shape["blocks"])]


__all__ = ["Outputs", "Tensors", "base_model", "load_weights", "pack_outputs", "plain_lora", "restore", "snapshot",
           "unpack_outputs"]
