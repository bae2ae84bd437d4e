"""What a grid stores: the disk formulas (flows.preflight.cell_disk, cell_peak) against the bytes each finished cell
wrote and the most it held at once, the store's total written and kept after retention, and the formulas' figures
for a LLaMA-2-7B cell.

Reads the state folder of a grid that has run (``losa grid <grid>``): every finished cell's record lists the keys
of the stages it read or wrote, the store's logs the bytes each artifact had when written (``computed.jsonl``) and
when spilled (``spilled.jsonl``), so a cell's peak is replayed from them.

    .venv/bin/python benchmarks/store_size.py testbed [--out docs/store-size.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SNAPSHOTS = ("prune", "finetune", "lora", "merge", "finalize")


def llama2_7b():
    """LLaMA-2-7B's shape (its config.json: hidden 4096, FFN 11008, 32 layers and heads, vocab 32000, untied), fp16."""
    from transformers import LlamaConfig

    from flows.preflight import config_shape

    return config_shape(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                    max_position_embeddings=4096, tie_word_embeddings=False), dtype_bytes=2)


def final_bytes(shape, sparsity: float) -> float:
    """The final sparse model: the prunable linears in the compact form, the rest dense."""
    from flows.preflight import sparse_bytes

    return sparse_bytes(shape, sparsity) + (shape.params - shape.linear_params) * shape.dtype_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid")
    p.add_argument("--out", help="also write the report (markdown) here")
    args = p.parse_args()

    from flows.cell import cell_key, cell_spec
    from flows.preflight import cell_disk, cell_peak, model_shape
    from flows.spec import load_grid
    from losa.config import LosaConfig
    from tasks import retention
    from tasks.store import ArtifactStore

    grid, store = load_grid(args.grid), ArtifactStore()
    computed = store.computed()
    wrote = {c["key"]: (c["stage"], c.get("bytes", 0)) for c in computed if not c.get("recomputed")}
    spilled = store.spilled()
    # (time, key, bytes) of every write (recomputations of spilled artifacts too) and every spill (negative)
    events = sorted([(c["time"], c["key"], c.get("bytes", 0)) for c in computed if c["stage"] in SNAPSHOTS]
                    + [(x["time"], x["key"], -x["bytes"]) for x in spilled])
    lines = [f"# What the `{grid.name}` grid stores", "",
             f"<!-- generated: .venv/bin/losa grid {args.grid}, then "
             f".venv/bin/python benchmarks/store_size.py {args.grid} --out <this file> -->", "",
             "Per finished cell: `flows.preflight.cell_disk` (the formula) against the bytes its prune, fine-tuning, "
             "merge and final artifacts had when written (artifacts shared with another cell counted for each), and "
             "`cell_peak` against the most of them the store held at once (replayed from its write and spill logs: "
             "a SparseGPT LoSA cell spills each step's weights before the next are written).", "",
             "| cell | formula (MiB) | written (MiB) | formula / written | peak formula (MiB) | peak (MiB) | "
             "peak formula / peak |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    worst, worst_peak, reached = 0.0, 0.0, set()
    for cell in grid.cells():
        spec = cell_spec(cell, as_task=False)
        record = retention.cell_record(store, cell_key(spec))
        if record is None or cell.config.method == "dense":
            continue
        reached |= set(record.info["stages"])
        written = sum(wrote[k][1] for k in record.info["stages"] if k in wrote and wrote[k][0] in SNAPSHOTS)
        shape = model_shape(spec.model)
        formula, formula_peak = cell_disk(shape, spec.config), cell_peak(shape, spec.config, grid.retain != "all")
        peak = _peak(events, set(record.info["stages"]), until=store.manifest(record.key)["created"])
        worst = max(worst, abs(formula / written - 1))
        worst_peak = max(worst_peak, abs(formula_peak / peak - 1))
        lines.append(f"| {cell.describe()} | {formula / 2**20:.2f} | {written / 2**20:.2f} | {formula / written:.3f} "
                     f"| {formula_peak / 2**20:.2f} | {peak / 2**20:.2f} | {formula_peak / peak:.3f} |")
    total = sum(wrote[k][1] for k in reached if k in wrote)
    kept = sum(store.size(k) for k in store.closure(reached) if store.get(k) is not None)
    lines += ["", f"Largest formula error: {worst:.1%} (written), {worst_peak:.1%} (peak).", "",
              f"Store: {total / 2**20:,.1f} MiB written by the stages of the grid's cells, "
              f"{kept / 2**20:,.1f} MiB of them kept after retention.", "",
              "## LLaMA-2-7B, fp16 (the formula)", "",
              "A cell's peak is everything it writes (retention drops intermediates once it has finished), except "
              "that a SparseGPT LoSA cell holds one step's full weights at a time (`retain: all` keeps them all).", "",
              "| cell | writes (GB) | peak (GB) | final sparse model (GB) | peak / final |",
              "| --- | ---: | ---: | ---: | ---: |"]
    shape = llama2_7b()
    for pruner in ("wanda", "sparsegpt"):
        for method in ("pruned", "lora", "losa"):
            cfg = LosaConfig(method=method, pruner=pruner, sparsity=0.7, steps=5)
            disk, peak, final = cell_disk(shape, cfg), cell_peak(shape, cfg), final_bytes(shape, 0.7)
            lines.append(f"| {method} {pruner} 70% T=5 | {disk / 1e9:.2f} | {peak / 1e9:.2f} | {final / 1e9:.2f} "
                         f"| {peak / final:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _peak(events, keys: set[str], until: float) -> int:
    """The most bytes the artifacts ``keys`` held at once until the cell finished (``until``: its record's time;
    retention's deletions after it are not logged), replaying the store's writes and spills in order."""
    held = peak = 0
    for time, key, delta in events:
        if key in keys and time <= until:
            held += delta
            peak = max(peak, held)
    return peak


if __name__ == "__main__":
    sys.exit(main())
