"""Pruning speed and memory on one model, measured side by side in one run (issue: foundation, item 10).

Prints, per method measured in its own process: the time of one dense calibration forward pass over all windows, the full-model prune time of Wanda and
SparseGPT (and magnitude), their ratios to that forward pass (targets: Wanda <= 2.5x, SparseGPT <= 4x), and the
working memory during pruning (peak RSS minus RSS just before pruning, with model and calibration data loaded) divided
by the model's weight bytes.

    .venv/bin/python benchmarks/prune_speed.py [--model testbed/model] [--nsamples 128] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from losa import data, load_model, prune_model

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:  # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@torch.no_grad()
def dense_forward_seconds(model, calib: torch.Tensor, batch_size: int) -> float:
    t = time.perf_counter()
    for start in range(0, calib.shape[0], batch_size):
        model(input_ids=calib[start : start + batch_size], use_cache=False)
    return time.perf_counter() - t


def measure(args) -> dict:
    """One method in this (fresh) process: forward-pass time, prune time, working memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    calib = data.calibration_windows(tok, args.nsamples, args.seqlen, seed=0)
    dense_forward_seconds(model, calib[: args.batch_size], args.batch_size)  # warm-up
    fwd = min(dense_forward_seconds(model, calib, args.batch_size) for _ in range(2))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = rss_mib("VmRSS")
    reset_peak()
    report = prune_model(model, calib, args.only, args.sparsity, batch_size=args.batch_size,
                         reconstruction_error=not args.no_errors)
    return {"forward": fwd, "prune": report.timings["total"], "timings": report.timings,
            "extra_mib": rss_mib("VmHWM") - before, "weight_bytes": weight_bytes, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "testbed" / "model"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-errors", action="store_true", help="skip the reconstruction errors (the papers' 2 passes)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = p.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure(args)))
        return

    # each method in a fresh process, so that one's freed memory does not hide or inflate another's peak
    print(f"model {args.model}; calibration {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}; "
          + ("no reconstruction errors (2 block passes)" if args.no_errors else
             "with per-block reconstruction errors against the dense outputs (3 block passes)"))
    print(f"{'method':<10} {'forward s':>9} {'prune s':>8} {'x forward':>10} {'target':>8} {'extra peak MiB':>15} "
          f"{'/ weights':>10}  stages (s)")
    for method, target in (("magnitude", None), ("wanda", 2.5), ("sparsegpt", 4.0)):
        cmd = [sys.executable, __file__, "--only", method, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        stages = " ".join(f"{k}={v:.2f}" for k, v in r["timings"].items() if k != "total")
        print(f"{method:<10} {r['forward']:>9.2f} {r['prune']:>8.2f} {r['prune'] / r['forward']:>9.2f}x "
              f"{('<= %.1fx' % target) if target else '':>8} {r['extra_mib']:>15.1f} "
              f"{r['extra_mib'] * 2**20 / r['weight_bytes']:>9.2f}x  {stages}")
    print(f"(weights {r['weight_bytes'] / 2**20:.1f} MiB; {r['threads']} threads; the forward pass is timed in the "
          "same process just before pruning)")


if __name__ == "__main__":
    main()
