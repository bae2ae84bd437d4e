"""The grid flows end to end on the committed testbed with a micro budget (seconds per cell).

One Prefect test harness and one isolated state folder (``$LOSA_HOME``: artifact store, MLflow SQLite, Prefect
results, locks) per session; the micro grid runs once (plus one cached rerun), and a second, fresh state folder holds
the failure-and-resume run. Flow modules are imported inside the fixtures, after the environment is set, because
``tasks.stages`` binds its Prefect result and lock folders to ``$LOSA_HOME`` when it is imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from flows.spec import load_grid

MICRO = {
    "description": "micro",
    "table": "table1",
    "models": ["testbed"],
    "fixed": {"nsamples": 8, "seqlen": 64, "calib_batch_size": 8, "rmi_samples": 8, "steps": 2, "train_steps": 2,
              "final_train_steps": 3, "eval_seqlen": 128, "eval_batch_size": 8, "eval_windows": 8,
              "finetune": {"batch_size": 2, "seqlen": 64}},
    "axes": {"sparsity": [0.7], "pruner": ["wanda"], "method": ["pruned", "lora", "losa"]},
    "include": [{"method": "dense"}],
    "retain": "all",  # the tests below walk every stage of finished cells; test_retention covers the others
}


def write_grid(folder: Path, methods: list[str], dense: bool = True, name: str = "micro", table: str = "table1",
               pruner: str = "wanda", retain: str = "all", **fixed) -> Path:
    """The micro grid (``methods`` on the pruned axis, plus the dense cell) as ``<folder>/<name>.yaml``."""
    raw = json.loads(json.dumps(MICRO))
    raw["name"], raw["table"], raw["retain"] = name, table, retain
    raw["axes"]["method"], raw["axes"]["pruner"] = list(methods), [pruner]
    raw["fixed"].update(fixed)
    if not dense:
        raw.pop("include")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def losa_env(tmp_path_factory):
    """An isolated state folder and Prefect home, and one Prefect test harness, for the whole session."""
    root = tmp_path_factory.mktemp("losa-grid")
    state = root / "state"
    mp = pytest.MonkeyPatch()
    mp.setenv("LOSA_HOME", str(state))
    mp.setenv("PREFECT_HOME", str(root / "prefect"))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "LOSA_ARTIFACTS", "LOSA_FRESH_RUNS"):
        mp.setenv(var, "")  # recorded, so that undo() also removes what MLflow exports into os.environ
        mp.delenv(var)
    # what flows.cli.main() would otherwise setdefault into os.environ for the rest of the session
    mp.setenv("HF_HOME", str(state / "hf"))
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(state / "torchinductor"))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    stale = "tasks.stages" in sys.modules  # imported before LOSA_HOME was set: its result/lock folders live elsewhere
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=90):
            yield SimpleNamespace(root=root, state=state, stale_task_module=stale)
    finally:
        mp.undo()


def mlflow_runs(**tags) -> pd.DataFrame:
    """Every run of the project experiment (in the current state folder) with these tags."""
    from flows import tracking

    mlflow = tracking.setup()
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string=where)


def mlflow_client():
    from flows import tracking

    return tracking.setup().tracking.MlflowClient()


def stage_refs(spec) -> list:
    """The artifact Ref of every stage of a cell, in drive order, looked up in the store (nothing computed)."""
    from flows.cell import walk

    stages, complete = walk(spec)
    assert complete
    return stages.refs


def by_method(grid) -> dict:
    return {c.config.method: c for c in grid.cells()}


@pytest.fixture(scope="module")
def first(losa_env, tmp_path_factory):
    """The micro grid (dense, pruned, +LoRA, +LoSA) run once through ``losa_grid``; MLflow and store snapshots."""
    from flows.grid import losa_grid
    from tasks.store import ArtifactStore

    path = write_grid(tmp_path_factory.mktemp("grids"), ["pruned", "lora", "losa"])
    summary = losa_grid(str(path))
    return SimpleNamespace(path=path, grid=load_grid(path), summary=summary, computed=ArtifactStore().computed(),
                           runs=mlflow_runs())


@pytest.fixture(scope="module")
def second(first):
    """The same grid run again: everything cached."""
    from flows.grid import losa_grid
    from tasks.store import ArtifactStore

    lines = len(ArtifactStore().computed())
    cell_runs = len(mlflow_runs(**{"losa.kind": "cell"}))
    summary = losa_grid(str(first.path))
    return SimpleNamespace(summary=summary, lines_before=lines, lines_after=len(ArtifactStore().computed()),
                           cell_runs_before=cell_runs, cell_runs_after=len(mlflow_runs(**{"losa.kind": "cell"})))


# --------------------------------------------------------------------------------------------- tests


def test_micro_grid_logs_parent_children_and_tables(first, losa_env):
    cells = first.grid.cells()
    assert first.summary["cells"] == 4 and first.summary["failed"] == []
    parents = first.runs[first.runs["tags.losa.kind"] == "grid"]
    assert list(parents.run_id) == [first.summary["parent_run_id"]]
    children = first.runs[first.runs["tags.mlflow.parentRunId"] == first.summary["parent_run_id"]]
    assert len(children) == 4 and (children["tags.losa.kind"] == "cell").all()
    assert sorted(children["tags.losa.cell_id"]) == sorted(c.id for c in cells)
    assert (children.status == "FINISHED").all()
    assert children["metrics.ppl"].notna().all() and (children["metrics.ppl"] > 1).all()
    assert children["metrics.achieved_sparsity"].notna().all()
    assert (children["metrics.cholesky_retries"] == 0).all()  # logged for every cell (Wanda never factorises)
    metrics = children.set_index("tags.losa.cell_id")
    methods = by_method(first.grid)
    assert metrics.loc[methods["losa"].id, "metrics.achieved_sparsity"] == pytest.approx(0.70, abs=0.01)
    assert metrics.loc[methods["pruned"].id, "metrics.achieved_sparsity"] == pytest.approx(0.70, abs=0.01)
    assert metrics.loc[methods["dense"].id, "metrics.achieved_sparsity"] == 0.0

    # everything under the session's state folder
    assert (losa_env.state / "mlflow.db").is_file() and (losa_env.state / "artifacts" / "computed.jsonl").is_file()
    if not losa_env.stale_task_module:  # tasks.stages was first imported after LOSA_HOME was set
        assert (losa_env.state / "prefect-results").is_dir()
    out = losa_env.state / "outputs" / "micro"
    assert first.summary["tables"] == str(out)
    assert (out / "tables.md").is_file() and (out / "ppl_vs_sparsity.png").is_file()
    assert list(out.glob("*.parquet"))
    assert "+LoSA" in (out / "tables.md").read_text()
    from flows.plots import cell_plot_name

    assert (out / cell_plot_name("allocation", by_method(first.grid)["losa"].describe())).is_file()  # not an id
    assert [p.name for p in losa_env.state.iterdir() if p.name.startswith(("tmp", ".download"))] == []


def test_shared_prefixes_are_computed_once(first):
    from flows.cell import cell_spec

    stages = Counter(c["stage"] for c in first.computed)
    assert stages["calibration"] == 1 and stages["train_tokens"] == 1 and "dense_outputs" not in stages
    # no artifact was ever written twice
    assert [k for k, n in Counter(c["key"] for c in first.computed).items() if n > 1] == []
    methods = by_method(first.grid)
    pruned_refs = stage_refs(cell_spec(methods["pruned"], as_task=False))
    lora_refs = stage_refs(cell_spec(methods["lora"], as_task=False))
    one_shot = [r.key for r in pruned_refs if r.stage == "prune"]
    assert len(one_shot) == 1 and one_shot == [r.key for r in lora_refs if r.stage == "prune"]
    assert sum(c["key"] == one_shot[0] for c in first.computed) == 1
    # the one-shot prune plus LoSA's own T = 2 prunes
    losa_prunes = [r.key for r in stage_refs(cell_spec(methods["losa"], as_task=False)) if r.stage == "prune"]
    assert len(losa_prunes) == 2 and one_shot[0] not in losa_prunes
    assert stages["prune"] == 3


def test_the_cell_flow_hands_drive_its_task_executor(first, monkeypatch):
    """The flows do not re-write the cell's control flow: a cell flow runs losa.dsa.drive once, with TaskStages, and
    runs exactly the stage tasks drive asks for, in its order (Algorithm 1: tests/losa/test_dsa.py)."""
    import losa.dsa
    from flows.cell import TaskStages, losa_cell

    executors, tasks = [], []
    drive, call = losa.dsa.drive, TaskStages._call

    def spy_drive(cfg, stages):
        executors.append(type(stages))
        return drive(cfg, stages)

    def spy_call(self, stage, **params):
        tasks.append(stage.name)
        return call(self, stage, **params)

    monkeypatch.setattr(losa.dsa, "drive", spy_drive)
    monkeypatch.setattr(TaskStages, "_call", spy_call)
    row = losa_cell(str(first.path), by_method(first.grid)["losa"].id)
    assert executors == [TaskStages] and row["stages_computed"] == 0  # everything cached by the first run
    assert tasks == ["calibration", "train_tokens", "importance", "prune", "finetune",  # t = 1
                     "merge", "importance", "prune", "finetune",  # t = 2
                     "finalize", "perplexity"]


def test_rerun_computes_and_logs_nothing(first, second):
    from flows.cell import cached_stages, cell_spec

    # one parent per grid: the relaunch attaches to it, and it records both launches, each closed as FINISHED
    assert second.summary["failed"] == [] and second.summary["parent_run_id"] == first.summary["parent_run_id"]
    parent = mlflow_client().get_run(first.summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["cells_finished"] == 4
    launches = json.loads(Path(mlflow_client().download_artifacts(parent.info.run_id, "launches.json")).read_text())
    assert [x["status"] for x in launches] == ["FINISHED", "FINISHED"]
    cells = json.loads(Path(mlflow_client().download_artifacts(parent.info.run_id, "cells.json")).read_text())
    assert sorted(cells) == sorted(c.id for c in first.grid.cells())
    assert {c["status"] for c in cells.values()} == {"finished"}
    assert second.lines_after == second.lines_before
    assert second.cell_runs_after == second.cell_runs_before == 4
    for cell in first.grid.cells():
        found, complete = cached_stages(cell_spec(cell, as_task=False))
        assert complete and found > 0, cell.describe()


def test_staged_equals_in_memory(first):
    import torch

    from flows.cell import cell_spec
    from losa.dsa import run_losa
    from losa.models import load_model
    from losa.snapshot import snapshot
    from tasks.store import ArtifactStore

    cell = by_method(first.grid)["losa"]
    spec = cell_spec(cell, as_task=False)
    final = [r for r in stage_refs(spec) if r.stage == "finalize"]
    assert len(final) == 1
    stored = {k: v for k, v in ArtifactStore().tensors(final[0])[0].items() if k.startswith("w.")}

    model, tokenizer = load_model(spec.model, device="cpu")
    report = run_losa(model, tokenizer, cell.config, progress=False)
    logged = first.runs[first.runs["tags.losa.cell_id"] == cell.id]
    assert len(logged) == 1
    assert report.ppl == logged["metrics.ppl"].iloc[0]
    weights = {k: v for k, v in snapshot(model, adapter=False)[0].items() if k.startswith("w.")}
    assert weights.keys() == stored.keys() and len(weights) > 0
    differ = [k for k in weights if not torch.equal(weights[k], stored[k])]
    assert differ == []


def test_failed_cell_fails_the_grid_and_rerun_resumes(losa_env, tmp_path, monkeypatch):
    from flows.cell import cell_spec
    from flows.grid import losa_grid
    import losa.stages
    from tasks.store import ArtifactStore, state_dir

    monkeypatch.setenv("LOSA_HOME", str(tmp_path / "state"))
    # mlflow.set_tracking_uri() exported the first state's database as MLFLOW_TRACKING_URI, which
    # flows.tracking.tracking_uri() prefers over $LOSA_HOME (see test_tracking_follows_losa_home): name the new one
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'state').resolve() / 'mlflow.db'}")
    assert state_dir() == (tmp_path / "state").resolve()
    assert mlflow_runs().empty
    assert ArtifactStore().computed() == []
    path = write_grid(tmp_path / "grids", ["pruned", "losa"], dense=False)
    grid = load_grid(path)
    methods = by_method(grid)

    def boom(self, *args, **kwargs):
        raise RuntimeError("injected fine-tuning failure")

    with monkeypatch.context() as m:
        m.setattr(losa.stages, "finetune", boom)
        state = losa_grid(str(path), return_state=True)
    assert state.is_failed()
    assert methods["losa"].describe() in state.message and "1 of 2 cells failed" in state.message
    runs = mlflow_runs(**{"losa.kind": "cell"}).set_index("tags.losa.cell_id")
    assert sorted(runs.index) == sorted([methods["pruned"].id, methods["losa"].id])
    assert runs.loc[methods["pruned"].id, "status"] == "FINISHED"
    # the failed cell: a FAILED run that says why, "failed" in the table (not blank, not a number), parent FAILED
    assert runs.loc[methods["losa"].id, "status"] == "FAILED"
    assert runs.loc[methods["losa"].id, "tags.losa.failure"] == "RuntimeError: injected fine-tuning failure"
    table = (state_dir() / "outputs" / "micro" / "tables.md").read_text()
    assert "| +LoSA  | failed |" in table, table
    parent = mlflow_runs(**{"losa.kind": "grid"})
    assert list(parent.status) == ["FAILED"] and parent["metrics.cells_failed"].iloc[0] == 1
    failed_run = ArtifactStore().computed()
    done = {c["key"] for c in failed_run}
    assert {"calibration", "importance", "prune"} <= {c["stage"] for c in failed_run}
    assert "finetune" not in {c["stage"] for c in failed_run}

    state = losa_grid(str(path), return_state=True)
    assert state.is_completed(), state.message
    resumed = ArtifactStore().computed()[len(failed_run):]
    assert resumed[0]["stage"] == "finetune"  # the failed stage comes first
    assert not done & {c["key"] for c in resumed}
    # t = 1's fine-tuning, then step 2 (merge, LSR of the merged model, prune, fine-tune), finalize, perplexity
    assert Counter(c["stage"] for c in resumed) == {"finetune": 2, "merge": 1, "importance": 1, "prune": 1, "cell": 1,
                                                    "finalize": 1, "perplexity": 1}
    step1 = [r.key for r in stage_refs(cell_spec(methods["losa"], as_task=False))
             if r.stage in ("importance", "prune")][:2]  # LSR of the dense model and the step-1 prune
    assert len(step1) == 2 and set(step1) <= done
    cells = mlflow_runs(**{"losa.kind": "cell"})
    assert sorted(cells[cells.status == "FINISHED"]["tags.losa.cell_id"]) == sorted([methods["pruned"].id,
                                                                                     methods["losa"].id])
    assert list(mlflow_runs(**{"losa.kind": "grid"}).status) == ["FINISHED"]  # the same parent, now finished
    assert losa_env.state.resolve() != state_dir()


def test_compare_against_a_baseline(first, tmp_path):
    from flows.grid import compare, grid_results, write_baseline

    path = write_baseline(str(first.path), tmp_path / "micro.json")
    baseline = json.loads(path.read_text())
    ids = {c.id for c in first.grid.cells()}
    assert set(baseline["cells"]) == ids
    frame, _ = grid_results(first.grid)
    assert compare(frame, baseline) == []

    cell = by_method(first.grid)["losa"].id
    moved = json.loads(json.dumps(baseline))
    moved["cells"][cell]["ppl"] *= 1.05
    rows = compare(frame, moved)
    assert len(rows) == 1 and rows[0]["cell"] == cell and rows[0]["metric"] == "ppl"
    assert rows[0]["now"] == pytest.approx(baseline["cells"][cell]["ppl"])

    missing = json.loads(json.dumps(baseline))
    missing["cells"]["0123456789ab"] = {"ppl": 10.0}
    rows = compare(frame, missing)
    assert rows == [{"cell": "0123456789ab", "metric": "ppl", "baseline": 10.0, "now": None, "allowed": 0.02}]


def test_check_validates_without_touching_the_store(losa_env, tmp_path, monkeypatch, capsys):
    import flows.cell
    import tasks.model
    from flows.cli import main

    def touched(*args, **kwargs):
        pytest.fail("`losa check` looked into the store / hashed the model")

    monkeypatch.setattr(flows.cell, "cached_stages", touched)
    monkeypatch.setattr(tasks.model, "content_hash", touched)
    monkeypatch.setenv("LOSA_HOME", str(tmp_path / "state"))
    bad = write_grid(tmp_path, ["pruned"], name="bad")
    raw = yaml.safe_load(bad.read_text())
    raw["fixed"]["pruner"] = "foo"
    raw["axes"].pop("pruner")
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as err:
        main(["check", str(bad)])
    message = str(err.value.code)
    assert str(bad) in message and "pruner" in message and "foo" in message
    assert main(["check", "testbed", "--no-cache"]) == 0
    assert "grid testbed" in capsys.readouterr().out
    assert not (tmp_path / "state").exists()


def test_check_counts_cached_stages(first, second, capsys):
    from flows.cli import main

    assert main(["check", str(first.path)]) == 0
    assert "4 of 4 cells complete" in capsys.readouterr().out


def test_task_state_follows_losa_home(losa_env, tmp_path, monkeypatch):
    from tasks import stages as T

    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    assert Path(T.configured(T.calibration).result_storage).is_relative_to(tmp_path)


def test_tracking_follows_losa_home(losa_env, tmp_path, monkeypatch):
    from flows import tracking

    tracking.setup()  # as every flow does
    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


# --------------------------------------------------------------------------------------------- reliability


def _cli_env(state: Path) -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LOSA_ARTIFACTS")}
    return {**env, "LOSA_HOME": str(state), "PREFECT_API_URL": PREFECT_API_URL.value()}


def _runs_by_cell(state: Path) -> dict:
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name("losa")
    return {r.data.tags["losa.cell_id"]: r for r in client.search_runs(
        [exp.experiment_id], "tags.`losa.kind` = 'cell' and attributes.status = 'FINISHED'")}


def test_kills_inside_stages_restart_unattended_with_identical_results(first, losa_env, tmp_path):
    """SIGKILL at three points inside stages (each time while a stage holds its lock), then one plain restart: the
    grid finishes without help, the dead holders' locks are broken, results equal the uninterrupted run's, the
    killed launches are recorded as KILLED; then corruption: found, removed and rebuilt bit-identically."""
    root = Path(__file__).resolve().parents[2]
    path = write_grid(tmp_path / "grids", ["pruned", "losa"], name="killed")
    state = tmp_path / "state"
    argv, env = [sys.executable, "-m", "flows.cli", "grid", str(path)], _cli_env(state)
    killed: list[str] = []
    for _ in range(3):
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            fresh = [p.stem for p in (state / "locks").glob("*.lock") if p.stem not in killed]
            if fresh:  # a stage not killed before holds its lock: it is computing right now
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(fresh[0])
                break
            time.sleep(0.005)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the grid finished before it could be killed inside a stage"
    assert len(set(killed)) == 3
    assert list((state / "locks").glob("*.lock")), "no lock was left behind: the kills tested nothing"
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "breaking the lock" in done.stdout + done.stderr
    assert list((state / "locks").glob("*.lock")) == []

    ours, reference = _runs_by_cell(state), _runs_by_cell(losa_env.state)
    grid = load_grid(path)
    assert sorted(ours) == sorted(c.id for c in grid.cells())
    for cid, run in ours.items():
        for metric in ("ppl", "achieved_sparsity", "ppl_pruned"):
            assert run.data.metrics.get(metric) == reference[cid].data.metrics.get(metric), (cid, metric)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    parent = client.get_run(next(iter(ours.values())).data.tags["mlflow.parentRunId"])
    launches = json.loads(Path(client.download_artifacts(parent.info.run_id, "launches.json",
                                                         str(tmp_path))).read_text())
    assert parent.info.status == "FINISHED" and [x["status"] for x in launches] == ["KILLED"] * 3 + ["FINISHED"]

    # corruption: a byte flipped in the LoSA cell's final model, a truncated calibration file
    from tasks.store import ArtifactStore

    store = ArtifactStore(state / "artifacts")
    manifests = {k: store.manifest(k) for k in store.keys()}
    final = next(k for k, m in manifests.items() if m["stage"] == "finalize")
    dense = next(k for k, m in manifests.items() if m["stage"] == "calibration")
    flip = Path(store._dir(final)) / "tensors.safetensors"
    payload = bytearray(flip.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    flip.write_bytes(bytes(payload))
    cut = Path(store._dir(dense)) / "tensors.safetensors"
    cut.write_bytes(cut.read_bytes()[:1000])
    check = subprocess.run([sys.executable, "-m", "flows.cli", "check", str(path), "--verify"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 1 and "2 corrupt artifacts found and removed" in check.stdout, check.stdout
    assert store.get(final) is None and store.get(dense) is None
    rerun = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for key in (final, dense):  # rebuilt under the same key, bit-identical
        assert store.manifest(key)["sha256"] == manifests[key]["sha256"]


def test_a_diverged_cell_fails_with_its_reason_and_the_grid_goes_on(losa_env, tmp_path, monkeypatch):
    from flows.grid import losa_grid

    monkeypatch.setenv("LOSA_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'state').resolve() / 'mlflow.db'}")
    path = write_grid(tmp_path / "grids", ["pruned", "lora"], dense=False, name="diverged",
                      finetune={"batch_size": 2, "seqlen": 64, "lr": 1.0e30})
    state = losa_grid(str(path), return_state=True)
    assert state.is_failed() and "1 of 2 cells failed" in state.message and "Diverged" in state.message
    runs = mlflow_runs(**{"losa.kind": "cell"}).set_index("tags.losa.label")
    assert runs.loc["pruned", "status"] == "FINISHED"
    assert runs.loc["+LoRA", "status"] == "FAILED" and "training diverged" in runs.loc["+LoRA", "tags.losa.failure"]
    import re

    table = (tmp_path / "state" / "outputs" / "diverged" / "tables.md").read_text()
    assert re.search(r"\| \+LoRA \(merged\) +\| failed \|", table) and re.search(r"\| pruned +\| \d+\.\d\d \|", table)


def test_optional_stages_run_cached_log_and_fill_table2(losa_env, tmp_path, monkeypatch):
    """zero-shot, export and speed as stages of a cell: logged to MLflow, in Table 2, cached on a rerun."""
    from flows.grid import losa_grid
    from losa.export import dense_state_dict
    from tasks.store import ArtifactStore

    import torch

    monkeypatch.setenv("LOSA_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'state').resolve() / 'mlflow.db'}")
    path = write_grid(tmp_path / "grids", ["pruned"], name="zs", table="zeroshot",
                      zeroshot={"tasks": ["rte", "arc_easy"], "limit": 4, "batch_size": 4},
                      export={"dtype": "float16"},
                      speed={"prefill": 16, "decode": 2, "repeats": 1, "engines": ["torch", "csr", "onnxruntime"]})
    losa_grid(str(path))
    runs = mlflow_runs(**{"losa.kind": "cell"}).set_index("tags.losa.label")
    for label in ("dense", "pruned"):
        r = runs.loc[label]
        assert 0 <= r["metrics.zs.rte"] <= 1 and r["metrics.zs.arc_easy"] == r["metrics.zs.arc_easy.acc_norm"]
        assert r["metrics.zs.mean"] == (r["metrics.zs.rte"] + r["metrics.zs.arc_easy"]) / 2
        assert r["metrics.zs.n"] == 4
        assert r["metrics.speed.torch.decode_ms"] > 0 and r["metrics.speed.onnxruntime.decode_ms"] > 0
        assert r["metrics.speed.csr.decode_speedup"] > 0
    assert runs.loc["pruned", "metrics.export.ratio"] < runs.loc["dense", "metrics.export.ratio"]
    # the stored sparse form restores the final model's weights in fp16 bit for bit
    store = ArtifactStore()
    spec = next(c for c in load_grid(path).cells() if c.config.method == "pruned")
    from flows.cell import cell_spec

    from losa.snapshot import snapshot
    from tasks.stages import load_state

    refs = {r.stage: r for r in stage_refs(cell_spec(spec, as_task=False))}
    weights = dense_state_dict(store.tensors(refs["export"])[0])
    model = load_state(cell_spec(spec, as_task=False), refs["prune"])[0]  # the stored mask on the dense weights
    pruned = {k: v for k, v in snapshot(model, adapter=False)[0].items() if k.startswith("w.")}  # w.<block>.<name>
    assert pruned and refs["export"].info["nnz"] == sum(int((w != 0).sum()) for w in pruned.values())
    for key, w in pruned.items():
        block, name = key[2:].split(".", 1)
        got = next(v for k, v in weights.items() if k.endswith(f"layers.{block}.{name}.weight"))
        assert torch.equal(got, w.half())
    table = (tmp_path / "state" / "outputs" / "zs" / "tables.md").read_text()
    assert "## zeroshot__testbed__wanda__70" in table and " RTE " in table and " ARC-e " in table
    lines = len(store.computed())
    losa_grid(str(path))
    assert len(store.computed()) == lines  # every stage, the optional ones too, came from the store


def test_adding_evaluation_stages_to_finished_cells_runs_only_those(losa_env, tmp_path, monkeypatch):
    """A zero-shot grid over cells that finished elsewhere (their intermediates dropped by ``retain: final``) reuses
    their final models and reports: only the zero-shot stages compute, and the perplexities are the logged ones."""
    from flows.grid import losa_grid
    from tasks.store import ArtifactStore

    monkeypatch.setenv("LOSA_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'state').resolve() / 'mlflow.db'}")
    base = write_grid(tmp_path / "grids", ["pruned", "losa"], name="ppl")
    raw = yaml.safe_load(base.read_text())
    raw["retain"] = "final"
    base.write_text(yaml.safe_dump(raw))
    losa_grid(str(base))
    store = ArtifactStore()
    before = len(store.computed())
    zs = write_grid(tmp_path / "grids", ["pruned", "losa"], name="zs2", table="zeroshot",
                    zeroshot={"tasks": ["rte"], "limit": 2, "batch_size": 2})
    losa_grid(str(zs))
    assert [c["stage"] for c in store.computed()[before:] if c["stage"] != "cell"] == ["zeroshot"] * 3  # + records
    runs = mlflow_runs(**{"losa.kind": "cell"})
    for label in ("dense", "pruned", "+LoSA"):
        of = runs[runs["tags.losa.label"] == label].set_index("tags.losa.grid")
        assert of.loc["zs2", "metrics.ppl"] == of.loc["ppl", "metrics.ppl"]
        assert 0 <= of.loc["zs2", "metrics.zs.rte"] <= 1 and of.loc["zs2", "metrics.zs.n"] == 2


def test_export_writes_a_loadable_folder_and_an_exact_sparse_form(first, tmp_path, capsys):
    """``losa export``: the HF folder loads with from_pretrained and scores the cell's perplexity; the sparse form
    restores it bit for bit, and its bytes are the non-zeros' plus one bit per weight (and row offsets)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from flows.cli import main
    from losa import export

    cell = by_method(first.grid)["losa"]
    assert main(["export", str(first.path), cell.id, "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    logged = first.runs[first.runs["tags.losa.cell_id"] == cell.id]["metrics.ppl"].iloc[0]
    exported, cell_ppl = (float(x) for x in printed.split("perplexity: exported folder ")[1].split(", cell "))
    assert math.isclose(exported, logged, rel_tol=1e-4) and math.isclose(cell_ppl, logged, rel_tol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32" / "hf")
    sparse, _ = export.load_sparse(tmp_path / "fp32" / "sparse")
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in sparse.state_dict().items())

    assert main(["export", str(first.path), cell.id, "--out", str(tmp_path / "fp16"), "--no-check"]) == 0
    meta = json.loads((tmp_path / "fp16" / "sparse" / export.SPARSE_META).read_text())
    assert meta["dtype"] == "float16" and meta["ratio_prunable"] <= 0.4  # 70% unstructured
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16" / "hf")
    names = export.prunable_weights(model)
    nnz = sum(int((dict(model.named_parameters())[n] != 0).sum()) for n in names)
    rows_cols = [dict(model.named_parameters())[n].shape for n in names]
    expected = nnz * 2 + sum(r * math.ceil(c / 8) + r * 8 + 2 * 8 for r, c in rows_cols)
    assert meta["nnz"] == nnz and meta["bytes_sparse_prunable"] == expected
    with pytest.raises(SystemExit, match="no cell with id"):
        main(["export", str(first.path), "0" * 12])


def test_disk_formula_matches_what_a_losa_cell_writes(first):
    """flows.preflight.cell_disk (the resource guard's disk need) against the bytes the micro grid's + LoRA and LoSA
    cells stored (Wanda: masks, adapters, recipes, LoSA's final sparse model)."""
    from flows.cell import cell_spec
    from flows.preflight import cell_disk, model_shape

    wrote = {c["key"]: c["bytes"] for c in first.computed}
    for method, count in (("lora", 3), ("losa", 3 * 2)):
        spec = cell_spec(by_method(first.grid)[method], as_task=False)
        written = {r.key: wrote[r.key] for r in stage_refs(spec) if r.stage in ("prune", "finetune", "lora", "merge",
                                                                                "finalize")}
        estimate = cell_disk(model_shape(spec.model), spec.config)
        assert len(written) == count, (method, written)
        assert abs(estimate - sum(written.values())) / sum(written.values()) < 0.05, (method, estimate, written)


def test_a_sparsegpt_losa_cell_holds_one_steps_weights_at_a_time(losa_env, tmp_path, monkeypatch):
    """Under ``retain: shared`` a SparseGPT LoSA cell spills each step's full weights before the next are written.
    A crash right after a spill (the next step's write fails) loses nothing: the relaunch recomputes the spilled step
    (checked against its content hash) and finishes with the in-memory run's result, bit for bit. The store's peak
    over the cell, replayed from its logs, is the disk formula's ``cell_peak`` and well under what the cell wrote."""
    import torch

    from flows.cell import cell_spec
    from flows.grid import losa_grid
    from flows.preflight import cell_disk, cell_peak, model_shape
    from losa.dsa import run_losa
    from losa.models import load_model
    from losa.snapshot import snapshot
    from tasks.store import ArtifactStore

    monkeypatch.setenv("LOSA_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'state').resolve() / 'mlflow.db'}")
    path = write_grid(tmp_path / "grids", ["losa"], dense=False, name="spill", pruner="sparsegpt", retain="shared")
    real, puts = ArtifactStore.put, []

    def crash_after_the_first_spill(store, stage, *args, **kwargs):
        puts.append(stage)
        if stage == "prune" and puts.count("prune") == 2:  # step 2's prune: step 1's weights are spilled by now
            raise RuntimeError("injected crash before step 2's weights are written")
        return real(store, stage, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ArtifactStore, "put", crash_after_the_first_spill)
        assert losa_grid(str(path), return_state=True).is_failed()
    store = ArtifactStore()
    spilled = store.spilled()
    assert [s["stage"] for s in spilled] == ["prune"]
    assert losa_grid(str(path), return_state=True).is_completed()

    computed = store.computed()
    recomputed = [c for c in computed if c.get("recomputed")]
    assert [c["key"] for c in recomputed] == [spilled[0]["key"]]  # step 1's weights, once
    spilled = store.spilled()
    assert len(spilled) == 3  # step 1 twice (before and after the crash), then step 2 before the final is written
    # the store's bytes over the cell, replayed: writes add, spills take away
    snapshots = ("prune", "finetune", "lora", "merge", "finalize")
    events = sorted([(c["time"], c["bytes"]) for c in computed if c["stage"] in snapshots]
                    + [(s["time"], -s["bytes"]) for s in spilled])
    held, peak = 0, 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    written = sum(c["bytes"] for c in computed if c["stage"] in snapshots and not c.get("recomputed"))
    cell = load_grid(path).cells()[0]
    spec = cell_spec(cell, as_task=False)
    shape = model_shape(spec.model)
    assert abs(cell_peak(shape, spec.config) - peak) / peak < 0.05, (cell_peak(shape, spec.config), peak)
    assert abs(cell_disk(shape, spec.config) - written) / written < 0.05 and peak < 0.7 * written, (peak, written)

    model, tokenizer = load_model(spec.model, device="cpu")
    report = run_losa(model, tokenizer, cell.config, progress=False)
    run = mlflow_runs(**{"losa.kind": "cell"}).iloc[0]
    assert run["status"] == "FINISHED" and run["metrics.ppl"] == report.ppl
    final = next(c["key"] for c in computed if c["stage"] == "finalize")
    stored = store.tensors(store.get(final))[0]
    weights = {k: v for k, v in snapshot(model, adapter=False)[0].items() if k.startswith("w.")}
    assert weights and all(torch.equal(weights[k], stored[k]) for k in weights)


def test_two_launches_at_once_on_a_fresh_state_folder(tmp_path):
    """Two `losa grid` processes started together on a fresh state folder (each with its own temporary Prefect
    server, one MLflow database): both finish, every cell has exactly one run, no artifact is written twice."""
    root = Path(__file__).resolve().parents[2]
    path = write_grid(tmp_path / "grids", ["pruned"], name="twice")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "LOSA_ARTIFACTS", "PREFECT_API_URL")}
    env.update(LOSA_HOME=str(state), PREFECT_HOME=str(tmp_path / "prefect"))
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "grid", str(path)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    runs = _runs_by_cell(state)
    assert sorted(runs) == sorted(c.id for c in load_grid(path).cells())
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    exp = client.get_experiment_by_name("losa")
    cells = client.search_runs([exp.experiment_id], "tags.`losa.kind` = 'cell'")
    assert len(cells) == len(runs)  # exactly one run per cell, whatever the interleaving
    parents = client.search_runs([exp.experiment_id], "tags.`losa.kind` = 'grid'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    from tasks.store import ArtifactStore

    computed = ArtifactStore(state / "artifacts").computed()
    assert [k for k, n in Counter(c["key"] for c in computed).items() if n > 1] == []
