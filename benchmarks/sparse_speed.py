"""Size and speed of a finished sparse cell against its dense model, every engine side by side in one run.

Takes a finished cell's final (merged) model out of the artifact store (``losa grid`` first), its dense model, and
prints (and writes as Markdown with ``--out``):

* bytes on disk: the Hugging Face folder (safetensors) and the sparse-bitmask form, in fp16 (``losa export``);
* prefill (``--prefill`` tokens) and single-token decode latency of both models on dense torch, torch CSR, ONNX Runtime
  and DeepSparse (when ``$LOSA_DEEPSPARSE_PYTHON`` names a Python with ``deepsparse==1.8.0``; ``--deepsparse-env``
  creates one), and the speed-ups (dense latency on the engine / sparse latency; CSR against dense torch).

    .venv/bin/python benchmarks/sparse_speed.py smollm2-table1-ppl --method losa --pruner wanda --sparsity 0.7 \\
        --out docs/smollm2-speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.export import export_cell, final_model  # noqa: E402
from flows.spec import load_grid  # noqa: E402
from losa.speed import DEEPSPARSE_ENV, DENSE_OF, measure  # noqa: E402
from tasks.state import state_dir  # noqa: E402


def deepsparse_env() -> Path:
    """A virtual environment with DeepSparse 1.8.0 (the last release with code; it needs onnx < 1.15 and numpy 1.x,
    so it cannot share losa's environment) under the state folder; created on first use."""
    env = state_dir() / "deepsparse-env"
    python = env / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3.11", "-m", "venv", str(env)], check=True)  # deepsparse 1.8.0 has cp311 wheels
        subprocess.run([str(python), "-m", "pip", "install", "-q", "deepsparse==1.8.0", "numpy<2", "onnx<1.15"],
                       check=True)
    return python


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid")
    p.add_argument("--method", default="losa")
    p.add_argument("--pruner", default="wanda")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--deepsparse-env", action="store_true", help="create the DeepSparse environment if missing")
    p.add_argument("--out", default=None, help="also write the tables as Markdown here")
    args = p.parse_args()

    if args.deepsparse_env:
        os.environ[DEEPSPARSE_ENV] = str(deepsparse_env())
    elif DEEPSPARSE_ENV not in os.environ and (state_dir() / "deepsparse-env" / "bin" / "python").exists():
        os.environ[DEEPSPARSE_ENV] = str(state_dir() / "deepsparse-env" / "bin" / "python")
    grid = load_grid(args.grid)
    cell = next(c for c in grid.cells() if (c.config.method, c.config.pruner, c.config.pattern) ==
                (args.method, args.pruner, "unstructured") and abs(c.config.sparsity - args.sparsity) < 1e-9)
    dense_cell = next(c for c in grid.cells() if c.config.method == "dense")
    with tempfile.TemporaryDirectory(dir=state_dir()) as tmp:
        sizes = export_cell(grid, cell.id, Path(tmp), "float16", check=False)
    _, sparse, _ = final_model(grid, cell.id)
    _, dense, _ = final_model(grid, dense_cell.id)
    r = measure(sparse, dense, prefill=args.prefill, decode=args.decode, repeats=args.repeats,
                engines=("torch", "csr", "onnxruntime", "deepsparse", "cuda", "cuda_2:4"))

    lines = [f"# Size and speed: {cell.run_name} vs dense", "",
             f"Cell {cell.id} of grid `{grid.name}`; regenerate with `{' '.join(['python', *sys.argv])}`.", "",
             "## Bytes on disk (fp16)", "", "| form | bytes | × dense |", "|---|---:|---:|",
             f"| Hugging Face folder (safetensors) | {sizes['files']['hf']:,} | 1.000 |",
             f"| sparse-bitmask form | {sizes['files']['sparse']:,} | {sizes['file_ratio']:.3f} |",
             f"| prunable linears only, dense | {sizes['bytes_dense_prunable']:,} | 1.000 |",
             f"| prunable linears only, sparse-bitmask | {sizes['bytes_sparse_prunable']:,} | "
             f"{sizes['ratio_prunable']:.3f} |", "",
             f"Zeros in the prunable linears: {sizes['sparsity_config']['global_sparsity'] * 100:.2f} %; the sparse form "
             "restores the weights bit for bit.", "",
             f"## Latency (batch 1, prefill {args.prefill} tokens, decode: mean of {args.decode} tokens after it; "
             f"median of {args.repeats}; {r['threads']} threads)", "",
             "| engine | dense prefill ms | sparse prefill ms | dense decode ms | sparse decode ms | prefill × | decode × "
             "| decode × vs dense torch | max abs logit diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e, s in r["engines"].items():
        d = r["dense"].get(DENSE_OF.get(e, e), {})
        if not s.get("available"):
            lines.append(f"| {e} | not available: {s.get('reason')} ||||||||")
            continue
        sp, vs = r["speedup"].get(e, {}), r["speedup_vs_torch"].get(e, {})
        lines.append(f"| {e} | {d.get('prefill_ms', float('nan')):.1f}{f' ({DENSE_OF[e]})' if e in DENSE_OF else ''} | "
                     f"{s['prefill_ms']:.1f} | {d.get('decode_ms', float('nan')):.2f} | {s['decode_ms']:.2f} | "
                     f"{sp.get('prefill', float('nan')):.2f} | {sp.get('decode', float('nan')):.2f} | "
                     f"{vs.get('decode', float('nan')):.2f} | {s['max_abs_diff']:.1e} |")
    lines += ["", "× = dense latency / sparse latency on the same engine (CSR: against dense torch); above 1 the sparse "
              "model is faster, below 1 slower.", ""]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"sizes": sizes, "speed": r}, default=str)[:2000])
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
