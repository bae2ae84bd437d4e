# Two entry points (see README): `make run` (main job on the embedded testbed) and `make test`.
PYTHON ?= python3
VENV ?= .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test bench
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/losa table

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/prune_speed.py
