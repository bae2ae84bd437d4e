"""A local Prefect server, its process workers and the project's deployments, with Prefect's own tools.

- Server: ``prefect server start --background`` (its pid file is Prefect's, ``$PREFECT_HOME/server.pid``) and
  ``prefect server stop``; health, work pools, workers and deployments through the Python client (``get_client()``).
- Deployments are built from code (``Flow.from_source(<repo>, entrypoint).deploy(...)``; the local source makes
  workers on this machine run the code where it lies): the fixed ones ``prefect.yaml`` declares, plus one
  ``losa-grid/<grid>`` per grid file in ``experiments/*.yaml`` (from the ``definitions.grid`` template there), so a
  new grid file is deployable without editing anything.
- Workers: Prefect has no background mode for them, so ``up`` starts ``prefect worker start`` processes (output in
  ``<state>/logs/worker-<pool>-<name>.log``) and ``down`` finds them by their command line and ``LOSA_HOME`` and stops
  them the way Prefect's worker CLI handles signals (the first SIGTERM drains, the second ends it).

Everything lives under the project state folder (``$LOSA_HOME`` or ``<repo>/.state``); the server listens on
127.0.0.1:$LOSA_PREFECT_PORT (default 4200). Every Prefect process of the project, including the flow runs a worker
spawns (they inherit the worker's environment), gets ``service_env()``. Prefect is imported where it is used.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.state import PROJECT_ROOT, state_dir

PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
DEFAULT_PORT = 4200
SERVER_TIMEOUT_S = 90.0
WORKER_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------------------------------------- paths/env
def port() -> int:
    value = os.environ.get("LOSA_PREFECT_PORT", str(DEFAULT_PORT))
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"LOSA_PREFECT_PORT must be a port number, got {value!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"LOSA_PREFECT_PORT must be in 1..65535, got {number}")
    return number


def base_url() -> str:
    return f"http://127.0.0.1:{port()}"


def service_env() -> dict[str, str]:
    """The variables every Prefect process of the project needs (merge them over ``os.environ``)."""
    state = state_dir()
    env = {
        "LOSA_HOME": str(state),
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_URL": f"{base_url()}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HOME": str(state / "hf"),
        "TORCHINDUCTOR_CACHE_DIR": str(state / "torchinductor"),
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    return env


def _prefect() -> str:
    """The venv's ``prefect`` executable (next to the running interpreter), else the one on PATH."""
    exe = Path(sys.executable).parent / "prefect"
    if exe.exists():
        return str(exe)
    found = shutil.which("prefect")
    if not found:
        raise RuntimeError(f"no `prefect` executable next to {sys.executable} nor on PATH")
    return found


def _prefect_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    # its own session: a server it starts in the background outlives this process and its terminal
    return subprocess.run([_prefect(), *args], cwd=PROJECT_ROOT, env={**os.environ, **service_env()},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def _log_dir() -> Path:
    return state_dir() / "logs"


def _server_pid_file() -> Path:
    return state_dir() / "prefect" / "server.pid"  # where `prefect server start --background` writes it


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------------------------------- client
@contextmanager
def _client(timeout: float = 5.0) -> Iterator:
    """Prefect's sync client, pointed at this project's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"{base_url()}/api"}):
        with get_client(sync_client=True, httpx_settings={"timeout": timeout}) as client:
            yield client


def healthy() -> bool:
    """True when a Prefect API answers on the project's port."""
    try:
        with _client(timeout=2.0) as client:
            return client.api_healthcheck() is None
    except Exception:  # noqa: BLE001 - no server, or not one we can talk to
        return False


def deployments() -> list[str]:
    """``<flow>/<deployment>`` names known to the server (empty when it does not answer)."""
    try:
        with _client() as client:
            flows = {f.id: f.name for f in client.read_flows()}
            return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in client.read_deployments())
    except Exception:  # noqa: BLE001
        return []


def _online_workers(pool: str) -> set[str]:
    try:
        with _client() as client:
            return {w.name for w in client.read_workers_for_work_pool(pool) if str(w.status.value) == "ONLINE"}
    except Exception:  # noqa: BLE001
        return set()


def _ensure_pool(pool: str) -> bool:
    """Create the process work pool when missing; True when it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with _client() as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # created concurrently
            return False
    return True


# ----------------------------------------------------------------------------------------------------------- deployments
def deployment_specs(grids: list[str] | None = None) -> list[dict]:
    """Every deployment ``up`` creates: one ``losa-grid/<grid>`` per grid file (``definitions.grid`` of
    ``prefect.yaml`` with ``parameters: {grid: <name>}``), then the deployments ``prefect.yaml`` lists."""
    import yaml

    from flows.spec import list_grids

    doc = yaml.safe_load(PREFECT_YAML.read_text()) or {}
    template = doc.get("definitions", {}).get("grid")
    if template is None:
        raise RuntimeError(f"{PREFECT_YAML}: no definitions.grid template for the losa-grid/<grid> deployments")
    names = list_grids() if grids is None else grids
    generated = [{**template, "name": g, "parameters": {"grid": g}} for g in names]
    return generated + list(doc.get("deployments") or [])


def spec_pools(specs: list[dict] | None = None) -> list[str]:
    """The work pools the deployments name (each must exist before a deployment can point at it)."""
    specs = deployment_specs() if specs is None else specs
    return sorted({d["work_pool"]["name"] for d in specs if d.get("work_pool")})


def deploy(specs: list[dict] | None = None) -> list[str]:
    """Create or update every deployment from code, with the repo as local source; returns their names."""
    from prefect import Flow
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL, temporary_settings

    specs = deployment_specs() if specs is None else specs
    names = []
    with temporary_settings(updates={PREFECT_API_URL: f"{base_url()}/api"}):
        flows = {}
        for d in specs:  # (Prefect prints a table per deployment: kept out of the command's output)
            if d["entrypoint"] not in flows:
                flows[d["entrypoint"]] = Flow.from_source(source=str(PROJECT_ROOT), entrypoint=d["entrypoint"])
            flow = flows[d["entrypoint"]]
            schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                         for s in d.get("schedules") or []]
            with contextlib.redirect_stdout(io.StringIO()):
                flow.deploy(name=d["name"], work_pool_name=d["work_pool"]["name"],
                            job_variables=d["work_pool"].get("job_variables") or None,
                            parameters=d.get("parameters"), description=d.get("description"), tags=d.get("tags"),
                            schedules=schedules or None, build=False, push=False, print_next_steps=False,
                            ignore_warnings=True)
            names.append(f"{flow.name}/{d['name']}")
    return names


# ----------------------------------------------------------------------------------------------------------- workers
def _workers() -> list:
    """This state folder's running ``prefect worker start`` processes (psutil.Process), found by command line and
    ``LOSA_HOME``."""
    import psutil

    state = str(state_dir())
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not any(a.endswith("prefect") for a in cmd) or "worker" not in cmd or "start" not in cmd:
            continue
        try:
            if proc.environ().get("LOSA_HOME") == state and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _worker_label(proc) -> str:
    cmd = proc.info.get("cmdline") or proc.cmdline()
    opt = lambda flag: cmd[cmd.index(flag) + 1] if flag in cmd[:-1] else "?"  # noqa: E731
    return f"{opt('--pool')}-{opt('--name')}"


def _ensure_worker(pool: str, name: str, running: set[str], limit: int | None = None, **extra_env: str) -> dict:
    log = _log_dir() / f"worker-{pool}-{name}.log"
    if f"{pool}-{name}" in running:
        return {"pool": pool, "name": name, "started": False, "log": str(log)}
    argv = [_prefect(), "worker", "start", "--pool", pool, "--name", name, "--type", "process"]
    if limit:
        argv += ["--limit", str(limit)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env={**os.environ, **service_env(), **extra_env},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return {"pool": pool, "name": name, "pid": proc.pid, "started": True, "log": str(log), "_proc": proc,
            **extra_env}


def _wait_workers(workers: list[dict]) -> None:
    """Wait until every worker is ONLINE in its pool; raise with its log tail when one exits."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    waiting = list(workers)
    while waiting and time.monotonic() < deadline:
        for w in list(waiting):
            if w["_proc"].poll() is not None:
                raise RuntimeError(f"worker {w['name']} (pid {w['pid']}) on pool {w['pool']} exited; "
                                   f"{w['log']} ends with:\n{_tail(Path(w['log']))}")
            if w["name"] in _online_workers(w["pool"]):
                waiting.remove(w)
        if waiting:
            time.sleep(0.5)
    if waiting:
        raise RuntimeError(f"workers {[w['name'] for w in waiting]} did not come ONLINE within "
                           f"{WORKER_TIMEOUT_S:.0f} s (left running; `losa down` stops them)")


def _stop_worker(proc) -> str:
    """Prefect's worker CLI drains on the first SIGTERM and ends on the second; flow runs it spawned (their own
    sessions) are ended after it."""
    import psutil

    label = _worker_label(proc)
    try:
        runs = proc.children(recursive=True)
        proc.terminate()
        how = "SIGTERM"
        if not _gone(proc, 2.0):
            proc.terminate()
            how = "SIGTERM x2"
            if not _gone(proc, 10.0):
                proc.kill()
                how += " + SIGKILL"
    except psutil.NoSuchProcess:
        return f"worker {label} (pid {proc.pid}) stopped (exited)"
    leftovers = [p for p in runs if p.is_running()]
    for p in leftovers:
        p.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for p in alive:
        p.kill()
    extra = f"; {len(leftovers)} flow-run process(es) ended too" if leftovers else ""
    return f"worker {label} (pid {proc.pid}) stopped ({how}){extra}"


def _gone(proc, seconds: float) -> bool:
    import psutil

    try:
        proc.wait(timeout=seconds)
        return True
    except psutil.TimeoutExpired:
        return False
    except psutil.NoSuchProcess:
        return True


# ----------------------------------------------------------------------------------------------------------- server
def _ensure_server() -> dict:
    if healthy():
        return {"url": base_url(), "started": False}
    (state_dir() / "prefect").mkdir(parents=True, exist_ok=True)
    if _server_pid_file().exists():  # a background server of ours that no longer answers (crashed or starting)
        _prefect_cli("server", "stop")
    done = _prefect_cli("server", "start", "--background", "--host", "127.0.0.1", "--port", str(port()))
    if done.returncode != 0:
        raise RuntimeError(f"`prefect server start --background` failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while time.monotonic() < deadline:
        if healthy():
            return {"url": base_url(), "started": True}
        if not _server_pid_file().exists():
            raise RuntimeError(f"the Prefect server exited before answering {base_url()}/api/health:\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer {base_url()}/api/health within {SERVER_TIMEOUT_S:.0f} s "
                       "(left running; `losa down` stops it)")


def _stop_server() -> str | None:
    if not _server_pid_file().exists():
        return f"server at {base_url()} left running (not started by losa)" if healthy() else None
    done = _prefect_cli("server", "stop")
    said = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0:
        raise RuntimeError(f"`prefect server stop` failed (exit {done.returncode}): {' '.join(said)}")
    deadline = time.monotonic() + 20.0
    while healthy() and time.monotonic() < deadline:
        time.sleep(0.2)
    return f"server {base_url()}: {said[-1] if said else 'stopped'} (prefect server stop)"


# ----------------------------------------------------------------------------------------------------------- commands
def up(pool: str = "losa-pool", workers: int = 1, deploy_all: bool = True, gpu_workers: int = 0,
       gpu_pool: str = "losa-gpu") -> dict:
    """Start (or reuse) the local server, ``workers`` process workers ``local-<i>`` on ``pool`` and, when asked,
    ``gpu_workers`` workers ``gpu-<i>`` on ``gpu_pool`` (``CUDA_VISIBLE_DEVICES=i``, one flow run at a time); then
    create every deployment (:func:`deploy`). Idempotent. Returns what is running."""
    if workers < 0 or gpu_workers < 0:
        raise ValueError("workers and gpu_workers must be >= 0")
    t0 = time.monotonic()
    for sub in ("prefect", "logs"):
        (state_dir() / sub).mkdir(parents=True, exist_ok=True)
    server = _ensure_server()
    server["ready_s"] = round(time.monotonic() - t0, 1)
    specs = deployment_specs() if deploy_all else []
    created = [p for p in sorted({pool, *([gpu_pool] if gpu_workers else []), *spec_pools(specs)}) if _ensure_pool(p)]
    running = {_worker_label(p) for p in _workers()}
    started = [_ensure_worker(pool, f"local-{i}", running) for i in range(1, workers + 1)]
    started += [_ensure_worker(gpu_pool, f"gpu-{i}", running, limit=1, CUDA_VISIBLE_DEVICES=str(i))
                for i in range(gpu_workers)]
    deploy_s = None
    if deploy_all:
        t1 = time.monotonic()
        deploy(specs)
        deploy_s = round(time.monotonic() - t1, 1)
    _wait_workers([w for w in started if w["started"]])
    now = status()
    return {**now, "server": {**now["server"], **server}, "pools_created": created, "deploy_s": deploy_s,
            "workers_started": [{k: v for k, v in w.items() if k != "_proc"} for w in started if w["started"]],
            "total_s": round(time.monotonic() - t0, 1)}


def down() -> list[str]:
    """Stop this state folder's workers and the background server ``up`` started (``prefect server stop``).
    Returns one line per thing stopped or cleaned; an empty list when nothing ran."""
    report = [_stop_worker(p) for p in _workers()]
    server = _stop_server()
    return report + ([server] if server else [])


def status() -> dict:
    """Server health, this state folder's workers, deployments known to the server."""
    ok = healthy()
    pid_file = _server_pid_file()
    return {
        "state_dir": str(state_dir()),
        "api_url": f"{base_url()}/api",
        "ui_url": base_url(),
        "server": {"healthy": ok, "background": pid_file.exists(),
                   "pid": int(pid_file.read_text()) if pid_file.exists() and pid_file.read_text().strip().isdigit()
                   else None},
        "workers": [{"worker": _worker_label(p), "pid": p.pid,
                     "log": str(_log_dir() / f"worker-{_worker_label(p)}.log")} for p in _workers()],
        "deployments": deployments() if ok else [],
    }
