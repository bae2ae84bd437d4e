"""Retention over grids: after a grid launch, and ``losa gc`` (see :mod:`tasks.retention` for the policy)."""

from __future__ import annotations

from collections.abc import Iterable

from flows import tracking
from flows.cell import cell_key, cell_spec, walk
from flows.spec import Grid
from tasks import retention
from tasks.store import ArtifactStore


def survey(grids: Iterable[Grid], store: ArtifactStore | None = None):
    """(finished: cell key -> record, pending: cell key -> cached prefix keys) over the cells of ``grids``.

    A cell finished before records existed (every stage cached, a finished MLflow run) gets its record here."""
    store = store or ArtifactStore()
    finished, pending = {}, {}
    for grid in grids:
        for cell in grid.cells():
            spec = cell_spec(cell, as_task=False)
            key = cell_key(spec)
            if key in finished or key in pending:
                continue
            if (record := retention.cell_record(store, key)) is not None:
                finished[key] = record
                continue
            stages, complete = walk(spec)
            run = tracking.find_cell_run(key) if complete else None
            if run is not None:
                finished[key] = retention.record_cell(store, key, stages.refs, run)
            else:
                pending[key] = [r.key for r in stages.refs]
    return finished, pending


def apply(grids: Iterable[Grid], retain: retention.Retain, dry_run: bool = False,
          orphans: bool = False) -> tuple[dict[str, int], int]:
    """Plan (and unless ``dry_run`` carry out) the retention policy over ``grids``: (dropped {key: bytes}, freed).
    ``orphans``: also drop every artifact no cell of ``grids`` reaches (:func:`tasks.retention.orphans`)."""
    store = ArtifactStore()
    finished, pending = survey(list(grids), store)
    drop = retention.plan(store, finished, pending, retain)
    if orphans:
        drop |= retention.orphans(store, finished, pending)
    return drop, (0 if dry_run else retention.collect(store, drop))


def store_bytes(store: ArtifactStore | None = None) -> int:
    store = store or ArtifactStore()
    return sum(store.size(k) for k in store.keys())
