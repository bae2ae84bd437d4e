"""Prefect flows, the ``losa`` CLI, tracking and tables (the orchestration side of the project)."""

import os

# OpenMP threads that wait by sleeping instead of spinning. This package is the entry point of every CLI and Prefect
# process, and it must run before torch loads its OpenMP runtime. Measured on SmolLM2 with 2 cores shared with
# other jobs: a masked-LoRA step took 37-70 s with spinning threads and 11-13 s with passive ones (the default
# spin starves every other process on a busy machine). Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
