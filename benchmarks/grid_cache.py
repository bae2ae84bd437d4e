"""Cold vs warm run of a grid through Prefect: cache effectiveness and orchestration overhead.

Prints, for one grid (default: the testbed grid) in a fresh state folder:
- cold wall time, and the summed compute time of the stages that ran (from the artifact store's log);
- orchestration overhead = cold wall - summed stage time (target <= 5 %);
- warm rerun wall time (target <= 2 % of cold) and how many stages it computed (target 0);
- how many times each stage was computed (calibration: one per model and calibration set).

    .venv/bin/python benchmarks/grid_cache.py [--grid testbed] [--state DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="testbed")
    p.add_argument("--state", default=None, help="state folder (default: a fresh one under .state/bench)")
    p.add_argument("--keep", action="store_true", help="keep the state folder")
    args = p.parse_args()

    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="grid-cache-", dir=ROOT / ".state"))
    os.environ.update(LOSA_HOME=str(state), PREFECT_HOME=str(state / "prefect"), MLFLOW_DISABLE_TELEMETRY="true",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HOME=str(state / "hf"),
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LOSA_ARTIFACTS"):
        os.environ.pop(var, None)
    (state / "prefect").mkdir(parents=True, exist_ok=True)

    from prefect import flow

    from flows.grid import losa_grid
    from flows.spec import load_grid
    from tasks.store import ArtifactStore

    @flow(name="warm-up")
    def warm_up() -> None:  # starts the temporary API server outside the timings
        return None

    warm_up()
    spec = load_grid(args.grid)
    store = ArtifactStore()

    t = time.perf_counter()
    losa_grid(args.grid, tables=False)
    cold = time.perf_counter() - t
    log = store.computed()
    stage_time = sum(e["seconds"] or 0.0 for e in log)
    counts = collections.Counter(e["stage"] for e in log)

    t = time.perf_counter()
    losa_grid(args.grid, tables=False)
    warm = time.perf_counter() - t
    rerun = store.computed()[len(log):]

    models = {c.model for c in spec.cells()}
    calib_sets = {(c.model, c.config.nsamples, c.config.seqlen, c.config.seed) for c in spec.cells()
                  if c.config.method != "dense"}
    print(f"\ngrid {spec.name}: {len(spec.cells())} cells, {len(models)} model(s), state {state}")
    print(f"cold run:            {cold:8.1f} s wall, {stage_time:8.1f} s in {len(log)} stage computations")
    print(f"orchestration:       {cold - stage_time:8.1f} s = {(cold - stage_time) / cold:6.1%} of cold (target <= 5%)")
    print(f"warm rerun:          {warm:8.1f} s = {warm / cold:6.1%} of cold (target <= 2%), "
          f"{len(rerun)} stages computed (target 0)")
    print(f"calibration:         computed {counts['calibration']} time(s) for {len(calib_sets)} "
          f"(model, calibration set) pair(s) (target: one each)")
    print("stage computations:  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if not args.keep and not args.state:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
