"""Masked LoRA (method.md §4 step 7) on stock peft: the adapter update never leaves the sparsity mask. No I/O except
adapter save/load through peft.

Extension points used (peft 0.21.x; private/experimental, hence the narrow pin and tests that fail if unused):
``LoraVariant`` (``MaskedLoraVariant``), ``Linear.resolve_lora_variant`` (``MaskedLoraLinear``) and the per-config-
instance mapping ``LoraConfig._register_custom_module`` (``register``). A plain ``LoraConfig`` never sees the mapping.

Per layer and adapter the module stores ``sparsity_mask[adapter]`` (bool (d_out, d_in) non-persistent buffer, 1 byte
per weight, taken from ``base weight != 0``) and ``active_rank[adapter]`` (int r_l <= physical rank ``r``; 0 disables
the layer). Scaling is peft's ``scaling = alpha / r_max`` (the PHYSICAL rank), whatever r_l is, as in the official code
(LoraConfig r=8, alpha=16 -> 2 for every iter_rank); method.md's (α/r) reads with r = r_max. Raising r_max therefore
lowers the scale unless alpha is raised with it.

``peft_model.merge_adapter()``, ``unmerge_adapter()`` and ``merge_and_unload()`` route through the variant (masked
delta), so they need no wrapper here. Active ranks are saved in the adapter config; masks are not (they are
recomputed from the base weights on load).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear, LoraVariant
from peft.utils import CONFIG_NAME
from peft.utils.other import transpose
from torch import nn

from losa.models import get_adapter

Key = tuple[int, str]  # (block index, linear name relative to the block), as ModelAdapter.iter_linears yields


@dataclass
class MaskedLoraConfig(LoraConfig):
    """``LoraConfig`` plus the masked-LoRA variant flag and the per-block active ranks (both saved with the adapter).

    ``masked`` is tagged ``is_lora_variant``: stock peft's ``Linear`` rejects it ("Invalid or unsupported variant
    combination"), so a config that was never ``register``-ed fails loudly instead of training a vanilla LoRA.
    """

    masked: bool = field(default=True, metadata={"is_lora_variant": True, "help": "Masked LoRA (losa.adapter)."})
    active_ranks: Optional[dict[int, int]] = field(default=None, metadata={"help": "block -> active rank r_l."})


def masked_delta(module: Linear, adapter: str) -> torch.Tensor:
    """(M ⊙ (B[:, :r] @ A[:r, :])) · scaling in the base weight's layout, r the active rank (method.md §4 step 7).

    Same care as peft's ``Linear.get_delta_weight``: fp32 detour for half-precision weights on CPU, fan_in_fan_out.

    Returns:
        (d_out, d_in) tensor (transposed if fan_in_fan_out) in the LoRA weights' dtype, exactly 0 where M is 0.
    """
    r = module.active_rank[adapter]
    weight_A = module.lora_A[adapter].weight[:r, :]  # (r, d_in)
    weight_B = module.lora_B[adapter].weight[:, :r]  # (d_out, r)
    dtype = weight_B.dtype
    cast_to_fp32 = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if cast_to_fp32:
        weight_A, weight_B = weight_A.float(), weight_B.float()
    delta = transpose((weight_B * module.scaling[adapter]) @ weight_A, module.fan_in_fan_out)  # scale the thin B
    delta = torch.where(module.sparsity_mask[adapter], delta, 0.0)  # base weight layout, exact 0 off the mask
    return delta.to(dtype) if cast_to_fp32 else delta


class MaskedLoraVariant(LoraVariant):
    """forward/merge/unmerge of a masked LoRA, all through ``masked_delta``."""

    def supports_lora_conversion(self) -> bool:
        return False  # the mask makes the update full-rank in general

    @staticmethod
    def init(module: Linear, adapter_name: str, **kwargs: Any) -> None:
        for name in ("sparsity_mask", "active_rank"):
            if name not in module.other_param_names:  # so delete_adapter / device moves handle them
                module.other_param_names = module.other_param_names + (name,)
        if not hasattr(module, "sparsity_mask"):
            module.sparsity_mask = BufferDict(persistent=False)
            module.active_rank = {}
        module.sparsity_mask[adapter_name] = module.get_base_layer().weight.detach() != 0
        module.active_rank[adapter_name] = module.r[adapter_name]

    @staticmethod
    def merge_safe(module: Linear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Linear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: Linear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: Linear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        """result (base output, the base weight already being 0 off the mask) + dropout(x) @ masked_delta^T.

        The (d_out, d_in) masked product is inherent to the method; under autograd it is recomputed in backward
        (:class:`_MaskedLoraProduct`) instead of being kept alive per layer.
        """
        if module.active_rank[active_adapter] == 0:
            return result
        x = module.lora_dropout[active_adapter](x)

        weight_a = module.lora_A[active_adapter].weight
        if torch.is_grad_enabled() and weight_a.requires_grad and not module.fan_in_fan_out:
            r = module.active_rank[active_adapter]
            return result + _MaskedLoraProduct.apply(x, weight_a[:r, :], module.lora_B[active_adapter].weight[:, :r],
                                                      module.sparsity_mask[active_adapter],
                                                      module.scaling[active_adapter]).to(result.dtype)
        delta = transpose(masked_delta(module, active_adapter), module.fan_in_fan_out)
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)


class _MaskedLoraProduct(torch.autograd.Function):
    """y = x (s · M ⊙ (B A))^T without keeping the (d_out, d_in) product alive between forward and backward.

    The product is recomputed in backward (d_out·d_in·r multiply-adds, small next to the token matmuls), which costs
    one token matmul less than checkpointing the whole LoRA branch would. Gradients: dB = s (M ⊙ G) A^T and
    dA = s B^T (M ⊙ G) with G = g^T x, so nothing flows outside the mask.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, mask, scaling):
        delta = torch.where(mask, (weight_b * scaling) @ weight_a, 0.0)  # (d_out, d_in)
        ctx.save_for_backward(x, weight_a, weight_b, mask)
        ctx.scaling = scaling
        return F.linear(x.to(delta.dtype), delta)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_a, weight_b, mask = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(weight_a.dtype)  # (tokens, d_out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            delta = torch.where(mask, (weight_b * s) @ weight_a, 0.0)
            grad_x = (g @ delta).reshape(x.shape).to(x.dtype)
        grad_delta = torch.where(mask, g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype), 0.0)  # (d_out, d_in)
        grad_b = (grad_delta @ weight_a.T) * s if ctx.needs_input_grad[2] else None
        grad_a = (weight_b.T @ grad_delta) * s if ctx.needs_input_grad[1] else None
        return grad_x, grad_a, grad_b, None, None


class MaskedLoraLinear(Linear):
    """peft's LoRA ``Linear`` whose variant is ``MaskedLoraVariant`` when the config says ``masked=True``."""

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> Optional[LoraVariant]:
        if not getattr(config, "masked", False):
            return super().resolve_lora_variant(config=config, **kwargs)
        plain = copy.copy(config)
        plain.masked = False
        if super().resolve_lora_variant(config=plain, **kwargs) is not None or config.lora_bias:
            raise ValueError("masked LoRA cannot be combined with other LoRA variants or lora_bias")
        return MaskedLoraVariant()


def register(config: LoraConfig) -> LoraConfig:
    """Route this config's ``nn.Linear`` targets to ``MaskedLoraLinear`` (this instance only; not saved: call it
    again on the loaded config before loading an adapter, which ``load_masked_adapter`` does)."""
    config._register_custom_module({nn.Linear: MaskedLoraLinear})
    return config


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _weight(layer: nn.Module) -> torch.Tensor:
    return layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight


def masked_layers(model: nn.Module, adapter: str = "default"):
    """Yield (block, name, MaskedLoraLinear) for the prunable linears carrying the masked adapter."""
    base = _base(model)
    for i, name, layer in get_adapter(base).iter_linears(base, unwrap=False):
        if isinstance(layer, MaskedLoraLinear) and adapter in layer.lora_variant:
            yield i, name, layer


def _check_unmerged(model: nn.Module, adapter: str, what: str) -> None:
    if any(layer.merged for _, _, layer in masked_layers(model, adapter)):
        raise RuntimeError(f"{what} on a merged adapter would make unmerge subtract another delta; unmerge first")


def make_masked_lora(model: nn.Module, r_max: int = 8, alpha: float = 16, dropout: float = 0.1,
                     target_modules: Optional[list[str]] = None, adapter: str = "default") -> PeftModel:
    """Wrap ``model`` (in place) with a masked LoRA on its prunable block linears, never lm_head or embeddings.

    Args:
        r_max: physical rank of every A/B pair (official code: 8); active ranks default to it.
        target_modules: optional subset of block-relative linear names ("q_proj" or "self_attn.q_proj").
    """
    names = [f"{get_adapter(model).blocks}.{i}.{name}" for i, name, _ in get_adapter(model).iter_linears(model)
             if target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules)]
    if not names:
        raise ValueError(f"target_modules {target_modules} match no prunable linear")
    config = register(MaskedLoraConfig(r=r_max, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                                       bias="none", task_type="CAUSAL_LM"))
    return get_peft_model(model, config, adapter_name=adapter)


def set_active_ranks(peft_model: PeftModel, ranks: dict[int, int] | list[int], clip: bool = False,
                     adapter: str = "default") -> dict[int, tuple[int, int]]:
    """Give every adapted linear of block l the active rank r_l (method.md §3: one rank per block).

    Args:
        ranks: block -> r_l (blocks left out keep theirs), or one r_l per block. r_l = 0 disables the block's update.
        clip: cut r_l > physical rank to it (the official code's silent cut at 8) instead of raising.

    Returns:
        {block: (requested, applied)} for every clipped block (empty if none).

    Raises:
        ValueError: r_l < 0, an unknown block, or r_l > physical rank without ``clip``.
    """
    _check_unmerged(peft_model, adapter, "set_active_ranks")
    return _apply_ranks(peft_model, ranks, clip, adapter)


def _apply_ranks(peft_model, ranks, clip, adapter) -> dict[int, tuple[int, int]]:
    layers = list(masked_layers(peft_model, adapter))
    n_blocks = len(get_adapter(_base(peft_model)).get_blocks(_base(peft_model)))
    if isinstance(ranks, dict):
        ranks = {int(k): int(v) for k, v in ranks.items()}  # JSON turns int keys into strings
    else:
        if len(ranks) != n_blocks:
            raise ValueError(f"got {len(ranks)} ranks for {n_blocks} blocks")
        ranks = {i: int(v) for i, v in enumerate(ranks)}
    if bad := [i for i, r in ranks.items() if not 0 <= i < n_blocks or r < 0]:
        raise ValueError(f"invalid block index or negative rank for blocks {bad}: {ranks}")
    clipped: dict[int, tuple[int, int]] = {}
    for i, name, layer in layers:  # validate everything before changing anything
        if i in ranks and ranks[i] > layer.r[adapter]:
            if not clip:
                raise ValueError(f"block {i} {name}: active rank {ranks[i]} > physical rank {layer.r[adapter]}; "
                                 "raise r_max or pass clip=True")
            clipped[i] = (ranks[i], layer.r[adapter])
    for i, _, layer in layers:
        if i in ranks:
            layer.active_rank[adapter] = min(ranks[i], layer.r[adapter])
    config = peft_model.peft_config[adapter]
    config.active_ranks = {i: layer.active_rank[adapter] for i, _, layer in layers}
    return clipped


def weight_masks(model: nn.Module) -> dict[Key, torch.Tensor]:
    """``weight != 0`` (bool (d_out, d_in)) of every prunable linear's (base) weight."""
    base = _base(model)
    return {(i, name): _weight(layer) != 0 for i, name, layer in get_adapter(base).iter_linears(base)}


def set_masks(peft_model: PeftModel, masks: Optional[dict[Key, torch.Tensor]] = None, adapter: str = "default"):
    """Set the adapter's mask buffers from ``masks`` ((block, name) -> bool tensor) or, when None, from
    ``base weight != 0``. Raises on a merged adapter."""
    _check_unmerged(peft_model, adapter, "set_masks")
    for i, name, layer in masked_layers(peft_model, adapter):
        m = (_weight(layer) != 0) if masks is None else masks[(i, name)].to(_weight(layer).device, torch.bool)
        if m.shape != _weight(layer).shape:
            raise ValueError(f"block {i} {name}: mask shape {tuple(m.shape)} != weight {tuple(_weight(layer).shape)}")
        layer.sparsity_mask[adapter] = m


def remask(peft_model: PeftModel, adapter: str = "default") -> None:
    """Masks from the current (re-pruned, unmerged) base weights: ``set_masks(peft_model, None)``."""
    set_masks(peft_model, None, adapter)


def merge_into_base(peft_model: PeftModel, adapter: str = "default") -> None:
    """DSA step 2 (method.md §4): W ← W + (α/r) M ⊙ B A on every layer; the adapter is kept (layers marked merged)."""
    _check_unmerged(peft_model, adapter, "merge_into_base")
    peft_model.merge_adapter(adapter_names=[adapter])


def mark_merged(peft_model: PeftModel, adapter: str = "default") -> None:
    """Count the adapter as merged without adding its delta: for base weights that already hold it (merged, then
    maybe pruned), e.g. a DSA step-4 state restored from a snapshot (losa.snapshot.restore)."""
    _check_unmerged(peft_model, adapter, "mark_merged")
    for _, _, layer in masked_layers(peft_model, adapter):
        layer.merged_adapters.append(adapter)


@torch.no_grad()
def unmerge_with_new_mask(peft_model: PeftModel, ranks: dict[int, int] | list[int] | None = None,
                          clip: bool = False, adapter: str = "default") -> dict[int, tuple[int, int]]:
    """DSA step 5 (method.md §4), after the caller pruned the merged weights: M_new = (W != 0), mask ← M_new,
    W ← W − (α/r) M_new ⊙ B A, and W = 0 exactly off M_new. The model then computes what the pruned merged model did.

    Args:
        ranks: new active ranks (step 6's SRA) applied BEFORE subtracting, which keeps that invariant. The official
            code sets them after unmerging, so its function jumps by the added/dropped rank slices.

    Returns:
        what ``set_active_ranks`` returns (clipped blocks).
    """
    layers = list(masked_layers(peft_model, adapter))
    if not all(adapter in layer.merged_adapters for _, _, layer in layers):
        raise RuntimeError("unmerge_with_new_mask needs merge_into_base first")
    clipped = _apply_ranks(peft_model, ranks, clip, adapter) if ranks is not None else {}
    for _, _, layer in layers:
        weight = _weight(layer)
        new_mask = weight != 0
        layer.sparsity_mask[adapter] = new_mask
        layer.unmerge()  # peft -> MaskedLoraVariant.unmerge: W - masked_delta with M_new
        weight.data.masked_fill_(~new_mask, 0)
    return clipped


def verify_merged(model: nn.Module, masks: dict[Key, torch.Tensor]) -> None:
    """Raise ValueError if any prunable (merged) weight is non-zero where ``masks`` ((block, name) -> bool) is 0."""
    base = _base(model)
    bad = {}
    for i, name, layer in get_adapter(base).iter_linears(base):
        n = int(((_weight(layer) != 0) & ~masks[(i, name)].to(_weight(layer).device, torch.bool)).sum())
        if n:
            bad[f"block {i} {name}"] = n
    if bad:
        raise ValueError(f"merged weights leave the mask (non-zero count where mask is 0): {bad}")


def load_masked_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default",
                        is_trainable: bool = False) -> PeftModel:
    """Load a masked adapter saved with ``save_pretrained`` onto ``model`` (the pruned base it was trained on).

    Rebuilds ``MaskedLoraConfig``, re-registers the custom module (the mapping is never saved), loads through
    ``PeftModel.from_pretrained`` (masks come from ``weight != 0``) and restores the saved active ranks.
    """
    with open(os.path.join(path, CONFIG_NAME)) as f:
        saved = json.load(f)
    if not saved.get("masked"):
        raise ValueError(f"{path} does not hold a masked LoRA adapter (no 'masked': true in {CONFIG_NAME})")
    names = {f.name for f in fields(MaskedLoraConfig) if f.init}
    config = register(MaskedLoraConfig(**{k: v for k, v in saved.items() if k in names}))
    peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter, is_trainable=is_trainable, config=config)
    if config.active_ranks:
        set_active_ranks(peft_model, config.active_ranks, adapter=adapter)
    return peft_model
