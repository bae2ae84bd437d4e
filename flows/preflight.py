"""Checks of a grid against its models and this machine, before anything runs or is written.

The grid file itself is validated when it loads (``flows.spec``: types, ranges, known keys). What needs the model
is checked here: the model exists and is a model, every N:M pattern's M divides the input width of every prunable
linear, no window is longer than the model's context; and the resource guard: the memory one cell needs at its peak
(weights, one block's activations, calibration buffers, the dense outputs LoSA keeps, fine-tuning activations and
optimizer state) and the disk its snapshots take, against what this machine has free. Each problem is one line that
names the grid file, the cell and what is allowed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from flows.spec import Cell, Grid
from losa.config import LosaConfig


class PreflightError(ValueError):
    """The grid cannot run as written (or not on this machine); the message lists every problem found."""


@dataclass(frozen=True)
class Shape:
    """What the checks need of a model: widths, depth, context, size."""

    hidden: int
    intermediate: int
    attn_out_in: int  # o_proj's input width (heads x head_dim)
    layers: int
    vocab: int
    context: int | None
    params: int
    linear_params: int  # the prunable block linears: what a snapshot stores
    linear_io: int  # sum over the prunable linears of d_in + d_out: an adapter's A/B per unit of rank
    dtype_bytes: int = 4  # losa loads weights in fp32 on CPU (losa.models.load_model)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def widths(self) -> dict[str, int]:
        return {"q/k/v, gate/up (hidden)": self.hidden, "o_proj (heads x head_dim)": self.attn_out_in,
                "down_proj (intermediate)": self.intermediate}


def model_shape(path: str) -> Shape:
    """Read a model folder's config (no weights loaded)."""
    from transformers import AutoConfig

    return config_shape(AutoConfig.from_pretrained(path))


def config_shape(cfg, dtype_bytes: int = 4) -> Shape:
    """The :class:`Shape` of a transformers model config."""
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", 4 * hidden)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    attn = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2
    gated = 3 if hasattr(cfg, "intermediate_size") else 2
    mlp = hidden * inter * gated
    io = 2 * (hidden + heads * head_dim) + 2 * (hidden + kv * head_dim) + gated * (hidden + inter)
    embed = cfg.vocab_size * hidden * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return Shape(hidden=hidden, intermediate=inter, attn_out_in=heads * head_dim, layers=layers, vocab=cfg.vocab_size,
                 context=getattr(cfg, "max_position_embeddings", None), params=layers * (attn + mlp) + embed,
                 linear_params=layers * (attn + mlp), linear_io=layers * io, dtype_bytes=dtype_bytes)


def cell_memory(shape: Shape, cfg: LosaConfig) -> dict[str, int]:
    """Peak bytes of one cell, by what holds them (an upper estimate; fp32 activations)."""
    f = 4
    block_acts = cfg.calib_batch_size * cfg.seqlen * (4 * shape.hidden + 2 * shape.intermediate) * f
    calib = 2 * cfg.nsamples * cfg.seqlen * shape.hidden * f  # block inputs and outputs of every window
    # one block's dense outputs at a time, recomputed beside each prune (tasks/stages.py)
    dense_outputs = cfg.nsamples * cfg.seqlen * shape.hidden * f if cfg.method == "losa" else 0
    gram = shape.hidden * shape.hidden * 8 * 2 + shape.intermediate ** 2 * 8  # Wanda/SparseGPT statistics (fp64)
    tokens = cfg.finetune.batch_size * cfg.finetune.seqlen
    train = 0
    if cfg.method in ("lora", "losa"):
        # activations kept for backward (~12 hidden-wide and 3 FFN-wide tensors per block), logits and their grads,
        # the masked update's full-size product per linear (method.md §4), LoRA state (tiny)
        train = tokens * (shape.layers * (12 * shape.hidden + 3 * shape.intermediate) + 3 * shape.vocab) * f + \
            2 * shape.hidden * max(shape.intermediate, shape.hidden) * f
    return {"weights (the model and a restored state, or the dense model beside a prune)": 2 * shape.weight_bytes,
            "pruning": block_acts + calib + gram,
            "dense outputs": dense_outputs, "fine-tuning": train}


def cell_disk(shape: Shape, cfg: LosaConfig) -> int:
    """Bytes a cell writes to the artifact store (tasks/stages.py's stored forms in the store's compact form,
    tasks/store.py); all of them exist at the cell's peak unless it spills (:func:`cell_peak`), as retention drops
    the other intermediates once the cell has finished.

    A snapshot of P prunable weights of b bytes in R rows at sparsity s holds their non-zeros, one bit per weight
    and 8 bytes per row: S(s) = min(P b, P((1 − s) b + 1/8) + 8 R). A prune by a masking rule (Wanda, magnitude)
    stores its mask (P/8), SparseGPT's S(Θ^t); a fine-tuning step its adapter, A(r) = 4 r Σ(d_in + d_out); a merge
    and a plain-LoRA merge a recipe (~0); LoSA's final merge S(s). So LoSA: Σ_t [prune(Θ^t) + A(r_phys)] + S(s) over
    the cubic schedule's Θ^t; + LoRA: prune(s) + A(r_lora); pruned: prune(s)."""
    def prune(sparsity: float) -> float:
        return shape.linear_params / 8 if _masks_only(cfg) else sparse_bytes(shape, sparsity)

    if cfg.method == "dense":
        return 0
    if cfg.method == "pruned":
        return int(prune(cfg.sparsity))
    if cfg.method == "lora":
        return int(prune(cfg.sparsity) + adapter_bytes(shape, cfg.lora_rank))
    adapter = adapter_bytes(shape, cfg.physical_rank)
    return int(sum(prune(th) + adapter for th in _thetas(cfg)) + sparse_bytes(shape, cfg.sparsity))


def cell_peak(shape: Shape, cfg: LosaConfig, spill: bool = True) -> int:
    """The most bytes a cell holds in the artifact store at once: :func:`cell_disk`, except that a LoSA cell that
    spills (``spill``: every ``retain`` but ``all``) holds one SparseGPT prune at a time, since each is spilled before
    the next full weights are written (tasks/stages.py). Then, with A = A(r_phys), the peak is the larger of
    max_t S(Θ^t) + t A (step t's weights and the adapters of steps 1..t) and S(s) + T A (the final)."""
    if not spill or cfg.method != "losa" or _masks_only(cfg):
        return cell_disk(shape, cfg)
    adapter, thetas = adapter_bytes(shape, cfg.physical_rank), _thetas(cfg)
    held = [sparse_bytes(shape, th) + t * adapter for t, th in enumerate(thetas, start=1)]
    return int(max(*held, sparse_bytes(shape, cfg.sparsity) + len(thetas) * adapter))


def adapter_bytes(shape: Shape, rank: int) -> float:
    """A(r): a stored adapter's A/B in fp32, r (d_in + d_out) values per prunable linear."""
    return 4 * rank * shape.linear_io


def _masks_only(cfg: LosaConfig) -> bool:
    from losa.pruners import get_rule

    return get_rule(cfg.pruner).masks_only


def _thetas(cfg: LosaConfig) -> list[float]:
    """Θ^1..Θ^T of the cubic schedule."""
    from losa.schedule import cubic_sparsity

    return [cubic_sparsity(cfg.sparsity, t, cfg.effective_steps) for t in range(1, cfg.effective_steps + 1)]


def sparse_bytes(shape: Shape, sparsity: float) -> float:
    """S(s): the prunable linears at ``sparsity`` in the compact form (non-zeros, one bit per weight, 8 bytes per
    row), or dense when that is smaller."""
    b, p = shape.dtype_bytes, shape.linear_params
    rows = shape.layers * (3 * shape.hidden + shape.attn_out_in + 3 * shape.intermediate)  # q,k,v-ish, o, MLP
    return min(p * b, p * ((1 - sparsity) * b + 1 / 8) + 8 * rows)


def _model_problems(name: str, path: str | None, err: Exception | None) -> list[str]:
    if err is not None:
        return [f"model {name!r}: {err}"]
    if not (Path(path) / "config.json").is_file():
        return [f"model {name!r}: {path} is not a model folder (no config.json)"]
    return []


def _cell_problems(cell: Cell, shape: Shape) -> list[str]:
    cfg, out = cell.config, []
    kind, base = cfg.parsed_pattern()
    if base.is_nm:
        bad = {what: w for what, w in shape.widths.items() if w % base.m}
        if bad:
            out.append(f"pattern {cfg.pattern}: M = {base.m} must divide every prunable input width; "
                       + ", ".join(f"{what} is {w}" for what, w in bad.items()))
    if shape.context:
        for key, value in (("seqlen", cfg.seqlen), ("eval_seqlen", cfg.eval_seqlen),
                           ("finetune.seqlen", cfg.finetune.seqlen)):
            if cfg.method == "dense" and key != "eval_seqlen":
                continue
            if value > shape.context:
                out.append(f"{key} = {value} exceeds the model's context ({shape.context} tokens)")
        if cfg.speed is not None and cfg.speed.prefill + cfg.speed.decode + 1 > shape.context:
            out.append(f"speed.prefill + speed.decode = {cfg.speed.prefill + cfg.speed.decode} exceeds the model's "
                       f"context ({shape.context} tokens)")
    from losa.data import hub_allowed

    if cfg.zeroshot is not None and cfg.zeroshot.source == "hub" and not hub_allowed():
        out.append("zeroshot.source = hub needs the Hugging Face hub, but HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; "
                   "use source: local (the shipped task files)")
    return out


def check(grid: Grid, *, resources: bool = True) -> list[str]:
    """Every problem of ``grid`` against its models (and, with ``resources``, this machine); [] when it can run."""
    from tasks.model import model_path

    where = grid.path or grid.name
    problems: list[str] = []
    shapes: dict[str, Shape] = {}
    for name in dict.fromkeys(c.model for c in grid.cells()):
        try:
            path, err = str(model_path(name)), None
        except (FileNotFoundError, OSError, ValueError) as e:
            path, err = None, e
        found = _model_problems(name, path, err)
        problems += [f"{where}: models: {p}" for p in found]
        if not found:
            shapes[name] = model_shape(path)
    for cell in grid.cells():
        if cell.model in shapes:
            problems += [f"{where}: cell {cell.describe()}: {p}" for p in _cell_problems(cell, shapes[cell.model])]
    if resources and not problems:
        problems += [f"{where}: {p}" for p in _resource_problems(grid, shapes)]
    return problems


def _resource_problems(grid: Grid, shapes: dict[str, Shape]) -> list[str]:
    import psutil

    from tasks.state import artifacts_url

    if os.environ.get("LOSA_SKIP_RESOURCE_GUARD") == "1":
        return []
    out = []
    available = psutil.virtual_memory().available
    worst = max(grid.cells(), key=lambda c: sum(cell_memory(shapes[c.model], c.config).values()))
    need = cell_memory(shapes[worst.model], worst.config)
    if sum(need.values()) > available:
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items() if v)
        out.append(f"cell {worst.describe()} needs about {sum(need.values()) / 2**30:.1f} GiB of memory ({parts} GiB); "
                   f"{available / 2**30:.1f} GiB are available (LOSA_SKIP_RESOURCE_GUARD=1 runs it anyway)")
    url = artifacts_url()
    if "://" not in url:  # a local store: its disk
        folder = Path(url)
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        disk = max(cell_peak(shapes[c.model], c.config, spill=grid.retain != "all") for c in grid.cells())
        if disk > free:
            out.append(f"one cell holds up to {disk / 2**30:.1f} GiB of snapshots in {url}; {free / 2**30:.1f} GiB "
                       f"are free (retention frees them after each cell; LOSA_SKIP_RESOURCE_GUARD=1 runs it anyway)")
    return out


def require(grid: Grid, *, resources: bool = True) -> None:
    """Raise :class:`PreflightError` listing every problem of ``check``."""
    if problems := check(grid, resources=resources):
        raise PreflightError("\n".join(problems))
