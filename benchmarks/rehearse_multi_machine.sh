#!/usr/bin/env bash
# A lab that outgrew one machine, rehearsed on this one with the real components (not run in CI):
#   - one MLflow tracking server (SQLite backend, artifacts proxied to S3),
#   - one S3-compatible object store (moto in server mode) as the artifact store of losa (LOSA_ARTIFACTS),
#   - one Prefect server with the deployments (the "head"),
#   - two Prefect process workers on the cell pool, each with its OWN state folder (two "machines"),
#   - `losa grid <grid> --dispatch deployment`: every cell a losa-cell flow run, picked up by either worker.
# Then checks: the grid finished, one MLflow run per cell on the server, the artifacts in S3, the store shared.
#
#   .venv/bin/pip install 'moto[server]' s3fs      # once (not project dependencies)
#   benchmarks/rehearse_multi_machine.sh [grid-file]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
R=${REHEARSAL_DIR:-$(mktemp -d /tmp/losa-rehearsal.XXXX)}
GRID=${1:-$R/rehearsal.yaml}
S3_PORT=5900 MLFLOW_PORT=5901 PREFECT_PORT=4330
mkdir -p "$R"
if [ ! -f "$GRID" ]; then
  cat > "$GRID" <<'EOF'
name: rehearsal
description: multi-machine rehearsal (micro budget)
table: table1
models: [testbed]
fixed: {nsamples: 8, seqlen: 64, calib_batch_size: 8, rmi_samples: 8, steps: 2, train_steps: 2, final_train_steps: 3,
        eval_seqlen: 128, eval_batch_size: 8, eval_windows: 8, finetune: {batch_size: 2, seqlen: 64}}
axes: {sparsity: [0.7], pruner: [wanda], method: [pruned, lora, losa]}
include: [{method: dense}]
EOF
fi
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT          # botocore and s3fs both read it
export MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL FSSPEC_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export LOSA_ARTIFACTS=s3://losa-artifacts/store
export LOSA_PREFECT_PORT=$PREFECT_PORT PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  LOSA_HOME=$R/head "$VENV/bin/losa" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$VENV/bin/moto_server" -H 127.0.0.1 -p $S3_PORT >"$R/moto.log" 2>&1 & pids+=($!)
sleep 3
"$VENV/bin/python" - <<'EOF'
import boto3
s3 = boto3.client("s3")
for b in ("losa-artifacts", "losa-mlflow"):
    s3.create_bucket(Bucket=b)
print("buckets:", [b["Name"] for b in s3.list_buckets()["Buckets"]])
EOF
"$VENV/bin/mlflow" server --backend-store-uri "sqlite:///$R/mlflow.db" --artifacts-destination s3://losa-mlflow/ \
  --host 127.0.0.1 --port $MLFLOW_PORT >"$R/mlflow.log" 2>&1 & pids+=($!)
for _ in $(seq 60); do curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null && break; sleep 1; done

# the head: Prefect server + deployments, no local worker
LOSA_HOME=$R/head "$VENV/bin/losa" up --workers 0 >"$R/up.log"
# two "machines": a worker each, each with its own state folder (its own locks, caches, logs)
for m in 1 2; do
  LOSA_HOME=$R/machine-$m PREFECT_HOME=$R/machine-$m/prefect \
    "$VENV/bin/prefect" worker start --pool losa-gpu --name machine-$m --type process --limit 1 \
    >"$R/worker-$m.log" 2>&1 & pids+=($!)
done
sleep 15
start=$(date +%s)
LOSA_HOME=$R/head "$VENV/bin/losa" grid "$GRID" --dispatch deployment | tail -20
echo "grid over two workers: $(( $(date +%s) - start )) s"

"$VENV/bin/python" - "$R" "$GRID" <<'EOF'
import collections, sys
import boto3, mlflow
from pathlib import Path
from flows.spec import load_grid
r, grid = Path(sys.argv[1]), load_grid(sys.argv[2])
client = mlflow.tracking.MlflowClient()
exp = client.get_experiment_by_name("losa")
runs = client.search_runs([exp.experiment_id], "tags.`losa.kind` = 'cell'")
per_cell = collections.Counter(x.data.tags["losa.cell_id"] for x in runs if x.info.status == "FINISHED")
assert sorted(per_cell) == sorted(c.id for c in grid.cells()) and set(per_cell.values()) == {1}, per_cell
s3 = boto3.client("s3")
objs = s3.list_objects_v2(Bucket="losa-artifacts").get("Contents", [])
mlobjs = s3.list_objects_v2(Bucket="losa-mlflow").get("Contents", [])
workers = collections.Counter("machine-1" if "machine-1" in p.read_text() else "machine-2"
                              for p in [r / "worker-1.log", r / "worker-2.log"] if "ppl " in p.read_text())
print(f"cells: {len(per_cell)}, one finished run each on the MLflow server; "
      f"{len(objs)} objects ({sum(o['Size'] for o in objs) / 2**20:.1f} MiB) in s3://losa-artifacts, "
      f"{len(mlobjs)} MLflow artifacts in s3://losa-mlflow; workers that ran cells: {sorted(workers)}")
for m in (1, 2):
    print(f"machine-{m} ran:", sum(1 for line in (r / f"worker-{m}.log").read_text().splitlines() if ": ppl " in line),
          "cells")
EOF
