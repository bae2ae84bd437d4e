"""Pruning speed and memory on one model, measured side by side in one run (issue: foundation, item 10).

Prints: the time of one dense calibration forward pass over all windows, the full-model prune time of Wanda and
SparseGPT (and magnitude), their ratios to that forward pass (targets: Wanda <= 2.5x, SparseGPT <= 4x), and the
working memory during pruning (peak RSS minus RSS before pruning) divided by the model's weight bytes.

    .venv/bin/python benchmarks/prune_speed.py [--model testbed/model] [--nsamples 128] [--seqlen 256]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "testbed" / "model"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    calib = data.calibration_windows(tok, args.nsamples, args.seqlen, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_forward_seconds(model, calib[: args.batch_size], args.batch_size)  # warm-up
    fwd = min(dense_forward_seconds(model, calib, args.batch_size) for _ in range(2))
    print(f"model {args.model}: {weight_bytes / 2**20:.1f} MiB of weights, {torch.get_num_threads()} threads")
    print(f"calibration: {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}")
    print(f"dense calibration forward pass: {fwd:.2f} s\n")
    print(f"{'method':<10} {'prune s':>8} {'x forward':>10} {'target':>7} {'extra peak MiB':>15} {'/ weights':>10}  stages (s)")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method, target in (("magnitude", None), ("wanda", 2.5), ("sparsegpt", 4.0)):
        model.load_state_dict(state)
        before = rss_mib("VmRSS")
        reset_peak()
        report = prune_model(model, calib, method, args.sparsity, batch_size=args.batch_size)
        extra = rss_mib("VmHWM") - before
        secs = report.timings["total"]
        stages = " ".join(f"{k}={v:.2f}" for k, v in report.timings.items() if k != "total")
        print(f"{method:<10} {secs:>8.2f} {secs / fwd:>9.2f}x {('<= %.1fx' % target) if target else '':>7} "
              f"{extra:>15.1f} {extra * 2**20 / weight_bytes:>9.2f}x  {stages}")


if __name__ == "__main__":
    main()
