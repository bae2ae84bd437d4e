"""Flows over a whole grid: ``losa-grid`` (run its cells), ``losa-tables`` (tables from MLflow), ``losa-regression``.

Cells run in this process one after another (``concurrency=1``), in a pool of worker processes
(``concurrency=N``; processes, not threads: torch's global RNG drives dropout, so cells in threads would not be
deterministic), or as ``losa-cell`` flow runs on a work pool (``dispatch="deployment"``), the way to spread a grid
over GPU machines. A failed cell does not stop the others; the grid then fails after writing what it has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect import tags as prefect_tags
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner

from flows import tracking
from flows.cell import cell_key, cell_spec, losa_cell
from flows.spec import GRIDS_DIR, Grid, load_grid
from tasks import retention
from tasks.store import state_dir


def outputs_dir(grid: str) -> Path:
    return state_dir() / "outputs" / grid


def _grid_ref(spec: Grid, grid: str) -> str:
    """What a cell flow needs to reload the grid: its shipped name, or the file path."""
    return spec.name if spec.path is not None and spec.path.parent == GRIDS_DIR else str(spec.path or grid)


@task(name="cell", cache_policy=NO_CACHE)
def cell_job(grid: str, cell_id: str, parent_run_id: str | None) -> dict:
    return losa_cell(grid, cell_id, parent_run_id)


@flow(name="losa-cells")
def _pooled(grid: str, cell_ids: list[str], parent_run_id: str | None) -> list:
    futures = cell_job.map(grid, cell_ids, unmapped(parent_run_id))
    wait(futures)
    return [f.state for f in futures]


@task(name="dispatch-cell", cache_policy=NO_CACHE)
def dispatch_cell(grid: str, cell_id: str, parent_run_id: str | None, deployment: str) -> str:
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"grid": grid, "cell_id": cell_id, "parent_run_id": parent_run_id},
                         timeout=None)
    if not run.state.is_completed():
        raise RuntimeError(f"cell {cell_id}: flow run {run.name} ended {run.state.name}")
    return run.state.name


_COST_ORDER = {"dense": 0, "pruned": 1, "lora": 2, "losa": 3}


@flow(name="losa-grid", log_prints=True, flow_run_name="grid {grid}")
def losa_grid(grid: str = "testbed", concurrency: int = 1, dispatch: str = "local",
              deployment: str = "losa-cell/losa-cell", tables: bool = True) -> dict:
    """Run every cell of a grid (validated first), log each to MLflow under one parent run, then write its tables.

    Args:
        grid: a shipped grid name (``experiments/<name>.yaml``) or a path to a grid file.
        concurrency: cells at once in local worker processes (1: in this process).
        dispatch: ``"local"`` or ``"deployment"`` (each cell a ``losa-cell`` flow run on a work pool).
    """
    logger = get_run_logger()
    if dispatch not in ("local", "deployment"):
        raise ValueError(f"dispatch must be 'local' or 'deployment', not {dispatch!r}")
    spec = load_grid(grid)
    from flows.preflight import require

    # the grid against its models (and this machine, when its cells run here): nothing runs or is logged if it fails
    require(spec, resources=dispatch == "local")
    ref = _grid_ref(spec, grid)
    cells = spec.cells()
    parent = tracking.start_grid(spec.name, len(cells))  # also creates the MLflow database before any fan-out
    logger.info(f"grid {spec.name}: {len(cells)} cells, MLflow parent run {parent}")
    status = "FAILED"
    try:
        summary = _run_cells(spec, ref, cells, parent, concurrency, dispatch, deployment, tables, logger)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            frame, _ = grid_results(spec)
            finished, failed = int((frame.status == "finished").sum()), int((frame.status == "failed").sum())
            record, metrics = _cells_record(frame), {"cells": len(cells), "cells_finished": finished,
                                                     "cells_failed": failed,
                                                     "cells_missing": len(cells) - finished - failed}
        except Exception as err:  # noqa: BLE001 - the parent must still be closed
            logger.warning(f"could not summarise the grid's cells: {err}")
            record, metrics = None, None
        tracking.end_grid(parent, status, cells=record, metrics=metrics)


def _cells_record(frame) -> dict:
    """Every cell of the grid with its latest run (wherever it was first logged) and status."""
    return {r.cell_id: {"label": r.label, "run_id": r.run_id if isinstance(r.run_id, str) else None,
                        "status": r.status or "not run", "ppl": None if r.ppl != r.ppl else float(r.ppl),
                        **({"failure": r.failure} if r.failure else {})} for r in frame.itertuples()}


def _run_cells(spec: Grid, ref: str, cells, parent: str, concurrency: int, dispatch: str, deployment: str,
               tables: bool, logger) -> dict:
    # cheap cells first (dense, then pruned only), so the first rows of a table are on screen within minutes
    ids = [c.id for c in sorted(cells, key=lambda c: _COST_ORDER[c.config.method]) if not _up_to_date(c)]
    if len(ids) < len(cells):
        logger.info(f"{len(cells) - len(ids)} cells up to date (every stage cached, run logged): not rerun")
    if not ids:
        states = []
    elif dispatch == "deployment":
        futures = dispatch_cell.map(ref, ids, unmapped(parent), unmapped(deployment))
        wait(futures)
        states = [f.state for f in futures]
    elif concurrency > 1:
        states = _pooled.with_options(task_runner=ProcessPoolTaskRunner(max_workers=concurrency))(ref, ids, parent)
    else:
        # cells run inside this flow run, whose heartbeat covers them; a heartbeat thread per cell would cost up to
        # 1 s each at exit (Prefect joins it at 1 s granularity), longer than many testbed stages
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            states = []
            for cid in ids:
                cell = spec.cell(cid)
                with prefect_tags(f"cell:{cid}", cell.label, cell.config.pruner if cell.config.method != "dense"
                                  else "dense"):
                    states.append(losa_cell(ref, cid, parent, return_state=True))
    failed = [(cid, s.message) for cid, s in zip(ids, states) if not s.is_completed()]
    summary = {"grid": spec.name, "cells": len(cells), "failed": [cid for cid, _ in failed], "parent_run_id": parent}
    if tables:
        summary["tables"] = str(losa_tables(ref, parent_run_id=parent))
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(cells)} cells failed: " +
                           "; ".join(f"{spec.cell(cid).describe()}: {msg}" for cid, msg in failed))
    return summary


def _up_to_date(cell) -> bool:
    """The cell's record is in the artifact store (it finished; tasks.retention) with its final model, and its
    MLflow run exists: nothing to do. Cells finished before records existed count when every stage is cached."""
    from flows.cell import cached_stages
    from tasks.store import ArtifactStore

    if os.environ.get("LOSA_FRESH_RUNS") == "1":
        return False
    spec = cell_spec(cell, as_task=False)
    key = cell_key(spec)
    if tracking.find_cell_run(key) is None:
        return False
    store = ArtifactStore()
    if retention.cell_record(store, key) is not None:
        return retention.done(store, key) is not None
    return cached_stages(spec)[1]


def grid_results(spec: Grid):
    """The results frame of a grid's cells (latest finished MLflow run of each) and their cell keys."""
    keys = {cell_key(cell_spec(c, as_task=False)): c for c in spec.cells()}
    frame = tracking.results_frame(keys)
    frame["grid"] = spec.name
    return frame, keys


@flow(name="losa-tables", log_prints=True, flow_run_name="tables {grid}")
def losa_tables(grid: str = "testbed", parent_run_id: str | None = None, out_dir: str | None = None) -> Path:
    """Tables (Markdown, CSV, parquet, LaTeX) and plots of a grid from MLflow, in the grid's paper layout."""
    import pandas as pd

    from flows.plots import cell_plot_name, plot_allocation, plot_loss, plot_lsr, plot_ppl_vs_sparsity
    from flows.tables import build_tables, results_markdown, write_tables

    spec = load_grid(grid)
    out = Path(out_dir) if out_dir else outputs_dir(spec.name)
    out.mkdir(parents=True, exist_ok=True)
    frame, _ = grid_results(spec)
    published = pd.DataFrame([p.model_dump() for p in spec.published]) if spec.published else None
    layouts = [spec.table] + [extra for extra, present in (("ablation", (frame.ablate != "").any()),)
                              if present and extra != spec.table]
    tables = {name: table for layout in layouts for name, table in build_tables(layout, frame, published).items()}
    write_tables(tables, out, title=spec.description)
    frame.to_csv(out / "results.csv", index=False)
    frame.to_parquet(out / "results.parquet", index=False)
    plot_ppl_vs_sparsity(frame, out / "ppl_vs_sparsity.png")
    mlflow = tracking.setup()
    client = mlflow.tracking.MlflowClient()
    losa = frame[(frame.method == "losa") & (frame.status == "finished")]
    names = {cid: spec.cell(cid).describe() for cid in losa.cell_id}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}  # cells alike but for unnamed settings
    for row in frame[frame.status == "finished"].itertuples():  # runs logged before run names said what differs
        name = spec.cell(row.cell_id).run_name
        if client.get_run(row.run_id).info.run_name != name:
            client.set_tag(row.run_id, "mlflow.runName", name)
    drawn_path = out / "plots.json"  # plot file -> the run it was drawn from: a warm rerun redraws nothing
    drawn = json.loads(drawn_path.read_text()) if drawn_path.exists() else {}
    kinds = ((plot_allocation, "allocation"), (plot_lsr, "cka_errors"), (plot_loss, "loss"))
    for row in losa.itertuples():
        name_of = names[row.cell_id] + (f" {row.cell_id}" if names[row.cell_id] in clash else "")
        files = {name: out / cell_plot_name(name, name_of) for _, name in kinds}
        if all(drawn.get(f.name) == row.run_id and f.exists() for f in files.values()):
            continue
        report = tracking.cell_report(row.run_id)
        logged = {a.path for a in client.list_artifacts(row.run_id, "plots")}
        for plot, name in kinds:
            path = plot(report, files[name])
            drawn[path.name] = row.run_id
            if f"plots/{path.name}" not in logged:  # on the cell's own run too, once
                client.log_artifact(row.run_id, str(path), artifact_path="plots")
    drawn_path.write_text(json.dumps(drawn, indent=1, sort_keys=True))
    if parent_run_id:  # through the client: start_run/end_run would close the parent, which its grid closes
        client.log_artifacts(parent_run_id, str(out), artifact_path="tables")
    print(results_markdown(tables, title=spec.description))
    print(f"tables written to {out}")
    return out


BASELINES = GRIDS_DIR / "baselines"
METRICS = {"ppl": ("rel", 0.02), "achieved_sparsity": ("abs", 0.002)}  # default tolerances


def compare(frame, baseline: dict) -> list[dict]:
    """Rows that moved beyond tolerance (or vanished) against a baseline ``{"cells": {id: {metric: v}}, ...}``."""
    tolerances = {**METRICS, **{k: tuple(v) for k, v in baseline.get("tolerances", {}).items()}}
    moved = []
    by_id = frame.set_index("cell_id")
    for cid, metrics in baseline["cells"].items():
        for metric, expected in metrics.items():
            kind, tol = tolerances.get(metric, ("rel", 0.02))
            got = by_id[metric].get(cid) if cid in by_id.index and metric in by_id else None
            if got is None or got != got:  # missing or NaN
                moved.append({"cell": cid, "metric": metric, "baseline": expected, "now": None, "allowed": tol})
                continue
            delta = abs(got - expected) / abs(expected) if kind == "rel" else abs(got - expected)
            if delta > tol:
                moved.append({"cell": cid, "metric": metric, "baseline": expected, "now": float(got),
                              "change": f"{(got - expected) / expected:+.2%}" if kind == "rel" else f"{got - expected:+.4f}",
                              "allowed": f"{tol:.2%}" if kind == "rel" else f"{tol:g}"})
    return moved


def write_baseline(grid: str, path: Path | None = None) -> Path:
    """Record the grid's current results as its regression baseline (committed under experiments/baselines/)."""
    spec = load_grid(grid)
    frame, _ = grid_results(spec)
    cells = {r.cell_id: {m: float(getattr(r, m)) for m in METRICS if getattr(r, m) == getattr(r, m)}
             for r in frame.itertuples()}
    path = path or BASELINES / f"{spec.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"grid": spec.name, "tolerances": {k: list(v) for k, v in METRICS.items()},
                                "cells": cells}, indent=1, sort_keys=True) + "\n")
    return path


PERF_BASELINE = BASELINES / "perf-testbed.json"  # the speed ratios' banded baseline (flows/perf.py)


def check_perf(parent_run_id: str | None, path: Path = PERF_BASELINE) -> list[dict]:
    """Measure the speed ratios once, log them (``perf.<ratio>``) on the grid's parent run and return the ones
    outside their baseline's noise band (none without a baseline: write one with ``losa baseline --perf``)."""
    from flows import perf

    if not path.exists():
        print(f"no speed baseline at {path}: speed ratios not checked (`losa baseline --perf` writes one)")
        return []
    expected = json.loads(path.read_text())
    now = perf.once(**expected.get("settings", {}))
    moved = perf.compare(now, expected["ratios"])
    if parent_run_id:
        client = tracking.setup().tracking.MlflowClient()
        for k, v in now.items():
            client.log_metric(parent_run_id, f"perf.{k}", float(v))
        client.set_tag(parent_run_id, "losa.regression.perf", "flagged" if moved else "passed")
    for m in moved:
        print(f"speed ratio {m['ratio']}: {m['now']} outside {m['baseline']:.3f} ± {m['band']:.3f} ({path.name})")
    return moved


@flow(name="losa-regression", log_prints=True)
def losa_regression(grid: str = "testbed", baseline: str | None = None, fresh: bool = True, perf: bool = True) -> dict:
    """Run a grid from scratch and compare with its committed baseline; what moved fails the flow (and is tagged).

    ``fresh``: a new artifact store and new MLflow runs, so the check measures today's code, not yesterday's cache.
    ``perf``: also measure the speed ratios (:mod:`flows.perf`) against their banded baseline; a ratio outside its
    noise band is flagged (tag ``losa.regression.perf``, ``regression.json``), not failed: machine load moves speed.
    """
    from datetime import datetime, timezone

    spec = load_grid(grid)
    path = Path(baseline) if baseline else BASELINES / f"{spec.name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no baseline for grid {spec.name} at {path}: write one with `losa baseline {grid}`")
    expected = json.loads(path.read_text())
    if fresh:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        os.environ["LOSA_ARTIFACTS"] = str(state_dir() / "regression" / stamp / "artifacts")
        os.environ["LOSA_FRESH_RUNS"] = "1"
    try:
        summary = losa_grid(_grid_ref(spec, grid))
    finally:
        if fresh:
            os.environ.pop("LOSA_ARTIFACTS", None)
            os.environ.pop("LOSA_FRESH_RUNS", None)
    frame, _ = grid_results(spec)
    moved = compare(frame, expected)
    slower = check_perf(summary["parent_run_id"]) if perf else []
    client = tracking.setup().tracking.MlflowClient()
    client.set_tag(summary["parent_run_id"], "losa.regression", "failed" if moved else "passed")
    client.log_dict(summary["parent_run_id"], {"moved": moved, "baseline": str(path), "perf_moved": slower,
                                               "perf_baseline": str(PERF_BASELINE)}, "regression.json")
    if moved:
        import pandas as pd

        from flows.tables import results_markdown

        raise RuntimeError(f"regression in grid {spec.name} against {path.name}:\n"
                           + results_markdown({"moved": pd.DataFrame(moved).astype(str)}))
    print(f"grid {spec.name}: {len(expected['cells'])} cells within tolerance of {path.name}")
    return {"moved": moved, "perf_moved": slower, **summary}
