"""Export of a finished model (method.md §6): a Hugging Face folder, and a compact sparse form that restores it exactly.

The sparse form is compressed-tensors' ``sparse-bitmask`` layout in one safetensors file: every prunable linear's
weight ``<module>.weight`` is stored as ``<module>.shape`` (int64), ``<module>.compressed`` (the non-zero values in
row-major order, in the export dtype), ``<module>.bitmask`` (uint8, each row's non-zero flags packed 8 per byte,
little bit order) and ``<module>.row_offsets`` (int64, where each row's values start); every other tensor is stored
as it is. compressed-tensors wrote this format up to 0.12 (vLLM read it); the current release (0.20) keeps only its
config class, so losa writes and reads the layout itself (:func:`save_sparse`, :func:`load_sparse`) and records the
compressed-tensors ``sparsity_config`` beside it. Plain torch + safetensors + transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import get_adapter

SPARSE_FILE = "model.sparse.safetensors"
SPARSE_META = "losa_sparse.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width views for exact zero tests


def bitmask_compress(weight: torch.Tensor, exact: bool = False) -> dict[str, torch.Tensor]:
    """One 2-D weight in the sparse-bitmask layout: shape, compressed values, packed bitmask, row offsets.

    ``exact``: keep every entry whose bits are not all zero (so −0.0 survives: a bit-for-bit round trip, as the
    artifact store needs); default: the non-zeros, as compressed-tensors does."""
    if weight.dim() != 2:
        raise ValueError(f"bitmask compression needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().cpu().contiguous()
    keep = w.view(_INT[w.element_size()]) != 0 if exact else w != 0
    counts = keep.sum(dim=1)
    return {"shape": torch.tensor(list(w.shape), dtype=torch.int64), "compressed": w[keep],
            "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def bitmask_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from :func:`bitmask_compress`'s parts (exactly the values it was given)."""
    rows, cols = (int(v) for v in parts["shape"])
    keep = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=cols, bitorder="little").astype(bool)
    out = torch.zeros(rows, cols, dtype=parts["compressed"].dtype)
    out[torch.from_numpy(keep)] = parts["compressed"]
    return out


def prunable_weights(model: nn.Module) -> list[str]:
    """State-dict names of the weights the pruners act on (every block's linears; not embeddings or the head)."""
    names = {id(lin.weight): None for _, _, lin in get_adapter(model).iter_linears(model)}
    return [n for n, p in model.named_parameters() if id(p) in names]


def sparse_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict in the sparse-bitmask layout (prunable weights compressed, the rest as is), cast to
    ``dtype`` first (None: the model's). Tied weights are stored once, under their first name."""
    targets = set(prunable_weights(model))
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen and tensor.numel():  # tied (e.g. lm_head = embed_tokens): one copy
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if name in targets:
            prefix = name[: -len(".weight")]
            out.update({f"{prefix}.{k}": v for k, v in bitmask_compress(t).items()})
        else:
            out[name] = t.contiguous()
    return out


def dense_state_dict(sparse: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`sparse_state_dict`'s output back to plain ``<module>.weight`` tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sparse.items():
        prefix, _, part = name.rpartition(".")
        if part == "compressed":
            out[f"{prefix}.weight"] = bitmask_decompress({k: sparse[f"{prefix}.{k}"] for k in
                                                          ("shape", "compressed", "bitmask", "row_offsets")})
        elif part not in ("shape", "bitmask", "row_offsets") or f"{prefix}.compressed" not in sparse:
            out[name] = tensor
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (a safetensors file adds a small JSON header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_hf(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "float16") -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer) of the model in ``dtype``: ``from_pretrained`` loads it."""
    import copy

    folder = Path(folder)
    copy.deepcopy(model).to(DTYPES[dtype]).save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def save_sparse(model: nn.Module, tokenizer, folder: str | Path, dtype: str = "float16") -> dict:
    """The compact sparse form in ``folder``: :data:`SPARSE_FILE`, the model config, the tokenizer and
    :data:`SPARSE_META` (the compressed-tensors sparsity config and byte counts). Returns that metadata."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = sparse_state_dict(model, DTYPES[dtype])
    save_file(tensors, str(folder / SPARSE_FILE), metadata={"format": "pt", "losa": "sparse-bitmask"})
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    meta = describe(model, tensors, dtype)
    (folder / SPARSE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def describe(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: str) -> dict:
    """Byte counts of the sparse form against the dense one in the same dtype, and the sparsity config."""
    size = DTYPES[dtype].itemsize
    targets = prunable_weights(model)
    params = {n: p.numel() for n, p in model.named_parameters()}  # tied weights appear once
    target_numel = sum(params[n] for n in targets)
    nnz = sum(int(tensors[f"{n[: -len('.weight')]}.compressed"].numel()) for n in targets)
    sparse_bytes = tensor_bytes(tensors)
    compressed = {n[: -len(".weight")] for n in targets}
    target_sparse = tensor_bytes({k: v for k, v in tensors.items() if k.rpartition(".")[0] in compressed})
    dense_bytes = sum(params.values()) * size
    return {
        "format": "sparse-bitmask", "dtype": dtype,
        "sparsity_config": {"format": "sparse-bitmask", "global_sparsity": 1 - nnz / target_numel,
                            "sparsity_structure": "unstructured", "targets": ["Linear"], "ignore": ["lm_head"]},
        "nnz": nnz, "prunable_params": target_numel, "params": sum(params.values()),
        "bytes_dense": dense_bytes, "bytes_sparse": sparse_bytes, "ratio": sparse_bytes / dense_bytes,
        "bytes_dense_prunable": target_numel * size, "bytes_sparse_prunable": target_sparse,
        "ratio_prunable": target_sparse / (target_numel * size),
    }


def load_sparse(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) from :func:`save_sparse`'s folder: the exact weights it was given, in its dtype."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / SPARSE_META).read_text())
    state = dense_state_dict(load_file(str(folder / SPARSE_FILE)))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=DTYPES[meta["dtype"]])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or (set(missing) - tied):
        raise ValueError(f"{folder / SPARSE_FILE} does not match its config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.to(device).eval(), tokenizer
