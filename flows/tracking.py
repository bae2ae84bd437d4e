"""MLflow: one parent run per grid, one child run per cell, keyed by the cell's identity.

Store: ``$MLFLOW_TRACKING_URI``, else SQLite ``<state>/mlflow.db`` (an absolute path) with artifacts in
``<state>/mlartifacts``. The database is created once by :func:`setup` before any fan-out (concurrent first-time
creation races in MLflow's migrations), under a file lock. A cell run carries the tag ``losa.cell_key`` (model
content hash + settings + code versions); a finished run with that key is never logged again (the check and the
creation happen under a lock per key), so a rerun of a grid links the existing runs instead of duplicating them.

The parent run of a grid is found again by every launch (``losa.grid``): it is RUNNING while a launch runs and ends
FINISHED or FAILED with it; a launch that died leaves it RUNNING with a dead launcher, which the next start records as
KILLED in ``launches.json``. A cell that fails (a diverged loss, a failed merge check, any error) gets a FAILED run
whose ``losa.failure`` tag says why; it is retried by the next launch, and tables show it as ``failed``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.state import file_lock
from tasks.store import digest, state_dir

EXPERIMENT = "losa"


def ui_url() -> str:
    """Where the MLflow UI of this store is served (``losa up`` / ``mlflow ui`` default; ``LOSA_MLFLOW_UI``)."""
    return os.environ.get("LOSA_MLFLOW_UI", "http://127.0.0.1:5000")


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
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None and found.tags.get("mlflow.experimentKind") != "custom_model_development":
        mlflow.tracking.MlflowClient().set_experiment_tag(found.experiment_id, "mlflow.experimentKind",
                                                         "custom_model_development")  # created before the tag
    if found is None:
        with file_lock("mlflow-setup"):  # two first launches: one creates the schema and the experiment
            if mlflow.get_experiment_by_name(experiment) is None:
                # a local store keeps artifacts under the state folder; a tracking server keeps them where it says
                local = tracking_uri().startswith(("sqlite:", "file:", "/"))
                mlflow.create_experiment(
                    experiment, artifact_location=(state_dir() / "mlartifacts" / experiment).resolve().as_uri()
                    if local else None,
                    # MLflow 3 opens a GenAI page unless the experiment says it is model training
                    tags={"mlflow.experimentKind": "custom_model_development"})
    mlflow.set_experiment(experiment)
    return mlflow


def cell_key(model_sha256: str, config: dict, versions: str) -> str:
    """The identity of a cell's result: what it ran on, with which settings, under which code versions."""
    return digest({"model": model_sha256, "config": config, "versions": versions})[:32]


def _launcher() -> dict:
    from tasks.locks import identity

    return identity()


def _alive(launcher: dict) -> bool | None:
    from tasks.locks import holder_alive

    return holder_alive(launcher)


def source_tags() -> dict[str, str]:
    """Where a run's numbers come from: the git commit of the code (and whether it had local changes), versions."""
    import importlib.metadata as md
    import subprocess

    from tasks.store import PROJECT_ROOT

    tags = {"mlflow.source.name": "losa", "mlflow.source.type": "PROJECT"}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=PROJECT_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        if commit := run("rev-parse", "HEAD"):
            tags["mlflow.source.git.commit"] = commit
            tags["losa.git_dirty"] = str(bool(run("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in ("torch", "transformers", "peft", "prefect", "mlflow"):
        try:
            tags[f"losa.version.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return tags


def start_grid(grid: str, n_cells: int, tags: dict[str, str] | None = None) -> str:
    """Open the grid's parent run for this launch (found again, or created); returns its id.

    A previous launch that died without closing it is recorded as KILLED in its ``launches.json``."""
    mlflow = setup()
    client = mlflow.tracking.MlflowClient()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    me = {**_launcher(), "start": time.time()}
    with file_lock(f"grid-{digest(grid)[:16]}"):
        found = [] if os.environ.get("LOSA_FRESH_RUNS") == "1" else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`losa.kind` = 'grid' and tags.`losa.grid` = '{grid}'",
            order_by=["attributes.start_time ASC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            launches = _launches(client, run_id)
            for launch in launches:
                if launch.get("status") == "RUNNING" and _alive(launch) is False:
                    launch.update(status="KILLED", end=launch.get("end") or time.time(), note="launcher died")
            client.update_run(run_id, status="RUNNING")
        else:
            run = client.create_run(exp.experiment_id, run_name=f"grid {grid}", tags={
                "losa.kind": "grid", "losa.grid": grid, **source_tags(), **(tags or {})})
            run_id, launches = run.info.run_id, []
            client.log_param(run_id, "n_cells", n_cells)
        client.set_tag(run_id, "losa.launches", str(len(launches) + 1))
        _save_launches(client, run_id, launches + [{**me, "status": "RUNNING"}])
    return run_id


def end_grid(run_id: str, status: str, cells: dict[str, dict] | None = None, metrics: dict | None = None) -> None:
    """Close this launch of a grid: its parent run ends ``status`` (FINISHED / FAILED / KILLED) with summary
    metrics and ``cells.json`` (every cell of the grid: its run, wherever that run was first logged)."""
    mlflow = setup()
    client = mlflow.tracking.MlflowClient()
    launches = _launches(client, run_id)
    me = _launcher()
    for launch in launches:
        if (launch.get("pid"), launch.get("host")) == (me["pid"], me["host"]) and launch.get("status") == "RUNNING":
            launch.update(status=status, end=time.time())
    _save_launches(client, run_id, launches)
    if cells is not None:
        client.log_dict(run_id, cells, "cells.json")
    for k, v in (metrics or {}).items():
        client.log_metric(run_id, k, float(v))
    others = [x for x in launches if x.get("status") == "RUNNING" and _alive(x) is not False]
    if not others:  # another launch of the grid still running keeps the parent RUNNING
        client.set_terminated(run_id, status=status)


def _launches(client, run_id: str) -> list[dict]:
    try:
        with tempfile.TemporaryDirectory(dir=state_dir(), prefix=".download-") as tmp:
            path = client.download_artifacts(run_id, "launches.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - none yet
        return []


def _save_launches(client, run_id: str, launches: list[dict]) -> None:
    client.log_dict(run_id, launches, "launches.json")


def find_cell_run(key: str, status: str = "FINISHED") -> str | None:
    """The latest run of this cell key with ``status``, if any."""
    mlflow = setup()
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"], max_results=1,
                              filter_string=f"tags.`losa.cell_key` = '{key}' and attributes.status = '{status}'")
    return None if runs.empty else str(runs.run_id.iloc[0])


def _cell_tags(key: str, grid: str, cell: Any, parent_run_id: str | None) -> dict[str, str]:
    tags = {"losa.kind": "cell", "losa.cell_key": key, "losa.cell_id": cell.id, "losa.grid": grid,
            "losa.label": cell.label, "losa.model": cell.model, **source_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def log_cell(key: str, grid: str, cell: Any, report: dict, parent_run_id: str | None,
             timings: dict[str, float] | None = None, extra_metrics: dict[str, float] | None = None,
             started: float | None = None, ended: float | None = None,
             extra_tags: dict[str, str] | None = None) -> str:
    """Log one finished cell as a child run (params, metrics, per-step JSON) spanning the cell's real start and end
    (``started``/``ended``: epoch seconds); reuse an existing finished run of the same key."""
    from mlflow.entities import Metric, Param

    mlflow = setup()
    client = mlflow.tracking.MlflowClient()
    with file_lock(f"cell-{key}"):  # one run per cell key, whatever runs at the same time on this host
        if os.environ.get("LOSA_FRESH_RUNS") != "1" and (existing := find_cell_run(key)) is not None:
            return existing
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        now = time.time()
        run = client.create_run(exp.experiment_id, start_time=int((started or now) * 1000), run_name=cell.run_name,
                                tags={**_cell_tags(key, grid, cell, parent_run_id), **(extra_tags or {})})
        run_id = run.info.run_id
        stamp = int((ended or now) * 1000)
        metrics = {k: float(v) for k, v in _cell_metrics(report).items() if v is not None}
        metrics.update({f"time.{k}": float(v) for k, v in (timings or {}).items()})
        metrics.update(extra_metrics or {})
        params = [Param(k, str(v)) for k, v in cell.params().items()]
        batch = [Metric(k, v, stamp, 0) for k, v in metrics.items()]
        losses = [x for s in report["steps"] for x in s["train_losses"]]
        batch += [Metric("train_loss", x, stamp, i) for i, x in enumerate(losses)]
        _log_batches(client, run_id, params, batch)
        client.log_dict(run_id, report, "report.json")
        client.log_dict(run_id, report["config"], "config.json")
        client.log_dict(run_id, report["layer_sparsity"], "layer_sparsity.json")
        steps = [{k: s[k] for k in ("t", "theta", "omega", "rates", "patterns", "errors", "ranks", "applied_ranks",
                                    "importance", "cka")} for s in report["steps"]]
        client.log_dict(run_id, steps, "steps.json")  # plots of these: losa-tables adds them to this run
        client.set_terminated(run_id, status="FINISHED", end_time=stamp)
        return run_id


def log_failed(key: str, grid: str, cell: Any, parent_run_id: str | None, reason: str, started: float) -> str:
    """A FAILED child run for a cell that stopped: ``losa.failure`` says why (the next launch retries the cell)."""
    from mlflow.entities import Param

    mlflow = setup()
    client = mlflow.tracking.MlflowClient()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    tags = {**_cell_tags(key, grid, cell, parent_run_id), "losa.failure": reason[:4900]}
    run = client.create_run(exp.experiment_id, start_time=int(started * 1000), run_name=cell.run_name, tags=tags)
    _log_batches(client, run.info.run_id, [Param(k, str(v)) for k, v in cell.params().items()], [])
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def _log_batches(client, run_id: str, params: list, metrics: list) -> None:
    for i in range(0, len(params), 100):  # MLflow's limits per batch: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def _cell_metrics(report: dict) -> dict[str, float | None]:
    out = {"ppl": report["ppl"], "ppl_pruned": report["ppl_pruned"], "ppl_unmerged": report["ppl_unmerged"],
           "achieved_sparsity": report["sparsity"], "sparsity_before_merge": report["sparsity_before_merge"],
           "trainable_params": report["trainable_params"]}
    # per-layer sparsity lives in report.json / layer_sparsity.json: 200+ single-value charts would bury the loss
    return {**out, **stage_metrics(report)}


def stage_metrics(report: dict) -> dict[str, float]:
    """MLflow metrics of the optional stages (see flows.tables.EXTRA_PREFIXES): per zero-shot task its headline
    accuracy ``zs.<task>`` (acc_norm where reported, else acc), ``zs.<task>.stderr``, lm-eval's ``acc``/``acc_norm``
    and their stderrs, ``zs.mean``, ``zs.n`` (documents per task); the sparse form's bytes; latencies per engine."""
    from losa.evaluate import headline

    out: dict[str, float] = {}
    for task, row in (report.get("zeroshot") or {}).items():
        if task == "mean":
            out["zs.mean"] = row["acc"]
            continue
        norm = "acc_norm" in row
        out[f"zs.{task}"] = headline(row)
        out[f"zs.{task}.stderr"] = row["acc_norm_stderr" if norm else "acc_stderr"]
        out.update({f"zs.{task}.{k}": v for k, v in row.items() if k != "n"})
        out["zs.n"] = max(out.get("zs.n", 0), row.get("n", 0))
    for k in ("bytes_dense", "bytes_sparse", "ratio", "bytes_dense_prunable", "bytes_sparse_prunable",
              "ratio_prunable", "nnz"):
        if k in (report.get("export") or {}):
            out[f"export.{k}"] = report["export"][k]
    speed = report.get("speed") or {}
    for e, r in speed.get("engines", {}).items():
        if r.get("available"):
            out.update({f"speed.{e}.prefill_ms": r["prefill_ms"], f"speed.{e}.decode_ms": r["decode_ms"]})
    for e, r in speed.get("dense", {}).items():
        if r.get("available"):
            out.update({f"speed.{e}.dense_prefill_ms": r["prefill_ms"], f"speed.{e}.dense_decode_ms": r["decode_ms"]})
    for e, r in speed.get("speedup", {}).items():
        out.update({f"speed.{e}.prefill_speedup": r["prefill"], f"speed.{e}.decode_speedup": r["decode"]})
    for e, r in speed.get("speedup_vs_torch", {}).items():
        out[f"speed.{e}.decode_vs_torch"] = r["decode"]
    return {k: float(v) for k, v in out.items() if v is not None and v == v}


def results_frame(keys: dict[str, Any]) -> pd.DataFrame:
    """One row per cell (``keys``: cell key -> spec Cell) from the latest finished run of each key; a cell whose
    latest run failed (and that never finished) has status ``failed`` and its reason, no metrics."""
    from flows.tables import METRICS, is_extra, results_frame

    mlflow = setup()
    metrics = {}
    for key, cell in keys.items():
        for status in ("FINISHED", "FAILED"):
            runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"], max_results=1,
                                      filter_string=f"tags.`losa.cell_key` = '{key}' and attributes.status = '{status}'")
            if runs.empty:
                continue
            r = runs.iloc[0]
            metrics[cell.id] = {"run_id": r["run_id"], "grid": r.get("tags.losa.grid", ""), "status": status.lower()}
            if status == "FINISHED":
                metrics[cell.id].update({m: r.get(f"metrics.{m}") for m in METRICS})
                metrics[cell.id].update({c[len("metrics."):]: v for c, v in r.items()
                                         if c.startswith("metrics.") and is_extra(c[len("metrics."):]) and v == v})
            else:
                metrics[cell.id]["failure"] = r.get("tags.losa.failure", "") or ""
            break
    return results_frame(list(keys.values()), metrics)


def cell_report(run_id: str) -> dict:
    """The report.json of a cell run."""
    mlflow = setup()
    with tempfile.TemporaryDirectory(dir=state_dir(), prefix=".download-") as tmp:  # removed again, whatever happens
        return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report.json",
                                                                   dst_path=tmp)).read_text())
