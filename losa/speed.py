"""Inference speed of a model on several engines, measured side by side in one process (method.md §6).

Two latencies per engine, batch 1: *prefill* (one forward over ``prefill`` prompt tokens, filling the KV cache) and
*decode* (the mean time of one new token after it, over ``decode`` greedy steps with the cache). Each figure is the
median of ``repeats`` runs after a warm-up run.

Engines:

- ``torch``: the model as it is (dense kernels: zeros cost as much as any weight, so a sparse model runs at its dense
  model's speed);
- ``csr``: every prunable linear's weight as a ``torch.sparse_csr`` tensor (``torch.sparse.mm``);
- ``onnxruntime``: the model exported to ONNX (two graphs: prefill, and one decode step with the cache as inputs)
  and run by ONNX Runtime's CPU provider;
- ``cuda`` / ``cuda_2:4``: on a GPU, the model in fp16 with dense kernels / with every 2:4 prunable linear as a
  ``torch.sparse`` semi-structured tensor (``to_sparse_semi_structured``: NVIDIA's 2:4 sparse tensor cores, Ampere
  or newer); without a GPU they report not available. Not yet run on a GPU by the project;
- ``deepsparse``: the same ONNX graphs run by Neural Magic's DeepSparse engine, which exploits unstructured
  sparsity; it needs its own Python environment (onnx < 1.15, numpy 1.x), named by ``$LOSA_DEEPSPARSE_PYTHON``,
  and is called as a subprocess (``losa/deepsparse_runner.py``). Missing: reported as not available.

Every engine's first-token logits are compared with torch's (``max_abs_diff``), so a wrong export cannot pass as a
fast one. Plain torch + onnx/onnxruntime; no Prefect.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .config import ENGINES
from .models import get_adapter

DEEPSPARSE_ENV = "LOSA_DEEPSPARSE_PYTHON"
DENSE_OF = {"csr": "torch", "cuda_2:4": "cuda"}  # a sparse-only engine and the dense one it is compared with


# --------------------------------------------------------------------------------------------- timing


def _median_ms(fn: Callable[[], float | None], repeats: int) -> float:
    """Median milliseconds of ``fn`` after a warm-up call (allocations, kernel selection, lazy init); a ``fn`` that
    returns seconds (the part of it that is timed) is measured by that."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inner = fn()
        times.append(inner if isinstance(inner, float) else time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _prompt(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- torch engines


class CSRLinear(nn.Module):
    """A linear layer whose weight is a CSR sparse tensor: y = W_csr x + b (``torch.sparse.mm``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def semi_structured_model(model: nn.Module) -> nn.Module:
    """A CUDA fp16 copy of ``model`` whose 2:4 prunable linears hold semi-structured sparse weights."""
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model).half().cuda()
    converted = 0
    for _, _, lin in get_adapter(out).iter_linears(out):
        w = lin.weight.detach()
        if bool(((w != 0).reshape(-1, 4).sum(-1) <= 2).all()):
            lin.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            converted += 1
    if not converted:
        raise ValueError("no prunable linear is 2:4 sparse: semi-structured kernels need a 2:4 model")
    return out


def csr_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every prunable linear as a :class:`CSRLinear`."""
    import warnings

    out = copy.deepcopy(model)
    adapter = get_adapter(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        for _, name, lin in list(adapter.iter_linears(out)):
            parent_name, _, child = [n for n, m in out.named_modules() if m is lin][0].rpartition(".")
            setattr(out.get_submodule(parent_name), child, CSRLinear(lin))
    return out


def _cache_arg(model: nn.Module) -> str:
    """The KV-cache keyword of the model's forward: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def _torch_runner(model: nn.Module, prompt: torch.Tensor, decode: int):
    """(prefill(), decode_steps(), first logits) for a transformers causal LM with its KV cache."""
    model.eval()
    kw = _cache_arg(model)

    device = next(model.parameters()).device
    prompt = prompt.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time the kernels, not launches

    def prefill():
        out = model(input_ids=prompt, use_cache=True)
        sync()
        return out

    first = prefill()

    def steps() -> float:  # the prefill fills the cache untimed; the decode steps are timed
        out = model(input_ids=prompt, use_cache=True)
        past, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(decode):
            out = model(input_ids=tok, use_cache=True, **{kw: past})
            past, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)
        sync()
        return time.perf_counter() - start

    return prefill, steps, first.logits[0, -1].float().cpu()


# --------------------------------------------------------------------------------------------- ONNX


class _Graph(nn.Module):
    """A causal LM as an ONNX-exportable function of (input_ids, past k/v tensors) -> (logits, present k/v)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, use_cache=True, **{_cache_arg(self.model): cache})
        present = [t for layer in _cache_of(out).layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1:], *present)


def _eager(model: nn.Module) -> nn.Module:
    """The model with eager attention: the TorchScript ONNX exporter cannot convert SDPA with grouped-query
    attention (``enable_gqa``), and eager attention computes the same function."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    return model


def kv_shape(model: nn.Module, length: int) -> tuple[int, int, int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (1, heads, length, head_dim)


def export_onnx(model: nn.Module, folder: str | Path, prefill: int) -> dict[str, Path]:
    """``prefill.onnx`` (prompt of ``prefill`` tokens, no cache) and ``decode.onnx`` (one token + the cache) of the
    model in fp32, with static shapes (DeepSparse compiles for fixed shapes; the decode cache length is an input
    axis of ONNX Runtime's graph). Returns their paths."""
    import warnings

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph = _Graph(_eager(copy.deepcopy(model).float().eval()))
    n = graph.layers
    names = [f"past.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    paths = {"prefill": folder / "prefill.onnx", "decode": folder / "decode.onnx"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # prefill: traced on a multi-token prompt, so the causal mask is part of the graph
        torch.onnx.export(graph, (_prompt(model.config.vocab_size, prefill),), str(paths["prefill"]),
                          input_names=["input_ids"], output_names=["logits", *present], dynamo=False,
                          opset_version=17)
        past = tuple(torch.zeros(kv_shape(model, prefill)) for _ in names)
        torch.onnx.export(graph, (_prompt(model.config.vocab_size, 1), *past), str(paths["decode"]),
                          input_names=["input_ids", *names], output_names=["logits", *present],
                          dynamic_axes={k: {2: "past"} for k in names + present}, dynamo=False, opset_version=17)
    return paths


def _ort_runner(paths: dict[str, Path], prompt: torch.Tensor, decode: int, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    pre = ort.InferenceSession(str(paths["prefill"]), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(paths["decode"]), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in dec.get_inputs()][1:]
    ids = prompt.numpy()

    def prefill():
        return pre.run(None, {"input_ids": ids})

    first = prefill()

    def steps() -> float:
        out = pre.run(None, {"input_ids": ids})
        start = time.perf_counter()
        for _ in range(decode):
            tok = out[0][:, -1:].argmax(-1).astype(ids.dtype)
            out = dec.run(None, {"input_ids": tok, **dict(zip(names, out[1:]))})
        return time.perf_counter() - start

    return prefill, steps, torch.from_numpy(first[0][0, -1]).float()


def _deepsparse(paths: dict[str, Path], prompt: torch.Tensor, decode: int, repeats: int,
                threads: int | None) -> dict:
    python = os.environ.get(DEEPSPARSE_ENV)
    if not python or not Path(python).exists():
        return {"available": False, "reason": f"${DEEPSPARSE_ENV} does not name a Python with deepsparse==1.8.0"}
    job = {"prefill": str(paths["prefill"]), "decode_graph": str(paths["decode"]), "prompt": prompt.tolist(), "decode": decode, "repeats": repeats,
           "threads": threads}
    runner = Path(__file__).with_name("deepsparse_runner.py")
    proc = subprocess.run([python, str(runner)], input=json.dumps(job), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"available": False, "reason": f"deepsparse failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return {"available": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------------------------- the measurement


def measure(model: nn.Module, dense: nn.Module | None = None, *, prefill: int = 512, decode: int = 16,
            repeats: int = 3, engines: Sequence[str] = ("torch", "csr", "onnxruntime"), threads: int | None = None,
            workdir: str | Path | None = None) -> dict:
    """Prefill and decode latency of ``model`` (and of its ``dense`` original) on each engine, in one process.

    Returns ``{"engines": {engine: {"prefill_ms", "decode_ms", "max_abs_diff"}}, "dense": {...}, "speedup": ...}``:

    - ``engines``: the model on every engine (``max_abs_diff``: its last-token logits against torch's);
    - ``dense``: the dense model on every engine but ``csr`` (a dense matrix in CSR means nothing);
    - ``speedup[engine]``: ``{"prefill", "decode"}`` = the dense model's latency on the same engine (``csr``: on
      torch) over the model's: what the sparsity buys on that engine (without ``dense``: torch's latency of the model
      itself, which equals the dense model's: dense kernels ignore zeros);
    - ``speedup_vs_torch[engine]``: dense torch over the model on the engine: the best way to run it here.

    An engine that cannot run reports ``{"available": False, "reason": ...}``.
    """
    if prefill < 1 or decode < 1 or repeats < 1:
        raise ValueError(f"need prefill, decode, repeats >= 1, got {prefill}, {decode}, {repeats}")
    if unknown := sorted(set(engines) - set(ENGINES)):
        raise ValueError(f"unknown engine(s) {unknown}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prefill + decode + 1 > limit:
        raise ValueError(f"prefill + decode = {prefill + decode} exceeds the model's context of {limit} tokens")
    engines = ["torch"] + [e for e in engines if e != "torch"]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    prompt = _prompt(model.config.vocab_size, prefill)
    out: dict = {"prefill": prefill, "decode": decode, "repeats": repeats, "threads": threads or old_threads}
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            out["engines"] = _run(model, engines, prompt, decode, repeats, threads, Path(tmp) / "model")
            if dense is not None:
                out["dense"] = _run(dense, [e for e in engines if e not in DENSE_OF], prompt, decode, repeats,
                                    threads, Path(tmp) / "dense")
    finally:
        torch.set_num_threads(old_threads)
    base = out.get("dense", out["engines"])
    ok = {e: r for e, r in out["engines"].items() if r.get("available")}
    out["speedup"] = {e: _ratio(base[DENSE_OF.get(e, e)], r) for e, r in ok.items()
                      if base.get(DENSE_OF.get(e, e), {}).get("available")}
    out["speedup_vs_torch"] = {e: _ratio(base["torch"], r) for e, r in ok.items()}
    return out


def _ratio(slow: dict, fast: dict) -> dict[str, float]:
    return {"prefill": slow["prefill_ms"] / fast["prefill_ms"], "decode": slow["decode_ms"] / fast["decode_ms"]}


def _run(model: nn.Module, engines: list[str], prompt: torch.Tensor, decode: int, repeats: int, threads: int | None,
         folder: Path) -> dict:
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()  # the caller's model stays as it is
    model.eval()
    results, ref, paths = {}, None, None
    for engine in engines:
        if engine in ("onnxruntime", "deepsparse"):
            paths = paths or export_onnx(model, folder, prompt.shape[1])
        if engine == "deepsparse":
            results[engine] = _deepsparse(paths, prompt, decode, repeats, threads)
            if "logits" in results[engine]:
                results[engine]["max_abs_diff"] = float((torch.tensor(results[engine].pop("logits")) - ref).abs().max())
            continue
        if engine.startswith("cuda") and not torch.cuda.is_available():
            results[engine] = {"available": False, "reason": "needs a CUDA device"}
            continue
        if engine == "onnxruntime":
            pre, steps, logits = _ort_runner(paths, prompt, decode, threads)
        elif engine == "cuda":
            pre, steps, logits = _torch_runner(copy.deepcopy(model).half().cuda(), prompt, decode)
        elif engine == "cuda_2:4":
            try:
                m = semi_structured_model(model)
            except (ValueError, RuntimeError) as err:  # not 2:4, or a GPU without sparse tensor cores
                results[engine] = {"available": False, "reason": str(err)}
                continue
            pre, steps, logits = _torch_runner(m, prompt, decode)
        else:
            pre, steps, logits = _torch_runner(model if engine == "torch" else csr_model(model), prompt, decode)
        ref = logits if ref is None else ref
        prefill_ms = _median_ms(pre, repeats)
        decode_ms = _median_ms(steps, repeats) / decode
        results[engine] = {"available": True, "prefill_ms": prefill_ms, "decode_ms": decode_ms,
                           "max_abs_diff": float((logits - ref).abs().max())}
    return results
