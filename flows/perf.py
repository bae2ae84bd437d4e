"""The speed ratios the nightly regression watches, and their noise band (method.md §6).

Three ratios, each of two things measured side by side in one process, so machine speed cancels out:

* ``prune_over_floor``: a Wanda prune over its floor (two passes of the decoder blocks over the same calibration set);
* ``masked_step_over_full``: one optimiser step of the masked LoRA (dropout 0) over one step that fully fine-tunes
  the same linears, timed interleaved;
* ``decode_speedup.<engine>``: decode latency of the dense model over the 70 %-pruned model's on that engine
  (:func:`losa.speed.measure`; ``csr`` against dense torch).

:func:`measure` repeats them; :func:`band` turns repeats into a baseline with a noise band (mean ± max(3 sd, 5 %)).
Plain torch; no Prefect, no MLflow.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

RATIOS = ("prune_over_floor", "masked_step_over_full", "decode_speedup.csr", "decode_speedup.onnxruntime")
MIN_BAND = 0.05  # relative: a band narrower than this would flag ordinary machine noise


@torch.no_grad()
def block_pass_seconds(model, calib: torch.Tensor, batch_size: int) -> float:
    """One pass of every decoder block over the calibration set, batch by batch (no hooks, no lm_head): a layer-wise
    pruner's floor is two of them (statistics, then propagation)."""
    from losa.models import capture_first_block_inputs, embeddings_on, get_adapter, run_block

    blocks = get_adapter(model).get_blocks(model)
    dev = next(model.parameters()).device
    with embeddings_on(model, dev):
        inputs = [capture_first_block_inputs(model, calib[s : s + batch_size], dev)
                  for s in range(0, calib.shape[0], batch_size)]
    start = time.perf_counter()
    for hidden, kwargs in inputs:
        for block in blocks:
            hidden = run_block(block, hidden, kwargs)
    return time.perf_counter() - start


def step_seconds(model, opt, batch) -> float:
    """Wall time of one optimiser step (forward with labels, backward, step, zero_grad)."""
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def once(model_name: str = "testbed", nsamples: int = 16, seqlen: int = 128, batch_size: int = 8,
         train_steps: int = 6, prefill: int = 128, decode: int = 16, repeats: int = 7) -> dict[str, float]:
    """Every ratio of :data:`RATIOS`, measured once."""
    from losa import data, load_model, prune_model
    from losa.adapter import make_masked_lora
    from losa.models import get_adapter
    from losa.speed import measure as speed

    model, tok = load_model(model_name)
    dense = copy.deepcopy(model)
    calib = data.calibration_windows(tok, nsamples, seqlen, seed=0)
    block_pass_seconds(model, calib[:batch_size], batch_size)  # warm-up
    floor = 2 * min(block_pass_seconds(model, calib, batch_size) for _ in range(2))
    report = prune_model(model, calib, "wanda", 0.7, batch_size=batch_size, reconstruction_error=False,
                         progress=False)
    out = {"prune_over_floor": report.timings["total"] / floor}

    full = copy.deepcopy(model)
    for p in full.parameters():
        p.requires_grad_(False)
    for _, _, lin in get_adapter(full).iter_linears(full):
        lin.weight.requires_grad_(True)
    torch.manual_seed(0)
    masked = make_masked_lora(copy.deepcopy(model), r_max=8, alpha=16, dropout=0.0)
    models = {"full": full.train(), "masked": masked.train()}
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for k, m in models.items()}
    stream = torch.randint(0, len(tok), (50_000,), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(train_steps + 1):
        batch = data.lm_batch(stream, seqlen, 4, 0, step)
        for k in (models if step % 2 else reversed(list(models))):  # interleaved: noise hits both alike
            t = step_seconds(models[k], opts[k], batch)
            if step:  # the first step warms up
                times[k].append(t)
    out["masked_step_over_full"] = statistics.median(times["masked"]) / statistics.median(times["full"])

    s = speed(model, dense, prefill=prefill, decode=decode, repeats=repeats, engines=("torch", "csr", "onnxruntime"))
    out.update({f"decode_speedup.{e}": r["decode"] for e, r in s["speedup"].items() if e != "torch"})
    return out


def measure(repeats: int = 3, **kwargs) -> dict[str, list[float]]:
    """:func:`once` ``repeats`` times: every ratio's values."""
    runs = [once(**kwargs) for _ in range(repeats)]
    return {k: [r[k] for r in runs if k in r] for k in RATIOS}


def band(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """A baseline from repeated values: per ratio its mean, sd and the half-width of its band."""
    out = {}
    for k, v in values.items():
        if not v:
            continue
        mean = statistics.fmean(v)
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        out[k] = {"mean": mean, "sd": sd, "band": max(3 * sd, MIN_BAND * abs(mean)), "n": len(v)}
    return out


def compare(now: dict[str, float], baseline: dict[str, dict[str, float]]) -> list[dict]:
    """Ratios outside their baseline band (``now``: one measurement per ratio)."""
    moved = []
    for k, b in baseline.items():
        got = now.get(k)
        if got is None or abs(got - b["mean"]) > b["band"]:
            moved.append({"ratio": k, "baseline": b["mean"], "band": b["band"], "now": got})
    return moved


def write_baseline(path: Path, repeats: int = 3, **kwargs) -> dict:
    """Measure ``repeats`` times and write the banded baseline to ``path`` (JSON)."""
    values = measure(repeats, **kwargs)
    data = {"ratios": band(values), "values": values, "settings": kwargs, "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data
