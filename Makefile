# Two entry points (see README): `make run` (main job on the embedded testbed) and `make test`.
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test bench down
install: $(VENV)/.installed

# the main job: the testbed grid through the deployment path (local Prefect server + worker), then its tables
run: $(VENV)/.installed
	$(VENV)/bin/losa launch testbed

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/prune_speed.py
	$(VENV)/bin/python benchmarks/adapter_speed.py
	$(VENV)/bin/python benchmarks/grid_cache.py

down: $(VENV)/.installed
	$(VENV)/bin/losa down
