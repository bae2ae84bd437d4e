"""Snapshots of a cell between stages: save / load of weights, adapters, masks and dense outputs. No file I/O.

A snapshot is a flat ``{name: tensor}`` dict (safetensors-ready) plus string metadata:

- ``w.<block>.<name>``: the prunable linears' base weights;
- ``a.<block>.<name>.A`` / ``.B``: the adapter's A/B, when one is attached, with ``ranks`` (a masked LoRA's per-block
  active ranks) and ``meta["adapter"]`` = ``masked`` | ``lora`` | ``none``. A masked LoRA's masks are not stored: they
  are ``weight != 0`` of the base weights the adapter is attached to (method.md §4), which restore derives again;
- ``k.<block>.<name>``: instead of the weights, which of them a masking rule kept (:func:`kept`), for a pruned state
  whose weights are its input state's where kept and 0 elsewhere (:func:`apply_kept`);
- ``rng.cpu`` (and ``rng.cuda``): with an adapter, the torch RNG state, so dropout continues exactly where the previous
  stage left it.

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


def snapshot(model: nn.Module, adapter: bool = True, weights: bool = True) -> tuple[Tensors, dict[str, str]]:
    """(tensors, metadata) of a cell's state: prunable base weights, adapter A/B/ranks if any, RNG state.

    ``model`` is a plain model or a peft model with an unmerged masked or plain LoRA adapter; ``adapter=False``
    keeps the base weights only (e.g. of a merged model, whose adapter is already inside them), ``weights=False``
    the adapter only (a fine-tuned state whose base weights another snapshot holds).
    """
    from .adapter import masked_layers

    tensors: Tensors = {}
    base = base_model(model)
    for b, name, lin in get_adapter(base).iter_linears(base) if weights else ():
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
            n = len(get_adapter(base).get_blocks(base))
            ranks = {b: layer.active_rank["default"] for b, _, layer in masked}
            tensors["ranks"] = torch.tensor([ranks.get(b, 0) for b in range(n)], dtype=torch.int64)
    if adapter:  # training continues from it; a weights-only state consumed no randomness (and its bytes are the
        # weights alone, whatever ran before in the process: a recomputed state hashes the same)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, meta


def kept(model: nn.Module) -> Tensors:
    """``k.*``: where each prunable weight's bit pattern is not zero (a kept −0.0 counts: bit-exact on restore)."""
    base = base_model(model)
    return {f"k.{_key(b, name)}": (lin.weight != 0) | torch.signbit(lin.weight)
            for b, name, lin in get_adapter(base).iter_linears(base)}


@torch.no_grad()
def apply_kept(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero every prunable weight that ``k.*`` does not keep, with the masking rules' own function."""
    from .pruners import apply_mask

    base = base_model(model)
    for b, name, lin in get_adapter(base).iter_linears(base):
        lin.weight.data.copy_(apply_mask(lin.weight, tensors[f"k.{_key(b, name)}"].to(lin.weight.device)))
    return model


@torch.no_grad()
def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy a snapshot's base weights (``w.*``) into the prunable linears of ``model`` (plain or peft-wrapped)."""
    base = base_model(model)
    for b, name, lin in get_adapter(base).iter_linears(base):
        lin.weight.data.copy_(tensors[f"w.{_key(b, name)}"])


@torch.no_grad()
def restore(model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], cfg: LosaConfig,
            merged: bool = False) -> nn.Module:
    """Load a :func:`snapshot` into ``model`` (plain); returns the model or its peft wrapper.

    The snapshot's base weights replace the model's when it holds them; an adapter-only snapshot is attached to the
    weights the model already has, its masks being their non-zeros. ``merged``: those weights already hold this
    snapshot's masked adapter, merged and then pruned (the state DSA steps 2–4 leave, method.md §4, which step 5
    continues from): the adapter counts as merged.
    """
    if any(k.startswith("w.") for k in tensors):
        load_weights(model, tensors)
    kind = meta.get("adapter", "none")
    if kind == "masked":
        from .adapter import make_masked_lora

        model = make_masked_lora(model, r_max=cfg.physical_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    elif kind == "lora":
        model = plain_lora(model, cfg)
    elif merged:
        raise ValueError(f"merged needs a snapshot with a masked adapter, not {kind!r}")
    load_adapter(model, tensors)
    if merged:
        from .adapter import mark_merged

        mark_merged(model)
    return model


@torch.no_grad()
def load_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy a snapshot's adapter (A/B, a masked LoRA's active ranks) into the adapter ``model`` already carries, and
    its RNG state into torch's, so training continues exactly where the snapshot left it."""
    if "ranks" in tensors:
        from .adapter import set_active_ranks

        set_active_ranks(model, tensors["ranks"].tolist())
    if hasattr(model, "peft_config"):
        base = model.get_base_model()
        for b, name, layer in get_adapter(base).iter_linears(base, unwrap=False):
            layer.lora_A["default"].weight.copy_(tensors[f"a.{_key(b, name)}.A"])
            layer.lora_B["default"].weight.copy_(tensors[f"a.{_key(b, name)}.B"])
    if "rng.cpu" in tensors:
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


__all__ = ["Outputs", "Tensors", "apply_kept", "base_model", "kept", "load_adapter", "load_weights", "plain_lora", "restore", "snapshot"]
