"""Screenshots of the MLflow and Prefect UIs on the state of a finished grid, in headless Chromium.

So every change to tracking can be looked at, not guessed (not run in CI). Starts ``mlflow ui`` on the project's
MLflow store and ``prefect server start`` on its Prefect home (both on 127.0.0.1, on ports of their own, stopped at
the end), opens the pages a newcomer opens first and saves a PNG of each:

    runs.png        the experiment's runs table
    losa-run.png    one +LoSA cell's run page
    metrics.png     that run's metric charts (train_loss among a dozen summary metrics)
    loss.png        that run's training loss with the DSA steps marked (the plot losa-tables logs)
    parent.png      the grid's parent run
    prefect.png     the Prefect flow-runs page

    .venv/bin/python benchmarks/ui_screenshots.py --grid smollm2 --out docs/screenshots

Needs Debian's ``chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.state import state_dir  # noqa: E402


def _wait(url: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def _shot(browser: str, url: str, path: Path, budget_ms: int, height: int = 1000) -> Path:
    # compositor stages before draw: without it the charts are still spinners when the picture is taken
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--run-all-compositor-stages-before-draw", f"--window-size=1600,{height}",
                    f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{path}  <- {url}")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="smollm2")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--mlflow-port", type=int, default=5055)
    ap.add_argument("--prefect-port", type=int, default=4255)
    ap.add_argument("--budget-ms", type=int, default=20000, help="virtual time each page gets to render")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs chromium (apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dir()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("losa")
    if exp is None:
        raise SystemExit(f"no losa experiment in {uri}: run a grid first")
    runs = client.search_runs([exp.experiment_id], f"tags.`losa.grid` = '{args.grid}' and tags.`losa.label` = '+LoSA'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`losa.kind` = 'grid' and tags.`losa.grid` = '{args.grid}'", max_results=1)
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    procs = [subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(args.mlflow_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)]
    from flows import service

    # the project's server (`losa up`) if it runs: a second server on the same SQLite database would contend for it
    prefect_url = service.base_url() if service.healthy() else f"http://127.0.0.1:{args.prefect_port}"
    if not service.healthy():
        procs.append(subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                       "127.0.0.1", "--port", str(args.prefect_port)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env))
    try:
        mlflow_url = f"http://127.0.0.1:{args.mlflow_port}"
        _wait(mlflow_url)
        _wait(f"{prefect_url}/api/health")
        e = exp.experiment_id
        shots = [_shot(browser, f"{mlflow_url}/#/experiments/{e}/runs", out / "runs.png", args.budget_ms)]
        if runs:
            rid = runs[0].info.run_id
            shots.append(_shot(browser, f"{mlflow_url}/#/experiments/{e}/runs/{rid}", out / "losa-run.png",
                               args.budget_ms))
            shots.append(_shot(browser, f"{mlflow_url}/#/experiments/{e}/runs/{rid}/model-metrics", out / "metrics.png",
                               args.budget_ms, height=2200))
            plots = [a.path for a in client.list_artifacts(rid, "plots") if a.path.startswith("plots/loss_")]
            if plots:  # the loss with the DSA steps marked, as losa-tables draws it
                shots.append(_shot(browser, f"{mlflow_url}/#/experiments/{e}/runs/{rid}/artifacts/{plots[0]}",
                                   out / "loss.png", args.budget_ms))
        if parents:
            shots.append(_shot(browser, f"{mlflow_url}/#/experiments/{e}/runs/{parents[0].info.run_id}",
                               out / "parent.png", args.budget_ms))
        shots.append(_shot(browser, f"{prefect_url}/runs", out / "prefect.png", args.budget_ms))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"{len(shots)} screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
