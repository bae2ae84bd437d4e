"""prefect.yaml, prefect.toml and flows/service.py without a server: the deployments ``losa up`` creates (one per grid
file), the environment every Prefect process gets, and ``down()`` when nothing (or only a stale server pid file, or
a stubborn worker) is left."""

import ast
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from flows import service
from flows.spec import list_grids

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = re.compile(r"^flows/(\w+)\.py:(\w+)$")


@pytest.fixture(scope="module")
def deployments() -> list[dict]:
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert doc["name"] == "losa" and doc["prefect-version"] == "3.9.1"
    assert doc["build"] is None and doc["push"] is None
    return service.deployment_specs()


def _by_entrypoint(deployments, entrypoint):
    return [d for d in deployments if d["entrypoint"] == entrypoint]


def test_every_deployment_has_a_flows_entrypoint_and_a_pool(deployments):
    assert len(deployments) == len(list_grids()) + 3
    for d in deployments:
        assert ENTRYPOINT.match(d["entrypoint"]), d
        assert d["name"] and d["work_pool"]["name"] in {"losa-pool", "losa-gpu"}, d
    assert service.spec_pools() == ["losa-gpu", "losa-pool"]


def test_one_grid_deployment_per_grid_file(deployments):
    grid = _by_entrypoint(deployments, "flows/grid.py:losa_grid")
    assert [d["name"] for d in grid] == list_grids() and len(list_grids()) >= 13
    assert all(d["parameters"] == {"grid": d["name"]} for d in grid)
    assert all(d["work_pool"]["name"] == "losa-pool" for d in grid)


def test_a_new_grid_file_is_deployable_without_editing_prefect_yaml(tmp_path, monkeypatch):
    import flows.spec

    (tmp_path / "my-new-grid.yaml").write_text("models: [testbed]\n")
    monkeypatch.setattr(flows.spec, "GRIDS_DIR", tmp_path)
    grid = _by_entrypoint(service.deployment_specs(), "flows/grid.py:losa_grid")
    assert [(d["name"], d["parameters"]) for d in grid] == [("my-new-grid", {"grid": "my-new-grid"})]


def test_cell_tables_and_nightly(deployments):
    (cell,) = _by_entrypoint(deployments, "flows/cell.py:losa_cell")
    assert cell["name"] == "losa-cell" and cell["work_pool"]["name"] == "losa-gpu"
    (tables,) = _by_entrypoint(deployments, "flows/grid.py:losa_tables")
    assert tables["name"] == "testbed" and tables["parameters"] == {"grid": "testbed"}
    (nightly,) = _by_entrypoint(deployments, "flows/grid.py:losa_regression")
    assert nightly["name"] == "nightly" and nightly["parameters"] == {"grid": "testbed"}
    (schedule,) = nightly["schedules"]
    assert schedule == {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    for d in deployments:  # only the nightly runs on its own
        assert d is nightly or not d.get("schedules")


def test_entrypoints_name_flows_of_that_name(deployments):
    """The function is defined and decorated ``@flow(name=<func with - for _>)``, so the deployment is
    ``<that name>/<deployment>`` (``losa-grid/testbed``, ``losa-cell/losa-cell``, ...)."""
    for entrypoint in sorted({d["entrypoint"] for d in deployments}):
        file, func = entrypoint.split(":")
        defs = {n.name: n for n in ast.walk(ast.parse((ROOT / file).read_text()))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert func in defs, f"{entrypoint}: no function {func}"
        names = [kw.value.value for dec in defs[func].decorator_list if isinstance(dec, ast.Call)
                 for kw in dec.keywords if kw.arg == "name" and isinstance(kw.value, ast.Constant)]
        assert names == [func.replace("_", "-")], f"{entrypoint}: flow name {names}"


def test_prefect_toml_home_matches_service_env(monkeypatch):
    conf = tomllib.loads((ROOT / "prefect.toml").read_text())
    assert conf["server"]["analytics_enabled"] is False
    assert conf["server"]["ephemeral"]["startup_timeout_seconds"] >= 60
    monkeypatch.delenv("LOSA_HOME", raising=False)
    assert Path(service.service_env()["PREFECT_HOME"]) == ROOT / conf["home"]


def test_service_env_keeps_everything_under_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    monkeypatch.delenv("LOSA_PREFECT_PORT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = service.service_env()
    assert service.state_dir() == tmp_path.resolve()
    assert env["LOSA_HOME"] == str(tmp_path.resolve())
    for key in ("PREFECT_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert Path(env[key]).is_relative_to(tmp_path.resolve()), key
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == "2"
    assert "MLFLOW_TRACKING_URI" not in env

    monkeypatch.setenv("LOSA_PREFECT_PORT", "4291")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/mlflow.db")
    env = service.service_env()
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4291/api"
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////somewhere/mlflow.db"

    monkeypatch.setenv("LOSA_PREFECT_PORT", "http")
    with pytest.raises(ValueError, match="LOSA_PREFECT_PORT"):
        service.service_env()


@pytest.fixture
def idle_state(tmp_path, monkeypatch):
    """A state dir of its own and a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("LOSA_HOME", str(tmp_path))
    monkeypatch.setenv("LOSA_PREFECT_PORT", str(free))
    return tmp_path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_down_with_nothing_running(idle_state):
    assert service.down() == []
    status = service.status()
    assert status["server"]["healthy"] is False and status["workers"] == [] and status["deployments"] == []


def test_down_cleans_a_stale_server_pid_file(idle_state):
    """``prefect server stop`` (Prefect's own command) removes the pid file of a background server that is gone."""
    pid_file = idle_state / "prefect" / "server.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(str(_dead_pid()))
    (report,) = service.down()
    assert "prefect server stop" in report and "stale" in report.lower()
    assert not pid_file.exists()
    assert service.down() == []


def test_down_stops_a_worker_on_its_second_sigterm_and_the_background_server(idle_state):
    """A process worker drains on the first SIGTERM and ends on the second; ``down`` finds it by its command line
    and LOSA_HOME (fake processes, no Prefect)."""
    stubborn = ("import signal, sys, time  # prefect worker stand-in: drains on the first SIGTERM\n"
                "hits = []\n"
                "def on_term(*_):\n"
                "    hits.append(1)\n"
                "    if len(hits) > 1: sys.exit(0)\n"
                "signal.signal(signal.SIGTERM, on_term)\n"
                "print('ready', flush=True)\n"
                "while True: time.sleep(0.05)\n")
    server = "import time  # prefect server stand-in\nprint('ready', flush=True)\ntime.sleep(60)\n"
    env = {**os.environ, "LOSA_HOME": str(idle_state)}
    worker_argv = [sys.executable, "-c", stubborn, "/x/bin/prefect", "worker", "start", "--pool", "losa-pool",
                   "--name", "local-1"]
    other_state = [sys.executable, "-c", server, "/x/bin/prefect", "worker", "start", "--pool", "losa-pool",
                   "--name", "local-9"]
    procs = [subprocess.Popen(worker_argv, stdout=subprocess.PIPE, text=True, env=env),
             subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True),
             subprocess.Popen(other_state, stdout=subprocess.PIPE, text=True,
                              env={**env, "LOSA_HOME": str(idle_state / "elsewhere")})]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        assert [w["worker"] for w in service.status()["workers"]] == ["losa-pool-local-1"]
        pid_file = idle_state / "prefect" / "server.pid"
        pid_file.parent.mkdir(parents=True)
        pid_file.write_text(str(procs[1].pid))
        report = service.down()
        assert report[0].startswith("worker losa-pool-local-1") and "SIGTERM x2)" in report[0]
        assert report[1].startswith("server") and "prefect server stop" in report[1]
        assert procs[0].wait(5) == 0 and procs[1].wait(5) == -15
        assert not pid_file.exists() and procs[2].poll() is None  # another state folder's worker is left alone
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
