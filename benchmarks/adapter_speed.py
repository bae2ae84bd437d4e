"""One training step of the masked LoRA vs a plain peft LoRA at the same rank, side by side (LoSA issue).

Target: masked / plain <= 1.25x. Both adapters sit on the same pruned testbed, train on the same batches, and are
timed alternately (median of several steps after warm-up) so that machine noise hits both alike.

    .venv/bin/python benchmarks/adapter_speed.py [--model testbed/model] [--rank 8] [--batch 8] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from losa import data, load_model, prune_model
from losa.adapter import make_masked_lora
from flows.perf import step_seconds
from losa.models import get_adapter

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "testbed" / "model"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(args.model)
    prune_model(model, data.calibration_windows(tok, 32, args.seqlen), "wanda", 0.5, batch_size=16)
    ad = get_adapter(model)
    targets = [f"{ad.blocks}.{b}.{n}" for b, n, _ in ad.iter_linears(model)]
    torch.manual_seed(0)
    plain = get_peft_model(copy.deepcopy(model), LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.1,
                                                            target_modules=targets))
    masked = make_masked_lora(copy.deepcopy(model), r_max=args.rank, alpha=16, dropout=0.1)
    models = {"plain": plain, "masked": masked}
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-4) for k, m in models.items()}
    stream = torch.randint(0, len(tok), (200_000,), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    for step in range(args.steps + 2):
        batch = data.lm_batch(stream, args.seqlen, args.batch, 0, step)
        for k in ("plain", "masked") if step % 2 else ("masked", "plain"):
            s = step_seconds(models[k].train(), opts[k], batch)
            if step >= 2:  # warm-up
                times[k].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}: rank {args.rank}, batch {args.batch} x {args.seqlen}, {torch.get_num_threads()} threads")
    for k in ("plain", "masked"):
        print(f"  {k:<7} LoRA step: median {med[k]:.3f} s over {len(times[k])} steps")
    print(f"  masked / plain = {med['masked'] / med['plain']:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    main()
