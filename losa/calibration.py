"""Block-by-block calibration and pruning (method.md §1, §3). Knows nothing about a rule beyond :class:`~losa.pruners.Rule`.

For each block l, in batches of calibration windows:

1. ``pruned`` propagation (default, as the papers): the statistics are gathered on the *pruned* stream (the previous
   blocks already pruned); the block's output on the *dense* stream is the reference Y^dense_l, unless a reference
   is given (LoSA passes the original dense model's outputs, :func:`dense_block_outputs`, computed once).
   ``dense`` propagation: statistics and reference come from the dense stream, in one pass.
2. Every prunable linear of the block is pruned with its statistic and the block's rate and pattern.
3. The pruned block runs on its input stream; its output is compared with Y^dense_l (the reconstruction error L_l
   of method.md §3) and becomes the next block's pruned-stream input.

Only the current block and the activations of the calibration set live on the compute device; blocks are moved there
and back one at a time. Activations may be kept on another device (``offload``) to save accelerator memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import capture_first_block_inputs, embeddings_on, get_adapter, run_block, to_device
from .patterns import Pattern
from .pruners import Rule, get_rule


class LinearStatistic:
    """Accumulates one linear layer's input statistic over calibration tokens, in fp32.

    ``act_sq``: (d_in,) sum of x_j^2 (Wanda). ``hessian``: (d_in, d_in) 2 X X^T / n (SparseGPT), from a running sum.
    """

    def __init__(self, kind: str, d_in: int, device: torch.device):
        self.kind, self.n = kind, 0
        shape = (d_in,) if kind == "act_sq" else (d_in, d_in)
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
        self.n += x.shape[0]
        if self.kind == "act_sq":
            self.total += (x * x).sum(0)
        else:
            self.total.addmm_(x.T, x)

    def value(self) -> torch.Tensor:
        return self.total if self.kind == "act_sq" else self.total * (2.0 / max(self.n, 1))


@dataclass
class LayerRecord:
    block: int
    name: str
    shape: tuple[int, int]
    target: float
    pattern: str
    sparsity: float  # achieved: fraction of exact zeros in the weight after pruning
    seconds: float
    cholesky_retries: int = 0


@dataclass
class PruneReport:
    """What :func:`prune_model` did: achieved sparsity per layer and overall, errors, timings."""

    method: str
    propagation: str
    targets: list[float]
    patterns: list[str]
    layers: list[LayerRecord] = field(default_factory=list)
    block_errors: list[float] = field(default_factory=list)  # L_l against the dense block outputs (method.md §3)
    timings: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0
    seqlen: int = 0

    @property
    def sparsity(self) -> float:
        """Overall achieved sparsity over all prunable linears (zeros / weights)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    @property
    def block_sparsity(self) -> list[float]:
        out = []
        for b in range(len(self.targets)):
            rs = [r for r in self.layers if r.block == b]
            out.append(sum(r.sparsity * r.shape[0] * r.shape[1] for r in rs) / sum(r.shape[0] * r.shape[1] for r in rs))
        return out

    @property
    def cholesky_retries(self) -> int:
        return sum(r.cholesky_retries for r in self.layers)

    @property
    def seconds(self) -> float:
        return self.timings.get("total", 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(sparsity=self.sparsity, block_sparsity=self.block_sparsity, cholesky_retries=self.cholesky_retries)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruneReport:
        """Inverse of :meth:`to_dict` (e.g. of a stored report; the derived fields are recomputed)."""
        names = {f.name for f in fields(cls)} - {"layers"}
        layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in d.get("layers", [])]
        return cls(layers=layers, **{k: v for k, v in d.items() if k in names})


def _per_block(value, n_blocks: int, what: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n_blocks:
            raise ValueError(f"{what}: got {len(value)} values for {n_blocks} blocks")
        return list(value)
    return [value] * n_blocks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ReconstructionError:
    """L = (1/d) sum_c sum_{n,s} (Y^dense - Y^sparse)^2_{n,s,c} / ||Y^dense[:, :, c]||^2 (method.md §3), batch by batch."""

    def __init__(self):
        self.diff = self.ref = None

    def add(self, dense: torch.Tensor, sparse: torch.Tensor) -> None:
        # per-batch sums in fp32 (a few thousand tokens), accumulated across batches in fp64
        dense = dense.float()
        delta = dense - sparse.float()
        diff = torch.einsum("bsc,bsc->c", delta, delta).double()  # (d,)
        ref = torch.einsum("bsc,bsc->c", dense, dense).double()
        self.diff = diff if self.diff is None else self.diff + diff
        self.ref = ref if self.ref is None else self.ref + ref

    def value(self) -> float:
        return float((self.diff / self.ref.clamp_min(1e-30)).mean())


@contextmanager
def _inference(model: nn.Module):
    """Eval mode (no dropout in the statistics) and no KV cache while calibrating; restored even on error."""
    training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        yield
    finally:
        model.train(training)
        model.config.use_cache = use_cache


def capture_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int, device: torch.device,
                   offload: torch.device) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Block 0's inputs, one (B, S, d) tensor per calibration batch (on ``offload``), and the kwargs blocks need.

    The kwargs depend only on the batch shape (calibration windows carry no padding), so one set is kept per size.
    """
    inputs, kwargs_by_size = [], {}
    with embeddings_on(model, device):
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size]
            hidden, kwargs = capture_first_block_inputs(model, batch, device)
            inputs.append(hidden.to(offload))
            kwargs_by_size.setdefault(batch.shape[0], kwargs)
    return inputs, kwargs_by_size


def forward_block(block: nn.Module, inputs: list[torch.Tensor], kwargs_by_size: dict[int, dict],
                  device: torch.device, offload: torch.device, keep: bool = True) -> list[torch.Tensor] | None:
    """Run one block on every batch of ``inputs``; outputs are kept on ``offload`` (or dropped: ``keep=False``,
    for a pass that only feeds statistics hooks)."""
    outs = []
    for x in inputs:
        y = run_block(block, x.to(device), to_device(kwargs_by_size[x.shape[0]], device))
        if keep:
            outs.append(y.to(offload))
    return outs if keep else None


def _devices(model: nn.Module, device, offload) -> tuple[torch.device, torch.device]:
    blocks = get_adapter(model).get_blocks(model)
    device = torch.device(device) if device is not None else next(blocks[0].parameters()).device
    return device, (torch.device(offload) if offload is not None else device)


def _walk_dense(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device, offload):
    """Yield (inputs, outputs) of every block of the unchanged model in turn, one block on the device at a time."""
    device, offload = _devices(model, device, offload)
    with _inference(model):
        hidden, kwargs_by_size = capture_inputs(model, input_ids, batch_size, device, offload)
        for block in get_adapter(model).get_blocks(model):
            home = next(block.parameters()).device
            block.to(device)
            out = forward_block(block, hidden, kwargs_by_size, device, offload)
            block.to(home)
            yield hidden, out
            hidden = out


@torch.no_grad()
def dense_block_outputs(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8, device=None,
                        offload=None, lazy: bool = False) -> list[list[torch.Tensor]] | Iterator[list[torch.Tensor]]:
    """Y^dense_l of every block on the calibration set: ``out[l][k]`` is block l's output on batch k (method.md §3).

    Computed on the original dense model; LoSA's rank allocation measures every later pruning against it.
    ``lazy``: yield them block by block instead (a :func:`prune_model` ``reference`` that holds one block's outputs
    at a time, not every block's: at 7B those are ~70 GB).
    """
    outputs = (out for _, out in _walk_dense(model, calibration, batch_size, device, offload))
    return outputs if lazy else list(outputs)


@torch.no_grad()
def block_input_grams(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, device=None) -> list[torch.Tensor]:
    """The (n, n) linear Gram matrix of every block's input hidden states on ``input_ids`` (n sequences).

    What LSR needs (method.md §2): only one block's inputs exist at a time, never an (S·d) x (S·d) matrix.
    """
    from .layer_sparsity import gram

    return [gram(torch.cat(inputs)) for inputs, _ in _walk_dense(model, input_ids, batch_size, device, None)]


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    method: str,
    sparsity: float | Sequence[float] | None,
    pattern: Pattern | str | Sequence[Pattern | str] = Pattern(),
    *,
    batch_size: int = 8,
    propagation: str = "pruned",
    reference: Sequence[list[torch.Tensor]] | Iterable[list[torch.Tensor]] | None = None,
    reconstruction_error: bool = True,
    device: str | torch.device | None = None,
    offload: str | torch.device | None = None,
    progress: bool = False,
) -> PruneReport:
    """Prune every prunable linear of ``model`` in place, block by block (method.md §1).

    Args:
        model: a causal LM of a supported family (see :mod:`losa.models`); adapter-wrapped linears are pruned in
            their base layer.
        calibration: (N, S) token ids (e.g. :func:`losa.data.calibration_windows`); S is explicit, never the model's
            context length.
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: one rate in [0, 1) or one per block (LSR's rates); None with N:M patterns (implied).
        pattern: one pattern or one per block (mixed N:M), ``"2:4"`` strings accepted.
        batch_size: calibration windows per block forward.
        propagation: ``"pruned"`` (next block sees pruned outputs; the papers' default) or ``"dense"``.
        reference: Y^dense from :func:`dense_block_outputs` (same calibration and batch size; a list, or an iterator
            read block by block) to measure the reconstruction errors against, e.g. the original dense model's outputs
            in LoSA's later steps; default: this model's own unpruned block outputs, computed on the way.
        reconstruction_error: measure L_l per block. Without a ``reference`` this costs one extra block pass (the
            unpruned stream); ``False`` skips it, as the papers' pruning scripts do (``block_errors`` is then empty).
        device: compute device (default: where the model's first block is).
        offload: where activations are kept between blocks (default: ``device``).
        progress: show a progress bar over blocks.

    Returns:
        A :class:`PruneReport`.
    """
    # ---- validate everything before any compute
    rule: Rule = get_rule(method)
    if propagation not in ("pruned", "dense"):
        raise ValueError(f"propagation must be 'pruned' or 'dense', got {propagation!r}")
    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ValueError(f"calibration must be (N, S) token ids, got shape {tuple(calibration.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    n_blocks = len(blocks)
    patterns = [Pattern.parse(p) for p in _per_block(pattern, n_blocks, "pattern")]
    rates = [p.resolve_sparsity(s) for p, s in zip(patterns, _per_block(sparsity, n_blocks, "sparsity"))]
    for b, block in enumerate(blocks):
        for name, lin in adapter.get_linears(block).items():
            patterns[b].check_shape(lin.in_features, f"block {b} {name}")
    n_batches = -(-calibration.shape[0] // batch_size)
    shape_error = (f"reference must hold {n_blocks} blocks x {n_batches} batches of outputs "
                   "(dense_block_outputs with the same calibration and batch_size)")
    if isinstance(reference, Sequence) and (len(reference) != n_blocks or any(len(r) != n_batches for r in reference)):
        raise ValueError(shape_error)
    references = iter(reference) if reference is not None else None

    device, offload = _devices(model, device, offload)
    report = PruneReport(method, propagation, rates, [str(p) for p in patterns],
                         n_samples=calibration.shape[0], seqlen=calibration.shape[1])
    timings = {"capture": 0.0, "statistics": 0.0, "reference": 0.0, "prune": 0.0, "propagate": 0.0}
    t_start = time.perf_counter()

    with _inference(model):
        dense_in, kwargs_by_size = capture_inputs(model, calibration, batch_size, device, offload)
        timings["capture"] = time.perf_counter() - t_start
        sparse_in = dense_in  # identical until the first block is pruned

        def forward(block: nn.Module, inputs: list[torch.Tensor], keep: bool = True) -> list[torch.Tensor] | None:
            return forward_block(block, inputs, kwargs_by_size, device, offload, keep)

        for b in tqdm(range(n_blocks), desc=f"{method} {patterns[0]}", disable=not progress):
            block = blocks[b]
            home = next(block.parameters()).device
            block.to(device)
            linears = adapter.get_linears(block)
            same_stream = sparse_in is dense_in
            # the unpruned stream is needed for dense propagation, or as the reference when none is given
            need_dense_stream = propagation == "dense" or (reference is None and reconstruction_error)

            # 1. statistics (hooks on the stream the block will see), and the block's unpruned outputs
            t = time.perf_counter()
            stats = {n: LinearStatistic(rule.statistic, lin.in_features, device) for n, lin in linears.items()} \
                if rule.statistic else {}
            hooks = [lin.register_forward_hook(lambda m, inp, out, s=stats[n]: s.add(inp[0]))
                     for n, lin in linears.items() if n in stats]
            # the statistics pass's outputs serve as the unpruned outputs only when it ran on the dense stream
            keep = need_dense_stream and (propagation == "dense" or same_stream)
            try:
                stream_out = forward(block, dense_in if propagation == "dense" else sparse_in, keep)
            finally:
                for h in hooks:
                    h.remove()
            _sync(device)
            timings["statistics"] += time.perf_counter() - t
            t = time.perf_counter()
            if not need_dense_stream:
                dense_out = None
            elif propagation == "dense" or same_stream:
                dense_out = stream_out
            else:
                dense_out = forward(block, dense_in)
            del stream_out
            _sync(device)
            timings["reference"] += time.perf_counter() - t

            # 2. prune every linear of the block
            for name, lin in linears.items():
                t = time.perf_counter()
                info: dict = {}
                stat = stats[name].value() if name in stats else None
                new_weight, _ = rule.prune(lin.weight.data, stat, rates[b], patterns[b], info)
                lin.weight.data.copy_(new_weight)
                del stat, new_weight
                _sync(device)
                dt = time.perf_counter() - t
                timings["prune"] += dt
                achieved = float((lin.weight.data == 0).sum()) / lin.weight.numel()
                report.layers.append(LayerRecord(b, name, tuple(lin.weight.shape), rates[b], str(patterns[b]),
                                                 achieved, dt, info.get("cholesky_retries", 0)))
            del stats

            # 3. pruned outputs: reconstruction error against the reference, and the next block's input
            t = time.perf_counter()
            pruned_out = forward(block, dense_in if propagation == "dense" else sparse_in)
            if reconstruction_error:
                err = _ReconstructionError()
                target = next(references, None) if references is not None else dense_out
                if target is None or len(target) != n_batches:
                    raise ValueError(shape_error)
                for ref, out in zip(target, pruned_out):
                    err.add(ref.to(device), out.to(device))
                report.block_errors.append(err.value())
            _sync(device)
            timings["propagate"] += time.perf_counter() - t

            block.to(home)
            dense_in = dense_out
            sparse_in = dense_out if propagation == "dense" else pruned_out
            if device.type == "cuda":
                torch.cuda.empty_cache()

    expected = n_blocks * len(adapter.linears)
    if len(report.layers) != expected:  # every targeted layer pruned exactly once
        raise RuntimeError(f"pruned {len(report.layers)} layers, expected {expected}")
    timings["total"] = time.perf_counter() - t_start
    report.timings = timings
    return report
