"""MLflow: one parent run per grid launch, one child run per cell, keyed by the cell's identity.

Store: ``$MLFLOW_TRACKING_URI``, else SQLite ``<state>/mlflow.db`` with artifacts in ``<state>/mlartifacts``. The
database is created once by :func:`setup` before any fan-out (concurrent first-time creation races in MLflow's
migrations). A cell run carries the tag ``losa.cell_key`` (model content hash + settings + code versions); a finished
run with that key is never logged again, so a rerun of a grid links the existing runs instead of duplicating them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.store import digest, state_dir

EXPERIMENT = "losa"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


def setup(experiment: str = EXPERIMENT):
    """Point MLflow at the project store and create the experiment (and the database) if needed."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    state_dir().mkdir(parents=True, exist_ok=True)
    preset = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri())
    if preset is None:  # set_tracking_uri exports the variable; keep following $LOSA_HOME instead
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    if mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment,
                                     artifact_location=(state_dir() / "mlartifacts" / experiment).resolve().as_uri())
        except Exception:  # noqa: BLE001 - created concurrently by another process
            pass
    mlflow.set_experiment(experiment)
    return mlflow


def cell_key(model_sha256: str, config: dict, versions: str) -> str:
    """The identity of a cell's result: what it ran on, with which settings, under which code versions."""
    return digest({"model": model_sha256, "config": config, "versions": versions})[:32]


def start_grid(grid: str, n_cells: int, tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one grid launch; returns its id."""
    mlflow = setup()
    with mlflow.start_run(run_name=f"grid:{grid}", tags={"losa.kind": "grid", "losa.grid": grid, **(tags or {})}) as r:
        mlflow.log_param("n_cells", n_cells)
        return r.info.run_id


def find_cell_run(key: str) -> str | None:
    """The latest FINISHED run of this cell key, if any."""
    mlflow = setup()
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"], max_results=1,
                              filter_string=f"tags.`losa.cell_key` = '{key}' and attributes.status = 'FINISHED'")
    return None if runs.empty else str(runs.run_id.iloc[0])


def log_cell(key: str, grid: str, cell: Any, report: dict, parent_run_id: str | None,
             timings: dict[str, float] | None = None, extra_metrics: dict[str, float] | None = None) -> str:
    """Log one finished cell as a child run (params, metrics, per-step JSON and plots); reuse an existing run."""
    if os.environ.get("LOSA_FRESH_RUNS") != "1" and (existing := find_cell_run(key)) is not None:
        return existing
    mlflow = setup()
    tags = {"losa.kind": "cell", "losa.cell_key": key, "losa.cell_id": cell.id, "losa.grid": grid,
            "losa.label": cell.label, "losa.model": cell.model}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=cell.describe(), tags=tags) as run:
        mlflow.log_params(cell.params())
        metrics = {k: float(v) for k, v in _cell_metrics(report).items() if v is not None}
        metrics.update({f"time.{k}": float(v) for k, v in (timings or {}).items()})
        metrics.update(extra_metrics or {})
        mlflow.log_metrics(metrics)
        losses = [x for s in report["steps"] for x in s["train_losses"]]
        if losses:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            mlflow.tracking.MlflowClient().log_batch(
                run.info.run_id, metrics=[Metric("train_loss", x, now, i) for i, x in enumerate(losses)])
        mlflow.log_dict(report, "report.json")
        mlflow.log_dict(report["config"], "config.json")
        steps = [{k: s[k] for k in ("t", "theta", "omega", "rates", "patterns", "errors", "ranks", "applied_ranks",
                                    "importance", "cka")} for s in report["steps"]]
        mlflow.log_dict(steps, "steps.json")  # plots of these: losa-tables adds them to this run
        return run.info.run_id


def _cell_metrics(report: dict) -> dict[str, float | None]:
    out = {"ppl": report["ppl"], "ppl_pruned": report["ppl_pruned"], "ppl_unmerged": report["ppl_unmerged"],
           "achieved_sparsity": report["sparsity"], "sparsity_before_merge": report["sparsity_before_merge"],
           "trainable_params": report["trainable_params"]}
    out.update({f"layer_sparsity.{k}": v for k, v in report["layer_sparsity"].items()})
    return out


def results_frame(keys: dict[str, Any]) -> pd.DataFrame:
    """One row per cell (``keys``: cell key -> spec Cell) from the latest finished run of each key."""
    from flows.tables import METRICS, results_frame

    mlflow = setup()
    metrics = {}
    for key, cell in keys.items():
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"], max_results=1,
                                  filter_string=f"tags.`losa.cell_key` = '{key}' and attributes.status = 'FINISHED'")
        if not runs.empty:
            r = runs.iloc[0]
            metrics[cell.id] = {"run_id": r["run_id"], "grid": r.get("tags.losa.grid", ""),
                                **{m: r.get(f"metrics.{m}") for m in METRICS}}
    return results_frame(list(keys.values()), metrics)


def cell_report(run_id: str) -> dict:
    """The report.json of a cell run."""
    mlflow = setup()
    with tempfile.TemporaryDirectory(dir=state_dir(), prefix=".download-") as tmp:  # removed again, whatever happens
        return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report.json",
                                                                   dst_path=tmp)).read_text())
