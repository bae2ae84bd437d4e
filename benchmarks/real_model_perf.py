"""Pruning and fine-tuning cost on the real model against their floors, side by side in one run (real-model issue).

Every figure is a ratio of two things measured in the same run on the same machine:

* pruning (each pruner in a fresh process): full prune time / the floor, two passes of the decoder blocks over the
  same calibration set (the statistics pass and the propagation pass every layer-wise pruner needs); targets Wanda
  <= 1.1x, SparseGPT <= 1.5x. Shown for the papers' two passes (``reconstruction_error=False``) and for the
  pipeline's default, which also measures each block's reconstruction error against its dense output (one more
  block pass when no reference outputs are given). Peak memory while pruning against weights + one block's
  activations (target <= 1.2x of that).
* fine-tuning: one optimiser step of the masked LoRA (LoSA's adapter, rank 8) against its floor, a step that fully
  fine-tunes the same linears (the masked update M ⊙ BA needs the full weight gradient, the same matmul work), at
  ``lora_dropout`` 0.1 (official) and 0; beside a plain peft LoRA step. Steps are timed interleaved (median after
  warm-up) so machine noise hits all alike. Optimizer state bytes and peak RSS of each (each in a fresh process).

    .venv/bin/python benchmarks/real_model_perf.py [--model smollm2-135m] [--nsamples 16] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from flows.perf import block_pass_seconds
from flows.perf import step_seconds as _step
from losa import data, load_model, prune_model
from losa.models import get_adapter
from prune_speed import reset_peak, rss_mib  # noqa: E402 - the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def measure_prune(args) -> dict:
    model, tok = load_model(args.model)
    calib = data.calibration_windows(tok, args.nsamples, args.seqlen, seed=0)
    block_pass_seconds(model, calib[: args.batch_size], args.batch_size)  # warm-up
    floor = 2 * min(block_pass_seconds(model, calib, args.batch_size) for _ in range(2))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    # one block's activations in the engine: its input and output hidden states for the whole calibration set
    # (fp32), and the widest intermediate (the MLP's) of one batch
    acts = 2 * calib.numel() * cfg.hidden_size * 4 + args.batch_size * args.seqlen * cfg.intermediate_size * 4 * 3
    before = rss_mib("VmRSS")
    reset_peak()
    report = prune_model(model, calib, args.only, args.sparsity, batch_size=args.batch_size,
                         reconstruction_error=args.errors)
    return {"floor": floor, "prune": report.timings["total"], "timings": report.timings,
            "extra_mib": rss_mib("VmHWM") - before, "rss_before_mib": before, "weight_bytes": weight_bytes,
            "activation_bytes": acts, "threads": torch.get_num_threads()}


def _full_ft(model):
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, lin in get_adapter(model).iter_linears(model):
        lin.weight.requires_grad_(True)
    return model


def _variants(model, kinds, rank):
    from peft import LoraConfig, get_peft_model

    from losa.adapter import make_masked_lora

    ad = get_adapter(model)
    targets = [f"{ad.blocks}.{b}.{n}" for b, n, _ in ad.iter_linears(model)]
    out = {}
    for kind in kinds:
        torch.manual_seed(0)
        m = copy.deepcopy(model) if len(kinds) > 1 else model
        if kind == "full":
            out[kind] = _full_ft(m)
        elif kind.startswith("masked"):
            out[kind] = make_masked_lora(m, r_max=rank, alpha=16, dropout=0.1 if kind == "masked" else 0.0)
        else:
            out[kind] = get_peft_model(m, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.1, target_modules=targets))
    return out


def saved_for_backward(model, batch) -> dict:
    """What one forward keeps alive for backward: bytes of the unique storages autograd saves (weights, buffers and
    masks excluded: they live anyway), and the logits."""
    seen: dict[int, int] = {}
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch, labels=batch)
    logits = out.logits.numel() * out.logits.element_size()
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": sum(seen.values()), "logits_bytes": logits}


def _state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def measure_steps(args, kinds) -> dict:
    """Interleaved step times (median after warm-up) of the given kinds; optimizer state and peak RSS when one."""
    model, tok = load_model(args.model)
    prune_model(model, data.calibration_windows(tok, args.nsamples, args.seqlen), "wanda", 0.7,
                batch_size=args.batch_size, reconstruction_error=False)
    before = rss_mib("VmRSS")
    reset_peak()
    models = _variants(model, kinds, args.rank)
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for k, m in models.items()}
    stream = torch.randint(0, len(tok), (200_000,), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    for step in range(args.steps + 1):
        batch = data.lm_batch(stream, args.train_seqlen, args.train_batch, 0, step)
        order = list(models) if step % 2 else list(reversed(models))
        for k in order:
            s = _step(models[k].train(), opts[k], batch)
            if step >= 1:  # the first step is warm-up
                times[k].append(s)
    out = {k: {"median": statistics.median(v), "times": v, "state_bytes": _state_bytes(opts[k]),
               "trainable": sum(p.numel() for p in models[k].parameters() if p.requires_grad)}
           for k, v in times.items()} | {"extra_mib": rss_mib("VmHWM") - before}
    if len(models) == 1:
        (only,) = models.values()
        out |= saved_for_backward(only.train(), data.lm_batch(stream, args.train_seqlen, args.train_batch, 0, 0))
    return out


def _child(args_list) -> dict:
    out = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seqlen", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed optimiser steps per kind (after one warm-up)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one measurement, print JSON
    p.add_argument("--errors", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kinds", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure_prune(args)))
        return
    if args.kinds:
        print("RESULT " + json.dumps(measure_steps(args, args.kinds.split(","))))
        return
    common = [a for a in sys.argv[1:]]
    print(f"model {args.model}; calibration {args.nsamples} x {args.seqlen}, batch {args.batch_size}; "
          f"{torch.get_num_threads()} threads")

    print("\npruning (each in a fresh process; floor = 2 block passes over the calibration set, same process)")
    print(f"{'pruner':<10} {'passes':<24} {'floor s':>8} {'prune s':>8} {'x floor':>8} {'target':>7} "
          f"{'peak MiB':>9} {'/ (weights+acts)':>17}  stages (s)")
    for method, target in (("wanda", 1.1), ("sparsegpt", 1.5)):
        for errors in (False, True):
            r = _child(["--only", method, *(["--errors"] if errors else []), *common])
            budget = r["weight_bytes"] + r["activation_bytes"]
            peak = r["rss_before_mib"] + r["extra_mib"]
            # the process also holds the interpreter, torch and the tokenizer: count the growth over the loaded
            # model (weights already resident) and compare weights + activations with it
            ratio = (r["weight_bytes"] + r["extra_mib"] * 2**20) / budget
            stages = " ".join(f"{k}={v:.1f}" for k, v in r["timings"].items() if k != "total")
            print(f"{method:<10} {'2 (papers)' if not errors else '3 (+ reconstruction errors)':<24} "
                  f"{r['floor']:>8.1f} {r['prune']:>8.1f} {r['prune'] / r['floor']:>7.2f}x {'<=%.1fx' % target:>7} "
                  f"{peak:>9.0f} {ratio:>16.2f}x  {stages}")
    print(f"(weights {r['weight_bytes'] / 2**20:.0f} MiB, one block's activations {r['activation_bytes'] / 2**20:.0f} "
          f"MiB; peak MiB = whole process RSS; the ratio counts weights + the growth while pruning)")

    print(f"\nfine-tuning steps, batch {args.train_batch} x {args.train_seqlen}, rank {args.rank}, "
          "interleaved in one process (medians), Wanda 70% model")
    r = _child(["--kinds", "full,masked0,masked,plain", *common])
    full = r["full"]["median"]
    names = {"full": "full fine-tuning of the same linears (floor)", "masked0": "masked LoRA, dropout 0",
             "masked": "masked LoRA, dropout 0.1 (official)", "plain": "plain peft LoRA, dropout 0.1"}
    print(f"{'step':<46} {'median s':>9} {'x floor':>8} {'optimizer state MiB':>20} {'trainable':>11}")
    for k in ("full", "masked0", "masked", "plain"):
        print(f"{names[k]:<46} {r[k]['median']:>9.2f} {r[k]['median'] / full:>7.2f}x "
              f"{r[k]['state_bytes'] / 2**20:>20.1f} {r[k]['trainable']:>11,}")
    print("targets: masked / floor <= 1.05x at dropout 0; optimizer state LoRA-sized")
    print("\npeak memory while fine-tuning (each alone in a fresh process; growth over the loaded pruned model) and "
          "what one forward keeps for backward")
    for k in ("masked", "plain", "full"):
        one = _child(["--kinds", k, "--steps", "1", *common])
        print(f"  {names[k]:<46} +{one['extra_mib']:.0f} MiB; saved for backward {one['saved_bytes'] / 2**20:.0f} MiB, "
              f"of which logits {one['logits_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
