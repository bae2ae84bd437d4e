"""``losa export <grid> <cell>``: a finished cell's final model out of the artifact store, as a Hugging Face folder
and as the compact sparse form (:mod:`losa.export`, method.md §6), with their sizes and a round-trip check."""

from __future__ import annotations

from pathlib import Path

from flows.spec import Grid


class NotFinished(LookupError):
    """The cell has no finished record whose final model is still stored."""


def final_model(grid: Grid, cell_id: str):
    """(cell spec, live model, tokenizer) of a finished cell's final model: its merged weights (``lora``/``losa``),
    pruned weights (``pruned``) or the dense model (``dense``)."""
    from flows.cell import cell_key, cell_spec
    from tasks import retention
    from tasks.stages import load_state
    from tasks.store import ArtifactStore

    cell = grid.cell(cell_id)
    spec = cell_spec(cell, as_task=False)
    store = ArtifactStore()
    record = retention.done(store, cell_key(spec))
    if record is None:
        raise NotFinished(f"cell {cell_id} ({cell.describe()}) of grid {grid.name} has not finished here (or its "
                          f"final model was removed): run `losa grid {grid.name}` first")
    final = store.get(record.info["final"]) if record.info["final"] is not None else None
    model, tokenizer = load_state(spec, final)
    return spec, model, tokenizer


def export_cell(grid: Grid, cell_id: str, out: Path, dtype: str = "float16", check: bool = True) -> dict:
    """Write ``out/hf`` (safetensors, ``from_pretrained`` loads it) and ``out/sparse`` (sparse-bitmask), check that
    the sparse form restores the HF folder's weights bit for bit (and, with ``check``, the HF folder's perplexity
    against the cell's), and return the byte counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from losa import export, stages

    spec, model, tokenizer = final_model(grid, cell_id)
    out = Path(out)
    export.save_hf(model, tokenizer, out / "hf", dtype)
    meta = export.save_sparse(model, tokenizer, out / "sparse", dtype)
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=export.DTYPES[dtype])
    restored, _ = export.load_sparse(out / "sparse")
    ref = hf.state_dict()
    mismatched = [k for k, v in restored.state_dict().items() if not torch.equal(v, ref[k])]
    if mismatched:
        raise RuntimeError(f"the sparse form does not restore the exported weights: {mismatched[:5]}")
    files = {"hf": _bytes(out / "hf", "*.safetensors"), "sparse": _bytes(out / "sparse", "*.safetensors")}
    result = {**meta, "files": files, "file_ratio": files["sparse"] / files["hf"], "round_trip": "bit-exact"}
    if check:
        result["ppl_exported"] = stages.perplexity(hf.float(), tokenizer, spec.config, progress=False)
        result["ppl_cell"] = stages.perplexity(model, tokenizer, spec.config, progress=False)
    return result


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))
