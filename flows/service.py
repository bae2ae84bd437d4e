"""A local Prefect server, its process workers and the project's deployments: start (``up``), stop (``down``), inspect.

Everything lives under the project state folder (``$LOSA_HOME`` or ``<repo>/.state``):

    <state>/prefect/            PREFECT_HOME (server SQLite DB, profiles, default result storage)
    <state>/logs/server.log     server output; worker-<pool>-<name>.log for each worker
    <state>/run/server.pid      pid files of the processes ``up`` started; ``down`` reads and removes them

The server listens on 127.0.0.1:$LOSA_PREFECT_PORT (default 4200). Every Prefect process of the project, including
the flow runs a worker spawns (they inherit the worker's environment), gets ``service_env()``.

Only the standard library is imported at module level; Prefect runs as separate processes (the venv's ``prefect``
executable next to ``sys.executable``) and is spoken to over its REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.state import PROJECT_ROOT, state_dir
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
DEFAULT_PORT = 4200
SERVER_TIMEOUT_S = 90.0
WORKER_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 600.0

_CHILDREN: list[subprocess.Popen] = []  # keeps Popen objects alive (no "still running" warnings at exit)


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


def _full_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **service_env(), **extra}


def _prefect() -> str:
    """The venv's ``prefect`` executable (next to the running interpreter), else the one on PATH."""
    exe = Path(sys.executable).parent / "prefect"
    if exe.exists():
        return str(exe)
    found = shutil.which("prefect")
    if not found:
        raise RuntimeError(f"no `prefect` executable next to {sys.executable} nor on PATH")
    return found


def _run_dir() -> Path:
    return state_dir() / "run"


def _log_dir() -> Path:
    return state_dir() / "logs"


def _server_pid_file() -> Path:
    return _run_dir() / "server.pid"


def _worker_pid_file(pool: str, name: str) -> Path:
    return _run_dir() / f"worker-{pool}-{name}.pid"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------------------------------------- processes
def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    """True when ``pid`` runs (not a zombie) and is a Prefect process (guards against a recycled pid)."""
    if not pid or pid <= 0:
        return False
    for child in _CHILDREN:  # started by this process: poll() also reaps it once it has exited
        if child.pid == pid and child.poll() is not None:
            return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            stat = (proc / "stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                return False
            return b"prefect" in (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return False
    if sys.platform.startswith("linux"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _descendants(pid: int) -> list[int]:
    """Pids below ``pid`` (Linux /proc walk): flow runs a process worker spawned in their own sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _spawn(argv: list[str], log: Path, pid_file: Path, **extra_env: str) -> int:
    """Start ``argv`` detached (own session, stdin closed), output appended to ``log``; write its pid file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=_full_env(**extra_env), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN.append(proc)
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def _prefect_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([_prefect(), *args], cwd=PROJECT_ROOT, env=_full_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------- REST API
def _api(method: str, path: str, body: dict | None = None, timeout: float = 5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base_url()}/api{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def healthy() -> bool:
    """True when a Prefect API answers ``/api/health`` on the project's port."""
    try:
        return _api("GET", "/health", timeout=2.0) is True
    except (OSError, ValueError):
        return False


def _pool_exists(pool: str) -> bool:
    try:
        _api("GET", f"/work_pools/{pool}")
        return True
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise


def _online_workers(pool: str) -> set[str]:
    try:
        rows = _api("POST", f"/work_pools/{pool}/workers/filter", {})
    except (OSError, ValueError):
        return set()
    return {w["name"] for w in rows or [] if w.get("status") == "ONLINE"}


def deployments() -> list[str]:
    """``<flow>/<deployment>`` names known to the server (empty when it does not answer)."""
    try:
        flows = {f["id"]: f["name"] for f in _api("POST", "/flows/filter", {"limit": 200})}
        rows = _api("POST", "/deployments/filter", {"limit": 200})
    except (OSError, ValueError):
        return []
    return sorted(f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in rows)


def yaml_pools(path: Path = PREFECT_YAML) -> list[str]:
    """Work pools the deployments in ``prefect.yaml`` name (``prefect deploy`` refuses a pool that does not exist)."""
    import yaml

    if not path.exists():
        return []
    doc = yaml.safe_load(path.read_text()) or {}
    pools = [((d or {}).get("work_pool") or {}).get("name") for d in doc.get("deployments") or []]
    return sorted({p for p in pools if p and "{{" not in p})


# ----------------------------------------------------------------------------------------------------------- commands
def _ensure_server() -> dict:
    pid_file, log = _server_pid_file(), _log_dir() / "server.log"
    pid = _read_pid(pid_file)
    if healthy():
        return {"url": base_url(), "pid": pid if _alive(pid) else None, "started": False, "log": str(log)}
    if not _alive(pid):  # nothing of ours is starting up: start it
        pid_file.unlink(missing_ok=True)
        pid = _spawn([_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port())], log, pid_file)
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while time.monotonic() < deadline:
        if healthy():
            return {"url": base_url(), "pid": pid, "started": True, "log": str(log)}
        if not _alive(pid):
            pid_file.unlink(missing_ok=True)
            raise RuntimeError(f"the Prefect server (pid {pid}) exited before answering {base_url()}/api/health; "
                               f"{log} ends with:\n{_tail(log)}")
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server (pid {pid}) did not answer {base_url()}/api/health within "
                       f"{SERVER_TIMEOUT_S:.0f} s (left running; `losa down` stops it); {log} ends with:\n{_tail(log)}")


def _ensure_pool(pool: str) -> bool:
    """Create the process work pool when missing; True when it was created."""
    if _pool_exists(pool):
        return False
    done = _prefect_cli("work-pool", "create", pool, "--type", "process")
    if done.returncode != 0 and not _pool_exists(pool):
        raise RuntimeError(f"`prefect work-pool create {pool} --type process` failed:\n{done.stdout}{done.stderr}")
    return True


def _ensure_worker(pool: str, name: str, limit: int | None = None, **extra_env: str) -> dict:
    pid_file, log = _worker_pid_file(pool, name), _log_dir() / f"worker-{pool}-{name}.log"
    pid = _read_pid(pid_file)
    if _alive(pid):
        return {"pool": pool, "name": name, "pid": pid, "started": False, "log": str(log)}
    argv = [_prefect(), "worker", "start", "--pool", pool, "--name", name, "--type", "process"]
    if limit:
        argv += ["--limit", str(limit)]
    pid = _spawn(argv, log, pid_file, **extra_env)
    return {"pool": pool, "name": name, "pid": pid, "started": True, "log": str(log), **extra_env}


def _wait_workers(workers: list[dict]) -> None:
    """Wait until every worker is ONLINE in its pool; raise with its log tail when one exits."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    waiting = list(workers)
    while waiting and time.monotonic() < deadline:
        for w in list(waiting):
            if not _alive(w["pid"]):
                _worker_pid_file(w["pool"], w["name"]).unlink(missing_ok=True)
                raise RuntimeError(f"worker {w['name']} (pid {w['pid']}) on pool {w['pool']} exited; "
                                   f"{w['log']} ends with:\n{_tail(Path(w['log']))}")
            if w["name"] in _online_workers(w["pool"]):
                waiting.remove(w)
        if waiting:
            time.sleep(0.5)
    if waiting:
        raise RuntimeError(f"workers {[w['name'] for w in waiting]} did not come ONLINE within "
                           f"{WORKER_TIMEOUT_S:.0f} s (left running; `losa down` stops them)")


def up(pool: str = "losa-pool", workers: int = 1, deploy: bool = True, gpu_workers: int = 0,
       gpu_pool: str = "losa-gpu") -> dict:
    """Start (or reuse) the local server, ``workers`` process workers ``local-<i>`` on ``pool`` and, when asked,
    ``gpu_workers`` workers ``gpu-<i>`` on ``gpu_pool`` (``CUDA_VISIBLE_DEVICES=i``, one flow run at a time); then
    ``prefect --no-prompt deploy --all`` from the repo root. Idempotent. Returns what is running."""
    if workers < 0 or gpu_workers < 0:
        raise ValueError("workers and gpu_workers must be >= 0")
    t0 = time.monotonic()
    for sub in ("prefect", "logs", "run"):
        (state_dir() / sub).mkdir(parents=True, exist_ok=True)
    server = _ensure_server()
    server["ready_s"] = round(time.monotonic() - t0, 1)
    pools = sorted({pool, *([gpu_pool] if gpu_workers else []), *(yaml_pools() if deploy else [])})
    created = [p for p in pools if _ensure_pool(p)]
    started = [_ensure_worker(pool, f"local-{i}") for i in range(1, workers + 1)]
    started += [_ensure_worker(gpu_pool, f"gpu-{i}", limit=1, CUDA_VISIBLE_DEVICES=str(i))
                for i in range(gpu_workers)]
    deploy_s = None
    if deploy:
        if not PREFECT_YAML.exists():
            raise RuntimeError(f"{PREFECT_YAML} not found: nothing to deploy")
        t1 = time.monotonic()
        done = _prefect_cli("--no-prompt", "deploy", "--all", timeout=DEPLOY_TIMEOUT_S)
        (_log_dir() / "deploy.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"`prefect --no-prompt deploy --all` failed (exit {done.returncode}; server and "
                               f"workers left running):\n{(done.stdout + done.stderr)[-4000:]}")
        deploy_s = round(time.monotonic() - t1, 1)
    _wait_workers([w for w in started if w["started"]])
    now = status()
    return {**now, "server": {**now["server"], **server}, "pools_created": created, "deploy_s": deploy_s,
            "total_s": round(time.monotonic() - t0, 1)}


def _stop_worker(pid_file: Path) -> str:
    label = pid_file.stem.removeprefix("worker-")
    pid = _read_pid(pid_file)
    if not _alive(pid):
        pid_file.unlink(missing_ok=True)
        return f"worker {label}: not running (stale pid file {pid} removed)"
    runs = _descendants(pid)
    _signal(pid, signal.SIGINT)  # a process worker only logs the first signal ...
    how = "SIGINT"
    if not _wait_gone(pid, 2.0):
        _signal(pid, signal.SIGINT)  # ... and exits on the second
        how = "SIGINT x2"
        if not _wait_gone(pid, 10.0):
            _signal(pid, signal.SIGKILL)
            how += " + SIGKILL"
            _wait_gone(pid, 5.0)
    leftovers = [p for p in runs if _alive(p)]  # flow runs it spawned (their own sessions)
    for p in leftovers:
        _signal(p, signal.SIGTERM)
    for p in leftovers:
        if not _wait_gone(p, 5.0):
            _signal(p, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    extra = f"; {len(leftovers)} flow-run process(es) ended too" if leftovers else ""
    return f"worker {label} (pid {pid}) stopped ({how}){extra}"


def _stop_server() -> str | None:
    pid_file = _server_pid_file()
    if not pid_file.exists():
        return f"server at {base_url()} left running (not started by losa)" if healthy() else None
    pid = _read_pid(pid_file)
    if not _alive(pid):
        pid_file.unlink(missing_ok=True)
        return f"server: not running (stale pid file {pid} removed)"
    _signal(pid, signal.SIGTERM)
    how = "SIGTERM"
    if not _wait_gone(pid, 20.0):
        _signal(pid, signal.SIGKILL)
        how += " + SIGKILL"
        _wait_gone(pid, 5.0)
    pid_file.unlink(missing_ok=True)
    return f"server {base_url()} (pid {pid}) stopped ({how})"


def down() -> list[str]:
    """Stop the workers (two SIGINTs, then SIGKILL) and the server (SIGTERM) that ``up`` started; remove their pid
    files. Returns one line per thing stopped or cleaned; an empty list when nothing ran."""
    run = _run_dir()
    report = [_stop_worker(f) for f in sorted(run.glob("worker-*.pid"))] if run.is_dir() else []
    server = _stop_server()
    return report + ([server] if server else [])


def status() -> dict:
    """Server health and pid, workers (pid files) with liveness, deployments known to the server."""
    run = _run_dir()
    pid = _read_pid(_server_pid_file())
    ok = healthy()
    workers = []
    for f in sorted(run.glob("worker-*.pid")) if run.is_dir() else []:
        wpid = _read_pid(f)
        workers.append({"worker": f.stem.removeprefix("worker-"), "pid": wpid, "alive": _alive(wpid),
                        "log": str(_log_dir() / f"{f.stem}.log")})
    return {
        "state_dir": str(state_dir()),
        "api_url": f"{base_url()}/api",
        "ui_url": base_url(),
        "server": {"healthy": ok, "pid": pid, "alive": _alive(pid), "log": str(_log_dir() / "server.log")},
        "workers": workers,
        "deployments": deployments() if ok else [],
    }
