"""Issue-3 result table on one model: pruned only, + LoRA (unmerged / merged, post-merge sparsity), + LoSA and its
three ablations, per pruner and sparsity, at a stated CPU budget. Prints a Markdown table; cells run one by one on
fresh copies of the model (a stopgap until the Prefect grid caches shared stages).

    .venv/bin/python benchmarks/losa_table.py --sparsities 0.5,0.6,0.7 --pruners wanda,sparsegpt --eval-windows 300
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


from losa import data, load_model, run_losa
from losa.config import LosaConfig
from losa.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("pruned", ()), ("lora", ()), ("losa", ()), ("losa", ("lsr",)), ("losa", ("sra",)), ("losa", ("dsa",))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "testbed" / "model"))
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--pruners", default="wanda,sparsegpt")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--final-train-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / ".state" / "losa_table.jsonl"))
    args = p.parse_args()

    model, tok = load_model(args.model)
    text = data.wikitext2_test_text()
    calib = data.calibration_windows(tok, 128, 256, seed=0)
    budget = dict(steps=args.steps, train_steps=args.train_steps, final_train_steps=args.final_train_steps,
                  finetune=FinetuneConfig(batch_size=args.batch_size), eval_windows=args.eval_windows)
    dense = run_losa(copy.deepcopy(model), tok, LosaConfig(method="dense", **budget), eval_text=text, progress=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"dense: {dense.ppl:.2f}", "",
             "| pruner | sparsity | method | ppl | ppl unmerged | sparsity after merge | trainable | s |",
             "|---|---|---|---|---|---|---|---|"]
    for pruner in args.pruners.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            for method, ablate in ROWS:
                cfg = LosaConfig(method=method, ablate=ablate, pruner=pruner, sparsity=s, **budget)
                t = time.time()
                rep = run_losa(copy.deepcopy(model), tok, cfg, calibration=calib, eval_text=text, progress=False)
                name = method if not ablate else f"losa -{ablate[0].upper()}"
                unmerged = f"{rep.ppl_unmerged:.2f}" if rep.ppl_unmerged is not None else ""
                row = f"| {pruner} | {s:.0%} | {name} | {rep.ppl:.2f} | {unmerged} | {rep.sparsity:.4f} | " \
                      f"{rep.trainable_params:,} | {time.time() - t:.0f} |"
                print(row, flush=True)
                lines.append(row)
                with out.open("a") as f:
                    f.write(json.dumps({"cell": cfg.model_dump(mode="json"), "report": rep.to_dict()}) + "\n")
    budget_line = (f"budget: T={args.steps}, {args.train_steps} optimiser steps per step 1..T-1 and "
                   f"{args.final_train_steps} at T (same total for every method), batch {args.batch_size} x 256 "
                   f"tokens of C4; eval {'all' if args.eval_windows is None else args.eval_windows} windows of 256")
    print("\n" + budget_line + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
