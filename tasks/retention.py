"""What the artifact store keeps after a cell finishes, and ``losa gc``.

A finished cell leaves a *cell record* in the store (stage ``cell``, info only): the keys of every stage it read
or wrote, its final model's key (the pruned weights for ``pruned``, the merged weights for ``lora``/``losa``; none for
``dense``) and its MLflow run. The record is what makes a cell "done", so its intermediates can go:

* ``all``: keep everything (nothing is spilled either);
* ``shared`` (default): drop a finished cell's intermediate snapshots (pruned, fine-tuned, merged states of steps
  before the last) unless another cell also uses them (a shared prefix, e.g. LoSA's step 1 and −SRA's) or a cell
  that has not finished needs them; while a LoSA cell runs, its SparseGPT prunes are spilled step by step
  (:meth:`tasks.store.ArtifactStore.spill`), so it holds one step's full weights at a time;
* ``final``: drop every intermediate snapshot of finished cells that no unfinished cell needs, shared or not.

Kept always: each cell's final model (with the states a final stored as a recipe is rebuilt from), and the stages that are small or the roots of many cells (calibration windows,
training tokens, dense outputs, LSR's info, perplexities). A dropped snapshot is only recomputation later: its stage
runs again, deterministically, if a new cell asks for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Literal

from .store import ArtifactStore, Ref, digest

Retain = Literal["all", "shared", "final"]
RETAIN: tuple[str, ...] = ("all", "shared", "final")
CELL_STAGE = "cell"
SNAPSHOT_STAGES = frozenset({"prune", "finetune", "lora", "merge", "finalize"})  # full model states: the bulk


def record_key(cell_key: str) -> str:
    return digest({"stage": CELL_STAGE, "cell": cell_key})


def final_key(refs: Iterable[Ref]) -> str | None:
    """The cell's final model among the stages it ran, in order: the last finalize, else the last prune."""
    refs = list(refs)
    for stage in ("finalize", "prune"):
        if hits := [r.key for r in refs if r.stage == stage]:
            return hits[-1]
    return None


def record_cell(store: ArtifactStore, cell_key: str, refs: Iterable[Ref], run_id: str | None) -> Ref:
    """Write the record of a finished cell (kept if one exists: a cell has one record, whoever finished it)."""
    if (existing := cell_record(store, cell_key)) is not None:
        return existing
    refs = list(refs)
    keys = list(dict.fromkeys(r.key for r in refs if r.stage != "model"))
    return store.put(CELL_STAGE, record_key(cell_key), {"cell_key": cell_key, "stages": keys,
                                                         "final": final_key(refs), "run_id": run_id})


def cell_record(store: ArtifactStore, cell_key: str) -> Ref | None:
    return store.get(record_key(cell_key))


def done(store: ArtifactStore, cell_key: str) -> Ref | None:
    """The record of a finished cell whose final model is still in the store (None: not finished, or its final model
    was lost and the cell has to run again)."""
    record = cell_record(store, cell_key)
    final = record.info["final"] if record is not None else None
    if record is None or (final is not None and any(store.get(k) is None for k in store.closure([final]))):
        return None
    return record


def plan(store: ArtifactStore, finished: Mapping[str, Ref], pending: Mapping[str, list[str]],
         retain: Retain = "shared") -> dict[str, int]:
    """Artifacts to delete ({key: bytes}) under ``retain``.

    ``finished``: cell key -> its record; ``pending``: cell key -> the store keys an unfinished cell has already
    reached (its cached prefix)."""
    if retain not in RETAIN:
        raise ValueError(f"retain must be one of {', '.join(RETAIN)}, not {retain!r}")
    if retain == "all":
        return {}
    uses = Counter(k for rec in finished.values() for k in rec.info["stages"])
    uses.update(k for keys in pending.values() for k in set(keys))
    # a final model stored as a recipe (a plain-LoRA merge) keeps what it is rebuilt from
    # and what an unfinished cell has reached keeps what rebuilding it reads (a spilled prune: its recipe's inputs)
    keep = store.closure([rec.info["final"] for rec in finished.values() if rec.info["final"] is not None]
                         + [k for keys in pending.values() for k in keys])
    drop = {}
    for rec in finished.values():
        for key in rec.info["stages"]:
            if key in keep or key in drop:
                continue
            manifest = store.manifest(key)
            if manifest is None or manifest["stage"] not in SNAPSHOT_STAGES:
                continue
            # a spilled snapshot holds nothing to share: a cell that needs it recomputes it either way
            if retain == "shared" and uses[key] > 1 and "spilled" not in manifest:
                continue
            drop[key] = store.size(key)
    return drop


def orphans(store: ArtifactStore, finished: Mapping[str, Ref], pending: Mapping[str, list[str]]) -> dict[str, int]:
    """Artifacts no cell of the surveyed grids reaches ({key: bytes}): neither a finished cell's record, stages or
    final (with what it is rebuilt from) nor an unfinished cell's cached prefix. E.g. everything stored under an
    earlier stage version or library version (their keys moved), or by grids that no longer exist."""
    reached = {record_key(k) for k in finished} | {k for rec in finished.values() for k in rec.info["stages"]}
    reached |= {k for keys in pending.values() for k in keys}
    reached = store.closure(reached | {rec.info["final"] for rec in finished.values() if rec.info["final"]})
    return {key: store.size(key) for key in store.keys() if key not in reached}


def collect(store: ArtifactStore, drop: Mapping[str, int]) -> int:
    """Delete the planned artifacts; bytes freed."""
    for key in drop:
        store.delete(key)
    return sum(drop.values())
