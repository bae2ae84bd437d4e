"""Model adapters: where a causal LM keeps its decoder blocks and prunable linears, and how to run one block alone.

Chosen by ``config.model_type`` (never by the model's name). Running a block reuses the keyword arguments the model
itself passed to its first block (attention mask, position ids, rotary ``position_embeddings``), captured by a
pre-hook, so the driver follows whatever the installed transformers version passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Paths into one model family, as attribute paths from the ``*ForCausalLM`` object.

    Attributes:
        blocks: the ``nn.ModuleList`` of decoder blocks.
        linears: prunable linears of a block, relative to the block, in forward order.
        embeddings: modules that run before the first block (moved to the compute device for capture).
    """

    family: str
    blocks: str
    linears: tuple[str, ...]
    embeddings: tuple[str, ...]

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def get_linears(self, block: nn.Module, unwrap: bool = True) -> dict[str, nn.Linear]:
        """The block's prunable linears; an adapter-wrapped one (peft) yields its ``base_layer`` unless ``unwrap=False``."""
        out = {}
        for name in self.linears:
            mod = block.get_submodule(name)
            out[name] = getattr(mod, "base_layer", mod) if unwrap else mod
        return out

    def iter_linears(self, model: nn.Module, unwrap: bool = True) -> Iterator[tuple[int, str, nn.Module]]:
        for i, block in enumerate(self.get_blocks(model)):
            for name, lin in self.get_linears(block, unwrap).items():
                yield i, name, lin

    def get_embeddings(self, model: nn.Module) -> list[nn.Module]:
        mods = []
        for path in self.embeddings:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue  # optional parts (e.g. OPT's project_in is None for most sizes)
            if mod is not None:
                mods.append(mod)
        return mods


_LLAMA = ModelAdapter(
    family="llama",
    blocks="model.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    embeddings=("model.embed_tokens", "model.rotary_emb"),
)
_OPT = ModelAdapter(
    family="opt",
    blocks="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
)

# model_type -> adapter. LLaMA-1/2/3 and Vicuna report "llama"; Mistral and Qwen2 share the LLaMA block layout (GQA).
ADAPTERS: dict[str, ModelAdapter] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "opt": _OPT}


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


# keyword arguments of a block call that must not be replayed (per-call caches) or that we fix ourselves
_DROP_KWARGS = {"cache", "past_key_value", "past_key_values", "use_cache", "output_attentions"}


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first block on one batch; return that block's hidden-state input and keyword arguments.

    The embedding modules must already be on ``device`` (see :func:`embeddings_on`); the blocks may stay elsewhere.

    Args:
        input_ids: (B, S) token ids.

    Returns:
        hidden: (B, S, d) on ``device``; kwargs: the other arguments the model passed to block 0 (tensors on ``device``).
    """
    adapter = get_adapter(model)
    first = adapter.get_blocks(model)[0]
    got: dict = {}

    def hook(module, args, kwargs):
        got["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _DROP_KWARGS}
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids.to(device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "hidden" not in got:
        raise RuntimeError("the first decoder block was never called: is this a decoder-only causal LM?")
    return got["hidden"], got["kwargs"]


@contextmanager
def embeddings_on(model: nn.Module, device: torch.device):
    """Move only the modules that run before block 0 to ``device`` (a 7B model's blocks stay where they are)."""
    mods = get_adapter(model).get_embeddings(model)
    homes = [next(iter(m.parameters()), next(iter(m.buffers()), torch.empty(0))).device for m in mods]
    for m in mods:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(mods, homes):
            m.to(home)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call one decoder block on (B, S, d) hidden states with captured kwargs; returns (B, S, d)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def to_device(obj, device):
    """Move tensors inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a causal LM and its tokenizer from a local folder, a named model (``testbed``, ``smollm2-135m``: see
    :mod:`losa.zoo`) or a hub id when online.

    ``device="auto"``: CUDA when available, else the CPU. ``dtype`` defaults to fp32 on CPU (bf16 matmuls are slow
    and imprecise there) and fp16 on CUDA.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .zoo import model_folder

    path = model_folder(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    get_adapter(model)  # fail early on an unsupported family
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
